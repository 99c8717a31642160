//! The host side of Firecracker's hybrid vsock: a unix socket per VM on which the host writes
//! `CONNECT <port>\n` and reads `OK <assigned host port>\n`; after that the unix stream carries
//! the guest's AF_VSOCK connection. vhost-device-vsock (QEMU backend) and the built-in VMM's
//! vsock muxer both speak it.

use std::path::{Path, PathBuf};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use super::{HypervisorError, Result};

/// Opens a stream to guest vsock `port` through the hybrid-vsock socket at `uds`.
pub async fn connect(uds: &Path, port: u32) -> Result<UnixStream> {
    let io_err = |source| HypervisorError::VsockConnect { port, path: uds.to_path_buf(), source };
    let mut stream = UnixStream::connect(uds).await.map_err(io_err)?;
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
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).map_err(io_err)?;
    Ok(listener)
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
