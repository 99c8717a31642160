//! x86-64 specifics: loading the guest, boot CPU state, CPUID, MP table.

pub mod boot;
pub mod cpuid;
pub mod mptable;
pub mod regs;
