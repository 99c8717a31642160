//! Applies image layers (tar, tar+gzip, tar+zstd) in order into one directory, the image's
//! root file system, with OCI/AUFS whiteout semantics.
//!
//! Every path comes from an untrusted image, so nothing is ever written through a path the
//! kernel resolves on its own: entry names containing `..` are refused, absolute names are taken
//! relative to the root, and the parent directories of each entry are resolved component by
//! component, following the image's own symlinks *inside* the root (an absolute link target
//! restarts at the root, `..` stops at the root), as `filepath-securejoin` does for runc.

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;

use sha2::{Digest, Sha256};
use tracing::debug;

/// Symlinks followed while resolving one path before giving up (Linux's MAXSYMLINKS).
const MAX_SYMLINKS: usize = 40;

/// AUFS/OCI whiteout prefix: `.wh.name` deletes `name` of lower layers.
const WHITEOUT_PREFIX: &str = ".wh.";
/// Marks its directory opaque: lower layers' content of it is hidden.
const WHITEOUT_OPAQUE: &str = ".wh..wh..opq";
/// AUFS-internal metadata entries (`.wh..wh.plnk`, …), never part of the file system.
const WHITEOUT_META_PREFIX: &str = ".wh..wh.";

/// Why a layer could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// The layer blob could not be opened or its compression sniffed.
    #[error("open layer blob {path}: {source}")]
    OpenLayer {
        /// The blob.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The decompressor could not be set up.
    #[error("start decompressing layer: {0}")]
    Decompress(io::Error),
    /// The tar stream is corrupt or truncated.
    #[error("read tar stream: {0}")]
    ReadTar(io::Error),
    /// An entry name leaves the root (`..`) or is not valid.
    #[error("tar entry {path:?} escapes the image root")]
    UnsafePath {
        /// The entry name as found in the tar.
        path: String,
    },
    /// A hard link names a target outside the root, or one that does not exist.
    #[error("hard link {path:?} -> {target:?} points outside the image or to nothing")]
    BadHardLink {
        /// The link's entry name.
        path: String,
        /// Its target name.
        target: String,
    },
    /// Too many symlinks while resolving an entry's parent directories.
    #[error("too many levels of symbolic links resolving {path:?}")]
    SymlinkLoop {
        /// The entry name.
        path: String,
    },
    /// Creating a file, directory, link or fifo failed.
    #[error("create {path}: {source}")]
    Create {
        /// What was being created.
        path: PathBuf,
        /// The cause (ENOSPC when the disk is full).
        source: io::Error,
    },
    /// Removing a replaced or whited-out path failed.
    #[error("remove {path}: {source}")]
    Remove {
        /// What was being removed.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// lchown failed.
    #[error("set owner of {path}: {source}")]
    Chown {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: nix::Error,
    },
    /// chmod failed.
    #[error("set mode of {path}: {source}")]
    Chmod {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// lsetxattr failed (other than "not supported").
    #[error("set xattr {name} on {path}: {source}")]
    Xattr {
        /// The path.
        path: PathBuf,
        /// The attribute.
        name: String,
        /// The cause.
        source: io::Error,
    },
    /// lutimes failed.
    #[error("set mtime of {path}: {source}")]
    Mtime {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The uncompressed layer does not hash to the config's diff id.
    #[error("layer content digest mismatch: expected diff id {expected}, got {actual}")]
    DiffIdMismatch {
        /// From the image config.
        expected: String,
        /// Computed.
        actual: String,
    },
    /// The layers decompress to more than the image may take up (a small gzip of zeros can
    /// fill any disk).
    #[error("the image's layers unpack to more than the {limit}-byte limit")]
    TooLarge {
        /// `max_unpacked_bytes`.
        limit: u64,
    },
    /// syncfs on the finished tree failed.
    #[error("sync {path}: {source}")]
    Sync {
        /// The root.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
}

type Result<T> = std::result::Result<T, UnpackError>;

/// One layer to apply: its blob and, when known, the sha256 of its uncompressed tar.
#[derive(Clone, Debug)]
pub struct Layer {
    /// The (possibly compressed) blob.
    pub blob: PathBuf,
    /// `sha256:…` of the uncompressed tar (the image config's diff id).
    pub diff_id: Option<String>,
}

/// Applies `layers` in order into `root` (an existing, empty directory), then flushes the file
/// system. The caller makes the result visible atomically (rename). Fails with
/// [`UnpackError::TooLarge`] as soon as the uncompressed layers add up to more than
/// `max_bytes`; the caller discards the partial tree.
pub fn unpack_layers(layers: &[Layer], root: &Path, max_bytes: u64) -> Result<()> {
    let mut unpacker = Unpacker {
        root: root.to_owned(),
        dir_mtimes: HashMap::new(),
        chown: nix::unistd::geteuid().is_root(),
        budget: Rc::new(Budget { left: Cell::new(max_bytes), exceeded: Cell::new(false) }),
        max_bytes,
    };
    for layer in layers {
        unpacker.apply_layer(layer)?;
    }
    // Directory mtimes last: creating entries inside a directory changes its mtime.
    for (path, mtime) in &unpacker.dir_mtimes {
        if fs::symlink_metadata(path).is_ok_and(|m| m.is_dir()) {
            filetime::set_symlink_file_times(path, *mtime, *mtime)
                .map_err(|source| UnpackError::Mtime { path: path.clone(), source })?;
        }
    }
    sync_filesystem(root)
}

/// Flushes the file system holding `root` so that a crash after the caller's rename never
/// exposes a tree whose data is not on disk.
fn sync_filesystem(root: &Path) -> Result<()> {
    let dir =
        File::open(root).map_err(|source| UnpackError::Sync { path: root.to_owned(), source })?;
    // SAFETY: syncfs only reads the fd, which `dir` owns and keeps open for the call.
    let rc = unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&dir)) };
    if rc != 0 {
        return Err(UnpackError::Sync {
            path: root.to_owned(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Uncompressed bytes the remaining layers may still take up.
struct Budget {
    left: Cell<u64>,
    /// A read went past it: whatever error follows is this one.
    exceeded: Cell<bool>,
}

/// A reader that fails once more than the budget has passed through it.
struct BudgetedReader<R> {
    inner: R,
    budget: Rc<Budget>,
}

impl<R: Read> Read for BudgetedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let read = self.inner.read(buf)?;
        let left = self.budget.left.get();
        match left.checked_sub(read as u64) {
            Some(rest) => {
                self.budget.left.set(rest);
                Ok(read)
            }
            None => {
                self.budget.exceeded.set(true);
                Err(io::Error::other("the unpacked size limit is reached"))
            }
        }
    }
}

/// A reader that hashes what passes through it (the uncompressed tar, for the diff id).
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let read = self.inner.read(buf)?;
        self.hasher.update(&buf[..read]);
        Ok(read)
    }
}

/// Opens a layer blob with the decompressor its magic bytes call for.
fn open_layer(path: &Path) -> Result<Box<dyn Read>> {
    let open_error = |source| UnpackError::OpenLayer { path: path.to_owned(), source };
    let mut file = File::open(path).map_err(open_error)?;
    let mut magic = [0u8; 4];
    let mut filled = 0;
    while filled < magic.len() {
        match file.read(&mut magic[filled..]).map_err(open_error)? {
            0 => break,
            read => filled += read,
        }
    }
    file.rewind().map_err(open_error)?;
    let reader = BufReader::with_capacity(256 * 1024, file);
    Ok(match magic {
        [0x1f, 0x8b, ..] => Box::new(flate2::read::MultiGzDecoder::new(reader)),
        [0x28, 0xb5, 0x2f, 0xfd] => Box::new(
            zstd::stream::read::Decoder::with_buffer(reader).map_err(UnpackError::Decompress)?,
        ),
        _ => Box::new(reader),
    })
}

struct Unpacker {
    root: PathBuf,
    dir_mtimes: HashMap<PathBuf, filetime::FileTime>,
    /// Only root can give files away; as non-root (tests) ownership is left as is.
    chown: bool,
    budget: Rc<Budget>,
    max_bytes: u64,
}

/// The components of an entry name, relative to the root, or None if it contains `..`.
fn clean_components(name: &[u8]) -> Option<Vec<OsString>> {
    let mut components = Vec::new();
    for component in Path::new(OsStr::from_bytes(name)).components() {
        match component {
            Component::Normal(part) => components.push(part.to_owned()),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(components)
}

fn lossy(name: &[u8]) -> String {
    String::from_utf8_lossy(name).into_owned()
}

impl Unpacker {
    /// Resolves `components` inside the root, following symlinks of the image as if the root
    /// were `/`. The last component is not followed when `follow_last` is false.
    fn resolve(&self, components: &[OsString], follow_last: bool, name: &[u8]) -> Result<PathBuf> {
        let mut resolved: Vec<OsString> = Vec::new();
        let mut pending: std::collections::VecDeque<OsString> =
            components.iter().cloned().collect();
        let mut links = 0;
        while let Some(part) = pending.pop_front() {
            if part == "." || part.is_empty() {
                continue;
            }
            if part == ".." {
                resolved.pop();
                continue;
            }
            if pending.is_empty() && !follow_last {
                resolved.push(part);
                break;
            }
            let mut candidate = self.root.clone();
            candidate.extend(&resolved);
            candidate.push(&part);
            match fs::symlink_metadata(&candidate) {
                Ok(metadata) if metadata.file_type().is_symlink() => {
                    links += 1;
                    if links > MAX_SYMLINKS {
                        return Err(UnpackError::SymlinkLoop { path: lossy(name) });
                    }
                    let target = fs::read_link(&candidate).map_err(|source| {
                        UnpackError::Create { path: candidate.clone(), source }
                    })?;
                    if target.is_absolute() {
                        resolved.clear();
                    }
                    for component in target.components().rev() {
                        match component {
                            Component::Normal(part) => pending.push_front(part.to_owned()),
                            Component::ParentDir => pending.push_front(OsString::from("..")),
                            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
                        }
                    }
                }
                _ => resolved.push(part),
            }
        }
        let mut path = self.root.clone();
        path.extend(&resolved);
        Ok(path)
    }

    /// Where an entry named `name` goes: its parents resolved inside the root (and created),
    /// its last component not followed. None for the root itself.
    fn entry_path(&self, name: &[u8]) -> Result<Option<PathBuf>> {
        let components =
            clean_components(name).ok_or_else(|| UnpackError::UnsafePath { path: lossy(name) })?;
        let Some((last, parents)) = components.split_last() else {
            return Ok(None);
        };
        let parent = self.resolve(parents, true, name)?;
        if !parent.starts_with(&self.root) {
            return Err(UnpackError::UnsafePath { path: lossy(name) });
        }
        fs::create_dir_all(&parent)
            .map_err(|source| UnpackError::Create { path: parent.clone(), source })?;
        Ok(Some(parent.join(last)))
    }

    /// Applies one layer; past the budget, whatever failed reports the limit.
    fn apply_layer(&mut self, layer: &Layer) -> Result<()> {
        let result = self.apply_layer_entries(layer);
        if self.budget.exceeded.get() {
            return Err(UnpackError::TooLarge { limit: self.max_bytes });
        }
        result
    }

    fn apply_layer_entries(&mut self, layer: &Layer) -> Result<()> {
        let budgeted =
            BudgetedReader { inner: open_layer(&layer.blob)?, budget: Rc::clone(&self.budget) };
        let reader = HashingReader { inner: budgeted, hasher: Sha256::new() };
        let mut archive = tar::Archive::new(reader);
        // Paths created by this layer: an opaque marker only hides what lower layers made.
        let mut created: HashSet<PathBuf> = HashSet::new();
        let entries = archive.entries().map_err(UnpackError::ReadTar)?;
        for entry in entries {
            let mut entry = entry.map_err(UnpackError::ReadTar)?;
            self.apply_entry(&mut entry, &mut created)?;
        }
        let mut reader = archive.into_inner();
        // The tar end-of-archive blocks and any padding are part of the diff id.
        io::copy(&mut reader, &mut io::sink()).map_err(UnpackError::ReadTar)?;
        if let Some(expected) = &layer.diff_id {
            let actual = format!("sha256:{}", hex::encode(reader.hasher.finalize()));
            if expected.starts_with("sha256:") && &actual != expected {
                return Err(UnpackError::DiffIdMismatch { expected: expected.clone(), actual });
            }
        }
        Ok(())
    }

    fn apply_entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        created: &mut HashSet<PathBuf>,
    ) -> Result<()> {
        let name = entry.path_bytes().into_owned();
        let entry_type = entry.header().entry_type();
        let base = Path::new(OsStr::from_bytes(&name))
            .file_name()
            .map(|n| n.as_bytes().to_vec())
            .unwrap_or_default();

        if base.starts_with(WHITEOUT_PREFIX.as_bytes()) {
            return self.apply_whiteout(&name, &base, created);
        }

        let Some(path) = self.entry_path(&name)? else {
            // "./": the root directory's own metadata.
            if entry_type.is_dir() {
                let root = self.root.clone();
                self.apply_metadata(entry, &root)?;
            }
            return Ok(());
        };

        match entry_type {
            tar::EntryType::Directory => {
                let existing = fs::symlink_metadata(&path).ok();
                if !existing.is_some_and(|m| m.is_dir()) {
                    remove_any(&path)?;
                    fs::create_dir(&path)
                        .map_err(|source| UnpackError::Create { path: path.clone(), source })?;
                }
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                remove_any(&path)?;
                let mut file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .mode(0o600)
                    .open(&path)
                    .map_err(|source| UnpackError::Create { path: path.clone(), source })?;
                io::copy(entry, &mut file)
                    .map_err(|source| UnpackError::Create { path: path.clone(), source })?;
            }
            tar::EntryType::Symlink => {
                let target = entry.link_name_bytes().map(|t| t.into_owned()).unwrap_or_default();
                remove_any(&path)?;
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), &path)
                    .map_err(|source| UnpackError::Create { path: path.clone(), source })?;
            }
            tar::EntryType::Link => {
                let target_name =
                    entry.link_name_bytes().map(|t| t.into_owned()).unwrap_or_default();
                let bad_link =
                    || UnpackError::BadHardLink { path: lossy(&name), target: lossy(&target_name) };
                let components = clean_components(&target_name).ok_or_else(bad_link)?;
                if components.is_empty() {
                    return Err(bad_link());
                }
                let target = self.resolve(&components, false, &target_name)?;
                let target_is_file = fs::symlink_metadata(&target).is_ok_and(|m| !m.is_dir());
                if !target.starts_with(&self.root) || !target_is_file {
                    return Err(bad_link());
                }
                if target != path {
                    remove_any(&path)?;
                    fs::hard_link(&target, &path)
                        .map_err(|source| UnpackError::Create { path: path.clone(), source })?;
                }
                created.insert(path);
                // A hard link shares the target's inode and metadata.
                return Ok(());
            }
            tar::EntryType::Fifo => {
                remove_any(&path)?;
                nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600))
                    .map_err(|errno| UnpackError::Create {
                        path: path.clone(),
                        source: io::Error::from(errno),
                    })?;
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                // The guest's /dev is a devtmpfs: device nodes from images are never used.
                debug!(path = %path.display(), "skipping device node");
                return Ok(());
            }
            other => {
                debug!(path = %path.display(), ?other, "skipping tar entry type");
                return Ok(());
            }
        }
        self.apply_metadata(entry, &path)?;
        created.insert(path);
        Ok(())
    }

    fn apply_whiteout(
        &mut self,
        name: &[u8],
        base: &[u8],
        created: &HashSet<PathBuf>,
    ) -> Result<()> {
        let Some(marker) = self.entry_path(name)? else {
            return Ok(());
        };
        let Some(dir) = marker.parent().map(Path::to_owned) else {
            return Ok(());
        };
        if base == WHITEOUT_OPAQUE.as_bytes() {
            prune_lower_content(&dir, created)?;
        } else if !base.starts_with(WHITEOUT_META_PREFIX.as_bytes()) {
            let hidden = &base[WHITEOUT_PREFIX.len()..];
            if hidden.is_empty() || hidden == b"." || hidden == b".." || hidden.contains(&b'/') {
                return Err(UnpackError::UnsafePath { path: lossy(name) });
            }
            remove_any(&dir.join(OsStr::from_bytes(hidden)))?;
        }
        Ok(())
    }

    fn apply_metadata<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        path: &Path,
    ) -> Result<()> {
        let header = entry.header().clone();
        let is_symlink = header.entry_type().is_symlink();
        if self.chown {
            let uid = header.uid().ok().and_then(|v| u32::try_from(v).ok()).unwrap_or(0);
            let gid = header.gid().ok().and_then(|v| u32::try_from(v).ok()).unwrap_or(0);
            nix::unistd::fchownat(
                None,
                path,
                Some(nix::unistd::Uid::from_raw(uid)),
                Some(nix::unistd::Gid::from_raw(gid)),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map_err(|source| UnpackError::Chown { path: path.to_owned(), source })?;
        }
        // After chown, which clears set-id bits.
        if !is_symlink {
            let mode = header.mode().unwrap_or(0o644) & 0o7777;
            fs::set_permissions(path, fs::Permissions::from_mode(mode))
                .map_err(|source| UnpackError::Chmod { path: path.to_owned(), source })?;
        }
        if let Ok(Some(extensions)) = entry.pax_extensions() {
            for extension in extensions.flatten() {
                let Ok(key) = extension.key() else { continue };
                let Some(attribute) = key.strip_prefix("SCHILY.xattr.") else {
                    continue;
                };
                if let Err(source) = xattr::set(path, attribute, extension.value_bytes()) {
                    if source.raw_os_error() == Some(libc::ENOTSUP) {
                        debug!(path = %path.display(), attribute, "xattr not supported here");
                        continue;
                    }
                    return Err(UnpackError::Xattr {
                        path: path.to_owned(),
                        name: attribute.to_owned(),
                        source,
                    });
                }
            }
        }
        let mtime = filetime::FileTime::from_unix_time(header.mtime().unwrap_or(0) as i64, 0);
        if header.entry_type().is_dir() {
            self.dir_mtimes.insert(path.to_owned(), mtime);
        } else {
            filetime::set_symlink_file_times(path, mtime, mtime)
                .map_err(|source| UnpackError::Mtime { path: path.to_owned(), source })?;
        }
        Ok(())
    }
}

/// Makes `dir` opaque: removes everything beneath it that this layer did not create, also
/// inside subdirectories this layer re-declared.
fn prune_lower_content(dir: &Path, created: &HashSet<PathBuf>) -> Result<()> {
    let children = match fs::read_dir(dir) {
        Ok(children) => children,
        Err(_) => return Ok(()),
    };
    for child in children {
        let child =
            child.map_err(|source| UnpackError::Remove { path: dir.to_owned(), source })?.path();
        if !created.contains(&child) {
            remove_any(&child)?;
        } else if fs::symlink_metadata(&child).is_ok_and(|m| m.is_dir()) {
            prune_lower_content(&child, created)?;
        }
    }
    Ok(())
}

/// Removes whatever is at `path` (file, symlink, or directory tree); absent is fine.
fn remove_any(path: &Path) -> Result<()> {
    let result = match fs::symlink_metadata(path) {
        Err(_) => return Ok(()),
        Ok(metadata) if metadata.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
    };
    result.map_err(|source| UnpackError::Remove { path: path.to_owned(), source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use podvisor_e2e::images::LayerBuilder;

    fn write_layer(dir: &Path, name: &str, tar: Vec<u8>) -> Layer {
        let blob = dir.join(name);
        fs::write(&blob, tar).unwrap();
        Layer { blob, diff_id: None }
    }

    #[test]
    fn refuses_parent_traversal() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        fs::create_dir(&root).unwrap();
        let tar = LayerBuilder::new()
            .raw_entry(b"../escape", tar::EntryType::Regular, None, b"x")
            .unwrap()
            .finish()
            .unwrap();
        let layer = write_layer(dir.path(), "l", tar);
        let err = unpack_layers(&[layer], &root, u64::MAX).unwrap_err();
        assert!(matches!(err, UnpackError::UnsafePath { .. }), "{err}");
        assert!(!dir.path().join("escape").exists());
    }

    #[test]
    fn keeps_absolute_paths_and_symlinked_parents_inside_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let outside = dir.path().join("outside");
        fs::create_dir(&root).unwrap();
        fs::create_dir(&outside).unwrap();
        let tar = LayerBuilder::new()
            .raw_entry(b"/abs.txt", tar::EntryType::Regular, None, b"abs")
            .unwrap()
            // A symlink to a host directory, then a file "through" it.
            .symlink("evil", outside.to_str().unwrap())
            .unwrap()
            .raw_entry(b"evil/pwned", tar::EntryType::Regular, None, b"x")
            .unwrap()
            .symlink("up", "../../../..")
            .unwrap()
            .raw_entry(b"up/pwned2", tar::EntryType::Regular, None, b"x")
            .unwrap()
            .finish()
            .unwrap();
        let layer = write_layer(dir.path(), "l", tar);
        unpack_layers(&[layer], &root, u64::MAX).unwrap();
        assert_eq!(fs::read(root.join("abs.txt")).unwrap(), b"abs");
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
        // The link target was re-rooted: the file landed inside the image.
        let inside = root.join(outside.strip_prefix("/").unwrap()).join("pwned");
        assert!(inside.exists());
        assert!(root.join("pwned2").exists());
        assert!(!dir.path().join("pwned2").exists());
    }

    #[test]
    fn refuses_hard_link_outside_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        fs::create_dir(&root).unwrap();
        let tar = LayerBuilder::new()
            .raw_entry(b"passwd", tar::EntryType::Link, Some(b"../../etc/passwd"), b"")
            .unwrap()
            .finish()
            .unwrap();
        let layer = write_layer(dir.path(), "l", tar);
        let err = unpack_layers(&[layer], &root, u64::MAX).unwrap_err();
        assert!(matches!(err, UnpackError::BadHardLink { .. }), "{err}");
    }

    #[test]
    fn applies_whiteouts_opaque_dirs_and_links() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        fs::create_dir(&root).unwrap();
        let lower = LayerBuilder::new()
            .dir("d", 0o755)
            .unwrap()
            .file("d/a", b"a", 0o644)
            .unwrap()
            .dir("d/sub", 0o755)
            .unwrap()
            .file("d/sub/lower", b"l", 0o644)
            .unwrap()
            .file("gone", b"g", 0o644)
            .unwrap()
            .file("keep", b"k", 0o640)
            .unwrap()
            .finish()
            .unwrap();
        let upper = LayerBuilder::new()
            .file("d/new", b"n", 0o644)
            .unwrap()
            .dir("d/sub", 0o755)
            .unwrap()
            .opaque("d")
            .unwrap()
            .whiteout("gone")
            .unwrap()
            .hardlink("hl", "keep")
            .unwrap()
            .symlink("sl", "keep")
            .unwrap()
            .raw_entry(b"dev-null", tar::EntryType::Char, None, b"")
            .unwrap()
            .finish()
            .unwrap();
        let layers = [write_layer(dir.path(), "l0", lower), write_layer(dir.path(), "l1", upper)];
        unpack_layers(&layers, &root, u64::MAX).unwrap();
        assert!(!root.join("d/a").exists());
        assert!(root.join("d/sub").is_dir());
        assert!(!root.join("d/sub/lower").exists());
        assert_eq!(fs::read(root.join("d/new")).unwrap(), b"n");
        assert!(!root.join("gone").exists());
        assert!(!root.join(".wh.gone").exists());
        assert!(!root.join("d/.wh..wh..opq").exists());
        assert!(!root.join("dev-null").exists());
        assert_eq!(fs::read(root.join("hl")).unwrap(), b"k");
        assert_eq!(fs::read_link(root.join("sl")).unwrap(), Path::new("keep"));
        let mode = fs::metadata(root.join("keep")).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o640);
    }

    /// A layer that decompresses past the limit (a small gzip of zeros, here split over two
    /// layers) is cut off there, not written out whole.
    #[test]
    fn unpacking_stops_at_the_size_limit() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        fs::create_dir(&root).unwrap();
        let zeros = vec![0u8; 4 << 20];
        let lower = LayerBuilder::new().file("a", &zeros, 0o644).unwrap().finish().unwrap();
        let upper = LayerBuilder::new().file("b", &zeros, 0o644).unwrap().finish().unwrap();
        let gzip = |tar: Vec<u8>| {
            use std::io::Write;
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
            enc.write_all(&tar).unwrap();
            enc.finish().unwrap()
        };
        let (lower, upper) = (gzip(lower), gzip(upper));
        assert!(lower.len() < 64 * 1024, "the bomb is small: {} bytes", lower.len());
        let layers = [write_layer(dir.path(), "l0", lower), write_layer(dir.path(), "l1", upper)];
        // Room for the first layer, not for both.
        let err = unpack_layers(&layers, &root, 6 << 20).unwrap_err();
        assert!(matches!(err, UnpackError::TooLarge { limit } if limit == 6 << 20), "{err}");
        let written: u64 = ["a", "b"]
            .iter()
            .filter_map(|f| fs::metadata(root.join(f)).ok())
            .map(|m| m.len())
            .sum();
        assert!(written <= 6 << 20, "{written} bytes written");
        // Both fit in a larger budget.
        let root2 = dir.path().join("root2");
        fs::create_dir(&root2).unwrap();
        unpack_layers(&layers, &root2, 9 << 20).unwrap();
        assert_eq!(fs::metadata(root2.join("b")).unwrap().len(), 4 << 20);
    }
}
