//! `make bench` numbers for the built-in VMM (ignored by default; run with
//! `cargo test -p podvisor-vmm --test bench -- --ignored --nocapture`, add `--release` for
//! representative figures):
//! - RSS overhead of a 1-vCPU, 128 MiB VM: the VMM process's VmRSS minus the guest memory it
//!   touched (the resident part of the guest-RAM memfd mapping);
//! - VMM start to first guest instruction: from just before spawning the process to vCPU 0's
//!   first exit, with a guest whose first instruction is an `out`.

mod common;

use common::{config, kvm_available, spawn};
use podvisor_vmm::control::Request;
use podvisor_vmm::guest_program::asm;

const RUNS: usize = 5;

/// (VmRSS, RssAnon, RssFile, guest memfd Rss) in KiB.
fn rss_kib(pid: u32) -> (u64, u64, u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut guest = 0;
    let mut in_guest = false;
    for line in smaps.lines() {
        if line.contains(" /memfd:") || line.ends_with("(deleted)") && line.contains("memfd:") {
            in_guest = line.contains("podvisor-guest-ram");
        } else if line.split_whitespace().next().is_some_and(|w| w.contains('-')) {
            in_guest = false;
        } else if in_guest && line.starts_with("Rss:") {
            guest +=
                line.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    (field("VmRSS:"), field("RssAnon:"), field("RssFile:"), guest)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[test]
#[ignore]
fn bench_rss_overhead_and_start_to_first_instruction() {
    if !kvm_available() {
        return;
    }
    // First instruction exits to the VMM (`out 0x80, al`), then halt with interrupts off.
    let code = asm::program(&[&asm::out_imm_al(0x80), &asm::HLT]);
    let (mut overheads, mut anon, mut starts, mut guest_kib) = (vec![], vec![], vec![], vec![]);
    for _ in 0..RUNS {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), &code, 128);
        let mut vmm = spawn(dir, &cfg, &[]);
        let status = loop {
            let s = vmm.request(&Request::Status).status.unwrap();
            if s.first_exit_unix_ns.is_some() {
                break s;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        };
        let spawned_ns =
            vmm.spawned_at.duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
        let first = status.first_exit_unix_ns.unwrap();
        starts.push((first - spawned_ns) as f64 / 1e6);
        std::thread::sleep(std::time::Duration::from_millis(200));
        let (rss, rss_anon, _file, guest) = rss_kib(vmm.child.id());
        overheads.push((rss - guest) as f64);
        anon.push(rss_anon as f64);
        guest_kib.push(guest as f64);
        assert!(vmm.request(&Request::Stop).ok);
        let (code, stderr) = vmm.wait_exit();
        assert_eq!(code, Some(0), "{stderr}");
    }
    println!(
        "builtin VMM, 1 vCPU, 128 MiB, median of {RUNS} ({} build):",
        if cfg!(debug_assertions) { "debug" } else { "release" }
    );
    println!(
        "  RSS overhead (VmRSS - guest memory touched): {:.0} KiB ({:.2} MiB); RssAnon {:.0} KiB; guest touched {:.0} KiB",
        median(overheads.clone()),
        median(overheads) / 1024.0,
        median(anon),
        median(guest_kib)
    );
    println!("  VMM start -> first guest instruction: {:.2} ms", median(starts));
}
