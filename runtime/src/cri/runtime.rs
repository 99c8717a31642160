//! CRI `runtime.v1.RuntimeService`.

use std::collections::HashMap;
use std::sync::Arc;

use k8s_cri::v1 as cri;
use k8s_cri::v1::runtime_service_server::RuntimeService;
use tonic::{Request, Response, Status};

use super::create_request::ImageSubPaths;
use super::translate::{self, container_state, labels_match, sandbox_state};
use super::{cadvisor, status};
use crate::sandbox::{ContainerState, SandboxManager};
use crate::streaming::{StreamRequest, StreamingServer};

/// How long the List*Stats calls wait for one pod's guest: one that does not answer by then
/// (paused, overloaded, hostile) is left out of the list, so kubelet's periodic stats never
/// wait the agent's whole call deadline. A healthy TCG guest answers in tens of ms.
const LIST_STATS_DEADLINE: std::time::Duration = std::time::Duration::from_secs(3);

pub const RUNTIME_NAME: &str = "podvisor";
pub const CRI_API_VERSION: &str = "v1";

pub struct RuntimeServiceImpl {
    manager: Arc<SandboxManager>,
    /// Where Exec and Attach URLs lead.
    streaming: Arc<StreamingServer>,
    /// Which hypervisor backend runs pods and why (Status verbose info).
    backend_reason: String,
    /// Why the default backend's VMs are no security boundary (QEMU under TCG), if they are not.
    isolation_warning: Option<String>,
}

impl RuntimeServiceImpl {
    pub fn new(
        manager: Arc<SandboxManager>,
        streaming: Arc<StreamingServer>,
        backend_reason: String,
        isolation_warning: Option<String>,
    ) -> Self {
        Self { manager, streaming, backend_reason, isolation_warning }
    }

    /// The URL of a streaming request on a running container.
    fn stream_url(&self, container_id: &str, request: StreamRequest) -> Result<String, Status> {
        let rec = self.manager.container(container_id).map_err(status)?;
        if rec.state != ContainerState::Running {
            return Err(Status::failed_precondition(format!(
                "container {} is not running",
                rec.id
            )));
        }
        self.streaming.url_for(request).map_err(|e| Status::resource_exhausted(e.to_string()))
    }
}

/// CRI's rules for the standard streams of Exec and Attach.
fn check_streams(stdin: bool, stdout: bool, stderr: bool, tty: bool) -> Result<(), Status> {
    if !(stdin || stdout || stderr) {
        return Err(Status::invalid_argument("one of stdin, stdout or stderr must be set"));
    }
    if tty && stderr {
        return Err(Status::invalid_argument("tty and stderr cannot both be set"));
    }
    Ok(())
}

type CriResult<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl RuntimeService for RuntimeServiceImpl {
    async fn version(&self, _req: Request<cri::VersionRequest>) -> CriResult<cri::VersionResponse> {
        Ok(Response::new(cri::VersionResponse {
            version: "0.1.0".into(),
            runtime_name: RUNTIME_NAME.into(),
            runtime_version: env!("CARGO_PKG_VERSION").into(),
            runtime_api_version: CRI_API_VERSION.into(),
        }))
    }

    async fn run_pod_sandbox(
        &self,
        req: Request<cri::RunPodSandboxRequest>,
    ) -> CriResult<cri::RunPodSandboxResponse> {
        let pod = translate::pod_spec(req.into_inner())?;
        let id = self.manager.run_sandbox(pod).await.map_err(status)?;
        Ok(Response::new(cri::RunPodSandboxResponse { pod_sandbox_id: id }))
    }

    async fn stop_pod_sandbox(
        &self,
        req: Request<cri::StopPodSandboxRequest>,
    ) -> CriResult<cri::StopPodSandboxResponse> {
        let id = req.into_inner().pod_sandbox_id;
        if id.is_empty() {
            return Err(Status::invalid_argument("pod_sandbox_id is required"));
        }
        self.manager.stop_sandbox(&id).await.map_err(status)?;
        Ok(Response::new(cri::StopPodSandboxResponse {}))
    }

    async fn remove_pod_sandbox(
        &self,
        req: Request<cri::RemovePodSandboxRequest>,
    ) -> CriResult<cri::RemovePodSandboxResponse> {
        let id = req.into_inner().pod_sandbox_id;
        if id.is_empty() {
            return Err(Status::invalid_argument("pod_sandbox_id is required"));
        }
        self.manager.remove_sandbox(&id).await.map_err(status)?;
        Ok(Response::new(cri::RemovePodSandboxResponse {}))
    }

    async fn pod_sandbox_status(
        &self,
        req: Request<cri::PodSandboxStatusRequest>,
    ) -> CriResult<cri::PodSandboxStatusResponse> {
        let req = req.into_inner();
        let rec = self.manager.sandbox(&req.pod_sandbox_id).map_err(status)?;
        let mut info = HashMap::new();
        if req.verbose {
            let mut detail = match self.manager.describe_vm(&rec) {
                serde_json::Value::Object(vm) => vm,
                _ => serde_json::Map::new(),
            };
            detail.insert(
                "consoleLog".into(),
                serde_json::json!(self.manager.console_log_path(&rec.id)),
            );
            // How the VM started: from a VM template or cold, and why.
            if let Some(start) = &rec.start {
                detail.extend(translate::start_info(start));
            }
            // The guest's side, bounded by the agent call's deadline; absent when it fails.
            if let Ok(agent) = self.manager.agent_status(&rec.id).await {
                detail.insert(
                    "agent".into(),
                    serde_json::json!({
                        "version": agent.version,
                        "uptimeSeconds": agent.uptime_seconds,
                        "trackedProcesses": agent.tracked_processes,
                        "rssBytes": agent.rss_bytes,
                    }),
                );
            }
            info.insert("info".to_string(), serde_json::Value::Object(detail).to_string());
        }
        let containers_statuses = self
            .manager
            .list_containers()
            .iter()
            .filter(|c| c.sandbox_id == rec.id)
            .map(translate::container_status)
            .collect();
        Ok(Response::new(cri::PodSandboxStatusResponse {
            status: Some(translate::sandbox_status(&rec)),
            info,
            containers_statuses,
            timestamp: crate::sandbox::now_nanos(),
        }))
    }

    async fn list_pod_sandbox(
        &self,
        req: Request<cri::ListPodSandboxRequest>,
    ) -> CriResult<cri::ListPodSandboxResponse> {
        let filter = req.into_inner().filter.unwrap_or_default();
        let items = self
            .manager
            .list_sandboxes()
            .into_iter()
            .filter(|s| filter.id.is_empty() || s.id.starts_with(&filter.id))
            .filter(|s| filter.state.as_ref().is_none_or(|st| st.state == sandbox_state(s.state)))
            .filter(|s| labels_match(&s.labels, &filter.label_selector))
            .map(|s| translate::pod_sandbox(&s))
            .collect();
        Ok(Response::new(cri::ListPodSandboxResponse { items }))
    }

    async fn create_container(
        &self,
        req: Request<cri::CreateContainerRequest>,
    ) -> CriResult<cri::CreateContainerResponse> {
        // Set by `create_request::CreateHandler` in front of this service.
        let sub_paths = req.extensions().get::<ImageSubPaths>().cloned().unwrap_or_default();
        let req = req.into_inner();
        if req.pod_sandbox_id.is_empty() {
            return Err(Status::invalid_argument("pod_sandbox_id is required"));
        }
        let config = req.config.ok_or_else(|| Status::invalid_argument("config is required"))?;
        let spec = translate::container_spec_with_sub_paths(config, &sub_paths.0)?;
        let id = self.manager.create_container(&req.pod_sandbox_id, spec).await.map_err(status)?;
        Ok(Response::new(cri::CreateContainerResponse { container_id: id }))
    }

    async fn start_container(
        &self,
        req: Request<cri::StartContainerRequest>,
    ) -> CriResult<cri::StartContainerResponse> {
        self.manager.start_container(&req.into_inner().container_id).await.map_err(status)?;
        Ok(Response::new(cri::StartContainerResponse {}))
    }

    async fn stop_container(
        &self,
        req: Request<cri::StopContainerRequest>,
    ) -> CriResult<cri::StopContainerResponse> {
        let req = req.into_inner();
        if req.container_id.is_empty() {
            return Err(Status::invalid_argument("container_id is required"));
        }
        self.manager.stop_container(&req.container_id, req.timeout).await.map_err(status)?;
        Ok(Response::new(cri::StopContainerResponse {}))
    }

    async fn remove_container(
        &self,
        req: Request<cri::RemoveContainerRequest>,
    ) -> CriResult<cri::RemoveContainerResponse> {
        let id = req.into_inner().container_id;
        if id.is_empty() {
            return Err(Status::invalid_argument("container_id is required"));
        }
        self.manager.remove_container(&id).await.map_err(status)?;
        Ok(Response::new(cri::RemoveContainerResponse {}))
    }

    async fn list_containers(
        &self,
        req: Request<cri::ListContainersRequest>,
    ) -> CriResult<cri::ListContainersResponse> {
        let filter = req.into_inner().filter.unwrap_or_default();
        let containers = self
            .manager
            .list_containers()
            .into_iter()
            .filter(|c| filter.id.is_empty() || c.id.starts_with(&filter.id))
            .filter(|c| {
                filter.pod_sandbox_id.is_empty() || c.sandbox_id.starts_with(&filter.pod_sandbox_id)
            })
            .filter(|c| filter.state.as_ref().is_none_or(|st| st.state == container_state(c.state)))
            .filter(|c| labels_match(&c.labels, &filter.label_selector))
            .map(|c| translate::container(&c))
            .collect();
        Ok(Response::new(cri::ListContainersResponse { containers }))
    }

    async fn container_status(
        &self,
        req: Request<cri::ContainerStatusRequest>,
    ) -> CriResult<cri::ContainerStatusResponse> {
        let req = req.into_inner();
        let rec = self.manager.container(&req.container_id).map_err(status)?;
        let mut info = HashMap::new();
        if req.verbose {
            info.insert(
                "info".to_string(),
                serde_json::json!({
                    "sandboxID": rec.sandbox_id,
                    "pid": rec.pid,
                    "process": serde_json::from_str::<serde_json::Value>(&rec.oci_process_json).ok(),
                    "notApplicable": rec.not_applicable,
                })
                .to_string(),
            );
        }
        Ok(Response::new(cri::ContainerStatusResponse {
            status: Some(translate::container_status(&rec)),
            info,
        }))
    }

    async fn update_container_resources(
        &self,
        req: Request<cri::UpdateContainerResourcesRequest>,
    ) -> CriResult<cri::UpdateContainerResourcesResponse> {
        let req = req.into_inner();
        if req.container_id.is_empty() {
            return Err(Status::invalid_argument("container_id is required"));
        }
        let linux = req.linux.ok_or_else(|| {
            Status::invalid_argument("linux resources are required (windows is not supported)")
        })?;
        self.manager
            .update_container_resources(&req.container_id, translate::resources(linux))
            .await
            .map_err(status)?;
        Ok(Response::new(cri::UpdateContainerResourcesResponse {}))
    }

    async fn reopen_container_log(
        &self,
        req: Request<cri::ReopenContainerLogRequest>,
    ) -> CriResult<cri::ReopenContainerLogResponse> {
        self.manager.reopen_container_log(&req.into_inner().container_id).map_err(status)?;
        Ok(Response::new(cri::ReopenContainerLogResponse {}))
    }

    async fn exec_sync(
        &self,
        req: Request<cri::ExecSyncRequest>,
    ) -> CriResult<cri::ExecSyncResponse> {
        let req = req.into_inner();
        if req.container_id.is_empty() {
            return Err(Status::invalid_argument("container_id is required"));
        }
        if req.cmd.is_empty() {
            return Err(Status::invalid_argument("exec needs a command"));
        }
        let timeout =
            (req.timeout > 0).then(|| std::time::Duration::from_secs(req.timeout.unsigned_abs()));
        let out =
            self.manager.exec_sync(&req.container_id, req.cmd, timeout).await.map_err(status)?;
        Ok(Response::new(cri::ExecSyncResponse {
            stdout: out.stdout,
            stderr: out.stderr,
            exit_code: out.exit_code,
        }))
    }

    async fn exec(&self, req: Request<cri::ExecRequest>) -> CriResult<cri::ExecResponse> {
        let req = req.into_inner();
        if req.container_id.is_empty() {
            return Err(Status::invalid_argument("container_id is required"));
        }
        if req.cmd.is_empty() {
            return Err(Status::invalid_argument("exec needs a command"));
        }
        check_streams(req.stdin, req.stdout, req.stderr, req.tty)?;
        let full_id = self.manager.container(&req.container_id).map_err(status)?.id;
        let url = self.stream_url(
            &full_id,
            StreamRequest::Exec {
                container_id: full_id.clone(),
                cmd: req.cmd,
                tty: req.tty,
                stdin: req.stdin,
                stdout: req.stdout,
                stderr: req.stderr,
            },
        )?;
        Ok(Response::new(cri::ExecResponse { url }))
    }

    async fn attach(&self, req: Request<cri::AttachRequest>) -> CriResult<cri::AttachResponse> {
        let req = req.into_inner();
        if req.container_id.is_empty() {
            return Err(Status::invalid_argument("container_id is required"));
        }
        check_streams(req.stdin, req.stdout, req.stderr, req.tty)?;
        let full_id = self.manager.container(&req.container_id).map_err(status)?.id;
        let url = self.stream_url(
            &full_id,
            StreamRequest::Attach {
                container_id: full_id.clone(),
                tty: req.tty,
                stdin: req.stdin,
                stdout: req.stdout,
                stderr: req.stderr,
            },
        )?;
        Ok(Response::new(cri::AttachResponse { url }))
    }

    async fn port_forward(
        &self,
        req: Request<cri::PortForwardRequest>,
    ) -> CriResult<cri::PortForwardResponse> {
        // The ports come with each forwarded connection (critest sends none here).
        let id = req.into_inner().pod_sandbox_id;
        if id.is_empty() {
            return Err(Status::invalid_argument("pod_sandbox_id is required"));
        }
        let rec = self.manager.sandbox(&id).map_err(status)?;
        if rec.state != crate::sandbox::SandboxState::Ready {
            return Err(Status::failed_precondition(format!(
                "pod sandbox {} is not ready",
                rec.id
            )));
        }
        let url = self
            .streaming
            .url_for(StreamRequest::PortForward { sandbox_id: rec.id })
            .map_err(|e| Status::resource_exhausted(e.to_string()))?;
        Ok(Response::new(cri::PortForwardResponse { url }))
    }

    async fn container_stats(
        &self,
        req: Request<cri::ContainerStatsRequest>,
    ) -> CriResult<cri::ContainerStatsResponse> {
        let id = req.into_inner().container_id;
        let rec = self.manager.container(&id).map_err(status)?;
        let s = self.manager.container_stats(&rec.id).await.map_err(status)?;
        Ok(Response::new(cri::ContainerStatsResponse {
            stats: Some(translate::container_stats(&rec, &s)),
        }))
    }

    async fn list_container_stats(
        &self,
        req: Request<cri::ListContainerStatsRequest>,
    ) -> CriResult<cri::ListContainerStatsResponse> {
        let filter = req.into_inner().filter.unwrap_or_default();
        let wanted: Vec<_> = self
            .manager
            .list_containers()
            .into_iter()
            .filter(|c| {
                c.state == ContainerState::Running
                    && (filter.id.is_empty() || c.id.starts_with(&filter.id))
                    && (filter.pod_sandbox_id.is_empty()
                        || c.sandbox_id.starts_with(&filter.pod_sandbox_id))
                    && labels_match(&c.labels, &filter.label_selector)
            })
            .collect();
        // All at once, each within LIST_STATS_DEADLINE: a slow guest is left out of the list
        // rather than holding every pod's figures up.
        let answers = futures::future::join_all(wanted.iter().map(|c| {
            tokio::time::timeout(LIST_STATS_DEADLINE, self.manager.container_stats(&c.id))
        }))
        .await;
        let stats = wanted
            .iter()
            .zip(answers)
            .filter_map(|(c, s)| s.ok()?.ok().map(|s| translate::container_stats(c, &s)))
            .collect();
        Ok(Response::new(cri::ListContainerStatsResponse { stats }))
    }

    async fn pod_sandbox_stats(
        &self,
        req: Request<cri::PodSandboxStatsRequest>,
    ) -> CriResult<cri::PodSandboxStatsResponse> {
        let id = req.into_inner().pod_sandbox_id;
        if id.is_empty() {
            return Err(Status::invalid_argument("pod_sandbox_id is required"));
        }
        let usage = self.manager.pod_stats(&id).await.map_err(status)?;
        Ok(Response::new(cri::PodSandboxStatsResponse {
            stats: Some(translate::pod_sandbox_stats(&usage)),
        }))
    }

    async fn list_pod_sandbox_stats(
        &self,
        req: Request<cri::ListPodSandboxStatsRequest>,
    ) -> CriResult<cri::ListPodSandboxStatsResponse> {
        let filter = req.into_inner().filter.unwrap_or_default();
        let wanted: Vec<String> = self
            .manager
            .list_sandboxes()
            .into_iter()
            .filter(|s| {
                s.state == crate::sandbox::SandboxState::Ready
                    && (filter.id.is_empty() || s.id.starts_with(&filter.id))
                    && labels_match(&s.labels, &filter.label_selector)
            })
            .map(|s| s.id)
            .collect();
        // All at once and bounded, as ListContainerStats.
        let usages = futures::future::join_all(
            wanted
                .iter()
                .map(|id| tokio::time::timeout(LIST_STATS_DEADLINE, self.manager.pod_stats(id))),
        )
        .await;
        let stats = usages
            .into_iter()
            .filter_map(|u| u.ok()?.ok().map(|u| translate::pod_sandbox_stats(&u)))
            .collect();
        Ok(Response::new(cri::ListPodSandboxStatsResponse { stats }))
    }

    async fn update_runtime_config(
        &self,
        _req: Request<cri::UpdateRuntimeConfigRequest>,
    ) -> CriResult<cri::UpdateRuntimeConfigResponse> {
        // The only field is the pod CIDR, which matters once CNI networking exists.
        Ok(Response::new(cri::UpdateRuntimeConfigResponse {}))
    }

    async fn status(&self, req: Request<cri::StatusRequest>) -> CriResult<cri::StatusResponse> {
        let conditions = vec![
            cri::RuntimeCondition {
                r#type: "RuntimeReady".into(),
                status: true,
                reason: String::new(),
                message: String::new(),
            },
            network_condition(self.manager.network_ready()),
            isolation_condition(self.isolation_warning.as_deref()),
        ];
        let mut info = HashMap::new();
        if req.into_inner().verbose {
            info.insert("hypervisor".to_string(), self.manager.hypervisor_name().to_string());
            info.insert("hypervisorReason".to_string(), self.backend_reason.clone());
            // VM templates on disk and being built, with their state.
            info.insert(
                "templates".to_string(),
                serde_json::to_string(&self.manager.template_status()).unwrap_or_default(),
            );
            // Which handlers are VMs and which run pods on the host.
            let backends: serde_json::Map<String, serde_json::Value> =
                self.manager.handler_backends().into_iter().map(|(n, b)| (n, b.into())).collect();
            info.insert(
                "runtimeHandlerBackends".to_string(),
                serde_json::Value::Object(backends).to_string(),
            );
            if let Some(warning) = &self.isolation_warning {
                info.insert("hypervisorWarning".to_string(), warning.clone());
            }
        }
        Ok(Response::new(cri::StatusResponse {
            status: Some(cri::RuntimeStatus { conditions }),
            info,
            runtime_handlers: self
                .manager
                .handler_backends()
                .into_iter()
                .map(|(name, backend)| cri::RuntimeHandler {
                    name,
                    // The guest kernel has mount_setattr(2) for `rro` volumes.
                    features: Some(cri::RuntimeHandlerFeatures {
                        recursive_read_only_mounts: true,
                        // POD mode, made inside the guest; the host handler refuses it.
                        user_namespaces: backend != crate::hypervisor::host::NAME,
                    }),
                })
                .collect(),
            features: Some(cri::RuntimeFeatures { supplemental_groups_policy: true }),
        }))
    }

    async fn checkpoint_container(
        &self,
        _req: Request<cri::CheckpointContainerRequest>,
    ) -> CriResult<cri::CheckpointContainerResponse> {
        Err(Status::unimplemented("CheckpointContainer is not supported"))
    }

    type GetContainerEventsStream = std::pin::Pin<
        Box<dyn futures::Stream<Item = Result<cri::ContainerEventResponse, Status>> + Send>,
    >;

    async fn get_container_events(
        &self,
        _req: Request<cri::GetEventsRequest>,
    ) -> CriResult<Self::GetContainerEventsStream> {
        let events = self.manager.subscribe_events();
        let manager = self.manager.clone();
        let stream =
            futures::stream::unfold((events, manager), |(mut events, manager)| async move {
                loop {
                    match events.recv().await {
                        Ok(event) => {
                            if let Some(last) = &event.last {
                                let response = translate::container_event(
                                    &event,
                                    last.sandbox.as_ref(),
                                    &last.containers,
                                );
                                return Some((Ok(response), (events, manager)));
                            }
                            let sandbox = manager.sandbox(&event.sandbox_id).ok();
                            let containers: Vec<_> = if event.is_pod_event() {
                                manager
                                    .list_containers()
                                    .into_iter()
                                    .filter(|c| c.sandbox_id == event.sandbox_id)
                                    .collect()
                            } else {
                                manager.container(&event.container_id).into_iter().collect()
                            };
                            let response =
                                translate::container_event(&event, sandbox.as_ref(), &containers);
                            return Some((Ok(response), (events, manager)));
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                            // kubelet relists when it misses events: say so and go on.
                            tracing::warn!(missed, "an event subscriber fell behind");
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                    }
                }
            });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_metric_descriptors(
        &self,
        _req: Request<cri::ListMetricDescriptorsRequest>,
    ) -> CriResult<cri::ListMetricDescriptorsResponse> {
        Ok(Response::new(cri::ListMetricDescriptorsResponse {
            descriptors: cadvisor::descriptors(),
        }))
    }

    async fn list_pod_sandbox_metrics(
        &self,
        _req: Request<cri::ListPodSandboxMetricsRequest>,
    ) -> CriResult<cri::ListPodSandboxMetricsResponse> {
        let ready: Vec<String> = self
            .manager
            .list_sandboxes()
            .into_iter()
            .filter(|s| s.state == crate::sandbox::SandboxState::Ready)
            .map(|s| s.id)
            .collect();
        // All at once, as ListPodSandboxStats: a slow guest costs its own deadline only, and a
        // pod whose guest does not answer is left out rather than failing the list.
        let usages =
            futures::future::join_all(ready.iter().map(|id| self.manager.pod_stats(id))).await;
        let now = crate::sandbox::now_nanos();
        let pod_metrics = usages
            .into_iter()
            .filter_map(|u| u.ok().map(|u| cadvisor::pod_sandbox_metrics(&u, now)))
            .collect();
        Ok(Response::new(cri::ListPodSandboxMetricsResponse { pod_metrics }))
    }

    async fn runtime_config(
        &self,
        _req: Request<cri::RuntimeConfigRequest>,
    ) -> CriResult<cri::RuntimeConfigResponse> {
        Ok(Response::new(cri::RuntimeConfigResponse {
            linux: Some(cri::LinuxRuntimeConfiguration {
                cgroup_driver: cri::CgroupDriver::Cgroupfs as i32,
            }),
        }))
    }
}

/// Status' NetworkReady condition.
/// `VMIsolation`: false (with the reason) when pods' VMs are no security boundary. kubelet
/// looks only at RuntimeReady and NetworkReady, so this informs without taking the node down.
fn isolation_condition(warning: Option<&str>) -> cri::RuntimeCondition {
    let (status, reason, message) = match warning {
        None => (true, String::new(), String::new()),
        Some(why) => (false, "TCGIsNotASecurityBoundary".to_string(), why.to_string()),
    };
    cri::RuntimeCondition { r#type: "VMIsolation".into(), status, reason, message }
}

fn network_condition(ready: Result<(), String>) -> cri::RuntimeCondition {
    let (status, reason, message) = match ready {
        Ok(()) => (true, String::new(), String::new()),
        Err(why) => (false, "NetworkPluginNotReady".to_string(), why),
    };
    cri::RuntimeCondition { r#type: "NetworkReady".into(), status, reason, message }
}
