//! Boot CPU state for the Linux x86-64 boot protocol: long mode with paging on, flat segments
//! from a GDT in guest memory, identity-mapped page tables, `rsi` = zero page.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use crate::layout;
use crate::memory::GuestMemory;

#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("writing the GDT/IDT into guest memory: {0}")]
    WriteDescriptorTables(vm_memory::GuestMemoryError),
    #[error("writing the boot page tables into guest memory: {0}")]
    WritePageTables(vm_memory::GuestMemoryError),
    #[error("KVM_GET_SREGS: {0}")]
    GetSregs(kvm_ioctls::Error),
    #[error("KVM_SET_SREGS: {0}")]
    SetSregs(kvm_ioctls::Error),
    #[error("KVM_SET_REGS: {0}")]
    SetRegs(kvm_ioctls::Error),
    #[error("KVM_SET_FPU: {0}")]
    SetFpu(kvm_ioctls::Error),
    #[error("building the boot MSR list: {0}")]
    MsrList(vmm_sys_util::fam::Error),
    #[error("KVM_SET_MSRS: {0}")]
    SetMsrs(kvm_ioctls::Error),
    #[error("KVM set {set} of {wanted} boot MSRs (first refused: {refused:#x})")]
    MsrsRefused { set: usize, wanted: usize, refused: u32 },
    #[error("KVM_GET_LAPIC: {0}")]
    GetLapic(kvm_ioctls::Error),
    #[error("KVM_SET_LAPIC: {0}")]
    SetLapic(kvm_ioctls::Error),
}

// Control register and EFER bits.
const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

// Boot MSRs.
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MISC_ENABLE_FAST_STRING: u64 = 0x1;
/// MTRRs enabled, default memory type write-back.
const MTRR_ENABLE_DEFAULT_WB: u64 = (1 << 11) | 6;

/// GDT selectors expected by the Linux 64-bit boot protocol (`__BOOT_CS`, `__BOOT_DS`).
pub const BOOT_CS_SELECTOR: u16 = 0x10;
pub const BOOT_DS_SELECTOR: u16 = 0x18;
const BOOT_TSS_SELECTOR: u16 = 0x20;

/// Encodes a GDT descriptor from its access/flags word, base and limit (Intel SDM 3.4.5).
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    let flags = flags as u64;
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// Decodes a GDT descriptor into the segment KVM loads for `selector`.
pub fn segment_from_gdt(entry: u64, selector: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = (entry & 0xffff) | ((entry >> 32) & 0x000f_0000);
    let granularity = ((entry >> 55) & 1) as u8;
    let limit = if granularity == 1 { (raw_limit << 12) | 0xfff } else { raw_limit };
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit: limit as u32,
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: granularity,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// The boot GDT: null, null, 64-bit code (0x10), data (0x18), TSS (0x20).
pub fn boot_gdt() -> [u64; 5] {
    [
        0,
        0,
        gdt_entry(0xa09b, 0, 0xfffff), // code: present, ring 0, exec/read, L=1, 4 KiB granular
        gdt_entry(0xc093, 0, 0xfffff), // data: present, ring 0, read/write, 32-bit, granular
        gdt_entry(0x808b, 0, 0xfffff), // TSS: present, busy 64-bit TSS
    ]
}

/// Writes the GDT, an empty IDT and identity-mapped page tables (0..4 GiB with 2 MiB pages),
/// and loads them into `sregs` along with long mode.
pub fn setup_sregs(mem: &GuestMemory, sregs: &mut kvm_sregs) -> Result<(), RegsError> {
    let gdt = boot_gdt();
    for (i, entry) in gdt.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(layout::BOOT_GDT_START + (i as u64) * 8))
            .map_err(RegsError::WriteDescriptorTables)?;
    }
    mem.write_obj(0u64, GuestAddress(layout::BOOT_IDT_START))
        .map_err(RegsError::WriteDescriptorTables)?;

    sregs.gdt.base = layout::BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = layout::BOOT_IDT_START;
    sregs.idt.limit = 7;

    let code = segment_from_gdt(gdt[2], BOOT_CS_SELECTOR);
    let data = segment_from_gdt(gdt[3], BOOT_DS_SELECTOR);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(gdt[4], BOOT_TSS_SELECTOR);

    write_identity_page_tables(mem)?;
    sregs.cr3 = layout::PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    Ok(())
}

/// PML4[0] -> PDPT; PDPT[0..4] -> four page directories of 2 MiB pages covering 0..4 GiB.
fn write_identity_page_tables(mem: &GuestMemory) -> Result<(), RegsError> {
    const PRESENT_RW: u64 = 0x3;
    const PAGE_SIZE_2M: u64 = 0x80;
    mem.write_obj(layout::PDPTE_START | PRESENT_RW, GuestAddress(layout::PML4_START))
        .map_err(RegsError::WritePageTables)?;
    for pd in 0..layout::PDE_PAGES {
        let pd_addr = layout::PDE_START + pd * 0x1000;
        mem.write_obj(pd_addr | PRESENT_RW, GuestAddress(layout::PDPTE_START + pd * 8))
            .map_err(RegsError::WritePageTables)?;
        for i in 0..512u64 {
            let phys = ((pd * 512) + i) << 21;
            mem.write_obj(phys | PAGE_SIZE_2M | PRESENT_RW, GuestAddress(pd_addr + i * 8))
                .map_err(RegsError::WritePageTables)?;
        }
    }
    Ok(())
}

/// General-purpose registers at the kernel entry: `rip` = entry, `rsi` = zero page.
pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2, // bit 1 is reserved-one
        rip: entry,
        rsp: layout::BOOT_STACK_POINTER,
        rbp: layout::BOOT_STACK_POINTER,
        rsi: layout::ZERO_PAGE_START,
        ..Default::default()
    }
}

/// The MSRs set before the first instruction.
pub fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_DEFAULT_WB),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry { index, data, ..Default::default() })
    .collect()
}

/// Loads the whole boot state into `vcpu`: sregs (+ tables in memory), regs, FPU, MSRs and the
/// local APIC's LINT0/LINT1 wiring.
pub fn configure_vcpu(vcpu: &VcpuFd, mem: &GuestMemory, entry: u64) -> Result<(), RegsError> {
    let mut sregs = vcpu.get_sregs().map_err(RegsError::GetSregs)?;
    setup_sregs(mem, &mut sregs)?;
    vcpu.set_sregs(&sregs).map_err(RegsError::SetSregs)?;
    vcpu.set_regs(&boot_regs(entry)).map_err(RegsError::SetRegs)?;

    let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    vcpu.set_fpu(&fpu).map_err(RegsError::SetFpu)?;

    let entries = boot_msr_entries();
    let msrs = Msrs::from_entries(&entries).map_err(RegsError::MsrList)?;
    let set = vcpu.set_msrs(&msrs).map_err(RegsError::SetMsrs)?;
    if set != entries.len() {
        return Err(RegsError::MsrsRefused {
            set,
            wanted: entries.len(),
            refused: entries[set].index,
        });
    }
    set_lint(vcpu)
}

/// Wires LINT0 as ExtINT (the PIC) and LINT1 as NMI, as a BIOS would.
fn set_lint(vcpu: &VcpuFd) -> Result<(), RegsError> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const APIC_MODE_EXTINT: u32 = 0x7;
    const APIC_MODE_NMI: u32 = 0x4;
    let mut lapic = vcpu.get_lapic().map_err(RegsError::GetLapic)?;
    let set_mode = |regs: &mut [std::os::raw::c_char; 1024], offset: usize, mode: u32| {
        let mut bytes = [0u8; 4];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = regs[offset + i] as u8;
        }
        let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (i, b) in value.to_le_bytes().iter().enumerate() {
            regs[offset + i] = *b as std::os::raw::c_char;
        }
    };
    set_mode(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
    set_mode(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic).map_err(RegsError::SetLapic)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    #[test]
    fn gdt_entries_round_trip_into_flat_long_mode_segments() {
        let gdt = boot_gdt();
        let cs = segment_from_gdt(gdt[2], BOOT_CS_SELECTOR);
        assert_eq!(
            (cs.base, cs.limit, cs.l, cs.db, cs.g, cs.present),
            (0, 0xffff_ffff, 1, 0, 1, 1)
        );
        assert_eq!(cs.type_, 0xb);
        let ds = segment_from_gdt(gdt[3], BOOT_DS_SELECTOR);
        assert_eq!((ds.l, ds.db, ds.type_, ds.s, ds.unusable), (0, 1, 0x3, 1, 0));
        let null = segment_from_gdt(gdt[0], 0);
        assert_eq!(null.unusable, 1);
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
    }

    #[test]
    fn page_tables_identity_map_4gib() {
        let mem = create_guest_memory(16 << 20).unwrap();
        let mut sregs = kvm_sregs::default();
        setup_sregs(&mem, &mut sregs).unwrap();
        assert_eq!(sregs.cr3, layout::PML4_START);
        assert_ne!(sregs.efer & EFER_LMA, 0);
        let pml4: u64 = mem.read_obj(GuestAddress(layout::PML4_START)).unwrap();
        assert_eq!(pml4 & !0xfff, layout::PDPTE_START);
        // Walk the mapping of an MMIO window address: it must translate to itself.
        let va = layout::MMIO_DEVICES_START + 0x123;
        let pdpte: u64 = mem.read_obj(GuestAddress(layout::PDPTE_START + (va >> 30) * 8)).unwrap();
        let pde: u64 =
            mem.read_obj(GuestAddress((pdpte & !0xfff) + ((va >> 21) & 0x1ff) * 8)).unwrap();
        assert_eq!((pde & !0x1f_ffff) | (va & 0x1f_ffff), va);
        assert_ne!(pde & 0x80, 0, "2 MiB page");
    }
}
