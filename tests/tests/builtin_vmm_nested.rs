//! End-to-end with the built-in VMM where this machine's KVM cannot boot Linux (nested PVM):
//! one level down. QEMU/TCG emulates an AMD CPU with SVM; in that L1 VM, Debian's kernel loads
//! kvm-amd, and its /dev/kvm boots Linux. Inside L1 run the real daemon with
//! `hypervisor = "builtin"`, a registry holding an image this test pushed, and a CRI client
//! (`podvisor-nested-client`) that pulls, runs a pod on the built-in VMM (jailed, seccomp on,
//! its shares through the in-process virtio-fs device and a sandboxed `fs-serve`), starts a
//! container (its rootfs from the image share) that logs, execs in it and removes the pod.
//!
//! Where KVM boots Linux itself, `builtin_vmm.rs` already covers this and the test skips.
//! L1 needs only loopback: the registry's storage travels in L1's initramfs.
//!
//! L1's set-up lives in `podvisor_e2e::nested` (shared with `make bench`'s template figures).

use std::time::{Duration, Instant};

use podvisor_e2e::daemon::{e2e_can_run, kvm_can_boot_linux};
use podvisor_e2e::nested::{can_nest, run_l1, tail, Mode, Unavailable};

/// TCG emulates both L1 and, through emulated SVM, L2: a pod takes minutes (four VMs with the
/// template phase).
const L1_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// A missing piece of this test's own set-up: a failure under `PODVISOR_REQUIRE_E2E=1`, like
/// the other end-to-end tests' artefacts, else a skip.
fn missing(what: &str) {
    if std::env::var("PODVISOR_REQUIRE_E2E").as_deref() == Ok("1") {
        panic!("nested end-to-end test cannot run: {what}");
    }
    println!("SKIP: {what}");
}

#[test]
fn builtin_vmm_runs_a_pod_inside_an_l1_vm_with_emulated_svm() {
    if !e2e_can_run() {
        return;
    }
    match kvm_can_boot_linux() {
        Ok(()) => {
            println!("SKIP: KVM boots Linux here; builtin_vmm.rs runs the pod on it directly");
            return;
        }
        Err(reason) => println!("KVM cannot boot Linux here ({reason}): nesting under TCG"),
    }
    let test_started = Instant::now();
    // Host-side milestones, seen on L1's console as they happen.
    let milestones = [
        "L1: init started",
        "L1: kvm ready",
        "NESTED-TIMING pull",
        "NESTED-TIMING run-pod",
        "NESTED-TIMING start-container",
        "NESTED-RESULT",
    ];
    let client = std::path::Path::new(env!("CARGO_BIN_EXE_podvisor-nested-client"));
    let run = match can_nest()
        .and_then(|virtiofsd| run_l1(Mode::Test, client, &virtiofsd, &milestones, L1_TIMEOUT))
    {
        Ok(run) => run,
        Err(Unavailable::Skip(why)) => return println!("SKIP: {why}"),
        Err(Unavailable::Missing(what)) => return missing(&what),
    };
    for (milestone, at) in &run.milestones {
        println!("host: {milestone:?} after {:.1} s", at.as_secs_f64());
    }
    for line in run.report_lines() {
        println!("{line}");
    }
    println!(
        "L1 VM ran {:.1} s ({}); test took {:.1} s in all",
        run.ran_for.as_secs_f64(),
        run.exit.map_or("still running at the timeout: killed".to_string(), |s| s.to_string()),
        test_started.elapsed().as_secs_f64()
    );
    let text = &run.console;
    assert!(
        run.result() == "NESTED-RESULT ok",
        "{}\n--- L1 console (tail):\n{}",
        run.result(),
        tail(text, 150)
    );
    assert!(
        text.contains("L1: shares served in-process by fs-serve"),
        "the pod's shares did not go through the in-process virtio-fs device\n--- L1 console \
         (tail):\n{}",
        tail(text, 150)
    );
}
