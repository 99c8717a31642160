//! UpdatePodSandboxResources (CRI v1.33, kubelet's in-place pod resize), which the generated
//! RuntimeService of k8s-cri 0.11 does not have. Its two messages are declared here from the
//! CRI's field numbers, and [`UpdateHandler`] answers its path in front of the generated
//! service, which serves every other method.

use std::sync::Arc;

use k8s_cri::v1 as cri;
use tonic::{Request, Response};

use super::translate;
use super::unary_route::{Answer, UnaryHandler};
use crate::sandbox::SandboxManager;

/// The method's path on the wire.
pub const PATH: &str = "/runtime.v1.RuntimeService/UpdatePodSandboxResources";

/// `runtime.v1.UpdatePodSandboxResourcesRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct UpdatePodSandboxResourcesRequest {
    #[prost(string, tag = "1")]
    pub pod_sandbox_id: String,
    /// The RuntimeClass overhead.
    #[prost(message, optional, tag = "2")]
    pub overhead: Option<cri::LinuxContainerResources>,
    /// The sum of the containers' resources.
    #[prost(message, optional, tag = "3")]
    pub resources: Option<cri::LinuxContainerResources>,
}

/// `runtime.v1.UpdatePodSandboxResourcesResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct UpdatePodSandboxResourcesResponse {}

/// Answers UpdatePodSandboxResources (see [`super::unary_route`]).
#[derive(Clone)]
pub struct UpdateHandler(pub Arc<SandboxManager>);

impl UnaryHandler for UpdateHandler {
    type Request = UpdatePodSandboxResourcesRequest;
    type Response = UpdatePodSandboxResourcesResponse;

    fn call(&self, request: Request<UpdatePodSandboxResourcesRequest>) -> Answer<Self::Response> {
        let manager = self.0.clone();
        Box::pin(async move {
            let req = request.into_inner();
            let demand = translate::pod_demand_of(req.resources.as_ref(), req.overhead.as_ref());
            manager
                .update_pod_resources(&req.pod_sandbox_id, demand)
                .await
                .map_err(super::status)?;
            Ok(Response::new(UpdatePodSandboxResourcesResponse {}))
        })
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    #[test]
    fn messages_use_the_cri_field_numbers() {
        let req = UpdatePodSandboxResourcesRequest {
            pod_sandbox_id: "p".into(),
            overhead: None,
            resources: Some(cri::LinuxContainerResources {
                memory_limit_in_bytes: 5,
                ..Default::default()
            }),
        };
        // Field 1 (string "p"), then field 3 (a message holding memory_limit_in_bytes, 4 = 5).
        assert_eq!(req.encode_to_vec(), [0x0a, 1, b'p', 0x1a, 2, 0x20, 5]);
    }
}
