//! Podvisor's built-in micro-VM monitor: one process per VM (`podvisor vmm --config <json>
//! --control <sock> [--jail <uid>:<gid>]`), built from rust-vmm crates on KVM.
//!
//! Modules: [`layout`] (every guest-physical address), [`memory`] (memfd guest RAM),
//! [`arch`] (kernel loading, boot CPU state, CPUID, MP table), [`bus`] + [`legacy`] (PIO
//! serial and i8042), [`console`] (the serial console's capped log), [`devices`] (virtio-mmio
//! devices), [`vcpu`] + [`vstate`] (vCPU threads and the run/pause/stop protocol), [`vmm`]
//! (building and running a VM), [`control`] (control socket), [`signals`] (SIGTERM/SIGINT =
//! clean stop), [`seccomp`] and [`jail`] (hardening), [`host`] (what KVM here can do),
//! [`snapshot`] (snapshot/restore, the base of VM templates), [`bench`] (`make bench` figures).

pub mod arch;
pub mod bench;
pub mod bus;
pub mod config;
pub mod console;
pub mod control;
pub mod devices;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod guest_program;
pub mod host;
pub mod jail;
pub mod layout;
pub mod legacy;
pub mod memory;
pub mod seccomp;
pub mod signals;
pub mod snapshot;
pub mod vcpu;
pub mod vmm;
pub mod vstate;

#[cfg(test)]
mod kvm_tests;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::config::VmmConfig;
use crate::vstate::ExitReason;

/// Errors of the `vmm` subcommand before the VM runs.
#[derive(Debug, thiserror::Error)]
pub enum MainError {
    #[error(
        "usage: podvisor vmm --config <file.json> --control <socket> [--jail <uid>:<gid>] \
         [--restore <snapshot dir>] ({0})"
    )]
    Usage(String),
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Vmm(#[from] vmm::VmmError),
    #[error(transparent)]
    Control(#[from] control::ControlError),
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    #[error(transparent)]
    Jail(#[from] jail::JailError),
    #[error("setting up the devices: {0}")]
    Devices(String),
    #[error("blocking SIGTERM/SIGINT for a clean stop: {0}")]
    Signals(nix::Error),
}

/// Parsed command line of the `vmm` subcommand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Args {
    pub config: PathBuf,
    pub control: PathBuf,
    pub jail: Option<(u32, u32)>,
    /// Start from this snapshot directory instead of booting the kernel.
    pub restore: Option<PathBuf>,
}

/// Parses `--config X --control Y [--jail U:G] [--restore DIR]`; leading words before the first option (the
/// program name, `vmm`) are ignored.
pub fn parse_args(args: &[String]) -> Result<Args, MainError> {
    let usage = |m: &str| MainError::Usage(m.to_string());
    let mut iter = args.iter().skip_while(|a| !a.starts_with("--"));
    let (mut config, mut control, mut jail, mut restore) = (None, None, None, None);
    while let Some(flag) = iter.next() {
        let mut value = || iter.next().ok_or_else(|| usage(&format!("{flag} needs a value")));
        match flag.as_str() {
            "--config" => config = Some(PathBuf::from(value()?)),
            "--control" => control = Some(PathBuf::from(value()?)),
            "--jail" => jail = Some(jail::parse_ids(value()?)?),
            "--restore" => restore = Some(PathBuf::from(value()?)),
            other => return Err(usage(&format!("unknown argument {other:?}"))),
        }
    }
    Ok(Args {
        config: config.ok_or_else(|| usage("--config is required"))?,
        control: control.ok_or_else(|| usage("--control is required"))?,
        jail,
        restore,
    })
}

/// Entry point of `podvisor vmm ...`: runs one VM until it exits. Exit codes: 0 when the guest
/// or the host stopped it cleanly, 1 when the VM failed, 2 when it could not be set up,
/// [`seccomp::SECCOMP_EXIT_CODE`] when a thread made a forbidden syscall.
pub fn main_with_args(args: Vec<String>) -> ExitCode {
    let started = vstate::now_ns();
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .try_init();
    match parse_args(&args).and_then(|args| run(&args, started)) {
        Ok(reason) => {
            tracing::info!(?reason, "VM exited");
            ExitCode::from(reason.exit_code())
        }
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::from(2)
        }
    }
}

/// Parses a MAC address `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in mac.iter_mut() {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Adds the configured virtio devices to `vmm`, in a fixed order (vsock, drives, nets, fs) so
/// that their MMIO windows and IRQs are predictable.
fn add_devices(vmm: &mut vmm::Vmm, config: &VmmConfig) -> Result<(), MainError> {
    use std::sync::{Arc, Mutex};
    let err = |what: String| MainError::Devices(what);
    if let Some(vsock) = &config.vsock {
        let device = devices::VsockDevice::new(u64::from(vsock.guest_cid), &vsock.uds)
            .map_err(|e| err(format!("vsock on {}: {e}", vsock.uds.display())))?;
        let device = Arc::new(Mutex::new(device));
        vmm.add_virtio_device(device.clone())?;
        vmm.add_subscriber(device);
    }
    for drive in &config.drives {
        let device = devices::BlockDevice::new(&drive.path, drive.read_only)
            .map_err(|e| err(format!("drive {} ({}): {e}", drive.id, drive.path.display())))?;
        let device = Arc::new(Mutex::new(device));
        vmm.add_virtio_device(device.clone())?;
        let read_only = drive.read_only;
        vmm.add_drive_swapper(
            &drive.id,
            Box::new(move |path, want_read_only| {
                if want_read_only != read_only {
                    return Err(format!(
                        "the drive is {}; a swap keeps its mode",
                        if read_only { "read-only" } else { "read-write" }
                    ));
                }
                let mut device = device.lock().unwrap_or_else(|p| p.into_inner());
                device.swap_backing(path).map_err(|e| e.to_string())
            }),
        );
    }
    for net in &config.nets {
        let mac = parse_mac(&net.mac)
            .ok_or_else(|| err(format!("net {}: bad MAC address {:?}", net.id, net.mac)))?;
        let device = match net.tap_fd {
            Some(fd) => devices::NetDevice::from_inherited_tap(fd, mac),
            None => devices::NetDevice::new(&net.tap, mac),
        }
        .map_err(|e| err(format!("net {} on tap {}: {e}", net.id, net.tap)))?;
        let device = Arc::new(Mutex::new(device));
        vmm.add_virtio_device(device.clone())?;
        vmm.add_subscriber(device);
    }
    for fs in &config.fs {
        let failed = |e: &dyn std::fmt::Display| {
            err(format!("virtio-fs {} ({}): {e}", fs.tag, fs.socket.display()))
        };
        match fs.kind {
            config::FsKind::VhostUser => {
                let device =
                    devices::VhostUserFsDevice::new(&fs.socket, &fs.tag).map_err(|e| failed(&e))?;
                let device = Arc::new(Mutex::new(device));
                vmm.add_virtio_device(device.clone())?;
                vmm.add_subscriber(device);
            }
            config::FsKind::Inproc => {
                let device =
                    devices::VirtioFsDevice::new(&fs.socket, &fs.tag).map_err(|e| failed(&e))?;
                vmm.add_virtio_device(Arc::new(Mutex::new(device)))?;
            }
        }
    }
    Ok(())
}

/// Builds the VM with its devices and either loads the kernel or, with `--restore`, puts the
/// snapshot's state in place.
fn build(args: &Args, config: &VmmConfig) -> Result<vmm::Vmm, MainError> {
    let Some(dir) = &args.restore else {
        let mut vmm = vmm::Vmm::new(config)?;
        add_devices(&mut vmm, config)?;
        let boot = vmm.load()?;
        tracing::info!(
            kernel = %config.kernel.display(),
            entry = format_args!("{:#x}", boot.entry),
            cmdline = %boot.cmdline,
            "guest loaded"
        );
        return Ok(vmm);
    };
    let (mut vmm, state) = vmm::Vmm::from_snapshot(config, dir)?;
    add_devices(&mut vmm, config)?;
    vmm.restore(&state)?;
    tracing::info!(snapshot = %dir.display(), "guest restored");
    Ok(vmm)
}

fn run(args: &Args, started: u64) -> Result<ExitReason, MainError> {
    let config = VmmConfig::from_file(&args.config)?;
    let mut vmm = build(args, &config)?;
    let filters = seccomp::filters(config.seccomp)?;
    let control = control::ControlServer::bind(&args.control, vmm.run_control(), started)?;

    if let Some((uid, gid)) = args.jail {
        let run_dir = args.control.parent().unwrap_or(Path::new("/")).to_path_buf();
        jail::enter(&jail::JailSpec {
            uid,
            gid,
            root: run_dir.join("jail-root"),
            binds: vec![run_dir.clone(), PathBuf::from("/dev/kvm")],
            owned_dir: Some(run_dir),
        })?;
    }

    vmm.add_subscriber(std::sync::Arc::new(std::sync::Mutex::new(control)));
    let stop_signals =
        signals::StopSignals::new(vmm.run_control().exit.clone()).map_err(MainError::Signals)?;
    vmm.add_subscriber(std::sync::Arc::new(std::sync::Mutex::new(stop_signals)));
    let (vcpu_filter, vmm_filter) = filters.unzip();
    vmm.start(vcpu_filter, vmm_filter)?;
    let reason = vmm.run_until_exit();
    let _ = std::fs::remove_file(&args.control);
    Ok(reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn args_parse_with_or_without_the_subcommand() {
        let want =
            Args { config: "c.json".into(), control: "s.sock".into(), jail: None, restore: None };
        assert_eq!(
            parse_args(&strings(&["--config", "c.json", "--control", "s.sock"])).unwrap(),
            want
        );
        assert_eq!(
            parse_args(&strings(&["podvisor", "vmm", "--control", "s.sock", "--config", "c.json"]))
                .unwrap(),
            want
        );
        let jailed =
            parse_args(&strings(&["--config", "c", "--control", "s", "--jail", "100:101"]))
                .unwrap();
        assert_eq!(jailed.jail, Some((100, 101)));
        let restoring =
            parse_args(&strings(&["--config", "c", "--control", "s", "--restore", "/snap"]))
                .unwrap();
        assert_eq!(restoring.restore, Some(PathBuf::from("/snap")));
        assert!(parse_args(&strings(&["--config", "c"])).is_err());
        assert!(parse_args(&strings(&["--config"])).is_err());
        assert!(parse_args(&strings(&["--config", "c", "--control", "s", "--x"])).is_err());
    }

    #[test]
    fn mac_addresses() {
        assert_eq!(parse_mac("02:00:0a:ff:00:01"), Some([2, 0, 0xa, 0xff, 0, 1]));
        for bad in
            ["", "02:00:0a:ff:00", "02:00:0a:ff:00:01:02", "2:00:0a:ff:00:01", "zz:00:00:00:00:00"]
        {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }
}
