//! The host side of Firecracker's hybrid vsock: a unix socket per VM on which the host writes
//! `CONNECT <port>\n` and reads `OK <assigned host port>\n`; after that the unix stream carries
//! the guest's AF_VSOCK connection. vhost-device-vsock (QEMU backend) and the built-in VMM's
//! vsock muxer both speak it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::time::Instant;

use super::{AgentReady, GuestConnector, HypervisorError, Result};

/// The agent's port through a VM's hybrid-vsock socket.
#[derive(Debug, Clone)]
pub struct HybridVsock {
    uds: PathBuf,
}

impl HybridVsock {
    pub fn new(uds: &Path) -> Self {
        Self { uds: uds.to_path_buf() }
    }
}

#[async_trait]
impl GuestConnector for HybridVsock {
    async fn dial(&self) -> Result<UnixStream> {
        connect(&self.uds, crate::agent::AGENT_VSOCK_PORT).await
    }

    async fn dial_port(&self, port: u32) -> Result<UnixStream> {
        connect(&self.uds, port).await
    }

    fn describe(&self) -> String {
        self.uds.display().to_string()
    }
}

/// The host's end of the agent's "ready" connection (host vsock port
/// [`crate::agent::AGENT_READY_VSOCK_PORT`]): bound before the VM starts, removed on drop.
pub struct ReadyListener {
    listener: UnixListener,
    path: PathBuf,
}

impl ReadyListener {
    /// Listens for the agent of the VM whose hybrid-vsock socket will be `vsock_uds`.
    pub fn bind(vsock_uds: &Path) -> Result<Self> {
        let port = crate::agent::AGENT_READY_VSOCK_PORT;
        let listener = listen_guest_to_host(vsock_uds, port)?;
        Ok(Self { listener, path: guest_to_host_path(vsock_uds, port) })
    }
}

impl Drop for ReadyListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[async_trait]
impl AgentReady for ReadyListener {
    async fn wait(&self, timeout: Duration, vm_exited: BoxFuture<'static, ()>) -> Result<()> {
        let started = Instant::now();
        let accepted = tokio::select! {
            accepted = self.listener.accept() => accepted,
            () = vm_exited => return Err(HypervisorError::ExitedBeforeReady),
            () = tokio::time::sleep(timeout) => {
                return Err(HypervisorError::AgentNotReady {
                    port: crate::agent::AGENT_READY_VSOCK_PORT,
                    timeout,
                })
            }
        };
        let (mut stream, _) = accepted
            .map_err(|source| HypervisorError::ReadyAccept { path: self.path.clone(), source })?;
        // Only the connection matters; the line is read for the debug log.
        let mut line = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(1), stream.read(&mut line))
            .await
            .ok()
            .and_then(|r| r.ok())
            .unwrap_or(0);
        tracing::debug!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            line = %String::from_utf8_lossy(&line[..n]).trim_end(),
            "agent announced itself"
        );
        Ok(())
    }
}

/// Opens a stream to guest vsock `port` through the hybrid-vsock socket at `uds`.
pub async fn connect(uds: &Path, port: u32) -> Result<UnixStream> {
    let io_err = |source| HypervisorError::VsockConnect { port, path: uds.to_path_buf(), source };
    let mut stream = UnixStream::connect(uds).await.map_err(io_err)?;
    super::peer::check(uds, &stream)?;
    stream.write_all(format!("CONNECT {port}\n").as_bytes()).await.map_err(io_err)?;
    // Read the answer byte by byte: anything after the newline already belongs to the guest.
    let mut answer = Vec::with_capacity(16);
    loop {
        let mut byte = [0u8; 1];
        let n = stream.read(&mut byte).await.map_err(io_err)?;
        if n == 0 || answer.len() > 64 {
            break;
        }
        if byte[0] == b'\n' {
            let line = String::from_utf8_lossy(&answer);
            if line.starts_with("OK ") {
                return Ok(stream);
            }
            break;
        }
        answer.push(byte[0]);
    }
    Err(HypervisorError::VsockRefused {
        port,
        answer: String::from_utf8_lossy(&answer).into_owned(),
    })
}

/// Where guest-initiated connections to host vsock `port` arrive: `<uds>_<port>`.
pub fn guest_to_host_path(uds: &Path, port: u32) -> PathBuf {
    let mut path = uds.as_os_str().to_owned();
    path.push(format!("_{port}"));
    PathBuf::from(path)
}

/// Listens for guest-initiated connections to host vsock `port` of the VM whose hybrid-vsock
/// socket is `uds` (replacing a stale socket file). Bind before the VM boots.
pub fn listen_guest_to_host(uds: &Path, port: u32) -> Result<UnixListener> {
    let path = guest_to_host_path(uds, port);
    let io_err = |source| HypervisorError::VsockListen { path: path.clone(), source };
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io_err(e)),
        _ => {}
    }
    let listener = UnixListener::bind(&path).map_err(io_err)?;
    // The VMM may run as its own unprivileged uid (builtin jail) and must be able to connect;
    // the run directory (0700, the VMM's or root's) keeps everyone else out.
    open_to_all(&path).map_err(io_err)?;
    Ok(listener)
}

/// Makes the socket just bound at `path` mode 0666 without following a symlink: the run
/// directory is the VM's, whose uid could have replaced the socket with a link to a root file
/// since the bind. The node is opened O_PATH|O_NOFOLLOW, checked to be the socket, and changed
/// through its descriptor's /proc link, which names that node, not a path.
fn open_to_all(path: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
    let node = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW)
        .open(path)?;
    if !node.metadata()?.file_type().is_socket() {
        return Err(std::io::Error::other(format!("{} is no longer a socket", path.display())));
    }
    let by_fd = format!("/proc/self/fd/{}", node.as_raw_fd());
    std::fs::set_permissions(by_fd, std::fs::Permissions::from_mode(0o666))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_to_host_path_appends_the_port() {
        assert_eq!(
            guest_to_host_path(Path::new("/run/vms/ab/vsock.sock"), 1025),
            PathBuf::from("/run/vms/ab/vsock.sock_1025")
        );
    }

    /// A hybrid-vsock socket that answers every CONNECT with OK, as another pod's does.
    fn answering_socket(path: &Path) -> tokio::task::JoinHandle<()> {
        let listener = UnixListener::bind(path).unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut line = [0u8; 64];
                let _ = stream.read(&mut line).await;
                let _ = stream.write_all(b"OK 1073741824\n").await;
            }
        })
    }

    /// A helper running as the VM's uid (which owns the run directory) replaces `vsock.sock`
    /// with a symlink to another pod's socket: the daemon must not talk to that pod's agent.
    #[tokio::test]
    async fn a_vsock_socket_swapped_for_a_symlink_to_another_pods_is_refused() {
        if !nix::unistd::Uid::effective().is_root() {
            println!("SKIP: chown needs root");
            return;
        }
        let other_pod = tempfile::tempdir().unwrap();
        let other = other_pod.path().join("vsock.sock");
        let server = answering_socket(&other);
        connect(&other, 1024).await.expect("the other pod's own socket answers");
        let vms = tempfile::tempdir().unwrap();
        let run_dir = vms.path().join("vm");
        std::fs::create_dir(&run_dir).unwrap();
        let vm_uid = 64_998;
        nix::unistd::chown(&run_dir, Some(vm_uid.into()), Some(vm_uid.into())).unwrap();
        let uds = run_dir.join("vsock.sock");
        // What the VM's uid can do in its own directory.
        std::os::unix::fs::symlink(&other, &uds).unwrap();
        match connect(&uds, 1024).await {
            Err(HypervisorError::ForeignPeer(_)) => {}
            Err(e) => panic!("refused for another reason: {e}"),
            Ok(_) => panic!("connected to another pod's agent through {}", uds.display()),
        }
        server.abort();
    }

    #[tokio::test]
    async fn a_guest_to_host_socket_is_open_to_the_vm_and_a_symlink_is_not_followed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock.sock");
        let _listener = listen_guest_to_host(&uds, 1025).unwrap();
        let path = guest_to_host_path(&uds, 1025);
        let mode = std::fs::symlink_metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o666);
        let target = dir.path().join("root-file");
        std::fs::write(&target, "").unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&target, &path).unwrap();
        assert!(open_to_all(&path).is_err());
        let mode = std::fs::metadata(&target).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the symlink's target was made {mode:o}");
    }

    #[tokio::test]
    async fn a_guest_to_host_listener_replaces_a_stale_socket() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock.sock");
        drop(listen_guest_to_host(&uds, 1025).unwrap());
        let listener = listen_guest_to_host(&uds, 1025).unwrap();
        let path = guest_to_host_path(&uds, 1025);
        let client = tokio::spawn(async move { UnixStream::connect(path).await.unwrap() });
        listener.accept().await.unwrap();
        client.await.unwrap();
    }
}
