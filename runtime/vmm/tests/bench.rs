//! `make bench` figures for the built-in VMM (see `podvisor_vmm::bench`); ignored by default:
//! `cargo test -p podvisor-vmm --release --test bench -- --ignored --nocapture`. With
//! `PODVISOR_BIN` set, measures `$PODVISOR_BIN vmm` (the daemon binary) instead of this
//! crate's `podvisor-vmm`.

mod common;

use std::ffi::OsString;

#[test]
#[ignore]
fn bench_rss_overhead_and_start_to_first_instruction() {
    if !common::kvm_available() {
        return;
    }
    let command: Vec<OsString> = match std::env::var_os("PODVISOR_BIN") {
        Some(bin) => vec![bin, "vmm".into()],
        None => vec![env!("CARGO_BIN_EXE_podvisor-vmm").into()],
    };
    let report = podvisor_vmm::bench::measure(&command, 5).unwrap();
    println!(
        "{} ({:?}, {} build)",
        report,
        command,
        if cfg!(debug_assertions) { "debug" } else { "release" }
    );
    assert!(report.guest_touched_kib > 0, "the guest memory mapping was not found");
}

#[test]
#[ignore]
fn bench_snapshot_and_restore() {
    if !common::kvm_available() {
        return;
    }
    let command: Vec<OsString> = match std::env::var_os("PODVISOR_BIN") {
        Some(bin) => vec![bin, "vmm".into()],
        None => vec![env!("CARGO_BIN_EXE_podvisor-vmm").into()],
    };
    let report = podvisor_vmm::bench::measure_restore(&command, 5).unwrap();
    println!(
        "{} ({:?}, {} build)",
        report,
        command,
        if cfg!(debug_assertions) { "debug" } else { "release" }
    );
    assert!(report.guest_shared_kib > 0, "the snapshot mapping was not found");
}
