//! VM templates: one VM per key booted once with no pod-specific set-up, its agent waited for,
//! paused and snapshotted; pods of that key then start from the snapshot (a new VMM process
//! mapping its memory copy-on-write) instead of booting.
//!
//! The key covers everything the snapshot depends on: handler, backend, the kernel's and
//! initramfs' contents (SHA-256, cached per file identity), vCPUs, memory, kernel arguments and
//! the device list (network devices, drives, virtio-fs shares). A changed input
//! is a new key; the old template of the same handler and shape is removed once the new one is
//! built, and the start-up sweep removes half-built ones.
//!
//! Files: `<state>/templates/<key>/` holds `template.json` (the inputs, the sizes and the state
//! file's SHA-256), `last-used` (empty; its mtime is the template's last restore) and
//! `snapshot/` (the backend's files; for the built-in VMM `vm.state` and `memory.bin`). A template is built in `.tmp-<key>-<nonce>/` and renamed into place, so a
//! directory named by its key is complete. Its files belong to root and are read-only: the
//! VMM that wrote them ran as a jail uid another VM may get next, and pods map the memory
//! MAP_PRIVATE, so nothing a pod does reaches them.
//!
//! Before every use the manifest is read and compared with the pod's inputs, the state file's
//! size and SHA-256 are checked (it is small) and the memory file's size is checked against the
//! VM's memory. The memory itself is not hashed per start: reading a whole guest's memory
//! defeats the point of mapping it lazily, the file is root's and read-only, and the VMM
//! checks the state file's magic, version and CRC itself.
//!
//! Every (handler, vCPUs, memory, devices) shape is a template of its own, with a memory file
//! of the VM's size, and pod sizes come from tenants' resources: at most `[vm] max_templates`
//! are kept, and installing one more removes the least recently used (by `last-used`, which
//! survives a daemon restart). A template a restore is reading is never removed under it
//! ([`RestoreLease`]): its removal waits until the restore's VMM holds what it needs.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::handlers::Handler;
use crate::hypervisor::{Hypervisor, HypervisorError, NetDevice, SharedDir, VmSpec};
use crate::store;

/// The manifest's format; another one is a template to rebuild.
const FORMAT: u32 = 1;
const MANIFEST: &str = "template.json";
const SNAPSHOT: &str = "snapshot";
const STATE_FILE: &str = "vm.state";
const MEMORY_FILE: &str = "memory.bin";
/// Touched on every restore: its mtime orders templates for eviction.
const LAST_USED: &str = "last-used";
/// How long a failed build keeps its key from being built again.
const RETRY_AFTER: Duration = Duration::from_secs(300);
/// How long the template VM may take to stop.
const STOP_GRACE: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("hashing {path}: {source}")]
    Hash { path: PathBuf, source: std::io::Error },
    #[error("creating {path}: {source}")]
    Create { path: PathBuf, source: std::io::Error },
    #[error("starting the template VM: {0}")]
    Start(HypervisorError),
    #[error("the template VM's agent never became ready: {0}")]
    Ready(HypervisorError),
    #[error("pausing the template VM: {0}")]
    Pause(HypervisorError),
    #[error("snapshotting the template VM: {0}")]
    Snapshot(HypervisorError),
    #[error("moving the snapshot into {path}: {source}")]
    Move { path: PathBuf, source: std::io::Error },
    #[error("writing the template's manifest: {0}")]
    Manifest(store::StoreError),
    #[error("a VM with {0} drives has no template (drives are not in the template's shape yet)")]
    Drives(usize),
}

/// What a template is built from; equal inputs, equal key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateInputs {
    pub handler: String,
    pub backend: String,
    pub kernel: PathBuf,
    pub kernel_sha256: String,
    pub initrd: PathBuf,
    pub initrd_sha256: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub kernel_args: String,
    pub net_devices: usize,
    pub block_devices: usize,
    /// The VM's virtio-fs devices, in order (the template VM has the same, on empty
    /// directories: its guest mounts nothing before the snapshot).
    pub shares: Vec<TemplateShare>,
}

/// One virtio-fs device of a template's VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateShare {
    pub tag: String,
    pub read_only: bool,
    pub cache: String,
}

impl TemplateInputs {
    /// The template's directory name: 16 hex digits of the inputs' SHA-256.
    pub fn key(&self) -> String {
        short_hash(&serde_json::to_vec(self).unwrap_or_default())
    }

    /// What a newer template replaces: the same handler, backend, size and devices.
    fn slot(&self) -> String {
        let shape = (
            &self.handler,
            &self.backend,
            self.vcpus,
            self.memory_mib,
            self.net_devices,
            self.block_devices,
            &self.shares,
        );
        short_hash(&serde_json::to_vec(&shape).unwrap_or_default())
    }
}

fn short_hash(bytes: &[u8]) -> String {
    hex::encode(&Sha256::digest(bytes)[..8])
}

/// What `template.json` records.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Manifest {
    format: u32,
    inputs: TemplateInputs,
    slot: String,
    state_len: u64,
    state_sha256: String,
    memory_len: u64,
    /// The template VM's network device MACs, in device order: a restored pod changes them.
    macs: Vec<String>,
    built_at_unix: i64,
}

/// A template checked and ready to start a pod from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pub key: String,
    /// What the backend restores from.
    pub snapshot: PathBuf,
    pub macs: Vec<String>,
}

/// How a pod starts.
#[derive(Debug)]
pub enum StartPlan {
    /// Restore from `template`, holding `lease` until the backend's restore returned.
    Restore { template: Template, lease: RestoreLease },
    /// Cold boot, and why not from a template; `build` says to build the template meanwhile.
    Cold { reason: String, build: Option<TemplateInputs> },
}

/// A key's build in this daemon.
#[derive(Debug, Clone)]
enum Build {
    Running,
    Failed { reason: String, at: Instant },
}

/// A template as Status lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TemplateStatus {
    pub key: String,
    pub handler: String,
    pub backend: String,
    /// `ready`, `building`, `failed` or `corrupt`.
    pub state: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

/// Held while a key is built; the build is over (for [`Templates::plan`]) when it drops.
pub struct BuildTurn<'a> {
    templates: &'a Templates,
    key: String,
    outcome: Option<String>,
}

impl BuildTurn<'_> {
    fn failed(&mut self, reason: String) {
        self.outcome = Some(reason);
    }
}

impl Drop for BuildTurn<'_> {
    fn drop(&mut self) {
        let mut builds = lock(&self.templates.builds);
        match self.outcome.take() {
            Some(reason) => {
                builds.insert(self.key.clone(), Build::Failed { reason, at: Instant::now() });
            }
            None => {
                builds.remove(&self.key);
            }
        }
    }
}

/// What says a file is unchanged: (device, inode, size, mtime seconds, mtime nanoseconds).
type FileIdentity = (u64, u64, u64, i64, i64);

/// The templates on disk, shared with the leases of restores in flight.
#[derive(Debug)]
struct Disk {
    root: PathBuf,
    /// At most this many templates are kept.
    max: usize,
    leases: Mutex<Leases>,
}

#[derive(Debug, Default)]
struct Leases {
    /// How many restores read each template now.
    in_use: HashMap<String, usize>,
    /// Templates to remove once no restore reads them; no pod is planned onto one.
    doomed: HashSet<String>,
}

/// A restore's hold on its template: while any is held, the template's files stay. A VMM
/// opens the state file and maps the memory file when it starts; removing the directory
/// between the two fails the restore, and a rebuild renamed into place between them would
/// pair one build's state with another's memory. Once the backend's restore returned the VMM
/// holds both (an unlinked file stays readable while open or mapped), so the lease is
/// dropped then.
#[derive(Debug)]
pub struct RestoreLease {
    disk: Arc<Disk>,
    key: String,
}

impl Drop for RestoreLease {
    fn drop(&mut self) {
        self.disk.release(&self.key);
    }
}

impl Disk {
    fn dir(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    /// Removes template `key` now, or, while a restore reads it, once none does. Whether it
    /// is gone.
    fn remove(&self, leases: &mut Leases, key: &str) -> bool {
        if leases.in_use.contains_key(key) {
            leases.doomed.insert(key.to_string());
            return false;
        }
        leases.doomed.remove(key);
        let _ = store::remove_path(&self.dir(key));
        true
    }

    fn release(&self, key: &str) {
        let mut leases = lock(&self.leases);
        let Some(count) = leases.in_use.get_mut(key) else { return };
        *count -= 1;
        if *count > 0 {
            return;
        }
        leases.in_use.remove(key);
        if leases.doomed.contains(key) {
            self.remove(&mut leases, key);
        }
        // What eviction skipped while this restore read it.
        self.evict(&mut leases, None);
    }

    /// Removes the least recently used templates, but never one in use or `keep`, until at
    /// most `max` are left.
    fn evict(&self, leases: &mut Leases, keep: Option<&str>) {
        let mut kept: Vec<(SystemTime, String)> = installed_keys(&self.root)
            .into_iter()
            .filter(|key| !leases.doomed.contains(key))
            .map(|key| (last_used(&self.dir(&key)), key))
            .collect();
        let Some(mut excess) = kept.len().checked_sub(self.max).filter(|n| *n > 0) else {
            return;
        };
        kept.sort();
        for (_, key) in kept {
            if excess == 0 {
                break;
            }
            if Some(key.as_str()) == keep || leases.in_use.contains_key(&key) {
                continue;
            }
            tracing::info!(template = %key, max_templates = self.max, "removing the least recently used VM template: [vm] max_templates are kept");
            self.remove(leases, &key);
            excess -= 1;
        }
    }
}

/// The template manager.
#[derive(Debug)]
pub struct Templates {
    root: PathBuf,
    disk: Arc<Disk>,
    /// SHA-256 of files by (device, inode, size, mtime): a pod start hashes nothing twice.
    hashes: Mutex<HashMap<FileIdentity, String>>,
    builds: Mutex<HashMap<String, Build>>,
    /// Fallback reasons already logged, per handler: each is logged once.
    logged: Mutex<std::collections::HashSet<(String, String)>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Templates {
    /// Templates under `root` (`<state>/templates`), at most `max` of them.
    pub fn new(root: PathBuf, max: usize) -> Self {
        let disk = Arc::new(Disk { root: root.clone(), max, leases: Mutex::default() });
        Self {
            root,
            disk,
            hashes: Mutex::default(),
            builds: Mutex::default(),
            logged: Mutex::default(),
        }
    }

    fn dir(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    /// Whether `reason` is new for `handler` (then the caller logs it).
    pub fn first_time(&self, handler: &str, reason: &str) -> bool {
        lock(&self.logged).insert((handler.to_string(), reason.to_string()))
    }

    /// The SHA-256 of `path`, from the cache while the file is unchanged.
    fn file_hash(&self, path: &Path) -> Result<String, TemplateError> {
        let err = |source| TemplateError::Hash { path: path.to_path_buf(), source };
        let meta = std::fs::metadata(path).map_err(err)?;
        let id = (meta.dev(), meta.ino(), meta.size(), meta.mtime(), meta.mtime_nsec());
        if let Some(hash) = lock(&self.hashes).get(&id) {
            return Ok(hash.clone());
        }
        let mut file = std::fs::File::open(path).map_err(err)?;
        let mut hasher = Sha256::new();
        std::io::copy(&mut file, &mut hasher).map_err(err)?;
        let hash = hex::encode(hasher.finalize());
        lock(&self.hashes).insert(id, hash.clone());
        Ok(hash)
    }

    /// The inputs of a template for a pod of `handler` on `backend` whose VM is `spec`.
    pub fn inputs(
        &self,
        handler: &Handler,
        backend: &str,
        spec: &VmSpec,
    ) -> Result<TemplateInputs, TemplateError> {
        if !spec.block_devices.is_empty() {
            return Err(TemplateError::Drives(spec.block_devices.len()));
        }
        Ok(TemplateInputs {
            handler: handler.name.clone(),
            backend: backend.to_string(),
            kernel: spec.kernel.clone(),
            kernel_sha256: self.file_hash(&spec.kernel)?,
            initrd: spec.initrd.clone(),
            initrd_sha256: self.file_hash(&spec.initrd)?,
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            kernel_args: spec.extra_kernel_args.clone(),
            net_devices: spec.net_devices.len(),
            block_devices: spec.block_devices.len(),
            shares: spec
                .shared_dirs
                .iter()
                .map(|d| TemplateShare {
                    tag: d.tag.clone(),
                    read_only: d.read_only,
                    cache: d.cache.clone(),
                })
                .collect(),
        })
    }

    /// How a pod with template inputs `inputs` starts: from its template if one is built and
    /// sound (leased, and its use recorded); else cold, saying why, and with `build` set when
    /// the caller is to build it (it then holds the key's build: [`Self::adopt_build`]). A
    /// corrupt template is removed, and logged naming it and the reason, so that it is
    /// rebuilt. The builds are consulted before the disk, under their lock: a build that just
    /// ended has renamed its template into place, so no key is built twice.
    pub fn plan(&self, inputs: &TemplateInputs) -> StartPlan {
        let key = inputs.key();
        let mut builds = lock(&self.builds);
        let previous = builds.get(&key).cloned();
        if let Some(Build::Running) = previous {
            return StartPlan::Cold {
                reason: format!("template {key} is being built"),
                build: None,
            };
        }
        let mut leases = lock(&self.disk.leases);
        if leases.doomed.contains(&key) {
            return StartPlan::Cold {
                reason: format!(
                    "template {key} is being removed once the restores reading it are done; \
                     it is rebuilt after"
                ),
                build: None,
            };
        }
        let reason = match check(&self.dir(&key), inputs) {
            Ok(Some(manifest)) => {
                touch_last_used(&self.dir(&key));
                *leases.in_use.entry(key.clone()).or_default() += 1;
                let lease = RestoreLease { disk: Arc::clone(&self.disk), key: key.clone() };
                let template = Template {
                    key: key.clone(),
                    snapshot: self.dir(&key).join(SNAPSHOT),
                    macs: manifest.macs,
                };
                return StartPlan::Restore { template, lease };
            }
            Ok(None) => match previous {
                Some(Build::Failed { reason, at }) if at.elapsed() < RETRY_AFTER => {
                    return StartPlan::Cold {
                        reason: format!("building template {key} failed: {reason}"),
                        build: None,
                    }
                }
                _ => format!("no template {key} yet; building it"),
            },
            Err(reason) => {
                tracing::warn!(template = %key, handler = %inputs.handler, %reason, "VM template is corrupt: this pod cold-boots and the template is rebuilt");
                if !self.disk.remove(&mut leases, &key) {
                    return StartPlan::Cold {
                        reason: format!(
                            "template {key} is corrupt ({reason}); it is rebuilt once the \
                             restores reading it are done"
                        ),
                        build: None,
                    };
                }
                format!("template {key} was corrupt ({reason}); rebuilding it")
            }
        };
        drop(leases);
        builds.insert(key, Build::Running);
        StartPlan::Cold { reason, build: Some(inputs.clone()) }
    }

    /// The build of `key` that [`Self::plan`] handed out.
    pub fn adopt_build(&self, key: &str) -> BuildTurn<'_> {
        BuildTurn { templates: self, key: key.to_string(), outcome: None }
    }

    /// A template a restore failed from: removed (once no other restore reads it), so a
    /// later pod builds it again.
    pub fn discard(&self, key: &str) {
        self.disk.remove(&mut lock(&self.disk.leases), key);
    }

    /// Builds the template of `inputs` (holding `turn`): boots a VM like the pod's without
    /// any pod-specific set-up, waits for its agent's ready announcement, pauses and snapshots
    /// it, and moves the snapshot into place. The build's VM gets none of a pod's content: its
    /// shares are empty directories of its own (the guest mounts shares in CreateSandbox, after
    /// the restore, so no FUSE session crosses the snapshot), no drives (refused), and its
    /// network devices are taps of its own, down and unattached, with MACs from the key that
    /// restored pods replace.
    pub async fn build(
        &self,
        turn: &mut BuildTurn<'_>,
        hypervisor: &dyn Hypervisor,
        inputs: &TemplateInputs,
        ready_timeout: Duration,
        console_log_max_bytes: u64,
    ) -> Result<Template, TemplateError> {
        let result =
            self.build_once(hypervisor, inputs, ready_timeout, console_log_max_bytes).await;
        if let Err(e) = &result {
            turn.failed(e.to_string());
        }
        result
    }

    async fn build_once(
        &self,
        hypervisor: &dyn Hypervisor,
        inputs: &TemplateInputs,
        ready_timeout: Duration,
        console_log_max_bytes: u64,
    ) -> Result<Template, TemplateError> {
        let key = inputs.key();
        let tmp = self.root.join(format!(".tmp-{key}-{}", &super::new_id()[..8]));
        std::fs::create_dir_all(&tmp)
            .map_err(|source| TemplateError::Create { path: tmp.clone(), source })?;
        let result = self
            .boot_and_snapshot(hypervisor, inputs, &tmp, ready_timeout, console_log_max_bytes)
            .await;
        let macs = match result {
            Ok(macs) => macs,
            Err(e) => {
                let _ = store::remove_path(&tmp);
                return Err(e);
            }
        };
        match self.install(inputs, &tmp, macs) {
            Ok(template) => Ok(template),
            Err(e) => {
                let _ = store::remove_path(&tmp);
                Err(e)
            }
        }
    }

    /// The template VM's life: boot, ready, pause, snapshot into its run directory, stop;
    /// the snapshot ends up in `tmp/snapshot`. Returns the VM's MACs.
    async fn boot_and_snapshot(
        &self,
        hypervisor: &dyn Hypervisor,
        inputs: &TemplateInputs,
        tmp: &Path,
        ready_timeout: Duration,
        console_log_max_bytes: u64,
    ) -> Result<Vec<String>, TemplateError> {
        let key = inputs.key();
        let spec = template_spec(inputs, &key, tmp, console_log_max_bytes);
        for share in &spec.shared_dirs {
            std::fs::create_dir_all(&share.host_path).map_err(|source| TemplateError::Create {
                path: share.host_path.clone(),
                source,
            })?;
        }
        let macs: Vec<String> = spec.net_devices.iter().map(|n| n.mac.clone()).collect();
        let prepared = hypervisor.prepare(&spec.sandbox_id).await.map_err(TemplateError::Start)?;
        let vm = match hypervisor.start(&prepared, &spec).await {
            Ok(vm) => vm,
            Err(e) => {
                let _ = hypervisor.discard(prepared).await;
                return Err(TemplateError::Start(e));
            }
        };
        let snapshotted = async {
            hypervisor
                .wait_agent_ready(prepared, &vm, ready_timeout)
                .await
                .map_err(TemplateError::Ready)?;
            hypervisor.pause(&vm).await.map_err(TemplateError::Pause)?;
            let in_run_dir = vm.run_dir.join("template-snapshot");
            hypervisor.snapshot(&vm, &in_run_dir).await.map_err(TemplateError::Snapshot)?;
            Ok::<_, TemplateError>(in_run_dir)
        }
        .await;
        let _ = hypervisor.stop(&vm, STOP_GRACE).await;
        let moved = snapshotted.and_then(|from| {
            let to = tmp.join(SNAPSHOT);
            std::fs::rename(&from, &to)
                .map_err(|source| TemplateError::Move { path: to.clone(), source })?;
            seal(&to).map_err(|source| TemplateError::Move { path: to, source })
        });
        let _ = hypervisor.cleanup(&vm).await;
        moved.map(|()| macs)
    }

    /// Writes the manifest into `tmp` and renames it to the key's directory; then removes
    /// older templates of the same slot, and the least recently used ones over the cap.
    fn install(
        &self,
        inputs: &TemplateInputs,
        tmp: &Path,
        macs: Vec<String>,
    ) -> Result<Template, TemplateError> {
        let key = inputs.key();
        let snapshot = tmp.join(SNAPSHOT);
        let state = snapshot.join(STATE_FILE);
        let state_bytes = std::fs::read(&state)
            .map_err(|source| TemplateError::Move { path: state.clone(), source })?;
        let memory = snapshot.join(MEMORY_FILE);
        let memory_len = std::fs::metadata(&memory)
            .map_err(|source| TemplateError::Move { path: memory.clone(), source })?
            .len();
        let manifest = Manifest {
            format: FORMAT,
            inputs: inputs.clone(),
            slot: inputs.slot(),
            state_len: state_bytes.len() as u64,
            state_sha256: hex::encode(Sha256::digest(&state_bytes)),
            memory_len,
            macs: macs.clone(),
            built_at_unix: super::now_nanos() / 1_000_000_000,
        };
        store::write_json(&tmp.join(MANIFEST), &manifest).map_err(TemplateError::Manifest)?;
        touch_last_used(tmp);
        let dir = self.dir(&key);
        let mut leases = lock(&self.disk.leases);
        // Nothing there unless a stale copy; one a restore reads stays (the rename fails).
        self.disk.remove(&mut leases, &key);
        std::fs::rename(tmp, &dir)
            .map_err(|source| TemplateError::Move { path: dir.clone(), source })?;
        self.remove_replaced(&mut leases, &key, &manifest.slot);
        self.disk.evict(&mut leases, Some(&key));
        drop(leases);
        tracing::info!(template = %key, handler = %inputs.handler, backend = %inputs.backend, "VM template built");
        Ok(Template { key, snapshot: dir.join(SNAPSHOT), macs })
    }

    /// Removes templates of `slot` other than `key` (their inputs changed).
    fn remove_replaced(&self, leases: &mut Leases, key: &str, slot: &str) {
        for (other, manifest) in self.installed() {
            if other != key && manifest.is_some_and(|m| m.slot == slot) {
                tracing::info!(template = %other, replaced_by = %key, "removing a VM template whose inputs changed");
                self.disk.remove(leases, &other);
            }
        }
    }

    /// Every template directory by key, with its manifest if readable.
    fn installed(&self) -> Vec<(String, Option<Manifest>)> {
        installed_keys(&self.root)
            .into_iter()
            .map(|key| {
                let manifest = store::read_json(&self.dir(&key).join(MANIFEST)).ok();
                (key, manifest)
            })
            .collect()
    }

    /// The start-up sweep: half-built templates (`.tmp-*`) and directories without a readable
    /// manifest of this format go, then the least recently used over `[vm] max_templates`
    /// (it may have been lowered).
    pub fn sweep(&self) {
        let Ok(entries) = std::fs::read_dir(&self.root) else { return };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let manifest: Option<Manifest> = store::read_json(&entry.path().join(MANIFEST)).ok();
            let keep = !name.starts_with('.')
                && manifest.is_some_and(|m| m.format == FORMAT && m.inputs.key() == name);
            if !keep {
                tracing::info!(path = %entry.path().display(), "removing a half-built or unreadable VM template");
                let _ = store::remove_path(&entry.path());
            }
        }
        self.disk.evict(&mut lock(&self.disk.leases), None);
    }

    /// Every template on disk and every build, for Status.
    pub fn status(&self) -> Vec<TemplateStatus> {
        let mut out: Vec<TemplateStatus> = self
            .installed()
            .into_iter()
            .map(|(key, manifest)| {
                let verdict = manifest.as_ref().map_or_else(
                    || Err("no readable manifest".to_string()),
                    |m| check(&self.dir(&key), &m.inputs).map(|_| ()),
                );
                let (handler, backend) =
                    manifest.map(|m| (m.inputs.handler, m.inputs.backend)).unwrap_or_default();
                let (state, reason) = match verdict {
                    Ok(()) => ("ready".to_string(), String::new()),
                    Err(reason) => ("corrupt".to_string(), reason),
                };
                TemplateStatus { key, handler, backend, state, reason }
            })
            .collect();
        for (key, build) in lock(&self.builds).iter() {
            if out.iter().any(|t| &t.key == key) {
                continue;
            }
            let (state, reason) = match build {
                Build::Running => ("building", String::new()),
                Build::Failed { reason, .. } => ("failed", reason.clone()),
            };
            out.push(TemplateStatus {
                key: key.clone(),
                handler: String::new(),
                backend: String::new(),
                state: state.into(),
                reason,
            });
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        out
    }
}

/// The names of the template directories under `root` (not the half-built `.tmp-*`).
fn installed_keys(root: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(root) else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| !name.starts_with('.'))
        .collect()
}

/// Records a use of the template in `dir`: one small file's mtime, set from the clock (file
/// systems stamp writes at a coarser grain).
fn touch_last_used(dir: &Path) {
    let touched = std::fs::File::options()
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join(LAST_USED))
        .and_then(|f| f.set_modified(SystemTime::now()));
    if let Err(e) = touched {
        tracing::debug!(dir = %dir.display(), error = %e, "recording a VM template's use");
    }
}

/// When the template in `dir` was last used: its `last-used` file's mtime, else its
/// manifest's (a template of an older daemon).
fn last_used(dir: &Path) -> SystemTime {
    [LAST_USED, MANIFEST]
        .iter()
        .find_map(|name| std::fs::metadata(dir.join(name)).and_then(|m| m.modified()).ok())
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

/// The template VM: the pod's VM without anything of the pod's.
fn template_spec(
    inputs: &TemplateInputs,
    key: &str,
    tmp: &Path,
    console_log_max_bytes: u64,
) -> VmSpec {
    VmSpec {
        // Pod ids are hex: a `t` prefix never meets one in the run root.
        sandbox_id: format!("t{}", &key[..15]),
        vcpus: inputs.vcpus,
        memory_mib: inputs.memory_mib,
        kernel: inputs.kernel.clone(),
        initrd: inputs.initrd.clone(),
        extra_kernel_args: inputs.kernel_args.clone(),
        console_log: tmp.join("console.log"),
        console_log_max_bytes,
        // The pod's devices, on empty directories of the template's own.
        shared_dirs: inputs
            .shares
            .iter()
            .map(|s| SharedDir {
                tag: s.tag.clone(),
                host_path: tmp.join("shares").join(&s.tag),
                read_only: s.read_only,
                cache: s.cache.clone(),
                ids: Default::default(),
            })
            .collect(),
        block_devices: Vec::new(),
        net_devices: (0..inputs.net_devices).map(|i| template_net(key, i)).collect(),
        netns: None,
        host_namespaces: Default::default(),
    }
}

/// Network device `index` of template `key`: a locally administered MAC from the key, and a
/// tap of its own that nothing is attached to (it goes with the template VM).
fn template_net(key: &str, index: usize) -> NetDevice {
    let byte = |i: usize| &key[2 * i..2 * i + 2];
    NetDevice {
        id: format!("eth{index}"),
        tap: format!("pvt{}{index}", &key[..8]),
        mac: format!("02:7e:{}:{}:{}:{:02x}", byte(0), byte(1), byte(2), index),
        tap_fd: None,
    }
}

/// Makes a snapshot root's and read-only: the VMM that wrote it ran as a jail uid.
fn seal(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let root = nix::unistd::geteuid().is_root();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if root {
            std::os::unix::fs::chown(&path, Some(0), Some(0))?;
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400))?;
    }
    if root {
        std::os::unix::fs::chown(dir, Some(0), Some(0))?;
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o500))
}

/// `Ok(None)`: no template there. `Ok(Some)`: sound and of `inputs`. `Err`: why it is not.
fn check(dir: &Path, inputs: &TemplateInputs) -> Result<Option<Manifest>, String> {
    let manifest_path = dir.join(MANIFEST);
    if !dir.exists() {
        return Ok(None);
    }
    let manifest: Manifest = store::read_json(&manifest_path).map_err(|e| e.to_string())?;
    if manifest.format != FORMAT {
        return Err(format!("manifest format {} (this daemon writes {FORMAT})", manifest.format));
    }
    if &manifest.inputs != inputs {
        return Err("its manifest's inputs differ from its key's".into());
    }
    let state_path = dir.join(SNAPSHOT).join(STATE_FILE);
    let state =
        std::fs::read(&state_path).map_err(|e| format!("reading {}: {e}", state_path.display()))?;
    if state.len() as u64 != manifest.state_len
        || hex::encode(Sha256::digest(&state)) != manifest.state_sha256
    {
        return Err(format!("{} changed since the template was built", state_path.display()));
    }
    let memory_path = dir.join(SNAPSHOT).join(MEMORY_FILE);
    let memory_len = std::fs::metadata(&memory_path)
        .map_err(|e| format!("reading {}: {e}", memory_path.display()))?
        .len();
    let expected = u64::from(inputs.memory_mib) << 20;
    if memory_len != manifest.memory_len || memory_len != expected {
        return Err(format!(
            "{} holds {memory_len} bytes, not the VM's {expected}",
            memory_path.display()
        ));
    }
    if manifest.macs.len() != inputs.net_devices {
        return Err("its MACs do not match its network devices".into());
    }
    Ok(Some(manifest))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs() -> TemplateInputs {
        TemplateInputs {
            handler: String::new(),
            backend: "builtin".into(),
            kernel: "/k".into(),
            kernel_sha256: "aa".into(),
            initrd: "/i".into(),
            initrd_sha256: "bb".into(),
            vcpus: 1,
            memory_mib: 128,
            kernel_args: String::new(),
            net_devices: 1,
            block_devices: 0,
            shares: vec![TemplateShare {
                tag: "podvisor".into(),
                read_only: true,
                cache: "always".into(),
            }],
        }
    }

    /// Every input changes the key; only contents, not size or devices, keep the slot.
    #[test]
    fn every_input_is_in_the_key() {
        let base = inputs();
        let changes: Vec<fn(&mut TemplateInputs)> = vec![
            |i| i.handler = "big".into(),
            |i| i.backend = "qemu".into(),
            |i| i.kernel_sha256 = "ab".into(),
            |i| i.initrd_sha256 = "bc".into(),
            |i| i.vcpus = 2,
            |i| i.memory_mib = 256,
            |i| i.kernel_args = "quiet".into(),
            |i| i.net_devices = 0,
            |i| i.block_devices = 1,
            |i| i.shares[0].read_only = false,
            |i| i.shares.clear(),
        ];
        for (n, change) in changes.iter().enumerate() {
            let mut other = base.clone();
            change(&mut other);
            assert_ne!(other.key(), base.key(), "change {n}");
        }
        let mut rebuilt = base.clone();
        rebuilt.initrd_sha256 = "cc".into();
        assert_eq!(rebuilt.slot(), base.slot(), "a new initramfs replaces the old template");
        assert_eq!(base.key().len(), 16);
    }

    /// A template's network devices get locally administered unicast MACs and short taps.
    #[test]
    fn template_devices_are_well_formed() {
        let key = inputs().key();
        let net = template_net(&key, 1);
        let first = u8::from_str_radix(&net.mac[..2], 16).unwrap();
        assert_eq!(first & 0b11, 0b10, "{}", net.mac);
        assert_eq!(net.mac.split(':').count(), 6);
        assert!(net.tap.len() <= 15, "{}", net.tap);
        let spec = template_spec(&inputs(), &key, Path::new("/t"), 1024);
        assert!(spec.sandbox_id.starts_with('t') && spec.sandbox_id.len() == 16);
        assert_eq!(spec.net_devices.len(), 1);
        assert_eq!(spec.shared_dirs[0].host_path, Path::new("/t/shares/podvisor"));
    }

    /// The sweep keeps sound templates and removes half-built and unreadable ones.
    #[test]
    fn the_sweep_removes_half_built_templates() {
        let dir = tempfile::tempdir().unwrap();
        let templates = Templates::new(dir.path().to_path_buf(), 4);
        let inputs = inputs();
        let key = inputs.key();
        let good = dir.path().join(&key);
        std::fs::create_dir_all(good.join(SNAPSHOT)).unwrap();
        let manifest = Manifest {
            format: FORMAT,
            inputs: inputs.clone(),
            slot: inputs.slot(),
            state_len: 0,
            state_sha256: hex::encode(Sha256::digest(b"")),
            memory_len: 128 << 20,
            macs: vec!["02:7e:00:00:00:00".into()],
            built_at_unix: 0,
        };
        store::write_json(&good.join(MANIFEST), &manifest).unwrap();
        std::fs::write(good.join(SNAPSHOT).join(STATE_FILE), b"").unwrap();
        let memory = std::fs::File::create(good.join(SNAPSHOT).join(MEMORY_FILE)).unwrap();
        memory.set_len(128 << 20).unwrap();
        std::fs::create_dir_all(dir.path().join(format!(".tmp-{key}-1234"))).unwrap();
        std::fs::create_dir_all(dir.path().join("0123456789abcdef")).unwrap();
        templates.sweep();
        let left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, vec![key.clone()]);
        assert!(
            matches!(templates.plan(&inputs), StartPlan::Restore { template, .. } if template.key == key)
        );
        assert_eq!(templates.status()[0].state, "ready");
    }

    /// Installs a template of `inputs` as a build does, with the files a backend writes.
    fn install_built(templates: &Templates, inputs: &TemplateInputs) -> String {
        let key = inputs.key();
        let tmp = templates.root.join(format!(".tmp-{key}-test"));
        let snapshot = tmp.join(SNAPSHOT);
        std::fs::create_dir_all(&snapshot).unwrap();
        std::fs::write(snapshot.join(STATE_FILE), b"PVSNAPST test state").unwrap();
        let memory = std::fs::File::create(snapshot.join(MEMORY_FILE)).unwrap();
        memory.set_len(u64::from(inputs.memory_mib) << 20).unwrap();
        let macs = (0..inputs.net_devices).map(|i| template_net(&key, i).mac).collect();
        templates.install(inputs, &tmp, macs).unwrap();
        key
    }

    /// A template of a shape of its own (every size is another slot).
    fn of_size(memory_mib: u32) -> TemplateInputs {
        TemplateInputs { memory_mib, ..inputs() }
    }

    /// The templates on disk, sorted.
    fn on_disk(templates: &Templates) -> Vec<String> {
        let mut keys = installed_keys(&templates.root);
        keys.sort();
        keys
    }

    fn sorted(mut keys: Vec<String>) -> Vec<String> {
        keys.sort();
        keys
    }

    /// A pod restores from the template of `inputs` (the lease is held as long as the result).
    fn restore(templates: &Templates, inputs: &TemplateInputs) -> RestoreLease {
        match templates.plan(inputs) {
            StartPlan::Restore { template, lease } => {
                assert_eq!(template.key, inputs.key());
                lease
            }
            other => panic!("not restored: {other:?}"),
        }
    }

    /// Over `max_templates`, installing a template removes the least recently used one: a
    /// restore counts as a use, so an older template in use outlives a newer idle one.
    #[test]
    fn installing_over_the_cap_evicts_the_least_recently_used() {
        let dir = tempfile::tempdir().unwrap();
        let templates = Templates::new(dir.path().to_path_buf(), 2);
        let a = install_built(&templates, &of_size(128));
        let b = install_built(&templates, &of_size(192));
        drop(restore(&templates, &of_size(128)));
        let c = install_built(&templates, &of_size(256));
        assert_eq!(on_disk(&templates), sorted(vec![a.clone(), c.clone()]), "b was least used");
        let d = install_built(&templates, &of_size(320));
        assert_eq!(on_disk(&templates), sorted(vec![c, d]), "then a");
        match templates.plan(&of_size(192)) {
            StartPlan::Cold { reason, build: Some(_) } => assert!(reason.contains(&b), "{reason}"),
            other => panic!("an evicted template is built again: {other:?}"),
        }
    }

    /// The order lives on disk: a restarted daemon evicts what the old one used least, and a
    /// lowered cap is applied by the start-up sweep.
    #[test]
    fn a_restarted_daemon_keeps_the_eviction_order() {
        let dir = tempfile::tempdir().unwrap();
        let before = Templates::new(dir.path().to_path_buf(), 2);
        let a = install_built(&before, &of_size(128));
        install_built(&before, &of_size(192));
        drop(restore(&before, &of_size(128)));
        drop(before);

        let after = Templates::new(dir.path().to_path_buf(), 2);
        after.sweep();
        assert_eq!(on_disk(&after).len(), 2);
        let c = install_built(&after, &of_size(256));
        assert_eq!(on_disk(&after), sorted(vec![a, c.clone()]));

        let lowered = Templates::new(dir.path().to_path_buf(), 1);
        lowered.sweep();
        assert_eq!(on_disk(&lowered), vec![c], "the most recently used is kept");
    }

    /// A template a restore reads is never removed under it: eviction skips it and a
    /// discard waits (no pod is planned onto it meanwhile); both happen once the lease goes.
    /// With the cap at its default, four shapes fit and a fifth evicts one.
    #[test]
    fn templates_in_use_are_removed_only_once_their_restores_are_done() {
        let dir = tempfile::tempdir().unwrap();
        let templates = Templates::new(dir.path().to_path_buf(), 1);
        let a = install_built(&templates, &of_size(128));
        let reading = restore(&templates, &of_size(128));
        let b = install_built(&templates, &of_size(192));
        assert_eq!(on_disk(&templates), sorted(vec![a.clone(), b.clone()]), "a is in use");
        drop(reading);
        assert_eq!(on_disk(&templates), vec![b.clone()], "evicted once its restore was done");

        let reading = restore(&templates, &of_size(192));
        templates.discard(&b);
        assert_eq!(on_disk(&templates), vec![b.clone()]);
        match templates.plan(&of_size(192)) {
            StartPlan::Cold { reason, build: None } => assert!(reason.contains("being removed")),
            other => panic!("{other:?}"),
        }
        drop(reading);
        assert!(on_disk(&templates).is_empty());
        assert!(matches!(templates.plan(&of_size(192)), StartPlan::Cold { build: Some(_), .. }));

        let dir = tempfile::tempdir().unwrap();
        let default_cap = crate::config::Config::default().vm.max_templates as usize;
        let templates = Templates::new(dir.path().to_path_buf(), default_cap);
        for n in 1..=5 {
            install_built(&templates, &of_size(64 * n));
        }
        assert_eq!(on_disk(&templates).len(), 4);
        assert!(!on_disk(&templates).contains(&of_size(64).key()), "the first went");
    }

    /// A key whose build failed cold-boots its pods without building again until
    /// [`RETRY_AFTER`] has passed; then the next pod builds it.
    #[test]
    fn a_failed_build_is_retried_only_after_a_while() {
        let dir = tempfile::tempdir().unwrap();
        let templates = Templates::new(dir.path().to_path_buf(), 4);
        let inputs = inputs();
        let key = inputs.key();
        assert!(matches!(templates.plan(&inputs), StartPlan::Cold { build: Some(_), .. }));
        let mut turn = templates.adopt_build(&key);
        turn.failed("the guest died".into());
        drop(turn);
        match templates.plan(&inputs) {
            StartPlan::Cold { reason, build: None } => {
                assert!(reason.contains("failed: the guest died"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(templates.status()[0].state, "failed");
        let Some(long_ago) = Instant::now().checked_sub(RETRY_AFTER + Duration::from_secs(1))
        else {
            return; // A host up for less than RETRY_AFTER: nothing to backdate to.
        };
        lock(&templates.builds)
            .insert(key, Build::Failed { reason: "the guest died".into(), at: long_ago });
        assert!(matches!(templates.plan(&inputs), StartPlan::Cold { build: Some(_), .. }));
    }
}
