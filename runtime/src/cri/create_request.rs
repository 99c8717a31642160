//! CreateContainer with the CRI v1.33 `Mount.image_sub_path` (field 10), which k8s-cri 0.11's
//! `Mount` lacks, so prost would drop it and an image volume with a subPath would silently
//! mount the image's root. [`WithImageSubPaths`] decodes CreateContainer's request once more
//! for that field and hands the generated service the sub paths as a request extension,
//! [`ImageSubPaths`]; every other method passes straight through.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use k8s_cri::v1 as cri;
use k8s_cri::v1::runtime_service_server::RuntimeService;
use prost::Message;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::{Request, Response, Status};

use super::runtime::RuntimeServiceImpl;

/// The method's path on the wire.
pub const PATH: &str = "/runtime.v1.RuntimeService/CreateContainer";

/// The mounts' `image_sub_path`s of a CreateContainer request, by mount index (empty = none).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageSubPaths(pub Vec<String>);

/// `runtime.v1.CreateContainerRequest` with its config left encoded, to be decoded twice.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RawCreateContainerRequest {
    #[prost(string, tag = "1")]
    pub pod_sandbox_id: String,
    #[prost(bytes = "vec", optional, tag = "2")]
    pub config: Option<Vec<u8>>,
    #[prost(message, optional, tag = "3")]
    pub sandbox_config: Option<cri::PodSandboxConfig>,
}

/// The part of `runtime.v1.ContainerConfig` k8s-cri 0.11 does not know: its mounts' sub paths.
#[derive(Clone, PartialEq, prost::Message)]
struct ConfigSubPaths {
    #[prost(message, repeated, tag = "7")]
    mounts: Vec<MountSubPath>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct MountSubPath {
    #[prost(string, tag = "10")]
    image_sub_path: String,
}

impl RawCreateContainerRequest {
    /// The request as k8s-cri knows it, and its mounts' sub paths.
    fn split(self) -> Result<(cri::CreateContainerRequest, ImageSubPaths), Status> {
        let bad = |e: prost::DecodeError| Status::invalid_argument(format!("config: {e}"));
        let (config, sub_paths) = match self.config {
            Some(bytes) => {
                let config = cri::ContainerConfig::decode(bytes.as_slice()).map_err(bad)?;
                let extra = ConfigSubPaths::decode(bytes.as_slice()).map_err(bad)?;
                (Some(config), extra.mounts.into_iter().map(|m| m.image_sub_path).collect())
            }
            None => (None, Vec::new()),
        };
        let request = cri::CreateContainerRequest {
            pod_sandbox_id: self.pod_sandbox_id,
            config,
            sandbox_config: self.sandbox_config,
        };
        Ok((request, ImageSubPaths(sub_paths)))
    }
}

/// The generated RuntimeService, with CreateContainer's sub paths decoded.
#[derive(Clone)]
pub struct WithImageSubPaths<S> {
    inner: S,
    runtime: Arc<RuntimeServiceImpl>,
}

impl<S> WithImageSubPaths<S> {
    pub fn new(inner: S, runtime: Arc<RuntimeServiceImpl>) -> Self {
        Self { inner, runtime }
    }
}

impl<S> NamedService for WithImageSubPaths<S> {
    const NAME: &'static str = "runtime.v1.RuntimeService";
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = Result<T, Infallible>> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for WithImageSubPaths<S>
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
        let handler = CreateHandler(self.runtime.clone());
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
            Ok(grpc.unary(handler, req).await)
        })
    }
}

struct CreateHandler(Arc<RuntimeServiceImpl>);

impl tonic::server::UnaryService<RawCreateContainerRequest> for CreateHandler {
    type Response = cri::CreateContainerResponse;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Self::Response>, Status>> + Send>>;

    fn call(&mut self, request: Request<RawCreateContainerRequest>) -> Self::Future {
        let runtime = self.0.clone();
        Box::pin(async move {
            let (metadata, extensions, raw) = request.into_parts();
            let (create, sub_paths) = raw.split()?;
            let mut request = Request::from_parts(metadata, extensions, create);
            request.extensions_mut().insert(sub_paths);
            runtime.create_container(request).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sub_paths_are_read_by_mount_index_from_field_10() {
        let one =
            cri::ContainerConfig { mounts: vec![cri::Mount::default()], ..Default::default() };
        let mut bytes = one.encode_to_vec();
        // A second mount (field 7) holding only image_sub_path (field 10) = "etc".
        bytes.extend([0x3a, 5, 0x52, 3, b'e', b't', b'c']);
        let raw = RawCreateContainerRequest {
            pod_sandbox_id: "p".into(),
            config: Some(bytes),
            sandbox_config: None,
        };
        let (request, sub_paths) = raw.split().unwrap();
        assert_eq!(request.pod_sandbox_id, "p");
        assert_eq!(request.config.unwrap().mounts.len(), 2);
        assert_eq!(sub_paths, ImageSubPaths(vec![String::new(), "etc".into()]));
    }

    #[test]
    fn the_raw_request_decodes_what_k8s_cri_encodes() {
        let create = cri::CreateContainerRequest {
            pod_sandbox_id: "p".into(),
            config: Some(cri::ContainerConfig { tty: true, ..Default::default() }),
            sandbox_config: Some(cri::PodSandboxConfig {
                hostname: "h".into(),
                ..Default::default()
            }),
        };
        let raw = RawCreateContainerRequest::decode(create.encode_to_vec().as_slice()).unwrap();
        let (back, sub_paths) = raw.split().unwrap();
        assert_eq!(back, create);
        assert!(sub_paths.0.is_empty());
    }
}
