//! Container lifecycle inside a sandbox: create/start/stop/remove, stats, and the two
//! followers each running container has on the host: its output → the I/O hub (CRI log and
//! attached clients), its exit → record.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, info, warn};

use super::io::{LogSink, OutputOffsets, ProcessIo};
use super::*;
use crate::agent::{ExitStatus, GuestDevice, NewContainer, StdioMode};
use crate::resource::{Access, BindMode};

/// How long a container may take to go after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(10);
/// Pause between a follower's attempts while the agent is unreachable.
const FOLLOW_RETRY: Duration = Duration::from_millis(500);

impl SandboxManager {
    /// CreateContainer.
    /// Resolves `image` on the blocking pool: the lookup reads the image's config and, for an
    /// image not unpacked yet, unpacks it, which must not stall an async worker.
    async fn resolve_image(&self, image: &str) -> Result<ResolvedImage> {
        let images = self.images.clone();
        let name = image.to_owned();
        tokio::task::spawn_blocking(move || images.resolve(&name))
            .await
            .map_err(|e| SandboxError::Image(format!("image lookup task failed: {e}")))?
            .map_err(SandboxError::Image)?
            .ok_or_else(|| SandboxError::ImageNotFound(image.to_owned()))
    }

    /// The image of each image volume among `mounts` (None for host paths), by mount index.
    async fn resolve_volume_images(
        &self,
        mounts: &[VolumeMount],
    ) -> Result<Vec<Option<ResolvedImage>>> {
        let mut images = Vec::with_capacity(mounts.len());
        for (index, m) in mounts.iter().enumerate() {
            let Some(volume) = &m.image else {
                images.push(None);
                continue;
            };
            let image = self.resolve_image(&volume.image).await.map_err(|e| match e {
                SandboxError::ImageNotFound(image) => {
                    SandboxError::VolumeImageNotFound { index, image }
                }
                e => e,
            })?;
            images.push(Some(image));
        }
        Ok(images)
    }

    pub async fn create_container(
        self: &Arc<Self>,
        sandbox_id: &str,
        spec: ContainerSpec,
    ) -> Result<String> {
        let arrived = std::time::Instant::now();
        let sandbox = self.sandbox(sandbox_id)?;
        let guard = self.sandbox_lock(&sandbox.id);
        let _op = guard.lock().await;
        let sandbox = self.sandbox(&sandbox.id)?;
        if sandbox.state != SandboxState::Ready {
            return Err(SandboxError::SandboxNotReady(sandbox.id));
        }
        if let Some(existing) = self
            .containers_of(&sandbox.id)
            .into_iter()
            .find(|c| c.metadata.name == spec.name && c.metadata.attempt == spec.attempt)
        {
            return Err(SandboxError::ContainerExists {
                name: spec.name,
                attempt: spec.attempt,
                sandbox: sandbox.id,
                existing: existing.id,
            });
        }
        if let Some(resources) = &spec.resources {
            self.check_fits_vm(resources, &sandbox)?;
        }
        let devices = self.allowed_devices(&spec.devices)?;
        if !spec.security.not_applicable.is_empty() {
            info!(
                container = spec.name,
                fields = ?spec.security.not_applicable,
                "accepted, not applicable inside the VM"
            );
        }
        let image = self.resolve_image(&spec.image).await?;
        let volume_images = self.resolve_volume_images(&spec.mounts).await?;
        let id = new_id();
        // Held until the record is registered: RemoveImage refuses the images meanwhile.
        let held = std::iter::once(&image).chain(volume_images.iter().flatten());
        let _images_held = self.reserve_images(&id, held.map(|i| i.id.clone()).collect())?;
        // A RemoveImage that finished between the resolve and the reservation took it.
        if self.resolve_image(&spec.image).await?.id != image.id {
            return Err(SandboxError::ImageNotFound(spec.image.clone()));
        }
        let now = self.resolve_volume_images(&spec.mounts).await?;
        let id_of = |i: &Option<ResolvedImage>| i.as_ref().map(|i| i.id.clone());
        if let Some(index) = (0..now.len()).find(|&n| id_of(&now[n]) != id_of(&volume_images[n])) {
            let image = spec.mounts[index].image.as_ref().map(|v| v.image.clone());
            return Err(SandboxError::VolumeImageNotFound {
                index,
                image: image.unwrap_or_default(),
            });
        }
        let resources = self.resources(&sandbox);
        let lower_dir = resources.bind_image(&image.id, &image.rootfs)?;
        let prepared = self.prepare_container(&id, &sandbox, &spec, &image, &volume_images);
        let (spec_json, process_json, mount_records) = match prepared {
            Ok(p) => p,
            Err(e) => {
                let _ = resources.release_volumes(&id);
                return Err(e);
            }
        };
        let log_path = (!sandbox.log_directory.is_empty() && !spec.log_path.is_empty())
            .then(|| PathBuf::from(&sandbox.log_directory).join(&spec.log_path));

        let created = match self.agent(&sandbox.id) {
            Ok(agent) => {
                agent
                    .create_container(NewContainer {
                        id: id.clone(),
                        oci_spec_json: spec_json,
                        // Always with a writable layer: the runtime creates mount points in the
                        // rootfs before `root.readonly` (set in the spec for readonly_rootfs)
                        // remounts it read-only, as runc does with containerd's snapshots.
                        lower_dirs: vec![lower_dir],
                        stdio: StdioMode {
                            stdin: spec.stdin,
                            stdin_once: spec.stdin_once,
                            tty: spec.tty,
                        },
                        join_pod_pid_namespace: sandbox.namespaces.pid == NamespaceMode::Pod,
                        privileged: spec.security.privileged,
                        devices,
                    })
                    .await
                    .map_err(SandboxError::from)
            }
            Err(e) => Err(e),
        };
        let pid = match created {
            Ok(pid) => pid,
            Err(e) => {
                let _ = resources.release_volumes(&id);
                return Err(e);
            }
        };
        let rec = ContainerRecord {
            schema_version: SCHEMA_VERSION,
            id: id.clone(),
            sandbox_id: sandbox.id.clone(),
            metadata: ContainerMetadata { name: spec.name, attempt: spec.attempt },
            image: spec.image,
            image_id: image.id.clone(),
            image_ref: image.image_ref.clone(),
            labels: spec.labels,
            annotations: spec.annotations,
            log_path,
            log_path_relative: spec.log_path,
            tty: spec.tty,
            stdin: spec.stdin,
            stdin_once: spec.stdin_once,
            mounts: mount_records,
            oci_process_json: process_json,
            created_at: now_nanos(),
            started_at: 0,
            finished_at: 0,
            exit_code: 0,
            reason: String::new(),
            message: String::new(),
            pid,
            stop_signal: image.defaults.stop_signal.as_deref().map(parse_signal).unwrap_or(0),
            resources: spec.resources,
            not_applicable: spec.security.not_applicable,
            state: ContainerState::Created,
        };
        let saved = {
            let mut st = lock(&self.state);
            st.containers.insert(id.clone(), rec.clone());
            self.save_container(&rec)
        };
        if let Err(e) = saved.done().await {
            lock(&self.state).containers.remove(&id);
            let _ = resources.release_volumes(&id);
            return Err(e.into());
        }
        self.events.emit(&id, &sandbox.id, super::events::EventKind::Created);
        crate::metrics::global().container_created(&id, arrived);
        Ok(id)
    }

    /// The guest devices of `requests`, each of which the config's allow-list must name.
    fn allowed_devices(&self, requests: &[DeviceRequest]) -> Result<Vec<GuestDevice>> {
        let allowed = &self.config.vm.allowed_devices;
        requests
            .iter()
            .enumerate()
            .map(|(index, d)| {
                if !allowed.contains(&d.path) {
                    return Err(SandboxError::DeviceNotAllowed { index, path: d.path.clone() });
                }
                Ok(GuestDevice {
                    guest_path: d.path.clone(),
                    container_path: d.container_path.clone(),
                    permissions: d.permissions.clone(),
                })
            })
            .collect()
    }

    /// Binds the container's volumes into the pod's volume share and builds its OCI spec.
    /// Returns the spec, its process (execs start from it) and the mounts' records.
    fn prepare_container(
        &self,
        id: &str,
        sandbox: &SandboxRecord,
        spec: &ContainerSpec,
        image: &ResolvedImage,
        volume_images: &[Option<ResolvedImage>],
    ) -> Result<(Vec<u8>, String, Vec<MountRecord>)> {
        let resources = self.resources(sandbox);
        let mut mount_records = Vec::new();
        let mut guest_mounts = Vec::new();
        for (n, m) in spec.mounts.iter().enumerate() {
            if let Some(volume_image) = volume_images.get(n).and_then(Option::as_ref) {
                let (guest, record) = image_volume(&resources, n, m, volume_image)?;
                guest_mounts.push(guest);
                mount_records.push(record);
                continue;
            }
            let (host, mode) = volume_bind_mode(m)?;
            let bound = resources.bind_volume(id, n, &host, mode)?;
            guest_mounts.push(spec::GuestMount {
                guest_source: bound.guest_path,
                container_path: m.container_path.clone(),
                // A read-only bind of a tree with host submounts is read-only on the host, not
                // in the guest: there the submounts are not mounts of their own (virtio-fs
                // serves one filesystem), and a guest `ro` would cover them too.
                read_only: m.read_only
                    && (m.recursive_read_only || !crate::resource::share::has_mounts_below(&host)),
                recursive_read_only: m.recursive_read_only,
                propagation: m.propagation,
                from_image: false,
            });
            mount_records.push(MountRecord {
                container_path: m.container_path.clone(),
                host_path: m.host_path.clone(),
                read_only: m.read_only,
                recursive_read_only: m.recursive_read_only,
                propagation: m.propagation,
                share_rel: bound.share_rel,
                image: String::new(),
                image_id: String::new(),
                image_sub_path: String::new(),
            });
        }
        let ctx = spec::SandboxContext {
            pid_mode: sandbox.namespaces.pid,
            user_namespace: sandbox.user_namespace.clone(),
        };
        let spec_json = spec::build_spec(spec, &image.defaults, &ctx, &guest_mounts)?;
        let process_json = spec::process_of(&spec_json)?;
        Ok((spec_json, process_json, mount_records))
    }

    /// StartContainer.
    pub async fn start_container(self: &Arc<Self>, id: &str) -> Result<()> {
        let rec = self.container(id)?;
        let guard = self.container_lock(&rec.id);
        let _op = guard.lock().await;
        let rec = self.container(&rec.id)?;
        if rec.state != ContainerState::Created {
            return Err(SandboxError::ContainerNotCreated { id: rec.id, state: rec.state });
        }
        let started = match self.agent(&rec.sandbox_id) {
            Ok(agent) => agent.start_container(&rec.id).await.map_err(SandboxError::from),
            Err(e) => Err(e),
        };
        if let Err(e) = started {
            let _ = self
                .update_container(&rec.id, |c| {
                    c.state = ContainerState::Exited;
                    c.exit_code = 128;
                    c.finished_at = now_nanos();
                    c.reason = "StartError".into();
                    c.message = e.to_string();
                })
                .await;
            return Err(e);
        }
        let rec = self
            .update_container(&rec.id, |c| {
                c.state = ContainerState::Running;
                c.started_at = now_nanos();
            })
            .await?;
        self.follow_container(&rec);
        crate::metrics::global().container_started(&rec.id);
        Ok(())
    }

    /// Starts the two followers of a running container: output → I/O hub (log file and
    /// attached clients), exit → record. Called on start and again after a daemon restart.
    pub(super) fn follow_container(self: &Arc<Self>, rec: &ContainerRecord) {
        let writer = rec.log_path.as_ref().and_then(|path| match logs::LogWriter::open(path) {
            Ok(w) => {
                let w = Arc::new(w);
                lock(&self.log_writers).insert(rec.id.clone(), w.clone());
                Some(w)
            }
            Err(e) => {
                warn!(container = %rec.id, error = %e, "cannot open container log; output is discarded");
                None
            }
        });
        let agent = match self.agent(&rec.sandbox_id) {
            Ok(agent) => agent,
            Err(e) => {
                warn!(container = %rec.id, error = %e, "cannot follow the container");
                return;
            }
        };
        let process = ProcessId::init(&rec.id);
        let io = ProcessIo::new(agent, process.clone());
        lock(&self.io).insert(process.clone(), io.clone());
        let offsets_path = self.output_offsets_path(&rec.sandbox_id, &rec.id);
        let offsets = OutputOffsets::load(&offsets_path);
        let sink = writer.map(|writer| LogSink { writer, offsets_path });
        let this = Arc::clone(self);
        let cid = rec.id.clone();
        tokio::spawn(async move {
            let followed = {
                let this = this.clone();
                let cid = cid.clone();
                move || this.container_followed(&cid)
            };
            io.pump(offsets, sink, followed).await;
            this.drop_io(&process);
        });
        let this = Arc::clone(self);
        let (sid, cid) = (rec.sandbox_id.clone(), rec.id.clone());
        tokio::spawn(async move { this.watch_exit(sid, cid).await });
    }

    /// Forgets a process's I/O hub once its output has ended.
    pub(super) fn drop_io(&self, process: &ProcessId) {
        let mut io = lock(&self.io);
        if io.get(process).is_some_and(|hub| hub.has_ended()) {
            io.remove(process);
        }
    }

    /// Whether a follower should keep retrying: the container runs in a ready sandbox.
    pub(super) fn container_followed(&self, cid: &str) -> bool {
        let st = lock(&self.state);
        st.containers.get(cid).is_some_and(|c| {
            c.state == ContainerState::Running
                && st.sandboxes.get(&c.sandbox_id).is_some_and(|s| s.state == SandboxState::Ready)
        })
    }

    /// Where the offsets of `cid`'s output already in its log are kept, so a restarted daemon
    /// resumes without losing or repeating output.
    fn output_offsets_path(&self, sid: &str, cid: &str) -> PathBuf {
        self.sandbox_state_dir(sid).join(format!("output-{cid}.offsets"))
    }

    async fn watch_exit(self: Arc<Self>, sid: String, cid: String) {
        let process = ProcessId::init(&cid);
        loop {
            let waited = match self.agent(&sid) {
                Ok(agent) => agent.wait(&process).await.map_err(SandboxError::from),
                Err(e) => Err(e),
            };
            match waited {
                Ok(status) => {
                    self.record_exit(&cid, status).await;
                    return;
                }
                Err(SandboxError::Agent(e)) if e.is_not_found() => return,
                Err(e) => debug!(container = %cid, error = %e, "waiting for container exit"),
            }
            tokio::time::sleep(FOLLOW_RETRY).await;
            if !self.container_followed(&cid) {
                return;
            }
        }
    }

    async fn record_exit(&self, cid: &str, status: ExitStatus) {
        let res = self
            .update_container(cid, |c| {
                if c.state == ContainerState::Exited {
                    return;
                }
                c.state = ContainerState::Exited;
                c.exit_code = status.exit_code;
                // The host's clock, not the guest's: the guest may have no RTC, and the exit is
                // observed as it happens (the wait is a blocking stream).
                c.finished_at = now_nanos();
                c.reason = match (status.oom_killed, status.exit_code) {
                    (true, _) => "OOMKilled",
                    (false, 0) => "Completed",
                    (false, _) => "Error",
                }
                .into();
            })
            .await;
        if let Err(e) = res {
            debug!(container = %cid, error = %e, "recording exit");
        }
    }

    /// StopContainer: the stop signal, then SIGKILL after `timeout`. Idempotent.
    pub async fn stop_container(&self, id: &str, timeout_seconds: i64) -> Result<()> {
        let rec = match self.container(id) {
            Ok(rec) => rec,
            Err(SandboxError::ContainerNotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        let guard = self.container_lock(&rec.id);
        let _op = guard.lock().await;
        let rec = self.container(&rec.id)?;
        if rec.state != ContainerState::Running {
            return Ok(());
        }
        let agent = self.agent(&rec.sandbox_id)?;
        let process = ProcessId::init(&rec.id);
        if timeout_seconds > 0 {
            let signal = if rec.stop_signal > 0 { rec.stop_signal } else { libc::SIGTERM };
            agent.signal(&process, signal, false).await?;
            let grace = Duration::from_secs(timeout_seconds.unsigned_abs());
            if let Ok(Ok(status)) = tokio::time::timeout(grace, agent.wait(&process)).await {
                self.record_exit(&rec.id, status).await;
                return Ok(());
            }
        }
        agent.signal(&process, libc::SIGKILL, true).await?;
        match tokio::time::timeout(KILL_WAIT, agent.wait(&process)).await {
            Ok(Ok(status)) => {
                self.record_exit(&rec.id, status).await;
                Ok(())
            }
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(SandboxError::KillTimeout(rec.id)),
        }
    }

    /// RemoveContainer: kills it if it runs, then removes it everywhere. Idempotent.
    pub async fn remove_container(&self, id: &str) -> Result<()> {
        let rec = match self.container(id) {
            Ok(rec) => rec,
            Err(SandboxError::ContainerNotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        if rec.state == ContainerState::Running {
            self.stop_container(&rec.id, 0).await?;
        }
        let guard = self.container_lock(&rec.id);
        let _op = guard.lock().await;
        if let Some(sandbox) = self.sandbox(&rec.sandbox_id).ok().filter(|s| s.vm.is_some()) {
            self.agent(&sandbox.id)?.remove_container(&rec.id).await?;
            self.resources(&sandbox).release_volumes(&rec.id)?;
        }
        let (last, removed) = {
            let mut st = lock(&self.state);
            let last = st.containers.remove(&rec.id);
            let removed = self.remove_record(&self.container_record_path(&rec.sandbox_id, &rec.id));
            drop(st);
            (last, removed)
        };
        removed.done().await?;
        let _ = std::fs::remove_file(self.output_offsets_path(&rec.sandbox_id, &rec.id));
        lock(&self.log_writers).remove(&rec.id);
        lock(&self.io).remove(&ProcessId::init(&rec.id));
        self.cpu_samples.forget(&rec.id);
        crate::metrics::global().container_removed(&rec.id);
        drop(_op);
        lock(&self.container_locks).remove(&rec.id);
        let last = super::events::LastRecords {
            sandbox: self.sandbox(&rec.sandbox_id).ok(),
            containers: last.into_iter().collect(),
        };
        self.events.emit_deleted(&rec.id, &rec.sandbox_id, last);
        Ok(())
    }

    /// ReopenContainerLog.
    pub fn reopen_container_log(&self, id: &str) -> Result<()> {
        let rec = self.container(id)?;
        if rec.state != ContainerState::Running {
            return Err(SandboxError::ContainerNotRunning(rec.id));
        }
        let writer = lock(&self.log_writers).get(&rec.id).cloned();
        match writer {
            Some(w) => Ok(w.reopen()?),
            None => Ok(()),
        }
    }

    /// UpdateContainerResources: new cgroup limits for a created or running container.
    pub async fn update_container_resources(&self, id: &str, resources: Resources) -> Result<()> {
        let rec = self.container(id)?;
        let guard = self.container_lock(&rec.id);
        let _op = guard.lock().await;
        let rec = self.container(&rec.id)?;
        if rec.state == ContainerState::Exited {
            return Err(SandboxError::ContainerNotRunning(rec.id));
        }
        self.check_fits_vm(&resources, &self.sandbox(&rec.sandbox_id)?)?;
        let json = spec::resources_json(&resources)?;
        self.agent(&rec.sandbox_id)?.update_container(&rec.id, json).await?;
        self.update_container(&rec.id, |c| c.resources = Some(resources)).await?;
        Ok(())
    }

    /// A memory limit above the VM's memory would never be reached: the VM would run out
    /// first, and its OOM killer pick any process. Refuse it.
    fn check_fits_vm(&self, resources: &Resources, sandbox: &SandboxRecord) -> Result<()> {
        // A host pod has no VM to outgrow.
        if sandbox.vm.as_ref().is_some_and(|vm| vm.backend == crate::hypervisor::host::NAME) {
            return Ok(());
        }
        let vm_mib = sandbox.vm_size.map_or(self.config.vm.memory_mib, |s| s.memory_mib);
        if resources.memory_limit_bytes > i64::from(vm_mib) * 1024 * 1024 {
            return Err(SandboxError::LimitExceedsVm {
                limit: resources.memory_limit_bytes,
                vm_mib,
            });
        }
        Ok(())
    }
}

/// Parses an image's StopSignal (`SIGTERM`, `TERM` or `15`); unknown names and numbers that
/// are no signal give 0 (the default), so every graceful stop does not fail on them.
pub fn parse_signal(name: &str) -> i32 {
    let name = name.trim();
    if let Ok(n) = name.parse::<i32>() {
        return if (1..=libc::SIGRTMAX()).contains(&n) { n } else { 0 };
    }
    let upper = name.to_ascii_uppercase();
    let full = if upper.starts_with("SIG") { upper } else { format!("SIG{upper}") };
    full.parse::<nix::sys::signal::Signal>().map(|s| s as i32).unwrap_or(0)
}

/// Image volume `index` (mount `m` of image `image`): the image's tree, bound into the image
/// share as a root filesystem would be, mounted read-only at `m.container_path`.
fn image_volume(
    resources: &crate::resource::PodResources,
    index: usize,
    m: &VolumeMount,
    image: &ResolvedImage,
) -> Result<(spec::GuestMount, MountRecord)> {
    let sub_path = m.image.as_ref().map(|v| v.sub_path.as_str()).unwrap_or_default();
    let inside = image_sub_dir(&image.rootfs, index, sub_path)?;
    let rel = resources.bind_image(&image.id, &image.rootfs)?;
    let mut guest_source = std::path::Path::new(crate::agent::GUEST_SHARED_DIR).join(rel);
    if !inside.as_os_str().is_empty() {
        guest_source.push(inside);
    }
    let guest = spec::GuestMount {
        guest_source,
        container_path: m.container_path.clone(),
        read_only: true,
        recursive_read_only: m.recursive_read_only,
        propagation: super::Propagation::Private,
        from_image: true,
    };
    let record = MountRecord {
        container_path: m.container_path.clone(),
        host_path: String::new(),
        read_only: true,
        recursive_read_only: m.recursive_read_only,
        propagation: super::Propagation::Private,
        share_rel: String::new(),
        image: m.image.as_ref().map(|v| v.image.clone()).unwrap_or_default(),
        image_id: image.id.clone(),
        image_sub_path: sub_path.to_string(),
    };
    Ok((guest, record))
}

/// `sub_path` of the image tree at `root`, with its symlinks resolved, relative to the root:
/// what the guest binds (so it follows no link of its own). A path that leaves the tree,
/// also through a symlink, is refused; the tree is immutable, so what is checked here is what
/// the guest mounts.
fn image_sub_dir(root: &std::path::Path, index: usize, sub_path: &str) -> Result<PathBuf> {
    let refuse = |why| SandboxError::ImageSubPath { index, path: sub_path.to_string(), why };
    let root = std::fs::canonicalize(root)
        .map_err(|e| SandboxError::Image(format!("image tree {}: {e}", root.display())))?;
    let full = std::fs::canonicalize(root.join(sub_path))
        .map_err(|_| refuse("does not exist in the image"))?;
    let inside = full.strip_prefix(&root).map_err(|_| refuse("leaves the image's tree"))?;
    // As containerd: a directory (kubelet's subPath of an image volume is one).
    if !full.is_dir() {
        return Err(refuse("is not a directory in the image"));
    }
    Ok(inside.to_path_buf())
}

/// The host path a volume binds (symlinks resolved on the host, as runc does) and how.
fn volume_bind_mode(m: &super::VolumeMount) -> Result<(std::path::PathBuf, BindMode)> {
    let host = std::fs::canonicalize(&m.host_path)
        .map_err(|_| SandboxError::MountSourceMissing(m.host_path.clone()))?;
    let receive_host_mounts = m.propagation != super::Propagation::Private;
    if receive_host_mounts && !crate::resource::share::mount_propagates(&host) {
        return Err(SandboxError::MountSourceNotShared {
            path: m.host_path.clone(),
            propagation: m.propagation,
        });
    }
    let access = match (m.read_only, m.recursive_read_only) {
        (false, _) => Access::ReadWrite,
        (true, false) => Access::ReadOnly,
        (true, true) => Access::RecursiveReadOnly,
    };
    Ok((host, BindMode { access, receive_host_mounts }))
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn stop_signals_parse() {
        assert_eq!(parse_signal("SIGQUIT"), libc::SIGQUIT);
        assert_eq!(parse_signal("int"), libc::SIGINT);
        assert_eq!(parse_signal("9"), 9);
        assert_eq!(parse_signal("bogus"), 0);
        // Not a signal: the default, not a stop that always fails.
        assert_eq!(parse_signal("999"), 0);
        assert_eq!(parse_signal("-1"), 0);
        assert_eq!(parse_signal("0"), 0);
    }
}
