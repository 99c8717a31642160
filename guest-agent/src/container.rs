//! The agent's containers and processes: what each RPC does, independent of gRPC.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use oci_spec::runtime::{
    LinuxNamespace, LinuxNamespaceType, LinuxResources, LinuxSeccomp, Process as OciProcess, Root,
    Spec,
};
use podvisor_proto::agent::{
    ContainerStatsResponse, CreateContainerRequest, ExecProcessRequest, SandboxStatsResponse,
    SetupNetworkRequest,
};

use crate::cgroup::{self, CgroupError};
use crate::devices;
use crate::helper::{self, HelperError, HelperOp, HelperStdio};
use crate::network::{self, NetworkError, PodHosts};
use crate::reaper::{self, ExitStatus, ExitWatch, Reaper};
use crate::rootfs::{self, RootfsError};
use crate::sandbox::SandboxError;
use crate::seccomp;
use crate::stdio::{self, OutputReader, ProcessIo, StdioError};

/// How long libcontainer's init gets to send the terminal after creation.
const CONSOLE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a SIGKILLed container may take to be reaped before removal goes on regardless.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// The cgroup (under the cgroup2 root) every container's cgroup is created in.
const CGROUP_PARENT: &str = "podvisor";
/// Exited execs a container keeps that nobody claimed (waited for and drained): a host that
/// never waits (an ExecSync that timed out) leaks at most this many per container.
const MAX_UNCLAIMED_EXECS: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("container {0:?} not found")]
    ContainerNotFound(String),
    #[error("process {1:?} of container {0:?} not found")]
    ProcessNotFound(String, String),
    #[error("container {0:?} already exists")]
    ContainerExists(String),
    #[error("exec {1:?} already exists in container {0:?}")]
    ExecExists(String, String),
    #[error("invalid {0} {1:?}: use 1-128 characters of [A-Za-z0-9_.-], not starting with '.'")]
    BadId(&'static str, String),
    #[error("invalid OCI runtime spec: {0}")]
    BadSpec(serde_json::Error),
    #[error("giving {0} to the user namespace's root: {1}")]
    ChownPodFile(PathBuf, nix::Error),
    #[error("invalid user namespace map: {0}")]
    BadIdMap(String),
    #[error("invalid OCI process: {0}")]
    BadProcess(serde_json::Error),
    #[error("the OCI spec has no process")]
    NoProcess,
    #[error("invalid signal {0}")]
    BadSignal(i32),
    #[error("terminal size {0}x{1} is out of range")]
    BadSize(u32, u32),
    #[error("no rootfs given")]
    NoRootfs,
    #[error("device {0:?} is not a device node under the guest's /dev")]
    NoGuestDevice(String),
    #[error(transparent)]
    Rootfs(#[from] RootfsError),
    #[error(transparent)]
    Stdio(#[from] StdioError),
    #[error("libcontainer: {0}")]
    Helper(#[from] HelperError),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error(transparent)]
    Network(#[from] NetworkError),
    #[error(transparent)]
    HostPod(#[from] crate::host_pod::HostPodError),
    #[error("container {id:?} is {actual}, it must be {expected}")]
    WrongState { id: String, actual: &'static str, expected: &'static str },
    #[error("writing {0}: {1}")]
    Write(PathBuf, std::io::Error),
    #[error("encoding {0}: {1}")]
    Encode(&'static str, serde_json::Error),
    #[error("binding the console socket {0}: {1}")]
    ConsoleSocket(PathBuf, std::io::Error),
    #[error("the container's terminal did not arrive within {0:?}")]
    ConsoleTimeout(Duration),
    #[error("libcontainer reported no pid")]
    NoPid,
    #[error("the pod has no shared PID namespace (CreateSandbox did not ask for one)")]
    NoPodPidNamespace,
    #[error("starting the pause process of the pod's PID namespace: {0}")]
    Pause(std::io::Error),
    #[error("sending signal {0}: {1}")]
    Signal(i32, nix::Error),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("device cgroup: {0}")]
    DeviceCgroup(#[from] crate::device_cgroup::DeviceCgroupError),
    #[error("reading {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("decoding {0}: {1}")]
    Decode(PathBuf, serde_json::Error),
    #[error("replacing {0}: {1}")]
    Rename(PathBuf, std::io::Error),
}

/// Where the agent keeps things.
#[derive(Clone, Debug)]
pub struct Paths {
    /// /run/podvisor in the guest; --state-dir on the host.
    pub run_dir: PathBuf,
    /// Where image layers (lower dirs) are found.
    pub shared_dir: PathBuf,
    /// The cgroup2 mount.
    pub cgroup_root: PathBuf,
}

/// The agent's own directories under [`Paths::run_dir`]: containers, sandbox files,
/// libcontainer state. Nothing may be mounted over them.
pub const AGENT_DIRS: [&str; 4] = [CONTAINERS_DIR, SANDBOX_DIR, LIBCONTAINER_DIR, CONSOLE_DIR];
const CONTAINERS_DIR: &str = "containers";
const SANDBOX_DIR: &str = "sandbox";
const LIBCONTAINER_DIR: &str = "libcontainer";
/// Console sockets live apart from the container directories: a container's directory name
/// (64 hex digits) plus an exec id would not fit in a unix socket path (108 bytes).
const CONSOLE_DIR: &str = "tty";

impl Paths {
    pub fn containers_dir(&self) -> PathBuf {
        self.run_dir.join(CONTAINERS_DIR)
    }
    pub fn sandbox_dir(&self) -> PathBuf {
        self.run_dir.join(SANDBOX_DIR)
    }
    fn libcontainer_root(&self) -> PathBuf {
        self.run_dir.join(LIBCONTAINER_DIR)
    }
    /// The cgroup holding every container of the pod.
    fn pod_cgroup_dir(&self) -> PathBuf {
        self.cgroup_root.join(CGROUP_PARENT)
    }
    fn cgroup_dir(&self, id: &str) -> PathBuf {
        self.pod_cgroup_dir().join(id)
    }
}

/// One process of a container: the init or an exec.
///
/// An exec's entry lives until it is claimed: its exit status was given to a WaitProcess
/// caller and a ReadOutput reader reached the end of its output, in either order. Until then
/// a reader can re-attach (a broken stream) and a waiter gets the status at once. An exec that
/// was waited for but never read is kept too (a streaming caller's ReadOutput may arrive after
/// its WaitProcess answered); [`MAX_UNCLAIMED_EXECS`] bounds what such entries can hold.
struct Process {
    pid: i32,
    exit: ExitWatch,
    io: Arc<ProcessIo>,
    /// A WaitProcess caller was given the exit status.
    waited: AtomicBool,
    /// The exec's place in its container's exit order, once the agent saw it exit.
    exit_seq: OnceLock<u64>,
}

impl Process {
    fn new(pid: i32, exit: ExitWatch, io: Arc<ProcessIo>) -> Self {
        Process { pid, exit, io, waited: AtomicBool::new(false), exit_seq: OnceLock::new() }
    }

    fn exited(&self) -> bool {
        self.exit.borrow().is_some()
    }

    /// Waited for and drained: nothing more can be asked of it.
    fn claimed(&self) -> bool {
        // SeqCst: the waiter stores `waited` then loads `drained`, the reader the reverse;
        // whichever comes second sees both, so the entry never outlives its claim.
        self.waited.load(Ordering::SeqCst) && self.io.drained()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Created,
    Running,
}

struct Container {
    id: String,
    dir: PathBuf,
    init: Arc<Process>,
    phase: Mutex<Phase>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
    /// The next exec exit's place in the exit order (see [`Process::exit_seq`]).
    next_exit_seq: AtomicU64,
    seccomp: Option<Box<LinuxSeccomp>>,
    /// Serialises libcontainer operations (and resource updates) on this container.
    op_lock: tokio::sync::Mutex<()>,
    /// The container's cgroup directory.
    cgroup_dir: PathBuf,
    /// Whether the OOM killer struck the container, read once when its init has exited.
    oom_killed: tokio::sync::OnceCell<bool>,
}

/// How a process ended, as WaitProcess reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessExit {
    pub status: ExitStatus,
    /// Only ever set for a container's init process.
    pub oom_killed: bool,
}

impl Container {
    fn phase(&self) -> Phase {
        *lock(&self.phase)
    }

    /// Whether the container's cgroup counted an OOM kill. Read once, after its init exited
    /// and before the cgroup goes: whichever of the exit watcher, a waiter or removal comes
    /// first reads it, the others get the same answer.
    async fn init_oom_killed(&self) -> bool {
        *self.oom_killed.get_or_init(|| async { cgroup::oom_kills(&self.cgroup_dir) > 0 }).await
    }

    /// Reads the OOM verdict as soon as the init exits (see [`Container::init_oom_killed`]).
    fn watch_init_exit(self: &Arc<Self>) {
        let (container, exit) = (Arc::downgrade(self), self.init.exit.clone());
        tokio::spawn(async move {
            if reaper::wait_exit(exit).await.is_some() {
                if let Some(c) = container.upgrade() {
                    if c.init_oom_killed().await {
                        tracing::info!(container = c.id, "the OOM killer ended a process");
                    }
                }
            }
        });
    }

    fn state_name(&self) -> &'static str {
        if self.init.exited() {
            "stopped"
        } else {
            match self.phase() {
                Phase::Created => "created",
                Phase::Running => "running",
            }
        }
    }

    /// Adds an exec to the table and arranges for its entry to go once it is claimed (see
    /// [`Process`]) or crowded out by newer unclaimed exits.
    fn track_exec(self: &Arc<Self>, exec_id: String, process: Process) -> Arc<Process> {
        let process = Arc::new(process);
        // Weak references: neither the hook (owned by the process's io) nor the exit task may
        // keep a removed container or dropped entry alive.
        let (container, entry, id) =
            (Arc::downgrade(self), Arc::downgrade(&process), exec_id.clone());
        process.io.on_drained(Box::new(move || {
            if let (Some(c), Some(p)) = (container.upgrade(), entry.upgrade()) {
                c.release_if_claimed(&id, &p);
            }
        }));
        lock(&self.execs).insert(exec_id, process.clone());
        let (container, entry, exit) =
            (Arc::downgrade(self), Arc::downgrade(&process), process.exit.clone());
        tokio::spawn(async move {
            // None: the status will never come, so it never counts as exited.
            if reaper::wait_exit(exit).await.is_some() {
                if let (Some(c), Some(p)) = (container.upgrade(), entry.upgrade()) {
                    c.exec_exited(&p);
                }
            }
        });
        process
    }

    /// A WaitProcess caller got the status of exec `exec_id`.
    fn exec_waited(&self, exec_id: &str, process: &Arc<Process>) {
        process.waited.store(true, Ordering::SeqCst);
        self.release_if_claimed(exec_id, process);
    }

    /// Drops the entry of `exec_id` if it is still `process` (the id may have been reused)
    /// and has been claimed.
    fn release_if_claimed(&self, exec_id: &str, process: &Arc<Process>) {
        let removed = {
            let mut execs = lock(&self.execs);
            match execs.get(exec_id) {
                Some(p) if Arc::ptr_eq(p, process) && process.claimed() => execs.remove(exec_id),
                _ => None,
            }
        };
        if removed.is_some() {
            tracing::debug!(
                container = self.id,
                exec = exec_id,
                "exec waited and drained: dropped"
            );
        }
    }

    /// An exec exited: record its place in the exit order and enforce the bound on unclaimed
    /// exits (it cannot be claimed yet unless a waiter saw the exit first, which then tried).
    fn exec_exited(&self, process: &Process) {
        let _ = process.exit_seq.set(self.next_exit_seq.fetch_add(1, Ordering::Relaxed));
        self.bound_unclaimed();
    }

    /// Drops the oldest exited, unclaimed execs beyond [`MAX_UNCLAIMED_EXECS`].
    fn bound_unclaimed(&self) {
        let dropped: Vec<(String, Arc<Process>)> = {
            let mut execs = lock(&self.execs);
            let mut exited: Vec<(u64, String)> = execs
                .iter()
                .filter_map(|(id, p)| p.exit_seq.get().map(|seq| (*seq, id.clone())))
                .collect();
            if exited.len() <= MAX_UNCLAIMED_EXECS {
                return;
            }
            exited.sort_unstable();
            let excess = exited.len() - MAX_UNCLAIMED_EXECS;
            exited
                .into_iter()
                .take(excess)
                .filter_map(|(_, id)| execs.remove(&id).map(|p| (id, p)))
                .collect()
        };
        // Dropped outside the lock: the last reference closes fds and ends the output pump.
        for (exec_id, process) in dropped {
            tracing::debug!(
                container = self.id,
                exec = exec_id,
                waited = process.waited.load(Ordering::SeqCst),
                drained = process.io.drained(),
                "dropping an unclaimed exited exec: more than {MAX_UNCLAIMED_EXECS} of them"
            );
        }
    }
}

/// Each host bind in a virtio-fs share is a submount the guest kernel mounts on first use, in
/// the mount namespace that uses it. A container's own namespace would get a mount of its own,
/// peer to nothing; an rshared or rslave volume must instead be a copy of one mount in the
/// agent's namespace (whose share is shared), so that mounts propagate between the pod's
/// containers. Listing the directory here mounts it in the agent's namespace first.
fn mount_propagating_volumes(spec: &Spec) {
    const PROPAGATING: &[&str] = &["rshared", "shared", "rslave", "slave"];
    for m in spec.mounts().iter().flatten() {
        let propagating = m.options().iter().flatten().any(|o| PROPAGATING.contains(&o.as_str()));
        let Some(source) = m.source() else { continue };
        if propagating && m.typ().as_deref() == Some("bind") && source.is_dir() {
            if let Err(e) = fs::read_dir(source) {
                tracing::warn!(source = %source.display(), "mounting a propagating volume: {e}");
            }
        }
    }
}

/// The guest uid and gid that a user namespace's root (id 0) maps to, if the spec has one.
fn user_namespace_root(spec: &Spec) -> Option<(u32, u32)> {
    let linux = spec.linux().as_ref()?;
    let root_of = |maps: &Option<Vec<oci_spec::runtime::LinuxIdMapping>>| {
        maps.iter().flatten().find(|m| m.container_id() == 0 && m.size() > 0).map(|m| m.host_id())
    };
    Some((root_of(linux.uid_mappings())?, root_of(linux.gid_mappings())?))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn validate_id(kind: &'static str, id: &str) -> Result<(), AgentError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(AgentError::BadId(kind, id.to_string()))
    }
}

fn write_json<T: serde::Serialize>(
    path: &Path,
    what: &'static str,
    value: &T,
) -> Result<(), AgentError> {
    let bytes = serde_json::to_vec(value).map_err(|e| AgentError::Encode(what, e))?;
    fs::write(path, bytes).map_err(|e| AgentError::Write(path.to_path_buf(), e))
}

fn now_unix_nanos() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Folds applied resources into the container's config.json (replaced atomically: an exec
/// may read it next).
fn remember_resources(dir: &Path, update: &LinuxResources) -> Result<(), AgentError> {
    let path = dir.join("config.json");
    let bytes = fs::read(&path).map_err(|e| AgentError::Read(path.clone(), e))?;
    let mut spec: Spec =
        serde_json::from_slice(&bytes).map_err(|e| AgentError::Decode(path.clone(), e))?;
    let mut linux = spec.linux().clone().unwrap_or_default();
    let mut resources = linux.resources().clone().unwrap_or_default();
    cgroup::merge_resources(&mut resources, update);
    linux.set_resources(Some(resources));
    spec.set_linux(Some(linux));
    let staging = dir.join("config.json.new");
    write_json(&staging, "config.json", &spec)?;
    fs::rename(&staging, &path).map_err(|e| AgentError::Rename(path, e))
}

/// Drops the init process's supplementary groups from config.json once the container exists
/// (its init has them). An exec into a container with a user namespace runs from inside that
/// namespace (see `helper::join_user_namespace`), where libcontainer's check of the init
/// spec takes itself for rootless and refuses any supplementary group (CVE-2014-8989); the
/// exec'd process's own groups come with its process, not from config.json.
fn forget_supplementary_groups(dir: &Path) -> Result<(), AgentError> {
    let path = dir.join("config.json");
    let bytes = fs::read(&path).map_err(|e| AgentError::Read(path.clone(), e))?;
    let mut spec: Spec =
        serde_json::from_slice(&bytes).map_err(|e| AgentError::Decode(path.clone(), e))?;
    if let Some(process) = spec.process_mut() {
        let mut user = process.user().clone();
        user.set_additional_gids(None);
        process.set_user(user);
    }
    let staging = dir.join("config.json.new");
    write_json(&staging, "config.json", &spec)?;
    fs::rename(&staging, &path).map_err(|e| AgentError::Rename(path, e))
}

/// The pod's user namespace maps from CreateSandbox, in the kernel's `uid_map` format (none:
/// the VM's). Checked here too: the guest writes them.
fn pod_id_maps(
    req: &podvisor_proto::agent::CreateSandboxRequest,
) -> Result<Option<(String, String)>, AgentError> {
    let text = |maps: &[podvisor_proto::agent::IdMapping]| -> Result<String, AgentError> {
        let mut out = String::new();
        for m in maps {
            let fits = |start: u32| u64::from(start) + u64::from(m.length) <= u64::from(u32::MAX);
            if m.length == 0 || !fits(m.container_id) || !fits(m.host_id) {
                return Err(AgentError::BadIdMap(format!("{m:?}")));
            }
            out.push_str(&format!("{} {} {}\n", m.container_id, m.host_id, m.length));
        }
        Ok(out)
    };
    match (req.pod_uid_mappings.is_empty(), req.pod_gid_mappings.is_empty()) {
        (true, true) => Ok(None),
        (false, false) => Ok(Some((text(&req.pod_uid_mappings)?, text(&req.pod_gid_mappings)?))),
        _ => Err(AgentError::BadIdMap("a user namespace needs both uid and gid maps".into())),
    }
}

/// The agent's state.
pub struct Agent {
    paths: Paths,
    guest: bool,
    reaper: Reaper,
    log: File,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    creating: Mutex<HashSet<String>>,
    /// PID 1 of the pod's shared PID namespace, if CreateSandbox asked for one.
    pause_pid: Mutex<Option<i32>>,
    /// The pause process was made in the pod's user namespace.
    pause_in_userns: Mutex<bool>,
    /// What the hosts file is rebuilt from; held while CreateSandbox or SetupNetwork runs,
    /// which also keeps two SetupNetwork calls from renaming links at the same time.
    pod_hosts: tokio::sync::Mutex<PodHosts>,
    /// On the host handler: the pod's namespaces and shares (see [`crate::host_pod`]).
    host_pod: Option<crate::host_pod::HostPod>,
}

/// The stdio of a process being set up: pipes, or a console socket awaiting the pty master.
enum PendingIo {
    Pipes(stdio::PipeSet),
    Tty(tokio::task::JoinHandle<Result<std::os::fd::OwnedFd, StdioError>>, PathBuf),
}

impl Agent {
    pub fn new(paths: Paths, guest: bool, reaper: Reaper, log: File) -> Self {
        Agent {
            paths,
            guest,
            reaper,
            log,
            containers: Mutex::new(HashMap::new()),
            creating: Mutex::new(HashSet::new()),
            pause_pid: Mutex::new(None),
            pause_in_userns: Mutex::new(false),
            pod_hosts: tokio::sync::Mutex::new(PodHosts::default()),
            host_pod: None,
        }
    }

    /// The agent of a host-handler pod, whose namespaces [`crate::host_pod::enter`] set up.
    pub fn with_host_pod(mut self, host_pod: crate::host_pod::HostPod) -> Self {
        self.host_pod = Some(host_pod);
        self
    }

    /// The pod's shared PID namespace (`/proc/<pause>/ns/pid`).
    fn pod_pid_namespace(&self) -> Result<PathBuf, AgentError> {
        let pid = lock(&self.pause_pid).ok_or(AgentError::NoPodPidNamespace)?;
        let path = PathBuf::from(format!("/proc/{pid}/ns/pid"));
        if !path.exists() {
            return Err(AgentError::NoPodPidNamespace);
        }
        Ok(path)
    }

    /// The pod's user namespace, if its pause process was made in one.
    fn pod_user_namespace(&self) -> Option<PathBuf> {
        let pid = (*lock(&self.pause_pid))?;
        lock(&self.pause_in_userns).then(|| PathBuf::from(format!("/proc/{pid}/ns/user")))
    }

    /// Starts the pause process holding the pod's PID namespace (see [`crate::pause`]), in a
    /// user namespace of `maps` (uid map, gid map) if the pod has one.
    async fn start_pause(&self, maps: Option<(String, String)>) -> Result<(), AgentError> {
        use std::io::Read;
        use std::os::fd::AsRawFd;
        if lock(&self.pause_pid).is_some() {
            return Ok(());
        }
        let (out_read, out_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| AgentError::Pause(e.into()))?;
        let started = Instant::now();
        let child = std::process::Command::new("/proc/self/exe")
            .arg(crate::pause::PAUSE_SUBCOMMAND)
            .args(maps.iter().flat_map(|(uids, gids)| [uids, gids]))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::from(out_write))
            .spawn()
            .map_err(AgentError::Pause)?;
        // The reaper collects it (it waits for every child); `child` is never waited on.
        let exit = self.reaper.register(child.id() as i32, started);
        drop(child);
        let status =
            tokio::time::timeout(Duration::from_secs(10), reaper::wait_exit(exit))
                .await
                .map_err(|_| AgentError::Pause(std::io::Error::other("no answer within 10 s")))?;
        // The pid line is in the pipe by the time it exited; its child may still hold the write
        // end for a moment, so read what is there without waiting for end of file.
        let _ = nix::fcntl::fcntl(
            out_read.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        );
        let mut text = String::new();
        let _ = File::from(out_read).read_to_string(&mut text);
        let pid: i32 = match (status.map(|s| s.code), text.trim().parse()) {
            (Some(0), Ok(pid)) => pid,
            _ => {
                return Err(AgentError::Pause(std::io::Error::other(format!(
                    "it exited with {status:?} and printed {text:?}"
                ))))
            }
        };
        tracing::info!(pid, userns = maps.is_some(), "pod PID namespace held by the pause process");
        *lock(&self.pause_in_userns) = maps.is_some();
        *lock(&self.pause_pid) = Some(pid);
        Ok(())
    }

    /// Ends the pause process (its namespace goes with it).
    fn stop_pause(&self) {
        if let Some(pid) = lock(&self.pause_pid).take() {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
    }

    fn container(&self, id: &str) -> Result<Arc<Container>, AgentError> {
        lock(&self.containers)
            .get(id)
            .cloned()
            .ok_or_else(|| AgentError::ContainerNotFound(id.to_string()))
    }

    fn process(&self, id: &str, exec_id: &str) -> Result<Arc<Process>, AgentError> {
        let container = self.container(id)?;
        Self::process_of(&container, exec_id)
    }

    fn process_of(container: &Container, exec_id: &str) -> Result<Arc<Process>, AgentError> {
        if exec_id.is_empty() {
            return Ok(container.init.clone());
        }
        let execs = lock(&container.execs);
        execs
            .get(exec_id)
            .cloned()
            .ok_or_else(|| AgentError::ProcessNotFound(container.id.clone(), exec_id.to_string()))
    }

    /// Entries in the process table: every container's init and the execs still tracked.
    pub fn tracked_processes(&self) -> usize {
        let containers = lock(&self.containers);
        containers.values().map(|c| 1 + lock(&c.execs).len()).sum()
    }

    async fn run_helper(
        &self,
        op: HelperOp,
        stdio: HelperStdio,
    ) -> Result<Option<i32>, AgentError> {
        Ok(helper::run(&self.reaper, &self.log, &self.paths.libcontainer_root(), op, stdio).await?)
    }

    /// Prepares stdio for a new process: the fds for the helper and the agent's side.
    fn prepare_io(
        &self,
        tty: bool,
        with_stdin: bool,
    ) -> Result<(PendingIo, HelperStdio), AgentError> {
        if tty {
            // Unique for the agent's life, and short (see CONSOLE_DIR).
            static NEXT_CONSOLE: AtomicU64 = AtomicU64::new(0);
            let console_dir = self.paths.run_dir.join(CONSOLE_DIR);
            fs::create_dir_all(&console_dir)
                .map_err(|e| AgentError::ConsoleSocket(console_dir.clone(), e))?;
            let n = NEXT_CONSOLE.fetch_add(1, Ordering::Relaxed);
            let path = console_dir.join(format!("{n}.sock"));
            let _ = fs::remove_file(&path);
            let listener = tokio::net::UnixListener::bind(&path)
                .map_err(|e| AgentError::ConsoleSocket(path.clone(), e))?;
            let task = tokio::spawn(stdio::receive_pty_master(listener));
            Ok((PendingIo::Tty(task, path), HelperStdio::null()))
        } else {
            let (pipes, child) = stdio::pipes(with_stdin)?;
            Ok((
                PendingIo::Pipes(pipes),
                HelperStdio { stdin: child.stdin, stdout: child.stdout, stderr: child.stderr },
            ))
        }
    }

    async fn finish_io(
        pending: PendingIo,
        with_stdin: bool,
        stdin_once: bool,
        exit: ExitWatch,
    ) -> Result<Arc<ProcessIo>, AgentError> {
        match pending {
            PendingIo::Pipes(pipes) => Ok(ProcessIo::from_pipes(pipes, stdin_once, exit)?),
            PendingIo::Tty(mut task, path) => {
                let master = match tokio::time::timeout(CONSOLE_TIMEOUT, &mut task).await {
                    Ok(Ok(master)) => master?,
                    Ok(Err(_)) | Err(_) => {
                        task.abort();
                        return Err(AgentError::ConsoleTimeout(CONSOLE_TIMEOUT));
                    }
                };
                let _ = fs::remove_file(path);
                Ok(ProcessIo::from_tty(master, with_stdin, stdin_once, exit)?)
            }
        }
    }

    pub async fn create_container(&self, req: CreateContainerRequest) -> Result<u32, AgentError> {
        let id = req.container_id.clone();
        validate_id("container id", &id)?;
        let mut spec: Spec =
            serde_json::from_slice(&req.oci_spec_json).map_err(AgentError::BadSpec)?;
        let rootfs_req = req.rootfs.ok_or(AgentError::NoRootfs)?;
        let lowers = rootfs::validate(&self.paths.shared_dir, &rootfs_req.lower_dirs)?;
        let stdio_cfg = req.stdio.unwrap_or_default();
        let process = spec.process_mut().as_mut().ok_or(AgentError::NoProcess)?;
        process.set_terminal(Some(stdio_cfg.tty));
        if self.host_pod.is_some() {
            crate::host_pod::fit_rlimits(process);
        }
        let pod_pid_namespace =
            if req.join_pod_pid_namespace { Some(self.pod_pid_namespace()?) } else { None };
        if let Some(linux) = spec.linux_mut() {
            let mut namespaces = linux.namespaces().clone().unwrap_or_default();
            // Paths name guest objects the host cannot know: the agent owns them.
            for ns in namespaces.iter_mut() {
                ns.set_path(None);
            }
            if let Some(path) = pod_pid_namespace {
                namespaces.retain(|ns| ns.typ() != LinuxNamespaceType::Pid);
                let mut pid = LinuxNamespace::default();
                pid.set_typ(LinuxNamespaceType::Pid);
                pid.set_path(Some(path));
                namespaces.push(pid);
                // The pod's PID namespace belongs to the pod's user namespace: the container
                // joins that one instead of making its own (same maps).
                if let Some(userns) = self.pod_user_namespace() {
                    for ns in
                        namespaces.iter_mut().filter(|ns| ns.typ() == LinuxNamespaceType::User)
                    {
                        ns.set_path(Some(userns.clone()));
                    }
                }
            }
            linux.set_namespaces(Some(namespaces));
            if self.host_pod.is_some() {
                crate::host_pod::drop_unavailable_resources(linux, &self.paths.cgroup_root);
            }
            if req.privileged {
                self.give_guest_devices(&id, linux);
            }
            let named = req
                .devices
                .iter()
                .map(|d| {
                    devices::named_device(Path::new(&d.guest_path), Path::new(&d.container_path))
                        .map(|node| (node, d.permissions.clone()))
                        .ok_or_else(|| AgentError::NoGuestDevice(d.guest_path.clone()))
                })
                .collect::<Result<Vec<_>, _>>()?;
            devices::allow_in_cgroup(linux, &named, req.privileged);
            devices::add_devices(linux, named.into_iter().map(|(node, _)| node).collect());
        }
        mount_propagating_volumes(&spec);
        {
            let containers = lock(&self.containers);
            let mut creating = lock(&self.creating);
            if containers.contains_key(&id) || !creating.insert(id.clone()) {
                return Err(AgentError::ContainerExists(id));
            }
        }
        let result =
            self.create_reserved(&id, spec, &lowers, rootfs_req.read_only, stdio_cfg).await;
        lock(&self.creating).remove(&id);
        let container = result?;
        let pid = container.init.pid;
        lock(&self.containers).insert(id, container);
        Ok(pid as u32)
    }

    /// The pod's hostname/hosts/resolv.conf, bind-mounted into its containers, belong to the
    /// root of the pod's user namespace (all its containers share it), who may then write
    /// them as a container's root may without one. Rewrites keep the inode, so the owner stays.
    fn give_pod_files(&self, (uid, gid): (u32, u32)) -> Result<(), AgentError> {
        for name in ["hostname", "hosts", "resolv.conf"] {
            let path = self.paths.sandbox_dir().join(name);
            match nix::unistd::chown(&path, Some(uid.into()), Some(gid.into())) {
                Ok(()) | Err(nix::errno::Errno::ENOENT) => {}
                Err(e) => return Err(AgentError::ChownPodFile(path, e)),
            }
        }
        Ok(())
    }

    /// A privileged container gets every device of the VM. In host mode (tests) the devices
    /// would be the host's: it gets none.
    fn give_guest_devices(&self, id: &str, linux: &mut oci_spec::runtime::Linux) {
        if !self.guest {
            tracing::warn!(container = id, "host mode: a privileged container gets no devices");
            return;
        }
        let found = devices::guest_devices(Path::new("/dev"));
        tracing::info!(container = id, devices = found.len(), "privileged: the VM's devices");
        devices::add_devices(linux, found);
    }

    async fn create_reserved(
        &self,
        id: &str,
        mut spec: Spec,
        lowers: &[PathBuf],
        read_only: bool,
        stdio_cfg: podvisor_proto::agent::StdioConfig,
    ) -> Result<Arc<Container>, AgentError> {
        let dir = self.paths.containers_dir().join(id);
        // A leftover of an earlier container with this id (e.g. a failed create).
        rootfs::unmount_rootfs(&dir);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).map_err(|e| AgentError::Write(dir.clone(), e))?;
        let owner = user_namespace_root(&spec);
        if let Some(owner) = owner {
            self.give_pod_files(owner)?;
        }
        let rootfs_path = match rootfs::mount_rootfs(&dir, lowers, read_only, owner) {
            Ok(p) => p,
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                return Err(e.into());
            }
        };
        match self.create_mounted(id, &dir, &mut spec, rootfs_path, read_only, stdio_cfg).await {
            Ok(c) => Ok(c),
            Err(e) => {
                tracing::warn!(container = id, "create failed: {e}");
                self.delete_libcontainer_state(id).await;
                rootfs::unmount_rootfs(&dir);
                let _ = fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    async fn create_mounted(
        &self,
        id: &str,
        dir: &Path,
        spec: &mut Spec,
        rootfs_path: PathBuf,
        read_only: bool,
        stdio_cfg: podvisor_proto::agent::StdioConfig,
    ) -> Result<Arc<Container>, AgentError> {
        // The spec's root.readonly (readonly_rootfs) is honoured too: the runtime then remounts
        // the writable overlay read-only after creating its mount points.
        let spec_read_only = spec.root().as_ref().and_then(|r| r.readonly()).unwrap_or(false);
        let mut root = Root::default();
        root.set_path(rootfs_path);
        root.set_readonly(Some(read_only || spec_read_only));
        spec.set_root(Some(root));
        let mut linux = spec.linux().clone().unwrap_or_default();
        linux.set_cgroups_path(Some(PathBuf::from(format!("/{CGROUP_PARENT}/{id}"))));
        let filter = linux.seccomp().clone().map(seccomp::for_libcontainer);
        linux.set_seccomp(filter.clone());
        let seccomp = filter.map(Box::new);
        spec.set_linux(Some(linux));
        write_json(&dir.join("config.json"), "config.json", spec)?;

        let (pending, helper_stdio) = self.prepare_io(stdio_cfg.tty, stdio_cfg.stdin)?;
        let console_socket = match &pending {
            PendingIo::Tty(_, path) => Some(path.clone()),
            PendingIo::Pipes(_) => None,
        };
        let started = Instant::now();
        let pid = self
            .run_helper(
                HelperOp::Create { id: id.to_string(), bundle: dir.to_path_buf(), console_socket },
                helper_stdio,
            )
            .await?
            .ok_or(AgentError::NoPid)?;
        let exit = self.reaper.register(pid, started);
        let io =
            Self::finish_io(pending, stdio_cfg.stdin, stdio_cfg.stdin_once, exit.clone()).await;
        // Before StartContainer: the init waits for it, so the container never opens a device
        // unchecked.
        let io = io.and_then(|io| self.enforce_device_rules(id, spec).map(|()| io));
        let io = match io {
            Ok(io) => io,
            Err(e) => {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                return Err(e);
            }
        };
        tracing::info!(container = id, pid, "created");
        if user_namespace_root(spec).is_some() {
            if let Err(e) = forget_supplementary_groups(dir) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                return Err(e);
            }
        }
        let container = Arc::new(Container {
            id: id.to_string(),
            dir: dir.to_path_buf(),
            init: Arc::new(Process::new(pid, exit, io)),
            phase: Mutex::new(Phase::Created),
            execs: Mutex::new(HashMap::new()),
            next_exit_seq: AtomicU64::new(0),
            seccomp,
            op_lock: tokio::sync::Mutex::new(()),
            cgroup_dir: self.paths.cgroup_dir(id),
            oom_killed: tokio::sync::OnceCell::new(),
        });
        container.watch_init_exit();
        Ok(container)
    }

    /// Attaches the container's device rules to its cgroup (libcontainer, built without
    /// libbpf, does not): in a guest, and for a host pod, whose containers would otherwise
    /// reach the host's devices. Host mode for tests leaves its stand-in cgroup tree alone.
    fn enforce_device_rules(&self, id: &str, spec: &Spec) -> Result<(), AgentError> {
        if !self.guest && self.host_pod.is_none() {
            return Ok(());
        }
        let rules = spec
            .linux()
            .as_ref()
            .and_then(|l| l.resources().as_ref())
            .and_then(|r| r.devices().clone())
            .unwrap_or_default();
        crate::device_cgroup::apply(&self.paths.cgroup_dir(id), &rules)?;
        Ok(())
    }

    /// Force-deletes libcontainer's state and cgroup of `id`, if it has any.
    async fn delete_libcontainer_state(&self, id: &str) {
        if !self.paths.libcontainer_root().join(id).exists() {
            return;
        }
        if let Err(e) =
            self.run_helper(HelperOp::Delete { id: id.to_string() }, HelperStdio::null()).await
        {
            tracing::warn!(container = id, "libcontainer delete: {e}");
        }
    }

    pub async fn start_container(&self, id: &str) -> Result<(), AgentError> {
        let container = self.container(id)?;
        let _op = container.op_lock.lock().await;
        if container.phase() != Phase::Created || container.init.exited() {
            return Err(AgentError::WrongState {
                id: id.to_string(),
                actual: container.state_name(),
                expected: "created",
            });
        }
        self.run_helper(HelperOp::Start { id: id.to_string() }, HelperStdio::null()).await?;
        *lock(&container.phase) = Phase::Running;
        tracing::info!(container = id, "started");
        Ok(())
    }

    pub async fn exec_process(&self, req: ExecProcessRequest) -> Result<u32, AgentError> {
        let container = self.container(&req.container_id)?;
        validate_id("exec id", &req.exec_id)?;
        let mut process: OciProcess =
            serde_json::from_slice(&req.oci_process_json).map_err(AgentError::BadProcess)?;
        if self.host_pod.is_some() {
            crate::host_pod::fit_rlimits(&mut process);
        }
        let stdio_cfg = req.stdio.unwrap_or_default();
        process.set_terminal(Some(stdio_cfg.tty));
        let _op = container.op_lock.lock().await;
        if container.phase() != Phase::Running || container.init.exited() {
            return Err(AgentError::WrongState {
                id: container.id.clone(),
                actual: container.state_name(),
                expected: "running",
            });
        }
        if lock(&container.execs).contains_key(&req.exec_id) {
            return Err(AgentError::ExecExists(container.id.clone(), req.exec_id));
        }
        let process_json = container.dir.join(format!("exec-{}.json", req.exec_id));
        write_json(&process_json, "the exec process", &process)?;
        let (pending, helper_stdio) = self.prepare_io(stdio_cfg.tty, stdio_cfg.stdin)?;
        let console_socket = match &pending {
            PendingIo::Tty(_, path) => Some(path.clone()),
            PendingIo::Pipes(_) => None,
        };
        let started = Instant::now();
        let result = self
            .run_helper(
                HelperOp::Exec {
                    id: container.id.clone(),
                    process_json: process_json.clone(),
                    console_socket,
                    seccomp: container.seccomp.clone(),
                },
                helper_stdio,
            )
            .await;
        let _ = fs::remove_file(&process_json);
        let pid = result?.ok_or(AgentError::NoPid)?;
        let exit = self.reaper.register(pid, started);
        let io = match Self::finish_io(pending, stdio_cfg.stdin, stdio_cfg.stdin_once, exit.clone())
            .await
        {
            Ok(io) => io,
            Err(e) => {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                return Err(e);
            }
        };
        tracing::info!(container = container.id, exec = req.exec_id, pid, "exec started");
        container.track_exec(req.exec_id, Process::new(pid, exit, io));
        Ok(pid as u32)
    }

    /// Waits for a process's exit. Giving an exec's status out is half of claiming it (see
    /// [`Process`]); a waiter that got here before the entry went still gets the status.
    pub async fn wait_process(&self, id: &str, exec_id: &str) -> Result<ProcessExit, AgentError> {
        let container = self.container(id)?;
        let process = Self::process_of(&container, exec_id)?;
        match reaper::wait_exit(process.exit.clone()).await {
            Some(status) => {
                if !exec_id.is_empty() {
                    container.exec_waited(exec_id, &process);
                    return Ok(ProcessExit { status, oom_killed: false });
                }
                Ok(ProcessExit { status, oom_killed: container.init_oom_killed().await })
            }
            // The reaper dropped the registration without a status: it cannot be waited on.
            None => Err(AgentError::ProcessNotFound(id.to_string(), exec_id.to_string())),
        }
    }

    /// The process's output from (stdout, stderr) offsets `have` on (see [`ProcessIo`]).
    pub fn read_output(
        &self,
        id: &str,
        exec_id: &str,
        have: [u64; 2],
    ) -> Result<OutputReader, AgentError> {
        Ok(self.process(id, exec_id)?.io.attach_reader(have)?)
    }

    pub async fn write_stdin(
        &self,
        id: &str,
        exec_id: &str,
        data: &[u8],
    ) -> Result<(), AgentError> {
        let process = self.process(id, exec_id)?;
        Ok(process.io.write_stdin(data).await?)
    }

    pub async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<(), AgentError> {
        Ok(self.process(id, exec_id)?.io.close_stdin().await?)
    }

    pub fn resize_tty(
        &self,
        id: &str,
        exec_id: &str,
        width: u32,
        height: u32,
    ) -> Result<(), AgentError> {
        let process = self.process(id, exec_id)?;
        let (w, h) = match (u16::try_from(width), u16::try_from(height)) {
            (Ok(w), Ok(h)) => (w, h),
            _ => return Err(AgentError::BadSize(width, height)),
        };
        Ok(process.io.resize(w, h)?)
    }

    pub fn signal_process(
        &self,
        id: &str,
        exec_id: &str,
        signal: i32,
        all: bool,
    ) -> Result<(), AgentError> {
        let sig = Signal::try_from(signal).map_err(|_| AgentError::BadSignal(signal))?;
        let process = self.process(id, exec_id)?;
        if all {
            self.signal_all(id, sig);
        }
        if !process.exited() {
            match kill(Pid::from_raw(process.pid), sig) {
                Ok(()) | Err(nix::Error::ESRCH) => {}
                Err(e) => return Err(AgentError::Signal(signal, e)),
            }
        }
        Ok(())
    }

    /// Signals every process in the container's cgroup (exec'd ones included).
    fn signal_all(&self, id: &str, sig: Signal) {
        let procs = self.paths.cgroup_dir(id).join("cgroup.procs");
        let Ok(list) = fs::read_to_string(&procs) else {
            return;
        };
        for pid in list.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            let _ = kill(Pid::from_raw(pid), sig);
        }
    }

    pub async fn remove_container(&self, id: &str) -> Result<(), AgentError> {
        let Some(container) = lock(&self.containers).remove(id) else {
            return Ok(());
        };
        let _op = container.op_lock.lock().await;
        if !container.init.exited() {
            self.signal_all(id, Signal::SIGKILL);
            let _ = kill(Pid::from_raw(container.init.pid), Signal::SIGKILL);
            if tokio::time::timeout(KILL_TIMEOUT, reaper::wait_exit(container.init.exit.clone()))
                .await
                .is_err()
            {
                tracing::warn!(container = id, "init not reaped after SIGKILL; removing anyway");
            }
        }
        // Waiters still hold the container: settle their OOM answer while the cgroup exists.
        if container.init.exited() {
            container.init_oom_killed().await;
        }
        self.delete_libcontainer_state(id).await;
        rootfs::unmount_rootfs(&container.dir);
        let _ = fs::remove_dir_all(&container.dir);
        tracing::info!(container = id, "removed");
        Ok(())
    }

    pub async fn destroy_sandbox(&self, grace: Duration) -> Result<(), AgentError> {
        let containers: Vec<Arc<Container>> = lock(&self.containers).values().cloned().collect();
        for c in &containers {
            self.signal_all(&c.id, Signal::SIGTERM);
            if !c.init.exited() {
                let _ = kill(Pid::from_raw(c.init.pid), Signal::SIGTERM);
            }
        }
        let waits = containers.iter().map(|c| reaper::wait_exit(c.init.exit.clone()));
        let _ = tokio::time::timeout(grace, futures::future::join_all(waits)).await;
        for c in &containers {
            self.remove_container(&c.id).await?;
        }
        self.stop_pause();
        Ok(())
    }

    /// Removes every container (host-mode shutdown: leave no processes, mounts or cgroups).
    pub async fn remove_all(&self) {
        let ids: Vec<String> = lock(&self.containers).keys().cloned().collect();
        for id in ids {
            if let Err(e) = self.remove_container(&id).await {
                tracing::warn!(container = id, "removing at shutdown: {e}");
            }
        }
        self.stop_pause();
    }

    pub async fn container_stats(&self, id: &str) -> Result<ContainerStatsResponse, AgentError> {
        let container = self.container(id)?;
        let (cgroup_dir, dir) = (container.cgroup_dir.clone(), container.dir.clone());
        // The layer walk may take a while (bounded, see rootfs::MAX_LAYER_ENTRIES): keep it
        // off the async workers.
        let (stats, layer) = tokio::task::spawn_blocking(move || {
            (cgroup::stats(&cgroup_dir), rootfs::writable_layer_usage(&dir))
        })
        .await
        .unwrap_or_default();
        if layer.truncated {
            tracing::warn!(
                container = id,
                "writable layer has over {} inodes: reporting a lower bound",
                rootfs::MAX_LAYER_ENTRIES
            );
        }
        Ok(ContainerStatsResponse {
            cpu_usage_nanos: stats.cpu_usage_nanos,
            memory_working_set_bytes: stats.memory_working_set_bytes,
            memory_usage_bytes: stats.memory_usage_bytes,
            pids: stats.pids,
            timestamp_unix_nanos: now_unix_nanos(),
            writable_layer_bytes: layer.bytes,
            writable_layer_inodes: layer.inodes,
            memory_rss_bytes: stats.memory_rss_bytes,
            page_faults: stats.page_faults,
            major_page_faults: stats.major_page_faults,
        })
    }

    /// The pod's cgroup (every container) and the VM's memory; zeros for missing files.
    pub fn sandbox_stats(&self) -> SandboxStatsResponse {
        let stats = cgroup::stats(&self.paths.pod_cgroup_dir());
        let (memory_total_bytes, memory_available_bytes) =
            cgroup::meminfo(&fs::read_to_string("/proc/meminfo").unwrap_or_default());
        SandboxStatsResponse {
            cpu_usage_nanos: stats.cpu_usage_nanos,
            memory_working_set_bytes: stats.memory_working_set_bytes,
            memory_usage_bytes: stats.memory_usage_bytes,
            pids: stats.pids,
            timestamp_unix_nanos: now_unix_nanos(),
            memory_total_bytes,
            memory_available_bytes,
        }
    }

    /// Applies new limits (OCI LinuxResources JSON) to a created or running container's
    /// cgroup and records them in its config.json.
    pub async fn update_container(
        &self,
        id: &str,
        resources_json: &[u8],
    ) -> Result<(), AgentError> {
        let container = self.container(id)?;
        // Everything is checked before anything is written.
        let (update, resources) = cgroup::Update::from_json(resources_json)?;
        let _op = container.op_lock.lock().await;
        if container.init.exited() {
            return Err(AgentError::WrongState {
                id: id.to_string(),
                actual: container.state_name(),
                expected: "created or running",
            });
        }
        update.apply(&container.cgroup_dir)?;
        tracing::info!(container = id, ?update, "resources updated");
        // The cgroup holds the new limits already: failing the call now would mislead.
        if let Err(e) = remember_resources(&container.dir, &resources) {
            tracing::warn!(container = id, "recording the new resources in config.json: {e}");
        }
        Ok(())
    }

    pub async fn create_sandbox(
        &self,
        req: &podvisor_proto::agent::CreateSandboxRequest,
    ) -> Result<(), AgentError> {
        let mac_changes = network::mac_changes(&req.mac_changes)?;
        let mut pod_hosts = self.pod_hosts.lock().await;
        crate::sandbox::create(
            req,
            &self.paths.sandbox_dir(),
            &self.paths.shared_dir,
            self.guest,
            &network::host_lines(&pod_hosts.lines),
        )?;
        if let Some(host_pod) = &self.host_pod {
            host_pod.create_sandbox(req)?;
        }
        pod_hosts.hostname = req.hostname.clone();
        drop(pod_hosts);
        if self.guest {
            network::change_macs(&mac_changes).await?;
        }
        if req.pod_pid_namespace {
            self.start_pause(pod_id_maps(req)?).await?;
        }
        Ok(())
    }

    /// Configures the pod's interfaces and routes (in the guest only: on the host the links
    /// are not the agent's) and adds the request's lines to the hosts files.
    pub async fn setup_network(&self, req: &SetupNetworkRequest) -> Result<(), AgentError> {
        let plan = network::Plan::from_request(req)?;
        let mut pod_hosts = self.pod_hosts.lock().await;
        if self.guest {
            network::apply(&plan).await?;
        }
        let hosts =
            crate::sandbox::hosts_file(&pod_hosts.hostname) + &network::host_lines(&plan.hosts);
        network::write_in_place(&self.paths.sandbox_dir().join("hosts"), &hosts)?;
        if self.guest {
            network::write_in_place(Path::new("/etc/hosts"), &hosts)?;
        }
        pod_hosts.lines = plan.hosts;
        tracing::info!(
            interfaces = req.interfaces.len(),
            routes = req.routes.len(),
            hosts = req.hosts.len(),
            "network set up"
        );
        Ok(())
    }

    pub fn is_guest(&self) -> bool {
        self.guest
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use tokio::sync::watch;

    /// The test's handles on a fake process: its exit and the child's ends of its pipes.
    struct Fake {
        exit: watch::Sender<Option<ExitStatus>>,
        stdio: stdio::ChildStdio,
    }

    impl Fake {
        fn exit(&self, code: i32) {
            self.exit.send_replace(Some(ExitStatus {
                code,
                signal: 0,
                exited_at: SystemTime::now(),
            }));
        }

        /// Writes `data` to stdout and closes the child's ends: the output then ends.
        fn write_and_close(&mut self, data: &[u8]) {
            if let Some(fd) = self.stdio.stdout.take() {
                assert_eq!(nix::unistd::write(&fd, data).unwrap(), data.len());
            }
            self.stdio.stderr = None;
        }
    }

    /// A process of pipes and a hand-driven exit (no real child; the pid does not exist).
    fn fake_process() -> (Process, Fake) {
        let (tx, rx) = watch::channel(None);
        let (pipes, child) = stdio::pipes(false).unwrap();
        let io = ProcessIo::from_pipes(pipes, false, rx.clone()).unwrap();
        (Process::new(i32::MAX, rx, io), Fake { exit: tx, stdio: child })
    }

    /// An agent with one running container "c" whose init is fake.
    fn agent_with_container() -> (Arc<Agent>, Arc<Container>, Fake) {
        agent_with_container_in(Path::new("/nonexistent"))
    }

    /// Like [`agent_with_container`], with the agent's directories (run/, cgroup/) under
    /// `root`.
    fn agent_with_container_in(root: &Path) -> (Arc<Agent>, Arc<Container>, Fake) {
        let paths = Paths {
            run_dir: root.join("run"),
            shared_dir: root.join("shared"),
            cgroup_root: root.join("cgroup"),
        };
        let log = File::open("/dev/null").unwrap();
        let (init, init_fake) = fake_process();
        let container = Arc::new(Container {
            id: "c".into(),
            dir: paths.containers_dir().join("c"),
            init: Arc::new(init),
            phase: Mutex::new(Phase::Running),
            execs: Mutex::new(HashMap::new()),
            next_exit_seq: AtomicU64::new(0),
            seccomp: None,
            op_lock: tokio::sync::Mutex::new(()),
            cgroup_dir: paths.cgroup_dir("c"),
            oom_killed: tokio::sync::OnceCell::new(),
        });
        let agent = Arc::new(Agent::new(paths, false, Reaper::default(), log));
        lock(&agent.containers).insert("c".into(), container.clone());
        (agent, container, init_fake)
    }

    fn exec(container: &Arc<Container>, exec_id: &str) -> (Arc<Process>, Fake) {
        let (process, fake) = fake_process();
        (container.track_exec(exec_id.into(), process), fake)
    }

    async fn read_to_end(agent: &Agent, exec_id: &str) -> Vec<u8> {
        let mut reader = agent.read_output("c", exec_id, [0, 0]).unwrap();
        let read = async {
            let mut out = Vec::new();
            while let Some(chunk) = reader.next().await {
                out.extend(chunk.unwrap().data);
            }
            out
        };
        tokio::time::timeout(Duration::from_secs(10), read).await.expect("output did not end")
    }

    /// Lets spawned tasks (exit watchers, waiters) run until `done` holds.
    async fn until(done: impl Fn() -> bool) {
        for _ in 0..10_000 {
            if done() {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("condition not reached");
    }

    fn tracked(container: &Container, exec_id: &str) -> bool {
        lock(&container.execs).contains_key(exec_id)
    }

    fn not_found<T>(result: Result<T, AgentError>) -> bool {
        matches!(result, Err(AgentError::ProcessNotFound(..)))
    }

    /// ExecSync's order: ExecProcess, ReadOutput to its end, WaitProcess.
    #[tokio::test]
    async fn exec_is_dropped_once_drained_then_waited() {
        let (agent, container, _init) = agent_with_container();
        assert_eq!(agent.tracked_processes(), 1);
        let (process, mut fake) = exec(&container, "e1");
        assert_eq!(agent.tracked_processes(), 2);
        fake.write_and_close(b"probe ok\n");
        fake.exit(0);
        assert_eq!(read_to_end(&agent, "e1").await, b"probe ok\n");
        until(|| process.exit_seq.get().is_some()).await;
        // Drained and exited, but nobody has the status yet.
        assert!(tracked(&container, "e1"));
        assert_eq!(agent.wait_process("c", "e1").await.unwrap().status.code, 0);
        assert!(!tracked(&container, "e1"));
        assert_eq!(agent.tracked_processes(), 1);
        assert!(not_found(agent.wait_process("c", "e1").await));
        assert!(not_found(agent.read_output("c", "e1", [0, 0])));
        assert!(not_found(agent.signal_process("c", "e1", libc::SIGKILL, false)));

        // The id may be reused; a late release of the old entry leaves the new one alone.
        let (_new, _new_fake) = exec(&container, "e1");
        container.release_if_claimed("e1", &process);
        assert!(tracked(&container, "e1"));
    }

    /// A streaming caller: WaitProcess before the exit, ReadOutput ending afterwards.
    #[tokio::test]
    async fn exec_is_dropped_once_waited_then_drained() {
        let (agent, container, _init) = agent_with_container();
        let (_process, mut fake) = exec(&container, "e1");
        let watchers = fake.exit.receiver_count();
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let agent = agent.clone();
                tokio::spawn(async move { agent.wait_process("c", "e1").await })
            })
            .collect();
        // Each waiter holds a receiver once it waits.
        until(|| fake.exit.receiver_count() == watchers + 2).await;
        fake.exit(3);
        for waiter in waiters {
            assert_eq!(waiter.await.unwrap().unwrap().status.code, 3);
        }
        // Waited, but the output has not been read: a reader may still come.
        assert!(tracked(&container, "e1"));
        fake.write_and_close(b"late\n");
        assert_eq!(read_to_end(&agent, "e1").await, b"late\n");
        assert!(!tracked(&container, "e1"));
        assert_eq!(agent.tracked_processes(), 1);
    }

    /// Waiters registered before the exit all get the status, though the first one's answer
    /// drops the entry.
    #[tokio::test]
    async fn waiters_racing_the_drop_get_the_status() {
        let (agent, container, _init) = agent_with_container();
        let (_process, mut fake) = exec(&container, "e1");
        fake.write_and_close(b"");
        assert_eq!(read_to_end(&agent, "e1").await, b"");
        let watchers = fake.exit.receiver_count();
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let agent = agent.clone();
                tokio::spawn(async move { agent.wait_process("c", "e1").await })
            })
            .collect();
        until(|| fake.exit.receiver_count() == watchers + 3).await;
        fake.exit(9);
        for waiter in waiters {
            assert_eq!(waiter.await.unwrap().unwrap().status.code, 9);
        }
        assert!(!tracked(&container, "e1"));
    }

    /// An exec that was waited for but never read stays: its output can still be read.
    #[tokio::test]
    async fn waited_but_unread_exec_is_kept_until_read() {
        let (agent, container, _init) = agent_with_container();
        let (process, mut fake) = exec(&container, "e1");
        fake.exit(0);
        assert_eq!(agent.wait_process("c", "e1").await.unwrap().status.code, 0);
        until(|| process.exit_seq.get().is_some()).await;
        assert!(tracked(&container, "e1"));
        fake.write_and_close(b"kept\n");
        assert_eq!(read_to_end(&agent, "e1").await, b"kept\n");
        assert!(!tracked(&container, "e1"));
    }

    /// A reader that detaches before the end (a broken stream) does not count as drained.
    #[tokio::test]
    async fn a_reader_that_leaves_early_does_not_drain() {
        let (agent, container, _init) = agent_with_container();
        let (_process, mut fake) = exec(&container, "e1");
        fake.write_and_close(b"partial\n");
        fake.exit(0);
        {
            let mut reader = agent.read_output("c", "e1", [0, 0]).unwrap();
            let chunk = reader.next().await.unwrap().unwrap();
            assert_eq!(chunk.data, b"partial\n");
        }
        assert_eq!(agent.wait_process("c", "e1").await.unwrap().status.code, 0);
        assert!(tracked(&container, "e1"));
        // Re-attaching with what it has gets the end of the stream.
        let mut reader = agent.read_output("c", "e1", [8, 0]).unwrap();
        assert!(reader.next().await.is_none());
        assert!(!tracked(&container, "e1"));
    }

    /// A host that never waits (ExecSync timed out) leaves at most MAX_UNCLAIMED_EXECS exited
    /// execs; the oldest exits go first, running execs are never dropped.
    #[tokio::test]
    async fn unclaimed_exits_are_bounded() {
        let (agent, container, _init) = agent_with_container();
        let (_running, _running_fake) = exec(&container, "running");
        let total = MAX_UNCLAIMED_EXECS + 8;
        let mut fakes = Vec::new();
        for i in 0..total {
            let (process, fake) = exec(&container, &format!("e{i}"));
            fakes.push((process, fake));
        }
        // Exit in reverse creation order: "oldest" means exited first.
        for (process, fake) in fakes.iter().rev() {
            fake.exit(137);
            until(|| process.exit_seq.get().is_some()).await;
        }
        assert_eq!(lock(&container.execs).len(), MAX_UNCLAIMED_EXECS + 1);
        assert!(tracked(&container, "running"));
        for i in 0..total {
            let kept = tracked(&container, &format!("e{i}"));
            assert_eq!(kept, i < MAX_UNCLAIMED_EXECS, "e{i}");
        }
        assert_eq!(agent.tracked_processes(), 1 + MAX_UNCLAIMED_EXECS + 1);
        // A dropped entry's waiter-to-be answers NotFound; its process's io is released.
        let dropped = &fakes[total - 1].0;
        assert!(not_found(agent.wait_process("c", &format!("e{}", total - 1)).await));
        assert_eq!(Arc::strong_count(dropped), 1);
    }

    /// A container's init stays until RemoveContainer, however often it is waited for.
    #[tokio::test]
    async fn init_is_never_dropped() {
        let (agent, container, mut init) = agent_with_container();
        init.write_and_close(b"bye\n");
        init.exit(1);
        assert_eq!(read_to_end(&agent, "").await, b"bye\n");
        for _ in 0..2 {
            assert_eq!(agent.wait_process("c", "").await.unwrap().status.code, 1);
        }
        assert_eq!(agent.tracked_processes(), 1);
        assert!(container.init.exited());
    }

    /// The init's OOM verdict is read when it exits and kept after the cgroup is gone; execs
    /// never carry one.
    #[tokio::test]
    async fn oom_kill_is_read_at_init_exit_and_cached() {
        let root = tempfile::tempdir().unwrap();
        let (agent, container, init) = agent_with_container_in(root.path());
        fs::create_dir_all(&container.cgroup_dir).unwrap();
        let events = container.cgroup_dir.join("memory.events");
        fs::write(&events, "low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\n").unwrap();
        container.watch_init_exit();
        let (_exec, exec_fake) = exec(&container, "e1");
        exec_fake.exit(137);
        let exec_exit = agent.wait_process("c", "e1").await.unwrap();
        assert_eq!((exec_exit.status.code, exec_exit.oom_killed), (137, false));
        init.exit(137);
        until(|| container.oom_killed.initialized()).await;
        fs::remove_dir_all(&container.cgroup_dir).unwrap();
        for _ in 0..2 {
            let exit = agent.wait_process("c", "").await.unwrap();
            assert_eq!((exit.status.code, exit.oom_killed), (137, true));
        }
        // Without a memory controller (or OOM kill) the answer is no.
        let (agent, _, init) = agent_with_container();
        init.exit(1);
        assert!(!agent.wait_process("c", "").await.unwrap().oom_killed);
    }

    #[tokio::test]
    async fn update_writes_the_cgroup_and_remembers_the_resources() {
        let root = tempfile::tempdir().unwrap();
        let (agent, container, init) = agent_with_container_in(root.path());
        fs::create_dir_all(&container.cgroup_dir).unwrap();
        fs::create_dir_all(&container.dir).unwrap();
        for name in ["memory.max", "cpu.max"] {
            fs::write(container.cgroup_dir.join(name), "max\n").unwrap();
        }
        let spec = serde_json::json!({
            "ociVersion": "1.0.2",
            "linux": {"resources": {"memory": {"limit": 1000}, "cpu": {"shares": 512}}}
        });
        fs::write(container.dir.join("config.json"), spec.to_string()).unwrap();
        let json = br#"{"memory": {"limit": 33554432}, "cpu": {"quota": 50000, "period": 100000}}"#;
        agent.update_container("c", json).await.unwrap();
        let get = |name: &str| fs::read_to_string(container.cgroup_dir.join(name)).unwrap();
        assert_eq!(get("memory.max"), "33554432");
        assert_eq!(get("cpu.max"), "50000 100000");
        let remembered: Spec =
            serde_json::from_slice(&fs::read(container.dir.join("config.json")).unwrap()).unwrap();
        let resources = remembered.linux().clone().unwrap().resources().clone().unwrap();
        assert_eq!(resources.memory().unwrap().limit(), Some(33_554_432));
        let cpu = resources.cpu().clone().unwrap();
        assert_eq!(
            (cpu.shares(), cpu.quota(), cpu.period()),
            (Some(512), Some(50_000), Some(100_000))
        );

        // A file the cgroup lacks names itself; bad input is refused before any write.
        let err = agent.update_container("c", br#"{"cpu": {"shares": 2}}"#).await.unwrap_err();
        assert!(err.to_string().contains("cpu.weight"), "{err}");
        let bad =
            agent.update_container("c", br#"{"memory": {"limit": 5}, "unified": {"../x": "1"}}"#);
        assert!(matches!(bad.await, Err(AgentError::Cgroup(CgroupError::BadUnifiedKey(_)))));
        assert_eq!(get("memory.max"), "33554432");
        assert!(matches!(
            agent.update_container("c", b"[1").await,
            Err(AgentError::Cgroup(CgroupError::BadResources(_)))
        ));
        assert!(matches!(
            agent.update_container("nope", json).await,
            Err(AgentError::ContainerNotFound(_))
        ));
        init.exit(0);
        assert!(matches!(
            agent.update_container("c", json).await,
            Err(AgentError::WrongState { .. })
        ));
    }

    #[test]
    fn ids_are_checked() {
        for good in ["a", "abc-1.2_3", &"x".repeat(128)] {
            assert!(validate_id("id", good).is_ok(), "{good}");
        }
        for bad in ["", ".", "..", ".hidden", "a/b", "a b", &"x".repeat(129)] {
            assert!(validate_id("id", bad).is_err(), "{bad}");
        }
    }
}
