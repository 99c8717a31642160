//! The hypervisor boundary. Everything above this trait (sandbox manager, CRI server) is the
//! same whichever backend runs the VM: the built-in rust-vmm VMM or QEMU. A backend owns the
//! VM's run directory, processes and devices; above it there is a [`VmSpec`] going in, and a
//! [`VmHandle`] (persisted), an exit future, and a [`GuestConnector`] to the agent coming out.
//! Both backends give the host a Firecracker-style hybrid-vsock unix socket to reach the guest
//! agent (see [`vsock`]). Backends are looked up by name in a [`Registry`].

pub mod builtin;
pub mod confine;
#[cfg(test)]
pub mod fake;
pub mod host;
pub mod peer;
pub(crate) mod process;
pub mod qemu;
pub mod registry;
pub mod vsock;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::net::UnixStream;

pub use registry::Registry;

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
    #[error(transparent)]
    ForeignPeer(#[from] peer::PeerError),
    #[error("listening for guest vsock connections on {path}: {source}")]
    VsockListen { path: PathBuf, source: std::io::Error },
    #[error("guest vsock port {port} refused the connection (answer {answer:?})")]
    VsockRefused { port: u32, answer: String },
    #[error("invalid VM configuration: {0}")]
    InvalidConfig(String),
    #[error("the {backend} backend does not support {feature} yet")]
    Unsupported { backend: &'static str, feature: &'static str },
    #[error("state directory {path} is too long for the VM's unix sockets; use a shorter --state")]
    RunDirTooLong { path: PathBuf },
    #[error("accepting the agent's ready connection on {path}: {source}")]
    ReadyAccept { path: PathBuf, source: std::io::Error },
    #[error("the agent did not announce itself on host vsock port {port} within {timeout:?}")]
    AgentNotReady { port: u32, timeout: Duration },
    #[error("the VM exited before its agent announced itself")]
    ExitedBeforeReady,
    #[error("control request to the VMM: {0}")]
    Control(String),
    #[error("the host pod's agent did not listen on {path} within {timeout:?}")]
    HostAgentNotReady { path: PathBuf, timeout: Duration },
    #[error("connecting to the host pod's agent at {path}: {source}")]
    HostAgentConnect { path: PathBuf, source: std::io::Error },
    #[error("a host pod's agent serves no port {port} (only the agent and port-forward)")]
    NoHostPort { port: u32 },
}

pub type Result<T> = std::result::Result<T, HypervisorError>;

/// A directory on the host shared into the guest with virtio-fs (virtiofsd over vhost-user, or
/// the built-in VMM's in-process device and `podvisor fs-serve`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SharedDir {
    /// The virtio-fs tag the guest mounts.
    pub tag: String,
    pub host_path: PathBuf,
    pub read_only: bool,
    /// virtiofsd's `--cache` mode: `always` for immutable content, `auto`/`never` for volumes.
    pub cache: String,
    /// How the share's file server (virtiofsd or fs-serve) translates file owners between host
    /// and guest (none: as they are).
    #[serde(default)]
    pub ids: IdTranslations,
}

/// virtiofsd's uid and gid translations (`--translate-uid`, `--translate-gid`), which fs-serve
/// takes too; ids in no range are passed through unchanged.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct IdTranslations {
    pub uids: Vec<IdTranslation>,
    pub gids: Vec<IdTranslation>,
}

/// One range of virtiofsd's id translation.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum IdTranslation {
    /// Guest ids `guest..guest+count` are host ids `host..host+count`, both ways.
    Map { guest: u32, host: u32, count: u32 },
    /// Host ids `host..host+count` all appear in the guest as `guest` (one way: the guest
    /// cannot create files with them).
    SquashHost { host: u32, guest: u32, count: u32 },
}

impl IdTranslation {
    /// The value of a `--translate-uid`/`--translate-gid` argument (virtiofsd's and fs-serve's).
    pub fn virtiofsd_arg(&self) -> String {
        match *self {
            Self::Map { guest, host, count } => format!("map:{guest}:{host}:{count}"),
            Self::SquashHost { host, guest, count } => {
                format!("squash-host:{host}:{guest}:{count}")
            }
        }
    }
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
    /// The tap's name (in the pod's network namespace when `tap_fd` is set).
    pub tap: String,
    /// The guest's MAC address.
    pub mac: String,
    /// The tap, already open: the daemon opens pods' taps inside their network namespaces and
    /// hands the fd to the VMM, which then needs neither CAP_NET_ADMIN nor the namespace.
    /// Only for the start; never persisted.
    #[serde(skip)]
    pub tap_fd: Option<TapFd>,
}

/// An open tap descriptor, shared until the VMM inherited it.
#[derive(Debug, Clone)]
pub struct TapFd(pub Arc<std::os::fd::OwnedFd>);

impl TapFd {
    pub fn raw(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.0.as_raw_fd()
    }
}

impl PartialEq for TapFd {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for TapFd {}

impl VmConfig {
    /// The descriptors the VMM process must inherit.
    pub fn inherited_fds(&self) -> Vec<std::os::fd::RawFd> {
        self.net_devices.iter().filter_map(|n| n.tap_fd.as_ref().map(TapFd::raw)).collect()
    }
}

/// What the sandbox layer asks a VM to be.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmSpec {
    pub sandbox_id: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Appended to the backend's own kernel command line.
    pub extra_kernel_args: String,
    /// The guest serial console is appended here.
    pub console_log: PathBuf,
    /// Past this size the console log keeps only its newest half.
    pub console_log_max_bytes: u64,
    pub shared_dirs: Vec<SharedDir>,
    pub block_devices: Vec<BlockDevice>,
    pub net_devices: Vec<NetDevice>,
    /// The pod's network namespace, for a backend that runs the pod on the host (a VM gets a
    /// tap in it instead). None: no CNI network.
    #[serde(default)]
    pub netns: Option<PathBuf>,
    /// The host namespaces the pod shares; only the host backend can give them.
    #[serde(default)]
    pub host_namespaces: HostNamespaces,
}

/// Which of the host's namespaces a pod on the host backend shares (CRI NODE mode); the PID
/// namespace is the agent's business (it stays in the host's, and starts the pod's own).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostNamespaces {
    pub network: bool,
    pub ipc: bool,
}

/// Everything a backend needs to boot one sandbox VM: the spec placed in a run directory.
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
    /// Past this size the console log keeps only its newest half.
    pub console_log_max_bytes: u64,
    pub shared_dirs: Vec<SharedDir>,
    pub block_devices: Vec<BlockDevice>,
    pub net_devices: Vec<NetDevice>,
}

impl VmConfig {
    /// `spec` in the run directory [`Hypervisor::prepare`] made.
    pub fn new(spec: &VmSpec, prepared: &PreparedVm) -> Self {
        Self {
            sandbox_id: spec.sandbox_id.clone(),
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            kernel: spec.kernel.clone(),
            initrd: spec.initrd.clone(),
            extra_kernel_args: spec.extra_kernel_args.clone(),
            run_dir: prepared.run_dir.clone(),
            console_log: spec.console_log.clone(),
            console_log_max_bytes: spec.console_log_max_bytes,
            shared_dirs: spec.shared_dirs.clone(),
            block_devices: spec.block_devices.clone(),
            net_devices: spec.net_devices.clone(),
        }
    }
}

/// Opens byte streams to the guest agent.
#[async_trait]
pub trait GuestConnector: Send + Sync + std::fmt::Debug {
    /// A new stream to the agent's port.
    async fn dial(&self) -> Result<UnixStream>;
    /// A new stream to another guest vsock port (port-forward has its own).
    async fn dial_port(&self, port: u32) -> Result<UnixStream>;
    /// What it dials, for messages.
    fn describe(&self) -> String;
}

/// Waits for a booting guest's agent to say it serves (see
/// [`crate::agent::AGENT_READY_VSOCK_PORT`] for why the host never dials a booting guest).
#[async_trait]
pub trait AgentReady: Send + Sync {
    /// Returns once the agent announced itself, or fails when `vm_exited` resolves first or
    /// `timeout` passes.
    async fn wait(&self, timeout: Duration, vm_exited: BoxFuture<'static, ()>) -> Result<()>;
}

/// A VM whose run directory exists and whose agent-ready listener is bound, not started yet.
pub struct PreparedVm {
    /// Owned by the backend; above the trait only passed back to it.
    run_dir: PathBuf,
    ready: Box<dyn AgentReady>,
}

impl PreparedVm {
    pub fn new(run_dir: PathBuf, ready: Box<dyn AgentReady>) -> Self {
        Self { run_dir, ready }
    }

    #[cfg(test)]
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }
}

/// Where a backend keeps its VMs' run directories. Unix socket paths live there and must fit in
/// sun_path (108 bytes), so each is short: a 16-hex-digit prefix of the random sandbox id.
#[derive(Debug, Clone)]
pub struct RunRoot(pub PathBuf);

impl RunRoot {
    /// The longest socket a backend creates in a run directory
    /// (`virtiofs-<tag>.sock`, `vsock.sock_<port>`), plus its separator.
    const SOCKET_NAME_BUDGET: usize = 40;

    pub fn run_dir(&self, sandbox_id: &str) -> Result<PathBuf> {
        let dir = self.0.join(&sandbox_id[..sandbox_id.len().min(16)]);
        if dir.as_os_str().len() + Self::SOCKET_NAME_BUDGET > 107 {
            return Err(HypervisorError::RunDirTooLong { path: self.0.clone() });
        }
        Ok(dir)
    }

    /// The (empty, root's) directory jailed helpers mount their root on, each in its own mount
    /// namespace: `<state>/jail-root`, beside the run directories (which belong to the VMs'
    /// uids, so a helper could swap anything inside its own) rather than among them.
    pub fn jail_root(&self) -> PathBuf {
        match self.0.parent() {
            Some(state) => state.join("jail-root"),
            None => self.0.join(".jail-root"),
        }
    }

    /// Makes the run directory (private) and binds the agent-ready listener in it.
    pub fn prepare(&self, sandbox_id: &str) -> Result<PreparedVm> {
        use std::os::unix::fs::DirBuilderExt;
        let run_dir = self.run_dir(sandbox_id)?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&run_dir)
            .map_err(|source| HypervisorError::RunDir { path: run_dir.clone(), source })?;
        let ready = vsock::ReadyListener::bind(&process::vsock_uds(&run_dir))?;
        Ok(PreparedVm::new(run_dir, Box::new(ready)))
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
    /// The VMM process first, then its helpers (vhost-user daemons, fs-serve).
    pub processes: Vec<VmProcess>,
}

/// A VM backend. Implementations own the VMM and helper processes and the devices.
#[async_trait]
pub trait Hypervisor: Send + Sync {
    /// The backend's name, as shown in Status and logs (`qemu`, `builtin`).
    fn name(&self) -> &'static str;

    /// Lays out the VM's run directory and binds what must exist before the guest boots.
    async fn prepare(&self, sandbox_id: &str) -> Result<PreparedVm>;

    /// Boots a prepared VM and returns once the VMM runs and its vsock socket exists (the
    /// agent inside may still be booting: [`Hypervisor::wait_agent_ready`] waits for it).
    async fn start(&self, prepared: &PreparedVm, spec: &VmSpec) -> Result<VmHandle>;

    /// Waits until the started VM's agent says it serves.
    async fn wait_agent_ready(
        &self,
        prepared: PreparedVm,
        vm: &VmHandle,
        timeout: Duration,
    ) -> Result<()> {
        prepared.ready.wait(timeout, self.exited(vm)).await
    }

    /// Throws away a prepared VM that was never started, or whose start failed.
    async fn discard(&self, prepared: PreparedVm) -> Result<()> {
        remove_dir_if_exists(&prepared.run_dir)
            .map_err(|source| HypervisorError::RunDir { path: prepared.run_dir.clone(), source })
    }

    /// How the host reaches the VM's agent.
    fn agent_connector(&self, vm: &VmHandle) -> Arc<dyn GuestConnector> {
        Arc::new(vsock::HybridVsock::new(&vm.vsock_uds))
    }

    /// Resolves once the VM has exited (also for a VM started by an earlier daemon).
    fn exited(&self, vm: &VmHandle) -> BoxFuture<'static, ()> {
        let vmm = vm.processes.first().cloned();
        Box::pin(async move {
            if let Some(vmm) = vmm {
                crate::procwait::wait_for_exit(&vmm).await;
            }
        })
    }

    /// What to show of the VM in verbose status, with the VMM's memory (the first process):
    /// its PSS and USS tell what a pod costs the host once VMs share pages (VM templates).
    fn describe(&self, vm: &VmHandle) -> serde_json::Value {
        let memory =
            vm.processes.first().filter(|p| process_alive(p)).and_then(|p| process_memory(p.pid));
        serde_json::json!({
            "backend": vm.backend,
            "processes": vm.processes,
            "vsock": vm.vsock_uds,
            "vmmMemory": memory,
        })
    }

    /// Stops what an interrupted start left of sandbox `sandbox_id`'s VM — the daemon died
    /// after spawning processes but before the VM's handle was recorded — and removes its run
    /// directory. Nothing left is fine.
    async fn reclaim_interrupted_start(&self, _sandbox_id: &str) -> Result<()> {
        Ok(())
    }

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

    // Template start (snapshot/restore, the sandbox layer's VM templates) goes through the
    // five below.

    /// Why a VM like `spec` cannot be snapshotted and restored on this backend, or `None`
    /// when it can (the sandbox layer then builds a template of it).
    fn template_refusal(&self, _spec: &VmSpec) -> Option<String> {
        Some(format!("the {} backend cannot snapshot a VM", self.name()))
    }

    /// Stops the VM's vCPUs; devices stay as they are.
    async fn pause(&self, _vm: &VmHandle) -> Result<()> {
        Err(HypervisorError::Unsupported { backend: self.name(), feature: "pause" })
    }

    /// Runs a paused VM again.
    #[allow(dead_code)]
    async fn resume(&self, _vm: &VmHandle) -> Result<()> {
        Err(HypervisorError::Unsupported { backend: self.name(), feature: "resume" })
    }

    /// Writes a paused VM's state (vCPUs, devices, memory) into `dir`, which must lie in the
    /// VM's run directory (a jailed VMM can write nowhere else).
    async fn snapshot(&self, _vm: &VmHandle, _dir: &Path) -> Result<()> {
        Err(HypervisorError::Unsupported { backend: self.name(), feature: "snapshot" })
    }

    /// Starts a prepared VM from the snapshot in `dir` instead of booting it. The guest runs
    /// on at once: its agent already serves, so there is no ready announcement to wait for.
    /// Returns once the VMM holds what it needs of `dir` (read, open or mapped): the sandbox
    /// layer may remove the directory from then on.
    async fn restore(
        &self,
        _prepared: &PreparedVm,
        _spec: &VmSpec,
        _dir: &Path,
    ) -> Result<VmHandle> {
        Err(HypervisorError::Unsupported { backend: self.name(), feature: "restore" })
    }
}

pub(crate) fn remove_dir_if_exists(path: &Path) -> std::io::Result<()> {
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

/// SIGKILLs a VM's processes when dropped, so that a failing test leaves no VM behind.
#[cfg(test)]
pub(crate) struct KillOnDrop(pub Vec<VmProcess>);

#[cfg(test)]
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for p in &self.0 {
            signal_process(p, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// A process's memory from /proc/<pid>/smaps_rollup, KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessMemory {
    pub rss_kib: u64,
    /// Proportional set size: shared pages count divided by their sharers.
    pub pss_kib: u64,
    /// Unique set size: pages only this process maps (private clean + private dirty).
    pub uss_kib: u64,
}

/// The memory of process `pid`, if it exists and its smaps_rollup is readable.
pub fn process_memory(pid: i32) -> Option<ProcessMemory> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    Some(parse_smaps_rollup(&rollup))
}

fn parse_smaps_rollup(text: &str) -> ProcessMemory {
    let field = |name: &str| -> u64 {
        text.lines()
            .filter_map(|l| l.strip_prefix(name))
            .filter_map(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
            .sum()
    };
    ProcessMemory {
        rss_kib: field("Rss:"),
        pss_kib: field("Pss:"),
        uss_kib: field("Private_Clean:") + field("Private_Dirty:"),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smaps_rollup_gives_rss_pss_and_uss() {
        let text = "55d0-7ffe ---p 00000000 00:00 0    [rollup]\nRss:     10240 kB\n\
                    Pss:      4096 kB\nPss_Anon:  1000 kB\nShared_Clean:  6000 kB\n\
                    Private_Clean:  1024 kB\nPrivate_Dirty:  2048 kB\n";
        let m = parse_smaps_rollup(text);
        assert_eq!(m, ProcessMemory { rss_kib: 10240, pss_kib: 4096, uss_kib: 3072 });
        let me = process_memory(std::process::id() as i32).unwrap();
        assert!(me.uss_kib > 0 && me.pss_kib >= me.uss_kib && me.rss_kib >= me.pss_kib, "{me:?}");
        assert_eq!(process_memory(i32::MAX), None);
    }
}
