//! An in-memory [`GuestAgent`] for fast tests of the sandbox layer. Containers run nothing:
//! a test makes them print ([`FakeAgent::emit`]) and exit ([`FakeAgent::exit`]). Execs follow a
//! tiny script given by their argv: `echo A B` prints `A B\n` and exits 0, `exit N` exits N,
//! `sleep` runs until signalled, `lines N` prints N numbered lines. Any call can be made to fail
//! once ([`FakeAgent::fail_next`]), to hang ([`FakeAgent::hang`]) or to hang once
//! ([`FakeAgent::hang_next`]).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::sync::watch;

use super::{
    AgentDialer, AgentError, AgentStatus, ContainerStats, ExitStatus, GuestAgent, NetworkSetup,
    NewContainer, NewExec, OutputChunk, OutputKind, OutputStream, ProcessId, Refusal, Result,
    SandboxSetup, SandboxStats,
};
use crate::hypervisor::GuestConnector;

#[derive(Default)]
struct FakeProcess {
    output: Vec<OutputChunk>,
    written: [u64; 2],
    exit: Option<ExitStatus>,
    /// Exits on SIGTERM (else only SIGKILL ends it).
    ignores_sigterm: bool,
    stdin: Vec<u8>,
    stdin_closed: bool,
    waited: bool,
    /// A reader reached the end of its output.
    drained: bool,
}

impl FakeProcess {
    fn emit(&mut self, kind: OutputKind, data: &[u8]) {
        let slot = kind.slot();
        self.output.push(OutputChunk { kind, data: data.to_vec(), offset: self.written[slot] });
        self.written[slot] += data.len() as u64;
    }
}

/// As the real agent: an exec is forgotten once it was waited for and its output drained.
impl State {
    fn forget_if_done(&mut self, process: &ProcessId) {
        let done = self.processes.get(process).is_some_and(|p| p.waited && p.drained);
        if done && !process.exec_id.is_empty() {
            self.processes.remove(process);
        }
    }
}

#[derive(Default)]
struct State {
    sandbox: Option<SandboxSetup>,
    network: Option<NetworkSetup>,
    containers: HashMap<String, NewContainer>,
    processes: HashMap<ProcessId, FakeProcess>,
    calls: Vec<String>,
    fail_next: HashSet<&'static str>,
    hang: HashSet<&'static str>,
    hang_next: HashSet<&'static str>,
    /// Resources given to UpdateContainer, by container.
    updates: HashMap<String, serde_json::Value>,
    /// CPU time the next stats call reports, by container.
    cpu: HashMap<String, u64>,
}

struct Inner {
    state: Mutex<State>,
    /// Bumped on every change, so waits and output streams wake up.
    changed: watch::Sender<u64>,
}

#[derive(Clone)]
pub struct FakeAgent {
    inner: Arc<Inner>,
}

impl Default for FakeAgent {
    fn default() -> Self {
        Self { inner: Arc::new(Inner { state: Mutex::default(), changed: watch::channel(0).0 }) }
    }
}

impl FakeAgent {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self) {
        self.inner.changed.send_modify(|n| *n += 1);
    }

    /// Records the call; fails it if told to, hangs it if told to.
    async fn enter(&self, call: &'static str) -> Result<()> {
        let hang = {
            let mut st = self.state();
            st.calls.push(call.to_string());
            if st.fail_next.remove(call) {
                return Err(AgentError::Refused {
                    call,
                    refusal: Refusal::Failed,
                    message: "told to fail".into(),
                });
            }
            st.hang.contains(call) || st.hang_next.remove(call)
        };
        if hang {
            std::future::pending::<()>().await;
        }
        Ok(())
    }

    fn not_found(call: &'static str, what: &str) -> AgentError {
        AgentError::Refused {
            call,
            refusal: Refusal::NotFound,
            message: format!("{what} not found"),
        }
    }

    pub fn fail_next(&self, call: &'static str) {
        self.state().fail_next.insert(call);
    }

    pub fn hang(&self, call: &'static str) {
        self.state().hang.insert(call);
    }

    /// The next `call` hangs; later ones answer.
    pub fn hang_next(&self, call: &'static str) {
        self.state().hang_next.insert(call);
    }

    /// The calls made so far, by name.
    pub fn calls(&self) -> Vec<String> {
        self.state().calls.clone()
    }

    pub fn sandbox(&self) -> Option<SandboxSetup> {
        self.state().sandbox.clone()
    }

    pub fn network(&self) -> Option<NetworkSetup> {
        self.state().network.clone()
    }

    pub fn container(&self, id: &str) -> Option<NewContainer> {
        self.state().containers.get(id).cloned()
    }

    /// The container's init process prints `data`.
    pub fn emit(&self, container_id: &str, kind: OutputKind, data: &[u8]) {
        if let Some(p) = self.state().processes.get_mut(&ProcessId::init(container_id)) {
            p.emit(kind, data);
        }
        self.bump();
    }

    /// The container's init process exits with `code`.
    pub fn exit(&self, container_id: &str, code: i32) {
        if let Some(p) = self.state().processes.get_mut(&ProcessId::init(container_id)) {
            p.exit.get_or_insert(ExitStatus { exit_code: code, ..Default::default() });
        }
        self.bump();
    }

    /// The guest's OOM killer ends the container.
    pub fn oom_kill(&self, container_id: &str) {
        if let Some(p) = self.state().processes.get_mut(&ProcessId::init(container_id)) {
            let killed = ExitStatus { exit_code: 137, signal: libc::SIGKILL, oom_killed: true };
            p.exit.get_or_insert(killed);
        }
        self.bump();
    }

    /// The container has used `nanos` of CPU time so far.
    pub fn set_cpu(&self, container_id: &str, nanos: u64) {
        self.state().cpu.insert(container_id.to_string(), nanos);
    }

    /// The last resources UpdateContainer applied to the container.
    pub fn updated(&self, container_id: &str) -> Option<serde_json::Value> {
        self.state().updates.get(container_id).cloned()
    }

    /// The container's init process ignores SIGTERM.
    pub fn ignore_sigterm(&self, container_id: &str) {
        if let Some(p) = self.state().processes.get_mut(&ProcessId::init(container_id)) {
            p.ignores_sigterm = true;
        }
    }

    /// What the process read on stdin, and whether stdin was closed.
    pub fn stdin_of(&self, process: &ProcessId) -> Option<(Vec<u8>, bool)> {
        self.state().processes.get(process).map(|p| (p.stdin.clone(), p.stdin_closed))
    }

    /// How many execs are still tracked.
    pub fn execs(&self) -> usize {
        self.state().processes.keys().filter(|p| !p.exec_id.is_empty()).count()
    }

    fn run_script(p: &mut FakeProcess, args: &[String]) {
        match args.first().map(String::as_str) {
            Some("echo") => {
                p.emit(OutputKind::Stdout, format!("{}\n", args[1..].join(" ")).as_bytes());
                p.exit = Some(ExitStatus::default());
            }
            Some("exit") => {
                let code = args.get(1).and_then(|c| c.parse().ok()).unwrap_or(1);
                p.emit(OutputKind::Stderr, b"exiting\n");
                p.exit = Some(ExitStatus { exit_code: code, ..Default::default() });
            }
            Some("lines") => {
                let n: u32 = args.get(1).and_then(|c| c.parse().ok()).unwrap_or(1);
                for i in 0..n {
                    p.emit(OutputKind::Stdout, format!("{i}\n").as_bytes());
                }
                p.exit = Some(ExitStatus::default());
            }
            Some("sleep") => {}
            _ => p.exit = Some(ExitStatus { exit_code: 127, ..Default::default() }),
        }
    }
}

#[async_trait]
impl GuestAgent for FakeAgent {
    async fn status(&self) -> Result<AgentStatus> {
        self.enter("Ping").await?;
        let tracked = self.state().processes.len() as u32;
        Ok(AgentStatus {
            version: "fake".into(),
            uptime_seconds: 1.0,
            tracked_processes: tracked,
            rss_bytes: 0,
        })
    }

    async fn create_sandbox(&self, setup: SandboxSetup) -> Result<()> {
        self.enter("CreateSandbox").await?;
        self.state().sandbox = Some(setup);
        Ok(())
    }

    async fn setup_network(&self, setup: NetworkSetup) -> Result<()> {
        self.enter("SetupNetwork").await?;
        self.state().network = Some(setup);
        Ok(())
    }

    async fn create_container(&self, container: NewContainer) -> Result<u32> {
        self.enter("CreateContainer").await?;
        let mut st = self.state();
        st.processes.insert(ProcessId::init(&container.id), FakeProcess::default());
        st.containers.insert(container.id.clone(), container);
        Ok(st.containers.len() as u32 + 100)
    }

    async fn start_container(&self, id: &str) -> Result<()> {
        self.enter("StartContainer").await?;
        if !self.state().containers.contains_key(id) {
            return Err(Self::not_found("StartContainer", id));
        }
        Ok(())
    }

    async fn remove_container(&self, id: &str) -> Result<()> {
        self.enter("RemoveContainer").await?;
        let mut st = self.state();
        st.containers.remove(id);
        st.processes.retain(|p, _| p.container_id != id);
        drop(st);
        self.bump();
        Ok(())
    }

    async fn exec(&self, exec: NewExec) -> Result<u32> {
        self.enter("ExecProcess").await?;
        let process: serde_json::Value =
            serde_json::from_slice(&exec.oci_process_json).map_err(|e| AgentError::Refused {
                call: "ExecProcess",
                refusal: Refusal::InvalidArgument,
                message: e.to_string(),
            })?;
        let args: Vec<String> = process["args"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str().map(String::from)).collect())
            .unwrap_or_default();
        let mut st = self.state();
        if !st.containers.contains_key(&exec.process.container_id) {
            return Err(Self::not_found("ExecProcess", &exec.process.container_id));
        }
        let mut p = FakeProcess::default();
        Self::run_script(&mut p, &args);
        st.processes.insert(exec.process, p);
        drop(st);
        self.bump();
        Ok(7)
    }

    async fn signal(&self, process: &ProcessId, signal: i32, _all: bool) -> Result<()> {
        self.enter("SignalProcess").await?;
        let mut st = self.state();
        let p = st
            .processes
            .get_mut(process)
            .ok_or_else(|| Self::not_found("SignalProcess", &process.container_id))?;
        if signal == libc::SIGKILL || !p.ignores_sigterm {
            p.exit.get_or_insert(ExitStatus { exit_code: 128 + signal, signal, oom_killed: false });
        }
        drop(st);
        self.bump();
        Ok(())
    }

    async fn wait(&self, process: &ProcessId) -> Result<ExitStatus> {
        self.enter("WaitProcess").await?;
        let mut changed = self.inner.changed.subscribe();
        loop {
            {
                let mut st = self.state();
                let p = st
                    .processes
                    .get_mut(process)
                    .ok_or_else(|| Self::not_found("WaitProcess", &process.container_id))?;
                if let Some(exit) = p.exit {
                    p.waited = true;
                    st.forget_if_done(process);
                    return Ok(exit);
                }
            }
            if changed.changed().await.is_err() {
                return Err(Self::not_found("WaitProcess", &process.container_id));
            }
        }
    }

    async fn output(&self, process: &ProcessId, offsets: [u64; 2]) -> Result<OutputStream> {
        self.enter("ReadOutput").await?;
        if !self.state().processes.contains_key(process) {
            return Err(Self::not_found("ReadOutput", &process.container_id));
        }
        let agent = self.clone();
        let process = process.clone();
        let changed = self.inner.changed.subscribe();
        let stream = futures::stream::unfold(
            (agent, process, 0usize, changed),
            move |(agent, process, mut next, mut changed)| async move {
                loop {
                    let step = {
                        let st = agent.state();
                        match st.processes.get(&process) {
                            None => None,
                            Some(p) => {
                                // Skip what the reader has.
                                while next < p.output.len() {
                                    let c = &p.output[next];
                                    if c.offset + c.data.len() as u64 > offsets[c.kind.slot()] {
                                        break;
                                    }
                                    next += 1;
                                }
                                match p.output.get(next) {
                                    Some(chunk) => Some(Some(chunk.clone())),
                                    None if p.exit.is_some() => None,
                                    None => Some(None),
                                }
                            }
                        }
                    };
                    if step.is_none() {
                        let mut st = agent.state();
                        if let Some(p) = st.processes.get_mut(&process) {
                            p.drained = true;
                        }
                        st.forget_if_done(&process);
                    }
                    match step {
                        Some(Some(chunk)) => {
                            return Some((Ok(chunk), (agent, process, next + 1, changed)))
                        }
                        // The process ended and everything was sent (or it was removed).
                        None => return None,
                        Some(None) => {
                            if changed.changed().await.is_err() {
                                return None;
                            }
                        }
                    }
                }
            },
        );
        Ok(Box::pin(stream))
    }

    async fn write_stdin(&self, process: &ProcessId, data: Vec<u8>) -> Result<()> {
        self.enter("WriteStdin").await?;
        let mut st = self.state();
        let p = st
            .processes
            .get_mut(process)
            .ok_or_else(|| Self::not_found("WriteStdin", &process.container_id))?;
        p.stdin.extend_from_slice(&data);
        Ok(())
    }

    async fn close_stdin(&self, process: &ProcessId) -> Result<()> {
        self.enter("CloseStdin").await?;
        if let Some(p) = self.state().processes.get_mut(process) {
            p.stdin_closed = true;
        }
        Ok(())
    }

    async fn resize_tty(&self, _process: &ProcessId, _width: u32, _height: u32) -> Result<()> {
        self.enter("ResizeTty").await
    }

    async fn container_stats(&self, id: &str) -> Result<ContainerStats> {
        self.enter("ContainerStats").await?;
        if !self.state().containers.contains_key(id) {
            return Err(Self::not_found("ContainerStats", id));
        }
        let cpu = self.state().cpu.get(id).copied().unwrap_or(42);
        Ok(ContainerStats {
            cpu_usage_nanos: cpu,
            pids: 1,
            memory_usage_bytes: 1 << 20,
            timestamp_unix_nanos: crate::sandbox::now_nanos(),
            ..Default::default()
        })
    }

    async fn sandbox_stats(&self) -> Result<SandboxStats> {
        self.enter("SandboxStats").await?;
        let st = self.state();
        let cpu = st.containers.keys().map(|id| st.cpu.get(id).copied().unwrap_or(42)).sum();
        Ok(SandboxStats {
            cpu_usage_nanos: cpu,
            memory_usage_bytes: (st.containers.len() as u64) << 20,
            pids: st.containers.len() as u64,
            memory_total_bytes: 256 << 20,
            memory_available_bytes: 200 << 20,
            timestamp_unix_nanos: crate::sandbox::now_nanos(),
            ..Default::default()
        })
    }

    async fn update_container(&self, id: &str, resources_json: Vec<u8>) -> Result<()> {
        self.enter("UpdateContainer").await?;
        let mut st = self.state();
        if !st.containers.contains_key(id) {
            return Err(Self::not_found("UpdateContainer", id));
        }
        let value = serde_json::from_slice(&resources_json).map_err(|e| AgentError::Refused {
            call: "UpdateContainer",
            refusal: Refusal::InvalidArgument,
            message: e.to_string(),
        })?;
        st.updates.insert(id.to_string(), value);
        Ok(())
    }

    async fn shutdown(&self) -> Result<()> {
        self.enter("Shutdown").await
    }
}

/// Hands out one [`FakeAgent`] per sandbox, the same one again after a "daemon restart"
/// (a new manager on the same dialer), as a VM outlives the daemon.
#[derive(Default)]
pub struct FakeDialer {
    agents: Mutex<HashMap<String, FakeAgent>>,
    /// The agent the next new sandbox gets (so a test can set it up before the id exists).
    next: Mutex<Option<FakeAgent>>,
}

impl FakeDialer {
    /// The agent of `sandbox_id` (made on first use).
    pub fn of(&self, sandbox_id: &str) -> FakeAgent {
        let next =
            || self.next.lock().unwrap_or_else(|p| p.into_inner()).take().unwrap_or_default();
        self.agents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(sandbox_id.to_string())
            .or_insert_with(next)
            .clone()
    }

    /// The agent the next sandbox will get.
    pub fn next_agent(&self) -> FakeAgent {
        self.next
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(FakeAgent::default)
            .clone()
    }
}

impl AgentDialer for FakeDialer {
    fn agent(&self, sandbox_id: &str, _connector: Arc<dyn GuestConnector>) -> Arc<dyn GuestAgent> {
        Arc::new(self.of(sandbox_id))
    }
}
