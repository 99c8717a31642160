//! CreateContainer with the CRI v1.33 `Mount.image_sub_path` (field 10), which k8s-cri 0.11's
//! `Mount` lacks, so prost would drop it and an image volume with a subPath would silently
//! mount the image's root. [`CreateHandler`] decodes CreateContainer's request once more
//! for that field and hands the generated service the sub paths as a request extension,
//! [`ImageSubPaths`]; every other method passes straight through.

use std::sync::Arc;

use k8s_cri::v1 as cri;
use k8s_cri::v1::runtime_service_server::RuntimeService;
use prost::Message;
use tonic::{Request, Status};

use super::runtime::RuntimeServiceImpl;
use super::unary_route::{Answer, UnaryHandler};

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
/// Answers CreateContainer (see [`super::unary_route`]).
#[derive(Clone)]
pub struct CreateHandler(pub Arc<RuntimeServiceImpl>);

impl UnaryHandler for CreateHandler {
    type Request = RawCreateContainerRequest;
    type Response = cri::CreateContainerResponse;

    fn call(&self, request: Request<RawCreateContainerRequest>) -> Answer<Self::Response> {
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
