//! A sandbox's shared directory, served into the guest by virtio-fs.
//!
//! The guest must see only what it was given, yet images and volumes are added while the VM
//! runs. As Kata does: `mounts/` is a private-then-shared bind mount where the daemon
//! bind-mounts what a container needs; `shared/` is a read-only slave bind of `mounts/`, and
//! virtiofsd serves `shared/`. New mounts under `mounts/` propagate into `shared/` (and into
//! virtiofsd's own mount namespace), while nothing the guest does can write through.
//!
//! The share holds secret volumes and service-account tokens, and image trees with set-uid
//! binaries: its directories are 0700, and read-only views are also nosuid and nodev, so a
//! host user reaching them anyway can neither read them nor gain privileges from them.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    #[error("creating {path}: {source}")]
    CreateDir { path: PathBuf, source: std::io::Error },
    #[error("making {path} private: {source}")]
    SetMode { path: PathBuf, source: std::io::Error },
    #[error("creating mount target {path}: {source}")]
    CreateTarget { path: PathBuf, source: std::io::Error },
    #[error("mounting {what} at {path}: {source}")]
    Mount { what: String, path: PathBuf, source: nix::Error },
    #[error("unmounting {path}: {source}")]
    Unmount { path: PathBuf, source: nix::Error },
    #[error("{path} still has mounts under it after unmounting; not removing it")]
    StillMounted { path: PathBuf },
    #[error("removing {path}: {source}")]
    Remove { path: PathBuf, source: std::io::Error },
    #[error("invalid share-relative path {0:?}")]
    BadRelativePath(String),
}

/// How a bind's tree may be written from the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    ReadWrite,
    /// The bind itself is read-only; mounts below it keep their own flags (runc's `ro`).
    ReadOnly,
    /// The bind and every mount below it are read-only (`mount_setattr(AT_RECURSIVE)`).
    RecursiveReadOnly,
}

/// The access and propagation of one bind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BindMode {
    pub access: Access,
    /// Mounts made on the host under the source later appear in the bind (an rslave bind).
    pub receive_host_mounts: bool,
}

/// The per-sandbox shared directory pair.
#[derive(Debug, Clone)]
pub struct SandboxShare {
    base: PathBuf,
}

impl SandboxShare {
    pub fn new(base: &Path) -> Self {
        Self { base: base.to_path_buf() }
    }

    /// Where the daemon mounts things (read-write for the daemon only).
    pub fn mounts_dir(&self) -> PathBuf {
        self.base.join("mounts")
    }

    /// What virtiofsd serves to the guest (read-only view of `mounts`).
    pub fn shared_dir(&self) -> PathBuf {
        self.base.join("shared")
    }

    /// A private mount where read-only binds are made read-only before they enter `mounts`:
    /// a remount is not propagated, so a bind made read-only in `mounts` would stay writable in
    /// `shared`; a bind of an already read-only mount propagates as read-only.
    fn staging_dir(&self) -> PathBuf {
        self.base.join("staging")
    }

    /// Sets up both directories and their propagation. Idempotent.
    pub fn create(&self) -> Result<(), ShareError> {
        let mounts = self.mounts_dir();
        let shared = self.shared_dir();
        let staging = self.staging_dir();
        for dir in [&mounts, &shared, &staging] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|source| ShareError::CreateDir { path: dir.clone(), source })?;
        }
        // Also tightens the directories of a share an older daemon made (`shared` is a view of
        // `mounts`, so it follows).
        for dir in [&self.base, &mounts] {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|source| ShareError::SetMode { path: dir.clone(), source })?;
        }
        if !is_mount_point(&staging) {
            bind(&staging, &staging, MsFlags::empty())?;
            remount_propagation(&staging, MsFlags::MS_PRIVATE)?;
        }
        if !is_mount_point(&mounts) {
            bind(&mounts, &mounts, MsFlags::empty())?;
            // Private first, so our mounts never propagate into the host's peer groups.
            remount_propagation(&mounts, MsFlags::MS_PRIVATE)?;
            remount_propagation(&mounts, MsFlags::MS_SHARED)?;
        }
        if !is_mount_point(&shared) {
            bind(&mounts, &shared, MsFlags::empty())?;
            remount_propagation(&shared, MsFlags::MS_SLAVE)?;
            remount_read_only(&shared)?;
        }
        Ok(())
    }

    /// Bind-mounts `source` (a directory or a file) at `rel` under the share, read-only if
    /// asked. Returns the path the guest sees, relative to its shared-dir mount point.
    /// Mounting the same `rel` twice is a no-op.
    pub fn bind(&self, source: &Path, rel: &str, read_only: bool) -> Result<PathBuf, ShareError> {
        let access = if read_only { Access::ReadOnly } else { Access::ReadWrite };
        self.bind_with(source, rel, BindMode { access, receive_host_mounts: false })
    }

    /// [`bind`](Self::bind) with the access and propagation of `mode`.
    ///
    /// Every bind is staged in the private staging directory, where its propagation is set
    /// before it joins `mounts`: a bind of a host path on a shared mount is otherwise a peer of
    /// that mount, and unmounting its submounts later would unmount them on the host too.
    pub fn bind_with(
        &self,
        source: &Path,
        rel: &str,
        mode: BindMode,
    ) -> Result<PathBuf, ShareError> {
        let rel_path = checked_relative(rel)?;
        let target = self.mounts_dir().join(&rel_path);
        if is_mount_point(&target) {
            return Ok(rel_path);
        }
        let is_dir = std::fs::metadata(source).map(|m| m.is_dir()).unwrap_or(true);
        make_mount_point(&target, is_dir)?;
        let stage = self.staging_dir().join(rel.replace('/', "_"));
        make_mount_point(&stage, is_dir)?;
        // A slave keeps receiving the host's new mounts under `source`; a private bind does not.
        let propagation =
            if mode.receive_host_mounts { MsFlags::MS_SLAVE } else { MsFlags::MS_PRIVATE };
        let staged = bind(source, &stage, MsFlags::MS_REC)
            .and_then(|()| remount_propagation(&stage, propagation | MsFlags::MS_REC))
            .and_then(|()| match mode.access {
                Access::ReadWrite => Ok(()),
                Access::ReadOnly => remount_read_only(&stage),
                Access::RecursiveReadOnly => set_recursive_read_only(&stage),
            })
            .and_then(|()| bind(&stage, &target, MsFlags::MS_REC));
        let cleared = detach_all_under(&stage).and_then(|()| remove_if_unmounted(&stage));
        staged?;
        cleared?;
        Ok(rel_path)
    }

    /// Whether `rel` holds a bind of something other than `source` now: an image tree that
    /// was removed and pulled again is a new directory, and the old bind shows the old,
    /// emptied one. (While bound, the old directory keeps its inode, so a new tree cannot
    /// have the same device and inode numbers.)
    pub fn holds_other_than(&self, rel: &str, source: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        let Ok(rel_path) = checked_relative(rel) else { return false };
        let target = self.mounts_dir().join(rel_path);
        if !is_mount_point(&target) {
            return false;
        }
        match (std::fs::metadata(&target), std::fs::metadata(source)) {
            (Ok(t), Ok(s)) => (t.dev(), t.ino()) != (s.dev(), s.ino()),
            _ => false,
        }
    }

    /// Unmounts what was bound at `rel` (and below) and removes the mount point.
    pub fn unbind(&self, rel: &str) -> Result<(), ShareError> {
        let target = self.mounts_dir().join(checked_relative(rel)?);
        detach_all_under(&target)?;
        remove_if_unmounted(&target)
    }

    /// Unmounts everything and removes the directories. Safe to call again.
    pub fn destroy(&self) -> Result<(), ShareError> {
        detach_all_under(&self.base)?;
        remove_if_unmounted(&self.base)
    }
}

/// Creates `target` (and its parents) as a directory or an empty file to mount on.
fn make_mount_point(target: &Path, is_dir: bool) -> Result<(), ShareError> {
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|source| ShareError::CreateTarget { path: parent.into(), source })?;
    }
    let made = if is_dir {
        std::fs::create_dir_all(target)
    } else {
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(target)
            .map(|_| ())
    };
    made.map_err(|source| ShareError::CreateTarget { path: target.into(), source })
}

fn checked_relative(rel: &str) -> Result<PathBuf, ShareError> {
    let p = Path::new(rel);
    let ok =
        !rel.is_empty() && p.components().all(|c| matches!(c, std::path::Component::Normal(_)));
    if ok {
        Ok(p.to_path_buf())
    } else {
        Err(ShareError::BadRelativePath(rel.into()))
    }
}

fn bind(source: &Path, target: &Path, extra: MsFlags) -> Result<(), ShareError> {
    mount(Some(source), target, None::<&str>, MsFlags::MS_BIND | extra, None::<&str>).map_err(|e| {
        ShareError::Mount {
            what: format!("bind of {}", source.display()),
            path: target.into(),
            source: e,
        }
    })
}

fn remount_propagation(target: &Path, flag: MsFlags) -> Result<(), ShareError> {
    mount(None::<&str>, target, None::<&str>, flag, None::<&str>).map_err(|e| ShareError::Mount {
        what: format!("{flag:?}"),
        path: target.into(),
        source: e,
    })
}

/// Read-only, nosuid and nodev: image trees are not the host's to run set-uid binaries or
/// open devices from.
fn remount_read_only(target: &Path) -> Result<(), ShareError> {
    mount(
        None::<&str>,
        target,
        None::<&str>,
        MsFlags::MS_REMOUNT
            | MsFlags::MS_BIND
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV,
        None::<&str>,
    )
    .map_err(|e| ShareError::Mount {
        what: "read-only remount".into(),
        path: target.into(),
        source: e,
    })
}

/// `struct mount_attr` of mount_setattr(2).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;

/// Makes `target` and every mount below it read-only, nosuid and nodev in one call.
fn set_recursive_read_only(target: &Path) -> Result<(), ShareError> {
    use std::os::unix::ffi::OsStrExt;
    let fail = |source| ShareError::Mount {
        what: "recursive read-only mount_setattr".into(),
        path: target.into(),
        source,
    };
    let path = std::ffi::CString::new(target.as_os_str().as_bytes())
        .map_err(|_| fail(nix::Error::EINVAL))?;
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: `path` is a NUL-terminated string and `attr` a live `struct mount_attr` whose
    // size is passed with it; the kernel only reads both.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            path.as_ptr(),
            libc::AT_RECURSIVE | libc::AT_SYMLINK_NOFOLLOW,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(fail(nix::Error::last()))
    }
}

/// Mount points at or below `path`, deepest first, from /proc/self/mountinfo.
fn mounts_under(path: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(unescape_mountinfo)
        .filter(|p| p.starts_with(path))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    found
}

fn unescape_mountinfo(field: &str) -> PathBuf {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    use std::os::unix::ffi::OsStringExt;
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// Whether new mounts under `path` (a canonical host path) propagate out of its mount: the
/// mount holding it is shared or a slave, as runc needs for rslave and rshared volumes.
pub fn mount_propagates(path: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let holder = info
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let point = unescape_mountinfo(fields.get(4)?);
            path.starts_with(&point).then_some((point, fields))
        })
        // The deepest mount point wins; of stacked mounts at it, the last one listed.
        .max_by_key(|(point, _)| point.components().count());
    holder.is_some_and(|(_, fields)| {
        fields
            .iter()
            .skip(6)
            .take_while(|f| **f != "-")
            .any(|f| f.starts_with("shared:") || f.starts_with("master:"))
    })
}

/// Whether there are mounts strictly below `path` (a canonical host path).
pub fn has_mounts_below(path: &Path) -> bool {
    mounts_under(path).iter().any(|p| p != path)
}

pub fn is_mount_point(path: &Path) -> bool {
    let Ok(canonical) = std::fs::canonicalize(path) else { return false };
    mounts_under(&canonical).iter().any(|p| p == &canonical)
}

fn detach_all_under(path: &Path) -> Result<(), ShareError> {
    let Ok(canonical) = std::fs::canonicalize(path) else { return Ok(()) };
    for m in mounts_under(&canonical) {
        match umount2(&m, MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => {}
            Err(source) => return Err(ShareError::Unmount { path: m, source }),
        }
    }
    Ok(())
}

/// Removes `path` only when no mount is left below it: a recursive delete must never walk
/// into a bind-mounted image or volume.
fn remove_if_unmounted(path: &Path) -> Result<(), ShareError> {
    let Ok(canonical) = std::fs::canonicalize(path) else { return Ok(()) };
    if !mounts_under(&canonical).is_empty() {
        return Err(ShareError::StillMounted { path: canonical });
    }
    let res = match std::fs::symlink_metadata(&canonical) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(&canonical),
        Ok(_) => std::fs::remove_file(&canonical),
        Err(e) => Err(e),
    };
    match res {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(ShareError::Remove { path: canonical, source: e })
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    #[test]
    fn relative_paths_are_checked() {
        assert!(checked_relative("images/abc").is_ok());
        assert!(checked_relative("../x").is_err());
        assert!(checked_relative("/abs").is_err());
        assert!(checked_relative("").is_err());
    }

    #[test]
    fn mountinfo_unescaping() {
        assert_eq!(unescape_mountinfo("/a\\040b"), PathBuf::from("/a b"));
    }

    #[test]
    fn binds_propagate_read_only_and_destroy_leaves_sources_intact() {
        if !is_root() {
            eprintln!("skipped: needs root for mounts");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("image");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("file"), b"content").unwrap();
        let share = SandboxShare::new(&dir.path().join("sb"));
        share.create().unwrap();
        share.create().unwrap();
        let rel = share.bind(&src, "images/one", true).unwrap();
        share.bind(&src, "images/one", true).unwrap();
        let seen = share.shared_dir().join(&rel).join("file");
        assert_eq!(std::fs::read(&seen).unwrap(), b"content");
        // Read-only in both views (the served one is what the guest reaches).
        assert!(std::fs::write(share.mounts_dir().join(&rel).join("new"), b"x").is_err());
        assert!(std::fs::write(share.shared_dir().join(&rel).join("new"), b"x").is_err());
        assert!(std::fs::write(share.shared_dir().join("new"), b"x").is_err());
        share.unbind("images/one").unwrap();
        assert!(!seen.exists());
        share.bind(&src, "images/two", true).unwrap();
        share.destroy().unwrap();
        share.destroy().unwrap();
        assert!(!dir.path().join("sb").exists());
        assert_eq!(std::fs::read(src.join("file")).unwrap(), b"content");
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    /// Secret volumes and image trees are out of other host users' reach, and a read-only
    /// image bind cannot lend its set-uid binaries or device nodes to the host.
    #[test]
    fn share_is_private_and_read_only_binds_are_nosuid_nodev() {
        use nix::sys::statvfs::{statvfs, FsFlags};
        if !is_root() {
            eprintln!("skipped: needs root for mounts");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("image");
        std::fs::create_dir_all(&src).unwrap();
        let base = dir.path().join("sb/share");
        // A share left by an older daemon, world-readable.
        std::fs::create_dir_all(base.join("mounts")).unwrap();
        for d in [&base, &base.join("mounts")] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let share = SandboxShare::new(&base);
        share.create().unwrap();
        for d in [base.clone(), share.mounts_dir(), share.shared_dir(), share.staging_dir()] {
            assert_eq!(mode(&d), 0o700, "{}", d.display());
        }
        let rel = share.bind(&src, "images/one", true).unwrap();
        for view in
            [share.shared_dir(), share.mounts_dir().join(&rel), share.shared_dir().join(&rel)]
        {
            let flags = statvfs(&view).unwrap().flags();
            for want in [FsFlags::ST_RDONLY, FsFlags::ST_NOSUID, FsFlags::ST_NODEV] {
                assert!(flags.contains(want), "{} lacks {want:?}: {flags:?}", view.display());
            }
        }
        share.destroy().unwrap();
    }

    /// The volume share: a read-write bind is writable through the served view, while the
    /// view's own root stays read-only (a guest cannot fill the host's share directory).
    #[test]
    fn read_write_binds_stay_writable_under_the_read_only_view() {
        if !is_root() {
            eprintln!("skipped: needs root for mounts");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("volume");
        std::fs::create_dir_all(&src).unwrap();
        let share = SandboxShare::new(&dir.path().join("sb"));
        share.create().unwrap();
        let rel = share.bind(&src, "c1/0", false).unwrap();
        std::fs::write(share.shared_dir().join(&rel).join("written"), b"from guest").unwrap();
        assert_eq!(std::fs::read(src.join("written")).unwrap(), b"from guest");
        assert!(std::fs::write(share.shared_dir().join("stray"), b"x").is_err());
        share.destroy().unwrap();
        assert_eq!(std::fs::read(src.join("written")).unwrap(), b"from guest");
    }

    /// A volume whose host path holds a submount, on a shared host mount (as /var/lib/kubelet
    /// is): `ro` leaves the submount writable, `rro` does not, an rslave bind receives a host
    /// mount made later, and unbinding never unmounts the host's own submount.
    #[test]
    fn submounts_propagation_and_recursive_read_only() {
        if !is_root() {
            eprintln!("skipped: needs root for mounts");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("volume");
        std::fs::create_dir_all(src.join("sub")).unwrap();
        std::fs::create_dir_all(src.join("later")).unwrap();
        let flag = |p: &Path, f| mount(None::<&str>, p, None::<&str>, f, None::<&str>).unwrap();
        bind(&src, &src, MsFlags::empty()).unwrap();
        flag(&src, MsFlags::MS_PRIVATE);
        flag(&src, MsFlags::MS_SHARED);
        mount(Some("tmpfs"), &src.join("sub"), Some("tmpfs"), MsFlags::empty(), None::<&str>)
            .unwrap();
        let share = SandboxShare::new(&dir.path().join("sb"));
        share.create().unwrap();
        let ro = BindMode { access: Access::ReadOnly, receive_host_mounts: true };
        let rro = BindMode { access: Access::RecursiveReadOnly, receive_host_mounts: false };
        let ro_rel = share.bind_with(&src, "c/ro", ro).unwrap();
        let rro_rel = share.bind_with(&src, "c/rro", rro).unwrap();
        let served = |rel: &Path, file: &str| share.shared_dir().join(rel).join(file);
        assert!(std::fs::write(served(&ro_rel, "top"), b"x").is_err());
        std::fs::write(served(&ro_rel, "sub/file"), b"x").unwrap();
        assert!(std::fs::write(served(&rro_rel, "sub/file2"), b"x").is_err());
        assert!(has_mounts_below(&src));
        assert!(mount_propagates(&src));

        mount(Some("tmpfs"), &src.join("later"), Some("tmpfs"), MsFlags::empty(), None::<&str>)
            .unwrap();
        std::fs::write(src.join("later/new"), b"later").unwrap();
        assert_eq!(std::fs::read(served(&ro_rel, "later/new")).unwrap(), b"later");
        assert!(!served(&rro_rel, "later/new").exists(), "a private bind took a host mount");

        share.destroy().unwrap();
        assert_eq!(std::fs::read(src.join("sub/file")).unwrap(), b"x");
        assert_eq!(std::fs::read(src.join("later/new")).unwrap(), b"later");
        for m in ["later", "sub"] {
            umount2(&src.join(m), MntFlags::MNT_DETACH).unwrap();
        }
        umount2(&src, MntFlags::MNT_DETACH).unwrap();
    }
}
