//! The pod's shared PID namespace (CRI NamespaceMode POD). As containerd does with its pause
//! container, a tiny process is PID 1 of a fresh PID namespace that the pod's containers join:
//! they see each other, but not the agent or the VM's other processes, and orphans inside are
//! reaped by it.
//!
//! `podvisor-agent __pause` (started by the agent, still single-threaded) unshares a PID
//! namespace and forks; the child is that namespace's PID 1 and runs [`pid1`], the parent
//! prints the child's pid and exits. The child is re-parented to the agent (PID 1 of the VM, or
//! a child subreaper on the host), whose reaper collects it when it ends.

use std::os::fd::AsRawFd;
use std::process::ExitCode;

use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};

/// The internal subcommand that starts the pause process.
pub const PAUSE_SUBCOMMAND: &str = "__pause";

/// `podvisor-agent __pause`: prints the pid of the new namespace's PID 1 (as the caller sees
/// it) on stdout.
pub fn main() -> ExitCode {
    if let Err(e) = unshare(CloneFlags::CLONE_NEWPID) {
        eprintln!("pause: unsharing the PID namespace: {e}");
        return ExitCode::FAILURE;
    }
    // SAFETY: this process is single-threaded (nothing but main has run), so the child may
    // call anything; it only sets up signals and loops.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => pid1(),
        Ok(ForkResult::Parent { child }) => {
            println!("{child}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("pause: fork: {e}");
            ExitCode::FAILURE
        }
    }
}

/// PID 1 of the pod's namespace: reaps orphans until SIGTERM or SIGINT.
fn pid1() -> ! {
    // Let go of the caller's pipes (it waits for them to close) and of its working directory.
    if let Ok(null) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null") {
        for fd in 0..3 {
            // SAFETY: dup2 onto the standard descriptors of this single-threaded process.
            unsafe { libc::dup2(null.as_raw_fd(), fd) };
        }
    }
    let _ = nix::unistd::chdir("/");
    let _ = nix::sys::prctl::set_name(c"pause");
    let mut signals = SigSet::empty();
    for signal in [Signal::SIGCHLD, Signal::SIGTERM, Signal::SIGINT] {
        signals.add(signal);
    }
    // Blocked, then waited for: PID 1 ignores signals it has no handler for.
    let _ = signals.thread_block();
    loop {
        match signals.wait() {
            Ok(Signal::SIGCHLD) => {
                while let Ok(status) = waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                    if status == WaitStatus::StillAlive {
                        break;
                    }
                }
            }
            Ok(_) => std::process::exit(0),
            Err(_) => {}
        }
    }
}
