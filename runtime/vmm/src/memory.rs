//! Guest RAM: one memfd mapped MAP_SHARED, so vhost-user backends (virtiofsd) can map the same
//! pages from the fd the VMM sends them.

use std::fs::File;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{
    Address, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
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
}
