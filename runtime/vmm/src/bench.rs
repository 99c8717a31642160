//! Figures for `make bench`, measured on a real VMM process running a tiny guest:
//! - RSS overhead of a 1-vCPU, 128 MiB VM: the process's VmRSS minus the guest memory it
//!   touched (the resident part of the guest-RAM memfd mapping). Firecracker's bar: <= 5 MiB.
//! - VMM start to first guest instruction: from just before spawning the process to vCPU 0's
//!   first exit, with a guest whose first instruction is an `out`.
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

fn one_run(vmm_command: &[OsString], dir: &Path) -> Result<(u64, u64, u64, Duration), String> {
    let io = |what: &str| {
        let what = what.to_string();
        move |e: std::io::Error| format!("{what}: {e}")
    };
    // First instruction exits to the VMM (`out 0x80, al`), then halt with interrupts off.
    let kernel = dir.join("prog.elf");
    std::fs::write(&kernel, elf(&asm::program(&[&asm::out_imm_al(0x80), &asm::HLT])))
        .map_err(io("writing the guest program"))?;
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
    let socket = dir.join("control.sock");
    let (program, prefix) = vmm_command.split_first().ok_or("empty VMM command")?;
    let spawned_at = SystemTime::now();
    let mut child = Command::new(program)
        .args(prefix)
        .arg("--config")
        .arg(&config_path)
        .arg("--control")
        .arg(&socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(io("spawning the VMM"))?;
    let result = (|| {
        let deadline = Instant::now() + Duration::from_secs(10);
        let first_exit = loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("the VMM exited early ({status})"));
            }
            let answer = control::request(&socket, &Request::Status, Duration::from_secs(2));
            if let Some(ns) = answer.ok().and_then(|r| r.status).and_then(|s| s.first_exit_unix_ns)
            {
                break ns;
            }
            if Instant::now() > deadline {
                return Err("the guest did not run within 10 s".into());
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        let spawned_ns = spawned_at.duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64);
        let start = Duration::from_nanos(first_exit.saturating_sub(spawned_ns.unwrap_or(0)));
        // Let the VMM settle (lazy allocations, the event loop's first rounds).
        std::thread::sleep(Duration::from_millis(200));
        let (rss, anon, guest) = rss_kib(child.id())?;
        Ok((rss.saturating_sub(guest), anon, guest, start))
    })();
    let _ = control::request(&socket, &Request::Stop, Duration::from_secs(2));
    let deadline = Instant::now() + Duration::from_secs(5);
    while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = child.kill();
    let _ = child.wait();
    result
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

/// A fresh private directory under the system temp dir (no extra dependency for one dir).
fn tempfile_dir() -> Result<std::path::PathBuf, String> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("podvisor-vmm-bench-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    Ok(dir)
}
