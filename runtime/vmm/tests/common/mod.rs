//! Runs the `podvisor-vmm` binary on tiny guest programs.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use podvisor_vmm::config::{SeccompMode, VmmConfig};
use podvisor_vmm::control::{self, Request, Response};
use podvisor_vmm::guest_program::elf;

/// Whether /dev/kvm can be used; prints why not (and fails under PODVISOR_REQUIRE_E2E=1).
pub fn kvm_available() -> bool {
    match std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => true,
        Err(e) => {
            let reason = format!("SKIP: /dev/kvm unavailable: {e}");
            assert!(std::env::var("PODVISOR_REQUIRE_E2E").as_deref() != Ok("1"), "{reason}");
            println!("{reason}");
            false
        }
    }
}

pub struct VmmProcess {
    pub dir: tempfile::TempDir,
    pub run_dir: PathBuf,
    pub console: PathBuf,
    pub control: PathBuf,
    pub child: Child,
    pub spawned_at: std::time::SystemTime,
}

pub fn config(dir: &Path, code: &[u8], memory_mib: u32) -> VmmConfig {
    let kernel = dir.join("prog.elf");
    std::fs::write(&kernel, elf(code)).unwrap();
    VmmConfig {
        vcpus: 1,
        memory_mib,
        kernel,
        initrd: None,
        cmdline: String::new(),
        console_log: dir.join("console.log"),
        console_log_max_bytes: podvisor_vmm::console::DEFAULT_MAX_BYTES,
        vsock: None,
        drives: vec![],
        nets: vec![],
        fs: vec![],
        seccomp: SeccompMode::Trap,
    }
}

/// Spawns the VMM on `config` (written into a fresh run directory) with `extra` arguments.
pub fn spawn(dir: tempfile::TempDir, config: &VmmConfig, extra: &[&str]) -> VmmProcess {
    let run_dir = dir.path().join("run");
    std::fs::create_dir_all(&run_dir).unwrap();
    let config_path = run_dir.join("vmm.json");
    std::fs::write(&config_path, serde_json::to_vec(config).unwrap()).unwrap();
    let control = run_dir.join("control.sock");
    let spawned_at = std::time::SystemTime::now();
    let child = Command::new(env!("CARGO_BIN_EXE_podvisor-vmm"))
        .arg("--config")
        .arg(&config_path)
        .arg("--control")
        .arg(&control)
        .args(extra)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    VmmProcess { console: config.console_log.clone(), dir, run_dir, control, child, spawned_at }
}

impl VmmProcess {
    /// Sends a request once the control socket answers (retrying for up to 10 s).
    pub fn request(&self, req: &Request) -> Response {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match control::request(&self.control, req, Duration::from_secs(5)) {
                Ok(r) => return r,
                Err(e) if Instant::now() > deadline => panic!("control socket: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }

    /// Waits for the console log to contain `text`.
    pub fn wait_console(&self, text: &[u8]) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let log = std::fs::read(&self.console).unwrap_or_default();
            if log.windows(text.len()).any(|w| w == text) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("console never showed {:?}", String::from_utf8_lossy(text));
    }

    /// Waits for the console log to hold at least `len` bytes; returns them.
    pub fn wait_console_len(&self, len: usize) -> Vec<u8> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let log = std::fs::read(&self.console).unwrap_or_default();
            if log.len() >= len {
                return log;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("console never reached {len} bytes");
    }

    /// Waits (bounded) for the process to exit; returns its code and stderr.
    pub fn wait_exit(&mut self) -> (Option<i32>, String) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let mut stderr = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut stderr);
                }
                return (status.code(), stderr);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("the VMM did not exit");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
