//! The sandbox manager owns all sandbox and container state: it boots a VM per pod through
//! the [`Hypervisor`] trait, talks to the guest agent, persists records under `--root`, and
//! recovers them when the daemon restarts (VMs outlive the daemon).

pub mod logs;
pub mod records;
pub mod share;
pub mod spec;

pub mod container;

use std::collections::HashMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use podvisor_proto::agent::{self as pb, agent_client::AgentClient};
use tonic::transport::Channel;
use tracing::{info, warn};

use crate::config::Config;
use crate::hypervisor::{Hypervisor, HypervisorError, SharedDir, VmConfig};
use crate::store::{self, StoreError};
pub use records::*;
use share::{SandboxShare, ShareError};
use spec::{ImageDefaults, SpecError};

/// Errors of the sandbox manager; each maps to one gRPC code (see [`SandboxError::code`]).
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    #[error("{0}")]
    Unimplemented(String),
    #[error("hypervisor: {0}")]
    Hypervisor(#[from] HypervisorError),
    #[error("connecting to the agent of sandbox {sandbox}: {message}")]
    AgentConnect { sandbox: String, message: String },
    #[error("agent {call}: {status}")]
    Agent { call: &'static str, status: tonic::Status },
    #[error("state store: {0}")]
    Store(#[from] StoreError),
    #[error("sandbox share: {0}")]
    Share(#[from] ShareError),
    #[error("container spec: {0}")]
    Spec(#[from] SpecError),
    #[error("container log: {0}")]
    Log(#[from] logs::LogError),
    #[error("image: {0}")]
    Image(String),
}

impl SandboxError {
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            Self::NotFound(_) => Code::NotFound,
            Self::AlreadyExists(_) => Code::AlreadyExists,
            Self::InvalidArgument(_) => Code::InvalidArgument,
            Self::FailedPrecondition(_) => Code::FailedPrecondition,
            Self::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Self::Unimplemented(_) => Code::Unimplemented,
            Self::Spec(
                SpecError::NoCommand
                | SpecError::UnknownUser(_)
                | SpecError::UnknownGroup(_)
                | SpecError::InvalidUser(_)
                | SpecError::EmptyMountPath,
            ) => Code::InvalidArgument,
            Self::Agent { status, .. } => status.code(),
            Self::AgentConnect { .. } => Code::Unavailable,
            _ => Code::Internal,
        }
    }
}

pub type Result<T> = std::result::Result<T, SandboxError>;

/// What CreateContainer needs to know about an image, from the image store.
#[derive(Debug, Clone)]
pub struct ResolvedImage {
    pub id: String,
    /// ContainerStatus.image_ref: a repo digest when known, else the id.
    pub image_ref: String,
    /// The unpacked, read-only root filesystem on the host.
    pub rootfs: PathBuf,
    pub defaults: ImageDefaults,
}

/// The sandbox manager's view of the image store.
pub trait ImageResolver: Send + Sync {
    /// Resolves a CRI image reference (name, tag, digest or id) to a local image.
    fn resolve(&self, image: &str) -> std::result::Result<Option<ResolvedImage>, String>;
}

/// A pod as requested by RunPodSandbox, already validated by the CRI layer.
#[derive(Debug, Clone, Default)]
pub struct SandboxRequest {
    pub metadata: PodMetadata,
    pub labels: HashMap<String, String>,
    pub annotations: HashMap<String, String>,
    pub log_directory: String,
    pub hostname: String,
    pub runtime_handler: String,
    pub dns: DnsSettings,
    pub network_mode: i32,
    pub pid_mode: i32,
    pub ipc_mode: i32,
    pub sysctls: HashMap<String, String>,
}

#[derive(Default)]
struct State {
    sandboxes: HashMap<String, SandboxRecord>,
    containers: HashMap<String, ContainerRecord>,
}

pub struct SandboxManager {
    config: Arc<Config>,
    hypervisor: Arc<dyn Hypervisor>,
    images: Arc<dyn ImageResolver>,
    state: Mutex<State>,
    /// Serialises lifecycle operations of one sandbox (and of its containers' create/remove).
    sandbox_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Serialises lifecycle operations of one container.
    container_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    agents: Mutex<HashMap<String, AgentClient<Channel>>>,
    log_writers: Mutex<HashMap<String, Arc<logs::LogWriter>>>,
}

pub fn now_nanos() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0)
}

/// A 64-hex-digit id, as containerd's.
pub fn new_id() -> String {
    format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SandboxManager {
    pub fn new(
        config: Arc<Config>,
        hypervisor: Arc<dyn Hypervisor>,
        images: Arc<dyn ImageResolver>,
    ) -> Arc<Self> {
        Arc::new(Self {
            config,
            hypervisor,
            images,
            state: Mutex::new(State::default()),
            sandbox_locks: Mutex::new(HashMap::new()),
            container_locks: Mutex::new(HashMap::new()),
            agents: Mutex::new(HashMap::new()),
            log_writers: Mutex::new(HashMap::new()),
        })
    }

    pub fn hypervisor_name(&self) -> &'static str {
        self.hypervisor.name()
    }

    // ---- paths ----

    fn sandbox_record_dir(&self, id: &str) -> PathBuf {
        self.config.root.join("sandboxes").join(id)
    }

    fn sandbox_record_path(&self, id: &str) -> PathBuf {
        self.sandbox_record_dir(id).join("sandbox.json")
    }

    fn container_record_path(&self, sandbox_id: &str, id: &str) -> PathBuf {
        self.sandbox_record_dir(sandbox_id).join("containers").join(format!("{id}.json"))
    }

    fn sandbox_state_dir(&self, id: &str) -> PathBuf {
        self.config.state.join("sandboxes").join(id)
    }

    /// The VM's run directory. Unix socket paths live here and must fit in sun_path (108
    /// bytes), so it is short: a 16-hex-digit prefix of the random 64-digit id.
    fn vm_run_dir(&self, id: &str) -> PathBuf {
        self.config.state.join("vms").join(&id[..id.len().min(16)])
    }

    fn share(&self, id: &str) -> SandboxShare {
        SandboxShare::new(&self.sandbox_state_dir(id).join("share"))
    }

    // ---- records ----

    fn save_sandbox(&self, rec: &SandboxRecord) -> Result<()> {
        store::write_json(&self.sandbox_record_path(&rec.id), rec)?;
        Ok(())
    }

    fn save_container(&self, rec: &ContainerRecord) -> Result<()> {
        store::write_json(&self.container_record_path(&rec.sandbox_id, &rec.id), rec)?;
        Ok(())
    }

    /// Updates a sandbox record in memory and on disk. The write happens under the state lock:
    /// records reach the disk in the order they changed, and never after their removal.
    fn update_sandbox(
        &self,
        id: &str,
        f: impl FnOnce(&mut SandboxRecord),
    ) -> Result<SandboxRecord> {
        let mut st = lock(&self.state);
        let rec = st
            .sandboxes
            .get_mut(id)
            .ok_or_else(|| SandboxError::NotFound(format!("pod sandbox {id} not found")))?;
        f(rec);
        let rec = rec.clone();
        self.save_sandbox(&rec)?;
        Ok(rec)
    }

    fn update_container(
        &self,
        id: &str,
        f: impl FnOnce(&mut ContainerRecord),
    ) -> Result<ContainerRecord> {
        let mut st = lock(&self.state);
        let rec = st
            .containers
            .get_mut(id)
            .ok_or_else(|| SandboxError::NotFound(format!("container {id} not found")))?;
        f(rec);
        let rec = rec.clone();
        self.save_container(&rec)?;
        Ok(rec)
    }

    pub fn sandbox(&self, id: &str) -> Result<SandboxRecord> {
        let st = lock(&self.state);
        resolve_id(st.sandboxes.keys(), id)
            .and_then(|full| st.sandboxes.get(&full).cloned())
            .ok_or_else(|| SandboxError::NotFound(format!("pod sandbox {id} not found")))
    }

    pub fn container(&self, id: &str) -> Result<ContainerRecord> {
        let st = lock(&self.state);
        resolve_id(st.containers.keys(), id)
            .and_then(|full| st.containers.get(&full).cloned())
            .ok_or_else(|| SandboxError::NotFound(format!("container {id} not found")))
    }

    pub fn list_sandboxes(&self) -> Vec<SandboxRecord> {
        lock(&self.state).sandboxes.values().cloned().collect()
    }

    pub fn list_containers(&self) -> Vec<ContainerRecord> {
        lock(&self.state).containers.values().cloned().collect()
    }

    /// A container whose root filesystem is image `image_id`.
    pub fn container_using_image(&self, image_id: &str) -> Option<String> {
        lock(&self.state).containers.values().find(|c| c.image_id == image_id).map(|c| c.id.clone())
    }

    fn sandbox_lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.sandbox_locks).entry(id.to_string()).or_default().clone()
    }

    fn container_lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.container_locks).entry(id.to_string()).or_default().clone()
    }

    // ---- agent ----

    /// The sandbox's agent client, connecting (and waiting for the guest) if needed.
    async fn agent(&self, sandbox_id: &str, timeout: Duration) -> Result<AgentClient<Channel>> {
        if let Some(client) = lock(&self.agents).get(sandbox_id).cloned() {
            return Ok(client);
        }
        let rec = self.sandbox(sandbox_id)?;
        let vm = rec.vm.ok_or_else(|| {
            SandboxError::FailedPrecondition(format!("pod sandbox {sandbox_id} is not running"))
        })?;
        let client = crate::agent_client::connect(&vm.vsock_uds, timeout).await.map_err(|e| {
            SandboxError::AgentConnect { sandbox: sandbox_id.to_string(), message: e.to_string() }
        })?;
        lock(&self.agents).insert(sandbox_id.to_string(), client.clone());
        Ok(client)
    }

    fn forget_agent(&self, sandbox_id: &str) {
        lock(&self.agents).remove(sandbox_id);
    }

    // ---- sandboxes ----

    /// RunPodSandbox: boots the pod's VM and prepares it. Returns the sandbox id.
    pub async fn run_sandbox(self: &Arc<Self>, req: SandboxRequest) -> Result<String> {
        let id = new_id();
        {
            let mut st = lock(&self.state);
            if let Some(existing) = st.sandboxes.values().find(|s| s.metadata == req.metadata) {
                return Err(SandboxError::AlreadyExists(format!(
                    "pod sandbox {}/{} attempt {} already exists as {}",
                    req.metadata.namespace, req.metadata.name, req.metadata.attempt, existing.id
                )));
            }
            // Reserve the name while the VM boots.
            st.sandboxes.insert(
                id.clone(),
                SandboxRecord {
                    id: id.clone(),
                    metadata: req.metadata.clone(),
                    labels: req.labels.clone(),
                    annotations: req.annotations.clone(),
                    log_directory: req.log_directory.clone(),
                    hostname: req.hostname.clone(),
                    runtime_handler: req.runtime_handler.clone(),
                    dns: req.dns.clone(),
                    network_mode: req.network_mode,
                    pid_mode: req.pid_mode,
                    ipc_mode: req.ipc_mode,
                    created_at: now_nanos(),
                    state: SandboxState::NotReady,
                    vm: None,
                },
            );
        }
        let guard = self.sandbox_lock(&id);
        let _op = guard.lock().await;
        match self.boot_sandbox(&id, &req).await {
            Ok(()) => {
                let rec = self.update_sandbox(&id, |r| r.state = SandboxState::Ready)?;
                info!(sandbox = %id, pod = %format!("{}/{}", rec.metadata.namespace, rec.metadata.name), backend = self.hypervisor.name(), "pod sandbox ready");
                self.watch_vm(&id);
                Ok(id)
            }
            Err(e) => {
                warn!(sandbox = %id, error = %e, "pod sandbox failed to start; cleaning up");
                let _ = self.teardown_vm(&id).await;
                lock(&self.state).sandboxes.remove(&id);
                let _ = store::remove_path(&self.sandbox_record_dir(&id));
                let _ = store::remove_path(&self.sandbox_state_dir(&id));
                // Made before the VM started, so left when the start itself failed.
                let _ = store::remove_path(&self.vm_run_dir(&id));
                lock(&self.sandbox_locks).remove(&id);
                Err(e)
            }
        }
    }

    async fn boot_sandbox(&self, id: &str, req: &SandboxRequest) -> Result<()> {
        let run_dir = self.vm_run_dir(id);
        // The longest socket the backends create there ("virtiofs-<tag>.sock", "vsock.sock_<port>")
        // must still fit in sun_path.
        if run_dir.as_os_str().len() + 40 > 107 {
            return Err(SandboxError::FailedPrecondition(format!(
                "state directory {} is too long for unix socket paths; use a shorter --state",
                self.config.state.display()
            )));
        }
        let share = self.share(id);
        share.create()?;
        let vm_config = VmConfig {
            sandbox_id: id.to_string(),
            vcpus: self.config.vm.vcpus,
            memory_mib: self.config.vm.memory_mib,
            kernel: self.config.kernel_path(),
            initrd: self.config.initrd_path(),
            extra_kernel_args: self.config.vm.kernel_args.clone(),
            run_dir: self.vm_run_dir(id),
            console_log: self.sandbox_state_dir(id).join("console.log"),
            shared_dirs: vec![SharedDir {
                tag: podvisor_proto::SHARED_FS_TAG.to_string(),
                host_path: share.shared_dir(),
                read_only: true,
                cache: "auto".into(),
            }],
            block_devices: vec![],
            net_devices: vec![],
        };
        // Listen for the agent's "ready" before the guest can send it (see
        // AGENT_READY_VSOCK_PORT: the host must not dial a guest that is still booting).
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&vm_config.run_dir).map_err(
            |source| HypervisorError::RunDir { path: vm_config.run_dir.clone(), source },
        )?;
        let ready = crate::agent_client::listen_for_ready(&vm_config.vsock_uds()).map_err(|e| {
            SandboxError::AgentConnect { sandbox: id.to_string(), message: e.to_string() }
        })?;
        let vm = self.hypervisor.start(&vm_config).await?;
        self.update_sandbox(id, |r| r.vm = Some(vm.clone()))?;
        let boot_timeout = Duration::from_secs(self.config.vm.boot_timeout_seconds);
        let booted =
            crate::agent_client::connect_after_boot(ready, &vm.vsock_uds, boot_timeout, || {
                self.hypervisor.is_running(&vm)
            });
        let mut agent = match booted.await {
            Ok(agent) => agent,
            // The console is removed with the failed sandbox: keep its end in the error.
            Err(e) => {
                let console = std::fs::read_to_string(&vm_config.console_log).unwrap_or_default();
                let lines: Vec<&str> = console.lines().collect();
                let tail = lines[lines.len().saturating_sub(15)..].join("\n");
                return Err(SandboxError::AgentConnect {
                    sandbox: id.to_string(),
                    message: format!("{e}; guest console ends with:\n{tail}"),
                });
            }
        };
        lock(&self.agents).insert(id.to_string(), agent.clone());
        agent
            .create_sandbox(pb::CreateSandboxRequest {
                sandbox_id: id.to_string(),
                hostname: req.hostname.clone(),
                dns_servers: req.dns.servers.clone(),
                dns_searches: req.dns.searches.clone(),
                dns_options: req.dns.options.clone(),
                sysctls: req.sysctls.clone(),
                mount_shared_fs: true,
                host_time_unix_nanos: now_nanos(),
                // POD mode: containers share a PID namespace of the pod's own (not the VM's,
                // which holds the agent); NODE mode uses the VM's.
                pod_pid_namespace: req.pid_mode == k8s_cri::v1::NamespaceMode::Pod as i32,
            })
            .await
            .map_err(|status| SandboxError::Agent { call: "CreateSandbox", status })?;
        Ok(())
    }

    /// Stops the VM (if any) and removes its run directory and share. Leaves records alone.
    async fn teardown_vm(&self, id: &str) -> Result<()> {
        self.forget_agent(id);
        let vm = lock(&self.state).sandboxes.get(id).and_then(|s| s.vm.clone());
        if let Some(vm) = vm {
            self.hypervisor.stop(&vm, Duration::from_secs(3)).await?;
            self.hypervisor.cleanup(&vm).await?;
        }
        self.share(id).destroy()?;
        Ok(())
    }

    /// StopPodSandbox: kills every container, then stops the VM. Idempotent.
    pub async fn stop_sandbox(&self, id: &str) -> Result<()> {
        let rec = match self.sandbox(id) {
            Ok(rec) => rec,
            Err(SandboxError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        let id = rec.id;
        let guard = self.sandbox_lock(&id);
        let _op = guard.lock().await;
        let containers: Vec<String> = self
            .list_containers()
            .into_iter()
            .filter(|c| c.sandbox_id == id)
            .map(|c| c.id)
            .collect();
        for cid in &containers {
            if let Err(e) = self.stop_container(cid, 0).await {
                warn!(container = %cid, error = %e, "stopping container with its sandbox");
            }
        }
        // NotReady before the VM goes, so the VM watcher knows this exit is expected.
        let rec = self.update_sandbox(&id, |r| r.state = SandboxState::NotReady)?;
        if rec.vm.is_some() {
            let agent = lock(&self.agents).get(&id).cloned();
            if let Some(mut agent) = agent {
                // Best effort: the VM is stopped below either way.
                let _ = tokio::time::timeout(Duration::from_secs(2), agent.shutdown(pb::Empty {}))
                    .await;
            }
        }
        self.teardown_vm(&id).await?;
        let now = now_nanos();
        for cid in &containers {
            let _ = self.update_container(cid, |c| {
                if c.state != ContainerState::Exited {
                    c.state = ContainerState::Exited;
                    c.finished_at = now;
                    if c.exit_code == 0 {
                        c.exit_code = 255;
                    }
                    c.reason = "PodSandboxStopped".into();
                }
            });
        }
        self.update_sandbox(&id, |r| r.vm = None)?;
        info!(sandbox = %id, "pod sandbox stopped");
        Ok(())
    }

    /// RemovePodSandbox: stops it if needed and removes every trace. Idempotent.
    pub async fn remove_sandbox(&self, id: &str) -> Result<()> {
        let rec = match self.sandbox(id) {
            Ok(rec) => rec,
            Err(SandboxError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        let id = rec.id;
        if rec.state == SandboxState::Ready || rec.vm.is_some() {
            self.stop_sandbox(&id).await?;
        }
        let guard = self.sandbox_lock(&id);
        let _op = guard.lock().await;
        self.teardown_vm(&id).await?;
        let containers: Vec<String> = self
            .list_containers()
            .into_iter()
            .filter(|c| c.sandbox_id == id)
            .map(|c| c.id)
            .collect();
        {
            let mut st = lock(&self.state);
            for cid in &containers {
                st.containers.remove(cid);
            }
            st.sandboxes.remove(&id);
            store::remove_path(&self.sandbox_record_dir(&id))?;
        }
        for cid in &containers {
            lock(&self.log_writers).remove(cid);
            lock(&self.container_locks).remove(cid);
        }
        store::remove_path(&self.sandbox_state_dir(&id))?;
        lock(&self.sandbox_locks).remove(&id);
        info!(sandbox = %id, "pod sandbox removed");
        Ok(())
    }

    /// Watches the VMM process; if it dies while the sandbox is Ready, the sandbox becomes
    /// NotReady and its containers Exited (the VM took them down).
    fn watch_vm(self: &Arc<Self>, id: &str) {
        let Some(vm) = lock(&self.state).sandboxes.get(id).and_then(|s| s.vm.clone()) else {
            return;
        };
        let Some(vmm) = vm.processes.first().cloned() else { return };
        let this = Arc::clone(self);
        let id = id.to_string();
        tokio::spawn(async move {
            crate::procwait::wait_for_exit(&vmm).await;
            let still_ours = lock(&this.state)
                .sandboxes
                .get(&id)
                .is_some_and(|s| s.state == SandboxState::Ready && s.vm.as_ref() == Some(&vm));
            if !still_ours {
                return;
            }
            warn!(sandbox = %id, pid = vmm.pid, "the sandbox VM exited unexpectedly");
            this.forget_agent(&id);
            let now = now_nanos();
            let cids: Vec<String> = this
                .list_containers()
                .into_iter()
                .filter(|c| c.sandbox_id == id && c.state != ContainerState::Exited)
                .map(|c| c.id)
                .collect();
            for cid in cids {
                let _ = this.update_container(&cid, |c| {
                    c.state = ContainerState::Exited;
                    c.finished_at = now;
                    c.exit_code = 255;
                    c.reason = "VMExited".into();
                    c.message = "the pod's VM exited".into();
                });
            }
            let _ = this.update_sandbox(&id, |r| r.state = SandboxState::NotReady);
        });
    }

    /// Loads the persisted records after a daemon (re)start and re-attaches to running VMs.
    pub async fn recover(self: &Arc<Self>) -> Result<()> {
        let dir = self.config.root.join("sandboxes");
        let Ok(entries) = std::fs::read_dir(&dir) else { return Ok(()) };
        for entry in entries.flatten() {
            let sandbox_path = entry.path().join("sandbox.json");
            let rec: SandboxRecord = match store::read_json(&sandbox_path) {
                Ok(rec) => rec,
                Err(e) => {
                    warn!(path = %sandbox_path.display(), error = %e, "skipping unreadable sandbox record");
                    continue;
                }
            };
            let mut containers = Vec::new();
            if let Ok(cs) = std::fs::read_dir(entry.path().join("containers")) {
                for c in cs.flatten() {
                    match store::read_json::<ContainerRecord>(&c.path()) {
                        Ok(c) => containers.push(c),
                        Err(e) => {
                            warn!(path = %c.path().display(), error = %e, "skipping unreadable container record")
                        }
                    }
                }
            }
            let mut st = lock(&self.state);
            st.sandboxes.insert(rec.id.clone(), rec);
            for c in containers {
                st.containers.insert(c.id.clone(), c);
            }
        }
        let sandboxes = self.list_sandboxes();
        for sb in sandboxes {
            let alive = sb.vm.as_ref().is_some_and(|vm| self.hypervisor.is_running(vm));
            if sb.state == SandboxState::Ready && alive {
                info!(sandbox = %sb.id, "re-attached to running pod sandbox");
                self.watch_vm(&sb.id);
                for c in self
                    .list_containers()
                    .into_iter()
                    .filter(|c| c.sandbox_id == sb.id && c.state == ContainerState::Running)
                {
                    self.follow_container(&c);
                }
            } else if sb.state == SandboxState::Ready || sb.vm.is_some() {
                warn!(sandbox = %sb.id, "pod sandbox VM is gone; marking it not ready");
                let now = now_nanos();
                for c in self
                    .list_containers()
                    .into_iter()
                    .filter(|c| c.sandbox_id == sb.id && c.state != ContainerState::Exited)
                {
                    let _ = self.update_container(&c.id, |c| {
                        c.state = ContainerState::Exited;
                        c.finished_at = now;
                        c.exit_code = 255;
                        c.reason = "VMExited".into();
                    });
                }
                if let Some(vm) = &sb.vm {
                    let _ = self.hypervisor.stop(vm, Duration::from_secs(1)).await;
                    let _ = self.hypervisor.cleanup(vm).await;
                }
                let _ = self.share(&sb.id).destroy();
                self.update_sandbox(&sb.id, |r| {
                    r.state = SandboxState::NotReady;
                    r.vm = None;
                })?;
            }
        }
        Ok(())
    }

    pub fn console_log_path(&self, sandbox_id: &str) -> PathBuf {
        self.sandbox_state_dir(sandbox_id).join("console.log")
    }
}

/// Resolves a full id or a unique prefix of one (as crictl users type them).
fn resolve_id<'a>(mut ids: impl Iterator<Item = &'a String>, id: &str) -> Option<String> {
    if id.is_empty() {
        return None;
    }
    let mut found: Option<String> = None;
    for candidate in ids.by_ref() {
        if candidate == id {
            return Some(candidate.clone());
        }
        if candidate.starts_with(id) {
            if found.is_some() {
                return None; // ambiguous
            }
            found = Some(candidate.clone());
        }
    }
    found
}

impl crate::cri::image::ImageUsers for SandboxManager {
    fn container_using(&self, image_id: &str) -> Option<String> {
        self.container_using_image(image_id)
    }
}

/// The guest path of a share-relative path.
fn guest_shared_path(rel: &Path) -> PathBuf {
    Path::new(podvisor_proto::GUEST_SHARED_DIR).join(rel)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_resolve_by_unique_prefix() {
        let ids = ["abc1".to_string(), "abc2".to_string(), "def".to_string()];
        assert_eq!(resolve_id(ids.iter(), "def"), Some("def".into()));
        assert_eq!(resolve_id(ids.iter(), "d"), Some("def".into()));
        assert_eq!(resolve_id(ids.iter(), "abc"), None);
        assert_eq!(resolve_id(ids.iter(), "abc2"), Some("abc2".into()));
        assert_eq!(resolve_id(ids.iter(), ""), None);
        assert_eq!(new_id().len(), 64);
    }
}
