//! The single-threaded libcontainer helper. libcontainer clones without exec and is not safe
//! in a multi-threaded process, so every call into it runs in a fresh copy of this binary
//! (`podvisor-agent __libcontainer <request JSON>`) that starts no threads.
//!
//! The helper's fds 0-2 are the container process's stdio (libcontainer hands its own stdio to
//! the process it creates), fd 3 is where it writes its JSON reply, fd 4 is the log sink. The
//! processes it creates are its children; when it exits they are re-parented to the agent
//! (PID 1 or child subreaper), whose reaper collects their exit status.

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container;
use libcontainer::syscall::syscall::SyscallType;
use libcontainer::workload::default::DefaultExecutor;
use libcontainer::workload::{
    Executor, ExecutorError, ExecutorSetEnvsError, ExecutorValidationError,
};
use oci_spec::runtime::{LinuxSeccomp, Spec};
use serde::{Deserialize, Serialize};

use crate::reaper::{self, Reaper};

/// The subcommand that selects helper mode.
pub const HELPER_SUBCOMMAND: &str = "__libcontainer";
const REPLY_FD: RawFd = 3;
const LOG_FD: RawFd = 4;
/// Fds the agent passes are first moved at or above this, so the dup2s to 3 and 4 in the
/// child cannot clobber each other.
const HIGH_FD: RawFd = 10;
/// Creating a container under TCG takes a while; a helper stuck this long is killed.
const HELPER_TIMEOUT: Duration = Duration::from_secs(120);

/// What the helper is asked to do.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum HelperOp {
    /// Create a container from `bundle/config.json`; its init waits for `Start`.
    Create { id: String, bundle: PathBuf, console_socket: Option<PathBuf> },
    /// Let a created container's init run the user's program.
    Start { id: String },
    /// Run the process described by `process_json` in the running container `id`.
    Exec {
        id: String,
        process_json: PathBuf,
        console_socket: Option<PathBuf>,
        /// The container's seccomp profile (libcontainer does not apply it to exec'd processes).
        seccomp: Option<Box<LinuxSeccomp>>,
    },
    /// Force-delete the container's libcontainer state and cgroup.
    Delete { id: String },
}

#[derive(Debug, Serialize, Deserialize)]
struct HelperRequest {
    root: PathBuf,
    op: HelperOp,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct HelperReply {
    pid: Option<i32>,
    error: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum HelperError {
    #[error("encoding the helper request: {0}")]
    Encode(serde_json::Error),
    #[error("creating the reply pipe: {0}")]
    Pipe(nix::Error),
    #[error("duplicating a descriptor for the helper: {0}")]
    Dup(std::io::Error),
    #[error("starting the helper: {0}")]
    Spawn(std::io::Error),
    #[error("the helper did not finish within {0:?}")]
    Timeout(Duration),
    #[error("the helper ended without a reply (exit code {0})")]
    NoReply(i32),
    #[error("bad helper reply: {0}")]
    BadReply(serde_json::Error),
    #[error("{0}")]
    Libcontainer(String),
}

/// The stdio the helper passes on to the process it creates.
pub struct HelperStdio {
    pub stdin: Option<OwnedFd>,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
}

impl HelperStdio {
    pub fn null() -> Self {
        HelperStdio { stdin: None, stdout: None, stderr: None }
    }
}

fn stdio(fd: Option<OwnedFd>) -> Stdio {
    fd.map(Stdio::from).unwrap_or_else(Stdio::null)
}

fn dup_high(fd: &impl AsRawFd) -> Result<OwnedFd, HelperError> {
    // SAFETY: F_DUPFD_CLOEXEC on a valid fd returns a new descriptor we own (checked below).
    let new = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, HIGH_FD) };
    if new < 0 {
        return Err(HelperError::Dup(std::io::Error::last_os_error()));
    }
    // SAFETY: `new` is a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// Runs one libcontainer operation in a helper process; returns the pid it reports, if any.
pub async fn run(
    reaper: &Reaper,
    log: &File,
    root: &Path,
    op: HelperOp,
    stdio_fds: HelperStdio,
) -> Result<Option<i32>, HelperError> {
    let request = serde_json::to_string(&HelperRequest { root: root.to_path_buf(), op })
        .map_err(HelperError::Encode)?;
    let (reply_read, reply_write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
            .map_err(HelperError::Pipe)?;
    let reply_write = dup_high(&reply_write)?;
    let log_fd = dup_high(log)?;
    let (reply_raw, log_raw) = (reply_write.as_raw_fd(), log_fd.as_raw_fd());
    let mut command = Command::new("/proc/self/exe");
    command
        .arg0("podvisor-agent-helper")
        .arg(HELPER_SUBCOMMAND)
        .arg(request)
        .stdin(stdio(stdio_fds.stdin))
        .stdout(stdio(stdio_fds.stdout))
        .stderr(stdio(stdio_fds.stderr));
    // SAFETY: the closure only calls dup2 and fcntl (async-signal-safe) on descriptors that
    // stay open in the parent until spawn returns; both sources are >= HIGH_FD, so neither
    // dup2 can overwrite the other's source.
    unsafe {
        command.pre_exec(move || {
            // The payload of a failing reply pipe is surfaced as NoReply by the parent.
            if libc::dup2(reply_raw, REPLY_FD) < 0 || libc::dup2(log_raw, LOG_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let started = Instant::now();
    let child = command.spawn().map_err(HelperError::Spawn)?;
    let pid = child.id() as i32;
    // The reaper collects the helper; `child` is never waited on directly.
    drop(child);
    drop(reply_write);
    drop(log_fd);
    let exit_watch = reaper.register(pid, started);
    let status = match tokio::time::timeout(HELPER_TIMEOUT, reaper::wait_exit(exit_watch)).await {
        Ok(status) => status,
        Err(_) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            return Err(HelperError::Timeout(HELPER_TIMEOUT));
        }
    };
    // Processes the helper created may still hold the write end: read what is there, never
    // wait for end-of-file.
    let mut reply = Vec::new();
    let mut file = File::from(reply_read);
    let mut buf = [0u8; 4096];
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => reply.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    if reply.is_empty() {
        return Err(HelperError::NoReply(status.map(|s| s.code).unwrap_or(-1)));
    }
    let reply: HelperReply = serde_json::from_slice(&reply).map_err(HelperError::BadReply)?;
    match reply.error {
        Some(e) => Err(HelperError::Libcontainer(e)),
        None => Ok(reply.pid),
    }
}

/// Entry point of the helper process. Never starts a thread.
pub fn main(args: &[OsString]) -> ExitCode {
    // SAFETY: the agent passes fds 3 and 4 to every helper (see `run`); nothing else in this
    // process owns them.
    let (mut reply_sink, log_sink) =
        unsafe { (File::from_raw_fd(REPLY_FD), File::from_raw_fd(LOG_FD)) };
    crate::logging::init(log_sink);
    // The Rust runtime ignores SIGPIPE, and ignored signals survive exec: give the container's
    // processes the default disposition (a pipeline's writer must die when its reader does).
    // SAFETY: resetting a disposition to SIG_DFL installs no handler; no threads exist yet.
    if unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) } == libc::SIG_ERR {
        tracing::warn!("could not reset SIGPIPE to its default");
    }
    let reply = match args.first().and_then(|a| a.to_str()) {
        None => HelperReply { pid: None, error: Some("missing helper request".into()) },
        Some(json) => match serde_json::from_str::<HelperRequest>(json) {
            Err(e) => HelperReply { pid: None, error: Some(format!("bad helper request: {e}")) },
            Ok(request) => match execute(request) {
                Ok(pid) => HelperReply { pid, error: None },
                Err(e) => HelperReply { pid: None, error: Some(e) },
            },
        },
    };
    let encoded = serde_json::to_vec(&reply).unwrap_or_else(|_| b"{}".to_vec());
    if reply_sink.write_all(&encoded).is_err() {
        return ExitCode::FAILURE;
    }
    if reply.error.is_some() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn execute(request: HelperRequest) -> Result<Option<i32>, String> {
    let root = request.root;
    match request.op {
        HelperOp::Create { id, bundle, console_socket } => {
            let container = ContainerBuilder::new(id, SyscallType::default())
                .with_executor(AgentExecutor { seccomp: None })
                .with_root_path(root)
                .map_err(|e| format!("root path: {e}"))?
                .with_console_socket(console_socket)
                .validate_id()
                .map_err(|e| format!("container id: {e}"))?
                .as_init(bundle)
                .with_systemd(false)
                .with_detach(true)
                .build()
                .map_err(|e| format!("creating the container: {e}"))?;
            Ok(container.pid().map(|p| p.as_raw()))
        }
        HelperOp::Start { id } => {
            let mut container =
                Container::load(root.join(&id)).map_err(|e| format!("loading {id}: {e}"))?;
            container.start().map_err(|e| format!("starting {id}: {e}"))?;
            Ok(container.pid().map(|p| p.as_raw()))
        }
        HelperOp::Exec { id, process_json, console_socket, seccomp } => {
            join_user_namespace(&root.join(&id))?;
            let pid = ContainerBuilder::new(id, SyscallType::default())
                .with_executor(AgentExecutor { seccomp })
                .with_root_path(root)
                .map_err(|e| format!("root path: {e}"))?
                .with_console_socket(console_socket)
                .validate_id()
                .map_err(|e| format!("container id: {e}"))?
                .as_tenant()
                .with_detach(true)
                .with_process(Some(process_json))
                .build()
                .map_err(|e| format!("exec: {e}"))?;
            Ok(Some(pid.as_raw()))
        }
        HelperOp::Delete { id } => {
            let mut container =
                Container::load(root.join(&id)).map_err(|e| format!("loading {id}: {e}"))?;
            container.delete(true).map_err(|e| format!("deleting {id}: {e}"))?;
            Ok(None)
        }
    }
}

/// Moves this helper into the user namespace of the container whose state is in
/// `container_dir`, if it has its own. libcontainer's exec joins the container's other
/// namespaces but not its user namespace (its tenant builder leaves `user` out), which
/// would run the process as the guest's real root. Joined from here, the process's ids and
/// capabilities are the container's: the pid, mount and cgroup namespaces belong to the user
/// namespace, where this helper then has every capability, and it stays the guest's uid 0 to
/// the files it touches (libcontainer's state, the container's cgroup), which are root's.
fn join_user_namespace(container_dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let container =
        Container::load(container_dir.to_path_buf()).map_err(|e| format!("loading state: {e}"))?;
    let pid = container.pid().ok_or("the container has no init process")?;
    let theirs = PathBuf::from(format!("/proc/{pid}/ns/user"));
    let inode = |p: &Path| std::fs::metadata(p).map(|m| m.ino()).map_err(|e| format!("{p:?}: {e}"));
    if inode(&theirs)? == inode(Path::new("/proc/self/ns/user"))? {
        return Ok(());
    }
    let ns = File::open(&theirs).map_err(|e| format!("opening {theirs:?}: {e}"))?;
    // The helper is single-threaded and shares no fs struct (it was exec'd), as setns needs.
    nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWUSER)
        .map_err(|e| format!("joining the container's user namespace: {e}"))
}

/// libcontainer's default executor, plus the container's seccomp profile for exec'd
/// processes (libcontainer drops `linux.seccomp` from the spec it builds for them).
#[derive(Clone)]
struct AgentExecutor {
    seccomp: Option<Box<LinuxSeccomp>>,
}

impl AgentExecutor {
    fn apply_seccomp(&self) -> Result<(), ExecutorError> {
        let Some(seccomp) = &self.seccomp else {
            return Ok(());
        };
        if libcontainer::seccomp::initialize_seccomp(seccomp).is_ok() {
            return Ok(());
        }
        // Without CAP_SYS_ADMIN (dropped by now) loading a filter needs no_new_privs; running
        // the exec'd process without the container's filter would be worse than setting it.
        tracing::warn!("seccomp needs no_new_privs for this exec'd process; setting it");
        nix::sys::prctl::set_no_new_privs()
            .map_err(|e| ExecutorError::Other(format!("no_new_privs: {e}")))?;
        libcontainer::seccomp::initialize_seccomp(seccomp)
            .map(|_| ())
            .map_err(|e| ExecutorError::Other(format!("seccomp: {e}")))
    }
}

impl Executor for AgentExecutor {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        self.apply_seccomp()?;
        DefaultExecutor {}.exec(spec)
    }

    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        DefaultExecutor {}.validate(spec)
    }

    fn setup_envs(
        &self,
        envs: std::collections::HashMap<String, String>,
    ) -> Result<(), ExecutorSetEnvsError> {
        DefaultExecutor {}.setup_envs(envs)
    }
}
