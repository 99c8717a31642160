//! The agent boundary: everything the sandbox layer asks of the agent inside a VM, in the
//! sandbox layer's own terms. [`grpc::GrpcAgent`] speaks the agent protocol
//! (`podvisor_proto`) over a [`GuestConnector`] (hybrid vsock for VMs); it is the only place
//! on the host that knows that protocol. Tests substitute a fake ([`fake`]).
//!
//! Every call has a deadline (a hung or hostile guest must not hold a sandbox lock, or
//! `ListContainerStats`, forever). Calls that wait by nature ([`GuestAgent::wait`] and the
//! output stream) have a deadline to be accepted, then run until the process ends.

pub mod grpc;

#[cfg(test)]
pub mod fake;

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::Stream;

use crate::hypervisor::GuestConnector;

/// The guest's side of the protocol that the other host layers need: the vsock ports the agent
/// serves and announces itself on, and where it mounts the pod's shares.
pub use podvisor_proto::{
    AGENT_READY_VSOCK_PORT, AGENT_VSOCK_PORT, GUEST_SHARED_DIR, GUEST_VOLUME_DIR,
    PORT_FORWARD_VSOCK_PORT, SHARED_FS_TAG, VOLUME_FS_TAG,
};

/// A connection to `localhost:<port>` in the guest, for port-forward: a vsock connection of
/// its own (see [`podvisor_proto::PORT_FORWARD_VSOCK_PORT`]), bytes spliced both ways.
pub async fn forward_port(
    connector: &dyn GuestConnector,
    port: u16,
) -> Result<tokio::net::UnixStream> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const CALL: &str = "PortForward";
    let unreachable =
        |e: &dyn std::fmt::Display| AgentError::Unreachable { call: CALL, message: e.to_string() };
    let handshake = async {
        let mut stream = connector
            .dial_port(podvisor_proto::PORT_FORWARD_VSOCK_PORT)
            .await
            .map_err(|e| unreachable(&e))?;
        stream.write_all(format!("PORT {port}\n").as_bytes()).await.map_err(|e| unreachable(&e))?;
        // Byte by byte: what follows the answer is the guest's TCP data.
        let mut line = Vec::new();
        loop {
            let mut byte = [0u8; 1];
            let n = stream.read(&mut byte).await.map_err(|e| unreachable(&e))?;
            if n == 0 || byte[0] == b'\n' || line.len() > 512 {
                break;
            }
            line.push(byte[0]);
        }
        let answer = String::from_utf8_lossy(&line).into_owned();
        match answer.strip_prefix("ERR ") {
            _ if answer == "OK" => Ok(stream),
            Some(reason) => Err(AgentError::Refused {
                call: CALL,
                refusal: Refusal::FailedPrecondition,
                message: reason.to_string(),
            }),
            None => Err(AgentError::Unreachable {
                call: CALL,
                message: format!("unexpected answer {answer:?}"),
            }),
        }
    };
    tokio::time::timeout(CALL_DEADLINE, handshake)
        .await
        .map_err(|_| AgentError::Deadline { call: CALL, deadline: CALL_DEADLINE })?
}

/// How long a quick agent call (signal, start, stats, stdin, ...) may take.
pub const CALL_DEADLINE: Duration = Duration::from_secs(10);
/// How long CreateContainer and ExecProcess may take (the guest mounts and clones).
pub const CREATE_DEADLINE: Duration = Duration::from_secs(60);
/// How long reaching the agent (dial + Ping) may take for a call on a running sandbox.
pub const CONNECT_DEADLINE: Duration = Duration::from_secs(10);

/// Why an agent call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The container or process is unknown to the agent.
    NotFound,
    /// The agent found the request malformed.
    InvalidArgument,
    /// The target is in the wrong state.
    FailedPrecondition,
    /// Anything else the agent reported.
    Failed,
}

/// Errors of the agent boundary.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("agent {call}: {message}")]
    Refused { call: &'static str, refusal: Refusal, message: String },
    #[error("agent {call} did not answer within {deadline:?}")]
    Deadline { call: &'static str, deadline: Duration },
    #[error("agent {call}: the agent is unreachable: {message}")]
    Unreachable { call: &'static str, message: String },
    #[error("connecting to the agent: {0}")]
    Connect(#[from] grpc::ConnectError),
}

impl AgentError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Refused { refusal: Refusal::NotFound, .. })
    }
}

pub type Result<T> = std::result::Result<T, AgentError>;

/// A process in the guest: a container's init process (`exec_id` empty) or one of its execs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct ProcessId {
    pub container_id: String,
    pub exec_id: String,
}

impl ProcessId {
    pub fn init(container_id: &str) -> Self {
        Self { container_id: container_id.to_string(), exec_id: String::new() }
    }

    pub fn exec(container_id: &str, exec_id: &str) -> Self {
        Self { container_id: container_id.to_string(), exec_id: exec_id.to_string() }
    }
}

/// A virtio-fs share the guest mounts at CreateSandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestShare {
    pub tag: String,
    pub guest_path: String,
    pub read_only: bool,
}

/// Pod-level set-up inside the VM.
#[derive(Debug, Clone, Default)]
pub struct SandboxSetup {
    pub sandbox_id: String,
    pub hostname: String,
    pub dns_servers: Vec<String>,
    pub dns_searches: Vec<String>,
    pub dns_options: Vec<String>,
    pub sysctls: HashMap<String, String>,
    pub shares: Vec<GuestShare>,
    /// The host's wall clock (nanoseconds since the epoch) for a guest without an RTC.
    pub host_time_unix_nanos: i64,
    /// Give the pod its own PID namespace, held by a pause process.
    pub pod_pid_namespace: bool,
    /// The pod's user namespace, in which the pause process is made (empty: the VM's).
    pub pod_uid_mappings: Vec<IdRange>,
    pub pod_gid_mappings: Vec<IdRange>,
    /// Fresh host randomness the guest reseeds its RNG from (every pod its own).
    pub entropy: Vec<u8>,
    /// (template MAC, pod MAC) of each network device of a VM restored from a template.
    pub mac_changes: Vec<(String, String)>,
}

/// One range of a user namespace's id map, as guest ids.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IdRange {
    pub container_id: u32,
    pub host_id: u32,
    pub length: u32,
}

/// One guest interface: the virtio-net device with `mac`, renamed to `name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestInterface {
    pub mac: String,
    pub name: String,
    /// 0 keeps the device's.
    pub mtu: u32,
    pub addresses: Vec<ipnet::IpNet>,
}

/// One guest route; `gateway: None` is on-link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestRoute {
    pub destination: ipnet::IpNet,
    pub gateway: Option<std::net::IpAddr>,
    pub interface: String,
}

/// The pod's network as the guest configures it (SetupNetwork).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NetworkSetup {
    pub interfaces: Vec<GuestInterface>,
    pub routes: Vec<GuestRoute>,
    /// Lines for the pod's hosts file: an address and its names.
    pub hosts: Vec<(std::net::IpAddr, Vec<String>)>,
}

/// How a process's standard streams are set up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StdioMode {
    pub stdin: bool,
    pub stdin_once: bool,
    pub tty: bool,
}

/// A container to create in the guest.
#[derive(Debug, Clone, Default)]
pub struct NewContainer {
    pub id: String,
    /// The OCI runtime spec, JSON.
    pub oci_spec_json: Vec<u8>,
    /// Read-only lower directories of its root filesystem, relative to the image share,
    /// top-most first.
    pub lower_dirs: Vec<String>,
    pub stdio: StdioMode,
    pub join_pod_pid_namespace: bool,
    /// The guest gives it the VM's devices.
    pub privileged: bool,
    /// Guest devices it gets by name.
    pub devices: Vec<GuestDevice>,
}

/// A guest device node given to a container.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestDevice {
    pub guest_path: String,
    pub container_path: String,
    pub permissions: String,
}

/// An extra process to run in a container.
#[derive(Debug, Clone, Default)]
pub struct NewExec {
    pub process: ProcessId,
    /// The OCI process (spec.process), JSON.
    pub oci_process_json: Vec<u8>,
    pub stdio: StdioMode,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExitStatus {
    /// The exit code, or 128 + signal.
    pub exit_code: i32,
    /// The signal that ended it, 0 if none.
    pub signal: i32,
    /// The guest's OOM killer ended a process of the container (init processes only).
    pub oom_killed: bool,
}

/// Which output stream a chunk belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputKind {
    Stdout,
    Stderr,
}

impl OutputKind {
    /// 0 for stdout, 1 for stderr.
    pub fn slot(self) -> usize {
        match self {
            Self::Stdout => 0,
            Self::Stderr => 1,
        }
    }
}

/// A piece of a process's output and where it starts in its stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputChunk {
    pub kind: OutputKind,
    pub data: Vec<u8>,
    pub offset: u64,
}

/// A process's output as it comes; it ends after the process's last byte.
pub type OutputStream = Pin<Box<dyn Stream<Item = Result<OutputChunk>> + Send>>;

/// Container statistics from the guest's cgroups.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ContainerStats {
    pub cpu_usage_nanos: u64,
    pub memory_working_set_bytes: u64,
    pub memory_usage_bytes: u64,
    pub memory_rss_bytes: u64,
    pub page_faults: u64,
    pub major_page_faults: u64,
    pub pids: u64,
    /// The container's writable layer.
    pub writable_layer_bytes: u64,
    pub writable_layer_inodes: u64,
    pub timestamp_unix_nanos: i64,
}

/// Pod-level statistics: all of the pod's containers together, and the VM's memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SandboxStats {
    pub cpu_usage_nanos: u64,
    pub memory_working_set_bytes: u64,
    pub memory_usage_bytes: u64,
    pub pids: u64,
    pub memory_total_bytes: u64,
    pub memory_available_bytes: u64,
    pub timestamp_unix_nanos: i64,
}

/// What the agent says about itself.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AgentStatus {
    pub version: String,
    pub uptime_seconds: f64,
    /// Container and exec processes the agent still tracks.
    pub tracked_processes: u32,
    /// The agent's resident set, bytes.
    pub rss_bytes: u64,
}

/// The agent of one sandbox.
#[async_trait]
pub trait GuestAgent: Send + Sync {
    async fn status(&self) -> Result<AgentStatus>;
    async fn create_sandbox(&self, setup: SandboxSetup) -> Result<()>;
    /// Configures the pod's interfaces, routes and hosts entries; before the first container.
    async fn setup_network(&self, setup: NetworkSetup) -> Result<()>;
    /// Creates a container; returns the guest pid of its init process.
    async fn create_container(&self, container: NewContainer) -> Result<u32>;
    async fn start_container(&self, id: &str) -> Result<()>;
    async fn remove_container(&self, id: &str) -> Result<()>;
    /// Starts an exec; returns its guest pid.
    async fn exec(&self, exec: NewExec) -> Result<u32>;
    /// Signals a process, or with `all` every process of its container.
    async fn signal(&self, process: &ProcessId, signal: i32, all: bool) -> Result<()>;
    /// Waits until the process has exited.
    async fn wait(&self, process: &ProcessId) -> Result<ExitStatus>;
    /// The process's output from `offsets` (bytes of stdout and stderr the reader has).
    async fn output(&self, process: &ProcessId, offsets: [u64; 2]) -> Result<OutputStream>;
    // Stdin and resize: the I/O hub forwards them for streaming exec and attach.
    #[cfg_attr(not(test), allow(dead_code))]
    async fn write_stdin(&self, process: &ProcessId, data: Vec<u8>) -> Result<()>;
    #[cfg_attr(not(test), allow(dead_code))]
    async fn close_stdin(&self, process: &ProcessId) -> Result<()>;
    #[cfg_attr(not(test), allow(dead_code))]
    async fn resize_tty(&self, process: &ProcessId, width: u32, height: u32) -> Result<()>;
    async fn container_stats(&self, id: &str) -> Result<ContainerStats>;
    async fn sandbox_stats(&self) -> Result<SandboxStats>;
    /// Applies new cgroup limits (OCI LinuxResources, JSON) to a container.
    async fn update_container(&self, id: &str, resources_json: Vec<u8>) -> Result<()>;
    /// Asks the guest to power off; it may not answer.
    async fn shutdown(&self) -> Result<()>;
}

/// Makes the agent client of a sandbox from the way its hypervisor reaches the guest.
pub trait AgentDialer: Send + Sync {
    /// A client that connects on first use (and again after a broken connection).
    fn agent(&self, sandbox_id: &str, connector: Arc<dyn GuestConnector>) -> Arc<dyn GuestAgent>;
}

/// The production dialer: [`grpc::GrpcAgent`] over the hypervisor's connector.
pub struct GrpcDialer;

impl AgentDialer for GrpcDialer {
    fn agent(&self, _sandbox_id: &str, connector: Arc<dyn GuestConnector>) -> Arc<dyn GuestAgent> {
        Arc::new(grpc::GrpcAgent::new(connector, CONNECT_DEADLINE))
    }
}
