//! A container's root filesystem inside the guest: an overlay of image layers (lower dirs on
//! the shared filesystem) with a writable upper on the guest's tmpfs, or the layers alone,
//! read-only.

use std::fs;
use std::path::{Component, Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

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

/// Mounts the rootfs at `container_dir/rootfs`; returns that path.
pub fn mount_rootfs(
    container_dir: &Path,
    lowers: &[PathBuf],
    read_only: bool,
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
            let upper = container_dir.join("upper");
            let work = container_dir.join("work");
            create_dir(&upper)?;
            create_dir(&work)?;
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

#[cfg(test)]
mod tests {
    use super::*;

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
