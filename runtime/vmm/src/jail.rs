//! `--jail <uid>:<gid>`: after the VMM has opened everything it needs (/dev/kvm, guest memory,
//! kernel, initramfs, console log, sockets, drive files), it
//! 1. enters a new mount namespace with all mounts private, and an empty network namespace
//!    (its tap is an inherited fd and its sockets are unix sockets by path: it needs no
//!    network at all),
//! 2. pivots into an empty tmpfs root (`<run dir>/jail-root`) holding only bind mounts of the
//!    VM's run directory (same absolute path: vsock `<uds>_<port>` sockets, swap-in drives put
//!    there) and /dev/kvm, and remounts that root read-only,
//! 3. gives the run directory to `uid:gid`, drops supplementary groups, switches to
//!    `uid:gid` (which clears every capability) and sets `no_new_privs`.
//!
//! It must run before any other thread exists: the mount namespace is per thread until threads
//! are created from the jailed one.

use std::fs;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::unistd::{chdir, chown, pivot_root, setgroups, setresgid, setresuid, Gid, Uid};

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("--jail wants <uid>:<gid>, got {0:?}")]
    BadIds(String),
    #[error("the jail keeps root privileges for uid 0; give an unprivileged uid")]
    RootUid,
    #[error("jail: {step}: {source}")]
    Sys { step: String, source: nix::Error },
    #[error("jail: {step}: {source}")]
    Io { step: String, source: std::io::Error },
}

/// Where and as whom the VMM runs once jailed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailSpec {
    pub uid: u32,
    pub gid: u32,
    /// Empty directory that becomes the tmpfs root.
    pub root: PathBuf,
    /// Host paths made visible at the same path inside the jail.
    pub binds: Vec<PathBuf>,
    /// Directory handed to `uid:gid` (the run directory).
    pub owned_dir: Option<PathBuf>,
}

/// Parses `uid:gid`.
pub fn parse_ids(text: &str) -> Result<(u32, u32), JailError> {
    let bad = || JailError::BadIds(text.to_string());
    let (uid, gid) = text.split_once(':').ok_or_else(bad)?;
    let ids = (uid.parse().map_err(|_| bad())?, gid.parse().map_err(|_| bad())?);
    if ids.0 == 0 {
        return Err(JailError::RootUid);
    }
    Ok(ids)
}

fn sys(step: impl Into<String>) -> impl FnOnce(nix::Error) -> JailError {
    let step = step.into();
    move |source| JailError::Sys { step, source }
}

fn io(step: impl Into<String>) -> impl FnOnce(std::io::Error) -> JailError {
    let step = step.into();
    move |source| JailError::Io { step, source }
}

/// Inside-the-jail location of host path `path`.
fn inside(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

/// Enters the jail described by `spec` (see the module docs).
pub fn enter(spec: &JailSpec) -> Result<(), JailError> {
    if spec.uid == 0 {
        return Err(JailError::RootUid);
    }
    if let Some(dir) = &spec.owned_dir {
        chown(dir, Some(Uid::from_raw(spec.uid)), Some(Gid::from_raw(spec.gid)))
            .map_err(sys(format!("chown {}", dir.display())))?;
    }
    unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWNET)
        .map_err(sys("unshare(CLONE_NEWNS | CLONE_NEWNET)"))?;
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>)
        .map_err(sys("making mounts private"))?;

    let root = &spec.root;
    fs::create_dir_all(root).map_err(io(format!("creating {}", root.display())))?;
    mount(
        Some("tmpfs"),
        root,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=0755,size=64k"),
    )
    .map_err(sys(format!("mounting a tmpfs on {}", root.display())))?;

    for source in &spec.binds {
        let target = inside(root, source);
        let is_dir = source.is_dir();
        let parent = if is_dir { target.as_path() } else { target.parent().unwrap_or(root) };
        fs::create_dir_all(parent).map_err(io(format!("creating {}", parent.display())))?;
        if !is_dir {
            fs::File::create(&target).map_err(io(format!("creating {}", target.display())))?;
        }
        mount(
            Some(source),
            &target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(sys(format!("bind-mounting {}", source.display())))?;
    }

    let old = root.join(".old-root");
    fs::create_dir_all(&old).map_err(io("creating the old-root mount point"))?;
    pivot_root(root, &old).map_err(sys("pivot_root"))?;
    chdir("/").map_err(sys("chdir /"))?;
    umount2("/.old-root", MntFlags::MNT_DETACH).map_err(sys("detaching the old root"))?;
    fs::remove_dir("/.old-root").map_err(io("removing the old-root mount point"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .map_err(sys("remounting the jail root read-only"))?;

    setgroups(&[]).map_err(sys("setgroups"))?;
    let gid = Gid::from_raw(spec.gid);
    setresgid(gid, gid, gid).map_err(sys("setresgid"))?;
    let uid = Uid::from_raw(spec.uid);
    setresuid(uid, uid, uid).map_err(sys("setresuid"))?;
    // SAFETY: prctl(PR_SET_NO_NEW_PRIVS) takes integer arguments only.
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    if rc != 0 {
        return Err(io("PR_SET_NO_NEW_PRIVS")(std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_and_root_is_refused() {
        assert_eq!(parse_ids("65534:65534").unwrap(), (65534, 65534));
        assert!(matches!(parse_ids("0:0"), Err(JailError::RootUid)));
        assert!(matches!(parse_ids("1000"), Err(JailError::BadIds(_))));
        assert!(matches!(parse_ids("a:b"), Err(JailError::BadIds(_))));
        assert_eq!(inside(Path::new("/j"), Path::new("/run/x")), PathBuf::from("/j/run/x"));
    }
}
