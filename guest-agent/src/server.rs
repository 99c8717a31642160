//! The gRPC face of the agent: `podvisor.agent.v1.Agent`, mapping [`AgentError`]s to codes.

use std::sync::Arc;
use std::time::Duration;

use podvisor_proto::agent::agent_server::Agent as AgentRpc;
use podvisor_proto::agent::{
    ContainerRef, ContainerStatsResponse, CreateContainerRequest, CreateContainerResponse,
    CreateSandboxRequest, DestroySandboxRequest, Empty, ExecProcessRequest, ExecProcessResponse,
    PingRequest, PingResponse, ProcessRef, ReadOutputRequest, RemoveContainerRequest,
    ResizeTtyRequest, SandboxStatsResponse, SetupNetworkRequest, SignalProcessRequest,
    UpdateContainerRequest, WaitProcessResponse, WriteStdinRequest,
};
use tonic::{Code, Request, Response, Status};

use crate::container::{Agent, AgentError};
use crate::stdio::{OutputReader, StdioError};

/// Delay between answering Shutdown and acting on it, so the answer can leave.
const SHUTDOWN_DELAY: Duration = Duration::from_millis(100);

impl From<AgentError> for Status {
    fn from(e: AgentError) -> Self {
        let code = match &e {
            AgentError::ContainerNotFound(_) | AgentError::ProcessNotFound(..) => Code::NotFound,
            AgentError::ContainerExists(_) | AgentError::ExecExists(..) => Code::AlreadyExists,
            AgentError::BadId(..)
            | AgentError::BadSpec(_)
            | AgentError::BadProcess(_)
            | AgentError::NoProcess
            | AgentError::BadSignal(_)
            | AgentError::BadSize(..)
            | AgentError::NoRootfs
            | AgentError::NoGuestDevice(_)
            | AgentError::BadIdMap(_)
            | AgentError::Rootfs(_)
            | AgentError::Sandbox(crate::sandbox::SandboxError::BadHostname(_))
            | AgentError::Sandbox(crate::sandbox::SandboxError::BadSysctl(_))
            | AgentError::Sandbox(crate::sandbox::SandboxError::BadDnsEntry(_))
            | AgentError::Sandbox(crate::sandbox::SandboxError::BadShareTag(_))
            | AgentError::Sandbox(crate::sandbox::SandboxError::BadSharePath(_))
            | AgentError::Sandbox(crate::sandbox::SandboxError::TooMuchEntropy(_)) => {
                Code::InvalidArgument
            }
            AgentError::WrongState { .. }
            | AgentError::Stdio(StdioError::StdinClosed)
            | AgentError::Stdio(StdioError::NoTty)
            | AgentError::Stdio(StdioError::ReaderAttached)
            | AgentError::NoPodPidNamespace => Code::FailedPrecondition,
            AgentError::Stdio(StdioError::OffsetAhead) => Code::OutOfRange,
            AgentError::Cgroup(e) if e.is_bad_request() => Code::InvalidArgument,
            AgentError::DeviceCgroup(e) if e.is_bad_request() => Code::InvalidArgument,
            AgentError::Network(e) if e.is_bad_request() => Code::InvalidArgument,
            AgentError::HostPod(e) if e.is_bad_request() => Code::InvalidArgument,
            AgentError::Network(e) if e.is_precondition() => Code::FailedPrecondition,
            _ => Code::Internal,
        };
        Status::new(code, e.to_string())
    }
}

/// The tonic service.
pub struct AgentService {
    agent: Arc<Agent>,
}

impl AgentService {
    pub fn new(agent: Arc<Agent>) -> Self {
        AgentService { agent }
    }
}

fn uptime_seconds() -> f64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|f| f.parse().ok()))
        .unwrap_or(0.0)
}

/// The agent's resident set, from /proc/self/status (0 if it cannot be read).
fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status").ok().and_then(|s| vm_rss(&s)).unwrap_or(0)
}

/// The `VmRSS:` line of a /proc/PID/status text, in bytes (the kernel prints kB).
fn vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    let mut words = line.split_whitespace();
    let kib: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => kib.checked_mul(1024),
        _ => None,
    }
}

#[tonic::async_trait]
impl AgentRpc for AgentService {
    async fn ping(&self, _: Request<PingRequest>) -> Result<Response<PingResponse>, Status> {
        Ok(Response::new(PingResponse {
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_seconds: uptime_seconds(),
            tracked_processes: u32::try_from(self.agent.tracked_processes()).unwrap_or(u32::MAX),
            rss_bytes: rss_bytes(),
        }))
    }

    async fn create_sandbox(
        &self,
        request: Request<CreateSandboxRequest>,
    ) -> Result<Response<Empty>, Status> {
        self.agent.create_sandbox(request.get_ref()).await?;
        Ok(Response::new(Empty {}))
    }

    async fn destroy_sandbox(
        &self,
        request: Request<DestroySandboxRequest>,
    ) -> Result<Response<Empty>, Status> {
        let grace = Duration::from_secs(request.get_ref().grace_period_seconds.into());
        self.agent.destroy_sandbox(grace).await?;
        Ok(Response::new(Empty {}))
    }

    async fn setup_network(
        &self,
        request: Request<SetupNetworkRequest>,
    ) -> Result<Response<Empty>, Status> {
        self.agent.setup_network(request.get_ref()).await?;
        Ok(Response::new(Empty {}))
    }

    async fn create_container(
        &self,
        request: Request<CreateContainerRequest>,
    ) -> Result<Response<CreateContainerResponse>, Status> {
        let pid = self.agent.create_container(request.into_inner()).await?;
        Ok(Response::new(CreateContainerResponse { pid }))
    }

    async fn start_container(
        &self,
        request: Request<ContainerRef>,
    ) -> Result<Response<Empty>, Status> {
        self.agent.start_container(&request.get_ref().container_id).await?;
        Ok(Response::new(Empty {}))
    }

    async fn remove_container(
        &self,
        request: Request<RemoveContainerRequest>,
    ) -> Result<Response<Empty>, Status> {
        self.agent.remove_container(&request.get_ref().container_id).await?;
        Ok(Response::new(Empty {}))
    }

    async fn exec_process(
        &self,
        request: Request<ExecProcessRequest>,
    ) -> Result<Response<ExecProcessResponse>, Status> {
        let pid = self.agent.exec_process(request.into_inner()).await?;
        Ok(Response::new(ExecProcessResponse { pid }))
    }

    async fn signal_process(
        &self,
        request: Request<SignalProcessRequest>,
    ) -> Result<Response<Empty>, Status> {
        let req = request.into_inner();
        let process = req.process.unwrap_or_default();
        self.agent.signal_process(&process.container_id, &process.exec_id, req.signal, req.all)?;
        Ok(Response::new(Empty {}))
    }

    async fn wait_process(
        &self,
        request: Request<ProcessRef>,
    ) -> Result<Response<WaitProcessResponse>, Status> {
        let req = request.get_ref();
        let exit = self.agent.wait_process(&req.container_id, &req.exec_id).await?;
        Ok(Response::new(WaitProcessResponse {
            exit_code: exit.status.code,
            signal: exit.status.signal,
            exited_at_unix_nanos: exit.status.exited_at_unix_nanos(),
            oom_killed: exit.oom_killed,
        }))
    }

    type ReadOutputStream = OutputReader;

    async fn read_output(
        &self,
        request: Request<ReadOutputRequest>,
    ) -> Result<Response<Self::ReadOutputStream>, Status> {
        let req = request.into_inner();
        let process = req.process.unwrap_or_default();
        let have = [req.stdout_offset, req.stderr_offset];
        Ok(Response::new(self.agent.read_output(&process.container_id, &process.exec_id, have)?))
    }

    async fn write_stdin(
        &self,
        request: Request<WriteStdinRequest>,
    ) -> Result<Response<Empty>, Status> {
        let req = request.into_inner();
        let process = req.process.unwrap_or_default();
        self.agent.write_stdin(&process.container_id, &process.exec_id, &req.data).await?;
        Ok(Response::new(Empty {}))
    }

    async fn close_stdin(&self, request: Request<ProcessRef>) -> Result<Response<Empty>, Status> {
        let req = request.get_ref();
        self.agent.close_stdin(&req.container_id, &req.exec_id).await?;
        Ok(Response::new(Empty {}))
    }

    async fn resize_tty(
        &self,
        request: Request<ResizeTtyRequest>,
    ) -> Result<Response<Empty>, Status> {
        let req = request.into_inner();
        let process = req.process.unwrap_or_default();
        self.agent.resize_tty(&process.container_id, &process.exec_id, req.width, req.height)?;
        Ok(Response::new(Empty {}))
    }

    async fn container_stats(
        &self,
        request: Request<ContainerRef>,
    ) -> Result<Response<ContainerStatsResponse>, Status> {
        Ok(Response::new(self.agent.container_stats(&request.get_ref().container_id).await?))
    }

    async fn sandbox_stats(
        &self,
        _: Request<Empty>,
    ) -> Result<Response<SandboxStatsResponse>, Status> {
        Ok(Response::new(self.agent.sandbox_stats()))
    }

    async fn update_container(
        &self,
        request: Request<UpdateContainerRequest>,
    ) -> Result<Response<Empty>, Status> {
        let req = request.get_ref();
        self.agent.update_container(&req.container_id, &req.resources_json).await?;
        Ok(Response::new(Empty {}))
    }

    async fn shutdown(&self, _: Request<Empty>) -> Result<Response<Empty>, Status> {
        let agent = self.agent.clone();
        tokio::spawn(async move {
            tokio::time::sleep(SHUTDOWN_DELAY).await;
            if agent.is_guest() {
                tracing::info!("shutting down the VM");
                nix::unistd::sync();
                let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
            } else {
                tracing::info!("shutting down (host mode)");
                agent.remove_all().await;
                std::process::exit(0);
            }
        });
        Ok(Response::new(Empty {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_rss_is_read_in_bytes() {
        let status =
            "Name:\tpodvisor-agent\nVmHWM:\t    9000 kB\nVmRSS:\t    8132 kB\nRssAnon:\t 1 kB\n";
        assert_eq!(vm_rss(status), Some(8132 * 1024));
        assert_eq!(vm_rss("Name:\tx\n"), None);
        assert_eq!(vm_rss("VmRSS:\tlots kB\n"), None);
        assert_eq!(vm_rss("VmRSS:\t12 MB\n"), None);
    }

    #[test]
    fn own_rss_is_nonzero() {
        assert!(rss_bytes() > 0);
    }
}
