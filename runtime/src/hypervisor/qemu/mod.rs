//! The QEMU backend: `qemu-system-x86_64 -M microvm` with vhost-user devices served by helper
//! processes, one set per VM:
//!
//! - `vhost-device-vsock` gives the guest its vsock device and the host the hybrid-vsock socket
//!   `<run_dir>/vsock.sock`;
//! - one `virtiofsd` per [`SharedDir`](crate::hypervisor::SharedDir);
//! - QEMU itself, whose QMP socket (`<run_dir>/qmp.sock`) tells when the machine runs;
//! - `podvisor console-log`, which copies the serial console from a pipe into
//!   [`VmConfig::console_log`], capped (see [`console`]).
//!
//! Every process is spawned in its own process group so that a daemon restart (or a Ctrl-C on
//! its terminal) does not take the VMs down; their pids and start times go into
//! [`VmHandle::processes`], QEMU first, so a restarted daemon can stop them. Helper output goes
//! to `<run_dir>/<name>.log`.
//!
//! When QEMU exits on its own (the guest powered off: `reboot=t` plus `-no-reboot`), the daemon
//! that started the VM stops its helpers too; [`Hypervisor::stop`] is still needed after a
//! daemon restart, and is harmless otherwise.

pub mod accel;
pub mod args;
pub mod console;

use std::ffi::OsString;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;
use tokio::time::Instant;

use accel::resolve_accel;
pub use accel::Accel;
pub use args::ResolvedAccel;
use args::RunDirLayout;

use super::builtin::{assign_jail_id, JailIds};
use super::confine::HelperJail;
use super::process::{prepare_run_dir, Starting};
use super::{
    terminate_processes, Hypervisor, HypervisorError, PreparedVm, Result, RunRoot, VmConfig,
    VmHandle, VmSpec,
};
use crate::check::{find_binary, is_executable};

/// How long a VM's exit waits for the console copier to drain the pipe after QEMU exited.
const CONSOLE_DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// How to run QEMU and its helpers. Bare names are looked up in `PATH`, then in
/// `$HOME/.cargo/bin` (where `cargo install` puts the vhost-user daemons); as root, only where
/// nobody but root could have put them ([`crate::check::find_binary`]).
#[derive(Debug, Clone)]
pub struct QemuConfig {
    pub qemu_binary: PathBuf,
    pub vhost_vsock_binary: PathBuf,
    pub virtiofsd_binary: PathBuf,
    pub accel: Accel,
    /// How long the helpers' sockets and QEMU's machine set-up may take.
    pub startup_timeout: Duration,
    /// Where VM run directories go.
    pub run_root: PathBuf,
    /// The program and leading arguments of the console copier: by default this very binary
    /// with the `console-log` subcommand. Its program also launches the jailed helpers
    /// (`jail-exec`).
    pub console_command: Vec<OsString>,
    /// Run QEMU, vhost-device-vsock and the console copier each as the VM's own uid (= gid)
    /// from this range, confined ([`super::confine`]); `None`: as the daemon's user.
    pub jail: Option<JailIds>,
    /// Whether VMs may run under TCG, which QEMU does not treat as a security boundary.
    pub allow_tcg: bool,
}

impl Default for QemuConfig {
    fn default() -> Self {
        let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("podvisor"));
        Self {
            console_command: vec![exe.into(), "console-log".into()],
            run_root: "/run/podvisor/vms".into(),
            qemu_binary: "qemu-system-x86_64".into(),
            vhost_vsock_binary: "vhost-device-vsock".into(),
            virtiofsd_binary: "virtiofsd".into(),
            accel: Accel::Auto,
            startup_timeout: Duration::from_secs(20),
            jail: None,
            allow_tcg: true,
        }
    }
}

/// The QEMU [`Hypervisor`].
#[derive(Debug)]
pub struct QemuHypervisor {
    qemu: PathBuf,
    vhost_vsock: PathBuf,
    virtiofsd: PathBuf,
    accel: ResolvedAccel,
    accel_reason: String,
    startup_timeout: Duration,
    run_root: RunRoot,
    console_command: Vec<OsString>,
    jail: Option<JailIds>,
    /// Serialises jail id assignment.
    jail_ids: std::sync::Mutex<()>,
}

impl QemuHypervisor {
    /// Finds the binaries (failing with an install hint for a missing one) and settles the
    /// accelerator once.
    pub fn new(config: QemuConfig) -> Result<Self> {
        let qemu = resolve_binary(&config.qemu_binary, "apt-get install qemu-system-x86")?;
        let vhost_vsock =
            resolve_binary(&config.vhost_vsock_binary, "cargo install vhost-device-vsock")?;
        let virtiofsd = resolve_binary(
            &config.virtiofsd_binary,
            "apt-get install libseccomp-dev libcap-ng-dev && cargo install virtiofsd",
        )?;
        if config.console_command.is_empty() {
            return Err(HypervisorError::InvalidConfig("empty console-log command".into()));
        }
        let (accel, accel_reason) = resolve_accel(config.accel);
        if accel == ResolvedAccel::Tcg && !config.allow_tcg {
            return Err(HypervisorError::InvalidConfig(format!(
                "QEMU would run under TCG ({accel_reason}), which is not a security boundary, \
                 and qemu.allow_tcg = false"
            )));
        }
        Ok(Self {
            console_command: config.console_command,
            qemu,
            vhost_vsock,
            virtiofsd,
            accel,
            accel_reason,
            startup_timeout: config.startup_timeout,
            run_root: RunRoot(config.run_root),
            jail: config.jail,
            jail_ids: std::sync::Mutex::new(()),
        })
    }

    /// The accelerator VMs are started with, and why it was chosen.
    pub fn accel(&self) -> (ResolvedAccel, &str) {
        (self.accel, &self.accel_reason)
    }

    /// Gives the VM's run directory to a uid of its own (when jailed) and returns it.
    fn assign_uid(&self, config: &VmConfig) -> Result<Option<u32>> {
        let Some(ids) = self.jail else { return Ok(None) };
        let _assigning = self.jail_ids.lock().unwrap_or_else(|e| e.into_inner());
        assign_jail_id(&config.run_dir, &config.sandbox_id, ids).map(Some)
    }

    /// The jail of one of the VM's helpers: its run directory, the system's libraries and
    /// `extra`.
    fn helper_jail(
        &self,
        uid: Option<u32>,
        config: &VmConfig,
        extra: &[PathBuf],
    ) -> Option<HelperJail> {
        uid.map(|uid| {
            HelperJail::for_helper(uid, self.run_root.jail_root(), &config.run_dir, extra)
        })
    }

    /// The command line that runs `program args`: through the jail launcher when `jail` is
    /// given.
    fn helper_command(
        &self,
        program: &std::ffi::OsStr,
        args: &[OsString],
        jail: Option<&HelperJail>,
    ) -> (OsString, Vec<OsString>) {
        match jail {
            Some(jail) => (self.console_command[0].clone(), jail.launcher_args(program, args)),
            None => (program.to_os_string(), args.to_vec()),
        }
    }

    async fn start_processes(&self, config: &VmConfig, starting: &mut Starting) -> Result<()> {
        let layout = RunDirLayout::new(&config.run_dir);
        let deadline = Instant::now() + self.startup_timeout;
        let uid = self.assign_uid(config)?;

        let (program, vsock_args) = self.helper_command(
            self.vhost_vsock.as_os_str(),
            &args::vhost_vsock_args(&layout),
            self.helper_jail(uid, config, &[]).as_ref(),
        );
        starting.spawn("vhost-device-vsock", &program, &vsock_args, layout.vhost_vsock_log())?;
        starting
            .wait_for_path("vhost-device-vsock", &layout.vhost_vsock_socket(), deadline)
            .await?;
        starting.wait_for_path("vhost-device-vsock", &layout.vsock_uds(), deadline).await?;

        starting.start_virtiofsds(self.virtiofsd.as_os_str(), config, deadline).await?;
        if let Some(uid) = uid {
            give_virtiofs_sockets(config, &layout, uid)?;
        }

        // Both ends are close-on-exec: only the two processes below inherit one each, and
        // ours close on return, so the copier sees the end of the pipe when QEMU exits.
        let (console_read, console_write) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| {
                HypervisorError::Spawn { what: console::HELPER_NAME.into(), source: e.into() }
            })?;
        let helper = console::HelperArgs {
            run_dir: config.run_dir.clone(),
            input_fd: console_read.as_raw_fd(),
            output: config.console_log.clone(),
            max_bytes: config.console_log_max_bytes,
            jail: uid.map(|uid| HelperJail {
                uid,
                gid: uid,
                root: self.run_root.jail_root(),
                binds: Vec::new(),
            }),
        };
        let mut helper_args = self.console_command[1..].to_vec();
        helper_args.extend(helper.to_args());
        starting.spawn_inheriting(
            console::HELPER_NAME,
            &self.console_command[0],
            &helper_args,
            layout.console_helper_log(),
            &[console_read.as_raw_fd()],
        )?;
        drop(console_read);

        let block_files = open_block_devices(config)?;
        let mut inherited = config.inherited_fds();
        inherited.push(console_write.as_raw_fd());
        inherited.extend(block_files.iter().map(|f| f.as_raw_fd()));
        let block_fds: Vec<_> = block_files.iter().map(|f| f.as_raw_fd()).collect();
        let mut visible = vec![config.kernel.clone(), config.initrd.clone()];
        if self.accel == ResolvedAccel::Kvm {
            visible.push("/dev/kvm".into());
        }
        let qemu_args = args::qemu_args(
            config,
            &layout,
            self.accel,
            &args::InheritedFds { console: console_write.as_raw_fd(), block: block_fds },
        );
        let (program, qemu_args) = self.helper_command(
            self.qemu.as_os_str(),
            &qemu_args,
            self.helper_jail(uid, config, &visible).as_ref(),
        );
        starting.spawn_inheriting("qemu", &program, &qemu_args, layout.qemu_log(), &inherited)?;
        drop(console_write);
        drop(block_files);
        starting.wait_for_path("qemu", &layout.qmp_socket(), deadline).await?;
        starting.wait_for_qmp_greeting(&layout.qmp_socket(), deadline).await
    }
}

/// virtiofsd runs as root and makes its socket root's: the VM's uid must be able to connect.
fn give_virtiofs_sockets(config: &VmConfig, layout: &RunDirLayout, uid: u32) -> Result<()> {
    for dir in &config.shared_dirs {
        let socket = layout.virtiofs_socket(&dir.tag);
        // Not following a symlink: vhost-device-vsock (the VM's uid) already runs and could
        // have swapped the socket for one to a root file.
        std::os::unix::fs::lchown(&socket, Some(uid), Some(uid))
            .map_err(|source| HypervisorError::RunDir { path: socket.clone(), source })?;
    }
    Ok(())
}

/// Opens the VM's block devices for QEMU to inherit (close-on-exec, as every descriptor the
/// daemon hands over): a jailed QEMU could neither see nor open the files by path.
fn open_block_devices(config: &VmConfig) -> Result<Vec<std::fs::File>> {
    config
        .block_devices
        .iter()
        .map(|dev| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(!dev.read_only)
                .open(&dev.path)
                .map_err(|source| HypervisorError::RunDir { path: dev.path.clone(), source })
        })
        .collect()
}

/// Why QEMU pods cold-boot (once per handler in the log, in every pod's verbose status).
const QEMU_TEMPLATE_REFUSAL: &str = "the qemu backend cannot snapshot a VM: its vhost-user \
    vsock and virtio-fs devices cannot run on private copy-on-write guest memory; pods \
    cold-boot";

#[async_trait]
impl Hypervisor for QemuHypervisor {
    fn name(&self) -> &'static str {
        "qemu"
    }

    async fn prepare(&self, sandbox_id: &str) -> Result<PreparedVm> {
        self.run_root.prepare(sandbox_id)
    }

    async fn start(&self, prepared: &PreparedVm, spec: &VmSpec) -> Result<VmHandle> {
        self.launch(&VmConfig::new(spec, prepared)).await
    }

    /// QEMU keeps cold boot: its vsock and virtio-fs devices are vhost-user daemons that map
    /// guest memory shared, which a VM restored onto private copy-on-write memory cannot give
    /// them (and QEMU's migration of them is not wired up).
    fn template_refusal(&self, _spec: &VmSpec) -> Option<String> {
        Some(QEMU_TEMPLATE_REFUSAL.into())
    }

    async fn reclaim_interrupted_start(&self, sandbox_id: &str) -> Result<()> {
        super::process::reclaim_interrupted_start(&self.run_root.run_dir(sandbox_id)?).await
    }

    /// QEMU's exit, and then (briefly) the console copier's: it drains what QEMU wrote last,
    /// which a boot failure reports.
    fn exited(&self, vm: &VmHandle) -> BoxFuture<'static, ()> {
        let qemu = vm.processes.first().cloned();
        let copier = vm.processes.iter().find(|p| p.name == console::HELPER_NAME).cloned();
        Box::pin(async move {
            if let Some(qemu) = qemu {
                crate::procwait::wait_for_exit(&qemu).await;
            }
            if let Some(copier) = copier {
                let drained = crate::procwait::wait_for_exit(&copier);
                let _ = tokio::time::timeout(CONSOLE_DRAIN_TIMEOUT, drained).await;
            }
        })
    }

    async fn stop(&self, vm: &VmHandle, grace: Duration) -> Result<()> {
        terminate_processes(&vm.processes, grace).await;
        if let Some(p) = vm.processes.iter().find(|p| super::process_alive(p)) {
            return Err(HypervisorError::Stop(format!(
                "{} (pid {}) survived SIGKILL",
                p.name, p.pid
            )));
        }
        Ok(())
    }
}

impl QemuHypervisor {
    /// Boots a VM in `config.run_dir` and returns once QEMU runs its machine and the vsock
    /// socket exists. Leaves the run directory's other files alone, so listeners bound there
    /// before the start survive it.
    pub async fn launch(&self, config: &VmConfig) -> Result<VmHandle> {
        args::validate(config)?;
        let layout = RunDirLayout::new(&config.run_dir);
        let mut stale = vec![layout.vhost_vsock_socket(), layout.vsock_uds(), layout.qmp_socket()];
        stale.extend(config.shared_dirs.iter().map(|d| layout.virtiofs_socket(&d.tag)));
        prepare_run_dir(config, &stale)?;
        let mut starting = Starting::new("qemu", self.startup_timeout, &config.run_dir);
        if let Err(e) = self.start_processes(config, &mut starting).await {
            starting.abort().await;
            return Err(e);
        }
        let processes = starting.finish();
        Ok(VmHandle {
            backend: self.name().to_string(),
            run_dir: config.run_dir.clone(),
            vsock_uds: RunDirLayout::new(&config.run_dir).vsock_uds(),
            processes,
        })
    }
}

/// Finds an executable: a path with a `/` as is, a bare name in `PATH` then `~/.cargo/bin`.
fn resolve_binary(binary: &Path, hint: &str) -> Result<PathBuf> {
    let missing = || HypervisorError::MissingBinary {
        binary: binary.display().to_string(),
        hint: format!("install it with `{hint}` or configure its path"),
    };
    if binary.components().count() > 1 || binary.is_absolute() {
        return if is_executable(binary) { Ok(binary.to_path_buf()) } else { Err(missing()) };
    }
    find_binary(binary).ok_or_else(missing)
}

/// QEMU's readiness, on top of the shared start-up machinery.
impl Starting {
    /// QEMU sends the QMP greeting from its main loop, i.e. once the machine is built (kernel
    /// loaded, vhost-user back-ends connected) and the vCPUs run.
    async fn wait_for_qmp_greeting(&mut self, qmp: &Path, deadline: Instant) -> Result<()> {
        let mut stream = loop {
            self.check_running().await?;
            if let Ok(stream) = UnixStream::connect(qmp).await {
                // The run directory is the VM's: qmp.sock may have been swapped.
                super::peer::check(qmp, &stream)?;
                break stream;
            }
            if Instant::now() >= deadline {
                return Err(self.timeout_error("qemu", qmp));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let mut greeting = Vec::new();
        loop {
            self.check_running().await?;
            if greeting.contains(&b'\n') {
                return if greeting.starts_with(b"{\"QMP\"") {
                    Ok(())
                } else {
                    Err(HypervisorError::EarlyExit {
                        what: "qemu".into(),
                        status: format!(
                            "unexpected QMP greeting {:?}",
                            String::from_utf8_lossy(&greeting)
                        ),
                        log: self.log_of("qemu"),
                    })
                };
            }
            if Instant::now() >= deadline || greeting.len() > 64 * 1024 {
                return Err(self.timeout_error("qemu", qmp));
            }
            match tokio::time::timeout(Duration::from_millis(50), stream.read_buf(&mut greeting))
                .await
            {
                // QEMU closed the monitor: it is exiting, which check_running reports.
                Ok(Ok(0)) | Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(10)).await,
                Ok(Ok(_)) | Err(_) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests;
