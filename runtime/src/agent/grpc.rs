//! [`GuestAgent`] over the agent protocol: tonic gRPC on one byte stream that a
//! [`GuestConnector`] opens (the VM's hybrid vsock). All conversion between the sandbox
//! layer's agent types and `podvisor_proto` happens here.
//!
//! Connection: the client connects on its first call, retrying dial + `Ping` until
//! [`CONNECT_DEADLINE`](super::CONNECT_DEADLINE). Its [`Channel`] owns one HTTP/2 connection;
//! if that breaks (agent restarted, VM gone) the calls in flight fail and the next call dials
//! again through the same connector (once per call; there is no background retry loop).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use hyper_util::rt::TokioIo;
use podvisor_proto::agent::{self as pb, agent_client::AgentClient};
use tokio::net::UnixStream;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint, Uri};

use super::{
    AgentError, AgentStatus, ContainerStats, ExitStatus, GuestAgent, NetworkSetup, NewContainer,
    NewExec, OutputChunk, OutputKind, OutputStream, ProcessId, Refusal, Result, SandboxSetup,
    SandboxStats, StdioMode, CALL_DEADLINE, CREATE_DEADLINE,
};
use crate::hypervisor::GuestConnector;

/// How long one dial + Ping may take before it is abandoned and retried. A guest that has not
/// set up its vsock device yet can leave a `CONNECT` unanswered; a fresh attempt gets through
/// once it has.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause between attempts while the agent is not up.
const RETRY_INTERVAL: Duration = Duration::from_millis(50);
/// Shutdown powers the VM off; its answer may never come.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(2);

/// Errors reaching the agent.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("the agent behind {target} did not answer Ping within {timeout:?} (last error: {last_error})")]
    Timeout { target: String, timeout: Duration, last_error: String },
}

/// The tonic client of one sandbox's agent.
pub struct GrpcAgent {
    connector: Arc<dyn GuestConnector>,
    connect_timeout: Duration,
    client: Mutex<Option<AgentClient<Channel>>>,
}

impl GrpcAgent {
    pub fn new(connector: Arc<dyn GuestConnector>, connect_timeout: Duration) -> Self {
        Self { connector, connect_timeout, client: Mutex::new(None) }
    }

    /// The connected client, connecting first if needed.
    async fn client(&self) -> std::result::Result<AgentClient<Channel>, ConnectError> {
        if let Some(client) = self.client.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Ok(client);
        }
        let client = connect(self.connector.clone(), self.connect_timeout).await?;
        *self.client.lock().unwrap_or_else(|p| p.into_inner()) = Some(client.clone());
        Ok(client)
    }

    /// Runs one unary call with a deadline covering the connection and the answer.
    async fn call<T, F, Fut>(&self, call: &'static str, deadline: Duration, f: F) -> Result<T>
    where
        F: FnOnce(AgentClient<Channel>) -> Fut + Send,
        Fut: Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>> + Send,
        T: Send,
    {
        let attempt = async {
            let client = self.client().await?;
            f(client).await.map(tonic::Response::into_inner).map_err(|s| from_status(call, &s))
        };
        match tokio::time::timeout(deadline, attempt).await {
            Ok(result) => result,
            Err(_) => Err(AgentError::Deadline { call, deadline }),
        }
    }
}

/// Maps a gRPC status from the agent to the boundary's error.
fn from_status(call: &'static str, status: &tonic::Status) -> AgentError {
    use tonic::Code;
    let message = status.message().to_string();
    let refusal = match status.code() {
        Code::NotFound => Refusal::NotFound,
        Code::InvalidArgument => Refusal::InvalidArgument,
        Code::FailedPrecondition => Refusal::FailedPrecondition,
        Code::Unavailable | Code::Cancelled | Code::Unknown if message.contains("transport") => {
            return AgentError::Unreachable { call, message: status.to_string() }
        }
        Code::Unavailable => return AgentError::Unreachable { call, message },
        _ => Refusal::Failed,
    };
    AgentError::Refused { call, refusal, message }
}

fn process_ref(p: &ProcessId) -> pb::ProcessRef {
    pb::ProcessRef { container_id: p.container_id.clone(), exec_id: p.exec_id.clone() }
}

fn stdio(mode: StdioMode) -> pb::StdioConfig {
    pb::StdioConfig { stdin: mode.stdin, stdin_once: mode.stdin_once, tty: mode.tty }
}

fn output_chunk(chunk: pb::OutputChunk) -> OutputChunk {
    let kind = if chunk.stream == pb::OutputStream::Stderr as i32 {
        OutputKind::Stderr
    } else {
        OutputKind::Stdout
    };
    OutputChunk { kind, data: chunk.data, offset: chunk.offset }
}

#[async_trait]
impl GuestAgent for GrpcAgent {
    async fn status(&self) -> Result<AgentStatus> {
        let r = self
            .call("Ping", CALL_DEADLINE, |mut c| async move { c.ping(pb::PingRequest {}).await })
            .await?;
        Ok(AgentStatus {
            version: r.version,
            uptime_seconds: r.uptime_seconds,
            tracked_processes: r.tracked_processes,
            rss_bytes: r.rss_bytes,
        })
    }

    async fn create_sandbox(&self, s: SandboxSetup) -> Result<()> {
        let req = pb::CreateSandboxRequest {
            sandbox_id: s.sandbox_id,
            hostname: s.hostname,
            dns_servers: s.dns_servers,
            dns_searches: s.dns_searches,
            dns_options: s.dns_options,
            sysctls: s.sysctls,
            mount_shared_fs: !s.shares.is_empty(),
            host_time_unix_nanos: s.host_time_unix_nanos,
            pod_pid_namespace: s.pod_pid_namespace,
            pod_uid_mappings: s.pod_uid_mappings.iter().map(id_mapping).collect(),
            pod_gid_mappings: s.pod_gid_mappings.iter().map(id_mapping).collect(),
            entropy: s.entropy,
            mac_changes: s
                .mac_changes
                .into_iter()
                .map(|(from, to)| pb::MacChange { from, to })
                .collect(),
            shared_fs: s
                .shares
                .into_iter()
                .map(|sh| pb::SharedFs {
                    tag: sh.tag,
                    guest_path: sh.guest_path,
                    read_only: sh.read_only,
                })
                .collect(),
        };
        self.call(
            "CreateSandbox",
            CREATE_DEADLINE,
            |mut c| async move { c.create_sandbox(req).await },
        )
        .await?;
        Ok(())
    }

    async fn setup_network(&self, n: NetworkSetup) -> Result<()> {
        let req = pb::SetupNetworkRequest {
            interfaces: n
                .interfaces
                .into_iter()
                .map(|i| pb::NetInterface {
                    mac: i.mac,
                    name: i.name,
                    mtu: i.mtu,
                    addresses: i.addresses.iter().map(ToString::to_string).collect(),
                })
                .collect(),
            routes: n
                .routes
                .into_iter()
                .map(|r| pb::NetRoute {
                    destination: r.destination.to_string(),
                    gateway: r.gateway.map(|g| g.to_string()).unwrap_or_default(),
                    interface: r.interface,
                })
                .collect(),
            hosts: n
                .hosts
                .into_iter()
                .map(|(ip, names)| pb::HostEntry { ip: ip.to_string(), names })
                .collect(),
        };
        self.call("SetupNetwork", CALL_DEADLINE, |mut c| async move { c.setup_network(req).await })
            .await?;
        Ok(())
    }

    async fn create_container(&self, n: NewContainer) -> Result<u32> {
        let req = pb::CreateContainerRequest {
            container_id: n.id,
            oci_spec_json: n.oci_spec_json,
            rootfs: Some(pb::Rootfs { lower_dirs: n.lower_dirs, read_only: false }),
            stdio: Some(stdio(n.stdio)),
            join_pod_pid_namespace: n.join_pod_pid_namespace,
            privileged: n.privileged,
            devices: n
                .devices
                .into_iter()
                .map(|d| pb::GuestDevice {
                    guest_path: d.guest_path,
                    container_path: d.container_path,
                    permissions: d.permissions,
                })
                .collect(),
        };
        let r = self
            .call("CreateContainer", CREATE_DEADLINE, |mut c| async move {
                c.create_container(req).await
            })
            .await?;
        Ok(r.pid)
    }

    async fn start_container(&self, id: &str) -> Result<()> {
        let req = pb::ContainerRef { container_id: id.to_string() };
        self.call("StartContainer", CREATE_DEADLINE, |mut c| async move {
            c.start_container(req).await
        })
        .await?;
        Ok(())
    }

    async fn remove_container(&self, id: &str) -> Result<()> {
        let req = pb::RemoveContainerRequest { container_id: id.to_string() };
        self.call("RemoveContainer", CREATE_DEADLINE, |mut c| async move {
            c.remove_container(req).await
        })
        .await?;
        Ok(())
    }

    async fn exec(&self, e: NewExec) -> Result<u32> {
        let req = pb::ExecProcessRequest {
            container_id: e.process.container_id,
            exec_id: e.process.exec_id,
            oci_process_json: e.oci_process_json,
            stdio: Some(stdio(e.stdio)),
        };
        let r = self
            .call("ExecProcess", CREATE_DEADLINE, |mut c| async move { c.exec_process(req).await })
            .await?;
        Ok(r.pid)
    }

    async fn signal(&self, process: &ProcessId, signal: i32, all: bool) -> Result<()> {
        let req = pb::SignalProcessRequest { process: Some(process_ref(process)), signal, all };
        self.call(
            "SignalProcess",
            CALL_DEADLINE,
            |mut c| async move { c.signal_process(req).await },
        )
        .await?;
        Ok(())
    }

    async fn wait(&self, process: &ProcessId) -> Result<ExitStatus> {
        // Blocks until the process exits: the connection has a deadline, the wait none.
        let mut client = tokio::time::timeout(CALL_DEADLINE, self.client())
            .await
            .map_err(|_| AgentError::Deadline { call: "WaitProcess", deadline: CALL_DEADLINE })??;
        let r = client
            .wait_process(process_ref(process))
            .await
            .map_err(|s| from_status("WaitProcess", &s))?
            .into_inner();
        Ok(ExitStatus { exit_code: r.exit_code, signal: r.signal, oom_killed: r.oom_killed })
    }

    async fn output(&self, process: &ProcessId, offsets: [u64; 2]) -> Result<OutputStream> {
        let req = pb::ReadOutputRequest {
            process: Some(process_ref(process)),
            stdout_offset: offsets[0],
            stderr_offset: offsets[1],
        };
        let stream = self
            .call("ReadOutput", CALL_DEADLINE, |mut c| async move { c.read_output(req).await })
            .await?;
        Ok(Box::pin(
            stream.map(|item| item.map(output_chunk).map_err(|s| from_status("ReadOutput", &s))),
        ))
    }

    async fn write_stdin(&self, process: &ProcessId, data: Vec<u8>) -> Result<()> {
        let req = pb::WriteStdinRequest { process: Some(process_ref(process)), data };
        self.call("WriteStdin", CALL_DEADLINE, |mut c| async move { c.write_stdin(req).await })
            .await?;
        Ok(())
    }

    async fn close_stdin(&self, process: &ProcessId) -> Result<()> {
        let req = process_ref(process);
        self.call("CloseStdin", CALL_DEADLINE, |mut c| async move { c.close_stdin(req).await })
            .await?;
        Ok(())
    }

    async fn resize_tty(&self, process: &ProcessId, width: u32, height: u32) -> Result<()> {
        let req = pb::ResizeTtyRequest { process: Some(process_ref(process)), width, height };
        self.call("ResizeTty", CALL_DEADLINE, |mut c| async move { c.resize_tty(req).await })
            .await?;
        Ok(())
    }

    async fn container_stats(&self, id: &str) -> Result<ContainerStats> {
        let req = pb::ContainerRef { container_id: id.to_string() };
        let s =
            self.call("ContainerStats", CALL_DEADLINE, |mut c| async move {
                c.container_stats(req).await
            })
            .await?;
        Ok(ContainerStats {
            cpu_usage_nanos: s.cpu_usage_nanos,
            memory_working_set_bytes: s.memory_working_set_bytes,
            memory_usage_bytes: s.memory_usage_bytes,
            memory_rss_bytes: s.memory_rss_bytes,
            page_faults: s.page_faults,
            major_page_faults: s.major_page_faults,
            pids: s.pids,
            writable_layer_bytes: s.writable_layer_bytes,
            writable_layer_inodes: s.writable_layer_inodes,
            timestamp_unix_nanos: s.timestamp_unix_nanos,
        })
    }

    async fn sandbox_stats(&self) -> Result<SandboxStats> {
        let s = self
            .call("SandboxStats", CALL_DEADLINE, |mut c| async move {
                c.sandbox_stats(pb::Empty {}).await
            })
            .await?;
        Ok(SandboxStats {
            cpu_usage_nanos: s.cpu_usage_nanos,
            memory_working_set_bytes: s.memory_working_set_bytes,
            memory_usage_bytes: s.memory_usage_bytes,
            pids: s.pids,
            memory_total_bytes: s.memory_total_bytes,
            memory_available_bytes: s.memory_available_bytes,
            timestamp_unix_nanos: s.timestamp_unix_nanos,
        })
    }

    async fn update_container(&self, id: &str, resources_json: Vec<u8>) -> Result<()> {
        let req = pb::UpdateContainerRequest { container_id: id.to_string(), resources_json };
        self.call("UpdateContainer", CALL_DEADLINE, |mut c| async move {
            c.update_container(req).await
        })
        .await?;
        Ok(())
    }

    async fn shutdown(&self) -> Result<()> {
        self.call(
            "Shutdown",
            SHUTDOWN_DEADLINE,
            |mut c| async move { c.shutdown(pb::Empty {}).await },
        )
        .await?;
        Ok(())
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type DialFuture =
    Pin<Box<dyn Future<Output = std::result::Result<TokioIo<UnixStream>, BoxError>> + Send>>;

/// Connects to the agent through `connector`, waiting up to `timeout` for it to answer `Ping`.
pub async fn connect(
    connector: Arc<dyn GuestConnector>,
    timeout: Duration,
) -> std::result::Result<AgentClient<Channel>, ConnectError> {
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
            return Err(ConnectError::Timeout {
                target: connector.describe(),
                timeout,
                last_error,
            });
        }
        let attempt_timeout = remaining.min(ATTEMPT_TIMEOUT);
        let attempt = async {
            let dialer = connector.clone();
            let service = tower::service_fn(move |_: Uri| -> DialFuture {
                let dialer = dialer.clone();
                Box::pin(async move {
                    let stream = dialer.dial().await.map_err(|e| Box::new(e) as BoxError)?;
                    Ok(TokioIo::new(stream))
                })
            });
            let channel = endpoint.connect_with_connector(service).await.map_err(error_chain)?;
            let mut client = AgentClient::new(channel);
            client.ping(pb::PingRequest {}).await.map_err(|status| status.to_string())?;
            Ok::<_, String>(client)
        };
        match tokio::time::timeout(attempt_timeout, attempt).await {
            Ok(Ok(client)) => return Ok(client),
            Ok(Err(e)) => last_error = e,
            Err(_) => last_error = format!("no answer within {attempt_timeout:?}"),
        }
        tracing::trace!(target = %connector.describe(), %last_error, "agent not reachable yet");
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

fn id_mapping(r: &super::IdRange) -> pb::IdMapping {
    pb::IdMapping { container_id: r.container_id, host_id: r.host_id, length: r.length }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::hypervisor::vsock::HybridVsock;
    use crate::hypervisor::HypervisorError;

    /// An agent serving gRPC on a plain unix socket (the agent run on the host, in tests).
    #[derive(Debug)]
    struct UnixConnector(PathBuf);

    #[async_trait]
    impl GuestConnector for UnixConnector {
        async fn dial(&self) -> std::result::Result<UnixStream, HypervisorError> {
            UnixStream::connect(&self.0).await.map_err(|source| HypervisorError::VsockConnect {
                port: 0,
                path: self.0.clone(),
                source,
            })
        }
        async fn dial_port(&self, _port: u32) -> std::result::Result<UnixStream, HypervisorError> {
            self.dial().await
        }
        fn describe(&self) -> String {
            self.0.display().to_string()
        }
    }

    #[tokio::test]
    async fn absent_socket_times_out_with_the_reason() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("none.sock");
        let started = Instant::now();
        let err = connect(Arc::new(HybridVsock::new(&path)), Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(2));
        let text = err.to_string();
        assert!(text.contains("none.sock") && text.contains("No such file"), "{text}");
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
        let err =
            connect(Arc::new(HybridVsock::new(&path)), Duration::from_secs(3)).await.unwrap_err();
        assert!(err.to_string().contains("refused"), "{err}");
        assert_eq!(accepts.await.unwrap(), 3);
    }

    /// A guest that accepts the connection and then never answers: every call ends at its
    /// deadline instead of hanging.
    #[tokio::test]
    async fn a_silent_agent_fails_calls_at_their_deadline() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("agent.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let _hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        let agent = GrpcAgent::new(Arc::new(UnixConnector(path)), Duration::from_millis(300));
        let started = Instant::now();
        let err = agent.status().await.unwrap_err();
        assert!(matches!(err, AgentError::Connect(_)), "{err}");
        assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    }

    /// The real agent in host mode (env `PODVISOR_AGENT`, default `build/podvisor-agent` in
    /// the repository): the client waits for it, and after the agent is restarted the same
    /// client reconnects on its next call.
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
        let client =
            GrpcAgent::new(Arc::new(UnixConnector(socket.clone())), Duration::from_secs(20));
        let status = client.status().await.unwrap();
        assert!(!status.version.is_empty());
        first.kill().await.unwrap();
        let err = client.status().await.unwrap_err();
        println!("status with the agent gone: {err}");
        let _second = spawn();
        // The next call after the break dials again (once per call): retry while it starts.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match client.status().await {
                Ok(_) => break,
                Err(e) => assert!(Instant::now() < deadline, "no reconnection: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
