//! Confinement of QEMU's processes, as the built-in VMM's jail confines it: each runs as its
//! pod's own unprivileged uid (= gid, from the same allocator as the built-in VMM's, see
//! [`super::builtin::JailIds`]), with no capabilities and `no_new_privs`, in an empty network
//! namespace, in a mount namespace whose root is an empty read-only tmpfs holding only what it
//! needs (its run directory, the system's libraries, the kernel and initramfs, a few device
//! nodes), and under a seccomp deny-list of what no VM helper ever needs (mounts, namespaces,
//! ptrace, module and kexec loading, bpf, keyrings, io_uring, ...).
//!
//! The daemon starts such a process as `podvisor jail-exec --ids U:G --root R [--bind P]...
//! -- PROGRAM ARGS`: the launcher (root, single-threaded) opens PROGRAM, enters the jail
//! ([`podvisor_vmm::jail::enter`]), installs the filter and executes PROGRAM from the open
//! descriptor, so the pid the daemon records is the helper's and PROGRAM itself need not be
//! visible in the jail. Descriptors the helper inherits (QEMU's tap and console pipe) stay open
//! across both steps.
//!
//! virtiofsd is not run this way: it serves files of many owners, which takes capabilities
//! (see [`super::process::virtiofsd_args`]).

use std::convert::Infallible;
use std::ffi::{CString, OsStr, OsString};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use podvisor_vmm::jail::{self, JailError, JailSpec};

/// The subcommand of this binary that runs a program jailed.
pub const LAUNCHER_SUBCOMMAND: &str = "jail-exec";

/// Where the system's shared libraries and data live: dynamically linked helpers (QEMU and its
/// firmware in `/usr/share`, vhost-device-vsock) need them, read-only to the helper's uid.
const SYSTEM_DIRS: &[&str] = &["/usr", "/lib", "/lib64"];

/// Device nodes every helper may open (glib and QEMU read random bytes, redirect to null).
const DEVICE_NODES: &[&str] = &["/dev/null", "/dev/urandom"];

/// Syscalls no VM helper makes once jailed; they fail with EPERM. A deny-list, not an
/// allowlist: the helpers are third-party programs whose syscalls change between releases
/// (QEMU adds its own `-sandbox` allowlist on top).
const DENIED_SYSCALLS: &[i64] = &[
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_userfaultfd,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_reboot,
    libc::SYS_acct,
    libc::SYS_quotactl,
    libc::SYS_fsopen,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
];

#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    #[error("opening {path}: {source}")]
    OpenProgram { path: PathBuf, source: nix::Error },
    #[error("a NUL byte in argument {0:?}")]
    NulInArgument(OsString),
    #[error(transparent)]
    Jail(#[from] JailError),
    #[error("building the helper seccomp filter: {0}")]
    SeccompBuild(seccompiler::BackendError),
    #[error("installing the helper seccomp filter: {0}")]
    SeccompApply(seccompiler::Error),
    #[error("executing {path}: {source}")]
    Exec { path: PathBuf, source: nix::Error },
}

/// The jail one helper process runs in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelperJail {
    pub uid: u32,
    pub gid: u32,
    /// An empty directory the jail's tmpfs root is mounted on (in the helper's own mount
    /// namespace: one directory serves every helper). Root's, so no helper can swap it.
    pub root: PathBuf,
    /// Host paths visible at the same path inside the jail.
    pub binds: Vec<PathBuf>,
}

impl HelperJail {
    /// A jail showing `run_dir`, the system's library directories, the harmless device nodes
    /// and `extra` (those that exist).
    pub fn for_helper(uid: u32, root: PathBuf, run_dir: &Path, extra: &[PathBuf]) -> Self {
        let mut binds = vec![run_dir.to_path_buf()];
        binds.extend(SYSTEM_DIRS.iter().chain(DEVICE_NODES).map(PathBuf::from));
        binds.extend(extra.iter().cloned());
        binds.retain(|p| p.exists());
        binds.dedup();
        Self { uid, gid: uid, root, binds }
    }

    /// The launcher's arguments (after this binary's path) that run `program args` jailed.
    pub fn launcher_args(&self, program: &OsStr, args: &[OsString]) -> Vec<OsString> {
        let mut out: Vec<OsString> = vec![
            LAUNCHER_SUBCOMMAND.into(),
            "--ids".into(),
            format!("{}:{}", self.uid, self.gid).into(),
            "--root".into(),
            self.root.clone().into(),
        ];
        for bind in &self.binds {
            out.push("--bind".into());
            out.push(bind.clone().into());
        }
        out.push("--".into());
        out.push(program.to_os_string());
        out.extend(args.iter().cloned());
        out
    }
}

/// `podvisor jail-exec`: enters `jail` and becomes `program args` (never returns on success).
/// Must run before this process has any other thread (see [`podvisor_vmm::jail`]).
pub fn exec_jailed(
    jail: &HelperJail,
    program: &Path,
    args: &[OsString],
) -> Result<Infallible, ConfineError> {
    use nix::fcntl::{open, OFlag};
    let fd: OwnedFd =
        open(program, OFlag::O_PATH | OFlag::O_CLOEXEC, nix::sys::stat::Mode::empty())
            .map(|raw| {
                // SAFETY: `open` just returned this descriptor; nothing else owns it.
                unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) }
            })
            .map_err(|source| ConfineError::OpenProgram { path: program.to_path_buf(), source })?;
    let argv =
        c_strings(std::iter::once(program.as_os_str()).chain(args.iter().map(|a| a.as_os_str())))?;
    let env = c_strings(
        std::env::vars_os()
            .map(|(k, v)| {
                let mut kv = k;
                kv.push("=");
                kv.push(v);
                kv
            })
            .collect::<Vec<_>>()
            .iter()
            .map(|s| s.as_os_str()),
    )?;
    enter(jail)?;
    deny_syscalls(DENIED_SYSCALLS)?;
    // execveat(fd, "", AT_EMPTY_PATH): works on an O_PATH descriptor of an ELF binary.
    let err = nix::unistd::fexecve(fd.as_raw_fd(), &argv, &env).unwrap_err();
    Err(ConfineError::Exec { path: program.to_path_buf(), source: err })
}

/// Enters `jail` (namespaces, root, uid, no capabilities, `no_new_privs`) without executing
/// anything: for helpers that are this binary (the console copier).
pub fn enter(jail: &HelperJail) -> Result<(), ConfineError> {
    jail::enter(&JailSpec {
        uid: jail.uid,
        gid: jail.gid,
        root: jail.root.clone(),
        binds: jail.binds.clone(),
        owned_dir: None,
    })?;
    Ok(())
}

/// Installs a filter under which `syscalls` fail with EPERM and everything else is allowed.
/// Needs `no_new_privs` (set by [`enter`]) or CAP_SYS_ADMIN.
pub fn deny_syscalls(syscalls: &[i64]) -> Result<(), ConfineError> {
    seccompiler::apply_filter(&deny_filter(syscalls)?).map_err(ConfineError::SeccompApply)
}

/// The filter of [`deny_syscalls`].
fn deny_filter(syscalls: &[i64]) -> Result<seccompiler::BpfProgram, ConfineError> {
    use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};
    let rules = syscalls.iter().map(|&nr| (nr, Vec::new())).collect();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        TargetArch::x86_64,
    )
    .map_err(ConfineError::SeccompBuild)?;
    BpfProgram::try_from(filter).map_err(ConfineError::SeccompBuild)
}

/// The deny-list of [`exec_jailed`], and for a helper that never executes anything (the
/// console copier) also `execve`/`execveat` and `fork`-like calls it does not make.
pub fn helper_denied_syscalls(may_exec: bool) -> Vec<i64> {
    let mut list = DENIED_SYSCALLS.to_vec();
    if !may_exec {
        list.extend([libc::SYS_execve, libc::SYS_execveat, libc::SYS_fork, libc::SYS_vfork]);
    }
    list
}

fn c_strings<'a>(items: impl Iterator<Item = &'a OsStr>) -> Result<Vec<CString>, ConfineError> {
    items
        .map(|s| {
            CString::new(s.as_bytes()).map_err(|_| ConfineError::NulInArgument(s.to_os_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launcher_arguments_name_ids_root_binds_then_the_program() {
        let jail = HelperJail {
            uid: 100_007,
            gid: 100_007,
            root: "/run/podvisor/vms/.jail-root".into(),
            binds: vec!["/run/podvisor/vms/abc".into(), "/usr".into()],
        };
        let args =
            jail.launcher_args(OsStr::new("/usr/bin/qemu"), &["-M".into(), "microvm".into()]);
        let line: Vec<String> = args.iter().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(
            line.join(" "),
            "jail-exec --ids 100007:100007 --root /run/podvisor/vms/.jail-root \
             --bind /run/podvisor/vms/abc --bind /usr -- /usr/bin/qemu -M microvm"
        );
    }

    #[test]
    fn a_helper_jail_binds_only_what_exists() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinux");
        std::fs::write(&kernel, b"k").unwrap();
        let missing = dir.path().join("missing");
        let jail = HelperJail::for_helper(
            100_001,
            dir.path().join("root"),
            dir.path(),
            &[kernel.clone(), missing.clone()],
        );
        assert_eq!(jail.binds[0], dir.path());
        assert!(jail.binds.contains(&kernel) && jail.binds.contains(&PathBuf::from("/usr")));
        assert!(!jail.binds.contains(&missing));
        assert_eq!((jail.uid, jail.gid), (100_001, 100_001));
    }

    /// In a forked child (so the filter never reaches the test process): a denied syscall
    /// fails with EPERM, an allowed one works.
    #[test]
    fn denied_syscalls_fail_with_eperm() {
        // Built before the fork: the child of a threaded process must not allocate.
        let filter = deny_filter(&[libc::SYS_unshare]).unwrap();
        // SAFETY: the child only sets no_new_privs, installs the filter and makes raw
        // syscalls before _exit.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: prctl with integer arguments.
            unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
            let code = match seccompiler::apply_filter(&filter) {
                // SAFETY: raw syscalls with integer arguments.
                Ok(()) => unsafe {
                    let denied = libc::syscall(libc::SYS_unshare, 0) == -1
                        && *libc::__errno_location() == libc::EPERM;
                    let allowed = libc::syscall(libc::SYS_getppid) > 0;
                    if denied && allowed {
                        0
                    } else {
                        1
                    }
                },
                Err(_) => 2,
            };
            // SAFETY: terminating the forked child.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status));
        assert_eq!(libc::WEXITSTATUS(status), 0);
    }
}
