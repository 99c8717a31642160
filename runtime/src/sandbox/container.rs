//! Container lifecycle inside a sandbox: create/start/stop/remove, exec, and the two
//! followers each running container has on the host: its output → CRI log, its exit → record.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_cri::v1 as cri;
use podvisor_proto::agent as pb;
use tracing::{debug, warn};

use super::*;

/// The agent connection timeout for calls on an already-running sandbox.
const AGENT_TIMEOUT: Duration = Duration::from_secs(10);
/// ExecSync keeps at most this much of each output stream (gRPC's default message limit).
const EXEC_OUTPUT_LIMIT: usize = 8 * 1024 * 1024;

/// CreateContainer's input, validated by the CRI layer.
pub struct ContainerRequest {
    pub sandbox_id: String,
    pub config: cri::ContainerConfig,
}

/// What ExecSync returns.
pub struct ExecOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exit_code: i32,
}

impl SandboxManager {
    /// CreateContainer.
    pub async fn create_container(self: &Arc<Self>, req: ContainerRequest) -> Result<String> {
        let sandbox = self.sandbox(&req.sandbox_id)?;
        let guard = self.sandbox_lock(&sandbox.id);
        let _op = guard.lock().await;
        let sandbox = self.sandbox(&sandbox.id)?;
        if sandbox.state != SandboxState::Ready {
            return Err(SandboxError::FailedPrecondition(format!(
                "pod sandbox {} is not ready",
                sandbox.id
            )));
        }
        let meta = req.config.metadata.clone().unwrap_or_default();
        if meta.name.is_empty() {
            return Err(SandboxError::InvalidArgument(
                "container metadata.name is required".into(),
            ));
        }
        if let Some(existing) = self.list_containers().into_iter().find(|c| {
            c.sandbox_id == sandbox.id
                && c.metadata.name == meta.name
                && c.metadata.attempt == meta.attempt
        }) {
            return Err(SandboxError::AlreadyExists(format!(
                "container {} attempt {} already exists in pod sandbox {} as {}",
                meta.name, meta.attempt, sandbox.id, existing.id
            )));
        }
        let image_name = req.config.image.as_ref().map(|i| i.image.clone()).unwrap_or_default();
        if image_name.is_empty() {
            return Err(SandboxError::InvalidArgument("container image is required".into()));
        }
        let image =
            self.images.resolve(&image_name).map_err(SandboxError::Image)?.ok_or_else(|| {
                SandboxError::NotFound(format!("image {image_name:?} not found: pull it first"))
            })?;

        let id = new_id();
        let share = self.share(&sandbox.id);
        let image_rel = format!("images/{}", image.id.trim_start_matches("sha256:"));
        share.bind(&image.rootfs, &image_rel, true)?;

        // Host-path mounts (volumes) reach the guest through the same share.
        let mut mount_records = Vec::new();
        let mut guest_mounts = Vec::new();
        for (n, m) in req.config.mounts.iter().enumerate() {
            if m.container_path.is_empty() || m.host_path.is_empty() {
                return Err(SandboxError::InvalidArgument(format!(
                    "mount {n} needs container_path and host_path"
                )));
            }
            let host = std::path::Path::new(&m.host_path);
            if !host.exists() {
                return Err(SandboxError::InvalidArgument(format!(
                    "mount source {} does not exist",
                    m.host_path
                )));
            }
            let rel = format!("volumes/{id}/{n}");
            let bound = match share.bind(host, &rel, m.readonly) {
                Ok(b) => b,
                Err(e) => {
                    let _ = share.unbind(&format!("volumes/{id}"));
                    return Err(e.into());
                }
            };
            guest_mounts.push(spec::GuestMount {
                guest_source: guest_shared_path(&bound),
                container_path: m.container_path.clone(),
                read_only: m.readonly,
            });
            mount_records.push(MountRecord {
                container_path: m.container_path.clone(),
                host_path: m.host_path.clone(),
                read_only: m.readonly,
                share_rel: rel,
            });
        }

        let ctx = spec::SandboxContext { pid_mode: sandbox.pid_mode };
        let spec_json = match spec::build_spec(&req.config, &image.defaults, &ctx, &guest_mounts) {
            Ok(s) => s,
            Err(e) => {
                let _ = share.unbind(&format!("volumes/{id}"));
                return Err(e.into());
            }
        };
        let process_json = serde_json::from_slice::<serde_json::Value>(&spec_json)
            .ok()
            .and_then(|v| v.get("process").map(|p| p.to_string()))
            .unwrap_or_default();
        let log_path = (!sandbox.log_directory.is_empty() && !req.config.log_path.is_empty())
            .then(|| PathBuf::from(&sandbox.log_directory).join(&req.config.log_path));

        let mut agent = self.agent(&sandbox.id, AGENT_TIMEOUT).await?;
        let created = agent
            .create_container(pb::CreateContainerRequest {
                container_id: id.clone(),
                oci_spec_json: spec_json,
                join_pod_pid_namespace: sandbox.pid_mode == cri::NamespaceMode::Pod as i32,
                // Always with a writable layer: the runtime creates mount points in the rootfs
                // before `root.readonly` (set in the spec for readonly_rootfs) remounts it
                // read-only, as runc does with containerd's snapshots.
                rootfs: Some(pb::Rootfs { lower_dirs: vec![image_rel], read_only: false }),
                stdio: Some(pb::StdioConfig {
                    stdin: req.config.stdin,
                    stdin_once: req.config.stdin_once,
                    tty: req.config.tty,
                }),
            })
            .await;
        let pid = match created {
            Ok(resp) => resp.into_inner().pid,
            Err(status) => {
                let _ = share.unbind(&format!("volumes/{id}"));
                return Err(SandboxError::Agent { call: "CreateContainer", status });
            }
        };
        let rec = ContainerRecord {
            id: id.clone(),
            sandbox_id: sandbox.id.clone(),
            metadata: ContainerMetadata { name: meta.name, attempt: meta.attempt },
            image: image_name,
            image_id: image.id.clone(),
            image_ref: image.image_ref.clone(),
            labels: req.config.labels.clone(),
            annotations: req.config.annotations.clone(),
            log_path,
            log_path_relative: req.config.log_path.clone(),
            tty: req.config.tty,
            stdin: req.config.stdin,
            stdin_once: req.config.stdin_once,
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
            state: ContainerState::Created,
        };
        {
            let mut st = lock(&self.state);
            self.save_container(&rec)?;
            st.containers.insert(id.clone(), rec);
        }
        Ok(id)
    }

    /// StartContainer.
    pub async fn start_container(self: &Arc<Self>, id: &str) -> Result<()> {
        let rec = self.container(id)?;
        let guard = self.container_lock(&rec.id);
        let _op = guard.lock().await;
        let rec = self.container(&rec.id)?;
        if rec.state != ContainerState::Created {
            return Err(SandboxError::FailedPrecondition(format!(
                "container {} is {:?}, not created",
                rec.id, rec.state
            )));
        }
        let mut agent = self.agent(&rec.sandbox_id, AGENT_TIMEOUT).await?;
        if let Err(status) =
            agent.start_container(pb::ContainerRef { container_id: rec.id.clone() }).await
        {
            let _ = self.update_container(&rec.id, |c| {
                c.state = ContainerState::Exited;
                c.exit_code = 128;
                c.finished_at = now_nanos();
                c.reason = "StartError".into();
                c.message = status.message().to_string();
            });
            return Err(SandboxError::Agent { call: "StartContainer", status });
        }
        let rec = self.update_container(&rec.id, |c| {
            c.state = ContainerState::Running;
            c.started_at = now_nanos();
        })?;
        self.follow_container(&rec);
        Ok(())
    }

    /// Starts the two followers of a running container: output → log file, exit → record.
    /// Called on start and again after a daemon restart.
    pub(super) fn follow_container(self: &Arc<Self>, rec: &ContainerRecord) {
        let writer = match &rec.log_path {
            Some(path) => match logs::LogWriter::open(path) {
                Ok(w) => {
                    let w = Arc::new(w);
                    lock(&self.log_writers).insert(rec.id.clone(), w.clone());
                    Some(w)
                }
                Err(e) => {
                    warn!(container = %rec.id, error = %e, "cannot open container log; output is discarded");
                    None
                }
            },
            None => None,
        };
        let this = Arc::clone(self);
        let (sid, cid) = (rec.sandbox_id.clone(), rec.id.clone());
        tokio::spawn(async move { this.forward_output(sid, cid, writer).await });
        let this = Arc::clone(self);
        let (sid, cid) = (rec.sandbox_id.clone(), rec.id.clone());
        tokio::spawn(async move { this.watch_exit(sid, cid).await });
    }

    /// Whether a follower should keep retrying: the container runs in a ready sandbox.
    fn container_followed(&self, cid: &str) -> bool {
        let st = lock(&self.state);
        st.containers.get(cid).is_some_and(|c| {
            c.state == ContainerState::Running
                && st.sandboxes.get(&c.sandbox_id).is_some_and(|s| s.state == SandboxState::Ready)
        })
    }

    /// Where the offsets of `cid`'s output already in its log are kept (see
    /// [`OutputOffsets`]), so a restarted daemon resumes without losing or repeating output.
    fn output_offsets_path(&self, sid: &str, cid: &str) -> PathBuf {
        self.sandbox_state_dir(sid).join(format!("output-{cid}.offsets"))
    }

    async fn forward_output(
        self: Arc<Self>,
        sid: String,
        cid: String,
        writer: Option<Arc<logs::LogWriter>>,
    ) {
        let offsets_path = self.output_offsets_path(&sid, &cid);
        let mut offsets = OutputOffsets::load(&offsets_path);
        loop {
            let stream = match self.agent(&sid, AGENT_TIMEOUT).await {
                Ok(mut agent) => {
                    // What the log already holds: the agent resends anything after it that a
                    // broken stream may have swallowed.
                    let written = offsets.written(writer.as_deref());
                    agent
                        .read_output(pb::ReadOutputRequest {
                            process: Some(pb::ProcessRef {
                                container_id: cid.clone(),
                                exec_id: String::new(),
                            }),
                            stdout_offset: written[0],
                            stderr_offset: written[1],
                        })
                        .await
                }
                Err(e) => Err(tonic::Status::unavailable(e.to_string())),
            };
            match stream {
                Ok(resp) => {
                    // Resent bytes of the unfinished lines the writer still holds count as
                    // received already: `accept` drops them.
                    let mut stream = resp.into_inner();
                    loop {
                        match stream.message().await {
                            Ok(Some(chunk)) => {
                                let Some((slot, data)) = offsets.accept(&cid, &chunk) else {
                                    continue;
                                };
                                if let Some(w) = &writer {
                                    if let Err(e) = w.write_chunk(slot, data) {
                                        warn!(container = %cid, error = %e, "writing container log");
                                    }
                                }
                                offsets.save(&offsets_path, writer.as_deref());
                            }
                            Ok(None) => {
                                if let Some(w) = &writer {
                                    let _ = w.flush_partial();
                                }
                                offsets.save(&offsets_path, writer.as_deref());
                                return;
                            }
                            Err(status) => {
                                debug!(container = %cid, %status, "output stream broke");
                                break;
                            }
                        }
                    }
                }
                Err(status) if status.code() == tonic::Code::NotFound => return,
                Err(status) => debug!(container = %cid, %status, "cannot read output yet"),
            }
            // The stream broke (agent restarting, VM stopping): retry while the container runs.
            // A lone `Exited` state could still have unread output, but the VM is going away then.
            tokio::time::sleep(Duration::from_millis(500)).await;
            if !self.container_followed(&cid) {
                return;
            }
        }
    }

    async fn watch_exit(self: Arc<Self>, sid: String, cid: String) {
        loop {
            let waited = match self.agent(&sid, AGENT_TIMEOUT).await {
                Ok(mut agent) => {
                    agent
                        .wait_process(pb::ProcessRef {
                            container_id: cid.clone(),
                            exec_id: String::new(),
                        })
                        .await
                }
                Err(e) => Err(tonic::Status::unavailable(e.to_string())),
            };
            match waited {
                Ok(resp) => {
                    self.record_exit(&cid, &resp.into_inner());
                    return;
                }
                Err(status) if status.code() == tonic::Code::NotFound => return,
                Err(status) => debug!(container = %cid, %status, "waiting for container exit"),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            if !self.container_followed(&cid) {
                return;
            }
        }
    }

    fn record_exit(&self, cid: &str, w: &pb::WaitProcessResponse) {
        let res = self.update_container(cid, |c| {
            if c.state == ContainerState::Exited {
                return;
            }
            c.state = ContainerState::Exited;
            c.exit_code = w.exit_code;
            // The host's clock, not the guest's: the guest may have no RTC, and the exit is
            // observed as it happens (the wait is a blocking stream).
            c.finished_at = now_nanos();
            c.reason = if w.exit_code == 0 { "Completed" } else { "Error" }.into();
        });
        if let Err(e) = res {
            debug!(container = %cid, error = %e, "recording exit");
        }
    }

    /// StopContainer: the stop signal, then SIGKILL after `timeout_seconds`. Idempotent.
    pub async fn stop_container(&self, id: &str, timeout_seconds: i64) -> Result<()> {
        let rec = match self.container(id) {
            Ok(rec) => rec,
            Err(SandboxError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        let guard = self.container_lock(&rec.id);
        let _op = guard.lock().await;
        let rec = self.container(&rec.id)?;
        if rec.state != ContainerState::Running {
            return Ok(());
        }
        let mut agent = self.agent(&rec.sandbox_id, AGENT_TIMEOUT).await?;
        let process = pb::ProcessRef { container_id: rec.id.clone(), exec_id: String::new() };
        if timeout_seconds > 0 {
            let signal = if rec.stop_signal > 0 { rec.stop_signal } else { libc::SIGTERM };
            agent
                .signal_process(pb::SignalProcessRequest {
                    process: Some(process.clone()),
                    signal,
                    all: false,
                })
                .await
                .map_err(|status| SandboxError::Agent { call: "SignalProcess", status })?;
            let wait = agent.wait_process(process.clone());
            if let Ok(Ok(resp)) =
                tokio::time::timeout(Duration::from_secs(timeout_seconds as u64), wait).await
            {
                self.record_exit(&rec.id, &resp.into_inner());
                return Ok(());
            }
        }
        agent
            .signal_process(pb::SignalProcessRequest {
                process: Some(process.clone()),
                signal: libc::SIGKILL,
                all: true,
            })
            .await
            .map_err(|status| SandboxError::Agent { call: "SignalProcess", status })?;
        match tokio::time::timeout(Duration::from_secs(10), agent.wait_process(process)).await {
            Ok(Ok(resp)) => {
                self.record_exit(&rec.id, &resp.into_inner());
                Ok(())
            }
            Ok(Err(status)) => Err(SandboxError::Agent { call: "WaitProcess", status }),
            Err(_) => Err(SandboxError::DeadlineExceeded(format!(
                "container {} did not exit after SIGKILL",
                rec.id
            ))),
        }
    }

    /// RemoveContainer: kills it if it runs, then removes it everywhere. Idempotent.
    pub async fn remove_container(&self, id: &str) -> Result<()> {
        let rec = match self.container(id) {
            Ok(rec) => rec,
            Err(SandboxError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        if rec.state == ContainerState::Running {
            self.stop_container(&rec.id, 0).await?;
        }
        let guard = self.container_lock(&rec.id);
        let _op = guard.lock().await;
        let sandbox_up = self.sandbox(&rec.sandbox_id).is_ok_and(|s| s.vm.is_some());
        if sandbox_up {
            let mut agent = self.agent(&rec.sandbox_id, AGENT_TIMEOUT).await?;
            agent
                .remove_container(pb::RemoveContainerRequest { container_id: rec.id.clone() })
                .await
                .map_err(|status| SandboxError::Agent { call: "RemoveContainer", status })?;
            self.share(&rec.sandbox_id).unbind(&format!("volumes/{}", rec.id))?;
        }
        {
            let mut st = lock(&self.state);
            st.containers.remove(&rec.id);
            store::remove_path(&self.container_record_path(&rec.sandbox_id, &rec.id))?;
        }
        let _ = std::fs::remove_file(self.output_offsets_path(&rec.sandbox_id, &rec.id));
        lock(&self.log_writers).remove(&rec.id);
        drop(_op);
        lock(&self.container_locks).remove(&rec.id);
        Ok(())
    }

    /// ExecSync: runs `cmd` in the container and returns its output and exit code.
    /// `timeout_seconds` 0 means no timeout.
    pub async fn exec_sync(
        &self,
        id: &str,
        cmd: Vec<String>,
        timeout_seconds: i64,
    ) -> Result<ExecOutput> {
        let rec = self.container(id)?;
        if rec.state != ContainerState::Running {
            return Err(SandboxError::FailedPrecondition(format!(
                "container {} is not running",
                rec.id
            )));
        }
        if cmd.is_empty() {
            return Err(SandboxError::InvalidArgument("exec needs a command".into()));
        }
        let mut process: serde_json::Value = serde_json::from_str(&rec.oci_process_json)
            .unwrap_or_else(|_| serde_json::json!({"cwd": "/"}));
        process["args"] = serde_json::json!(cmd);
        process["terminal"] = serde_json::json!(false);
        let exec_id = uuid::Uuid::new_v4().simple().to_string();
        let pref = pb::ProcessRef { container_id: rec.id.clone(), exec_id: exec_id.clone() };
        let mut agent = self.agent(&rec.sandbox_id, AGENT_TIMEOUT).await?;
        agent
            .exec_process(pb::ExecProcessRequest {
                container_id: rec.id.clone(),
                exec_id: exec_id.clone(),
                oci_process_json: process.to_string().into_bytes(),
                stdio: Some(pb::StdioConfig { stdin: false, stdin_once: false, tty: false }),
            })
            .await
            .map_err(|status| SandboxError::Agent { call: "ExecProcess", status })?;

        let run = {
            let mut agent = agent.clone();
            let pref = pref.clone();
            async move {
                let mut out = ExecOutput { stdout: Vec::new(), stderr: Vec::new(), exit_code: 0 };
                let mut stream = agent
                    .read_output(pb::ReadOutputRequest {
                        process: Some(pref.clone()),
                        ..Default::default()
                    })
                    .await
                    .map_err(|status| SandboxError::Agent { call: "ReadOutput", status })?
                    .into_inner();
                while let Some(chunk) = stream
                    .message()
                    .await
                    .map_err(|status| SandboxError::Agent { call: "ReadOutput", status })?
                {
                    let buf = if chunk.stream == pb::OutputStream::Stderr as i32 {
                        &mut out.stderr
                    } else {
                        &mut out.stdout
                    };
                    let room = EXEC_OUTPUT_LIMIT.saturating_sub(buf.len());
                    buf.extend_from_slice(&chunk.data[..chunk.data.len().min(room)]);
                }
                let status = agent
                    .wait_process(pref)
                    .await
                    .map_err(|status| SandboxError::Agent { call: "WaitProcess", status })?
                    .into_inner();
                out.exit_code = status.exit_code;
                Ok::<_, SandboxError>(out)
            }
        };
        if timeout_seconds <= 0 {
            return run.await;
        }
        match tokio::time::timeout(Duration::from_secs(timeout_seconds as u64), run).await {
            Ok(res) => res,
            Err(_) => {
                let _ = agent
                    .signal_process(pb::SignalProcessRequest {
                        process: Some(pref),
                        signal: libc::SIGKILL,
                        all: false,
                    })
                    .await;
                Err(SandboxError::DeadlineExceeded(format!(
                    "command {cmd:?} timed out after {timeout_seconds}s"
                )))
            }
        }
    }

    /// ReopenContainerLog.
    pub fn reopen_container_log(&self, id: &str) -> Result<()> {
        let rec = self.container(id)?;
        if rec.state != ContainerState::Running {
            return Err(SandboxError::FailedPrecondition(format!(
                "container {} is not running",
                rec.id
            )));
        }
        let writer = lock(&self.log_writers).get(&rec.id).cloned();
        match writer {
            Some(w) => Ok(w.reopen()?),
            None => Ok(()),
        }
    }

    /// Container statistics from the guest's cgroups.
    pub async fn container_stats(&self, id: &str) -> Result<pb::ContainerStatsResponse> {
        let rec = self.container(id)?;
        let mut agent = self.agent(&rec.sandbox_id, AGENT_TIMEOUT).await?;
        Ok(agent
            .container_stats(pb::ContainerRef { container_id: rec.id })
            .await
            .map_err(|status| SandboxError::Agent { call: "ContainerStats", status })?
            .into_inner())
    }

    /// The labels filter of List* calls: every selector pair must match.
    pub fn labels_match(
        labels: &HashMap<String, String>,
        selector: &HashMap<String, String>,
    ) -> bool {
        selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// Parses an image's StopSignal (`SIGTERM`, `TERM` or `15`); unknown names give 0 (default).
pub fn parse_signal(name: &str) -> i32 {
    let name = name.trim();
    if let Ok(n) = name.parse::<i32>() {
        return n;
    }
    let upper = name.to_ascii_uppercase();
    let full = if upper.starts_with("SIG") { upper } else { format!("SIG{upper}") };
    full.parse::<nix::sys::signal::Signal>().map(|s| s as i32).unwrap_or(0)
}

/// How far a container's output has come, per stream (stdout, stderr): `received` is the
/// offset just past the last byte taken from the agent. The persisted figure is what reached
/// the log file (received minus the unfinished line the writer holds back), so after a
/// restart the agent resends exactly the rest.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct OutputOffsets {
    received: [u64; 2],
}

impl OutputOffsets {
    /// The saved offsets, or zeros (a first reader) when there are none.
    fn load(path: &Path) -> Self {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let mut fields = text.split_whitespace().map(|f| f.parse::<u64>().ok());
        match (fields.next().flatten(), fields.next().flatten()) {
            (Some(stdout), Some(stderr)) => Self { received: [stdout, stderr] },
            _ => Self::default(),
        }
    }

    /// Bytes of each stream that are in the log file.
    fn written(&self, writer: Option<&logs::LogWriter>) -> [u64; 2] {
        let held = |slot: usize| writer.map_or(0, |w| w.pending_len(slot) as u64);
        [self.received[0].saturating_sub(held(0)), self.received[1].saturating_sub(held(1))]
    }

    /// The part of `chunk` not seen yet, with its stream slot; records it as received.
    fn accept<'a>(&mut self, cid: &str, chunk: &'a pb::OutputChunk) -> Option<(usize, &'a [u8])> {
        let slot = usize::from(chunk.stream == pb::OutputStream::Stderr as i32);
        let have = self.received[slot];
        let end = chunk.offset + chunk.data.len() as u64;
        if end <= have {
            return None;
        }
        if chunk.offset > have {
            warn!(
                container = %cid,
                lost_bytes = chunk.offset - have,
                "container output was lost before reaching the log (older than the agent keeps)"
            );
        }
        let skip = have.saturating_sub(chunk.offset) as usize;
        self.received[slot] = end;
        Some((slot, &chunk.data[skip..]))
    }

    fn save(&self, path: &Path, writer: Option<&logs::LogWriter>) {
        let written = self.written(writer);
        // Atomic (a daemon killed mid-write must not leave an empty file, which would replay
        // the whole window), not durable (runtime state). Best effort: without it a restart
        // repeats up to the agent's replay window.
        let text = format!("{} {}\n", written[0], written[1]);
        let _ = store::write_atomic(path, text.as_bytes(), false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(stream: pb::OutputStream, offset: u64, data: &[u8]) -> pb::OutputChunk {
        pb::OutputChunk { stream: stream as i32, data: data.to_vec(), offset }
    }

    #[test]
    fn output_offsets_drop_repeats_trim_overlaps_and_pass_gaps() {
        use pb::OutputStream::{Stderr, Stdout};
        let mut o = OutputOffsets::default();
        assert_eq!(o.accept("c", &chunk(Stdout, 0, b"hello ")), Some((0, &b"hello "[..])));
        assert_eq!(o.accept("c", &chunk(Stderr, 0, b"err")), Some((1, &b"err"[..])));
        // Resent after a broken stream: what we have is dropped, the rest kept.
        assert_eq!(o.accept("c", &chunk(Stdout, 0, b"hello ")), None);
        assert_eq!(o.accept("c", &chunk(Stdout, 3, b"lo world")), Some((0, &b"world"[..])));
        // Older than the agent keeps: a gap, logged, and the output goes on.
        assert_eq!(o.accept("c", &chunk(Stdout, 20, b"!")), Some((0, &b"!"[..])));
        assert_eq!(o.received, [21, 3]);
    }

    #[test]
    fn saved_output_offsets_leave_out_unfinished_lines() {
        let dir = tempfile::tempdir().unwrap();
        let writer = logs::LogWriter::open(&dir.path().join("c.log")).unwrap();
        let mut o = OutputOffsets::default();
        let line = chunk(pb::OutputStream::Stdout, 0, b"done\npart");
        let (slot, data) = o.accept("c", &line).unwrap();
        writer.write_chunk(slot, data).unwrap();
        // "part" is held back by the writer: a restart must have it resent.
        assert_eq!(o.written(Some(&writer)), [5, 0]);
        let path = dir.path().join("c.offsets");
        o.save(&path, Some(&writer));
        assert_eq!(OutputOffsets::load(&path).received, [5, 0]);
        assert_eq!(OutputOffsets::load(&dir.path().join("missing")), OutputOffsets::default());
        std::fs::write(&path, "garbage").unwrap();
        assert_eq!(OutputOffsets::load(&path), OutputOffsets::default());
    }

    #[test]
    fn stop_signals_parse() {
        assert_eq!(parse_signal("SIGQUIT"), libc::SIGQUIT);
        assert_eq!(parse_signal("int"), libc::SIGINT);
        assert_eq!(parse_signal("9"), 9);
        assert_eq!(parse_signal("bogus"), 0);
    }
}
