//! Figures for `make bench`, measured on a real VMM process running a tiny guest:
//! - RSS overhead of a 1-vCPU, 128 MiB VM: the process's VmRSS minus the guest memory it
//!   touched (the resident part of the guest-RAM memfd mapping). Firecracker's bar: <= 5 MiB.
//! - VMM start to first guest instruction: from just before spawning the process to vCPU 0's
//!   first exit, with a guest whose first instruction is an `out`.
//! - The same from a snapshot ([`measure_restore`]): a guest that exits every few hundred
//!   instructions is snapshotted once; each run spawns `--restore` and times the first exit.
//!   Also the snapshot's write time and the memory of two VMMs restored side by side: their
//!   PSS and USS (smaps_rollup), and the guest pages each one owns privately.
//!
//! Call [`measure`] with the command that runs the VMM (`podvisor vmm`, or the crate's
//! `podvisor-vmm` binary).

use std::ffi::OsString;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::config::{SeccompMode, VmmConfig};
use crate::control::{self, Request};
use crate::guest_program::{asm, elf};

/// Medians over the runs.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchReport {
    pub runs: usize,
    /// VmRSS minus the guest memory touched, KiB.
    pub rss_overhead_kib: u64,
    /// Anonymous resident memory of the VMM process, KiB.
    pub rss_anon_kib: u64,
    /// Guest memory the tiny guest (and the boot structures) touched, KiB.
    pub guest_touched_kib: u64,
    /// Spawn to vCPU 0's first exit.
    pub start_to_first_instruction: Duration,
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "built-in VMM, 1 vCPU, 128 MiB, median of {} runs:", self.runs)?;
        writeln!(
            f,
            "  RSS overhead (VmRSS - guest memory touched): {} KiB ({:.2} MiB); RssAnon {} KiB; guest touched {} KiB",
            self.rss_overhead_kib,
            self.rss_overhead_kib as f64 / 1024.0,
            self.rss_anon_kib,
            self.guest_touched_kib
        )?;
        write!(
            f,
            "  VMM start -> first guest instruction: {:.2} ms",
            self.start_to_first_instruction.as_secs_f64() * 1000.0
        )
    }
}

/// (VmRSS, RssAnon, guest memfd Rss) of `pid`, KiB.
fn rss_kib(pid: u32) -> Result<(u64, u64, u64), String> {
    let read = |p: String| std::fs::read_to_string(&p).map_err(|e| format!("reading {p}: {e}"));
    let status = read(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let smaps = read(format!("/proc/{pid}/smaps"))?;
    let (mut guest, mut in_guest) = (0, false);
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            // A mapping header: "start-end perms offset dev inode [path]".
            in_guest = line.contains("memfd:podvisor-guest-ram");
        } else if in_guest && line.starts_with("Rss:") {
            guest +=
                line.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    Ok((field("VmRSS:"), field("RssAnon:"), guest))
}

fn median<T: Copy + Ord>(mut v: Vec<T>) -> T {
    v.sort();
    v[v.len() / 2]
}

fn io(what: &str) -> impl Fn(std::io::Error) -> String {
    let what = what.to_string();
    move |e: std::io::Error| format!("{what}: {e}")
}

/// Writes the config of a 1-vCPU, 128 MiB VM running `code` into `dir`; returns its path.
fn write_config(dir: &Path, code: &[u8]) -> Result<std::path::PathBuf, String> {
    let kernel = dir.join("prog.elf");
    std::fs::write(&kernel, elf(code)).map_err(io("writing the guest program"))?;
    let config = VmmConfig {
        vcpus: 1,
        memory_mib: 128,
        kernel,
        initrd: None,
        cmdline: String::new(),
        console_log: dir.join("console.log"),
        console_log_max_bytes: crate::console::DEFAULT_MAX_BYTES,
        vsock: None,
        drives: vec![],
        nets: vec![],
        fs: vec![],
        seccomp: SeccompMode::Trap,
    };
    let config_path = dir.join("vmm.json");
    let json = serde_json::to_vec(&config).map_err(|e| format!("serialising the config: {e}"))?;
    std::fs::write(&config_path, json).map_err(io("writing the config"))?;
    Ok(config_path)
}

/// A VMM process started by the bench; stopped (and reaped) on drop.
struct BenchVmm {
    child: std::process::Child,
    socket: std::path::PathBuf,
    spawned_at: SystemTime,
}

impl BenchVmm {
    /// Spawns `vmm_command` on the config in `dir` with `extra` arguments.
    fn spawn(vmm_command: &[OsString], dir: &Path, extra: &[OsString]) -> Result<Self, String> {
        let socket = dir.join("control.sock");
        let (program, prefix) = vmm_command.split_first().ok_or("empty VMM command")?;
        let spawned_at = SystemTime::now();
        let child = Command::new(program)
            .args(prefix)
            .arg("--config")
            .arg(dir.join("vmm.json"))
            .arg("--control")
            .arg(&socket)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(io("spawning the VMM"))?;
        Ok(Self { child, socket, spawned_at })
    }

    fn request(&self, request: &Request) -> Result<control::Response, String> {
        let answer = control::request(&self.socket, request, Duration::from_secs(5))
            .map_err(|e| e.to_string())?;
        match answer.ok {
            true => Ok(answer),
            false => Err(answer.error.unwrap_or_else(|| format!("{request:?} failed"))),
        }
    }

    /// Waits for vCPU 0's first exit; returns the time from spawning to it.
    fn wait_first_exit(&mut self) -> Result<Duration, String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let first_exit = loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("the VMM exited early ({status})"));
            }
            let answer = control::request(&self.socket, &Request::Status, Duration::from_secs(2));
            if let Some(ns) = answer.ok().and_then(|r| r.status).and_then(|s| s.first_exit_unix_ns)
            {
                break ns;
            }
            if Instant::now() > deadline {
                return Err("the guest did not run within 10 s".into());
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        let spawned_ns = self.spawned_at.duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64);
        Ok(Duration::from_nanos(first_exit.saturating_sub(spawned_ns.unwrap_or(0))))
    }
}

impl Drop for BenchVmm {
    fn drop(&mut self) {
        let _ = control::request(&self.socket, &Request::Stop, Duration::from_secs(2));
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn one_run(vmm_command: &[OsString], dir: &Path) -> Result<(u64, u64, u64, Duration), String> {
    // First instruction exits to the VMM (`out 0x80, al`), then halt with interrupts off.
    write_config(dir, &asm::program(&[&asm::out_imm_al(0x80), &asm::HLT]))?;
    let mut vmm = BenchVmm::spawn(vmm_command, dir, &[])?;
    let start = vmm.wait_first_exit()?;
    // Let the VMM settle (lazy allocations, the event loop's first rounds).
    std::thread::sleep(Duration::from_millis(200));
    let (rss, anon, guest) = rss_kib(vmm.child.id())?;
    Ok((rss.saturating_sub(guest), anon, guest, start))
}

/// Runs the VMM `runs` times (`vmm_command` = program + leading arguments, e.g.
/// `["/usr/bin/podvisor", "vmm"]`) and reports the medians.
pub fn measure(vmm_command: &[OsString], runs: usize) -> Result<BenchReport, String> {
    let runs = runs.max(1);
    let (mut overhead, mut anon, mut guest, mut start) = (vec![], vec![], vec![], vec![]);
    for _ in 0..runs {
        let dir = tempfile_dir()?;
        let run = one_run(vmm_command, &dir);
        let _ = std::fs::remove_dir_all(&dir);
        let (o, a, g, s) = run?;
        overhead.push(o);
        anon.push(a);
        guest.push(g);
        start.push(s);
    }
    Ok(BenchReport {
        runs,
        rss_overhead_kib: median(overhead),
        rss_anon_kib: median(anon),
        guest_touched_kib: median(guest),
        start_to_first_instruction: median(start),
    })
}

/// Medians of the restore runs, and the memory of two restored VMs side by side.
#[derive(Debug, Clone, PartialEq)]
pub struct RestoreReport {
    pub runs: usize,
    /// Pause + snapshot request of the template VM (memory file and state file, synced).
    pub snapshot_write: Duration,
    /// Disk the memory file takes (zero pages are holes).
    pub memory_file_allocated_kib: u64,
    /// Spawn with `--restore` to vCPU 0's first exit.
    pub restore_to_first_instruction: Duration,
    /// Of one of two VMMs restored from the same snapshot, KiB.
    pub pss_kib: u64,
    pub uss_kib: u64,
    /// Guest pages of the snapshot mapping this VM wrote (its private copies), KiB.
    pub guest_private_kib: u64,
    /// Guest pages of the snapshot mapping shared through the page cache, KiB.
    pub guest_shared_kib: u64,
}

impl std::fmt::Display for RestoreReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "built-in VMM from a snapshot, 1 vCPU, 128 MiB, median of {} runs:",
            self.runs
        )?;
        writeln!(
            f,
            "  snapshot (pause + write, synced): {:.2} ms, memory file on disk {} KiB",
            self.snapshot_write.as_secs_f64() * 1000.0,
            self.memory_file_allocated_kib
        )?;
        writeln!(
            f,
            "  VMM start (--restore) -> first guest instruction: {:.2} ms",
            self.restore_to_first_instruction.as_secs_f64() * 1000.0
        )?;
        write!(
            f,
            "  one of two restored VMMs: PSS {} KiB, USS {} KiB; guest memory private {} KiB, shared {} KiB",
            self.pss_kib, self.uss_kib, self.guest_private_kib, self.guest_shared_kib
        )
    }
}

/// (PSS, USS) of `pid` and (private, shared) resident KiB of its mappings of `file`.
fn shared_memory_kib(pid: u32, file: &Path) -> Result<(u64, u64, u64, u64), String> {
    let read = |p: String| std::fs::read_to_string(&p).map_err(|e| format!("reading {p}: {e}"));
    let value = |line: &str| -> u64 {
        line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(0)
    };
    let rollup = read(format!("/proc/{pid}/smaps_rollup"))?;
    let sum = |names: &[&str]| -> u64 {
        rollup.lines().filter(|l| names.iter().any(|n| l.starts_with(n))).map(value).sum()
    };
    let (pss, uss) = (sum(&["Pss:"]), sum(&["Private_Clean:", "Private_Dirty:"]));
    let smaps = read(format!("/proc/{pid}/smaps"))?;
    let name = file.to_string_lossy();
    let (mut private, mut shared, mut in_file) = (0, 0, false);
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            in_file = line.ends_with(name.as_ref());
        } else if in_file
            && (line.starts_with("Private_Clean:") || line.starts_with("Private_Dirty:"))
        {
            private += value(line);
        } else if in_file
            && (line.starts_with("Shared_Clean:") || line.starts_with("Shared_Dirty:"))
        {
            shared += value(line);
        }
    }
    Ok((pss, uss, private, shared))
}

/// Snapshots a running guest once, then restores it `runs` times (see the module comment).
pub fn measure_restore(vmm_command: &[OsString], runs: usize) -> Result<RestoreReport, String> {
    let runs = runs.max(1);
    let root = tempfile_dir()?;
    let result = restore_runs(vmm_command, runs, &root);
    let _ = std::fs::remove_dir_all(&root);
    result
}

fn restore_runs(
    vmm_command: &[OsString],
    runs: usize,
    root: &Path,
) -> Result<RestoreReport, String> {
    // Exits every ~100 loop iterations, so a restored guest's first exit comes at once.
    let code = asm::counting(0x20_0000, 100);
    let template = root.join("template");
    std::fs::create_dir_all(&template).map_err(io("creating the template dir"))?;
    write_config(&template, &code)?;
    let snap = root.join("snap");
    let snapshot_write = {
        let mut vmm = BenchVmm::spawn(vmm_command, &template, &[])?;
        vmm.wait_first_exit()?;
        let started = Instant::now();
        vmm.request(&Request::Pause)?;
        vmm.request(&Request::Snapshot { dir: snap.clone() })?;
        started.elapsed()
    };
    use std::os::unix::fs::MetadataExt;
    let memory_file = snap.join(crate::snapshot::MEMORY_FILE);
    let allocated = std::fs::metadata(&memory_file).map_err(io("the memory file"))?.blocks() / 2;
    let restore_args: Vec<OsString> = vec!["--restore".into(), snap.clone().into()];
    let mut starts = Vec::new();
    let mut pair = Vec::new();
    for run in 0..runs.max(2) {
        let dir = root.join(format!("pod{run}"));
        std::fs::create_dir_all(&dir).map_err(io("creating a pod dir"))?;
        write_config(&dir, &code)?;
        let mut vmm = BenchVmm::spawn(vmm_command, &dir, &restore_args)?;
        starts.push(vmm.wait_first_exit()?);
        // The last two stay up together for the memory figures.
        if run + 2 >= runs.max(2) {
            pair.push(vmm);
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    let (pss, uss, private, shared) = shared_memory_kib(pair[0].child.id(), &memory_file)?;
    Ok(RestoreReport {
        runs: starts.len(),
        snapshot_write,
        memory_file_allocated_kib: allocated,
        restore_to_first_instruction: median(starts),
        pss_kib: pss,
        uss_kib: uss,
        guest_private_kib: private,
        guest_shared_kib: shared,
    })
}

/// A fresh private directory under the system temp dir (no extra dependency for one dir).
fn tempfile_dir() -> Result<std::path::PathBuf, String> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("podvisor-vmm-bench-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    Ok(dir)
}
