//! The pod's shared PID namespace (CRI NamespaceMode POD). As containerd does with its pause
//! container, a tiny process is PID 1 of a fresh PID namespace that the pod's containers join:
//! they see each other, but not the agent or the VM's other processes, and orphans inside are
//! reaped by it.
//!
//! `podvisor-agent __pause` (started by the agent, still single-threaded) unshares a PID
//! namespace and forks; the child is that namespace's PID 1 and runs [`pid1`], the parent
//! prints the child's pid and exits. The child is re-parented to the agent (PID 1 of the VM, or
//! a child subreaper on the host), whose reaper collects it when it ends.
//!
//! A pod with a user namespace (`podvisor-agent __pause <uid_map> <gid_map>`, the maps in the
//! kernel's format) gets its PID namespace inside a new user namespace of those maps, which the
//! pod's containers join: a PID namespace belongs to the user namespace it was made in, and only
//! there can a container mount its /proc. PID 1 then runs as the pod's root (a mapped id), not
//! as the guest's.

use std::os::fd::AsRawFd;
use std::process::ExitCode;

use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};

/// The internal subcommand that starts the pause process.
pub const PAUSE_SUBCOMMAND: &str = "__pause";
/// `__pause pid1`: run as PID 1 (re-executed inside the pod's user namespace).
const PID1_ARG: &str = "pid1";
const PID1_ARG_C: &std::ffi::CStr = c"pid1";

/// `podvisor-agent __pause [<uid_map> <gid_map>]`: prints the pid of the new namespace's PID 1
/// (as the caller sees it) on stdout.
pub fn main(args: &[std::ffi::OsString]) -> ExitCode {
    match args {
        [uid_map, gid_map] => {
            return in_user_namespace(uid_map.as_encoded_bytes(), gid_map.as_encoded_bytes())
        }
        [pid1_arg] if pid1_arg == PID1_ARG => {
            // Not traceable by the pod's containers (same uid, so no capability needed
            // otherwise): PID 1 lives in the agent's mount namespace. Joining its namespaces
            // then needs CAP_SYS_PTRACE in the pod's user namespace, which libcontainer has
            // before it drops the container's capabilities.
            if nix::sys::prctl::set_dumpable(false).is_err() {
                return ExitCode::FAILURE;
            }
            pid1();
        }
        _ => {}
    }
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

/// Clones PID 1 into a new user and PID namespace, writes the user namespace's maps (this
/// process is the guest's root in the parent namespace), then lets it go on.
fn in_user_namespace(uid_map: &[u8], gid_map: &[u8]) -> ExitCode {
    let (go_read, go_write) = match nix::unistd::pipe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("pause: pipe: {e}");
            return ExitCode::FAILURE;
        }
    };
    let flags = libc::CLONE_NEWUSER | libc::CLONE_NEWPID | libc::SIGCHLD;
    // SAFETY: a fork-like clone (no new stack: the child runs on a copy of this one) of a
    // single-threaded process; the child only makes system calls before it loops in `pid1`.
    let child = unsafe { libc::syscall(libc::SYS_clone, libc::c_long::from(flags), 0, 0, 0, 0) };
    if child == 0 {
        drop(go_write);
        let mut byte = [0u8; 1];
        // The parent closes its end without writing if it could not write the maps.
        if nix::unistd::read(go_read.as_raw_fd(), &mut byte) != Ok(1) {
            std::process::exit(1);
        }
        drop(go_read);
        let root = (nix::unistd::Gid::from_raw(0), nix::unistd::Uid::from_raw(0));
        if nix::unistd::setresgid(root.0, root.0, root.0).is_err()
            || nix::unistd::setresuid(root.1, root.1, root.1).is_err()
        {
            std::process::exit(1);
        }
        // Re-executed as the pod's root, so that its memory belongs to the pod's user
        // namespace, in which the containers may then open its namespaces.
        let exe = c"/proc/self/exe";
        let argv = [c"podvisor-agent", c"__pause", PID1_ARG_C];
        let _ = nix::unistd::execv(exe, &argv);
        std::process::exit(1);
    }
    drop(go_read);
    if child < 0 {
        eprintln!("pause: clone: {}", std::io::Error::last_os_error());
        return ExitCode::FAILURE;
    }
    for (name, map) in [("uid_map", uid_map), ("gid_map", gid_map)] {
        if let Err(e) = std::fs::write(format!("/proc/{child}/{name}"), map) {
            eprintln!("pause: writing {name}: {e}");
            return ExitCode::FAILURE;
        }
    }
    if nix::unistd::write(&go_write, &[1]) != Ok(1) {
        eprintln!("pause: starting PID 1 failed");
        return ExitCode::FAILURE;
    }
    println!("{child}");
    ExitCode::SUCCESS
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
