//! Guest RAM: one memfd mapped MAP_SHARED, so vhost-user backends (virtiofsd) can map the same
//! pages from the fd the VMM sends them; or, for a VM restored from a snapshot, the snapshot's
//! memory file mapped MAP_PRIVATE: every VM restored from one file shares its page cache and
//! gets a private copy of a page only when it writes it.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion, GuestRegionMmap,
};

use crate::layout;

/// Guest memory as used by every part of the VMM.
pub type GuestMemory = GuestMemoryMmap<()>;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory size must be a non-zero multiple of 4 KiB, got {0} bytes")]
    BadSize(u64),
    #[error("memfd_create for guest memory: {0}")]
    Memfd(nix::Error),
    #[error("sizing the guest memory memfd to {size} bytes: {source}")]
    Truncate { size: u64, source: std::io::Error },
    #[error("mapping guest memory region at {addr:#x}: {source}")]
    Map { addr: u64, source: vm_memory::mmap::FromRangesError },
    #[error("building the guest memory map: {0}")]
    Collection(vm_memory::GuestRegionCollectionError),
    #[error("registering guest memory slot {slot} with KVM: {source}")]
    SetUserMemoryRegion { slot: u32, source: kvm_ioctls::Error },
    #[error("writing guest memory to {path}: {source}")]
    SaveWrite { path: PathBuf, source: std::io::Error },
    #[error("reading guest memory at {addr:#x} for the snapshot: {source}")]
    SaveRead { addr: u64, source: vm_memory::GuestMemoryError },
    #[error("opening the snapshot memory file {path}: {source}")]
    OpenSnapshot { path: PathBuf, source: std::io::Error },
    #[error("the snapshot memory file {path} has {found} bytes, the snapshot says {expected}")]
    SnapshotSize { path: PathBuf, expected: u64, found: u64 },
    #[error("mapping the snapshot memory file {path} at {addr:#x}: {source}")]
    MapSnapshot { path: PathBuf, addr: u64, source: vm_memory::mmap::MmapRegionError },
    #[error("guest memory region at {addr:#x} overflows the address space")]
    RegionOverflow { addr: u64 },
}

/// Creates `size` bytes of guest RAM laid out by [`layout::ram_regions`], backed by one memfd
/// (regions are consecutive offsets in it).
pub fn create_guest_memory(size: u64) -> Result<GuestMemory, MemoryError> {
    if size == 0 || !size.is_multiple_of(4096) {
        return Err(MemoryError::BadSize(size));
    }
    let fd = nix::sys::memfd::memfd_create(
        c"podvisor-guest-ram",
        nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
    )
    .map_err(MemoryError::Memfd)?;
    let file = File::from(fd);
    file.set_len(size).map_err(|source| MemoryError::Truncate { size, source })?;

    let mut regions = Vec::new();
    let mut file_offset = 0u64;
    for (start, len) in layout::ram_regions(size) {
        let clone = file.try_clone().map_err(|source| MemoryError::Truncate { size, source })?;
        let region = GuestRegionMmap::from_range(
            GuestAddress(start),
            len as usize,
            Some(FileOffset::new(clone, file_offset)),
        )
        .map_err(|source| MemoryError::Map { addr: start, source })?;
        regions.push(region);
        file_offset += len;
    }
    GuestMemory::from_regions(regions).map_err(MemoryError::Collection)
}

/// Bytes copied per step when saving guest memory.
const SAVE_CHUNK: usize = 1 << 20;
const PAGE: usize = 4096;
static ZERO_PAGE: [u8; PAGE] = [0; PAGE];

/// What [`save_to_file`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SavedMemory {
    pub len: u64,
    /// CRC-32 of the whole file's contents (holes read as zeros), for [`file_crc32`].
    pub crc32: u32,
}

/// Writes all of guest memory to `path`, regions back to back (the layout
/// [`map_snapshot_private`] expects). All-zero pages are left as holes, so the file takes
/// the disk space of the pages the guest used. The VM must be paused.
pub fn save_to_file(mem: &GuestMemory, path: &Path) -> Result<SavedMemory, MemoryError> {
    let write_err = |source| MemoryError::SaveWrite { path: path.to_path_buf(), source };
    let mut file = File::create(path).map_err(write_err)?;
    let mut buf = vec![0u8; SAVE_CHUNK];
    let mut crc = crc32fast::Hasher::new();
    let mut offset = 0u64;
    for region in mem.iter() {
        let (start, len) = (region.start_addr().raw_value(), region.len());
        let mut done = 0u64;
        while done < len {
            let step = (len - done).min(SAVE_CHUNK as u64) as usize;
            let addr = start + done;
            mem.read_slice(&mut buf[..step], GuestAddress(addr))
                .map_err(|source| MemoryError::SaveRead { addr, source })?;
            crc.update(&buf[..step]);
            for (i, page) in buf[..step].chunks(PAGE).enumerate() {
                // A slice comparison (memcmp), fast even in debug builds.
                if page != &ZERO_PAGE[..page.len()] {
                    let at = offset + done + (i * PAGE) as u64;
                    file.seek(SeekFrom::Start(at)).map_err(write_err)?;
                    file.write_all(page).map_err(write_err)?;
                }
            }
            done += step as u64;
        }
        offset += len;
    }
    file.set_len(offset).map_err(write_err)?;
    file.sync_all().map_err(write_err)?;
    Ok(SavedMemory { len: offset, crc32: crc.finalize() })
}

/// Reads the file at `path` through and returns its length and CRC-32: the full check of a
/// memory file against its snapshot, too slow for every restore (it reads all of guest
/// RAM) but right when a template is adopted.
pub fn file_crc32(path: &Path) -> Result<(u64, u32), MemoryError> {
    use std::io::Read;
    let open_err = |source| MemoryError::OpenSnapshot { path: path.to_path_buf(), source };
    let mut file = File::open(path).map_err(open_err)?;
    let mut buf = vec![0u8; SAVE_CHUNK];
    let (mut len, mut crc) = (0u64, crc32fast::Hasher::new());
    loop {
        let n = file.read(&mut buf).map_err(open_err)?;
        if n == 0 {
            return Ok((len, crc.finalize()));
        }
        crc.update(&buf[..n]);
        len += n as u64;
    }
}

/// Maps the snapshot memory file at `path` (written by [`save_to_file`] for a VM with `size`
/// bytes of RAM) as guest memory, MAP_PRIVATE: guest writes go to private copy-on-write pages,
/// never to the file, so any number of VMs can start from one file. The file is opened
/// read-only, which makes that a guarantee rather than a convention.
pub fn map_snapshot_private(path: &Path, size: u64) -> Result<GuestMemory, MemoryError> {
    if size == 0 || !size.is_multiple_of(PAGE as u64) {
        return Err(MemoryError::BadSize(size));
    }
    let open_err = |source| MemoryError::OpenSnapshot { path: path.to_path_buf(), source };
    let file = File::open(path).map_err(open_err)?;
    let found = file.metadata().map_err(open_err)?.len();
    if found != size {
        return Err(MemoryError::SnapshotSize { path: path.to_path_buf(), expected: size, found });
    }
    let mut regions = Vec::new();
    let mut file_offset = 0u64;
    for (start, len) in layout::ram_regions(size) {
        let clone = file.try_clone().map_err(open_err)?;
        let mapping = MmapRegionBuilder::new(len as usize)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .with_file_offset(FileOffset::new(clone, file_offset))
            .build()
            .map_err(|source| MemoryError::MapSnapshot {
                path: path.to_path_buf(),
                addr: start,
                source,
            })?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(start))
            .ok_or(MemoryError::RegionOverflow { addr: start })?;
        regions.push(region);
        file_offset += len;
    }
    GuestMemory::from_regions(regions).map_err(MemoryError::Collection)
}

/// Registers every region of `mem` with KVM as a memory slot.
pub fn register_with_kvm(vm: &VmFd, mem: &GuestMemory) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let slot = slot as u32;
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|_| MemoryError::BadSize(region.len()))?;
        let mem_region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the host range is a live mapping owned by `mem`, which the VMM keeps alive
        // for as long as the VM (and thus the slot) exists.
        unsafe { vm.set_user_memory_region(mem_region) }
            .map_err(|source| MemoryError::SetUserMemoryRegion { slot, source })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn memory_is_memfd_backed_and_split_around_the_gap() {
        let mem = create_guest_memory(16 << 20).unwrap();
        assert_eq!(mem.num_regions(), 1);
        let region = mem.iter().next().unwrap();
        assert!(region.file_offset().is_some(), "guest memory must be fd-backed for vhost-user");
        mem.write_obj(0xdead_beefu32, GuestAddress(0x1000)).unwrap();
        assert_eq!(mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(), 0xdead_beef);
        assert!(matches!(create_guest_memory(0), Err(MemoryError::BadSize(0))));
        assert!(matches!(create_guest_memory(100), Err(MemoryError::BadSize(100))));
    }

    #[test]
    fn private_restores_share_the_file_but_not_their_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory.bin");
        let mem = create_guest_memory(8 << 20).unwrap();
        mem.write_obj(0x1234_5678u32, GuestAddress(0x2000)).unwrap();
        mem.write_obj(7u8, GuestAddress((8 << 20) - 1)).unwrap();
        let saved = save_to_file(&mem, &path).unwrap();
        assert_eq!(saved.len, 8 << 20);
        assert_eq!(file_crc32(&path).unwrap(), (saved.len, saved.crc32));
        // Two pages hold data; the rest of the file is holes.
        use std::os::unix::fs::MetadataExt;
        assert!(std::fs::metadata(&path).unwrap().blocks() * 512 < 1 << 20);

        let a = map_snapshot_private(&path, 8 << 20).unwrap();
        let b = map_snapshot_private(&path, 8 << 20).unwrap();
        assert_eq!(a.read_obj::<u32>(GuestAddress(0x2000)).unwrap(), 0x1234_5678);
        assert_eq!(b.read_obj::<u8>(GuestAddress((8 << 20) - 1)).unwrap(), 7);
        a.write_obj(0xaaaa_aaaau32, GuestAddress(0x2000)).unwrap();
        b.write_obj(0xbbbb_bbbbu32, GuestAddress(0x3000)).unwrap();
        assert_eq!(b.read_obj::<u32>(GuestAddress(0x2000)).unwrap(), 0x1234_5678);
        assert_eq!(a.read_obj::<u32>(GuestAddress(0x3000)).unwrap(), 0);
        let fresh = map_snapshot_private(&path, 8 << 20).unwrap();
        assert_eq!(fresh.read_obj::<u32>(GuestAddress(0x2000)).unwrap(), 0x1234_5678);
        assert_eq!(fresh.read_obj::<u32>(GuestAddress(0x3000)).unwrap(), 0);

        let err = map_snapshot_private(&path, 16 << 20).unwrap_err();
        assert!(matches!(err, MemoryError::SnapshotSize { .. }), "{err}");
    }
}
