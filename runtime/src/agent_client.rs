//! The host's gRPC client of `podvisor-agent`.
//!
//! The agent is reached through the VM's hybrid-vsock socket ([`connect`]) or, when it runs on
//! the host in tests, through a plain unix socket ([`connect_unix`]).
//!
//! A booting guest is not dialled: the host binds [`listen_for_ready`] before
//! [`Hypervisor::start`](crate::hypervisor::Hypervisor::start) and [`connect_after_boot`] waits
//! until the agent connects to it (see [`podvisor_proto::AGENT_READY_VSOCK_PORT`] for why), then
//! dials once. [`connect`] itself retries until `Ping` answers, for agents already up (after a
//! daemon restart) whose stream broke.
//!
//! Reconnection: the returned client's [`Channel`] owns one HTTP/2 connection over one stream.
//! If that stream breaks (agent restarted, VM gone), the RPCs in flight fail with an error
//! status and the next RPC dials again through the same connector (once per RPC; there is no
//! background retry loop). A caller that wants to wait for the agent to come back calls
//! [`connect`] again. The client is cheap to clone; clones share the connection.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use podvisor_proto::agent::agent_client::AgentClient;
use podvisor_proto::agent::PingRequest;
use tokio::io::AsyncReadExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::hypervisor::vsock;

/// How long one dial + Ping may take before it is abandoned and retried. A guest that has not
/// set up its vsock device yet can leave a `CONNECT` unanswered; a fresh attempt gets through
/// once it has.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause between attempts while the agent is not up.
const RETRY_INTERVAL: Duration = Duration::from_millis(50);

/// Errors of the agent client.
#[derive(Debug, thiserror::Error)]
pub enum AgentClientError {
    #[error(
        "the agent behind {path} did not answer Ping within {timeout:?} (last error: {last_error})"
    )]
    Timeout { path: PathBuf, timeout: Duration, last_error: String },
    #[error("listening for the agent's ready connection: {0}")]
    ReadyListen(#[from] crate::hypervisor::HypervisorError),
    #[error("accepting the agent's ready connection on {path}: {source}")]
    ReadyAccept { path: PathBuf, source: std::io::Error },
    #[error("the agent did not announce itself on host vsock port {port} within {timeout:?}")]
    NotReady { port: u32, timeout: Duration },
    #[error("the VM exited before its agent announced itself")]
    VmExited,
}

/// The host's end of the agent's "ready" connection: bound before the VM starts.
pub struct ReadyListener {
    listener: UnixListener,
    path: PathBuf,
}

impl Drop for ReadyListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Listens for the agent of the VM whose hybrid-vsock socket will be `vsock_uds` to announce
/// itself. The socket's directory must exist; call before the VM starts.
pub fn listen_for_ready(vsock_uds: &Path) -> Result<ReadyListener, AgentClientError> {
    let port = podvisor_proto::AGENT_READY_VSOCK_PORT;
    let listener = vsock::listen_guest_to_host(vsock_uds, port)?;
    Ok(ReadyListener { listener, path: vsock::guest_to_host_path(vsock_uds, port) })
}

/// Waits until the booting VM's agent announces itself on `ready` (or `vm_alive` says the VM
/// is gone, or `timeout` passes), then connects to it through `vsock_uds`.
pub async fn connect_after_boot(
    ready: ReadyListener,
    vsock_uds: &Path,
    timeout: Duration,
    vm_alive: impl Fn() -> bool,
) -> Result<AgentClient<Channel>, AgentClientError> {
    let started = Instant::now();
    let deadline = started + timeout;
    {
        let accept = ready.listener.accept();
        tokio::pin!(accept);
        loop {
            tokio::select! {
                accepted = &mut accept => {
                    let (mut stream, _) = accepted.map_err(|source| AgentClientError::ReadyAccept {
                        path: ready.path.clone(),
                        source,
                    })?;
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
                    break;
                }
                _ = tokio::time::sleep(Duration::from_millis(250)) => {
                    if !vm_alive() {
                        return Err(AgentClientError::VmExited);
                    }
                    if Instant::now() >= deadline {
                        return Err(AgentClientError::NotReady {
                            port: podvisor_proto::AGENT_READY_VSOCK_PORT,
                            timeout,
                        });
                    }
                }
            }
        }
    }
    drop(ready);
    // The agent listens by now; the retries only cover a slow first answer.
    let remaining = deadline.saturating_duration_since(Instant::now());
    connect(vsock_uds, remaining.max(Duration::from_secs(10))).await
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type DialFuture = Pin<Box<dyn Future<Output = Result<TokioIo<UnixStream>, BoxError>> + Send>>;

/// Connects to the agent on guest vsock port [`podvisor_proto::AGENT_VSOCK_PORT`] through the
/// VM's hybrid-vsock socket, waiting up to `timeout` for it to answer `Ping`.
pub async fn connect(
    vsock_uds: &Path,
    timeout: Duration,
) -> Result<AgentClient<Channel>, AgentClientError> {
    let uds = vsock_uds.to_path_buf();
    let dial = move || -> DialFuture {
        let uds = uds.clone();
        Box::pin(async move {
            let stream = vsock::connect(&uds, podvisor_proto::AGENT_VSOCK_PORT).await?;
            Ok(TokioIo::new(stream))
        })
    };
    connect_with(vsock_uds, timeout, dial).await
}

/// Connects to an agent serving gRPC on a unix socket (the agent run on the host, in tests),
/// waiting up to `timeout` for it to answer `Ping`.
#[cfg_attr(not(test), allow(dead_code))] // the daemon itself always goes through vsock
pub async fn connect_unix(
    path: &Path,
    timeout: Duration,
) -> Result<AgentClient<Channel>, AgentClientError> {
    let socket = path.to_path_buf();
    let dial = move || -> DialFuture {
        let socket = socket.clone();
        Box::pin(async move { Ok(TokioIo::new(UnixStream::connect(&socket).await?)) })
    };
    connect_with(path, timeout, dial).await
}

async fn connect_with<D>(
    target: &Path,
    timeout: Duration,
    dial: D,
) -> Result<AgentClient<Channel>, AgentClientError>
where
    D: Fn() -> DialFuture + Clone + Send + Sync + 'static,
{
    // The URI is required by HTTP/2 but never resolved: the connector below dials.
    let endpoint = Endpoint::from_static("http://podvisor-agent")
        // Bounds the output in flight, which the agent can resend after a broken stream.
        .initial_stream_window_size(Some(podvisor_proto::AGENT_STREAM_WINDOW))
        .initial_connection_window_size(Some(4 * podvisor_proto::AGENT_STREAM_WINDOW));
    let deadline = Instant::now() + timeout;
    let mut last_error = String::from("no attempt was made");
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(AgentClientError::Timeout {
                path: target.to_path_buf(),
                timeout,
                last_error,
            });
        }
        let attempt_timeout = remaining.min(ATTEMPT_TIMEOUT);
        let attempt = async {
            let dial = dial.clone();
            let connector = tower::service_fn(move |_: Uri| dial());
            let channel = endpoint.connect_with_connector(connector).await.map_err(error_chain)?;
            let mut client = AgentClient::new(channel);
            client.ping(PingRequest {}).await.map_err(|status| status.to_string())?;
            Ok::<_, String>(client)
        };
        match tokio::time::timeout(attempt_timeout, attempt).await {
            Ok(Ok(client)) => return Ok(client),
            Ok(Err(e)) => last_error = e,
            Err(_) => last_error = format!("no answer within {attempt_timeout:?}"),
        }
        tracing::trace!(target = %target.display(), %last_error, "agent not reachable yet");
        let remaining = deadline.saturating_duration_since(Instant::now());
        tokio::time::sleep(remaining.min(RETRY_INTERVAL)).await;
    }
}

/// An error with its sources: tonic's transport errors say little at the top level.
fn error_chain(e: impl std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        // Some errors already print their source: do not repeat it.
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn absent_socket_times_out_with_the_reason() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("none.sock");
        let started = Instant::now();
        let err = connect(&path, Duration::from_millis(300)).await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(2));
        let text = err.to_string();
        assert!(text.contains("none.sock") && text.contains("No such file"), "{text}");
        let err = connect_unix(&path, Duration::from_millis(100)).await.unwrap_err();
        assert!(err.to_string().contains("No such file"), "{err}");
    }

    /// A hybrid-vsock socket whose guest refuses the port (what vhost-device-vsock does while
    /// nothing listens in the guest): the client keeps retrying, then reports the refusal.
    #[tokio::test]
    async fn refused_port_is_retried_then_reported() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("vsock.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let accepts = tokio::spawn(async move {
            let mut n = 0;
            while let Ok((stream, _)) = listener.accept().await {
                n += 1;
                drop(stream);
                if n == 3 {
                    break;
                }
            }
            n
        });
        let err = connect(&path, Duration::from_millis(800)).await.unwrap_err();
        assert!(err.to_string().contains("refused"), "{err}");
        assert_eq!(accepts.await.unwrap(), 3);
    }

    /// The real agent in host mode (env `PODVISOR_AGENT`, default `build/podvisor-agent` in
    /// the repository): connect_unix waits for it, and after the agent is
    /// restarted the same client reconnects on its next RPC.
    #[tokio::test]
    async fn reconnects_after_the_agent_restarts() {
        let agent = std::env::var_os("PODVISOR_AGENT").map(PathBuf::from).unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../build/podvisor-agent")
        });
        if !agent.is_file() {
            let reason = format!("{} not found (set PODVISOR_AGENT)", agent.display());
            assert!(std::env::var("PODVISOR_REQUIRE_E2E").as_deref() != Ok("1"), "{reason}");
            eprintln!("SKIP: {reason}");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let socket = tmp.path().join("agent.sock");
        let spawn = || {
            tokio::process::Command::new(&agent)
                .arg("--listen")
                .arg(format!("unix:{}", socket.display()))
                .arg("--state-dir")
                .arg(tmp.path().join("state"))
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .unwrap()
        };
        let mut first = spawn();
        let mut client = connect_unix(&socket, Duration::from_secs(20)).await.unwrap();
        first.kill().await.unwrap();
        let err = client.ping(PingRequest {}).await.unwrap_err();
        println!("ping with the agent gone: {err}");
        let _second = spawn();
        // The next RPC after the break dials again (once per RPC): retry while it starts.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match client.ping(PingRequest {}).await {
                Ok(_) => break,
                Err(e) => assert!(Instant::now() < deadline, "no reconnection: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
