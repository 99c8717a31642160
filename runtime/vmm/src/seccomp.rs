//! Per-thread seccomp allowlists (seccompiler), installed before any guest code runs:
//! - vCPU threads: KVM_RUN and what devices do on a guest MMIO/PIO access (file and socket
//!   I/O on already open fds, eventfd writes, memory management, vsock connects to the host);
//! - the VMM thread (event loop): the same plus accepting control connections, opening drive
//!   files for swap, connecting to guest-initiated vsock sockets, and thread management.
//!
//! Everything else hits the mismatch action: by default SIGSYS, whose handler prints the
//! syscall number and exits with [`SECCOMP_EXIT_CODE`].
//!
//! Three syscalls are allowed only with certain arguments ([`argument_rules`]): `socket` only
//! for `AF_UNIX` (so `connect`, whose address is a pointer a filter cannot read, can only
//! reach unix sockets: the VMM holds no other socket), and `ioctl` only with the requests the
//! running VMM makes (`KVM_RUN`, interrupt and eventfd wiring, `FIONBIO`, the tap's offload
//! settings, `TCGETS`, and the `KVM_GET_*` state reads of a snapshot). Everything set up before the filter (VM creation, memory regions,
//! registers, CPUID) is not among them.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

const KVMIO: u32 = 0xAE;
ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
ioctl_iow_nr!(KVM_IRQ_LINE, KVMIO, 0x61, kvm_bindings::kvm_irq_level);
ioctl_iow_nr!(KVM_IRQFD, KVMIO, 0x76, kvm_bindings::kvm_irqfd);
ioctl_iow_nr!(KVM_IOEVENTFD, KVMIO, 0x79, kvm_bindings::kvm_ioeventfd);
// What a snapshot of the running VM reads (see `snapshot::kvm_state`); nothing sets state
// after the filter is in place (a restore does that before).
ioctl_io_nr!(KVM_CHECK_EXTENSION, KVMIO, 0x03);
ioctl_iowr_nr!(KVM_GET_MSR_INDEX_LIST, KVMIO, 0x02, kvm_bindings::kvm_msr_list);
ioctl_iowr_nr!(KVM_GET_IRQCHIP, KVMIO, 0x62, kvm_bindings::kvm_irqchip);
ioctl_ior_nr!(KVM_GET_CLOCK, KVMIO, 0x7c, kvm_bindings::kvm_clock_data);
ioctl_ior_nr!(KVM_GET_PIT2, KVMIO, 0x9f, kvm_bindings::kvm_pit_state2);
ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_bindings::kvm_regs);
ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_bindings::kvm_sregs);
ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_bindings::kvm_msrs);
ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_bindings::kvm_lapic_state);
ioctl_iowr_nr!(KVM_GET_CPUID2, KVMIO, 0x91, kvm_bindings::kvm_cpuid2);
ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_bindings::kvm_mp_state);
ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_bindings::kvm_vcpu_events);
ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_bindings::kvm_debugregs);
ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_bindings::kvm_xsave);
ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_bindings::kvm_xcrs);

/// The ioctl requests a running VMM makes: the vCPU loop, interrupt/eventfd wiring done at
/// device activation, std's `set_nonblocking` on vsock streams, tty checks by the logger, and
/// the tap's offload and header size.
fn allowed_ioctls() -> [u64; 24] {
    [
        KVM_RUN(),
        KVM_IRQ_LINE(),
        KVM_IRQFD(),
        KVM_IOEVENTFD(),
        libc::FIONBIO,
        libc::FIOCLEX,
        libc::TCGETS,
        0x4004_54d0, // TUNSETOFFLOAD
        0x4004_54d8, // TUNSETVNETHDRSZ
        KVM_CHECK_EXTENSION(),
        KVM_GET_MSR_INDEX_LIST(),
        KVM_GET_IRQCHIP(),
        KVM_GET_CLOCK(),
        KVM_GET_PIT2(),
        KVM_GET_REGS(),
        KVM_GET_SREGS(),
        KVM_GET_MSRS(),
        KVM_GET_LAPIC(),
        KVM_GET_CPUID2(),
        KVM_GET_MP_STATE(),
        KVM_GET_VCPU_EVENTS(),
        KVM_GET_DEBUGREGS(),
        KVM_GET_XSAVE(),
        KVM_GET_XCRS(),
    ]
}

use crate::config::SeccompMode;

/// Exit code of a VMM killed by its seccomp filter (as Firecracker's).
pub const SECCOMP_EXIT_CODE: i32 = 148;

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("building the {thread} seccomp filter: {source}")]
    Build { thread: &'static str, source: seccompiler::BackendError },
    #[error("installing the SIGSYS handler: {0}")]
    SigsysHandler(std::io::Error),
}

/// Syscalls every VMM thread needs once running.
const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_lseek,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    // The serial console (on the vCPU thread) cuts its capped log back.
    libc::SYS_ftruncate,
    // ioctl: only the requests of `allowed_ioctls` (see `argument_rules`).
    libc::SYS_ioctl,
    libc::SYS_close,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_fcntl,
    libc::SYS_dup,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_clock_gettime,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_tgkill,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_getrandom,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_shutdown,
    // The vsock muxer connects to `<uds>_<port>` when the guest opens a connection (on the
    // vCPU thread that kicked the tx queue); vhost-user activation creates eventfds.
    // socket: AF_UNIX only (see `argument_rules`).
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_eventfd2,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// Additional syscalls of the VMM (event-loop) thread.
const VMM_THREAD: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_accept,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_socketpair,
    libc::SYS_openat,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_epoll_create1,
    libc::SYS_pipe2,
    libc::SYS_dup3,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_sched_getaffinity,
    libc::SYS_prctl,
    libc::SYS_rt_sigaction,
    libc::SYS_memfd_create,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_wait4,
    // A snapshot (control socket `snapshot`) creates its directory.
    libc::SYS_mkdir,
];

/// One rule: argument `index` (its low 32 bits, as the kernel reads an `int` or ioctl's
/// `unsigned int cmd`) equals `value`.
fn arg_equals(index: u8, value: u64) -> Result<SeccompRule, seccompiler::BackendError> {
    let condition = SeccompCondition::new(index, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)?;
    SeccompRule::new(vec![condition])
}

/// The argument filters of `syscall` (any rule matching allows it), or none: unrestricted.
fn argument_rules(syscall: i64) -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    match syscall {
        libc::SYS_socket => Ok(vec![arg_equals(0, libc::AF_UNIX as u64)?]),
        libc::SYS_ioctl => allowed_ioctls().iter().map(|&request| arg_equals(1, request)).collect(),
        _ => Ok(Vec::new()),
    }
}

fn build(
    thread: &'static str,
    syscalls: impl Iterator<Item = i64>,
    mismatch: SeccompAction,
) -> Result<BpfProgram, SeccompError> {
    let rules: BTreeMap<i64, Vec<SeccompRule>> = syscalls
        .map(|nr| argument_rules(nr).map(|rules| (nr, rules)))
        .collect::<Result<_, _>>()
        .map_err(|source| SeccompError::Build { thread, source })?;
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|source| SeccompError::Build { thread, source })?;
    BpfProgram::try_from(filter).map_err(|source| SeccompError::Build { thread, source })
}

/// The (vCPU, VMM thread) filters for `mode`; `None` for [`SeccompMode::Off`].
pub fn filters(mode: SeccompMode) -> Result<Option<(BpfProgram, BpfProgram)>, SeccompError> {
    let mismatch = match mode {
        SeccompMode::Off => return Ok(None),
        SeccompMode::Trap => {
            install_sigsys_handler()?;
            SeccompAction::Trap
        }
        SeccompMode::Kill => SeccompAction::KillProcess,
        SeccompMode::Log => SeccompAction::Log,
    };
    let vcpu = build("vCPU", COMMON.iter().copied(), mismatch.clone())?;
    let vmm = build("VMM", COMMON.iter().chain(VMM_THREAD).copied(), mismatch)?;
    Ok(Some((vcpu, vmm)))
}

/// Formats `n` in decimal into `buf`, returning the used tail (async-signal-safe).
fn format_decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 || i == 0 {
            break;
        }
    }
    &buf[i..]
}

extern "C" fn sigsys_handler(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // siginfo for SIGSYS: si_signo, si_errno, si_code (+ padding) = 16 bytes, then
    // _sigsys { void *_call_addr; int _syscall; unsigned _arch; }.
    // SAFETY: the kernel passes a valid siginfo_t for an SA_SIGINFO handler; offset 24 is
    // inside it (siginfo_t is 128 bytes) and holds the syscall number for SIGSYS.
    let nr = unsafe { *(info as *const u8).add(24).cast::<i32>() };
    let mut digits = [0u8; 20];
    let digits = format_decimal(nr.max(0) as u64, &mut digits);
    let parts: [&[u8]; 3] = [b"podvisor-vmm: seccomp blocked syscall ", digits, b"; exiting\n"];
    for part in parts {
        // SAFETY: write(2) and _exit(2) are async-signal-safe; the buffers are valid.
        unsafe { libc::write(2, part.as_ptr().cast(), part.len()) };
    }
    // SAFETY: see above.
    unsafe { libc::_exit(SECCOMP_EXIT_CODE) };
}

fn install_sigsys_handler() -> Result<(), SeccompError> {
    // SAFETY: a zeroed sigaction is valid; we set the handler, SA_SIGINFO and an empty mask.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = sigsys_handler as *const () as usize;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `action` is initialised above and outlives the call.
    let rc = unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(SeccompError::SigsysHandler(std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_compile_for_every_mode() {
        assert!(filters(SeccompMode::Off).unwrap().is_none());
        for mode in [SeccompMode::Kill, SeccompMode::Log] {
            let (vcpu, vmm) = filters(mode).unwrap().unwrap();
            assert!(!vcpu.is_empty() && vmm.len() > vcpu.len());
        }
    }

    #[test]
    fn decimal_formatting() {
        let mut buf = [0u8; 20];
        assert_eq!(format_decimal(0, &mut buf), b"0");
        assert_eq!(format_decimal(318, &mut buf), b"318");
        assert_eq!(format_decimal(u64::MAX, &mut buf), b"18446744073709551615");
    }

    /// Runs `call` in a forked child under the vCPU filter (trap mode): its exit code, or
    /// [`SECCOMP_EXIT_CODE`] if the filter stopped it.
    fn exit_code_under_vcpu_filter(call: fn() -> bool) -> i32 {
        let (vcpu, _) = filters(SeccompMode::Trap).unwrap().unwrap();
        // SAFETY: the child only installs the filter and makes raw syscalls before _exit.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let code = if seccompiler::apply_filter(&vcpu).is_ok() && call() { 0 } else { 1 };
            // SAFETY: terminating the forked child.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status));
        libc::WEXITSTATUS(status)
    }

    /// Only AF_UNIX sockets, and only the VMM's ioctl requests, pass the filter.
    #[test]
    fn socket_families_and_ioctl_requests_are_filtered_by_argument() {
        // SAFETY: a raw syscall with integer arguments (pointers to locals) in the child.
        let unix_socket = || unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) >= 0 };
        assert_eq!(exit_code_under_vcpu_filter(unix_socket), 0);
        // SAFETY: a raw syscall with integer arguments (pointers to locals) in the child.
        let inet_socket = || unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) >= 0 };
        assert_eq!(exit_code_under_vcpu_filter(inet_socket), SECCOMP_EXIT_CODE);
        // SAFETY: a raw syscall with integer arguments (pointers to locals) in the child.
        let vsock_socket = || unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM, 0) >= 0 };
        assert_eq!(exit_code_under_vcpu_filter(vsock_socket), SECCOMP_EXIT_CODE);
        // FIONBIO (std's set_nonblocking) is allowed; on stdin it may fail, it is not trapped.
        // SAFETY: a raw syscall with integer arguments (pointers to locals) in the child.
        let fionbio = || unsafe {
            let mut on: libc::c_int = 1;
            libc::ioctl(0, libc::FIONBIO, &mut on);
            true
        };
        assert_eq!(exit_code_under_vcpu_filter(fionbio), 0);
        // KVM_CREATE_VM (_IO(0xAE, 0x01)) and TIOCSTI are not: the running VMM makes neither.
        // SAFETY: a raw syscall with integer arguments (pointers to locals) in the child.
        let create_vm = || unsafe {
            libc::ioctl(0, 0xAE01);
            true
        };
        assert_eq!(exit_code_under_vcpu_filter(create_vm), SECCOMP_EXIT_CODE);
        // SAFETY: a raw syscall with integer arguments (pointers to locals) in the child.
        let tiocsti = || unsafe {
            let c = b'x';
            libc::ioctl(0, libc::TIOCSTI, &c);
            true
        };
        assert_eq!(exit_code_under_vcpu_filter(tiocsti), SECCOMP_EXIT_CODE);
    }

    #[test]
    fn allowed_ioctl_numbers_are_the_kernels() {
        assert_eq!(KVM_RUN(), 0xAE80);
        assert_eq!(KVM_IRQ_LINE(), 0x4008_AE61);
        assert_eq!(KVM_IRQFD(), 0x4020_AE76);
        assert_eq!(KVM_IOEVENTFD(), 0x4040_AE79);
        assert_eq!(KVM_GET_REGS(), 0x8090_AE81);
        assert_eq!(KVM_GET_SREGS(), 0x8138_AE83);
        assert_eq!(KVM_GET_XSAVE(), 0x9000_AEA4);
        assert_eq!(KVM_GET_CLOCK(), 0x8030_AE7C);
    }

    #[test]
    fn a_blocked_syscall_kills_only_the_filtered_process() {
        // Build before forking (the child of a threaded process must not allocate), and fork
        // so that the filter never applies to the test process.
        let (vcpu, _) = filters(SeccompMode::Trap).unwrap().unwrap();
        // SAFETY: the child only installs the filter and calls raw syscalls before _exit.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            if seccompiler::apply_filter(&vcpu).is_ok() {
                // SAFETY: getppid has no preconditions; it is not in the vCPU allowlist.
                unsafe { libc::getppid() };
            }
            // SAFETY: terminating the forked child.
            unsafe { libc::_exit(2) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status));
        assert_eq!(libc::WEXITSTATUS(status), SECCOMP_EXIT_CODE);
    }
}
