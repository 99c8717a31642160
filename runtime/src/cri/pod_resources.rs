//! UpdatePodSandboxResources (CRI v1.33, kubelet's in-place pod resize), which the generated
//! RuntimeService of k8s-cri 0.11 does not have. Its two messages are declared here from the
//! CRI's field numbers, and [`WithPodResources`] answers its path in front of the generated
//! service, which serves every other method.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use k8s_cri::v1 as cri;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::{Request, Response, Status};

use super::translate;
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

/// The generated RuntimeService, plus UpdatePodSandboxResources.
#[derive(Clone)]
pub struct WithPodResources<S> {
    inner: S,
    manager: Arc<SandboxManager>,
}

impl<S> WithPodResources<S> {
    pub fn new(inner: S, manager: Arc<SandboxManager>) -> Self {
        Self { inner, manager }
    }
}

impl<S> NamedService for WithPodResources<S> {
    const NAME: &'static str = "runtime.v1.RuntimeService";
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = Result<T, Infallible>> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for WithPodResources<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<Body>, Error = Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != PATH {
            return Box::pin(self.inner.call(req));
        }
        let handler = UpdateHandler(self.manager.clone());
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
            Ok(grpc.unary(handler, req).await)
        })
    }
}

struct UpdateHandler(Arc<SandboxManager>);

impl tonic::server::UnaryService<UpdatePodSandboxResourcesRequest> for UpdateHandler {
    type Response = UpdatePodSandboxResourcesResponse;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Self::Response>, Status>> + Send>>;

    fn call(&mut self, request: Request<UpdatePodSandboxResourcesRequest>) -> Self::Future {
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
