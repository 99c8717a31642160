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
//! L1's kernel and KVM modules come from Debian's apt (`tests/nested/l1-kernel.sh`, cached);
//! its initramfs is built per run (`tests/nested/mkinitramfs.sh`, `/init` is
//! `tests/nested/init`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use podvisor_e2e::daemon::{
    e2e_can_run, guest_initrd, guest_kernel, kvm_can_boot_linux, podvisor_bin,
};
use podvisor_e2e::registry::{TestRegistry, REGISTRY_BIN};

/// Where the registry listens inside L1 (tests/nested/init configures it).
const L1_REGISTRY: &str = "127.0.0.1:5000";
/// TCG emulates both L1 and, through emulated SVM, L2: a pod takes minutes (four VMs with the
/// template phase).
const L1_TIMEOUT: Duration = Duration::from_secs(30 * 60);

fn nested_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("nested")
}

/// Whether QEMU's TCG can emulate AMD SVM (`-cpu help` lists the `svm` flag).
fn tcg_offers_svm() -> Result<bool, String> {
    let out = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-cpu", "help"])
        .output()
        .map_err(|e| format!("running qemu-system-x86_64 -cpu help: {e}"))?;
    Ok(String::from_utf8_lossy(&out.stdout).split_whitespace().any(|flag| flag == "svm"))
}

/// `name` in PATH, then in ~/.cargo/bin (where `make deps` may `cargo install` it).
fn find_binary(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> =
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()).collect();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(Path::new(&home).join(".cargo/bin"));
    }
    dirs.into_iter().map(|dir| dir.join(name)).find(|path| path.is_file())
}

/// A missing piece of this test's own set-up: a failure under `PODVISOR_REQUIRE_E2E=1`, like
/// the other end-to-end tests' artefacts, else a skip.
fn missing(what: &str) {
    if std::env::var("PODVISOR_REQUIRE_E2E").as_deref() == Ok("1") {
        panic!("nested end-to-end test cannot run: {what}");
    }
    println!("SKIP: {what}");
}

/// The L1 VM; killed if the test ends before it powers off.
struct L1Vm(Child);

impl Drop for L1Vm {
    fn drop(&mut self) {
        // Best effort: a failed kill means QEMU already exited.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The last `lines` lines of `text`.
fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
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
    match tcg_offers_svm() {
        Ok(true) => {}
        Ok(false) => {
            println!("SKIP: this QEMU's TCG does not emulate AMD SVM");
            return;
        }
        Err(error) => return missing(&error),
    }
    let Some(virtiofsd) = find_binary("virtiofsd") else {
        return missing("virtiofsd not found in PATH or ~/.cargo/bin (run `make deps`)");
    };
    let test_started = Instant::now();

    let l1_kernel = Command::new(nested_dir().join("l1-kernel.sh"))
        .stderr(Stdio::inherit())
        .output()
        .expect("running tests/nested/l1-kernel.sh");
    if !l1_kernel.status.success() {
        return missing("the L1 kernel: tests/nested/l1-kernel.sh failed (see above)");
    }
    let l1_kernel_dir = PathBuf::from(String::from_utf8_lossy(&l1_kernel.stdout).trim());

    let registry = TestRegistry::start().expect("starting the registry");
    let pushed = registry.push_busybox("busybox:nested").expect("pushing busybox");
    let image = format!("{L1_REGISTRY}/{}", pushed.split_once('/').map_or("", |(_, name)| name));

    let work = tempfile::Builder::new()
        .prefix("podvisor-nested-")
        .tempdir_in("/var/tmp")
        .expect("temporary directory");
    let initramfs = work.path().join("l1.cpio.gz");
    let built = Instant::now();
    let status = Command::new(nested_dir().join("mkinitramfs.sh"))
        .arg(&initramfs)
        .env("L1_KERNEL_DIR", &l1_kernel_dir)
        .env("PODVISOR_BIN", podvisor_bin())
        .env("L2_KERNEL", guest_kernel())
        .env("L2_INITRD", guest_initrd())
        .env("VIRTIOFSD", &virtiofsd)
        .env("CLIENT", env!("CARGO_BIN_EXE_podvisor-nested-client"))
        .env("REGISTRY_BIN", REGISTRY_BIN)
        .env("REGISTRY_STORAGE", registry.storage_dir())
        .env("IMAGE", &image)
        .env("BUSYBOX", podvisor_e2e::images::BUSYBOX)
        .status()
        .expect("running tests/nested/mkinitramfs.sh");
    assert!(status.success(), "tests/nested/mkinitramfs.sh failed");
    drop(registry);
    let initramfs_size = std::fs::metadata(&initramfs).map(|m| m.len()).unwrap_or(0);
    println!(
        "L1 initramfs: {} MiB in {:.1} s",
        initramfs_size >> 20,
        built.elapsed().as_secs_f64()
    );

    let console = work.path().join("console.log");
    let started = Instant::now();
    let mut vm = L1Vm(
        Command::new("qemu-system-x86_64")
            .args(["-accel", "tcg", "-cpu", "max,+svm,+npt", "-m", "3072", "-smp", "2"])
            .args(["-nographic", "-no-reboot", "-kernel"])
            .arg(l1_kernel_dir.join("vmlinuz"))
            .arg("-initrd")
            .arg(&initramfs)
            .args(["-append", "console=ttyS0 panic=-1 quiet"])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&console).expect("console log"))
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting qemu-system-x86_64"),
    );

    // Host-side milestones, seen on L1's console as they happen.
    let milestones = [
        "L1: init started",
        "L1: kvm ready",
        "NESTED-TIMING pull",
        "NESTED-TIMING run-pod",
        "NESTED-TIMING start-container",
        "NESTED-RESULT",
    ];
    let mut seen = Vec::new();
    let exit = loop {
        // Checked before reading the console, so the lines of a VM that just exited count.
        let exited = vm.0.try_wait().expect("waiting for QEMU");
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        for milestone in milestones.iter().skip(seen.len()) {
            if !text.contains(milestone) {
                break;
            }
            seen.push((*milestone, started.elapsed()));
        }
        if exited.is_some() {
            break exited;
        }
        if started.elapsed() > L1_TIMEOUT {
            break None;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let text = std::fs::read_to_string(&console).unwrap_or_default();
    for (milestone, at) in &seen {
        println!("host: {milestone:?} after {:.1} s", at.as_secs_f64());
    }
    // The firmware's escape sequences can precede the first line of /init on its line.
    for line in text.lines() {
        if let Some(start) = line.find("L1: ").or_else(|| line.find("NESTED-")) {
            println!("{}", line[start..].trim_end());
        }
    }
    println!(
        "L1 VM ran {:.1} s ({}); test took {:.1} s in all",
        started.elapsed().as_secs_f64(),
        exit.map_or("still running at the timeout: killed".to_string(), |s| s.to_string()),
        test_started.elapsed().as_secs_f64()
    );
    let result =
        text.lines().find(|l| l.starts_with("NESTED-RESULT")).unwrap_or("no NESTED-RESULT");
    assert!(
        result.trim_end() == "NESTED-RESULT ok",
        "{result}\n--- L1 console (tail):\n{}",
        tail(&text, 150)
    );
    assert!(
        text.contains("L1: shares served in-process by fs-serve"),
        "the pod's shares did not go through the in-process virtio-fs device\n--- L1 console \
         (tail):\n{}",
        tail(&text, 150)
    );
}
