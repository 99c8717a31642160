//! Atomic persistence of the daemon's records as JSON files: write to a temporary file in the
//! same directory, fsync, rename, fsync the directory. A crash leaves either the old or the
//! new record, never a torn one.
//!
//! Records hold what pods were given (environment variables, often secrets): files are 0600
//! and the directories this module creates 0700, so only root reads them.

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("creating directory {path}: {source}")]
    CreateDir { path: PathBuf, source: std::io::Error },
    #[error("reading the mode of {path}: {source}")]
    Stat { path: PathBuf, source: std::io::Error },
    #[error("making {path} private: {source}")]
    SetMode { path: PathBuf, source: std::io::Error },
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("renaming {from} to {to}: {source}")]
    Rename { from: PathBuf, to: PathBuf, source: std::io::Error },
    #[error("encoding {path}: {source}")]
    Encode { path: PathBuf, source: serde_json::Error },
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("decoding {path}: {source}")]
    Decode { path: PathBuf, source: serde_json::Error },
    #[error("removing {path}: {source}")]
    Remove { path: PathBuf, source: std::io::Error },
}

/// Mode of the files [`write_atomic`] writes.
pub const FILE_MODE: u32 = 0o600;
/// Mode of the directories this module creates.
pub const DIR_MODE: u32 = 0o700;

/// Creates `path` (and missing parents) as [`DIR_MODE`] directories, and takes group and other
/// access away from an existing `path` (one made by an older daemon, or by hand): what lies
/// below holds pods' secrets.
pub fn create_private_dir(path: &Path) -> Result<(), StoreError> {
    create_dirs(path)?;
    let mode = fs::metadata(path)
        .map_err(|source| StoreError::Stat { path: path.into(), source })?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        fs::set_permissions(path, fs::Permissions::from_mode(DIR_MODE))
            .map_err(|source| StoreError::SetMode { path: path.into(), source })?;
    }
    Ok(())
}

/// `mkdir -p -m 0700`: only the directories it makes get the mode.
fn create_dirs(path: &Path) -> Result<(), StoreError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(path)
        .map_err(|source| StoreError::CreateDir { path: path.into(), source })
}

/// Writes `value` as JSON to `path` atomically and durably.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), StoreError> {
    let data = serde_json::to_vec_pretty(value)
        .map_err(|source| StoreError::Encode { path: path.into(), source })?;
    write_atomic(path, &data, true)
}

/// Replaces `path` with `data` through a temporary file and a rename, so a reader, or a daemon
/// restarted after being killed mid-write, sees the old content or the new, never a torn or
/// empty file. `durable` also syncs the file and the directory (surviving a power loss), which
/// records under `--root` need and frequently rewritten runtime state under `--state` does not.
pub fn write_atomic(path: &Path, data: &[u8], durable: bool) -> Result<(), StoreError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    create_dirs(dir)?;
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    // Unique per write: concurrent writers in one process must not share a temporary file.
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{file_name}.tmp-{}-{seq}", std::process::id()));
    let write = |tmp: &Path| -> std::io::Result<()> {
        let mut f =
            fs::OpenOptions::new().write(true).create_new(true).mode(FILE_MODE).open(tmp)?;
        f.write_all(data)?;
        if durable {
            f.sync_all()?;
        }
        Ok(())
    };
    if let Err(source) = write(&tmp) {
        let _ = fs::remove_file(&tmp);
        return Err(StoreError::Write { path: tmp, source });
    }
    fs::rename(&tmp, path).map_err(|source| {
        let _ = fs::remove_file(&tmp);
        StoreError::Rename { from: tmp.clone(), to: path.into(), source }
    })?;
    if durable {
        // Make the rename itself durable.
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Whether `path` is one of [`write_atomic`]'s temporary files (`.<name>.tmp-<pid>-<n>`),
/// which an interrupted write leaves behind: never a record.
pub fn is_temporary(path: &Path) -> bool {
    path.file_name()
        .map(|n| n.to_string_lossy())
        .is_some_and(|n| n.starts_with('.') && n.contains(".tmp-"))
}

/// Reads a JSON record.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, StoreError> {
    let data = fs::read(path).map_err(|source| StoreError::Read { path: path.into(), source })?;
    serde_json::from_slice(&data).map_err(|source| StoreError::Decode { path: path.into(), source })
}

/// Removes a file or directory tree; a missing one is fine.
pub fn remove_path(path: &Path) -> Result<(), StoreError> {
    let res = match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) => Err(e),
    };
    match res {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(StoreError::Remove { path: path.into(), source: e })
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a/b/rec.json");
        write_json(&p, &vec![1, 2, 3]).unwrap();
        write_json(&p, &vec![4]).unwrap();
        let v: Vec<i32> = read_json(&p).unwrap();
        assert_eq!(v, vec![4]);
        // No temporary file is left behind.
        assert_eq!(fs::read_dir(p.parent().unwrap()).unwrap().count(), 1);
        assert!(!is_temporary(&p));
        assert!(is_temporary(&p.with_file_name(".rec.json.tmp-12-0")));
        remove_path(&p).unwrap();
        remove_path(&p).unwrap();
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    /// Records hold env vars: neither they nor the directories made for them are readable by
    /// other host users, whatever the umask, and a rewrite tightens an old 0644 record.
    #[test]
    fn records_and_their_directories_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sandboxes/abc/containers/c.json");
        write_json(&p, &vec![1]).unwrap();
        assert_eq!(mode(&p), FILE_MODE);
        for d in ["sandboxes", "sandboxes/abc", "sandboxes/abc/containers"] {
            assert_eq!(mode(&dir.path().join(d)), DIR_MODE, "{d}");
        }
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        write_json(&p, &vec![2]).unwrap();
        assert_eq!(mode(&p), FILE_MODE);
    }

    #[test]
    fn private_dirs_are_made_or_tightened() {
        let dir = tempfile::tempdir().unwrap();
        let fresh = dir.path().join("run/podvisor");
        create_private_dir(&fresh).unwrap();
        assert_eq!(mode(&fresh), DIR_MODE);
        assert_eq!(mode(&dir.path().join("run")), DIR_MODE);
        let old = dir.path().join("old");
        fs::create_dir(&old).unwrap();
        fs::set_permissions(&old, fs::Permissions::from_mode(0o755)).unwrap();
        create_private_dir(&old).unwrap();
        assert_eq!(mode(&old), DIR_MODE);
    }

    #[test]
    fn corrupt_record_is_a_decode_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("rec.json");
        fs::write(&p, b"{not json").unwrap();
        assert!(matches!(read_json::<Vec<i32>>(&p), Err(StoreError::Decode { .. })));
    }
}
