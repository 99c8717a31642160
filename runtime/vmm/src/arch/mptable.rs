//! The Intel MultiProcessor Specification 1.4 table, through which a guest without ACPI finds
//! its CPUs, the IOAPIC and the ISA interrupt routing.

use vm_memory::{Bytes, GuestAddress};

use crate::layout;
use crate::memory::GuestMemory;

#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    #[error("{0} vCPUs do not fit in the MP table (at most {MAX_VCPUS})")]
    TooManyCpus(u8),
    #[error("writing the MP table into guest memory: {0}")]
    Write(vm_memory::GuestMemoryError),
}

/// How many processor entries fit in the EBDA after the fixed entries.
pub const MAX_VCPUS: u8 = 32;

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 0x1;
const CPU_BOOT_PROCESSOR: u8 = 0x2;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
/// Family 6, from CPUID leaf 1 EAX: only informative.
const CPU_SIGNATURE: u32 = 0x600;
/// CPUID leaf 1 EDX: FPU and APIC present.
const CPU_FEATURES: u32 = 0x201;

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)).wrapping_neg()
}

/// Builds the floating pointer followed by the configuration table, to be placed at `base`.
pub fn build(base: u64, vcpus: u8) -> Result<Vec<u8>, MpTableError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(MpTableError::TooManyCpus(vcpus));
    }
    let ioapic_id = vcpus; // after the CPUs' APIC ids
    let config_addr = base + 16;

    let mut entries: Vec<u8> = Vec::new();
    let mut count = 0u16;
    for cpu in 0..vcpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOT_PROCESSOR } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0u8; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, CPU_ENABLED]);
    entries.extend_from_slice(&(layout::IOAPIC_START as u32).to_le_bytes());
    count += 1;
    for pin in 0..=layout::IRQ_MAX as u8 {
        // ISA IRQ n -> IOAPIC pin n, bus-default polarity and trigger.
        entries.extend_from_slice(&[
            ENTRY_IO_INTERRUPT,
            INT_TYPE_INT,
            0,
            0,
            0,
            pin,
            ioapic_id,
            pin,
        ]);
        count += 1;
    }
    // LINT0 of every local APIC: ExtINT (the PIC); LINT1: NMI.
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_len = 44 + entries.len();
    let mut config = Vec::with_capacity(table_len);
    config.extend_from_slice(b"PCMP");
    config.extend_from_slice(&(table_len as u16).to_le_bytes());
    config.push(4); // spec revision 1.4
    config.push(0); // checksum, below
    config.extend_from_slice(b"PODVISOR");
    config.extend_from_slice(b"MICROVM     ");
    config.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    config.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    config.extend_from_slice(&count.to_le_bytes());
    config.extend_from_slice(&(layout::APIC_START as u32).to_le_bytes());
    config.extend_from_slice(&[0, 0, 0, 0]); // extended table length, checksum, reserved
    config.extend_from_slice(&entries);
    config[7] = checksum(&config);

    let mut table = Vec::with_capacity(16 + config.len());
    table.extend_from_slice(b"_MP_");
    table.extend_from_slice(&(config_addr as u32).to_le_bytes());
    table.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]); // length 1 paragraph, rev 1.4
    table[10] = checksum(&table);
    table.extend_from_slice(&config);
    Ok(table)
}

/// Writes the MP table for `vcpus` at [`layout::MPTABLE_START`].
pub fn setup(mem: &GuestMemory, vcpus: u8) -> Result<(), MpTableError> {
    let table = build(layout::MPTABLE_START, vcpus)?;
    mem.write_slice(&table, GuestAddress(layout::MPTABLE_START)).map_err(MpTableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_checksums_and_fits_the_ebda() {
        for vcpus in [1u8, 2, MAX_VCPUS] {
            let t = build(layout::MPTABLE_START, vcpus).unwrap();
            assert_eq!(&t[0..4], b"_MP_");
            assert_eq!(t[..16].iter().fold(0u8, |s, b| s.wrapping_add(*b)), 0);
            let ptr = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
            assert_eq!(ptr, layout::MPTABLE_START + 16);
            let config = &t[16..];
            assert_eq!(&config[0..4], b"PCMP");
            let len = u16::from_le_bytes([config[4], config[5]]) as usize;
            assert_eq!(len, config.len());
            assert_eq!(config.iter().fold(0u8, |s, b| s.wrapping_add(*b)), 0);
            let count = u16::from_le_bytes([config[34], config[35]]);
            assert_eq!(count as usize, vcpus as usize + 2 + 24 + 2);
            assert!(layout::MPTABLE_START + t.len() as u64 <= 0xa0000, "beyond the EBDA");
            // The first processor entry is the enabled boot processor.
            assert_eq!(&config[44..48], &[ENTRY_PROCESSOR, 0, APIC_VERSION, 3]);
        }
        assert!(build(0, 0).is_err());
        assert!(build(0, MAX_VCPUS + 1).is_err());
    }
}
