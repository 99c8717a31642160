//! The hypervisor boundary. Everything above this trait (sandbox manager, CRI server) is the
//! same whichever backend runs the VM: the built-in rust-vmm VMM or QEMU. Both give the host a
//! Firecracker-style hybrid-vsock unix socket to reach the guest agent (see [`vsock`]).

pub mod builtin;
pub(crate) mod process;
pub mod qemu;
pub mod vsock;

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

/// Errors of the hypervisor layer.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error("{binary} not found: {hint}")]
    MissingBinary { binary: String, hint: String },
    #[error("creating the VM run directory {path}: {source}")]
    RunDir { path: PathBuf, source: std::io::Error },
    #[error("spawning {what}: {source}")]
    Spawn { what: String, source: std::io::Error },
    #[error("{what} exited during start-up ({status}); see {log}")]
    EarlyExit { what: String, status: String, log: PathBuf },
    #[error("{what} did not create {path} within {timeout:?}")]
    SocketTimeout { what: String, path: PathBuf, timeout: Duration },
    #[error("stopping the VM: {0}")]
    Stop(String),
    #[error("connecting to guest vsock port {port} through {path}: {source}")]
    VsockConnect { port: u32, path: PathBuf, source: std::io::Error },
    #[error("listening for guest vsock connections on {path}: {source}")]
    VsockListen { path: PathBuf, source: std::io::Error },
    #[error("guest vsock port {port} refused the connection (answer {answer:?})")]
    VsockRefused { port: u32, answer: String },
    #[error("invalid VM configuration: {0}")]
    InvalidConfig(String),
    #[error("the {backend} backend does not support {feature} yet")]
    Unsupported { backend: &'static str, feature: &'static str },
}

pub type Result<T> = std::result::Result<T, HypervisorError>;

/// A directory on the host shared into the guest with virtio-fs (virtiofsd, vhost-user).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SharedDir {
    /// The virtio-fs tag the guest mounts.
    pub tag: String,
    pub host_path: PathBuf,
    pub read_only: bool,
    /// virtiofsd's `--cache` mode: `always` for immutable content, `auto`/`never` for volumes.
    pub cache: String,
}

/// A block device backed by a host file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BlockDevice {
    pub id: String,
    pub path: PathBuf,
    pub read_only: bool,
}

/// A virtio-net device on a host tap interface.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NetDevice {
    pub id: String,
    pub tap: String,
    pub mac: String,
}

/// Everything a backend needs to boot one sandbox VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmConfig {
    pub sandbox_id: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Appended to the backend's own kernel command line.
    pub extra_kernel_args: String,
    /// Per-VM directory for sockets, pid files and helper logs; removed by [`Hypervisor::cleanup`].
    pub run_dir: PathBuf,
    /// The guest serial console is appended here.
    pub console_log: PathBuf,
    pub shared_dirs: Vec<SharedDir>,
    pub block_devices: Vec<BlockDevice>,
    pub net_devices: Vec<NetDevice>,
}

impl VmConfig {
    /// The VM's hybrid-vsock unix socket, the same on every backend; its guest-to-host
    /// listeners (`<uds>_<port>`) may be bound before [`Hypervisor::start`].
    pub fn vsock_uds(&self) -> PathBuf {
        process::vsock_uds(&self.run_dir)
    }
}

/// A host process that belongs to a VM, identified so that a restarted daemon does not signal an
/// unrelated process that reused the pid.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmProcess {
    pub name: String,
    pub pid: i32,
    /// Field 22 of /proc/<pid>/stat at spawn time.
    pub start_time: u64,
}

/// What a running VM is, persisted with the sandbox so a restarted daemon can reach and stop it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmHandle {
    pub backend: String,
    pub run_dir: PathBuf,
    /// The hybrid-vsock unix socket: connect, write `CONNECT <port>\n`, read `OK <n>\n`.
    pub vsock_uds: PathBuf,
    /// The VMM process first, then its helpers (vhost-user daemons).
    pub processes: Vec<VmProcess>,
}

/// A VM backend. Implementations own the VMM and helper processes and the devices.
#[async_trait]
pub trait Hypervisor: Send + Sync {
    /// The backend's name, as shown in Status and logs (`qemu`, `builtin`).
    fn name(&self) -> &'static str;

    /// Boots a VM and returns once the VMM runs and its vsock socket exists (the agent inside
    /// may still be booting: it announces itself on host vsock port
    /// [`podvisor_proto::AGENT_READY_VSOCK_PORT`]). Leaves the run directory's other files
    /// alone, so listeners bound there before the start survive it.
    async fn start(&self, config: &VmConfig) -> Result<VmHandle>;

    /// Stops the VM's processes: SIGTERM, then SIGKILL after `grace`. Stopping a VM that is
    /// already gone succeeds.
    async fn stop(&self, vm: &VmHandle, grace: Duration) -> Result<()>;

    /// Removes what [`Hypervisor::start`] left on disk (the run directory). Call after stop.
    async fn cleanup(&self, vm: &VmHandle) -> Result<()> {
        remove_dir_if_exists(&vm.run_dir)
            .map_err(|source| HypervisorError::RunDir { path: vm.run_dir.clone(), source })
    }

    /// Whether the VMM process still runs.
    fn is_running(&self, vm: &VmHandle) -> bool {
        vm.processes.first().map(process_alive).unwrap_or(false)
    }

    /// Adds a device to a running VM (hotplug). Backends without it say so.
    /// Not called yet: the volumes issue attaches block volumes with it.
    #[allow(dead_code)]
    async fn add_block_device(&self, _vm: &VmHandle, _dev: &BlockDevice) -> Result<()> {
        Err(HypervisorError::Unsupported { backend: self.name(), feature: "block hotplug" })
    }

    /// Snapshots a paused VM into `dir` (memory + device state), for template start.
    /// Not called yet: the VM-template issue uses it.
    #[allow(dead_code)]
    async fn snapshot(&self, _vm: &VmHandle, _dir: &Path) -> Result<()> {
        Err(HypervisorError::Unsupported { backend: self.name(), feature: "snapshot" })
    }
}

fn remove_dir_if_exists(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The start time (field 22 of /proc/<pid>/stat) of a process, if it exists.
pub fn process_start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: parse after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

/// Whether the recorded process still runs (same pid and same start time, not a zombie).
pub fn process_alive(p: &VmProcess) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{}/stat", p.pid)) else {
        return false;
    };
    let Some(close) = stat.rfind(')') else { return false };
    let mut fields = stat[close + 2..].split(' ');
    let state = fields.next().unwrap_or("");
    let start = fields.nth(18).and_then(|s| s.parse::<u64>().ok());
    state != "Z" && state != "X" && start == Some(p.start_time)
}

/// Sends `signal` to a recorded process if it is still the same process.
pub fn signal_process(p: &VmProcess, signal: nix::sys::signal::Signal) {
    if process_alive(p) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p.pid), signal);
    }
}

/// Stops recorded processes: SIGTERM to all, wait up to `grace`, then SIGKILL what is left,
/// and wait (bounded) until they are gone.
pub async fn terminate_processes(processes: &[VmProcess], grace: Duration) {
    use nix::sys::signal::Signal;
    for p in processes {
        signal_process(p, Signal::SIGTERM);
    }
    let deadline = tokio::time::Instant::now() + grace;
    while processes.iter().any(process_alive) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for p in processes {
        signal_process(p, Signal::SIGKILL);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while processes.iter().any(process_alive) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
