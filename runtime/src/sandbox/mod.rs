//! The sandbox layer owns pod and container state and lifecycle. It boots a VM per pod
//! through a [`Hypervisor`] from the [`Registry`], gives it its resources
//! ([`PodResources`]), talks to the guest through the [`GuestAgent`] boundary, fans container
//! output out through the I/O hub ([`io`]), persists records under `--root`, and recovers
//! them when the daemon restarts (VMs outlive the daemon).
//!
//! Its vocabulary is its own ([`types`], [`records`]): the CRI layer translates into it, and
//! no CRI or agent wire type appears here.
//!
//! - [`pod`]: RunPodSandbox, StopPodSandbox, RemovePodSandbox, the VM watcher, recovery;
//! - [`container`]: container lifecycle and its followers (output → log, exit → record);
//! - [`exec`]: exec sessions, on which ExecSync runs (and streaming exec will);
//! - [`handlers`]: RuntimeClass handlers and the size of each pod's VM.

pub mod container;
pub mod error;
pub mod events;
pub mod exec;
pub mod handlers;
pub mod io;
pub mod logs;
pub mod pod;
pub mod records;
pub mod seccomp;
pub mod spec;
pub mod stats;
mod sweep;
pub mod templates;
pub mod types;
mod writer;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

pub use crate::agent::ContainerStats;
use crate::agent::{AgentDialer, GuestAgent, ProcessId};
use crate::config::Config;
use crate::hypervisor::{Hypervisor, Registry};
use crate::resource::network::PodNetworks;
use crate::resource::PodResources;
use crate::store;
pub use error::{Result, SandboxError};
pub use records::*;
use spec::ImageDefaults;
pub use types::*;

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
    /// Resolves an image reference (name, tag, digest or id) to a local image.
    fn resolve(&self, image: &str) -> std::result::Result<Option<ResolvedImage>, String>;
}

#[derive(Default)]
struct State {
    sandboxes: HashMap<String, SandboxRecord>,
    containers: HashMap<String, ContainerRecord>,
    /// The images (root filesystem and image volumes) of each container being created (by
    /// container id), until its record is in `containers`: RemoveImage must not take them
    /// meanwhile.
    images_in_creation: HashMap<String, Vec<String>>,
    /// Images RemoveImage is removing: CreateContainer refuses them meanwhile.
    images_being_removed: std::collections::HashSet<String>,
}

/// RemoveImage holds this while it removes an image (see
/// [`SandboxManager::begin_image_removal`]).
pub struct ImageRemoval {
    manager: std::sync::Weak<SandboxManager>,
    image_id: String,
}

impl Drop for ImageRemoval {
    fn drop(&mut self) {
        if let Some(m) = self.manager.upgrade() {
            lock(&m.state).images_being_removed.remove(&self.image_id);
        }
    }
}

/// A container being created holds its images until its record is registered.
pub(crate) struct ImageReservation<'a> {
    manager: &'a SandboxManager,
    container_id: String,
}

impl Drop for ImageReservation<'_> {
    fn drop(&mut self) {
        lock(&self.manager.state).images_in_creation.remove(&self.container_id);
    }
}

pub struct SandboxManager {
    config: Arc<Config>,
    hypervisors: Arc<Registry>,
    dialer: Arc<dyn AgentDialer>,
    images: Arc<dyn ImageResolver>,
    state: Mutex<State>,
    /// Serialises lifecycle operations of one sandbox (and of its containers' create/remove).
    sandbox_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Serialises lifecycle operations of one container.
    container_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Writes records off the async workers, in the order they changed.
    records: writer::RecordWriter,
    /// Guests booting at once (see [`boot_slots`]).
    boot_slots: tokio::sync::Semaphore,
    agents: Mutex<HashMap<String, Arc<dyn GuestAgent>>>,
    log_writers: Mutex<HashMap<String, Arc<logs::LogWriter>>>,
    /// The I/O hub of every process whose output is being read.
    io: Mutex<HashMap<ProcessId, Arc<io::ProcessIo>>>,
    events: events::Events,
    /// The last CPU sample of each pod and container, for usage rates.
    cpu_samples: stats::CpuSamples,
    networks: PodNetworks,
    /// VM templates (see [`templates`]).
    templates: templates::Templates,
}

pub fn now_nanos() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0)
}

/// How many guests boot at once: two per host CPU. Under TCG a booting guest keeps a CPU busy
/// for about 1.5 s; fifty at once on two CPUs starve each other (and their VMMs' start-up)
/// past every timeout, while in turns each boots in seconds. The wait for a turn is not
/// counted against the boot timeout.
fn boot_slots() -> usize {
    2 * std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
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
        hypervisors: Arc<Registry>,
        dialer: Arc<dyn AgentDialer>,
        images: Arc<dyn ImageResolver>,
    ) -> Arc<Self> {
        Arc::new(Self {
            hypervisors,
            dialer,
            images,
            state: Mutex::new(State::default()),
            sandbox_locks: Mutex::new(HashMap::new()),
            container_locks: Mutex::new(HashMap::new()),
            records: writer::RecordWriter::start(),
            boot_slots: tokio::sync::Semaphore::new(boot_slots()),
            agents: Mutex::new(HashMap::new()),
            log_writers: Mutex::new(HashMap::new()),
            io: Mutex::new(HashMap::new()),
            events: events::Events::default(),
            cpu_samples: stats::CpuSamples::default(),
            networks: PodNetworks::new(config.network.clone(), config.netns_dir()),
            templates: templates::Templates::new(
                config.state.join("templates"),
                config.vm.max_templates as usize,
            ),
            config,
        })
    }

    /// Whether pods can be attached to the network now (Status' NetworkReady), and why not.
    pub fn network_ready(&self) -> std::result::Result<(), String> {
        if !self.networks.enabled() {
            return Err("pod networking is disabled ([network] enabled = false)".into());
        }
        self.networks.ready().map(drop).map_err(|e| e.to_string())
    }

    /// The RuntimeClass handlers pods may name, the default (empty) first, with each one's
    /// backend (`qemu`, `builtin`, `host`).
    pub fn handler_backends(&self) -> Vec<(String, String)> {
        let default = self.hypervisor_name().to_string();
        handlers::Handler::names(&self.config)
            .into_iter()
            .filter_map(|name| handlers::Handler::resolve(&self.config, &name))
            .map(|h| (h.name, h.backend.unwrap_or_else(|| default.clone())))
            .collect()
    }

    /// Every VM template and build, for Status.
    pub fn template_status(&self) -> Vec<templates::TemplateStatus> {
        self.templates.status()
    }

    /// Lifecycle events from now on.
    pub fn subscribe_events(&self) -> tokio::sync::broadcast::Receiver<events::LifecycleEvent> {
        self.events.subscribe()
    }

    /// The backend new pods run on.
    pub fn hypervisor_name(&self) -> &'static str {
        self.hypervisors.default_backend().name()
    }

    /// The pods' VMs whose processes run, by backend (the metrics' gauge); the default
    /// backend is always listed.
    pub fn running_vms(&self) -> Vec<(String, u64)> {
        let mut counts =
            std::collections::BTreeMap::from([(self.hypervisor_name().to_string(), 0u64)]);
        for vm in self.list_sandboxes().into_iter().filter_map(|s| s.vm) {
            if self.hypervisor_of(&vm).is_ok_and(|h| h.is_running(&vm)) {
                *counts.entry(vm.backend.clone()).or_default() += 1;
            }
        }
        counts.into_iter().collect()
    }

    /// What the backend shows of the pod's VM (verbose status), if it runs.
    pub fn describe_vm(&self, rec: &SandboxRecord) -> serde_json::Value {
        match &rec.vm {
            Some(vm) => match self.hypervisor_of(vm) {
                Ok(hypervisor) => hypervisor.describe(vm),
                Err(_) => serde_json::json!({ "backend": vm.backend }),
            },
            None => serde_json::Value::Null,
        }
    }

    /// The backend that runs (or ran) `vm`.
    fn hypervisor_of(&self, vm: &crate::hypervisor::VmHandle) -> Result<Arc<dyn Hypervisor>> {
        Ok(self.hypervisors.get(&vm.backend)?)
    }

    // Paths.

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

    pub fn console_log_path(&self, sandbox_id: &str) -> PathBuf {
        self.sandbox_state_dir(sandbox_id).join("console.log")
    }

    /// The pod's resources, in the layout its record says.
    fn resources(&self, rec: &SandboxRecord) -> PodResources {
        PodResources::new(&self.sandbox_state_dir(&rec.id), rec.share_layout)
    }

    // Records.

    /// Queues the sandbox record's write. Call it with the state lock held, the record as it
    /// is there, so writes reach the disk in the order the records changed (see
    /// [`writer`]); await the result after the lock went: no reader of the state waits for an
    /// fsync.
    fn save_sandbox(&self, rec: &SandboxRecord) -> writer::Pending {
        self.records.write_json(&self.sandbox_record_path(&rec.id), rec)
    }

    /// As [`Self::save_sandbox`], for a container record.
    fn save_container(&self, rec: &ContainerRecord) -> writer::Pending {
        self.records.write_json(&self.container_record_path(&rec.sandbox_id, &rec.id), rec)
    }

    /// Queues the removal of a record file or directory (with the state lock held, after the
    /// record left the state: no write of it can follow).
    fn remove_record(&self, path: &std::path::Path) -> writer::Pending {
        self.records.remove(path)
    }

    /// Updates a sandbox record in memory and on disk (see [`Self::save_sandbox`]).
    async fn update_sandbox(
        &self,
        id: &str,
        f: impl FnOnce(&mut SandboxRecord),
    ) -> Result<SandboxRecord> {
        let (before, rec, saved) = {
            let mut st = lock(&self.state);
            let rec =
                st.sandboxes.get_mut(id).ok_or_else(|| SandboxError::SandboxNotFound(id.into()))?;
            let before = rec.state;
            f(rec);
            (before, rec.clone(), self.save_sandbox(rec))
        };
        saved.done().await?;
        match (before, rec.state) {
            (SandboxState::NotReady, SandboxState::Ready) => {
                self.events.emit(id, id, events::EventKind::Started)
            }
            (SandboxState::Ready, SandboxState::NotReady) => {
                self.events.emit(id, id, events::EventKind::Stopped)
            }
            _ => {}
        }
        Ok(rec)
    }

    async fn update_container(
        &self,
        id: &str,
        f: impl FnOnce(&mut ContainerRecord),
    ) -> Result<ContainerRecord> {
        let (before, rec, saved) = {
            let mut st = lock(&self.state);
            let rec = st
                .containers
                .get_mut(id)
                .ok_or_else(|| SandboxError::ContainerNotFound(id.into()))?;
            let before = rec.state;
            f(rec);
            (before, rec.clone(), self.save_container(rec))
        };
        saved.done().await?;
        let kind = match (before, rec.state) {
            (ContainerState::Created, ContainerState::Running) => Some(events::EventKind::Started),
            (b, ContainerState::Exited) if b != ContainerState::Exited => {
                Some(events::EventKind::Stopped)
            }
            _ => None,
        };
        if let Some(kind) = kind {
            self.events.emit(id, &rec.sandbox_id, kind);
        }
        Ok(rec)
    }

    pub fn sandbox(&self, id: &str) -> Result<SandboxRecord> {
        let st = lock(&self.state);
        resolve_id(st.sandboxes.keys(), id)
            .and_then(|full| st.sandboxes.get(&full).cloned())
            .ok_or_else(|| SandboxError::SandboxNotFound(id.into()))
    }

    pub fn container(&self, id: &str) -> Result<ContainerRecord> {
        let st = lock(&self.state);
        resolve_id(st.containers.keys(), id)
            .and_then(|full| st.containers.get(&full).cloned())
            .ok_or_else(|| SandboxError::ContainerNotFound(id.into()))
    }

    pub fn list_sandboxes(&self) -> Vec<SandboxRecord> {
        lock(&self.state).sandboxes.values().cloned().collect()
    }

    pub fn list_containers(&self) -> Vec<ContainerRecord> {
        lock(&self.state).containers.values().cloned().collect()
    }

    fn containers_of(&self, sandbox_id: &str) -> Vec<ContainerRecord> {
        lock(&self.state)
            .containers
            .values()
            .filter(|c| c.sandbox_id == sandbox_id)
            .cloned()
            .collect()
    }

    /// A container whose root filesystem is image `image_id`, also one being created.
    #[cfg(test)]
    pub fn container_using_image(&self, image_id: &str) -> Option<String> {
        using_image(&lock(&self.state), image_id)
    }

    /// Marks image `image_id` as being removed until the guard drops, unless a container
    /// (also one being created) uses it: then that container's id. Checked and marked under
    /// one lock, so a CreateContainer either holds the image first or is refused.
    pub fn begin_image_removal(
        self: &Arc<Self>,
        image_id: &str,
    ) -> std::result::Result<ImageRemoval, String> {
        let mut st = lock(&self.state);
        if let Some(user) = using_image(&st, image_id) {
            return Err(user);
        }
        st.images_being_removed.insert(image_id.to_string());
        Ok(ImageRemoval { manager: Arc::downgrade(self), image_id: image_id.to_string() })
    }

    /// Holds images `image_ids` for container `container_id` while it is created.
    fn reserve_images(
        &self,
        container_id: &str,
        image_ids: Vec<String>,
    ) -> Result<ImageReservation<'_>> {
        let mut st = lock(&self.state);
        if let Some(removed) = image_ids.iter().find(|i| st.images_being_removed.contains(*i)) {
            return Err(SandboxError::ImageNotFound(format!("{removed} (being removed)")));
        }
        st.images_in_creation.insert(container_id.to_string(), image_ids);
        Ok(ImageReservation { manager: self, container_id: container_id.to_string() })
    }

    fn sandbox_lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.sandbox_locks).entry(id.to_string()).or_default().clone()
    }

    fn container_lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.container_locks).entry(id.to_string()).or_default().clone()
    }

    // The agent.

    /// The sandbox's agent client (it connects on first use).
    fn agent(&self, sandbox_id: &str) -> Result<Arc<dyn GuestAgent>> {
        if let Some(agent) = lock(&self.agents).get(sandbox_id).cloned() {
            return Ok(agent);
        }
        let rec = self.sandbox(sandbox_id)?;
        let vm = rec.vm.ok_or_else(|| SandboxError::SandboxNotRunning(sandbox_id.into()))?;
        let connector = self.hypervisor_of(&vm)?.agent_connector(&vm);
        let agent = self.dialer.agent(sandbox_id, connector);
        lock(&self.agents).insert(sandbox_id.to_string(), agent.clone());
        Ok(agent)
    }

    fn forget_agent(&self, sandbox_id: &str) {
        lock(&self.agents).remove(sandbox_id);
    }

    /// What the pod's agent says about itself (verbose status).
    pub async fn agent_status(&self, sandbox_id: &str) -> Result<crate::agent::AgentStatus> {
        let rec = self.sandbox(sandbox_id)?;
        if rec.state != SandboxState::Ready {
            return Err(SandboxError::SandboxNotReady(rec.id));
        }
        Ok(self.agent(&rec.id)?.status().await?)
    }

    /// The I/O hub of a process whose output is being read, for attach and streaming exec.
    #[cfg_attr(not(test), allow(dead_code))] // Attach (the streaming issue) looks hubs up.
    pub fn process_io(&self, process: &ProcessId) -> Option<Arc<io::ProcessIo>> {
        lock(&self.io).get(process).cloned()
    }
}

/// A container (created, or being created) whose root filesystem or an image volume is image
/// `image_id`.
fn using_image(st: &State, image_id: &str) -> Option<String> {
    let uses = |c: &ContainerRecord| {
        c.image_id == image_id
            || c.mounts.iter().any(|m| !m.image_id.is_empty() && m.image_id == image_id)
    };
    st.containers.values().find(|c| uses(c)).map(|c| c.id.clone()).or_else(|| {
        st.images_in_creation
            .iter()
            .find(|(_, ids)| ids.iter().any(|i| i == image_id))
            .map(|(c, _)| c.clone())
    })
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

/// The labels filter of List* calls: every selector pair must match.
pub fn labels_match(labels: &HashMap<String, String>, selector: &HashMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}
