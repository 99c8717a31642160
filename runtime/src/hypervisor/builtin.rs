//! The built-in backend: one `podvisor vmm` process per VM (crate `podvisor-vmm`), plus one
//! file server per shared directory: by default (`[builtin] fs = "inproc"`) a `podvisor
//! fs-serve` (crate `podvisor-fs-server`, root in its own sandbox) behind the VMM's in-process
//! virtio-fs device, else a virtiofsd behind the VMM's vhost-user-fs frontend. Either listens
//! on `virtiofs-<tag>.sock` and the VMM connects to it before it enters its jail.
//!
//! Run directory layout: `vmm.json` (the VMM's config), `control.sock` (control socket: status,
//! pause/resume, stop, swap_drive; see `podvisor_vmm::control`), `vsock.sock` (hybrid vsock,
//! bound by the VMM's muxer), `virtiofs-<tag>.sock`, and `<name>.log` for each process's
//! output. Every process runs in its own process group so a daemon restart leaves VMs running;
//! [`VmHandle::processes`] lists the VMM first.
//!
//! Stop: a `stop` request on the control socket (the VMM stops its vCPUs and exits 0), then
//! [`terminate_processes`] for whatever is left (helpers, or a VMM that did not answer).
//!
//! Snapshot/restore (the base of VM templates): `snapshot` asks the paused VMM to write a
//! snapshot directory (see `podvisor_vmm::snapshot`); a jailed VMM can only write inside its
//! run directory. `restore` starts the VMM with `--restore <dir>` on the new VM's own run
//! directory, console and sockets; its shares get fresh file servers (no FUSE session crosses
//! a snapshot), each with the restored pod's own owner translation (a template's VM has none:
//! its guest mounts nothing before the snapshot). With `fs = "vhost-user"`, VMs with shared
//! directories cannot be restored: the vhost-user backend would map the snapshot file shared,
//! not the VM's private copy-on-write memory.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use podvisor_vmm::config::{
    DriveConfig, FsConfig, FsKind, NetConfig, SeccompMode, VmmConfig, VsockConfig,
};
use podvisor_vmm::control::{self, Request, Response};
use tokio::time::Instant;

use super::process::{prepare_run_dir, Starting};
use super::{
    process_alive, terminate_processes, Hypervisor, HypervisorError, PreparedVm, Result, RunRoot,
    SharedDir, TapFd, VmConfig, VmHandle, VmSpec,
};

/// Why a VM with shared directories has no template with `builtin.fs = "vhost-user"`.
const SHARES_CANNOT_RESTORE: &str = "a VM with shared directories cannot start from a \
    snapshot with builtin.fs = \"vhost-user\": vhost-user virtio-fs cannot map private \
    copy-on-write guest memory";

/// How long a snapshot request may take to answer.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(300);

/// The guest's vsock CID (the host side only sees the hybrid socket, so one CID fits all).
pub const GUEST_CID: u32 = 3;

/// How to run the VMM.
#[derive(Debug, Clone)]
pub struct BuiltinConfig {
    /// The program and leading arguments that run the VMM: by default this very binary with
    /// the `vmm` subcommand.
    pub vmm_command: Vec<OsString>,
    /// The program and leading arguments that run a FUSE server for the in-process virtio-fs
    /// device: by default this very binary with the `fs-serve` subcommand.
    pub fs_server_command: Vec<OsString>,
    pub virtiofsd_binary: PathBuf,
    /// Who serves the shares' virtio-fs rings.
    pub fs: FsKind,
    /// `--jail <uid>:<gid>` with a uid (= gid) of its own from this range: the VMM drops to it
    /// in its own mount namespace.
    pub jail: Option<JailIds>,
    pub seccomp: SeccompMode,
    /// How long the VMM (and virtiofsd) may take to come up.
    pub startup_timeout: Duration,
    /// Where VM run directories go.
    pub run_root: PathBuf,
}

impl Default for BuiltinConfig {
    fn default() -> Self {
        let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("podvisor"));
        Self {
            vmm_command: vec![exe.clone().into(), "vmm".into()],
            fs_server_command: vec![exe.into(), "fs-serve".into()],
            virtiofsd_binary: "virtiofsd".into(),
            fs: FsKind::Inproc,
            jail: None,
            seccomp: SeccompMode::default(),
            startup_timeout: Duration::from_secs(20),
            run_root: "/run/podvisor/vms".into(),
        }
    }
}

/// The uids (= gids) jailed VMMs run as: `first .. first + count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JailIds {
    pub first: u32,
    pub count: u32,
}

/// Gives `run_dir` to an id from `ids` that owns none of its siblings (the other VMs' run
/// directories, which their jailed VMMs own), so every running VMM has its own uid. The search
/// starts at a point derived from `sandbox_id` to keep ids stable-looking and spread.
/// Callers serialise calls (the ownership is the allocation record, and survives restarts).
pub(super) fn assign_jail_id(run_dir: &Path, sandbox_id: &str, ids: JailIds) -> Result<u32> {
    use std::os::unix::fs::MetadataExt;
    let run_dir_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| HypervisorError::RunDir { path, source }
    };
    let parent = run_dir.parent().unwrap_or(Path::new("/"));
    let mut used = std::collections::HashSet::new();
    for entry in std::fs::read_dir(parent).map_err(run_dir_err(parent))? {
        let entry = entry.map_err(run_dir_err(parent))?;
        if entry.path() != run_dir {
            if let Ok(meta) = entry.metadata() {
                used.insert(meta.uid());
            }
        }
    }
    // FNV-1a: any stable spread will do.
    let start = sandbox_id
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    let count = u64::from(ids.count.max(1));
    for step in 0..count {
        let offset = u32::try_from((start + step) % count).unwrap_or(0);
        let id = ids.first.saturating_add(offset);
        if !used.contains(&id) {
            nix::unistd::chown(run_dir, Some(id.into()), Some(id.into())).map_err(|e| {
                HypervisorError::RunDir { path: run_dir.to_path_buf(), source: e.into() }
            })?;
            return Ok(id);
        }
    }
    Err(HypervisorError::InvalidConfig(format!(
        "all {} jail ids from {} are taken by running VMs",
        ids.count, ids.first
    )))
}

/// Files of one VM's run directory.
#[derive(Debug, Clone)]
pub struct BuiltinLayout {
    pub run_dir: PathBuf,
}

impl BuiltinLayout {
    pub fn new(run_dir: &Path) -> Self {
        Self { run_dir: run_dir.to_path_buf() }
    }
    pub fn config(&self) -> PathBuf {
        self.run_dir.join("vmm.json")
    }
    pub fn control(&self) -> PathBuf {
        self.run_dir.join("control.sock")
    }
    pub fn vsock_uds(&self) -> PathBuf {
        super::process::vsock_uds(&self.run_dir)
    }
    pub fn virtiofs_socket(&self, tag: &str) -> PathBuf {
        super::process::virtiofs_socket(&self.run_dir, tag)
    }
    pub fn log(&self, name: &str) -> PathBuf {
        self.run_dir.join(format!("{name}.log"))
    }
}

/// The VMM's config for `config`, its shares served as `fs` says.
pub fn vmm_config(config: &VmConfig, seccomp: SeccompMode, fs: FsKind) -> Result<VmmConfig> {
    let layout = BuiltinLayout::new(&config.run_dir);
    let vcpus = u8::try_from(config.vcpus)
        .map_err(|_| HypervisorError::InvalidConfig(format!("{} vCPUs", config.vcpus)))?;
    let vmm = VmmConfig {
        vcpus,
        memory_mib: config.memory_mib,
        kernel: config.kernel.clone(),
        initrd: Some(config.initrd.clone()),
        cmdline: config.extra_kernel_args.clone(),
        console_log: config.console_log.clone(),
        console_log_max_bytes: config.console_log_max_bytes,
        vsock: Some(VsockConfig { guest_cid: GUEST_CID, uds: layout.vsock_uds() }),
        drives: config
            .block_devices
            .iter()
            .map(|d| DriveConfig { id: d.id.clone(), path: d.path.clone(), read_only: d.read_only })
            .collect(),
        nets: config
            .net_devices
            .iter()
            .map(|n| NetConfig {
                id: n.id.clone(),
                tap: n.tap.clone(),
                mac: n.mac.clone(),
                tap_fd: n.tap_fd.as_ref().map(TapFd::raw),
            })
            .collect(),
        fs: config
            .shared_dirs
            .iter()
            .map(|d| FsConfig {
                tag: d.tag.clone(),
                socket: layout.virtiofs_socket(&d.tag),
                kind: fs,
            })
            .collect(),
        seccomp,
    };
    vmm.validate().map_err(|e| HypervisorError::InvalidConfig(e.to_string()))?;
    Ok(vmm)
}

/// `fs-serve`'s arguments for one shared directory: the share's cache mode, read-only flag and
/// owner translation as virtiofsd would get them, and its namespace sandbox (the default,
/// spelled out so a changed default cannot loosen it). A translation fs-serve would refuse
/// (overlapping ranges) is refused here, naming the share, before anything starts.
pub fn fs_server_args(socket: &Path, dir: &SharedDir) -> Result<Vec<OsString>> {
    let uids: Vec<String> = dir.ids.uids.iter().map(|t| t.virtiofsd_arg()).collect();
    let gids: Vec<String> = dir.ids.gids.iter().map(|t| t.virtiofsd_arg()).collect();
    for (kind, rules) in [("uid", &uids), ("gid", &gids)] {
        podvisor_fs_server::idmap::IdMap::parse(rules).map_err(|e| {
            HypervisorError::InvalidConfig(format!("share {}: {kind} translation: {e}", dir.tag))
        })?;
    }
    let mut args: Vec<OsString> = vec![
        "--shared-dir".into(),
        dir.host_path.clone().into(),
        "--socket".into(),
        socket.into(),
        "--cache".into(),
        dir.cache.clone().into(),
        "--sandbox".into(),
        "namespace".into(),
    ];
    if dir.read_only {
        args.push("--readonly".into());
    }
    for (flag, rules) in [("--translate-uid", uids), ("--translate-gid", gids)] {
        for rule in rules {
            args.extend([flag.into(), rule.into()]);
        }
    }
    Ok(args)
}

/// The built-in [`Hypervisor`].
#[derive(Debug)]
pub struct BuiltinHypervisor {
    config: BuiltinConfig,
    /// Serialises jail id assignment.
    jail_ids: std::sync::Mutex<()>,
}

impl BuiltinHypervisor {
    pub fn new(config: BuiltinConfig) -> Result<Self> {
        if config.vmm_command.is_empty() || config.fs_server_command.is_empty() {
            return Err(HypervisorError::InvalidConfig("empty VMM or fs-serve command".into()));
        }
        Ok(Self { config, jail_ids: std::sync::Mutex::new(()) })
    }

    /// Sends one control request to the VM's VMM.
    pub async fn control(&self, vm: &VmHandle, request: Request) -> Result<Response> {
        // A snapshot writes the whole guest memory before it answers: seconds per GiB on a
        // loaded host, minutes under nested emulation.
        let timeout = match request {
            Request::Snapshot { .. } => SNAPSHOT_TIMEOUT,
            _ => Duration::from_secs(5),
        };
        let path = BuiltinLayout::new(&vm.run_dir).control();
        tokio::task::spawn_blocking(move || control_request(&path, &request, timeout))
            .await
            .map_err(|e| HypervisorError::Control(format!("control request task: {e}")))?
    }

    /// Sends `request` and fails with the VMM's own error if it refused.
    async fn control_ok(&self, vm: &VmHandle, request: Request, what: &str) -> Result<()> {
        let answer = self.control(vm, request).await?;
        if answer.ok {
            Ok(())
        } else {
            Err(HypervisorError::Control(answer.error.unwrap_or_else(|| format!("{what} failed"))))
        }
    }

    /// Swaps the backing file of drive `id` (the guest sees a capacity change).
    /// Not called by the daemon yet: block volumes (a later issue) use it.
    #[allow(dead_code)]
    pub async fn swap_drive(
        &self,
        vm: &VmHandle,
        id: &str,
        path: &Path,
        read_only: bool,
    ) -> Result<()> {
        let request = Request::SwapDrive { id: id.into(), path: path.into(), read_only };
        self.control_ok(vm, request, "swap_drive").await
    }

    /// Starts one `fs-serve` per shared directory and waits for each socket.
    async fn start_fs_servers(
        &self,
        config: &VmConfig,
        starting: &mut Starting,
        deadline: Instant,
    ) -> Result<()> {
        let layout = BuiltinLayout::new(&config.run_dir);
        for dir in &config.shared_dirs {
            let name = format!("fs-serve-{}", dir.tag);
            let socket = layout.virtiofs_socket(&dir.tag);
            let mut args: Vec<OsString> = self.config.fs_server_command[1..].to_vec();
            args.extend(fs_server_args(&socket, dir)?);
            starting.spawn(&name, &self.config.fs_server_command[0], &args, layout.log(&name))?;
            starting.wait_for_path(&name, &socket, deadline).await?;
        }
        Ok(())
    }

    async fn start_processes(
        &self,
        config: &VmConfig,
        vmm: &VmmConfig,
        restore: Option<&Path>,
        starting: &mut Starting,
    ) -> Result<()> {
        let layout = BuiltinLayout::new(&config.run_dir);
        let deadline = Instant::now() + self.config.startup_timeout;
        match self.config.fs {
            FsKind::Inproc => self.start_fs_servers(config, starting, deadline).await?,
            FsKind::VhostUser => {
                starting
                    .start_virtiofsds(self.config.virtiofsd_binary.as_os_str(), config, deadline)
                    .await?
            }
        }

        let config_path = layout.config();
        let json = serde_json::to_vec_pretty(vmm).map_err(|e| {
            HypervisorError::InvalidConfig(format!("serialising the VMM config: {e}"))
        })?;
        std::fs::write(&config_path, json)
            .map_err(|source| HypervisorError::RunDir { path: config_path.clone(), source })?;
        let mut args: Vec<OsString> = self.config.vmm_command[1..].to_vec();
        args.extend([
            "--config".into(),
            config_path.into(),
            "--control".into(),
            layout.control().into(),
        ]);
        if let Some(dir) = restore {
            args.extend(["--restore".into(), dir.into()]);
        }
        if let Some(ids) = self.config.jail {
            let id = {
                let _assigning = self.jail_ids.lock().unwrap_or_else(|e| e.into_inner());
                assign_jail_id(&config.run_dir, &config.sandbox_id, ids)?
            };
            args.extend(["--jail".into(), format!("{id}:{id}").into()]);
        }
        starting.spawn_inheriting(
            "vmm",
            &self.config.vmm_command[0],
            &args,
            layout.log("vmm"),
            &config.inherited_fds(),
        )?;
        // The control socket answers once the event loop runs, i.e. after the vCPUs started.
        starting.wait_for_status(&layout.control(), deadline).await?;
        starting.wait_for_path("vmm", &layout.vsock_uds(), deadline).await
    }
}

#[async_trait]
impl Hypervisor for BuiltinHypervisor {
    fn name(&self) -> &'static str {
        "builtin"
    }

    async fn prepare(&self, sandbox_id: &str) -> Result<PreparedVm> {
        RunRoot(self.config.run_root.clone()).prepare(sandbox_id)
    }

    async fn start(&self, prepared: &PreparedVm, spec: &VmSpec) -> Result<VmHandle> {
        self.launch(&VmConfig::new(spec, prepared)).await
    }

    async fn reclaim_interrupted_start(&self, sandbox_id: &str) -> Result<()> {
        super::process::reclaim_interrupted_start(
            &RunRoot(self.config.run_root.clone()).run_dir(sandbox_id)?,
        )
        .await
    }

    async fn stop(&self, vm: &VmHandle, grace: Duration) -> Result<()> {
        if let Some(vmm) = vm.processes.first().filter(|p| process_alive(p)) {
            // A VMM that does not answer is terminated below.
            if self.control(vm, Request::Stop).await.is_ok() {
                let deadline = Instant::now() + grace;
                while process_alive(vmm) && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
        terminate_processes(&vm.processes, grace).await;
        if let Some(p) = vm.processes.iter().find(|p| process_alive(p)) {
            return Err(HypervisorError::Stop(format!(
                "{} (pid {}) survived SIGKILL",
                p.name, p.pid
            )));
        }
        Ok(())
    }

    fn template_refusal(&self, spec: &VmSpec) -> Option<String> {
        if spec.shared_dirs.is_empty() || self.config.fs == FsKind::Inproc {
            None
        } else {
            Some(SHARES_CANNOT_RESTORE.to_string())
        }
    }

    async fn pause(&self, vm: &VmHandle) -> Result<()> {
        self.control_ok(vm, Request::Pause, "pause").await
    }

    async fn resume(&self, vm: &VmHandle) -> Result<()> {
        self.control_ok(vm, Request::Resume, "resume").await
    }

    async fn snapshot(&self, vm: &VmHandle, dir: &Path) -> Result<()> {
        self.control_ok(vm, Request::Snapshot { dir: dir.to_path_buf() }, "snapshot").await
    }

    async fn restore(&self, prepared: &PreparedVm, spec: &VmSpec, dir: &Path) -> Result<VmHandle> {
        self.launch_restored(&VmConfig::new(spec, prepared), dir).await
    }
}

impl BuiltinHypervisor {
    /// Boots a VM in `config.run_dir` and returns once the VMM's vCPUs run and the vsock socket
    /// exists. Leaves the run directory's other files alone, so listeners bound there before
    /// the start survive it.
    pub async fn launch(&self, config: &VmConfig) -> Result<VmHandle> {
        self.launch_from(config, None).await
    }

    /// Like [`Self::launch`], but the VM starts from the snapshot in `dir` (taken of a VM
    /// with the same vCPUs, memory and devices) instead of booting.
    pub async fn launch_restored(&self, config: &VmConfig, dir: &Path) -> Result<VmHandle> {
        if !config.shared_dirs.is_empty() && self.config.fs == FsKind::VhostUser {
            return Err(HypervisorError::InvalidConfig(SHARES_CANNOT_RESTORE.into()));
        }
        self.launch_from(config, Some(dir)).await
    }

    async fn launch_from(&self, config: &VmConfig, restore: Option<&Path>) -> Result<VmHandle> {
        let vmm = vmm_config(config, self.config.seccomp, self.config.fs)?;
        let layout = BuiltinLayout::new(&config.run_dir);
        let mut stale = vec![layout.control(), layout.vsock_uds()];
        stale.extend(config.shared_dirs.iter().map(|d| layout.virtiofs_socket(&d.tag)));
        prepare_run_dir(config, &stale)?;
        let mut starting = Starting::new("vmm", self.config.startup_timeout, &config.run_dir);
        if let Err(e) = self.start_processes(config, &vmm, restore, &mut starting).await {
            starting.abort().await;
            return Err(e);
        }
        Ok(VmHandle {
            backend: self.name().to_string(),
            run_dir: config.run_dir.clone(),
            vsock_uds: BuiltinLayout::new(&config.run_dir).vsock_uds(),
            processes: starting.finish(),
        })
    }
}

/// One control request to the VMM listening at `path` (blocking). The run directory is the
/// VM's, so the socket may have been swapped: the listener must be the VM's (see `peer`).
fn control_request(path: &Path, request: &Request, timeout: Duration) -> Result<Response> {
    let stream = std::os::unix::net::UnixStream::connect(path)
        .map_err(|e| HypervisorError::Control(format!("{}: {e}", path.display())))?;
    super::peer::check(path, &stream)?;
    control::request_on(stream, path, request, timeout)
        .map_err(|e| HypervisorError::Control(e.to_string()))
}

/// The VMM's readiness, on top of the shared start-up machinery.
impl Starting {
    async fn wait_for_status(&mut self, socket: &Path, deadline: Instant) -> Result<()> {
        loop {
            self.check_running().await?;
            let path = socket.to_path_buf();
            let answer = tokio::task::spawn_blocking(move || {
                control_request(&path, &Request::Status, Duration::from_secs(1))
            })
            .await;
            if let Ok(Ok(response)) = answer {
                if response.ok {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                return Err(self.timeout_error("vmm", socket));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::HostCapabilities;
    use crate::hypervisor::{BlockDevice, KillOnDrop, SharedDir};

    fn vm_config(run_dir: &Path) -> VmConfig {
        VmConfig {
            sandbox_id: "sb".into(),
            vcpus: 1,
            memory_mib: 128,
            kernel: "/k".into(),
            initrd: "/i".into(),
            extra_kernel_args: "quiet".into(),
            run_dir: run_dir.to_path_buf(),
            console_log: run_dir.join("console.log"),
            console_log_max_bytes: podvisor_vmm::console::DEFAULT_MAX_BYTES,
            shared_dirs: vec![SharedDir {
                tag: "rootfs".into(),
                host_path: "/srv".into(),
                read_only: true,
                cache: "always".into(),
                ids: Default::default(),
            }],
            block_devices: vec![BlockDevice {
                id: "d0".into(),
                path: "/d.img".into(),
                read_only: true,
            }],
            net_devices: vec![],
        }
    }

    /// The VM's spec for `config` (what the sandbox layer hands the backend).
    fn vm_spec(config: &VmConfig) -> VmSpec {
        VmSpec {
            sandbox_id: config.sandbox_id.clone(),
            vcpus: config.vcpus,
            memory_mib: config.memory_mib,
            kernel: config.kernel.clone(),
            initrd: config.initrd.clone(),
            extra_kernel_args: config.extra_kernel_args.clone(),
            console_log: config.console_log.clone(),
            console_log_max_bytes: config.console_log_max_bytes,
            shared_dirs: config.shared_dirs.clone(),
            block_devices: vec![],
            net_devices: vec![],
            netns: None,
            host_namespaces: Default::default(),
        }
    }

    /// A pod with a user namespace: kubelet's mapping of container 0.. to guest 65536...
    fn translated(mut config: VmConfig) -> VmConfig {
        use crate::hypervisor::IdTranslation;
        let ids = vec![
            IdTranslation::Map { guest: 65_536, host: 0, count: 65_536 },
            IdTranslation::SquashHost { host: 65_536, guest: 65_534, count: 65_536 },
        ];
        config.shared_dirs[0].ids.uids = ids.clone();
        config.shared_dirs[0].ids.gids = ids;
        config
    }

    /// fs-serve translates owners as virtiofsd does: a pod with a user namespace keeps the
    /// in-process shares, gets its translation on fs-serve's command line and may start from
    /// a template; a translation fs-serve would refuse is refused before anything starts.
    #[test]
    fn shares_translating_owners_go_to_fs_serve() {
        let hv = BuiltinHypervisor::new(test_config(vec!["podvisor".into()])).unwrap();
        let pod = translated(vm_config(Path::new("/run/vm")));
        assert_eq!(hv.template_refusal(&vm_spec(&pod)), None);
        let c = vmm_config(&pod, SeccompMode::Trap, hv.config.fs).unwrap();
        assert_eq!(c.fs[0].kind, FsKind::Inproc);
        let args = fs_server_args(Path::new("/run/vm/fs.sock"), &pod.shared_dirs[0]).unwrap();
        let args: Vec<&str> = args.iter().map(|a| a.to_str().unwrap()).collect();
        let rules = |flag: &str| -> Vec<&str> {
            args.windows(2).filter(|w| w[0] == flag).map(|w| w[1]).collect()
        };
        let want = ["map:65536:0:65536", "squash-host:65536:65534:65536"];
        assert_eq!(
            (rules("--translate-uid"), rules("--translate-gid")),
            (want.into(), want.into())
        );
        let plain =
            fs_server_args(Path::new("/s"), &vm_config(Path::new("/run/vm")).shared_dirs[0]);
        assert!(!plain.unwrap().iter().any(|a| a.to_str().unwrap().starts_with("--translate")));

        let mut bad = pod.clone();
        bad.shared_dirs[0].ids.gids.push(crate::hypervisor::IdTranslation::Map {
            guest: 70_000,
            host: 1,
            count: 1,
        });
        let err = fs_server_args(Path::new("/s"), &bad.shared_dirs[0]).unwrap_err().to_string();
        assert!(err.contains("share rootfs: gid translation") && err.contains("overlaps"), "{err}");

        let vhost_user = BuiltinHypervisor::new(BuiltinConfig {
            fs: FsKind::VhostUser,
            ..test_config(vec!["podvisor".into()])
        })
        .unwrap();
        assert_eq!(
            vhost_user.template_refusal(&vm_spec(&pod)).as_deref(),
            Some(SHARES_CANNOT_RESTORE)
        );
    }

    #[test]
    fn vmm_config_maps_every_device() {
        let c = vmm_config(&vm_config(Path::new("/run/vm")), SeccompMode::Trap, FsKind::Inproc)
            .unwrap();
        assert_eq!(c.vsock, Some(VsockConfig { guest_cid: 3, uds: "/run/vm/vsock.sock".into() }));
        assert_eq!(
            c.fs,
            vec![FsConfig {
                tag: "rootfs".into(),
                socket: "/run/vm/virtiofs-rootfs.sock".into(),
                kind: FsKind::Inproc
            }]
        );
        assert_eq!(c.drives.len(), 1);
        assert_eq!((c.cmdline.as_str(), c.initrd.as_deref()), ("quiet", Some(Path::new("/i"))));
        let mut bad = vm_config(Path::new("/run/vm"));
        bad.vcpus = 300;
        assert!(matches!(
            vmm_config(&bad, SeccompMode::Trap, FsKind::Inproc),
            Err(HypervisorError::InvalidConfig(_))
        ));
    }

    #[test]
    fn every_vm_gets_its_own_jail_id_and_owns_its_run_dir() {
        use std::os::unix::fs::MetadataExt;
        if !nix::unistd::geteuid().is_root() {
            println!("SKIP: chown needs root");
            return;
        }
        let vms = tempfile::tempdir().unwrap();
        let ids = JailIds { first: 200_000, count: 3 };
        let mut taken = Vec::new();
        for n in 0..3 {
            let run_dir = vms.path().join(format!("vm{n}"));
            std::fs::create_dir(&run_dir).unwrap();
            // Same sandbox id each time: the search must move on from a taken id.
            let id = assign_jail_id(&run_dir, "sb", ids).unwrap();
            assert!((200_000..200_003).contains(&id), "{id}");
            assert_eq!(std::fs::metadata(&run_dir).unwrap().uid(), id);
            assert!(!taken.contains(&id), "{id} given twice");
            taken.push(id);
        }
        let full = vms.path().join("vm3");
        std::fs::create_dir(&full).unwrap();
        assert!(matches!(assign_jail_id(&full, "sb", ids), Err(HypervisorError::InvalidConfig(_))));
        // A VM that is gone frees its id; re-assigning a VM's own dir keeps its id free.
        std::fs::remove_dir(vms.path().join("vm1")).unwrap();
        assert_eq!(assign_jail_id(&full, "sb", ids).unwrap(), taken[1]);
        assert_eq!(assign_jail_id(&full, "sb", ids).unwrap(), taken[1]);
    }

    /// The VMM command for tests: `$PODVISOR_BIN vmm`, else the workspace's debug `podvisor`
    /// if it has the `vmm` subcommand.
    fn vmm_command() -> Option<Vec<OsString>> {
        let bin = std::env::var_os("PODVISOR_BIN").map(PathBuf::from).or_else(|| {
            let exe = std::env::current_exe().ok()?;
            Some(exe.parent()?.parent()?.join("podvisor"))
        })?;
        let out = std::process::Command::new(&bin).arg("vmm").output().ok()?;
        // `podvisor vmm` without arguments prints the VMM's usage error.
        String::from_utf8_lossy(&out.stderr)
            .contains("--config")
            .then(|| vec![bin.into(), "vmm".into()])
    }

    /// The backend's config for tests: the VMM and fs-serve from the same binary.
    fn test_config(vmm_command: Vec<OsString>) -> BuiltinConfig {
        let fs_server_command = vec![vmm_command[0].clone(), "fs-serve".into()];
        BuiltinConfig { vmm_command, fs_server_command, ..BuiltinConfig::default() }
    }

    fn require(reason: &str) {
        assert!(std::env::var("PODVISOR_REQUIRE_E2E").as_deref() != Ok("1"), "{reason}");
        println!("SKIP: {reason}");
    }

    /// Starts the VMM process on a tiny guest program through the trait, checks it over the
    /// control socket, pauses/resumes it and stops it.
    #[tokio::test]
    async fn starts_and_stops_a_tiny_guest() {
        use podvisor_vmm::guest_program::{asm, elf};
        if std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_err() {
            return require("/dev/kvm unavailable");
        }
        let Some(vmm_command) = vmm_command() else {
            return require("no podvisor binary with the `vmm` subcommand (set PODVISOR_BIN)");
        };
        let dir = tempfile::tempdir().unwrap();
        let mut config = vm_config(&dir.path().join("run"));
        config.kernel = dir.path().join("prog.elf");
        let code = asm::program(&[&asm::mov_dx(0x3f8), &asm::out_text(b"tiny"), &asm::HLT]);
        std::fs::write(&config.kernel, elf(&code)).unwrap();
        config.initrd = dir.path().join("initrd");
        std::fs::write(&config.initrd, b"not really an initramfs").unwrap();
        config.shared_dirs.clear();
        config.block_devices.clear();
        let hv = BuiltinHypervisor::new(test_config(vmm_command)).unwrap();
        let vm = hv.launch(&config).await.unwrap();
        assert!(vm.vsock_uds.exists());
        assert!(hv.is_running(&vm));
        assert_eq!(vm.processes[0].name, "vmm");
        let status = hv.control(&vm, Request::Status).await.unwrap().status.unwrap();
        assert_eq!(status.pid as i32, vm.processes[0].pid);
        assert!(hv.control(&vm, Request::Pause).await.unwrap().ok);
        assert!(hv.control(&vm, Request::Resume).await.unwrap().ok);
        assert!(hv.swap_drive(&vm, "nope", Path::new("/dev/null"), true).await.is_err());
        hv.stop(&vm, Duration::from_secs(5)).await.unwrap();
        assert!(!hv.is_running(&vm));
        assert_eq!(std::fs::read(&config.console_log).unwrap(), b"tiny");
        hv.cleanup(&vm).await.unwrap();
        assert!(!config.run_dir.exists());
    }

    /// Waits (up to 30 s) until `path` holds at least `len` bytes; returns them.
    async fn wait_for_bytes(path: &Path, len: usize) -> Vec<u8> {
        for _ in 0..3000 {
            let bytes = std::fs::read(path).unwrap_or_default();
            if bytes.len() >= len {
                return bytes;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{} never reached {len} bytes", path.display());
    }

    #[tokio::test]
    async fn snapshot_and_restore_through_the_trait() {
        snapshot_and_restore(None).await;
    }

    /// The daemon's default: every VMM jailed under a uid of its own. The template's VMM
    /// writes the snapshot inside its run directory; the pod's reads it before its jail.
    #[tokio::test]
    async fn snapshot_and_restore_through_the_trait_jailed() {
        if !nix::unistd::geteuid().is_root() {
            return require("the jail needs root");
        }
        snapshot_and_restore(Some(JailIds { first: 300_100, count: 16 })).await;
    }

    /// Through the trait: a counting guest is paused and snapshotted into its run directory,
    /// and a second VM with its own run directory (and, as root, a share translating owners)
    /// starts from that snapshot and counts on. With `fs = "vhost-user"` a VM with shared
    /// directories is refused.
    async fn snapshot_and_restore(jail: Option<JailIds>) {
        use podvisor_vmm::guest_program::{asm, elf};
        if std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_err() {
            return require("/dev/kvm unavailable");
        }
        let Some(vmm_command) = vmm_command() else {
            return require("no podvisor binary with the `vmm` subcommand (set PODVISOR_BIN)");
        };
        let dir = tempfile::tempdir().unwrap();
        // fs-serve's sandbox needs root: as root, both VMs get a share through the in-process
        // virtio-fs device, each from a server of its own.
        let with_share = nix::unistd::geteuid().is_root();
        let share = dir.path().join("share");
        std::fs::create_dir(&share).unwrap();
        let guest = |name: &str| {
            let mut config = vm_config(&dir.path().join("vms").join(name));
            config.sandbox_id = name.into();
            config.kernel = dir.path().join("prog.elf");
            config.initrd = dir.path().join("initrd");
            config.console_log = dir.path().join(format!("{name}.log"));
            config.shared_dirs[0].host_path = share.clone();
            if !with_share {
                config.shared_dirs.clear();
            }
            config.block_devices.clear();
            config
        };
        std::fs::write(dir.path().join("prog.elf"), elf(&asm::counting(0x20_0000, 10_000)))
            .unwrap();
        std::fs::write(dir.path().join("initrd"), b"not really an initramfs").unwrap();
        let hv = BuiltinHypervisor::new(BuiltinConfig { jail, ..test_config(vmm_command.clone()) })
            .unwrap();

        let template = guest("template");
        let vm = hv.launch(&template).await.unwrap();
        let _kill = KillOnDrop(vm.processes.clone());
        wait_for_bytes(&template.console_log, 3).await;
        let snap = template.run_dir.join("snap");
        assert!(hv.snapshot(&vm, &snap).await.is_err(), "a running VM is not snapshotted");
        hv.pause(&vm).await.unwrap();
        hv.snapshot(&vm, &snap).await.unwrap();
        hv.stop(&vm, Duration::from_secs(5)).await.unwrap();
        let before = std::fs::read(&template.console_log).unwrap();
        // The daemon keeps snapshots outside run directories, which `cleanup` removes.
        let kept = dir.path().join("snap");
        std::fs::rename(&snap, &kept).unwrap();
        hv.cleanup(&vm).await.unwrap();

        // The template had no owner translation; the restored pod has a user namespace, and
        // its own fs-serve gets its translation.
        let pod = if with_share { translated(guest("pod")) } else { guest("pod") };
        let restored = hv.launch_restored(&pod, &kept).await.unwrap();
        let _kill_restored = KillOnDrop(restored.processes.clone());
        if with_share {
            let server = assert_fs_server_is_sandboxed(&restored);
            let cmdline = std::fs::read(format!("/proc/{}/cmdline", server.pid)).unwrap();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            assert!(cmdline.contains("--translate-uid map:65536:0:65536 "), "{cmdline}");
        }
        let after = wait_for_bytes(&pod.console_log, 2).await;
        let memory = &hv.describe(&restored)["vmmMemory"];
        let (pss, uss) = (memory["pssKib"].as_u64().unwrap(), memory["ussKib"].as_u64().unwrap());
        assert!(uss > 0 && pss >= uss, "{memory}");
        hv.stop(&restored, Duration::from_secs(5)).await.unwrap();
        hv.cleanup(&restored).await.unwrap();
        let last = *before.last().unwrap();
        assert_eq!(after[0], last.wrapping_add(1), "counting resumes after {last}: {after:?}");

        let vhost_user = BuiltinHypervisor::new(BuiltinConfig {
            fs: FsKind::VhostUser,
            ..test_config(vmm_command.clone())
        })
        .unwrap();
        let shared = vm_config(&dir.path().join("vms").join("shared"));
        let err = vhost_user.launch_restored(&shared, &kept).await.unwrap_err();
        assert!(err.to_string().contains("shared directories"), "{err}");
    }

    /// The VM's fs-serve runs as root with only the file-serving capabilities, no_new_privs,
    /// seccomp, and in a mount namespace of its own.
    fn assert_fs_server_is_sandboxed(vm: &VmHandle) -> &crate::hypervisor::VmProcess {
        let server = vm.processes.iter().find(|p| p.name == "fs-serve-rootfs").expect("fs-serve");
        let status = std::fs::read_to_string(format!("/proc/{}/status", server.pid)).unwrap();
        let field = |name: &str| {
            status.lines().find(|l| l.starts_with(name)).and_then(|l| l.split_whitespace().nth(1))
        };
        // CHOWN, DAC_OVERRIDE, DAC_READ_SEARCH, FOWNER, FSETID, SETGID, SETUID, MKNOD, SETFCAP.
        assert_eq!(field("CapEff:"), Some("00000000880000df"), "{status}");
        assert_eq!(field("CapBnd:"), Some("00000000880000df"), "{status}");
        assert_eq!((field("NoNewPrivs:"), field("Seccomp:")), (Some("1"), Some("2")), "{status}");
        let ns = |pid: String| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap();
        assert_ne!(ns(server.pid.to_string()), ns("self".into()));
        server
    }

    /// Two VMs through the trait with the daemon's default confinement: each VMM runs jailed
    /// under its own uid from the range, owning its run directory, with no capabilities.
    #[tokio::test]
    async fn jailed_vmms_each_run_as_their_own_uid() {
        use podvisor_vmm::guest_program::{asm, elf};
        use std::os::unix::fs::MetadataExt;
        if std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_err() {
            return require("/dev/kvm unavailable");
        }
        if !nix::unistd::geteuid().is_root() {
            return require("the jail needs root");
        }
        let Some(vmm_command) = vmm_command() else {
            return require("no podvisor binary with the `vmm` subcommand (set PODVISOR_BIN)");
        };
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("prog.elf");
        let code = asm::program(&[&asm::mov_dx(0x3f8), &asm::out_text(b"jailed"), &asm::HLT]);
        std::fs::write(&kernel, elf(&code)).unwrap();
        let hv = BuiltinHypervisor::new(BuiltinConfig {
            jail: Some(JailIds { first: 300_000, count: 16 }),
            ..test_config(vmm_command)
        })
        .unwrap();
        let mut vms = Vec::new();
        for n in 0..2 {
            let mut config = vm_config(&dir.path().join("vms").join(format!("vm{n}")));
            config.sandbox_id = "same-start-point".into();
            config.console_log = dir.path().join(format!("console{n}.log"));
            config.kernel = kernel.clone();
            config.initrd = dir.path().join("initrd");
            std::fs::write(&config.initrd, b"not really an initramfs").unwrap();
            config.shared_dirs.clear();
            config.block_devices.clear();
            let vm = hv.launch(&config).await.unwrap();
            vms.push((config, vm));
        }
        let mut uids = Vec::new();
        for (config, vm) in &vms {
            let status =
                std::fs::read_to_string(format!("/proc/{}/status", vm.processes[0].pid)).unwrap();
            let field = |name: &str| {
                status.lines().find(|l| l.starts_with(name)).unwrap().split_whitespace().nth(1)
            };
            let uid: u32 = field("Uid:").unwrap().parse().unwrap();
            assert!((300_000..300_016).contains(&uid), "{status}");
            assert_eq!(field("CapEff:"), Some("0000000000000000"));
            assert_eq!(std::fs::metadata(&config.run_dir).unwrap().uid(), uid);
            uids.push(uid);
        }
        assert_ne!(uids[0], uids[1]);
        for (config, vm) in &vms {
            hv.stop(vm, Duration::from_secs(5)).await.unwrap();
            assert_eq!(std::fs::read(&config.console_log).unwrap(), b"jailed");
            hv.cleanup(vm).await.unwrap();
        }
    }

    /// Boots the project's vmlinux + initramfs with the built-in VMM and pings the agent over
    /// vsock. Skips where KVM cannot run Linux (the reason comes from `HostCapabilities`).
    #[tokio::test]
    async fn full_boot_agent_answers_ping_over_vsock() {
        let caps = HostCapabilities::detect();
        if !caps.kvm_can_boot_linux {
            println!("SKIP: the built-in VMM cannot boot Linux here: {}", caps.kvm_reason);
            return;
        }
        let (Some(kernel), Some(initrd)) =
            (std::env::var_os("PODVISOR_KERNEL"), std::env::var_os("PODVISOR_INITRD"))
        else {
            return require("PODVISOR_KERNEL / PODVISOR_INITRD not set (run `make kernel guest`)");
        };
        let Some(vmm_command) = vmm_command() else {
            return require("no podvisor binary with the `vmm` subcommand (set PODVISOR_BIN)");
        };
        let dir = tempfile::tempdir().unwrap();
        let mut config = vm_config(&dir.path().join("run"));
        config.kernel = kernel.into();
        config.initrd = initrd.into();
        config.shared_dirs.clear();
        config.block_devices.clear();
        config.extra_kernel_args = String::new();
        let hv = BuiltinHypervisor::new(test_config(vmm_command)).unwrap();
        let prepared = RunRoot(dir.path().join("vms")).prepare("sb").unwrap();
        config.run_dir = prepared.run_dir().to_path_buf();
        let vm = hv.launch(&config).await.unwrap();
        let ready = hv.wait_agent_ready(prepared, &vm, Duration::from_secs(60)).await;
        let agent =
            crate::agent::grpc::GrpcAgent::new(hv.agent_connector(&vm), Duration::from_secs(10));
        let answered = match ready {
            Ok(()) => {
                use crate::agent::GuestAgent;
                agent.status().await.map(|_| ()).map_err(|e| e.to_string())
            }
            Err(e) => Err(e.to_string()),
        };
        let console = std::fs::read_to_string(&config.console_log).unwrap_or_default();
        hv.stop(&vm, Duration::from_secs(5)).await.unwrap();
        answered.unwrap_or_else(|e| panic!("agent did not answer: {e}\nconsole:\n{console}"));
    }
}
