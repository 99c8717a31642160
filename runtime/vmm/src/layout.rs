//! Every guest-physical address and I/O port the VMM uses, in one place.
//!
//! ```text
//! 0x0000_0000  real-mode IVT / BIOS data area (RAM, left zero)
//! 0x0000_0500  GDT (BOOT_GDT_START, 5 entries), 0x540 the IDT (BOOT_IDT_START)
//! 0x0000_6000  PVH start info (reserved for the PVH entry)
//! 0x0000_7000  zero page (struct boot_params) with the e820 table
//! 0x0000_8ff0  boot stack top (grows down)
//! 0x0000_9000  PML4, 0xa000 PDPT, 0xb000..0xf000 four page directories (identity map 0..4 GiB)
//! 0x0002_0000  kernel command line (CMDLINE_MAX_SIZE bytes)
//! 0x0009_fc00  EBDA: MP table (not RAM in the e820 map)
//! 0x0010_0000  HIMEM_START: the kernel's ELF segments are loaded from here up
//! ...          initramfs at the top of low RAM
//! 0xd000_0000  MMIO_DEVICES_START: one 4 KiB virtio-mmio window per device
//! 0xfec0_0000  IOAPIC, 0xfee0_0000 LAPIC (in-kernel irqchip)
//! 0xfffb_c000  KVM identity-map page, 0xfffb_d000 KVM TSS (3 pages)
//! 0x1_0000_0000 RAM above the 32-bit MMIO gap, if the VM has more than MMIO_GAP_START bytes
//! ```

/// Guest RAM starts at physical 0.
pub const RAM_START: u64 = 0;

/// Where the GDT is written (entries: null, null, code64 = 0x10, data = 0x18, tss = 0x20).
pub const BOOT_GDT_START: u64 = 0x500;
/// Where the (empty) IDT is written.
pub const BOOT_IDT_START: u64 = 0x540;
/// PVH `hvm_start_info` (only used when booting through the PVH entry).
pub const PVH_INFO_START: u64 = 0x6000;
/// The zero page (`struct boot_params`) of the Linux 64-bit boot protocol.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Top-level page table (PML4).
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// First of [`PDE_PAGES`] page directories of 2 MiB pages.
pub const PDE_START: u64 = 0xb000;
/// Number of page directories: 4 x 512 x 2 MiB identity-maps the first 4 GiB, so the boot
/// vCPU can reach the MMIO device windows as well as low RAM.
pub const PDE_PAGES: u64 = 4;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Linux's x86 COMMAND_LINE_SIZE.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Extended BIOS data area: holds the MP table; excluded from e820 RAM.
pub const EBDA_START: u64 = 0x9fc00;
/// The MP floating pointer and configuration table.
pub const MPTABLE_START: u64 = EBDA_START;
/// First byte after the legacy hole (0xa0000..0x100000).
pub const HIMEM_START: u64 = 0x10_0000;
/// Highest end address for the initramfs (kernels without XLF_CAN_BE_LOADED_ABOVE_4G read
/// `initrd_addr_max`; 0x37ff_ffff is the conservative historical default).
pub const INITRD_MAX_END: u64 = 0x3800_0000;

/// Start of the 32-bit hole below 4 GiB used for devices; RAM stops here and resumes at 4 GiB.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
/// End (exclusive) of the 32-bit MMIO hole.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// First virtio-mmio device window.
pub const MMIO_DEVICES_START: u64 = MMIO_GAP_START;
/// Size of each virtio-mmio window (`virtio_mmio.device=4K@...`).
pub const MMIO_DEVICE_SIZE: u64 = 0x1000;
/// Maximum number of virtio-mmio devices (limited by the IOAPIC pins after IRQ_BASE).
pub const MMIO_DEVICES_MAX: u64 = (IRQ_MAX - IRQ_BASE + 1) as u64;
/// In-kernel IOAPIC base (fixed by KVM).
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC base (fixed by KVM / the architecture).
pub const APIC_START: u64 = 0xfee0_0000;
/// KVM's identity-map page (KVM_SET_IDENTITY_MAP_ADDR) for real-mode emulation on old VMX.
pub const KVM_IDENTITY_MAP_START: u64 = 0xfffb_c000;
/// KVM's TSS (KVM_SET_TSS_ADDR): three pages.
pub const KVM_TSS_START: u64 = 0xfffb_d000;

/// First IOAPIC pin given to virtio-mmio devices (0-4 are legacy: timer, keyboard, cascade,
/// COM2, COM1).
pub const IRQ_BASE: u32 = 5;
/// Last IOAPIC pin (KVM's IOAPIC has 24).
pub const IRQ_MAX: u32 = 23;

/// COM1 I/O port base and range.
pub const SERIAL_PORT_BASE: u64 = 0x3f8;
/// COM1 has 8 registers.
pub const SERIAL_PORT_SIZE: u64 = 0x8;
/// COM1's legacy IRQ.
pub const SERIAL_IRQ: u32 = 4;
/// i8042 keyboard controller (data 0x60, command/status 0x64), used for guest reset.
pub const I8042_PORT_BASE: u64 = 0x60;
/// i8042 range: 0x60..=0x64.
pub const I8042_PORT_SIZE: u64 = 0x5;

// Invariants checked at compile time.
const _: () = {
    // The page directories end before the command line.
    assert!(PDE_START + PDE_PAGES * 0x1000 <= CMDLINE_START);
    // The MP table is in the EBDA, below the legacy hole.
    assert!(MPTABLE_START >= EBDA_START && MPTABLE_START < 0xa0000);
    // KVM's private pages sit above the LAPIC, inside the gap.
    assert!(KVM_IDENTITY_MAP_START > APIC_START && KVM_TSS_START + 3 * 0x1000 <= MMIO_GAP_END);
    // Legacy IRQs stay below the virtio IRQs.
    assert!(SERIAL_IRQ < IRQ_BASE);
    // The boot identity map covers every device window.
    assert!(PDE_PAGES * 512 * 0x20_0000 >= MMIO_GAP_END);
};

/// The guest-physical address of virtio-mmio window `index`, or `None` past the last one.
pub fn mmio_device_addr(index: u64) -> Option<u64> {
    (index < MMIO_DEVICES_MAX).then(|| MMIO_DEVICES_START + index * MMIO_DEVICE_SIZE)
}

/// The IOAPIC pin (GSI) of virtio-mmio device `index`.
pub fn mmio_device_irq(index: u64) -> Option<u32> {
    (index < MMIO_DEVICES_MAX).then(|| IRQ_BASE + index as u32)
}

/// The guest RAM regions for `mem_size` bytes of memory: below the MMIO gap, then above 4 GiB.
pub fn ram_regions(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(RAM_START, mem_size)]
    } else {
        vec![(RAM_START, MMIO_GAP_START), (MMIO_GAP_END, mem_size - MMIO_GAP_START)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fixed boot structures as (start, size): none may overlap.
    fn boot_structures() -> Vec<(&'static str, u64, u64)> {
        vec![
            ("gdt", BOOT_GDT_START, 5 * 8),
            ("idt", BOOT_IDT_START, 8),
            ("pvh", PVH_INFO_START, 0x1000),
            ("zero page", ZERO_PAGE_START, 0x1000),
            ("stack", BOOT_STACK_POINTER - 0x800, 0x800),
            ("pml4", PML4_START, 0x1000),
            ("pdpt", PDPTE_START, 0x1000),
            ("pd", PDE_START, PDE_PAGES * 0x1000),
            ("cmdline", CMDLINE_START, CMDLINE_MAX_SIZE as u64),
            ("mptable", MPTABLE_START, 0x400),
        ]
    }

    #[test]
    fn boot_structures_do_not_overlap_and_sit_below_the_kernel() {
        let s = boot_structures();
        for (i, (a, a_start, a_size)) in s.iter().enumerate() {
            assert!(a_start + a_size <= HIMEM_START, "{a} reaches the kernel area");
            for (b, b_start, b_size) in &s[i + 1..] {
                let disjoint = a_start + a_size <= *b_start || b_start + b_size <= *a_start;
                assert!(disjoint, "{a} overlaps {b}");
            }
        }
        // The page tables sit right after each other, as the CR3 walk expects.
        assert_eq!(PDPTE_START, PML4_START + 0x1000);
        assert_eq!(PDE_START, PDPTE_START + 0x1000);
    }

    #[test]
    fn mmio_windows_fit_in_the_gap_below_the_ioapic() {
        let last = mmio_device_addr(MMIO_DEVICES_MAX - 1).unwrap();
        assert!(last + MMIO_DEVICE_SIZE <= IOAPIC_START);
        assert!(mmio_device_addr(MMIO_DEVICES_MAX).is_none());
        assert_eq!(mmio_device_irq(0), Some(IRQ_BASE));
        assert_eq!(mmio_device_irq(MMIO_DEVICES_MAX - 1), Some(IRQ_MAX));
        assert!(mmio_device_irq(MMIO_DEVICES_MAX).is_none());
    }

    #[test]
    fn ram_skips_the_mmio_gap() {
        assert_eq!(ram_regions(128 << 20), vec![(0, 128 << 20)]);
        assert_eq!(ram_regions(MMIO_GAP_START), vec![(0, MMIO_GAP_START)]);
        let big = 4u64 << 30;
        assert_eq!(
            ram_regions(big),
            vec![(0, MMIO_GAP_START), (MMIO_GAP_END, big - MMIO_GAP_START)]
        );
    }
}
