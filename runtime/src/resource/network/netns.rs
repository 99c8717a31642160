//! Pods' network namespaces, kept alive by a bind mount on a file (as `ip netns add` does) so
//! that they outlive the thread that made them, a daemon restart, and the VM, until DEL ran.
//!
//! A network namespace belongs to a thread, so work inside one runs on a short-lived thread
//! of its own that enters it and then ends: no tokio worker ever changes namespace.

use std::fs::File;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};

/// Errors handling network namespaces.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("creating {path}: {source}")]
    CreateFile { path: PathBuf, source: std::io::Error },
    #[error("unshare(CLONE_NEWNET): {0}")]
    Unshare(nix::Error),
    #[error("bind-mounting the new network namespace on {path}: {source}")]
    Bind { path: PathBuf, source: nix::Error },
    #[error("opening network namespace {path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("entering network namespace {path}: {source}")]
    Enter { path: PathBuf, source: nix::Error },
    #[error("unmounting network namespace {path}: {source}")]
    Unmount { path: PathBuf, source: nix::Error },
    #[error("removing {path}: {source}")]
    RemoveFile { path: PathBuf, source: std::io::Error },
    #[error("the network namespace thread panicked")]
    Thread,
}

/// Creates a new network namespace pinned at `path` (whose directory must exist).
/// An existing pin at `path` is kept (the call is idempotent).
pub fn create(path: &Path) -> Result<(), NetnsError> {
    if is_pinned(path) {
        return Ok(());
    }
    File::create(path).map_err(|source| NetnsError::CreateFile { path: path.into(), source })?;
    let target = path.to_path_buf();
    let made = std::thread::spawn(move || -> Result<(), NetnsError> {
        unshare(CloneFlags::CLONE_NEWNET).map_err(NetnsError::Unshare)?;
        mount(
            Some("/proc/thread-self/ns/net"),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|source| NetnsError::Bind { path: target.clone(), source })
    })
    .join()
    .map_err(|_| NetnsError::Thread)?;
    if made.is_err() {
        let _ = std::fs::remove_file(path);
    }
    made
}

/// Whether `path` is a pinned network namespace (an nsfs mount).
pub fn is_pinned(path: &Path) -> bool {
    const NSFS_MAGIC: i64 = 0x6e73_6673;
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type().0 == NSFS_MAGIC)
}

/// Unpins and removes `path`; a namespace that is already gone is fine. The namespace itself
/// ends when nothing else (a VMM's tap, a process) holds it.
pub fn remove(path: &Path) -> Result<(), NetnsError> {
    if is_pinned(path) {
        match umount2(path, MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => {}
            Err(source) => return Err(NetnsError::Unmount { path: path.into(), source }),
        }
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(NetnsError::RemoveFile { path: path.into(), source }),
    }
}

/// Runs `work` on a thread inside the namespace at `path` and returns what it returned.
pub fn run_in<T, F>(path: &Path, work: F) -> Result<T, NetnsError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let ns = File::open(path).map_err(|source| NetnsError::Open { path: path.into(), source })?;
    let path = path.to_path_buf();
    std::thread::spawn(move || -> Result<T, NetnsError> {
        setns(&ns, CloneFlags::CLONE_NEWNET)
            .map_err(|source| NetnsError::Enter { path, source })?;
        Ok(work())
    })
    .join()
    .map_err(|_| NetnsError::Thread)?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    fn own_netns_inode() -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino()
    }

    #[test]
    fn create_enter_and_remove() {
        if !root() {
            eprintln!("skipped: needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pod");
        create(&path).unwrap();
        assert!(is_pinned(&path));
        create(&path).unwrap();
        let host = own_netns_inode();
        let inside = run_in(&path, own_netns_inode).unwrap();
        assert_ne!(host, inside, "work ran in the host namespace");
        assert_eq!(run_in(&path, own_netns_inode).unwrap(), inside, "a second entry differs");
        assert_eq!(own_netns_inode(), host, "the caller's namespace changed");
        remove(&path).unwrap();
        assert!(!path.exists());
        remove(&path).unwrap();
        assert!(matches!(run_in(&path, || ()), Err(NetnsError::Open { .. })));
    }
}
