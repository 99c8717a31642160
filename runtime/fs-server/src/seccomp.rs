//! The FUSE server's seccomp allowlist (seccompiler), installed once the sandbox is entered and
//! the share's root is open: serving files through open descriptors, per-request credentials,
//! accepting the one connection and talking on it. Anything else kills the process after its
//! SIGSYS handler printed the syscall number.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Exit code of a server stopped by its filter (the VMM's, too).
pub const SECCOMP_EXIT_CODE: i32 = 148;

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("building the fs-serve seccomp filter: {0}")]
    Build(#[from] seccompiler::BackendError),
    #[error("installing the fs-serve seccomp filter: {0}")]
    Install(seccompiler::Error),
    #[error("installing the SIGSYS handler: {0}")]
    SigsysHandler(std::io::Error),
}

/// What the passthrough file system, the server loop and the Rust runtime call.
const ALLOWED: &[i64] = &[
    // The connection.
    libc::SYS_accept4,
    libc::SYS_accept,
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    // Files, all relative to open descriptors.
    libc::SYS_openat,
    libc::SYS_close,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_lseek,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_fstatfs,
    libc::SYS_getdents64,
    libc::SYS_fcntl,
    libc::SYS_dup,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_ftruncate,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fchown,
    libc::SYS_fchownat,
    libc::SYS_utimensat,
    libc::SYS_unlinkat,
    libc::SYS_mkdirat,
    libc::SYS_mknodat,
    libc::SYS_symlinkat,
    libc::SYS_linkat,
    libc::SYS_readlinkat,
    libc::SYS_renameat2,
    libc::SYS_flock,
    libc::SYS_copy_file_range,
    libc::SYS_umask,
    // Each request runs with the caller's credentials.
    libc::SYS_setresuid,
    libc::SYS_setresgid,
    libc::SYS_getuid,
    libc::SYS_getgid,
    libc::SYS_geteuid,
    libc::SYS_getegid,
    // The runtime.
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_tgkill,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_mprotect,
    libc::SYS_brk,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigaction,
    libc::SYS_sigaltstack,
    libc::SYS_getrandom,
    libc::SYS_clock_gettime,
    libc::SYS_sched_yield,
    // Only TCGETS (the logger's tty check), see `rules`.
    libc::SYS_ioctl,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

fn rules(syscall: i64) -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    if syscall != libc::SYS_ioctl {
        return Ok(Vec::new());
    }
    let tcgets = SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, libc::TCGETS)?;
    Ok(vec![SeccompRule::new(vec![tcgets])?])
}

/// The filter (mismatch: trap).
pub fn filter() -> Result<BpfProgram, SeccompError> {
    let rules: BTreeMap<i64, Vec<SeccompRule>> =
        ALLOWED.iter().map(|&nr| rules(nr).map(|r| (nr, r))).collect::<Result<_, _>>()?;
    let filter =
        SeccompFilter::new(rules, SeccompAction::Trap, SeccompAction::Allow, TargetArch::x86_64)?;
    Ok(BpfProgram::try_from(filter)?)
}

/// Installs the SIGSYS reporter and the filter on the calling (only) thread.
pub fn install() -> Result<(), SeccompError> {
    let program = filter()?;
    install_sigsys_handler()?;
    seccompiler::apply_filter(&program).map_err(SeccompError::Install)
}

extern "C" fn sigsys_handler(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler; for SIGSYS the
    // syscall number is the int at offset 24 (after si_signo/errno/code and _call_addr).
    let nr = unsafe { *(info as *const u8).add(24).cast::<i32>() };
    let mut digits = [0u8; 12];
    let mut i = digits.len();
    let mut n = nr.unsigned_abs();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 || i == 0 {
            break;
        }
    }
    let parts: [&[u8]; 3] = [b"podvisor fs-serve: seccomp blocked syscall ", &digits[i..], b"\n"];
    for part in parts {
        // SAFETY: write(2) and _exit(2) are async-signal-safe; the buffers are valid.
        unsafe { libc::write(2, part.as_ptr().cast(), part.len()) };
    }
    // SAFETY: see above.
    unsafe { libc::_exit(SECCOMP_EXIT_CODE) };
}

fn install_sigsys_handler() -> Result<(), SeccompError> {
    // SAFETY: a zeroed sigaction is valid; handler, SA_SIGINFO and an empty mask are set.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = sigsys_handler as *const () as usize;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `action` is initialised and outlives the call.
    if unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) } != 0 {
        return Err(SeccompError::SigsysHandler(std::io::Error::last_os_error()));
    }
    Ok(())
}
