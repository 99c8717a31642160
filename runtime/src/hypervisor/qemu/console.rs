//! QEMU's serial console, capped. QEMU's `file` chardev appends without limit (and the log is
//! on the state directory's tmpfs, i.e. in host RAM), so QEMU writes the console into a pipe
//! instead, and `podvisor console-log` copies it into the capped log
//! ([`podvisor_vmm::console::CappedLog`], as the built-in VMM's serial device does).
//!
//! The copier is a helper process of the VM like virtiofsd, not a daemon task, so the console
//! keeps being logged while the daemon restarts. It ignores SIGTERM and stops when QEMU has
//! closed its end of the pipe: stopping a VM signals all its processes at once, and what the
//! guest printed last (a panic) must still reach the log.

use std::ffi::OsString;
use std::fs::File;
use std::io::Read;
use std::os::fd::{FromRawFd, RawFd};
use std::path::{Path, PathBuf};

use podvisor_vmm::console::CappedLog;

use crate::hypervisor::confine::{self, ConfineError, HelperJail};

/// The helper's name among the VM's processes.
pub const HELPER_NAME: &str = "console";

/// Bytes read from the pipe at a time.
const READ_CHUNK: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("ignoring SIGTERM: {0}")]
    IgnoreSignals(nix::Error),
    #[error("--input-fd {0} is not an open descriptor")]
    BadFd(RawFd),
    #[error("opening the console log {path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("reading the console pipe: {0}")]
    Read(std::io::Error),
    #[error("confining the console copier: {0}")]
    Confine(#[from] ConfineError),
}

/// What `podvisor console-log` is given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelperArgs {
    /// The VM's run directory: names the helper as the VM's (an interrupted start finds its
    /// processes by it).
    pub run_dir: PathBuf,
    /// The pipe's read end, inherited.
    pub input_fd: RawFd,
    pub output: PathBuf,
    pub max_bytes: u64,
    /// Once the pipe and the log are open, the copier runs in this jail (empty: it needs
    /// nothing but its two descriptors).
    pub jail: Option<HelperJail>,
}

impl HelperArgs {
    /// The command line after the program and its subcommand.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            "--run-dir".into(),
            self.run_dir.clone().into(),
            "--input-fd".into(),
            self.input_fd.to_string().into(),
            "--output".into(),
            self.output.clone().into(),
            "--max-bytes".into(),
            self.max_bytes.to_string().into(),
        ];
        if let Some(jail) = &self.jail {
            args.extend([
                "--jail".into(),
                format!("{}:{}", jail.uid, jail.gid).into(),
                "--jail-root".into(),
                jail.root.clone().into(),
            ]);
        }
        args
    }
}

/// `podvisor console-log`: copies the pipe into the capped log until QEMU closes its end.
pub fn run(args: &HelperArgs) -> Result<(), ConsoleError> {
    ignore_stop_signals()?;
    let input = inherited_pipe(args.input_fd)?;
    let mut log = CappedLog::open(&args.output, args.max_bytes)
        .map_err(|source| ConsoleError::Open { path: args.output.clone(), source })?;
    if let Some(jail) = &args.jail {
        confine::enter(jail)?;
        confine::deny_syscalls(&confine::helper_denied_syscalls(false))?;
    }
    copy(input, &mut log, &args.output)
}

fn ignore_stop_signals() -> Result<(), ConsoleError> {
    use nix::sys::signal::{signal, SigHandler, Signal};
    for sig in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        // SAFETY: SIG_IGN installs no handler code, so nothing can run in signal context.
        unsafe { signal(sig, SigHandler::SigIgn) }.map_err(ConsoleError::IgnoreSignals)?;
    }
    Ok(())
}

fn inherited_pipe(fd: RawFd) -> Result<File, ConsoleError> {
    if fd < 3 || nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).is_err() {
        return Err(ConsoleError::BadFd(fd));
    }
    // SAFETY: `fd` is open (checked above) and was inherited for this helper alone: nothing
    // else in this process owns or closes it.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Copies until end of file. A log that cannot be written does not stop the copy: QEMU must
/// never block on a full pipe.
fn copy(mut input: impl Read, log: &mut CappedLog, path: &Path) -> Result<(), ConsoleError> {
    let mut buf = vec![0u8; READ_CHUNK];
    let mut reported = false;
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ConsoleError::Read(e)),
        };
        if let Err(e) = log.append(&buf[..n]) {
            if !reported {
                eprintln!("podvisor console-log: writing {}: {e}", path.display());
                reported = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// The guest's output, however much, leaves at most the cap in the log: its newest part.
    #[test]
    fn the_copy_keeps_the_newest_output_within_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let (read, write) = nix::unistd::pipe().unwrap();
        let writer = std::thread::spawn(move || {
            let mut w = File::from(write);
            for i in 0..100_000 {
                writeln!(w, "guest line {i}").unwrap();
            }
        });
        let mut log = CappedLog::open(&path, 8192).unwrap();
        copy(File::from(read), &mut log, &path).unwrap();
        writer.join().unwrap();
        let kept = std::fs::read_to_string(&path).unwrap();
        assert!(kept.len() <= 8192 && kept.len() >= 4096, "{} bytes", kept.len());
        assert!(kept.ends_with("guest line 99999\n"), "{kept}");
    }

    #[test]
    fn arguments_round_trip_and_a_bad_fd_is_refused() {
        let args = HelperArgs {
            run_dir: "/run/podvisor/vms/abc".into(),
            input_fd: 7,
            output: "/run/podvisor/sandboxes/abc/console.log".into(),
            max_bytes: 1024,
            jail: None,
        };
        let line: Vec<String> =
            args.to_args().iter().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(
            line.join(" "),
            "--run-dir /run/podvisor/vms/abc --input-fd 7 \
             --output /run/podvisor/sandboxes/abc/console.log --max-bytes 1024"
        );
        assert!(matches!(inherited_pipe(1), Err(ConsoleError::BadFd(1))));
        assert!(matches!(inherited_pipe(9999), Err(ConsoleError::BadFd(9999))));
    }
}
