//! The built-in VMM one level down, where this machine's KVM cannot boot Linux (nested PVM):
//! QEMU/TCG emulates an AMD CPU with SVM; in that L1 VM, Debian's kernel loads kvm-amd, and
//! its /dev/kvm boots Linux. L1 runs the real daemon with `hypervisor = "builtin"`, a registry
//! holding an image pushed here, and `podvisor-nested-client`, whose output reaches L1's
//! serial console. Used by the nested end-to-end test (`builtin_vmm_nested.rs`, mode `test`)
//! and by `make bench`'s template figures (`podvisor-template-bench`, mode `bench`).
//!
//! L1's kernel and KVM modules come from Debian's apt (`tests/nested/l1-kernel.sh`, cached);
//! its initramfs is built per run (`tests/nested/mkinitramfs.sh`, `/init` is
//! `tests/nested/init`, which reads the mode from the kernel command line).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::daemon::{guest_initrd, guest_kernel, podvisor_bin};
use crate::registry::{TestRegistry, REGISTRY_BIN};

/// Where the registry listens inside L1 (tests/nested/init configures it).
const L1_REGISTRY: &str = "127.0.0.1:5000";

/// What L1's `/init` does: the end-to-end checks or the template figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Test,
    Bench,
}

impl Mode {
    fn kernel_arg(self) -> &'static str {
        match self {
            Mode::Test => "podvisor.nested=test",
            Mode::Bench => "podvisor.nested=bench",
        }
    }
}

/// Why the nested run cannot happen here: a skip (this machine cannot nest) or a missing
/// piece of its set-up (a failure where the end-to-end tests must run).
#[derive(Debug)]
pub enum Unavailable {
    Skip(String),
    Missing(String),
}

/// One L1 run's outcome.
pub struct L1Run {
    /// L1's serial console.
    pub console: String,
    /// QEMU's exit, or `None` when it was killed at the timeout.
    pub exit: Option<ExitStatus>,
    /// The milestones asked for that appeared, with when (from QEMU's start).
    pub milestones: Vec<(String, Duration)>,
    pub ran_for: Duration,
}

impl L1Run {
    /// The console's lines from L1's `/init` and the client (`L1: `, `NESTED-`), without the
    /// firmware's escape sequences that may precede them.
    pub fn report_lines(&self) -> Vec<&str> {
        self.console
            .lines()
            .filter_map(|line| {
                let start = line.find("L1: ").or_else(|| line.find("NESTED-"))?;
                Some(line[start..].trim_end())
            })
            .collect()
    }

    /// The client's `NESTED-RESULT` line.
    pub fn result(&self) -> &str {
        self.console
            .lines()
            .find(|l| l.starts_with("NESTED-RESULT"))
            .map_or("no NESTED-RESULT", str::trim_end)
    }
}

/// The L1 VM; killed if the run ends before it powers off.
struct L1Vm(Child);

impl Drop for L1Vm {
    fn drop(&mut self) {
        // Best effort: a failed kill means QEMU already exited.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

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
pub fn find_binary(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> =
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()).collect();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(Path::new(&home).join(".cargo/bin"));
    }
    dirs.into_iter().map(|dir| dir.join(name)).find(|path| path.is_file())
}

/// Whether this machine can run L1 with emulated SVM, and has virtiofsd for it.
pub fn can_nest() -> Result<PathBuf, Unavailable> {
    match tcg_offers_svm() {
        Ok(true) => {}
        Ok(false) => {
            return Err(Unavailable::Skip("this QEMU's TCG does not emulate AMD SVM".into()))
        }
        Err(error) => return Err(Unavailable::Missing(error)),
    }
    find_binary("virtiofsd").ok_or_else(|| {
        Unavailable::Missing("virtiofsd not found in PATH or ~/.cargo/bin (run `make deps`)".into())
    })
}

/// Boots L1 in `mode` with `client` as its CRI client and waits until it powers off (or
/// `timeout`), noting `milestones` as they appear on its console.
pub fn run_l1(
    mode: Mode,
    client: &Path,
    virtiofsd: &Path,
    milestones: &[&str],
    timeout: Duration,
) -> Result<L1Run, Unavailable> {
    let l1_kernel = Command::new(nested_dir().join("l1-kernel.sh"))
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| Unavailable::Missing(format!("running tests/nested/l1-kernel.sh: {e}")))?;
    if !l1_kernel.status.success() {
        return Err(Unavailable::Missing(
            "the L1 kernel: tests/nested/l1-kernel.sh failed (see above)".into(),
        ));
    }
    let l1_kernel_dir = PathBuf::from(String::from_utf8_lossy(&l1_kernel.stdout).trim());
    let work = tempfile::Builder::new()
        .prefix("podvisor-nested-")
        .tempdir_in("/var/tmp")
        .map_err(|e| Unavailable::Missing(format!("a temporary directory in /var/tmp: {e}")))?;
    let initramfs = work.path().join("l1.cpio.gz");
    build_initramfs(&initramfs, &l1_kernel_dir, client, virtiofsd)?;
    let console = work.path().join("console.log");
    let started = Instant::now();
    let vm = L1Vm(
        Command::new("qemu-system-x86_64")
            .args(["-accel", "tcg", "-cpu", "max,+svm,+npt", "-m", "3072", "-smp", "2"])
            .args(["-nographic", "-no-reboot", "-kernel"])
            .arg(l1_kernel_dir.join("vmlinuz"))
            .arg("-initrd")
            .arg(&initramfs)
            .arg("-append")
            .arg(format!("console=ttyS0 panic=-1 quiet {}", mode.kernel_arg()))
            .stdin(Stdio::null())
            .stdout(
                std::fs::File::create(&console)
                    .map_err(|e| Unavailable::Missing(format!("the console log: {e}")))?,
            )
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| Unavailable::Missing(format!("starting qemu-system-x86_64: {e}")))?,
    );
    Ok(wait_for_l1(vm, &console, milestones, timeout, started))
}

/// L1's initramfs at `out`, holding the daemon, the pod guest, a registry with busybox and
/// `client` (see tests/nested/mkinitramfs.sh).
fn build_initramfs(
    out: &Path,
    l1_kernel_dir: &Path,
    client: &Path,
    virtiofsd: &Path,
) -> Result<(), Unavailable> {
    let registry = TestRegistry::start()
        .map_err(|e| Unavailable::Missing(format!("starting the registry: {e:#}")))?;
    let pushed = registry
        .push_busybox("busybox:nested")
        .map_err(|e| Unavailable::Missing(format!("pushing busybox: {e:#}")))?;
    let image = format!("{L1_REGISTRY}/{}", pushed.split_once('/').map_or("", |(_, name)| name));
    let built = Instant::now();
    let status = Command::new(nested_dir().join("mkinitramfs.sh"))
        .arg(out)
        .env("L1_KERNEL_DIR", l1_kernel_dir)
        .env("PODVISOR_BIN", podvisor_bin())
        .env("L2_KERNEL", guest_kernel())
        .env("L2_INITRD", guest_initrd())
        .env("VIRTIOFSD", virtiofsd)
        .env("CLIENT", client)
        .env("REGISTRY_BIN", REGISTRY_BIN)
        .env("REGISTRY_STORAGE", registry.storage_dir())
        .env("IMAGE", &image)
        .env("BUSYBOX", crate::images::BUSYBOX)
        .status()
        .map_err(|e| Unavailable::Missing(format!("running tests/nested/mkinitramfs.sh: {e}")))?;
    if !status.success() {
        return Err(Unavailable::Missing("tests/nested/mkinitramfs.sh failed".into()));
    }
    let size = std::fs::metadata(out).map(|m| m.len()).unwrap_or(0);
    println!("L1 initramfs: {} MiB in {:.1} s", size >> 20, built.elapsed().as_secs_f64());
    Ok(())
}

/// Waits until L1 exits or `timeout`; the milestones seen on its console, as they happen.
fn wait_for_l1(
    mut vm: L1Vm,
    console: &Path,
    milestones: &[&str],
    timeout: Duration,
    started: Instant,
) -> L1Run {
    let mut seen: Vec<(String, Duration)> = Vec::new();
    let exit = loop {
        // Checked before reading the console, so the lines of a VM that just exited count.
        let exited = vm.0.try_wait().ok().flatten();
        let text = std::fs::read_to_string(console).unwrap_or_default();
        for milestone in milestones.iter().skip(seen.len()) {
            if !text.contains(milestone) {
                break;
            }
            seen.push((milestone.to_string(), started.elapsed()));
        }
        if exited.is_some() || started.elapsed() > timeout {
            break exited;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    drop(vm);
    L1Run {
        console: std::fs::read_to_string(console).unwrap_or_default(),
        exit,
        milestones: seen,
        ran_for: started.elapsed(),
    }
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
