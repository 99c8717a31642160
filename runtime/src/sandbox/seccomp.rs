//! Seccomp filters for containers, as the OCI spec's `linux.seccomp`: the runtime's own
//! profile (RuntimeDefault) and profiles read from files on the node (Localhost).
//!
//! RuntimeDefault is an allowlist written here (in the spirit of moby's and containerd's
//! default profiles, not copied from them): every syscall not named fails with EPERM;
//! syscalls that need a capability are allowed only to containers that hold it; `clone`
//! cannot create namespaces and `clone3` answers ENOSYS (so libcs fall back to `clone`)
//! without CAP_SYS_ADMIN; `socket` cannot open AF_VSOCK, the guest's channel to the host.
//!
//! A Localhost profile is an OCI `LinuxSeccomp` or a docker/moby profile (`archMap`,
//! `includes`/`excludes` by capability, architecture and kernel version); the daemon reads it
//! and resolves it against the guest (x86_64, Linux 6.1) and the container's capabilities,
//! so the guest gets a plain OCI filter.

use std::io::Read;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{
    Arch, Capability, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompArgBuilder,
    LinuxSeccompBuilder, LinuxSeccompFilterFlag, LinuxSeccompOperator, LinuxSyscall,
    LinuxSyscallBuilder,
};
use serde::Deserialize;

/// A profile file larger than this is refused (moby's default profile is about 20 KiB).
pub const MAX_PROFILE_BYTES: u64 = 1 << 20;

/// The guest's architecture, as a profile's `archMap` and `includes.arches` name it.
const GUEST_ARCH: Arch = Arch::ScmpArchX86_64;
const GUEST_GO_ARCH: &str = "amd64";
/// The guest kernel's version (kernel-config/ builds Linux 6.1), for `minKernel` filters.
const GUEST_KERNEL: (u32, u32) = (6, 1);

const EPERM: u32 = libc::EPERM as u32;
const ENOSYS: u32 = libc::ENOSYS as u32;
/// `clone` flags that create namespaces (CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER,
/// NEWPID, NEWNET).
const CLONE_NAMESPACE_FLAGS: u64 = 0x7E02_0000;
const AF_VSOCK: u64 = libc::AF_VSOCK as u64;
/// `personality` values that only select the Linux personality (or query it).
const SAFE_PERSONALITIES: [u64; 5] = [0x0, 0x8, 0x20000, 0x20008, 0xffff_ffff];

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("seccomp profile {0:?} must be an absolute path")]
    RelativePath(PathBuf),
    #[error("opening seccomp profile {path:?}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("reading seccomp profile {path:?}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("seccomp profile {path:?} is not a regular file")]
    NotAFile { path: PathBuf },
    #[error("seccomp profile {path:?} is larger than {MAX_PROFILE_BYTES} bytes")]
    TooLarge { path: PathBuf },
    /// Only where parsing stopped, never serde's message: that quotes the file, and a CRI
    /// client may name any file on the node.
    #[error("seccomp profile {path:?} is not a valid seccomp profile ({what} at line {line}, column {column})")]
    Parse { path: PathBuf, what: &'static str, line: usize, column: usize },
    #[error("seccomp profile {path:?}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("building the seccomp filter: {0}")]
    Build(#[from] oci_spec::OciSpecError),
}

/// The runtime's default filter for a container holding `caps`.
pub fn runtime_default(caps: &[Capability]) -> Result<LinuxSeccomp, SeccompError> {
    let mut allowed: Vec<String> = ALLOWED.iter().map(|s| s.to_string()).collect();
    for (cap, names) in ALLOWED_WITH_CAPABILITY {
        if caps.contains(cap) {
            allowed.extend(names.iter().map(|s| s.to_string()));
        }
    }
    let sys_admin = caps.contains(&Capability::SysAdmin);
    if sys_admin {
        allowed.extend(["clone".to_string(), "clone3".to_string()]);
    }
    // A name in two capability groups (syslog, bpf) must not make two rules.
    allowed.sort_unstable();
    allowed.dedup();
    let mut syscalls = vec![rule(allowed, LinuxSeccompAction::ScmpActAllow, None, vec![])?];
    syscalls.extend(argument_rules(sys_admin)?);
    Ok(LinuxSeccompBuilder::default()
        .default_action(LinuxSeccompAction::ScmpActErrno)
        .default_errno_ret(EPERM)
        .architectures(vec![Arch::ScmpArchX86_64, Arch::ScmpArchX86, Arch::ScmpArchX32])
        .syscalls(syscalls)
        .build()?)
}

/// The rules of the default profile that look at arguments.
fn argument_rules(sys_admin: bool) -> Result<Vec<LinuxSyscall>, SeccompError> {
    let allow = LinuxSeccompAction::ScmpActAllow;
    let mut rules = Vec::new();
    for persona in SAFE_PERSONALITIES {
        rules.push(rule(
            vec!["personality".into()],
            allow,
            None,
            vec![arg(0, LinuxSeccompOperator::ScmpCmpEq, persona, None)?],
        )?);
    }
    rules.push(rule(
        vec!["socket".into()],
        allow,
        None,
        vec![arg(0, LinuxSeccompOperator::ScmpCmpNe, AF_VSOCK, None)?],
    )?);
    if !sys_admin {
        // OCI semantics: (flags & value) == valueTwo.
        rules.push(rule(
            vec!["clone".into()],
            allow,
            None,
            vec![arg(0, LinuxSeccompOperator::ScmpCmpMaskedEq, CLONE_NAMESPACE_FLAGS, Some(0))?],
        )?);
        rules.push(rule(
            vec!["clone3".into()],
            LinuxSeccompAction::ScmpActErrno,
            Some(ENOSYS),
            vec![],
        )?);
    }
    Ok(rules)
}

fn rule(
    names: Vec<String>,
    action: LinuxSeccompAction,
    errno: Option<u32>,
    args: Vec<LinuxSeccompArg>,
) -> Result<LinuxSyscall, SeccompError> {
    let mut builder = LinuxSyscallBuilder::default().names(names).action(action);
    if let Some(errno) = errno {
        builder = builder.errno_ret(errno);
    }
    if !args.is_empty() {
        builder = builder.args(args);
    }
    Ok(builder.build()?)
}

fn arg(
    index: usize,
    op: LinuxSeccompOperator,
    value: u64,
    value_two: Option<u64>,
) -> Result<LinuxSeccompArg, SeccompError> {
    let mut builder = LinuxSeccompArgBuilder::default().index(index).op(op).value(value);
    if let Some(two) = value_two {
        builder = builder.value_two(two);
    }
    Ok(builder.build()?)
}

/// Reads the profile file at `path` (at most [`MAX_PROFILE_BYTES`]) and resolves it for a
/// container holding `caps`.
pub fn load_localhost(path: &Path, caps: &[Capability]) -> Result<LinuxSeccomp, SeccompError> {
    let bytes = read_profile(path)?;
    let profile: ProfileFile = serde_json::from_slice(&bytes).map_err(|e| parse_error(path, &e))?;
    profile.resolve(caps).map_err(|reason| match reason {
        Resolve::Invalid(reason) => SeccompError::Invalid { path: path.to_path_buf(), reason },
        Resolve::Build(e) => SeccompError::Build(e),
    })
}

fn parse_error(path: &Path, e: &serde_json::Error) -> SeccompError {
    let what = match e.classify() {
        serde_json::error::Category::Io => "read error",
        serde_json::error::Category::Syntax => "not JSON",
        serde_json::error::Category::Data => "not a seccomp profile",
        serde_json::error::Category::Eof => "truncated JSON",
    };
    SeccompError::Parse { path: path.to_path_buf(), what, line: e.line(), column: e.column() }
}

fn read_profile(path: &Path) -> Result<Vec<u8>, SeccompError> {
    if !path.is_absolute() {
        return Err(SeccompError::RelativePath(path.to_path_buf()));
    }
    let file = std::fs::File::open(path)
        .map_err(|source| SeccompError::Open { path: path.to_path_buf(), source })?;
    let metadata = file
        .metadata()
        .map_err(|source| SeccompError::Read { path: path.to_path_buf(), source })?;
    if !metadata.is_file() {
        return Err(SeccompError::NotAFile { path: path.to_path_buf() });
    }
    let mut bytes = Vec::new();
    // The size is checked on what is read, not on metadata: the file may grow meanwhile.
    file.take(MAX_PROFILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| SeccompError::Read { path: path.to_path_buf(), source })?;
    if bytes.len() as u64 > MAX_PROFILE_BYTES {
        return Err(SeccompError::TooLarge { path: path.to_path_buf() });
    }
    Ok(bytes)
}

/// Why a parsed profile cannot become a filter.
enum Resolve {
    Invalid(String),
    Build(oci_spec::OciSpecError),
}

impl From<oci_spec::OciSpecError> for Resolve {
    fn from(e: oci_spec::OciSpecError) -> Self {
        Resolve::Build(e)
    }
}

/// A seccomp profile file: the OCI fields, plus docker's `archMap` and per-rule filters.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProfileFile {
    default_action: LinuxSeccompAction,
    #[serde(default)]
    default_errno_ret: Option<u32>,
    #[serde(default)]
    architectures: Option<Vec<Arch>>,
    #[serde(default)]
    arch_map: Option<Vec<ArchMapEntry>>,
    #[serde(default)]
    flags: Option<Vec<LinuxSeccompFilterFlag>>,
    #[serde(default)]
    listener_path: Option<String>,
    #[serde(default)]
    syscalls: Option<Vec<ProfileRule>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ArchMapEntry {
    architecture: Arch,
    #[serde(default)]
    sub_architectures: Option<Vec<Arch>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProfileRule {
    #[serde(default)]
    names: Option<Vec<String>>,
    /// docker's older single-name form.
    #[serde(default)]
    name: Option<String>,
    action: LinuxSeccompAction,
    #[serde(default)]
    errno_ret: Option<u32>,
    #[serde(default)]
    args: Option<Vec<LinuxSeccompArg>>,
    #[serde(default)]
    includes: Option<RuleFilter>,
    #[serde(default)]
    excludes: Option<RuleFilter>,
}

/// docker's condition on a rule: capabilities the container holds, architectures, a kernel
/// version.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RuleFilter {
    #[serde(default)]
    caps: Option<Vec<String>>,
    #[serde(default)]
    arches: Option<Vec<String>>,
    #[serde(default)]
    min_kernel: Option<String>,
}

impl ProfileFile {
    fn resolve(self, caps: &[Capability]) -> Result<LinuxSeccomp, Resolve> {
        self.check_supported()?;
        let mut builder = LinuxSeccompBuilder::default().default_action(self.default_action);
        if let Some(errno) = self.default_errno_ret {
            builder = builder.default_errno_ret(errno);
        }
        if let Some(architectures) = self.guest_architectures() {
            builder = builder.architectures(architectures);
        }
        if let Some(flags) = self.flags {
            builder = builder.flags(flags);
        }
        let mut syscalls = Vec::new();
        for (n, rule) in self.syscalls.into_iter().flatten().enumerate() {
            if let Some(syscall) = rule.resolve(n, caps)? {
                syscalls.push(syscall);
            }
        }
        Ok(builder.syscalls(syscalls).build()?)
    }

    /// Refuses what the guest cannot honour: SCMP_ACT_NOTIFY needs a seccomp agent, which
    /// the VM does not have.
    fn check_supported(&self) -> Result<(), Resolve> {
        if self.architectures.is_some() && self.arch_map.is_some() {
            return Err(Resolve::Invalid("use either architectures or archMap, not both".into()));
        }
        let notify = self.default_action == LinuxSeccompAction::ScmpActNotify
            || self
                .syscalls
                .iter()
                .flatten()
                .any(|r| r.action == LinuxSeccompAction::ScmpActNotify);
        if notify || self.listener_path.as_deref().is_some_and(|p| !p.is_empty()) {
            return Err(Resolve::Invalid(
                "SCMP_ACT_NOTIFY and listenerPath are not supported (no seccomp agent in the VM)"
                    .into(),
            ));
        }
        Ok(())
    }

    /// The architectures to filter: `architectures` as given, or the guest's entry of
    /// `archMap` with its sub-architectures.
    fn guest_architectures(&self) -> Option<Vec<Arch>> {
        if let Some(architectures) = &self.architectures {
            return Some(architectures.clone());
        }
        let entry = self.arch_map.iter().flatten().find(|e| e.architecture == GUEST_ARCH)?;
        let mut arches = vec![entry.architecture];
        arches.extend(entry.sub_architectures.iter().flatten().copied());
        Some(arches)
    }
}

impl ProfileRule {
    /// The rule as an OCI syscall rule, or None when its filters leave it out for this
    /// container.
    fn resolve(self, n: usize, caps: &[Capability]) -> Result<Option<LinuxSyscall>, Resolve> {
        let names = match (self.names, self.name) {
            (Some(_), Some(_)) => {
                return Err(Resolve::Invalid(format!("syscalls[{n}] has both name and names")))
            }
            (Some(names), None) if !names.is_empty() => names,
            (None, Some(name)) if !name.is_empty() => vec![name],
            _ => return Err(Resolve::Invalid(format!("syscalls[{n}] names no syscall"))),
        };
        let included = match &self.includes {
            Some(filter) => filter.all_hold(n, caps)?,
            None => true,
        };
        let excluded = match &self.excludes {
            Some(filter) => filter.any_holds(n, caps)?,
            None => false,
        };
        if !included || excluded {
            return Ok(None);
        }
        let mut builder = LinuxSyscallBuilder::default().names(names).action(self.action);
        if let Some(errno) = self.errno_ret {
            builder = builder.errno_ret(errno);
        }
        if let Some(args) = self.args.filter(|a| !a.is_empty()) {
            builder = builder.args(args);
        }
        Ok(Some(builder.build()?))
    }
}

impl RuleFilter {
    /// `includes`: every condition given holds.
    fn all_hold(&self, n: usize, caps: &[Capability]) -> Result<bool, Resolve> {
        let caps_hold = match &self.caps {
            Some(names) => {
                let wanted = parse_caps(n, names)?;
                wanted.iter().all(|c| caps.contains(c))
            }
            None => true,
        };
        let arch_holds = self.arches.as_ref().is_none_or(|a| a.iter().any(|a| a == GUEST_GO_ARCH));
        let kernel_holds = match &self.min_kernel {
            Some(version) => parse_kernel(n, version)? <= GUEST_KERNEL,
            None => true,
        };
        Ok(caps_hold && arch_holds && kernel_holds)
    }

    /// `excludes`: any condition given holds.
    fn any_holds(&self, n: usize, caps: &[Capability]) -> Result<bool, Resolve> {
        let caps_hold = match &self.caps {
            Some(names) => parse_caps(n, names)?.iter().any(|c| caps.contains(c)),
            None => false,
        };
        let arch_holds = self.arches.as_ref().is_some_and(|a| a.iter().any(|a| a == GUEST_GO_ARCH));
        let kernel_holds = match &self.min_kernel {
            Some(version) => parse_kernel(n, version)? <= GUEST_KERNEL,
            None => false,
        };
        Ok(caps_hold || arch_holds || kernel_holds)
    }
}

fn parse_caps(n: usize, names: &[String]) -> Result<Vec<Capability>, Resolve> {
    names
        .iter()
        .map(|name| {
            serde_json::from_value(serde_json::Value::String(name.clone())).map_err(|_| {
                Resolve::Invalid(format!("syscalls[{n}]: unknown capability {name:?}"))
            })
        })
        .collect()
}

/// `"5.8"` → (5, 8).
fn parse_kernel(n: usize, version: &str) -> Result<(u32, u32), Resolve> {
    let bad = || Resolve::Invalid(format!("syscalls[{n}]: bad minKernel {version:?}"));
    let (major, minor) = version.split_once('.').ok_or_else(bad)?;
    Ok((major.parse().map_err(|_| bad())?, minor.parse().map_err(|_| bad())?))
}

/// Syscalls every container may make (x86_64 names, up to Linux 6.1). Left out, among
/// others: keyrings (keyctl, add_key, request_key), io_uring, userfaultfd, kexec, swapon/off,
/// BPF and perf without their capabilities, the obsolete ones (uselib, sysfs, ustat, ...).
const ALLOWED: &[&str] = &[
    "accept",
    "accept4",
    "access",
    "adjtimex",
    "alarm",
    "arch_prctl",
    "bind",
    "brk",
    "capget",
    "capset",
    "chdir",
    "chmod",
    "chown",
    "clock_adjtime",
    "clock_getres",
    "clock_gettime",
    "clock_nanosleep",
    "close",
    "close_range",
    "connect",
    "copy_file_range",
    "creat",
    "dup",
    "dup2",
    "dup3",
    "epoll_create",
    "epoll_create1",
    "epoll_ctl",
    "epoll_pwait",
    "epoll_pwait2",
    "epoll_wait",
    "eventfd",
    "eventfd2",
    "execve",
    "execveat",
    "exit",
    "exit_group",
    "faccessat",
    "faccessat2",
    "fadvise64",
    "fallocate",
    "fanotify_mark",
    "fchdir",
    "fchmod",
    "fchmodat",
    "fchown",
    "fchownat",
    "fcntl",
    "fdatasync",
    "fgetxattr",
    "flistxattr",
    "flock",
    "fork",
    "fremovexattr",
    "fsetxattr",
    "fstat",
    "fstatfs",
    "fsync",
    "ftruncate",
    "futex",
    "futex_waitv",
    "futimesat",
    "getcpu",
    "getcwd",
    "getdents",
    "getdents64",
    "getegid",
    "geteuid",
    "getgid",
    "getgroups",
    "getitimer",
    "getpeername",
    "getpgid",
    "getpgrp",
    "getpid",
    "getppid",
    "getpriority",
    "getrandom",
    "getresgid",
    "getresuid",
    "getrlimit",
    "get_robust_list",
    "getrusage",
    "getsid",
    "getsockname",
    "getsockopt",
    "get_thread_area",
    "gettid",
    "gettimeofday",
    "getuid",
    "getxattr",
    "inotify_add_watch",
    "inotify_init",
    "inotify_init1",
    "inotify_rm_watch",
    "io_cancel",
    "ioctl",
    "io_destroy",
    "io_getevents",
    "io_pgetevents",
    "ioprio_get",
    "ioprio_set",
    "io_setup",
    "io_submit",
    "kill",
    "landlock_add_rule",
    "landlock_create_ruleset",
    "landlock_restrict_self",
    "lchown",
    "lgetxattr",
    "link",
    "linkat",
    "listen",
    "listxattr",
    "llistxattr",
    "lremovexattr",
    "lseek",
    "lsetxattr",
    "lstat",
    "madvise",
    "membarrier",
    "memfd_create",
    "memfd_secret",
    "mincore",
    "mkdir",
    "mkdirat",
    "mknod",
    "mknodat",
    "mlock",
    "mlock2",
    "mlockall",
    "mmap",
    "mprotect",
    "mq_getsetattr",
    "mq_notify",
    "mq_open",
    "mq_timedreceive",
    "mq_timedsend",
    "mq_unlink",
    "mremap",
    "msgctl",
    "msgget",
    "msgrcv",
    "msgsnd",
    "msync",
    "munlock",
    "munlockall",
    "munmap",
    "name_to_handle_at",
    "nanosleep",
    "newfstatat",
    "open",
    "openat",
    "openat2",
    "pause",
    "pidfd_open",
    "pidfd_send_signal",
    "pipe",
    "pipe2",
    "pkey_alloc",
    "pkey_free",
    "pkey_mprotect",
    "poll",
    "ppoll",
    "prctl",
    "pread64",
    "preadv",
    "preadv2",
    "prlimit64",
    "process_mrelease",
    "pselect6",
    "ptrace",
    "pwrite64",
    "pwritev",
    "pwritev2",
    "read",
    "readahead",
    "readlink",
    "readlinkat",
    "readv",
    "recvfrom",
    "recvmmsg",
    "recvmsg",
    "remap_file_pages",
    "removexattr",
    "rename",
    "renameat",
    "renameat2",
    "restart_syscall",
    "rmdir",
    "rseq",
    "rt_sigaction",
    "rt_sigpending",
    "rt_sigprocmask",
    "rt_sigqueueinfo",
    "rt_sigreturn",
    "rt_sigsuspend",
    "rt_sigtimedwait",
    "rt_tgsigqueueinfo",
    "sched_getaffinity",
    "sched_getattr",
    "sched_getparam",
    "sched_get_priority_max",
    "sched_get_priority_min",
    "sched_getscheduler",
    "sched_rr_get_interval",
    "sched_setaffinity",
    "sched_setattr",
    "sched_setparam",
    "sched_setscheduler",
    "sched_yield",
    "seccomp",
    "select",
    "semctl",
    "semget",
    "semop",
    "semtimedop",
    "sendfile",
    "sendmmsg",
    "sendmsg",
    "sendto",
    "setfsgid",
    "setfsuid",
    "setgid",
    "setgroups",
    "setitimer",
    "setpgid",
    "setpriority",
    "setregid",
    "setresgid",
    "setresuid",
    "setreuid",
    "setrlimit",
    "set_robust_list",
    "setsid",
    "setsockopt",
    "set_thread_area",
    "set_tid_address",
    "setuid",
    "setxattr",
    "shmat",
    "shmctl",
    "shmdt",
    "shmget",
    "shutdown",
    "sigaltstack",
    "signalfd",
    "signalfd4",
    "socketpair",
    "splice",
    "stat",
    "statfs",
    "statx",
    "symlink",
    "symlinkat",
    "sync",
    "sync_file_range",
    "syncfs",
    "sysinfo",
    "tee",
    "tgkill",
    "time",
    "timer_create",
    "timer_delete",
    "timer_getoverrun",
    "timer_gettime",
    "timer_settime",
    "timerfd_create",
    "timerfd_gettime",
    "timerfd_settime",
    "times",
    "tkill",
    "truncate",
    "umask",
    "uname",
    "unlink",
    "unlinkat",
    "utime",
    "utimensat",
    "utimes",
    "vfork",
    "vmsplice",
    "wait4",
    "waitid",
    "write",
    "writev",
];

/// Syscalls allowed only to a container holding the capability (the kernel checks the
/// capability too; the filter keeps the code paths away from everyone else).
const ALLOWED_WITH_CAPABILITY: &[(Capability, &[&str])] = &[
    (
        Capability::SysAdmin,
        &[
            "bpf",
            "fanotify_init",
            "fsconfig",
            "fsmount",
            "fsopen",
            "fspick",
            "lookup_dcookie",
            "mount",
            "mount_setattr",
            "move_mount",
            "open_tree",
            "perf_event_open",
            "quotactl",
            "quotactl_fd",
            "setdomainname",
            "sethostname",
            "setns",
            "syslog",
            "umount2",
            "unshare",
        ],
    ),
    (Capability::SysBoot, &["reboot"]),
    (Capability::SysChroot, &["chroot"]),
    (Capability::SysModule, &["delete_module", "finit_module", "init_module"]),
    (Capability::SysPacct, &["acct"]),
    (
        Capability::SysPtrace,
        &["kcmp", "pidfd_getfd", "process_madvise", "process_vm_readv", "process_vm_writev"],
    ),
    (Capability::SysRawio, &["ioperm", "iopl"]),
    (Capability::SysTime, &["clock_settime", "settimeofday"]),
    (Capability::SysTtyConfig, &["vhangup"]),
    (
        Capability::SysNice,
        &["get_mempolicy", "mbind", "migrate_pages", "move_pages", "set_mempolicy"],
    ),
    (Capability::Syslog, &["syslog"]),
    (Capability::Bpf, &["bpf"]),
    (Capability::Perfmon, &["perf_event_open"]),
    (Capability::DacReadSearch, &["open_by_handle_at"]),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed_names(filter: &LinuxSeccomp) -> Vec<String> {
        filter
            .syscalls()
            .iter()
            .flatten()
            .filter(|r| r.action() == LinuxSeccompAction::ScmpActAllow && r.args().is_none())
            .flat_map(|r| r.names().clone())
            .collect()
    }

    #[test]
    fn the_default_profile_follows_capabilities() {
        let plain = runtime_default(&[Capability::Chown]).unwrap();
        assert_eq!(plain.default_action(), LinuxSeccompAction::ScmpActErrno);
        assert_eq!(plain.default_errno_ret(), Some(EPERM));
        let names = allowed_names(&plain);
        for needed in ["execve", "read", "write", "wait4", "capset", "prctl"] {
            assert!(names.iter().any(|n| n == needed), "{needed}");
        }
        for blocked in ["unshare", "mount", "sethostname", "keyctl", "clone", "reboot"] {
            assert!(!names.iter().any(|n| n == blocked), "{blocked}");
        }
        let rules = plain.syscalls().clone().unwrap();
        let clone = rules.iter().find(|r| r.names() == &["clone"]).unwrap();
        let args = clone.args().clone().unwrap();
        assert_eq!(args[0].op(), LinuxSeccompOperator::ScmpCmpMaskedEq);
        assert_eq!((args[0].value(), args[0].value_two()), (CLONE_NAMESPACE_FLAGS, Some(0)));
        let clone3 = rules.iter().find(|r| r.names() == &["clone3"]).unwrap();
        assert_eq!(clone3.errno_ret(), Some(ENOSYS));
        let socket = rules.iter().find(|r| r.names() == &["socket"]).unwrap();
        assert_eq!(socket.args().clone().unwrap()[0].value(), AF_VSOCK);

        let admin = runtime_default(&[Capability::SysAdmin, Capability::SysBoot]).unwrap();
        let names = allowed_names(&admin);
        for now_allowed in ["unshare", "mount", "sethostname", "clone", "clone3", "reboot"] {
            assert!(names.iter().any(|n| n == now_allowed), "{now_allowed}");
        }
        assert!(!admin
            .syscalls()
            .iter()
            .flatten()
            .any(|r| r.names() == &["clone3"] && r.action() == LinuxSeccompAction::ScmpActErrno));
    }

    #[test]
    fn the_default_profile_has_no_duplicates() {
        let mut names: Vec<&str> = ALLOWED.to_vec();
        names.sort_unstable();
        let before = names.len();
        names.dedup();
        assert_eq!(before, names.len());
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn an_oci_profile_loads_as_given() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "p.json",
            r#"{"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64"],
                "syscalls": [{"names": ["sethostname"], "action": "SCMP_ACT_ERRNO",
                              "errnoRet": 95}]}"#,
        );
        let filter = load_localhost(&path, &[]).unwrap();
        assert_eq!(filter.default_action(), LinuxSeccompAction::ScmpActAllow);
        assert_eq!(filter.architectures().clone().unwrap(), vec![Arch::ScmpArchX86_64]);
        let rules = filter.syscalls().clone().unwrap();
        assert_eq!(rules.len(), 1);
        assert_eq!((rules[0].names()[0].as_str(), rules[0].errno_ret()), ("sethostname", Some(95)));
    }

    #[test]
    fn a_docker_profile_is_resolved_for_the_guest_and_the_container() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "docker.json",
            r#"{
              "defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 1,
              "archMap": [
                {"architecture": "SCMP_ARCH_X86_64",
                 "subArchitectures": ["SCMP_ARCH_X86", "SCMP_ARCH_X32"]},
                {"architecture": "SCMP_ARCH_AARCH64", "subArchitectures": ["SCMP_ARCH_ARM"]}
              ],
              "syscalls": [
                {"names": ["read", "write"], "action": "SCMP_ACT_ALLOW", "comment": "basics"},
                {"name": "getpid", "action": "SCMP_ACT_ALLOW"},
                {"names": ["mount"], "action": "SCMP_ACT_ALLOW",
                 "includes": {"caps": ["CAP_SYS_ADMIN"]}},
                {"names": ["arm_fadvise64_64"], "action": "SCMP_ACT_ALLOW",
                 "includes": {"arches": ["arm", "arm64"]}},
                {"names": ["ptrace"], "action": "SCMP_ACT_ALLOW",
                 "includes": {"minKernel": "4.8"}},
                {"names": ["futuristic"], "action": "SCMP_ACT_ALLOW",
                 "includes": {"minKernel": "9.0"}},
                {"names": ["clone"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 0, "value": 2114060288, "op": "SCMP_CMP_MASKED_EQ"}],
                 "excludes": {"caps": ["CAP_SYS_ADMIN"]}}
              ]
            }"#,
        );
        let names = |f: &LinuxSeccomp| -> Vec<String> {
            f.syscalls().iter().flatten().flat_map(|r| r.names().clone()).collect()
        };
        let plain = load_localhost(&path, &[Capability::Chown]).unwrap();
        assert_eq!(
            plain.architectures().clone().unwrap(),
            vec![Arch::ScmpArchX86_64, Arch::ScmpArchX86, Arch::ScmpArchX32]
        );
        assert_eq!(names(&plain), vec!["read", "write", "getpid", "ptrace", "clone"]);
        let admin = load_localhost(&path, &[Capability::SysAdmin]).unwrap();
        assert_eq!(names(&admin), vec!["read", "write", "getpid", "mount", "ptrace"]);
    }

    #[test]
    fn bad_profiles_are_refused_with_their_reason() {
        let dir = tempfile::tempdir().unwrap();
        let relative = load_localhost(Path::new("profiles/p.json"), &[]);
        assert!(matches!(relative, Err(SeccompError::RelativePath(_))));
        let missing = load_localhost(&dir.path().join("missing.json"), &[]);
        assert!(matches!(missing, Err(SeccompError::Open { .. })));
        assert!(matches!(load_localhost(dir.path(), &[]), Err(SeccompError::NotAFile { .. })));
        let big = write(dir.path(), "big.json", &" ".repeat(MAX_PROFILE_BYTES as usize + 1));
        assert!(matches!(load_localhost(&big, &[]), Err(SeccompError::TooLarge { .. })));
        for (name, text) in [
            ("garbage.json", "{not json"),
            ("no-default.json", r#"{"syscalls": []}"#),
            ("bad-action.json", r#"{"defaultAction": "SCMP_ACT_MAYBE"}"#),
            (
                "bad-arch.json",
                r#"{"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_Z80"]}"#,
            ),
        ] {
            let path = write(dir.path(), name, text);
            assert!(
                matches!(load_localhost(&path, &[]), Err(SeccompError::Parse { .. })),
                "{name}"
            );
        }
        // A file that is not a profile: the error must not quote it.
        let secret = write(dir.path(), "token.json", r#"{"defaultAction": "s3cr3t-token"}"#);
        let err = load_localhost(&secret, &[]).unwrap_err().to_string();
        assert!(!err.contains("s3cr3t"), "{err}");
        assert!(err.contains("not a seccomp profile at line 1"), "{err}");
        for (name, text) in [
            (
                "notify.json",
                r#"{"defaultAction": "SCMP_ACT_ALLOW",
                    "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_NOTIFY"}]}"#,
            ),
            (
                "both.json",
                r#"{"defaultAction": "SCMP_ACT_ALLOW", "architectures": [],
                    "archMap": []}"#,
            ),
            (
                "nameless.json",
                r#"{"defaultAction": "SCMP_ACT_ALLOW",
                    "syscalls": [{"action": "SCMP_ACT_ERRNO"}]}"#,
            ),
            (
                "bad-cap.json",
                r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["mount"],
                    "action": "SCMP_ACT_ERRNO", "includes": {"caps": ["CAP_MAGIC"]}}]}"#,
            ),
            (
                "bad-kernel.json",
                r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["mount"],
                    "action": "SCMP_ACT_ERRNO", "includes": {"minKernel": "six"}}]}"#,
            ),
        ] {
            let path = write(dir.path(), name, text);
            let err = load_localhost(&path, &[]).unwrap_err();
            assert!(matches!(err, SeccompError::Invalid { .. }), "{name}: {err}");
        }
    }
}
