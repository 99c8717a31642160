//! A container's root filesystem inside the guest: an overlay of image layers (lower dirs on
//! the shared filesystem) with a writable upper on the guest's tmpfs, or the layers alone,
//! read-only.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::{fstatat, SFlag};

/// The most inodes one writable-layer walk counts: a tenant's million empty files must not
/// make every ContainerStats call arbitrarily slow.
pub const MAX_LAYER_ENTRIES: u64 = 1_000_000;

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("no lower directories given")]
    NoLowerDirs,
    #[error("lower directory {0:?} must be a relative path inside the shared directory")]
    BadLowerDir(String),
    #[error("lower directory {0:?} contains a character overlayfs cannot take (',' ':' or '\\')")]
    UnsupportedLowerDir(String),
    #[error("lower directory {0} does not exist")]
    MissingLowerDir(PathBuf),
    #[error("creating {0}: {1}")]
    CreateDir(PathBuf, std::io::Error),
    #[error("mounting the rootfs at {0}: {1}")]
    Mount(PathBuf, nix::Error),
    #[error("giving {0} to the user namespace's root: {1}")]
    Chown(PathBuf, nix::Error),
}

/// Checks that `lower` stays inside the shared directory and returns its full path.
fn lower_path(shared_dir: &Path, lower: &str) -> Result<PathBuf, RootfsError> {
    let relative = Path::new(lower);
    let clean = !lower.is_empty()
        && relative.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if !clean {
        return Err(RootfsError::BadLowerDir(lower.to_string()));
    }
    if lower.contains([',', ':', '\\']) {
        return Err(RootfsError::UnsupportedLowerDir(lower.to_string()));
    }
    let full = shared_dir.join(relative);
    if !full.is_dir() {
        return Err(RootfsError::MissingLowerDir(full));
    }
    Ok(full)
}

/// Validates the request without touching anything.
pub fn validate(shared_dir: &Path, lower_dirs: &[String]) -> Result<Vec<PathBuf>, RootfsError> {
    if lower_dirs.is_empty() {
        return Err(RootfsError::NoLowerDirs);
    }
    let lowers =
        lower_dirs.iter().map(|l| lower_path(shared_dir, l)).collect::<Result<Vec<_>, _>>()?;
    if let Some(bad) = lowers.iter().find(|p| p.to_string_lossy().contains([',', ':'])) {
        return Err(RootfsError::UnsupportedLowerDir(bad.display().to_string()));
    }
    Ok(lowers)
}

fn create_dir(path: &Path) -> Result<(), RootfsError> {
    fs::create_dir_all(path).map_err(|e| RootfsError::CreateDir(path.to_path_buf(), e))
}

/// The overlay's writable upper directory of the container whose directory is `container_dir`.
pub fn upper_dir(container_dir: &Path) -> PathBuf {
    container_dir.join("upper")
}

/// Mounts the rootfs at `container_dir/rootfs`; returns that path. With `owner` (the guest
/// uid and gid of a user namespace's root) the writable layer's root is theirs, so the
/// container's root can write its root directory as it could without a user namespace.
pub fn mount_rootfs(
    container_dir: &Path,
    lowers: &[PathBuf],
    read_only: bool,
    owner: Option<(u32, u32)>,
) -> Result<PathBuf, RootfsError> {
    let target = container_dir.join("rootfs");
    create_dir(&target)?;
    let lowerdir =
        lowers.iter().map(|p| p.to_string_lossy().into_owned()).collect::<Vec<_>>().join(":");
    let result = match (read_only, lowers) {
        // overlayfs needs two lowers when it has no upper: bind a single layer instead.
        (true, [only]) => {
            mount(Some(only.as_path()), &target, None::<&str>, MsFlags::MS_BIND, None::<&str>)
                .and_then(|()| {
                    mount(
                        None::<&str>,
                        &target,
                        None::<&str>,
                        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                        None::<&str>,
                    )
                })
        }
        (true, _) => mount(
            Some("overlay"),
            &target,
            Some("overlay"),
            MsFlags::MS_RDONLY,
            Some(format!("lowerdir={lowerdir}").as_str()),
        ),
        (false, _) => {
            let upper = upper_dir(container_dir);
            let work = container_dir.join("work");
            create_dir(&upper)?;
            create_dir(&work)?;
            if let Some((uid, gid)) = owner {
                nix::unistd::chown(&upper, Some(uid.into()), Some(gid.into()))
                    .map_err(|e| RootfsError::Chown(upper.clone(), e))?;
            }
            mount(
                Some("overlay"),
                &target,
                Some("overlay"),
                MsFlags::empty(),
                Some(
                    format!(
                        "lowerdir={lowerdir},upperdir={},workdir={}",
                        upper.display(),
                        work.display()
                    )
                    .as_str(),
                ),
            )
        }
    };
    match result {
        Ok(()) => Ok(target),
        Err(e) => {
            let _ = umount2(&target, MntFlags::MNT_DETACH);
            Err(RootfsError::Mount(target, e))
        }
    }
}

/// Unmounts the rootfs (lazily: a dying container may still hold it for a moment).
pub fn unmount_rootfs(container_dir: &Path) {
    let target = container_dir.join("rootfs");
    let _ = umount2(&target, MntFlags::MNT_DETACH);
}

/// Space used by a directory tree.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Allocated bytes (st_blocks * 512: what the files really take, holes excluded).
    pub bytes: u64,
    /// Inodes, the top directory included; a hard-linked file counts once.
    pub inodes: u64,
    /// The walk stopped at its entry bound: the figures are a lower bound.
    pub truncated: bool,
}

/// The usage of the container's writable layer; zero when it has none (read-only rootfs).
pub fn writable_layer_usage(container_dir: &Path) -> Usage {
    tree_usage(&upper_dir(container_dir), MAX_LAYER_ENTRIES)
}

/// Walks the tree at `root` iteratively (no recursion: depth is the tenant's choice), counting
/// at most `limit` inodes. Symlinks are never followed: each directory is opened beneath
/// `root` with every symlink refused, so a tenant swapping a directory for a link while the
/// walk runs cannot send it elsewhere. Entries that vanish meanwhile are skipped.
fn tree_usage(root: &Path, limit: u64) -> Usage {
    let mut usage = Usage::default();
    let Ok(top) = fs::File::options()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(root)
    else {
        return usage;
    };
    let Ok(meta) = top.metadata() else {
        return usage;
    };
    usage.inodes = 1;
    usage.bytes = meta.blocks().saturating_mul(512);
    let mut linked: HashSet<(libc::dev_t, libc::ino_t)> = HashSet::new();
    let mut pending: Vec<PathBuf> = vec![PathBuf::from(".")];
    while let Some(relative) = pending.pop() {
        let how = OpenHow::new()
            .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
            .resolve(
                ResolveFlag::RESOLVE_BENEATH
                    | ResolveFlag::RESOLVE_NO_SYMLINKS
                    | ResolveFlag::RESOLVE_NO_MAGICLINKS
                    | ResolveFlag::RESOLVE_NO_XDEV,
            );
        let Ok(fd) = openat2(top.as_raw_fd(), &relative, how) else {
            continue;
        };
        let Ok(mut dir) = nix::dir::Dir::from_fd(fd) else {
            continue;
        };
        let dir_fd = dir.as_raw_fd();
        for entry in dir.iter() {
            let Ok(entry) = entry else {
                break;
            };
            let name = entry.file_name();
            if name == c"." || name == c".." {
                continue;
            }
            if usage.inodes >= limit {
                usage.truncated = true;
                return usage;
            }
            let Ok(stat) = fstatat(Some(dir_fd), name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
            else {
                continue;
            };
            let is_dir = SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR;
            // A file with several links is counted at its first name only.
            if !is_dir && stat.st_nlink > 1 && !linked.insert((stat.st_dev, stat.st_ino)) {
                continue;
            }
            usage.inodes += 1;
            let blocks = u64::try_from(stat.st_blocks).unwrap_or(0);
            usage.bytes = usage.bytes.saturating_add(blocks.saturating_mul(512));
            if is_dir {
                pending.push(relative.join(OsStr::from_bytes(name.to_bytes())));
            }
        }
    }
    usage
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_usage_counts_blocks_and_inodes_without_following_links() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("upper");
        assert_eq!(tree_usage(&root, 100), Usage::default());
        fs::create_dir_all(root.join("a/b/c")).unwrap();
        fs::write(root.join("a/b/c/data"), vec![1u8; 1 << 20]).unwrap();
        fs::write(root.join("small"), b"x").unwrap();
        // Hard links count once; a symlink counts as itself, its target is not walked.
        fs::hard_link(root.join("small"), root.join("a/small-link")).unwrap();
        let outside = dir.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("big"), vec![1u8; 4 << 20]).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("a/escape")).unwrap();
        let usage = tree_usage(&root, 100);
        // upper, a, b, c, data, small, escape
        assert_eq!(usage.inodes, 7, "{usage:?}");
        assert!(!usage.truncated);
        assert!(usage.bytes >= 1 << 20, "{usage:?}");
        assert!(usage.bytes < 2 << 20, "the link's target is not counted: {usage:?}");
        // A symlink as the top directory is not followed either.
        std::os::unix::fs::symlink(&outside, dir.path().join("link-top")).unwrap();
        assert_eq!(tree_usage(&dir.path().join("link-top"), 100), Usage::default());
        // The bound stops the walk.
        let bounded = tree_usage(&root, 3);
        assert_eq!(bounded.inodes, 3);
        assert!(bounded.truncated);
        // Depth is no problem for an iterative walk.
        let mut deep = root.join("deep");
        for _ in 0..200 {
            deep = deep.join("d");
        }
        fs::create_dir_all(&deep).unwrap();
        assert_eq!(tree_usage(&root, 1000).inodes, 7 + 201);
    }

    #[test]
    fn lower_dirs_cannot_escape_the_shared_dir() {
        let shared = Path::new("/nonexistent-shared");
        for bad in ["", "/etc", "../x", "a/../../b"] {
            assert!(matches!(lower_path(shared, bad), Err(RootfsError::BadLowerDir(_))));
        }
        assert!(matches!(lower_path(shared, "a:b"), Err(RootfsError::UnsupportedLowerDir(_))));
        assert!(matches!(validate(shared, &[]), Err(RootfsError::NoLowerDirs)));
    }
}
