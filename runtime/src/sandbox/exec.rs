//! Exec: an extra process in a running container, started from the container's own OCI
//! process (env, user, cwd, capabilities) with a new argv. [`SandboxManager::exec`] gives an
//! [`ExecSession`] (its I/O hub, output, stdin, resize, wait); ExecSync runs on it, as
//! containerd's `execInternal` serves both ExecSync and streaming Exec.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::io::{Delivery, OutputOffsets, ProcessIo};
use super::*;
use crate::agent::{ExitStatus, NewExec, OutputChunk, OutputKind, StdioMode};

/// ExecSync keeps at most this much of each output stream (gRPC's default message limit).
pub const EXEC_OUTPUT_LIMIT: usize = 8 * 1024 * 1024;

/// A running exec.
pub struct ExecSession {
    pub process: ProcessId,
    /// Stdin and resizes (streaming exec, the streaming issue; ExecSync has neither).
    #[cfg_attr(not(test), allow(dead_code))]
    pub io: Arc<ProcessIo>,
    /// Its output, from the first byte; ends when the output does.
    pub output: mpsc::Receiver<OutputChunk>,
    agent: Arc<dyn GuestAgent>,
}

impl ExecSession {
    /// Waits for the process to exit.
    pub async fn wait(&self) -> Result<ExitStatus> {
        Ok(self.agent.wait(&self.process).await?)
    }

    /// Kills the process.
    pub async fn kill(&self) -> Result<()> {
        Ok(self.agent.signal(&self.process, libc::SIGKILL, false).await?)
    }
}

impl SandboxManager {
    /// A connection to `localhost:<port>` inside the pod's VM (port-forward).
    pub async fn port_forward(
        &self,
        sandbox_id: &str,
        port: u16,
    ) -> Result<tokio::net::UnixStream> {
        let rec = self.sandbox(sandbox_id)?;
        if rec.state != SandboxState::Ready {
            return Err(SandboxError::SandboxNotReady(rec.id));
        }
        let vm = rec.vm.ok_or_else(|| SandboxError::SandboxNotRunning(rec.id.clone()))?;
        let connector = self.hypervisor_of(&vm)?.agent_connector(&vm);
        Ok(crate::agent::forward_port(connector.as_ref(), port).await?)
    }
}

/// What ExecSync returns.
#[derive(Debug, Default)]
pub struct ExecOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exit_code: i32,
}

impl SandboxManager {
    /// Starts `cmd` in the running container `id`; its output is read from the first byte.
    pub async fn exec(
        self: &Arc<Self>,
        id: &str,
        cmd: Vec<String>,
        stdio: StdioMode,
    ) -> Result<ExecSession> {
        let rec = self.container(id)?;
        if rec.state != ContainerState::Running {
            return Err(SandboxError::ContainerNotRunning(rec.id));
        }
        let mut process: serde_json::Value =
            serde_json::from_str(&rec.oci_process_json).map_err(|e| {
                SandboxError::StoredProcess { id: rec.id.clone(), reason: e.to_string() }
            })?;
        let Some(fields) = process.as_object_mut() else {
            return Err(SandboxError::StoredProcess {
                id: rec.id.clone(),
                reason: "not a JSON object".into(),
            });
        };
        fields.insert("args".into(), serde_json::json!(cmd));
        fields.insert("terminal".into(), serde_json::json!(stdio.tty));
        let exec_id = uuid::Uuid::new_v4().simple().to_string();
        let pid = ProcessId::exec(&rec.id, &exec_id);
        let agent = self.agent(&rec.sandbox_id)?;
        agent
            .exec(NewExec {
                process: pid.clone(),
                oci_process_json: process.to_string().into_bytes(),
                stdio,
            })
            .await?;
        let io = ProcessIo::new(agent.clone(), pid.clone());
        let output = io.subscribe(Delivery::Lossless);
        lock(&self.io).insert(pid.clone(), io.clone());
        let this = Arc::clone(self);
        let (hub, cid, key) = (io.clone(), rec.id.clone(), pid.clone());
        tokio::spawn(async move {
            let followed = {
                let this = this.clone();
                move || this.container_followed(&cid)
            };
            hub.pump(OutputOffsets::default(), None, followed).await;
            this.drop_io(&key);
        });
        Ok(ExecSession { process: pid, io, output, agent })
    }

    /// ExecSync: runs `cmd` in the container and returns its output and exit code. On
    /// `timeout` the process is killed.
    pub async fn exec_sync(
        self: &Arc<Self>,
        id: &str,
        cmd: Vec<String>,
        timeout: Option<Duration>,
    ) -> Result<ExecOutput> {
        let mut session = self.exec(id, cmd.clone(), StdioMode::default()).await?;
        let run = async {
            let mut out = ExecOutput::default();
            while let Some(chunk) = session.output.recv().await {
                let buf = match chunk.kind {
                    OutputKind::Stdout => &mut out.stdout,
                    OutputKind::Stderr => &mut out.stderr,
                };
                let room = EXEC_OUTPUT_LIMIT.saturating_sub(buf.len());
                buf.extend_from_slice(&chunk.data[..chunk.data.len().min(room)]);
            }
            out.exit_code = session.wait().await?.exit_code;
            Ok::<_, SandboxError>(out)
        };
        let Some(timeout) = timeout else { return run.await };
        match tokio::time::timeout(timeout, run).await {
            Ok(result) => result,
            Err(_) => {
                let _ = session.kill().await;
                // Reap it, so the agent can forget it (bounded: the kill is immediate).
                let _ = tokio::time::timeout(Duration::from_secs(5), session.wait()).await;
                Err(SandboxError::ExecTimeout { cmd, timeout })
            }
        }
    }
}
