//! A [`FileSystem`] that translates file owners around another one (the passthrough file
//! system), where virtiofsd translates them (`passthrough/mod.rs` of virtiofsd 1.14):
//! - guest → host: the caller's uid and gid of every request (what new files are owned by:
//!   the passthrough switches to them for MKNOD, MKDIR, SYMLINK, LINK, CREATE), and the uid
//!   and gid a SETATTR sets (chown);
//! - host → guest: the owner in every attribute a reply carries (LOOKUP, GETATTR, SETATTR,
//!   MKNOD, MKDIR, SYMLINK, LINK, CREATE, READDIRPLUS entries), and the owner ACCESS checks the
//!   guest's caller against.
//!
//! A wrapper of the trait rather than a rewrite of reply bytes: the trait hands every id over
//! as a typed field (`Context`, `Entry::attr`, `stat64`, SETATTR's `valid` mask), so no FUSE
//! layout is parsed twice, and an opcode fuse-backend-rs adds later reaches the wrapper as a
//! trait method or not at all (the trait's default: ENOSYS) — never untranslated.
//! The passthrough has no STATX or TMPFILE (they answer ENOSYS) and serves no xattrs, so no
//! POSIX ACL carries ids (virtiofsd refuses translation with ACLs for that reason).

use std::ffi::CStr;
use std::io;
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{
    stat64, statvfs64, CreateIn, FsOptions, OpenOptions, SetattrValid,
};
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileLock, FileSystem, GetxattrReply, IoctlData, ListxattrReply,
    ZeroCopyReader, ZeroCopyWriter,
};

use crate::idmap::IdMaps;

/// `inner`, its owners translated by `ids`.
pub struct Translated<F> {
    inner: F,
    ids: IdMaps,
}

impl<F> Translated<F> {
    pub fn new(inner: F, ids: IdMaps) -> Self {
        Self { inner, ids }
    }

    pub fn inner(&self) -> &F {
        &self.inner
    }

    /// The request's caller as the host's ids.
    fn host(&self, ctx: &Context) -> Context {
        Context { uid: self.ids.uids.host(ctx.uid), gid: self.ids.gids.host(ctx.gid), ..*ctx }
    }

    fn attr(&self, mut st: stat64) -> stat64 {
        st.st_uid = self.ids.uids.guest(st.st_uid);
        st.st_gid = self.ids.gids.guest(st.st_gid);
        st
    }

    fn entry(&self, mut entry: Entry) -> Entry {
        entry.attr = self.attr(entry.attr);
        entry
    }

    fn attr_reply(&self, reply: io::Result<(stat64, Duration)>) -> io::Result<(stat64, Duration)> {
        reply.map(|(st, timeout)| (self.attr(st), timeout))
    }
}

/// virtiofsd's ACCESS check (its `access`), on the owner as the guest sees it and the guest's
/// caller: root reads and writes anything and executes what anyone may.
fn access_allowed(st: &stat64, ctx: &Context, mask: u32) -> bool {
    let mode = mask as i32 & (libc::R_OK | libc::W_OK | libc::X_OK);
    let (owner, group) = (st.st_uid == ctx.uid, st.st_gid == ctx.gid);
    let may = |bits: u32| {
        (owner && st.st_mode & (bits << 6) != 0)
            || (group && st.st_mode & (bits << 3) != 0)
            || st.st_mode & bits != 0
    };
    let root = ctx.uid == 0;
    let read = mode & libc::R_OK == 0 || root || may(0o4);
    let write = mode & libc::W_OK == 0 || root || may(0o2);
    let exec = mode & libc::X_OK == 0 || (root && st.st_mode & 0o111 != 0) || may(0o1);
    read && write && exec
}

impl<F: FileSystem> FileSystem for Translated<F> {
    type Inode = F::Inode;
    type Handle = F::Handle;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        self.inner.init(capable)
    }

    fn destroy(&self) {
        self.inner.destroy()
    }

    fn lookup(&self, ctx: &Context, parent: Self::Inode, name: &CStr) -> io::Result<Entry> {
        self.inner.lookup(&self.host(ctx), parent, name).map(|e| self.entry(e))
    }

    fn forget(&self, ctx: &Context, inode: Self::Inode, count: u64) {
        self.inner.forget(&self.host(ctx), inode, count)
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(Self::Inode, u64)>) {
        self.inner.batch_forget(&self.host(ctx), requests)
    }

    fn getattr(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Option<Self::Handle>,
    ) -> io::Result<(stat64, Duration)> {
        self.attr_reply(self.inner.getattr(&self.host(ctx), inode, handle))
    }

    fn setattr(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        mut attr: stat64,
        handle: Option<Self::Handle>,
        valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        if valid.contains(SetattrValid::UID) {
            attr.st_uid = self.ids.uids.host(attr.st_uid);
        }
        if valid.contains(SetattrValid::GID) {
            attr.st_gid = self.ids.gids.host(attr.st_gid);
        }
        self.attr_reply(self.inner.setattr(&self.host(ctx), inode, attr, handle, valid))
    }

    fn readlink(&self, ctx: &Context, inode: Self::Inode) -> io::Result<Vec<u8>> {
        self.inner.readlink(&self.host(ctx), inode)
    }

    fn symlink(
        &self,
        ctx: &Context,
        linkname: &CStr,
        parent: Self::Inode,
        name: &CStr,
    ) -> io::Result<Entry> {
        self.inner.symlink(&self.host(ctx), linkname, parent, name).map(|e| self.entry(e))
    }

    fn mknod(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.inner.mknod(&self.host(ctx), inode, name, mode, rdev, umask).map(|e| self.entry(e))
    }

    fn mkdir(
        &self,
        ctx: &Context,
        parent: Self::Inode,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.inner.mkdir(&self.host(ctx), parent, name, mode, umask).map(|e| self.entry(e))
    }

    fn unlink(&self, ctx: &Context, parent: Self::Inode, name: &CStr) -> io::Result<()> {
        self.inner.unlink(&self.host(ctx), parent, name)
    }

    fn rmdir(&self, ctx: &Context, parent: Self::Inode, name: &CStr) -> io::Result<()> {
        self.inner.rmdir(&self.host(ctx), parent, name)
    }

    fn rename(
        &self,
        ctx: &Context,
        olddir: Self::Inode,
        oldname: &CStr,
        newdir: Self::Inode,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        self.inner.rename(&self.host(ctx), olddir, oldname, newdir, newname, flags)
    }

    fn link(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        newparent: Self::Inode,
        newname: &CStr,
    ) -> io::Result<Entry> {
        self.inner.link(&self.host(ctx), inode, newparent, newname).map(|e| self.entry(e))
    }

    fn open(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<Self::Handle>, OpenOptions, Option<u32>)> {
        self.inner.open(&self.host(ctx), inode, flags, fuse_flags)
    }

    fn create(
        &self,
        ctx: &Context,
        parent: Self::Inode,
        name: &CStr,
        args: CreateIn,
    ) -> io::Result<(Entry, Option<Self::Handle>, OpenOptions, Option<u32>)> {
        let (entry, handle, options, passthrough) =
            self.inner.create(&self.host(ctx), parent, name, args)?;
        Ok((self.entry(entry), handle, options, passthrough))
    }

    #[allow(clippy::too_many_arguments)]
    fn read(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        flags: u32,
    ) -> io::Result<usize> {
        self.inner.read(&self.host(ctx), inode, handle, w, size, offset, lock_owner, flags)
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        delayed_write: bool,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<usize> {
        self.inner.write(
            &self.host(ctx),
            inode,
            handle,
            r,
            size,
            offset,
            lock_owner,
            delayed_write,
            flags,
            fuse_flags,
        )
    }

    fn flush(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        lock_owner: u64,
    ) -> io::Result<()> {
        self.inner.flush(&self.host(ctx), inode, handle, lock_owner)
    }

    fn fsync(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        datasync: bool,
        handle: Self::Handle,
    ) -> io::Result<()> {
        self.inner.fsync(&self.host(ctx), inode, datasync, handle)
    }

    fn fallocate(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        self.inner.fallocate(&self.host(ctx), inode, handle, mode, offset, length)
    }

    #[allow(clippy::too_many_arguments)]
    fn release(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        flags: u32,
        handle: Self::Handle,
        flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        self.inner.release(&self.host(ctx), inode, flags, handle, flush, flock_release, lock_owner)
    }

    fn statfs(&self, ctx: &Context, inode: Self::Inode) -> io::Result<statvfs64> {
        self.inner.statfs(&self.host(ctx), inode)
    }

    fn setxattr(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        name: &CStr,
        value: &[u8],
        flags: u32,
    ) -> io::Result<()> {
        self.inner.setxattr(&self.host(ctx), inode, name, value, flags)
    }

    fn getxattr(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        self.inner.getxattr(&self.host(ctx), inode, name, size)
    }

    fn listxattr(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        size: u32,
    ) -> io::Result<ListxattrReply> {
        self.inner.listxattr(&self.host(ctx), inode, size)
    }

    fn removexattr(&self, ctx: &Context, inode: Self::Inode, name: &CStr) -> io::Result<()> {
        self.inner.removexattr(&self.host(ctx), inode, name)
    }

    fn opendir(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        flags: u32,
    ) -> io::Result<(Option<Self::Handle>, OpenOptions)> {
        self.inner.opendir(&self.host(ctx), inode, flags)
    }

    fn readdir(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.inner.readdir(&self.host(ctx), inode, handle, size, offset, add_entry)
    }

    fn readdirplus(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        let mut translated =
            |dir_entry: DirEntry<'_>, entry: Entry| add_entry(dir_entry, self.entry(entry));
        self.inner.readdirplus(&self.host(ctx), inode, handle, size, offset, &mut translated)
    }

    fn fsyncdir(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        datasync: bool,
        handle: Self::Handle,
    ) -> io::Result<()> {
        self.inner.fsyncdir(&self.host(ctx), inode, datasync, handle)
    }

    fn releasedir(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        flags: u32,
        handle: Self::Handle,
    ) -> io::Result<()> {
        self.inner.releasedir(&self.host(ctx), inode, flags, handle)
    }

    /// virtiofsd's check on the guest's view (the passthrough's own would compare the host's
    /// owner with a caller whose translation may not be invertible: squashed ids).
    fn access(&self, ctx: &Context, inode: Self::Inode, mask: u32) -> io::Result<()> {
        let (st, _) = self.getattr(ctx, inode, None)?;
        if access_allowed(&st, ctx, mask) {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(libc::EACCES))
        }
    }

    fn lseek(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        self.inner.lseek(&self.host(ctx), inode, handle, offset, whence)
    }

    fn getlk(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<FileLock> {
        self.inner.getlk(&self.host(ctx), inode, handle, owner, lock, flags)
    }

    fn setlk(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<()> {
        self.inner.setlk(&self.host(ctx), inode, handle, owner, lock, flags)
    }

    fn setlkw(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<()> {
        self.inner.setlkw(&self.host(ctx), inode, handle, owner, lock, flags)
    }

    #[allow(clippy::too_many_arguments)]
    fn ioctl(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        flags: u32,
        cmd: u32,
        data: IoctlData,
        out_size: u32,
    ) -> io::Result<IoctlData<'_>> {
        self.inner.ioctl(&self.host(ctx), inode, handle, flags, cmd, data, out_size)
    }

    fn bmap(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        block: u64,
        blocksize: u32,
    ) -> io::Result<u64> {
        self.inner.bmap(&self.host(ctx), inode, block, blocksize)
    }

    fn poll(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        khandle: Self::Handle,
        flags: u32,
        events: u32,
    ) -> io::Result<u32> {
        self.inner.poll(&self.host(ctx), inode, handle, khandle, flags, events)
    }

    fn notify_reply(&self) -> io::Result<()> {
        self.inner.notify_reply()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_checks_the_guests_view_as_virtiofsd() {
        // SAFETY: stat64 is plain data; all zeroes is a valid value.
        let mut st: stat64 = unsafe { std::mem::zeroed() };
        (st.st_uid, st.st_gid, st.st_mode) = (65_534, 65_534, 0o100_640);
        let caller = |uid, gid| Context { uid, gid, pid: 1 };
        assert!(access_allowed(&st, &caller(65_534, 1), libc::W_OK as u32), "owner writes");
        assert!(access_allowed(&st, &caller(5, 65_534), libc::R_OK as u32), "group reads");
        assert!(!access_allowed(&st, &caller(5, 65_534), libc::W_OK as u32), "group writes");
        assert!(!access_allowed(&st, &caller(5, 5), libc::R_OK as u32), "others read");
        assert!(access_allowed(&st, &caller(0, 0), (libc::R_OK | libc::W_OK) as u32), "root");
        assert!(!access_allowed(&st, &caller(0, 0), libc::X_OK as u32), "root executes");
        st.st_mode = 0o100_001;
        assert!(access_allowed(&st, &caller(0, 0), libc::X_OK as u32));
        assert!(access_allowed(&st, &caller(5, 5), libc::F_OK as u32));
    }
}
