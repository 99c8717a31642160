//! CRI `runtime.v1.RuntimeService`.

use std::collections::HashMap;
use std::sync::Arc;

use k8s_cri::v1 as cri;
use k8s_cri::v1::runtime_service_server::RuntimeService;
use tonic::{Request, Response, Status};

use crate::sandbox::{
    container::ContainerRequest, ContainerRecord, ContainerState, DnsSettings, PodMetadata,
    SandboxManager, SandboxRecord, SandboxRequest, SandboxState,
};

pub const RUNTIME_NAME: &str = "podvisor";
pub const CRI_API_VERSION: &str = "v1";

pub struct RuntimeServiceImpl {
    manager: Arc<SandboxManager>,
    /// Whether CNI networking is available (Status' NetworkReady condition).
    network_ready: bool,
    /// Which hypervisor backend runs pods and why (Status verbose info).
    backend_reason: String,
}

impl RuntimeServiceImpl {
    pub fn new(manager: Arc<SandboxManager>, backend_reason: String) -> Self {
        Self { manager, network_ready: false, backend_reason }
    }
}

type CriResult<T> = Result<Response<T>, Status>;

fn sandbox_state(s: SandboxState) -> i32 {
    match s {
        SandboxState::Ready => cri::PodSandboxState::SandboxReady as i32,
        SandboxState::NotReady => cri::PodSandboxState::SandboxNotready as i32,
    }
}

fn container_state(s: ContainerState) -> i32 {
    match s {
        ContainerState::Created => cri::ContainerState::ContainerCreated as i32,
        ContainerState::Running => cri::ContainerState::ContainerRunning as i32,
        ContainerState::Exited => cri::ContainerState::ContainerExited as i32,
        ContainerState::Unknown => cri::ContainerState::ContainerUnknown as i32,
    }
}

fn pod_metadata(r: &SandboxRecord) -> cri::PodSandboxMetadata {
    cri::PodSandboxMetadata {
        name: r.metadata.name.clone(),
        uid: r.metadata.uid.clone(),
        namespace: r.metadata.namespace.clone(),
        attempt: r.metadata.attempt,
    }
}

fn container_metadata(c: &ContainerRecord) -> cri::ContainerMetadata {
    cri::ContainerMetadata { name: c.metadata.name.clone(), attempt: c.metadata.attempt }
}

fn sandbox_status(r: &SandboxRecord) -> cri::PodSandboxStatus {
    let ns = cri::NamespaceOption {
        network: r.network_mode,
        pid: r.pid_mode,
        ipc: r.ipc_mode,
        ..Default::default()
    };
    cri::PodSandboxStatus {
        id: r.id.clone(),
        metadata: Some(pod_metadata(r)),
        state: sandbox_state(r.state),
        created_at: r.created_at,
        network: Some(cri::PodSandboxNetworkStatus::default()),
        linux: Some(cri::LinuxPodSandboxStatus {
            namespaces: Some(cri::Namespace { options: Some(ns) }),
        }),
        labels: r.labels.clone(),
        annotations: r.annotations.clone(),
        runtime_handler: r.runtime_handler.clone(),
    }
}

fn container_status(c: &ContainerRecord) -> cri::ContainerStatus {
    cri::ContainerStatus {
        id: c.id.clone(),
        metadata: Some(container_metadata(c)),
        state: container_state(c.state),
        created_at: c.created_at,
        started_at: c.started_at,
        finished_at: c.finished_at,
        exit_code: c.exit_code,
        image: Some(cri::ImageSpec { image: c.image.clone(), ..Default::default() }),
        image_ref: c.image_ref.clone(),
        image_id: c.image_id.clone(),
        reason: c.reason.clone(),
        message: c.message.clone(),
        labels: c.labels.clone(),
        annotations: c.annotations.clone(),
        mounts: c
            .mounts
            .iter()
            .map(|m| cri::Mount {
                container_path: m.container_path.clone(),
                host_path: m.host_path.clone(),
                readonly: m.read_only,
                ..Default::default()
            })
            .collect(),
        log_path: c.log_path.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
        ..Default::default()
    }
}

fn labels_match(labels: &HashMap<String, String>, selector: &HashMap<String, String>) -> bool {
    SandboxManager::labels_match(labels, selector)
}

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
        let req = req.into_inner();
        let config = req.config.ok_or_else(|| Status::invalid_argument("config is required"))?;
        let meta = config
            .metadata
            .ok_or_else(|| Status::invalid_argument("config.metadata is required"))?;
        if meta.name.is_empty() || meta.namespace.is_empty() {
            return Err(Status::invalid_argument(
                "metadata.name and metadata.namespace are required",
            ));
        }
        let linux = config.linux.unwrap_or_default();
        let ns = linux
            .security_context
            .as_ref()
            .and_then(|s| s.namespace_options.clone())
            .unwrap_or_default();
        if ns.network == cri::NamespaceMode::Node as i32 {
            // Host networking would put the pod on the node's network stack, outside its VM.
            return Err(Status::invalid_argument(
                "host network pods are not supported by a VM runtime",
            ));
        }
        let dns = config.dns_config.unwrap_or_default();
        let hostname =
            if config.hostname.is_empty() { meta.name.clone() } else { config.hostname.clone() };
        let id = self
            .manager
            .run_sandbox(SandboxRequest {
                metadata: PodMetadata {
                    name: meta.name,
                    uid: meta.uid,
                    namespace: meta.namespace,
                    attempt: meta.attempt,
                },
                labels: config.labels,
                annotations: config.annotations,
                log_directory: config.log_directory,
                hostname,
                runtime_handler: req.runtime_handler,
                dns: DnsSettings {
                    servers: dns.servers,
                    searches: dns.searches,
                    options: dns.options,
                },
                network_mode: ns.network,
                pid_mode: ns.pid,
                ipc_mode: ns.ipc,
                sysctls: linux.sysctls,
            })
            .await?;
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
        self.manager.stop_sandbox(&id).await?;
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
        self.manager.remove_sandbox(&id).await?;
        Ok(Response::new(cri::RemovePodSandboxResponse {}))
    }

    async fn pod_sandbox_status(
        &self,
        req: Request<cri::PodSandboxStatusRequest>,
    ) -> CriResult<cri::PodSandboxStatusResponse> {
        let req = req.into_inner();
        let rec = self.manager.sandbox(&req.pod_sandbox_id)?;
        let mut info = HashMap::new();
        if req.verbose {
            let vm = rec.vm.as_ref();
            let detail = serde_json::json!({
                "backend": vm.map(|v| v.backend.clone()),
                "processes": vm.map(|v| v.processes.clone()),
                "vsock": vm.map(|v| v.vsock_uds.clone()),
                "consoleLog": self.manager.console_log_path(&rec.id),
            });
            info.insert("info".to_string(), detail.to_string());
        }
        let containers_statuses = self
            .manager
            .list_containers()
            .iter()
            .filter(|c| c.sandbox_id == rec.id)
            .map(container_status)
            .collect();
        Ok(Response::new(cri::PodSandboxStatusResponse {
            status: Some(sandbox_status(&rec)),
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
            .map(|s| cri::PodSandbox {
                id: s.id.clone(),
                metadata: Some(pod_metadata(&s)),
                state: sandbox_state(s.state),
                created_at: s.created_at,
                labels: s.labels.clone(),
                annotations: s.annotations.clone(),
                runtime_handler: s.runtime_handler.clone(),
            })
            .collect();
        Ok(Response::new(cri::ListPodSandboxResponse { items }))
    }

    async fn create_container(
        &self,
        req: Request<cri::CreateContainerRequest>,
    ) -> CriResult<cri::CreateContainerResponse> {
        let req = req.into_inner();
        if req.pod_sandbox_id.is_empty() {
            return Err(Status::invalid_argument("pod_sandbox_id is required"));
        }
        let config = req.config.ok_or_else(|| Status::invalid_argument("config is required"))?;
        if config.metadata.as_ref().is_none_or(|m| m.name.is_empty()) {
            return Err(Status::invalid_argument("config.metadata.name is required"));
        }
        let id = self
            .manager
            .create_container(ContainerRequest { sandbox_id: req.pod_sandbox_id, config })
            .await?;
        Ok(Response::new(cri::CreateContainerResponse { container_id: id }))
    }

    async fn start_container(
        &self,
        req: Request<cri::StartContainerRequest>,
    ) -> CriResult<cri::StartContainerResponse> {
        self.manager.start_container(&req.into_inner().container_id).await?;
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
        self.manager.stop_container(&req.container_id, req.timeout).await?;
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
        self.manager.remove_container(&id).await?;
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
            .map(|c| cri::Container {
                id: c.id.clone(),
                pod_sandbox_id: c.sandbox_id.clone(),
                metadata: Some(container_metadata(&c)),
                image: Some(cri::ImageSpec { image: c.image.clone(), ..Default::default() }),
                image_ref: c.image_ref.clone(),
                image_id: c.image_id.clone(),
                state: container_state(c.state),
                created_at: c.created_at,
                labels: c.labels.clone(),
                annotations: c.annotations.clone(),
            })
            .collect();
        Ok(Response::new(cri::ListContainersResponse { containers }))
    }

    async fn container_status(
        &self,
        req: Request<cri::ContainerStatusRequest>,
    ) -> CriResult<cri::ContainerStatusResponse> {
        let req = req.into_inner();
        let rec = self.manager.container(&req.container_id)?;
        let mut info = HashMap::new();
        if req.verbose {
            info.insert(
                "info".to_string(),
                serde_json::json!({ "sandboxID": rec.sandbox_id, "pid": rec.pid, "process": serde_json::from_str::<serde_json::Value>(&rec.oci_process_json).ok() }).to_string(),
            );
        }
        Ok(Response::new(cri::ContainerStatusResponse {
            status: Some(container_status(&rec)),
            info,
        }))
    }

    async fn update_container_resources(
        &self,
        _req: Request<cri::UpdateContainerResourcesRequest>,
    ) -> CriResult<cri::UpdateContainerResourcesResponse> {
        Err(Status::unimplemented("UpdateContainerResources is not supported yet"))
    }

    async fn reopen_container_log(
        &self,
        req: Request<cri::ReopenContainerLogRequest>,
    ) -> CriResult<cri::ReopenContainerLogResponse> {
        self.manager.reopen_container_log(&req.into_inner().container_id)?;
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
        let out = self.manager.exec_sync(&req.container_id, req.cmd, req.timeout).await?;
        Ok(Response::new(cri::ExecSyncResponse {
            stdout: out.stdout,
            stderr: out.stderr,
            exit_code: out.exit_code,
        }))
    }

    async fn exec(&self, _req: Request<cri::ExecRequest>) -> CriResult<cri::ExecResponse> {
        Err(Status::unimplemented("Exec streaming is not supported yet; use ExecSync"))
    }

    async fn attach(&self, _req: Request<cri::AttachRequest>) -> CriResult<cri::AttachResponse> {
        Err(Status::unimplemented("Attach is not supported yet"))
    }

    async fn port_forward(
        &self,
        _req: Request<cri::PortForwardRequest>,
    ) -> CriResult<cri::PortForwardResponse> {
        Err(Status::unimplemented("PortForward is not supported yet"))
    }

    async fn container_stats(
        &self,
        req: Request<cri::ContainerStatsRequest>,
    ) -> CriResult<cri::ContainerStatsResponse> {
        let id = req.into_inner().container_id;
        let rec = self.manager.container(&id)?;
        let s = self.manager.container_stats(&rec.id).await?;
        Ok(Response::new(cri::ContainerStatsResponse { stats: Some(to_cri_stats(&rec, &s)) }))
    }

    async fn list_container_stats(
        &self,
        req: Request<cri::ListContainerStatsRequest>,
    ) -> CriResult<cri::ListContainerStatsResponse> {
        let filter = req.into_inner().filter.unwrap_or_default();
        let mut stats = Vec::new();
        for c in self.manager.list_containers() {
            if c.state != ContainerState::Running
                || !(filter.id.is_empty() || c.id.starts_with(&filter.id))
                || !(filter.pod_sandbox_id.is_empty()
                    || c.sandbox_id.starts_with(&filter.pod_sandbox_id))
                || !labels_match(&c.labels, &filter.label_selector)
            {
                continue;
            }
            if let Ok(s) = self.manager.container_stats(&c.id).await {
                stats.push(to_cri_stats(&c, &s));
            }
        }
        Ok(Response::new(cri::ListContainerStatsResponse { stats }))
    }

    async fn pod_sandbox_stats(
        &self,
        _req: Request<cri::PodSandboxStatsRequest>,
    ) -> CriResult<cri::PodSandboxStatsResponse> {
        Err(Status::unimplemented("PodSandboxStats is not supported yet"))
    }

    async fn list_pod_sandbox_stats(
        &self,
        _req: Request<cri::ListPodSandboxStatsRequest>,
    ) -> CriResult<cri::ListPodSandboxStatsResponse> {
        Err(Status::unimplemented("ListPodSandboxStats is not supported yet"))
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
            cri::RuntimeCondition {
                r#type: "NetworkReady".into(),
                status: self.network_ready,
                reason: if self.network_ready {
                    String::new()
                } else {
                    "NetworkPluginNotReady".into()
                },
                message: if self.network_ready {
                    String::new()
                } else {
                    "CNI networking is not implemented yet: pods get no network interface".into()
                },
            },
        ];
        let mut info = HashMap::new();
        if req.into_inner().verbose {
            info.insert("hypervisor".to_string(), self.manager.hypervisor_name().to_string());
            info.insert("hypervisorReason".to_string(), self.backend_reason.clone());
        }
        Ok(Response::new(cri::StatusResponse {
            status: Some(cri::RuntimeStatus { conditions }),
            info,
            runtime_handlers: vec![cri::RuntimeHandler {
                name: String::new(),
                features: Some(cri::RuntimeHandlerFeatures::default()),
            }],
            features: Some(cri::RuntimeFeatures::default()),
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
        Err(Status::unimplemented("GetContainerEvents is not supported yet"))
    }

    async fn list_metric_descriptors(
        &self,
        _req: Request<cri::ListMetricDescriptorsRequest>,
    ) -> CriResult<cri::ListMetricDescriptorsResponse> {
        Ok(Response::new(cri::ListMetricDescriptorsResponse { descriptors: vec![] }))
    }

    async fn list_pod_sandbox_metrics(
        &self,
        _req: Request<cri::ListPodSandboxMetricsRequest>,
    ) -> CriResult<cri::ListPodSandboxMetricsResponse> {
        Ok(Response::new(cri::ListPodSandboxMetricsResponse { pod_metrics: vec![] }))
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

fn to_cri_stats(
    c: &ContainerRecord,
    s: &podvisor_proto::agent::ContainerStatsResponse,
) -> cri::ContainerStats {
    let attributes = cri::ContainerAttributes {
        id: c.id.clone(),
        metadata: Some(container_metadata(c)),
        labels: c.labels.clone(),
        annotations: c.annotations.clone(),
    };
    cri::ContainerStats {
        attributes: Some(attributes),
        cpu: Some(cri::CpuUsage {
            timestamp: s.timestamp_unix_nanos,
            usage_core_nano_seconds: Some(cri::UInt64Value { value: s.cpu_usage_nanos }),
            ..Default::default()
        }),
        memory: Some(cri::MemoryUsage {
            timestamp: s.timestamp_unix_nanos,
            working_set_bytes: Some(cri::UInt64Value { value: s.memory_working_set_bytes }),
            usage_bytes: Some(cri::UInt64Value { value: s.memory_usage_bytes }),
            ..Default::default()
        }),
        ..Default::default()
    }
}
