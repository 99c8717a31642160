//! The FUSE server's confinement, as virtiofsd's `--sandbox=namespace`: it stays root (it
//! serves files of every owner as their owner) but
//! 1. enters new mount (every mount a slave, so later binds into the share still arrive),
//!    network, IPC and UTS namespaces (it needs no network: its only socket is already
//!    listening),
//! 2. makes the shared directory its root (`pivot_root` onto a bind of it, the old root
//!    detached), nosuid and nodev, read-only when the share is: nothing outside the share is
//!    reachable by path,
//! 3. drops its supplementary groups (as virtiofsd does: a request runs with the caller's uid
//!    and gid only, and would otherwise keep the daemon's groups), keeps only the capabilities
//!    of serving files (chown, DAC override, DAC read-search for hard links, fowner, fsetid,
//!    setuid/setgid for the per-request credentials, mknod, setfcap), empties the bounding and ambient sets and sets
//!    `no_new_privs`.
//!
//! Then [`crate::seccomp::install`] adds the syscall allowlist. Call it single-threaded.

use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::unistd::{chdir, pivot_root};

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("sandbox: {step}: {source}")]
    Sys { step: String, source: nix::Error },
    #[error("sandbox: {step}: {source}")]
    Io { step: &'static str, source: std::io::Error },
    #[error("sandbox: the shared directory {0} does not exist")]
    NoSharedDir(PathBuf),
}

/// Capabilities the passthrough file system uses (see the module docs).
/// (linux/capability.h: CHOWN, DAC_OVERRIDE, DAC_READ_SEARCH, FOWNER, FSETID, SETGID, SETUID,
/// MKNOD, SETFCAP.) DAC_READ_SEARCH is for LINK: the passthrough links by
/// `linkat(fd, "", AT_EMPTY_PATH)`, which needs it. Beside DAC_OVERRIDE it adds only that and
/// `open_by_handle_at`, which the seccomp allowlist does not let through.
const KEPT_CAPABILITIES: &[u32] = &[0, 1, 2, 3, 4, 6, 7, 27, 31];
/// Highest capability number any kernel we run on knows (CAP_CHECKPOINT_RESTORE).
const LAST_CAPABILITY: u32 = 40;

fn sys(step: impl Into<String>) -> impl FnOnce(nix::Error) -> SandboxError {
    let step = step.into();
    move |source| SandboxError::Sys { step, source }
}

/// Enters the sandbox around `shared_dir` (see the module docs).
pub fn enter(shared_dir: &Path, readonly: bool) -> Result<(), SandboxError> {
    if !shared_dir.is_dir() {
        return Err(SandboxError::NoSharedDir(shared_dir.to_path_buf()));
    }
    unshare(
        CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWNET
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWUTS,
    )
    .map_err(sys("unshare"))?;
    // Slave, not private: the daemon bind-mounts each container's image and volumes into the
    // share after the VM started, and those mounts must still reach this namespace (a bind of
    // a slave mount is a slave of the same master).
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_SLAVE, None::<&str>)
        .map_err(sys("making mounts slaves"))?;
    mount(
        Some(shared_dir),
        shared_dir,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(sys(format!("bind-mounting {}", shared_dir.display())))?;
    let mut flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if readonly {
        flags |= MsFlags::MS_RDONLY;
    }
    mount(None::<&str>, shared_dir, None::<&str>, flags, None::<&str>)
        .map_err(sys("remounting the share nosuid, nodev (and read-only)"))?;
    chdir(shared_dir).map_err(sys("chdir into the share"))?;
    // pivot_root(".", "."): the old root ends up on top of the new one; detaching it leaves
    // the share as the only thing reachable.
    pivot_root(".", ".").map_err(sys("pivot_root"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(sys("detaching the old root"))?;
    chdir("/").map_err(sys("chdir /"))?;
    nix::unistd::setgroups(&[]).map_err(sys("dropping supplementary groups"))?;
    drop_capabilities()?;
    // SAFETY: prctl(PR_SET_NO_NEW_PRIVS) takes integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(SandboxError::Io {
            step: "PR_SET_NO_NEW_PRIVS",
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Keeps [`KEPT_CAPABILITIES`] effective and permitted, nothing inheritable, ambient or in the
/// bounding set beyond them.
fn drop_capabilities() -> Result<(), SandboxError> {
    for cap in 0..=LAST_CAPABILITY {
        if !KEPT_CAPABILITIES.contains(&cap) {
            // SAFETY: prctl with integer arguments; EINVAL for a capability this kernel does
            // not know is fine.
            unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        }
    }
    // SAFETY: prctl with integer arguments.
    unsafe {
        libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
    }
    let mut data = [CapData::default(); 2];
    for &cap in KEPT_CAPABILITIES {
        let word = &mut data[(cap / 32) as usize];
        word.effective |= 1 << (cap % 32);
        word.permitted |= 1 << (cap % 32);
    }
    let mut header = CapHeader { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
    // SAFETY: capset reads a v3 header and two data words, both valid for the call.
    let rc =
        unsafe { libc::syscall(libc::SYS_capset, &mut header as *mut CapHeader, data.as_ptr()) };
    if rc != 0 {
        return Err(SandboxError::Io { step: "capset", source: std::io::Error::last_os_error() });
    }
    Ok(())
}
