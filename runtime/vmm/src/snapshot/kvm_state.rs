//! KVM's share of a snapshot: each vCPU's architectural state and the VM-wide in-kernel
//! devices (PIC, IOAPIC, PIT) and clock, as Firecracker's `VcpuState`/`VmState` keep them.
//! The kvm-bindings structs serialise as their raw bytes (kvm-bindings' `serde` feature).

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// KVM_GET_MSRS/KVM_SET_MSRS take at most this many entries per call.
const MSR_CHUNK: usize = 255;
/// The legacy `kvm_xsave` buffer; KVM_GET/SET_XSAVE are only used when the host's XSAVE
/// state fits in it.
const LEGACY_XSAVE_SIZE: i32 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum KvmStateError {
    #[error("vCPU{id} {ioctl}: {source}")]
    Vcpu { id: u8, ioctl: &'static str, source: kvm_ioctls::Error },
    #[error("VM {ioctl}: {source}")]
    Vm { ioctl: &'static str, source: kvm_ioctls::Error },
    #[error("KVM_GET_MSR_INDEX_LIST: {0}")]
    MsrIndexList(kvm_ioctls::Error),
    #[error("building a KVM {what} list: {source}")]
    FamList { what: &'static str, source: vmm_sys_util::fam::Error },
    #[error("vCPU{id} KVM_SET_MSRS took {set} of {total} MSRs; MSR {index:#x} was refused")]
    MsrRefused { id: u8, set: usize, total: usize, index: u32 },
    #[error("this host's XSAVE state needs {0} bytes, more than the 4 KiB KVM_GET_XSAVE keeps")]
    XsaveTooLarge(i32),
    #[error("the snapshot has {found} vCPU states, the VM has {expected} vCPUs")]
    VcpuCount { expected: usize, found: usize },
}

/// One vCPU's state.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u8,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// MSRs in the order they are restored (the host's KVM_GET_MSR_INDEX_LIST order).
    pub msrs: Vec<kvm_msr_entry>,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub mp_state: kvm_mp_state,
    pub events: kvm_vcpu_events,
}

/// The VM-wide in-kernel state.
#[derive(Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

/// The MSRs to save: every MSR KVM lists. Some of those cannot be read on a given host (the
/// list reports what KVM knows, not what this CPU has); [`save_vcpu`] skips those.
pub fn msr_indices(kvm: &Kvm) -> Result<Vec<u32>, KvmStateError> {
    Ok(kvm.get_msr_index_list().map_err(KvmStateError::MsrIndexList)?.as_slice().to_vec())
}

/// Refuses hosts whose XSAVE area outgrows the legacy buffer (AMX): KVM_SET_XSAVE with a 4 KiB
/// buffer is only sound when the kernel reads no more than that.
pub fn check_xsave_size(kvm: &Kvm) -> Result<(), KvmStateError> {
    let size = kvm.check_extension_int(Cap::Xsave2);
    if size > LEGACY_XSAVE_SIZE {
        return Err(KvmStateError::XsaveTooLarge(size));
    }
    Ok(())
}

/// Reads the MSRs in `indices`; ones KVM refuses to read are left out (returned second).
fn read_msrs(
    fd: &VcpuFd,
    id: u8,
    indices: &[u32],
) -> Result<(Vec<kvm_msr_entry>, Vec<u32>), KvmStateError> {
    let (mut saved, mut skipped) = (Vec::new(), Vec::new());
    let mut rest = indices;
    while !rest.is_empty() {
        let chunk: Vec<kvm_msr_entry> = rest
            .iter()
            .take(MSR_CHUNK)
            .map(|&index| kvm_msr_entry { index, ..Default::default() })
            .collect();
        let mut msrs = Msrs::from_entries(&chunk)
            .map_err(|source| KvmStateError::FamList { what: "MSR", source })?;
        let read = fd.get_msrs(&mut msrs).map_err(|source| KvmStateError::Vcpu {
            id,
            ioctl: "KVM_GET_MSRS",
            source,
        })?;
        saved.extend_from_slice(&msrs.as_slice()[..read]);
        // KVM stops at the first MSR it cannot read: skip that one and go on after it.
        let consumed = if read < chunk.len() {
            skipped.push(chunk[read].index);
            read + 1
        } else {
            read
        };
        rest = &rest[consumed..];
    }
    Ok((saved, skipped))
}

/// Saves a paused vCPU's state. Returns the state and the MSRs that could not be read.
pub fn save_vcpu(
    fd: &VcpuFd,
    id: u8,
    msr_indices: &[u32],
) -> Result<(VcpuState, Vec<u32>), KvmStateError> {
    let err = |ioctl| move |source| KvmStateError::Vcpu { id, ioctl, source };
    let cpuid =
        fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES).map_err(err("KVM_GET_CPUID2"))?.as_slice().to_vec();
    let (msrs, skipped) = read_msrs(fd, id, msr_indices)?;
    let state = VcpuState {
        id,
        cpuid,
        msrs,
        regs: fd.get_regs().map_err(err("KVM_GET_REGS"))?,
        sregs: fd.get_sregs().map_err(err("KVM_GET_SREGS"))?,
        xsave: fd.get_xsave().map_err(err("KVM_GET_XSAVE"))?,
        xcrs: fd.get_xcrs().map_err(err("KVM_GET_XCRS"))?,
        debug_regs: fd.get_debug_regs().map_err(err("KVM_GET_DEBUGREGS"))?,
        lapic: fd.get_lapic().map_err(err("KVM_GET_LAPIC"))?,
        mp_state: fd.get_mp_state().map_err(err("KVM_GET_MP_STATE"))?,
        events: fd.get_vcpu_events().map_err(err("KVM_GET_VCPU_EVENTS"))?,
    };
    Ok((state, skipped))
}

/// Puts `state` into a fresh vCPU, in Firecracker's order: CPUID first (it decides which MSRs
/// and XSAVE features exist), the LAPIC after the special registers (sregs carry the APIC
/// base), MSRs after both (TSC deadline needs the LAPIC mode), events last (a pending
/// exception or NMI must meet the final register state). `check_xsave_size` must have passed.
pub fn restore_vcpu(fd: &VcpuFd, state: &VcpuState) -> Result<(), KvmStateError> {
    let id = state.id;
    let err = |ioctl| move |source| KvmStateError::Vcpu { id, ioctl, source };
    let cpuid = CpuId::from_entries(&state.cpuid)
        .map_err(|source| KvmStateError::FamList { what: "CPUID", source })?;
    fd.set_cpuid2(&cpuid).map_err(err("KVM_SET_CPUID2"))?;
    fd.set_mp_state(state.mp_state).map_err(err("KVM_SET_MP_STATE"))?;
    fd.set_regs(&state.regs).map_err(err("KVM_SET_REGS"))?;
    fd.set_sregs(&state.sregs).map_err(err("KVM_SET_SREGS"))?;
    // SAFETY: `check_xsave_size` established that this host's XSAVE state fits the 4 KiB
    // `kvm_xsave` buffer, so KVM reads nothing past the struct.
    unsafe { fd.set_xsave(&state.xsave) }.map_err(err("KVM_SET_XSAVE"))?;
    fd.set_xcrs(&state.xcrs).map_err(err("KVM_SET_XCRS"))?;
    fd.set_debug_regs(&state.debug_regs).map_err(err("KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&state.lapic).map_err(err("KVM_SET_LAPIC"))?;
    for chunk in state.msrs.chunks(MSR_CHUNK) {
        let msrs = Msrs::from_entries(chunk)
            .map_err(|source| KvmStateError::FamList { what: "MSR", source })?;
        let set = fd.set_msrs(&msrs).map_err(err("KVM_SET_MSRS"))?;
        if set < chunk.len() {
            return Err(KvmStateError::MsrRefused {
                id,
                set,
                total: chunk.len(),
                index: chunk[set].index,
            });
        }
    }
    fd.set_vcpu_events(&state.events).map_err(err("KVM_SET_VCPU_EVENTS"))
}

fn get_irqchip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, KvmStateError> {
    let mut chip = kvm_irqchip { chip_id, ..Default::default() };
    vm.get_irqchip(&mut chip)
        .map_err(|source| KvmStateError::Vm { ioctl: "KVM_GET_IRQCHIP", source })?;
    Ok(chip)
}

/// Saves the in-kernel PIC, IOAPIC, PIT and the kvmclock of a paused VM.
pub fn save_vm(vm: &VmFd) -> Result<VmState, KvmStateError> {
    let err = |ioctl| move |source| KvmStateError::Vm { ioctl, source };
    Ok(VmState {
        pic_master: get_irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: get_irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: get_irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
        pit: vm.get_pit2().map_err(err("KVM_GET_PIT2"))?,
        clock: vm.get_clock().map_err(err("KVM_GET_CLOCK"))?,
    })
}

/// Puts `state` into a VM whose irqchip and PIT exist (created as for a boot).
pub fn restore_vm(vm: &VmFd, state: &VmState) -> Result<(), KvmStateError> {
    let err = |ioctl| move |source| KvmStateError::Vm { ioctl, source };
    vm.set_pit2(&state.pit).map_err(err("KVM_SET_PIT2"))?;
    // KVM_SET_CLOCK accepts only the flags it defines for setting; the ones GET reports about
    // the source host (TSC_STABLE, HOST_TSC) must be cleared.
    let clock = kvm_clock_data { flags: 0, ..state.clock };
    vm.set_clock(&clock).map_err(err("KVM_SET_CLOCK"))?;
    for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
        vm.set_irqchip(chip).map_err(err("KVM_SET_IRQCHIP"))?;
    }
    Ok(())
}
