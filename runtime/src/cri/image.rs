//! CRI ImageService: validates requests, translates them to the image store
//! (`podvisor-image`) and its results back, and maps store errors to gRPC codes.
//!
//! Self-contained on purpose (only `podvisor_image`, `k8s_cri`, `tonic`, `tokio`,
//! `serde_json`, and the daemon's metrics for pull durations): nothing here holds state beyond
//! the store.

use std::collections::HashMap;
use std::sync::Arc;

use k8s_cri::v1::image_service_server::ImageService;
use k8s_cri::v1::{
    AuthConfig, FilesystemIdentifier, FilesystemUsage, Image, ImageFsInfoRequest,
    ImageFsInfoResponse, ImageSpec, ImageStatusRequest, ImageStatusResponse, Int64Value,
    ListImagesRequest, ListImagesResponse, PullImageRequest, PullImageResponse, RemoveImageRequest,
    RemoveImageResponse, UInt64Value,
};
use podvisor_image::{Error, ImageRecord, ImageStore, RegistryCredentials, UnpackError};
use tonic::{Code, Request, Response, Status};

/// Who still uses an image: RemoveImage refuses while a container does (as CRI-O does), since
/// the container's root filesystem is the image's unpacked tree.
pub trait ImageUsers: Send + Sync {
    /// Holds image `image_id` for its removal (CreateContainer refuses it until the guard
    /// drops), or names the container (any state, also one being created) using it.
    fn hold_for_removal(&self, image_id: &str) -> Result<Box<dyn Send>, String>;
}

impl ImageUsers for Arc<crate::sandbox::SandboxManager> {
    fn hold_for_removal(&self, image_id: &str) -> Result<Box<dyn Send>, String> {
        Ok(Box::new(self.begin_image_removal(image_id)?))
    }
}

/// The CRI ImageService over an [`ImageStore`].
pub struct ImageServiceImpl {
    store: Arc<ImageStore>,
    users: Option<Arc<dyn ImageUsers>>,
}

impl ImageServiceImpl {
    /// Serves `store`; `users` (the sandbox manager) keeps images in use from being removed.
    pub fn new(store: Arc<ImageStore>, users: Option<Arc<dyn ImageUsers>>) -> Self {
        Self { store, users }
    }
}

fn io_code(error: &std::io::Error) -> Code {
    match error.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => Code::ResourceExhausted,
        _ => Code::Internal,
    }
}

/// The gRPC code for a store error; the message is the error's own (it names the cause).
pub fn error_code(error: &Error) -> Code {
    match error {
        Error::InvalidReference { .. } | Error::InvalidCredentials(_) | Error::InvalidDigest(_) => {
            Code::InvalidArgument
        }
        Error::ImageNotFound(_) | Error::ManifestUnknown { .. } => Code::NotFound,
        Error::NoMatchingPlatform { .. } => Code::NotFound,
        // Every mirror and the upstream failed: the last one tried speaks for them.
        Error::EndpointsFailed { last, .. } => error_code(last),
        // A stall is the registry's failure, and a retry may well succeed: Unavailable, not
        // DeadlineExceeded (which would read as the caller's own deadline passing).
        Error::RegistryUnreachable { .. } | Error::Registry { .. } | Error::PullStalled { .. } => {
            Code::Unavailable
        }
        Error::HttpClient { .. } | Error::ImagePinned { .. } => Code::FailedPrecondition,
        Error::Unauthorized { .. } => Code::Unauthenticated,
        Error::DigestMismatch { .. } | Error::SizeMismatch { .. } => Code::DataLoss,
        Error::ManifestTooLarge { .. }
        | Error::ConfigTooLarge { .. }
        | Error::ImageTooLarge { .. } => Code::ResourceExhausted,
        Error::InvalidSize { .. }
        | Error::UnsupportedManifest { .. }
        | Error::UnsupportedLayer(_)
        | Error::ParseManifest { .. }
        | Error::ParseConfig { .. }
        | Error::LayerCountMismatch { .. } => Code::FailedPrecondition,
        Error::Unpack { source, .. } => match source {
            UnpackError::UnsafePath { .. }
            | UnpackError::BadHardLink { .. }
            | UnpackError::SymlinkLoop { .. }
            | UnpackError::ReadTar(_)
            | UnpackError::Decompress(_) => Code::FailedPrecondition,
            UnpackError::DiffIdMismatch { .. } => Code::DataLoss,
            UnpackError::TooLarge { .. } => Code::ResourceExhausted,
            UnpackError::Create { source, .. } => io_code(source),
            _ => Code::Internal,
        },
        Error::WriteBlob { source, .. }
        | Error::WriteRecord { source, .. }
        | Error::UnpackDir { source, .. } => io_code(source),
        _ => Code::Internal,
    }
}

fn status(error: Error) -> Status {
    Status::new(error_code(&error), error.to_string())
}

fn image_name(spec: Option<&ImageSpec>) -> Result<&str, Status> {
    match spec.map(|s| s.image.trim()) {
        Some(name) if !name.is_empty() => Ok(name),
        _ => Err(Status::invalid_argument("image name is required (ImageSpec.image)")),
    }
}

fn credentials(auth: Option<&AuthConfig>) -> Result<Option<RegistryCredentials>, Status> {
    let Some(auth) = auth else {
        return Ok(None);
    };
    RegistryCredentials::from_fields(
        &auth.username,
        &auth.password,
        &auth.auth,
        &auth.identity_token,
        &auth.registry_token,
    )
    .map_err(status)
}

/// `size` is what removing the image frees (see `ImageStore::disk_usage`).
fn to_cri(record: &ImageRecord, size: u64, pinned: bool) -> Image {
    Image {
        id: record.id.clone(),
        repo_tags: record.repo_tags.clone(),
        repo_digests: record.repo_digests.clone(),
        size,
        uid: record.uid().map(|value| Int64Value { value }),
        username: record.username().unwrap_or_default().to_owned(),
        spec: Some(ImageSpec { image: record.id.clone(), ..Default::default() }),
        pinned,
    }
}

/// The CRI view of `records`, with their disk usage (a stat per blob; a walk of each tree the
/// first time) and pinned flags.
async fn cri_images(
    store: &Arc<ImageStore>,
    records: Vec<ImageRecord>,
) -> Result<Vec<Image>, Status> {
    blocking(store, move |s| {
        let images = records.iter().map(|r| {
            // One unreadable tree must not fail kubelet's whole ListImages: the compressed
            // size is a usable estimate.
            let size = s.disk_usage(r).map(|usage| usage.bytes).unwrap_or(r.size);
            to_cri(r, size, s.pinned_by(r).is_some())
        });
        Ok(images.collect())
    })
    .await
}

/// Runs a blocking store call off the async workers.
async fn blocking<T: Send + 'static>(
    store: &Arc<ImageStore>,
    call: impl FnOnce(&ImageStore) -> podvisor_image::Result<T> + Send + 'static,
) -> Result<T, Status> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || call(&store))
        .await
        .map_err(|e| Status::internal(format!("image store task failed: {e}")))?
        .map_err(status)
}

#[tonic::async_trait]
impl ImageService for ImageServiceImpl {
    async fn list_images(
        &self,
        request: Request<ListImagesRequest>,
    ) -> Result<Response<ListImagesResponse>, Status> {
        let wanted = request
            .into_inner()
            .filter
            .and_then(|f| f.image)
            .map(|spec| spec.image)
            .filter(|name| !name.trim().is_empty());
        let records = match wanted {
            Some(name) => self.store.resolve(&name).into_iter().collect(),
            None => self.store.list(),
        };
        let images = cri_images(&self.store, records).await?;
        Ok(Response::new(ListImagesResponse { images }))
    }

    async fn image_status(
        &self,
        request: Request<ImageStatusRequest>,
    ) -> Result<Response<ImageStatusResponse>, Status> {
        let request = request.into_inner();
        let name = image_name(request.image.as_ref())?;
        let Some(record) = self.store.resolve(name) else {
            return Ok(Response::new(ImageStatusResponse::default()));
        };
        let mut info = HashMap::new();
        if request.verbose {
            let id = record.id.clone();
            let config = blocking(&self.store, move |s| s.image_config(&id)).await?;
            let rootfs =
                self.store.dir().join("rootfs").join(record.id.trim_start_matches("sha256:"));
            let details = serde_json::json!({
                "id": record.id,
                "manifestDigest": record.manifest_digest,
                "indexDigests": record.index_digests,
                "layers": record.layers,
                "diffIds": record.diff_ids,
                "pulledAt": record.pulled_at,
                "rootfs": rootfs.is_dir().then(|| rootfs.display().to_string()),
                "imageSpec": config,
            });
            info.insert("info".to_owned(), details.to_string());
        }
        let image = cri_images(&self.store, vec![record]).await?.pop();
        Ok(Response::new(ImageStatusResponse { image, info }))
    }

    async fn pull_image(
        &self,
        request: Request<PullImageRequest>,
    ) -> Result<Response<PullImageResponse>, Status> {
        let request = request.into_inner();
        let name = image_name(request.image.as_ref())?;
        let credentials = credentials(request.auth.as_ref())?;
        let started = std::time::Instant::now();
        let record = self.store.pull(name, credentials.as_ref()).await.map_err(status)?;
        crate::metrics::global().image_pulled(started.elapsed());
        Ok(Response::new(PullImageResponse { image_ref: record.id }))
    }

    async fn remove_image(
        &self,
        request: Request<RemoveImageRequest>,
    ) -> Result<Response<RemoveImageResponse>, Status> {
        let name = image_name(request.get_ref().image.as_ref())?.to_owned();
        let mut _held = None;
        if let (Some(users), Some(record)) = (&self.users, self.store.resolve(&name)) {
            match users.hold_for_removal(&record.id) {
                Ok(hold) => _held = Some(hold),
                Err(container) => {
                    return Err(Status::failed_precondition(format!(
                        "image {name} ({}) is in use by container {container}; remove the \
                         container first",
                        record.id
                    )))
                }
            }
        }
        blocking(&self.store, move |s| s.remove(&name)).await?;
        Ok(Response::new(RemoveImageResponse {}))
    }

    async fn image_fs_info(
        &self,
        _request: Request<ImageFsInfoRequest>,
    ) -> Result<Response<ImageFsInfoResponse>, Status> {
        let usage = blocking(&self.store, |s| s.fs_info()).await?;
        Ok(Response::new(ImageFsInfoResponse {
            image_filesystems: vec![FilesystemUsage {
                timestamp: usage.timestamp_ns,
                fs_id: Some(FilesystemIdentifier {
                    mountpoint: usage.mountpoint.display().to_string(),
                }),
                used_bytes: Some(UInt64Value { value: usage.used_bytes }),
                inodes_used: Some(UInt64Value { value: usage.inodes_used }),
            }],
            container_filesystems: Vec::new(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use podvisor_image::ImageStoreConfig;

    fn service(dir: &std::path::Path) -> ImageServiceImpl {
        let store = ImageStore::open(dir, ImageStoreConfig::default()).unwrap();
        ImageServiceImpl::new(Arc::new(store), None)
    }

    fn spec(image: &str) -> Option<ImageSpec> {
        Some(ImageSpec { image: image.to_owned(), ..Default::default() })
    }

    #[tokio::test]
    async fn empty_store_answers_list_status_remove_and_fs_info() {
        let dir = tempfile::tempdir().unwrap();
        let service = service(dir.path());
        let list = service.list_images(Request::new(ListImagesRequest::default())).await.unwrap();
        assert!(list.get_ref().images.is_empty());
        let status = service
            .image_status(Request::new(ImageStatusRequest {
                image: spec("busybox"),
                verbose: true,
            }))
            .await
            .unwrap();
        assert!(status.get_ref().image.is_none());
        service
            .remove_image(Request::new(RemoveImageRequest { image: spec("busybox") }))
            .await
            .expect("removing an absent image is not an error");
        let fs = service.image_fs_info(Request::new(ImageFsInfoRequest::default())).await.unwrap();
        let usage = &fs.get_ref().image_filesystems[0];
        assert_eq!(
            usage.fs_id.as_ref().unwrap().mountpoint,
            dir.path().join("images").display().to_string()
        );
        assert!(usage.inodes_used.as_ref().unwrap().value >= 4);
    }

    #[tokio::test]
    async fn pull_errors_map_to_grpc_codes() {
        let dir = tempfile::tempdir().unwrap();
        let service = service(dir.path());
        let pull = |image: &str, auth: Option<AuthConfig>| PullImageRequest {
            image: spec(image),
            auth,
            sandbox_config: None,
        };
        let err = service.pull_image(Request::new(pull("", None))).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        let err = service.pull_image(Request::new(pull("Bad//Name", None))).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        let bad_auth = AuthConfig { auth: "%%%".into(), ..Default::default() };
        let err =
            service.pull_image(Request::new(pull("busybox", Some(bad_auth)))).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let err = service
            .pull_image(Request::new(pull(&format!("127.0.0.1:{port}/x:1"), None)))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{err}");
        assert!(err.message().contains(&format!("127.0.0.1:{port}")));
        let stalled = Error::PullStalled {
            host: "reg".into(),
            reference: "reg/x:1".into(),
            what: "blob sha256:00".into(),
            seconds: 60,
        };
        assert_eq!(error_code(&stalled), Code::Unavailable);
        let pinned = Error::ImagePinned {
            reference: "pause".into(),
            id: "sha256:00".into(),
            pinned: "registry.k8s.io/pause:3.9".into(),
        };
        assert_eq!(error_code(&pinned), Code::FailedPrecondition);
    }
}
