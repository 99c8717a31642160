//! CPUID for each vCPU: what KVM supports (KVM_GET_SUPPORTED_CPUID), normalised so that the
//! guest sees a hypervisor, its own APIC id, and a topology of `count` single-threaded cores in
//! one socket.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    #[error("KVM_GET_SUPPORTED_CPUID: {0}")]
    GetSupported(kvm_ioctls::Error),
    #[error("building the CPUID table: {0}")]
    Build(vmm_sys_util::fam::Error),
    #[error("KVM_SET_CPUID2: {0}")]
    SetCpuid(kvm_ioctls::Error),
}

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_PMU: u32 = 0xa;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_AMD_EXT_APIC_ID: u32 = 0x8000_001e;

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
const TOPOLOGY_LEVEL_SMT: u32 = 1;
const TOPOLOGY_LEVEL_CORE: u32 = 2;

/// Number of bits needed to hold ids `0..count`.
fn id_bits(count: u32) -> u32 {
    if count <= 1 {
        0
    } else {
        32 - (count - 1).leading_zeros()
    }
}

/// Adjusts the supported CPUID entries for vCPU `apic_id` of `count`.
pub fn normalise(entries: &mut Vec<kvm_cpuid_entry2>, apic_id: u8, count: u8) {
    let count = u32::from(count.max(1));
    let apic = u32::from(apic_id);
    // Rebuild the topology leaves from scratch: one entry per sub-leaf we define.
    let had_v2 = entries.iter().any(|e| e.function == LEAF_TOPOLOGY_V2);
    let had_topology = entries.iter().any(|e| e.function == LEAF_TOPOLOGY);
    entries.retain(|e| e.function != LEAF_TOPOLOGY && e.function != LEAF_TOPOLOGY_V2);

    for entry in entries.iter_mut() {
        match entry.function {
            LEAF_FEATURES => {
                // EBX: [31:24] initial APIC id, [23:16] logical processors per package,
                // [15:8] CLFLUSH size (kept).
                entry.ebx = (entry.ebx & 0x0000_ffff) | (apic << 24) | (count.min(255) << 16);
                entry.ecx |= ECX_HYPERVISOR;
                if count > 1 {
                    entry.edx |= EDX_HTT;
                } else {
                    entry.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS => {
                // EAX: [31:26] cores per package - 1; [25:14] threads sharing this cache - 1:
                // private L1/L2 per core, L3 shared by the socket.
                let level = (entry.eax >> 5) & 0x7;
                let sharing = if level >= 3 { count - 1 } else { 0 };
                entry.eax =
                    (entry.eax & 0x3fff) | ((sharing & 0xfff) << 14) | (((count - 1) & 0x3f) << 26);
            }
            LEAF_PMU => {
                // No virtual PMU is offered to sandboxes.
                entry.eax = 0;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
            LEAF_AMD_EXT_APIC_ID => {
                entry.eax = apic;
                entry.ebx &= !0xff; // compute unit id 0, one thread per unit
                entry.ecx &= !0xff; // node id 0
            }
            _ => {}
        }
    }

    let leaves: &[u32] = match (had_topology, had_v2) {
        (_, true) => &[LEAF_TOPOLOGY, LEAF_TOPOLOGY_V2],
        _ => &[LEAF_TOPOLOGY],
    };
    for &function in leaves {
        // Sub-leaf 0: SMT level, one thread per core. Sub-leaf 1: core level, `count` cores.
        // Sub-leaf 2: invalid level, terminates the enumeration.
        let subleaves =
            [(0, 1, TOPOLOGY_LEVEL_SMT), (id_bits(count), count, TOPOLOGY_LEVEL_CORE), (0, 0, 0)];
        for (index, (shift, logical, level_type)) in subleaves.into_iter().enumerate() {
            entries.push(kvm_cpuid_entry2 {
                function,
                index: index as u32,
                flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                eax: shift,
                ebx: logical,
                ecx: (level_type << 8) | index as u32,
                edx: apic,
                ..Default::default()
            });
        }
    }
}

/// Sets the normalised CPUID of vCPU `apic_id` of `count` from KVM's supported set.
pub fn configure_vcpu(
    kvm: &kvm_ioctls::Kvm,
    vcpu: &kvm_ioctls::VcpuFd,
    apic_id: u8,
    count: u8,
) -> Result<(), CpuidError> {
    let supported = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(CpuidError::GetSupported)?;
    let mut entries = supported.as_slice().to_vec();
    normalise(&mut entries, apic_id, count);
    let cpuid = CpuId::from_entries(&entries).map_err(CpuidError::Build)?;
    vcpu.set_cpuid2(&cpuid).map_err(CpuidError::SetCpuid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 { function, index, eax, ebx, ecx, edx, ..Default::default() }
    }

    fn find(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> kvm_cpuid_entry2 {
        *entries.iter().find(|e| e.function == function && e.index == index).unwrap()
    }

    #[test]
    fn leaf1_carries_apic_id_count_and_hypervisor_bit() {
        let mut entries = vec![leaf(1, 0, 0x806c1, 0xff08_0800, 0x0, EDX_HTT)];
        normalise(&mut entries, 3, 4);
        let l1 = find(&entries, 1, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!((l1.ebx >> 8) & 0xff, 0x08, "CLFLUSH size kept");
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(l1.edx & EDX_HTT, 0);

        let mut single = vec![leaf(1, 0, 0, 0, 0, EDX_HTT)];
        normalise(&mut single, 0, 1);
        assert_eq!(find(&single, 1, 0).edx & EDX_HTT, 0);
    }

    #[test]
    fn topology_leaves_describe_single_threaded_cores() {
        let mut entries = vec![leaf(0xb, 0, 1, 2, 0x100, 7), leaf(0xb, 1, 4, 16, 0x201, 7)];
        normalise(&mut entries, 2, 3);
        let smt = find(&entries, 0xb, 0);
        assert_eq!((smt.eax, smt.ebx, smt.ecx >> 8, smt.edx), (0, 1, TOPOLOGY_LEVEL_SMT, 2));
        let core = find(&entries, 0xb, 1);
        assert_eq!((core.eax, core.ebx, core.ecx >> 8, core.edx), (2, 3, TOPOLOGY_LEVEL_CORE, 2));
        assert_eq!(find(&entries, 0xb, 2).ecx >> 8, 0, "enumeration terminates");
        assert_eq!(entries.iter().filter(|e| e.function == 0xb).count(), 3);
        assert!(entries.iter().all(|e| e.function != 0x1f), "no 0x1f when KVM had none");
    }

    #[test]
    fn caches_pmu_and_amd_apic_id() {
        let l1d = (1 << 5) | 1; // level 1, data cache
        let l3 = (3 << 5) | 3;
        let mut entries = vec![
            leaf(4, 0, l1d | (7 << 14) | (63 << 26), 0, 0, 0),
            leaf(4, 3, l3, 0, 0, 0),
            leaf(0xa, 0, 0x0704_0802, 1, 2, 3),
            leaf(0x8000_001e, 0, 9, 0x0101, 0x0001, 0),
        ];
        normalise(&mut entries, 1, 2);
        let l1 = find(&entries, 4, 0);
        assert_eq!((l1.eax >> 14) & 0xfff, 0);
        assert_eq!(l1.eax >> 26, 1);
        assert_eq!(l1.eax & 0x3fff, l1d);
        assert_eq!((find(&entries, 4, 3).eax >> 14) & 0xfff, 1);
        let pmu = find(&entries, 0xa, 0);
        assert_eq!((pmu.eax, pmu.ebx, pmu.ecx, pmu.edx), (0, 0, 0, 0));
        let amd = find(&entries, 0x8000_001e, 0);
        assert_eq!((amd.eax, amd.ebx & 0xff, amd.ecx & 0xff), (1, 0, 0));
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!([1, 2, 3, 4, 5, 8, 9].map(id_bits), [0, 1, 2, 2, 3, 3, 4]);
    }
}
