//! Loading the guest: the kernel ELF (vmlinux), the initramfs, the command line and the zero
//! page (`struct boot_params`) with its e820 map, per the Linux x86 64-bit boot protocol.

use std::fs::File;
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::layout;
use crate::memory::GuestMemory;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("opening {path}: {source}")]
    Open { path: String, source: std::io::Error },
    #[error("loading the kernel ELF {path}: {source}")]
    LoadKernel { path: String, source: linux_loader::loader::Error },
    #[error("the kernel ends at {end:#x}, beyond the {ram:#x} bytes of low RAM")]
    KernelTooBig { end: u64, ram: u64 },
    #[error("the initramfs ({size} bytes) does not fit between the kernel end {kernel_end:#x} and {limit:#x}")]
    InitrdTooBig { size: u64, kernel_end: u64, limit: u64 },
    #[error("reading the initramfs {path}: {source}")]
    ReadInitrd { path: String, source: vm_memory::GuestMemoryError },
    #[error("kernel command line: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    #[error("writing the kernel command line: {0}")]
    WriteCmdline(linux_loader::loader::Error),
    #[error("writing the zero page: {0}")]
    WriteZeroPage(vm_memory::GuestMemoryError),
    #[error("too many e820 entries ({0})")]
    TooManyE820(usize),
}

/// Where the kernel was loaded.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// 64-bit entry point (`startup_64`'s physical address: the ELF entry of vmlinux).
    pub entry: u64,
    /// First byte after the kernel image.
    pub end: u64,
    /// The PVH (32-bit) entry, if the kernel has a XEN_ELFNOTE_PHYS32_ENTRY note.
    pub pvh_entry: Option<u64>,
}

/// The initramfs location.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedInitrd {
    pub addr: u64,
    pub size: u64,
}

/// End of RAM below the MMIO gap.
pub fn low_ram_end(mem: &GuestMemory) -> u64 {
    mem.iter()
        .filter(|r| r.start_addr().raw_value() < layout::MMIO_GAP_START)
        .map(|r| r.start_addr().raw_value() + r.len())
        .max()
        .unwrap_or(0)
}

/// Loads the ELF `kernel` at its physical addresses (at or above [`layout::HIMEM_START`]).
pub fn load_kernel(mem: &GuestMemory, kernel: &Path) -> Result<LoadedKernel, BootError> {
    let path = kernel.display().to_string();
    let mut file =
        File::open(kernel).map_err(|source| BootError::Open { path: path.clone(), source })?;
    let result = Elf::load(mem, None, &mut file, Some(GuestAddress(layout::HIMEM_START)))
        .map_err(|source| BootError::LoadKernel { path, source })?;
    let ram = low_ram_end(mem);
    if result.kernel_end > ram {
        return Err(BootError::KernelTooBig { end: result.kernel_end, ram });
    }
    let pvh_entry = match result.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => Some(addr.raw_value()),
        _ => None,
    };
    Ok(LoadedKernel { entry: result.kernel_load.raw_value(), end: result.kernel_end, pvh_entry })
}

/// Where an initramfs of `size` bytes goes: page-aligned at the top of low RAM (capped at
/// [`layout::INITRD_MAX_END`]), above the kernel.
pub fn initrd_placement(ram_end: u64, kernel_end: u64, size: u64) -> Result<u64, BootError> {
    let limit = ram_end.min(layout::INITRD_MAX_END);
    let too_big = || BootError::InitrdTooBig { size, kernel_end, limit };
    let addr = limit.checked_sub(size).ok_or_else(too_big)? & !0xfff;
    if addr < kernel_end {
        return Err(too_big());
    }
    Ok(addr)
}

/// Copies the initramfs into guest memory.
pub fn load_initrd(
    mem: &GuestMemory,
    initrd: &Path,
    kernel_end: u64,
) -> Result<LoadedInitrd, BootError> {
    let path = initrd.display().to_string();
    let mut file =
        File::open(initrd).map_err(|source| BootError::Open { path: path.clone(), source })?;
    let size =
        file.metadata().map_err(|source| BootError::Open { path: path.clone(), source })?.len();
    let addr = initrd_placement(low_ram_end(mem), kernel_end, size)?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|source| BootError::ReadInitrd { path, source })?;
    Ok(LoadedInitrd { addr, size })
}

/// The VMM's own kernel arguments; `extra` (from the caller) comes last so it can override.
pub fn build_cmdline(
    extra: &str,
    mmio_devices: &[(u64, u32)],
) -> Result<Cmdline, linux_loader::cmdline::Error> {
    let mut cmdline = Cmdline::new(layout::CMDLINE_MAX_SIZE)?;
    // ttyS0 on COM1; reboot via the i8042 (our only reset path); no PCI, no ACPI tables here.
    // On an overloaded host (as Kata boots): no IO-APIC timer check, which panics a guest
    // whose vCPU was not scheduled for the ticks it counts, and no TSC watchdog.
    cmdline.insert_str(
        "console=ttyS0 reboot=k panic=1 pci=off i8042.noaux no_timer_check tsc=reliable",
    )?;
    for &(addr, irq) in mmio_devices {
        cmdline.add_virtio_mmio_device(layout::MMIO_DEVICE_SIZE, GuestAddress(addr), irq, None)?;
    }
    let extra = extra.trim();
    if !extra.is_empty() {
        cmdline.insert_str(extra)?;
    }
    Ok(cmdline)
}

/// Writes the command line at [`layout::CMDLINE_START`]; returns its length with the NUL.
pub fn write_cmdline(mem: &GuestMemory, cmdline: &Cmdline) -> Result<usize, BootError> {
    linux_loader::loader::load_cmdline(mem, GuestAddress(layout::CMDLINE_START), cmdline)
        .map_err(BootError::WriteCmdline)?;
    let len = cmdline.as_cstring().map_err(BootError::Cmdline)?.as_bytes_with_nul().len();
    Ok(len)
}

pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// The e820 map: low RAM up to the EBDA, the EBDA..1 MiB hole reserved, RAM from 1 MiB to the
/// MMIO gap, the gap reserved (so the kernel never puts PCI or its own data there), RAM above
/// 4 GiB.
pub fn e820_map(mem: &GuestMemory) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, layout::EBDA_START, E820_RAM),
        (layout::EBDA_START, layout::HIMEM_START - layout::EBDA_START, E820_RESERVED),
    ];
    let low_end = low_ram_end(mem);
    if low_end > layout::HIMEM_START {
        map.push((layout::HIMEM_START, low_end - layout::HIMEM_START, E820_RAM));
    }
    for region in mem.iter() {
        let start = region.start_addr().raw_value();
        if start >= layout::MMIO_GAP_END {
            map.push((start, region.len(), E820_RAM));
        }
    }
    map
}

/// The zero page for a kernel entered at its 64-bit entry.
pub fn build_zero_page(
    cmdline_size: usize,
    initrd: Option<LoadedInitrd>,
    e820: &[(u64, u64, u32)],
) -> Result<boot_params, BootError> {
    const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
    const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
    const KERNEL_LOADER_OTHER: u8 = 0xff;
    const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;

    let mut params = boot_params::default();
    if e820.len() > params.e820_table.len() {
        return Err(BootError::TooManyE820(e820.len()));
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    params.hdr.cmd_line_ptr = layout::CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_size as u32;
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = initrd.addr as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    for (slot, &(addr, size, kind)) in params.e820_table.iter_mut().zip(e820) {
        *slot = boot_e820_entry { addr, size, r#type: kind };
    }
    params.e820_entries = e820.len() as u8;
    Ok(params)
}

/// Writes the zero page at [`layout::ZERO_PAGE_START`].
pub fn write_zero_page(mem: &GuestMemory, params: &boot_params) -> Result<(), BootError> {
    mem.write_obj(*params, GuestAddress(layout::ZERO_PAGE_START)).map_err(BootError::WriteZeroPage)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    #[test]
    fn cmdline_has_console_devices_then_extra() {
        let c = build_cmdline(" quiet init=/init ", &[(0xd000_0000, 5), (0xd000_1000, 6)]).unwrap();
        let s = c.as_cstring().unwrap().into_string().unwrap();
        assert_eq!(
            s,
            "console=ttyS0 reboot=k panic=1 pci=off i8042.noaux no_timer_check tsc=reliable \
             virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6 \
             quiet init=/init"
        );
        let too_long = "x".repeat(layout::CMDLINE_MAX_SIZE);
        assert!(build_cmdline(&too_long, &[]).is_err());
    }

    #[test]
    fn e820_reserves_ebda_and_covers_ram() {
        let mem = create_guest_memory(128 << 20).unwrap();
        let map = e820_map(&mem);
        assert_eq!(
            map,
            vec![
                (0, layout::EBDA_START, E820_RAM),
                (layout::EBDA_START, 0x100000 - layout::EBDA_START, E820_RESERVED),
                (0x100000, (128 << 20) - 0x100000, E820_RAM),
            ]
        );
        // The MP table and the boot structures are outside of RAM the kernel may reuse early.
        assert!(map.iter().any(|&(a, s, t)| t == E820_RESERVED
            && a <= layout::MPTABLE_START
            && layout::MPTABLE_START < a + s));
    }

    #[test]
    fn zero_page_fields() {
        let initrd = LoadedInitrd { addr: 0x7f0_0000, size: 0x1234 };
        let p = build_zero_page(42, Some(initrd), &[(0, 0x9fc00, E820_RAM)]).unwrap();
        let (header, flag, ptr, size) =
            (p.hdr.header, p.hdr.boot_flag, p.hdr.cmd_line_ptr, p.hdr.cmdline_size);
        assert_eq!((header, flag, ptr, size), (0x5372_6448, 0xaa55, 0x20000, 42));
        let (image, rsize, n) = (p.hdr.ramdisk_image, p.hdr.ramdisk_size, p.e820_entries);
        assert_eq!((image, rsize, n), (0x7f0_0000, 0x1234, 1));
        let too_many = vec![(0u64, 1u64, E820_RAM); 200];
        assert!(matches!(build_zero_page(1, None, &too_many), Err(BootError::TooManyE820(200))));
    }

    #[test]
    fn initrd_goes_high_and_never_over_the_kernel() {
        assert_eq!(initrd_placement(128 << 20, 0x200_0000, 0x1800).unwrap(), (128 << 20) - 0x2000);
        assert!(initrd_placement(128 << 20, 0x7ff_f000, 0x2000).is_err());
        assert!(initrd_placement(0x1000, 0, 0x2000).is_err());
        // Large VMs keep the initramfs below INITRD_MAX_END.
        assert_eq!(initrd_placement(2 << 30, 0, 0x1000).unwrap(), layout::INITRD_MAX_END - 0x1000);
    }
}
