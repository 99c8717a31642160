//! Glue between the image store (crate `podvisor-image`) and the daemon: the CRI
//! ImageService, and the sandbox manager's [`ImageResolver`].
// TEMPORARY until podvisor-image's API lands: no images resolve.
use std::sync::Arc;
use crate::config::Config;
use crate::sandbox::{ImageResolver, ResolvedImage};
pub struct Images;
struct NoImages;
impl ImageResolver for NoImages {
    fn resolve(&self, _image: &str) -> Result<Option<ResolvedImage>, String> { Ok(None) }
}
pub fn open_store(_c: &Config) -> anyhow::Result<Images> { Ok(Images) }
impl Images {
    pub fn resolver(&self) -> Arc<dyn ImageResolver> { Arc::new(NoImages) }
    pub fn cri_service(&self) -> Unimpl { Unimpl }
}
pub struct Unimpl;
#[tonic::async_trait]
impl k8s_cri::v1::image_service_server::ImageService for Unimpl {
    async fn list_images(&self, _r: tonic::Request<k8s_cri::v1::ListImagesRequest>) -> Result<tonic::Response<k8s_cri::v1::ListImagesResponse>, tonic::Status> { Err(tonic::Status::unimplemented("")) }
    async fn image_status(&self, _r: tonic::Request<k8s_cri::v1::ImageStatusRequest>) -> Result<tonic::Response<k8s_cri::v1::ImageStatusResponse>, tonic::Status> { Err(tonic::Status::unimplemented("")) }
    async fn pull_image(&self, _r: tonic::Request<k8s_cri::v1::PullImageRequest>) -> Result<tonic::Response<k8s_cri::v1::PullImageResponse>, tonic::Status> { Err(tonic::Status::unimplemented("")) }
    async fn remove_image(&self, _r: tonic::Request<k8s_cri::v1::RemoveImageRequest>) -> Result<tonic::Response<k8s_cri::v1::RemoveImageResponse>, tonic::Status> { Err(tonic::Status::unimplemented("")) }
    async fn image_fs_info(&self, _r: tonic::Request<k8s_cri::v1::ImageFsInfoRequest>) -> Result<tonic::Response<k8s_cri::v1::ImageFsInfoResponse>, tonic::Status> { Err(tonic::Status::unimplemented("")) }
}
