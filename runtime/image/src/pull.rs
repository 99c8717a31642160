//! Pulling: manifests and blobs from a registry into the store, then the unpack.

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use oci_client::errors::OciErrorCode;
use oci_client::manifest::{
    OciDescriptor, OciImageIndex, OciImageManifest, IMAGE_MANIFEST_LIST_MEDIA_TYPE,
    IMAGE_MANIFEST_MEDIA_TYPE, OCI_IMAGE_INDEX_MEDIA_TYPE, OCI_IMAGE_MEDIA_TYPE,
};
use oci_client::secrets::RegistryAuth;
use oci_client::Reference;
use reqwest::StatusCode;
use sha2::Digest;
use tokio::io::AsyncWriteExt;
use tracing::{debug, info, warn};

use crate::mirrors::{self, Endpoint, EndpointTls};
use crate::registry::{read_small, status_error, RegistryError, RegistryHttp};
use crate::{
    auth, digest_hex, parse_image_config, parse_reference, sha256_digest, Error, ImageRecord,
    ImageStore, RegistryCredentials, Result,
};

/// Manifest media types asked for (schema 1 is not).
const ACCEPTED_MANIFESTS: &[&str] = &[
    OCI_IMAGE_MEDIA_TYPE,
    OCI_IMAGE_INDEX_MEDIA_TYPE,
    IMAGE_MANIFEST_MEDIA_TYPE,
    IMAGE_MANIFEST_LIST_MEDIA_TYPE,
];

/// Layer media types whose content is a (possibly compressed) tar.
const TAR_LAYERS: &[&str] = &[
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
];

/// Everything a failing registry call is reported against.
struct Target<'a> {
    host: &'a str,
    reference: &'a str,
    /// Longest the registry may stay silent (`ImageStoreConfig::pull_progress_timeout`).
    progress_timeout: Option<Duration>,
}

impl Target<'_> {
    /// Awaits one registry step (a request, a chunk of a body), failing with `PullStalled`
    /// once it has brought nothing for the progress timeout.
    async fn within_progress_timeout<T>(
        &self,
        what: &str,
        step: impl Future<Output = T>,
    ) -> Result<T> {
        let Some(limit) = self.progress_timeout else {
            return Ok(step.await);
        };
        tokio::time::timeout(limit, step).await.map_err(|_| Error::PullStalled {
            host: self.host.to_owned(),
            reference: self.reference.to_owned(),
            what: what.to_owned(),
            seconds: limit.as_secs(),
        })
    }

    fn error(&self, error: RegistryError) -> Error {
        let unauthorized = || Error::Unauthorized {
            host: self.host.to_owned(),
            reference: self.reference.to_owned(),
        };
        let unknown = || Error::ManifestUnknown {
            host: self.host.to_owned(),
            reference: self.reference.to_owned(),
        };
        let failed = |message: String| Error::Registry {
            host: self.host.to_owned(),
            reference: self.reference.to_owned(),
            message,
        };
        match error {
            RegistryError::Transport(e) if e.is_connect() || e.is_timeout() => {
                Error::RegistryUnreachable { host: self.host.to_owned(), message: error_chain(&e) }
            }
            // A TLS alert after the handshake (a client certificate refused) arrives with the
            // response: its reason is in the source chain.
            RegistryError::Transport(e) => failed(error_chain(&e)),
            RegistryError::TokenRefused { status, .. }
                if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN =>
            {
                unauthorized()
            }
            RegistryError::Status { status, envelope, .. }
                if status == StatusCode::UNAUTHORIZED
                    || status == StatusCode::FORBIDDEN
                    || envelope.as_ref().is_some_and(|e| {
                        e.errors.iter().any(|e| {
                            matches!(e.code, OciErrorCode::Unauthorized | OciErrorCode::Denied)
                        })
                    }) =>
            {
                unauthorized()
            }
            RegistryError::Status { status, envelope, .. }
                if status == StatusCode::NOT_FOUND
                    || envelope.as_ref().is_some_and(|e| {
                        e.errors.iter().any(|e| {
                            matches!(
                                e.code,
                                OciErrorCode::ManifestUnknown
                                    | OciErrorCode::NameUnknown
                                    | OciErrorCode::NotFound
                                    | OciErrorCode::BlobUnknown
                            )
                        })
                    }) =>
            {
                unknown()
            }
            other => failed(other.to_string()),
        }
    }
}

/// One endpoint (a mirror or the upstream) a pull talks to, set up.
#[derive(Clone)]
struct Source {
    /// `host[:port]` contacted.
    host: String,
    /// The image on that endpoint: its host, the repository under the mirror's prefix, the
    /// requested tag or digest.
    reference: Reference,
    /// The endpoint's HTTP client, authorized for `reference`'s repository.
    http: std::sync::Arc<RegistryHttp>,
}

impl Source {
    fn target<'a>(&'a self, reference: &'a str, progress_timeout: Option<Duration>) -> Target<'a> {
        Target { host: &self.host, reference, progress_timeout }
    }

    fn registry_client<'a>(
        &'a self,
        target: &'a Target<'a>,
        max_manifest_bytes: u64,
    ) -> RegistryClient<'a> {
        RegistryClient { http: &self.http, target, max_manifest_bytes }
    }
}

/// Whether a pull tries the next endpoint after this error: the endpoint is unreachable,
/// lacks the image, refuses us or fails. Not when it sent something hostile (too large, a
/// wrong digest), which no other endpoint excuses.
fn moves_on(error: &Error) -> bool {
    matches!(
        error,
        Error::RegistryUnreachable { .. }
            | Error::ManifestUnknown { .. }
            | Error::Unauthorized { .. }
            | Error::Registry { .. }
            | Error::PullStalled { .. }
            | Error::HttpClient { .. }
    )
}

/// An error with its sources ("error sending request: connection refused").
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

/// "os/arch[/variant]" of each index entry, for the no-matching-platform error.
fn platforms(index: &OciImageIndex) -> String {
    index
        .manifests
        .iter()
        .map(|entry| match &entry.platform {
            Some(p) => match &p.variant {
                Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
                None => format!("{}/{}", p.os, p.architecture),
            },
            None => "unknown".to_owned(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Bytes of one pull's blobs, shared by its downloads and its progress log.
struct PullProgress {
    /// Received, or found already stored.
    done: AtomicU64,
    /// Received from the registry (for the rate).
    received: AtomicU64,
    /// The config's and layers' sizes from the manifest.
    total: u64,
    started: Instant,
}

impl PullProgress {
    fn new(total: u64) -> Self {
        Self {
            done: AtomicU64::new(0),
            received: AtomicU64::new(0),
            total,
            started: Instant::now(),
        }
    }

    fn received(&self, bytes: u64) {
        self.done.fetch_add(bytes, Ordering::Relaxed);
        self.received.fetch_add(bytes, Ordering::Relaxed);
    }

    fn already_stored(&self, bytes: u64) {
        self.done.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Received bytes per second since the pull started.
    fn rate(&self) -> u64 {
        let seconds = self.started.elapsed().as_secs_f64().max(0.001);
        (self.received.load(Ordering::Relaxed) as f64 / seconds) as u64
    }

    /// Logs bytes done / total every `interval`; never returns (dropped when the downloads end).
    async fn log_every(&self, reference: &str, interval: Duration) {
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        loop {
            ticks.tick().await;
            let done = self.done.load(Ordering::Relaxed);
            info!(
                reference,
                done,
                total = self.total,
                percent = done.saturating_mul(100).checked_div(self.total).unwrap_or(0),
                bytes_per_second = self.rate(),
                "pulling image"
            );
        }
    }
}

fn is_index(media_type: Option<&str>, body: &serde_json::Value) -> bool {
    match media_type {
        Some(t) => t == OCI_IMAGE_INDEX_MEDIA_TYPE || t == IMAGE_MANIFEST_LIST_MEDIA_TYPE,
        None => body.get("manifests").is_some(),
    }
}

impl ImageStore {
    fn is_insecure(&self, registry: &str) -> bool {
        let host = match registry.rsplit_once(':') {
            Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
            _ => registry,
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        host == "localhost"
            || host == "::1"
            || host.starts_with("127.")
            || self.config.insecure_registries.iter().any(|r| r == registry || r == host)
    }

    /// The HTTP client of one endpoint. `Error::HttpClient` when it cannot be built (a host
    /// without CA certificates, say) rather than a panic.
    fn registry_http(
        &self,
        host: &str,
        plain_http: bool,
        repository: &str,
        tls: &EndpointTls,
        auth: RegistryAuth,
    ) -> Result<std::sync::Arc<RegistryHttp>> {
        RegistryHttp::new(host, plain_http, repository, tls, self.config.connect_timeout, auth)
            .map(std::sync::Arc::new)
            .map_err(|e| Error::HttpClient { host: host.to_owned(), message: error_chain(&e) })
    }

    fn registry_auth(
        &self,
        registry: &str,
        credentials: Option<&RegistryCredentials>,
    ) -> Result<RegistryAuth> {
        if let Some(credentials) = credentials {
            return Ok(credentials.to_registry_auth());
        }
        if let Some(path) = &self.config.docker_config {
            if let Some(found) = auth::from_docker_config(path, registry)? {
                return Ok(found.to_registry_auth());
            }
        }
        Ok(RegistryAuth::Anonymous)
    }

    /// Pulls `reference` (tag or digest; an index resolves to linux/amd64), verifies every
    /// blob, unpacks the root file system and records the image. Concurrent pulls of the same
    /// content share downloads and the unpack. Returns the image record (its `id` is what CRI
    /// `PullImage` returns).
    pub async fn pull(
        &self,
        reference: &str,
        credentials: Option<&RegistryCredentials>,
    ) -> Result<ImageRecord> {
        let parsed = parse_reference(reference)?;
        let whole = parsed.whole();
        let started = Instant::now();
        // Top-level manifest or index, by tag or digest, from the first endpoint that has it.
        let (source, top_bytes) = self.first_source_with(&parsed, &whole, credentials).await?;
        let target = source.target(&whole, self.config.pull_progress_timeout);
        let registry_client = source.registry_client(&target, self.config.max_manifest_bytes);
        let top_digest = sha256_digest(&top_bytes);
        if let Some(wanted) = parsed.digest() {
            if wanted != top_digest {
                return Err(Error::DigestMismatch {
                    what: format!("manifest of {whole}"),
                    expected: wanted.to_owned(),
                    actual: top_digest,
                });
            }
        }
        let top_json: serde_json::Value = serde_json::from_slice(&top_bytes)
            .map_err(|source| Error::ParseManifest { digest: top_digest.clone(), source })?;
        let media_type = top_json.get("mediaType").and_then(|t| t.as_str());
        let mut pinned = vec![top_digest.clone()];
        let _top_pin = self.pin(&pinned);

        let (manifest_digest, manifest_bytes, index_digest) = if is_index(media_type, &top_json) {
            let index: OciImageIndex = serde_json::from_slice(&top_bytes)
                .map_err(|source| Error::ParseManifest { digest: top_digest.clone(), source })?;
            let Some(entry) = index.manifests.iter().find(|entry| {
                entry.platform.as_ref().is_some_and(|p| {
                    p.os == oci_spec::image::Os::Linux
                        && p.architecture == oci_spec::image::Arch::Amd64
                })
            }) else {
                return Err(Error::NoMatchingPlatform {
                    reference: whole.clone(),
                    platforms: platforms(&index),
                });
            };
            digest_hex(&entry.digest)?;
            let what = format!("linux/amd64 manifest of {whole}");
            let size = declared_size(&entry.digest, entry.size)?;
            if size > self.config.max_manifest_bytes {
                return Err(Error::ManifestTooLarge {
                    what,
                    limit: self.config.max_manifest_bytes,
                });
            }
            let by_digest = source.reference.clone_with_digest(entry.digest.clone());
            let bytes = target
                .within_progress_timeout(
                    "the linux/amd64 manifest",
                    registry_client.manifest(&by_digest, &what),
                )
                .await??;
            check_content(&entry.digest, size, &bytes, &what)?;
            (entry.digest.clone(), bytes, Some(top_digest.clone()))
        } else {
            (top_digest.clone(), top_bytes.clone(), None)
        };
        let manifest: OciImageManifest = serde_json::from_slice(&manifest_bytes)
            .map_err(|source| Error::ParseManifest { digest: manifest_digest.clone(), source })?;
        if let Some(t) = &manifest.media_type {
            if t == OCI_IMAGE_INDEX_MEDIA_TYPE || t == IMAGE_MANIFEST_LIST_MEDIA_TYPE {
                return Err(Error::UnsupportedManifest {
                    reference: whole.clone(),
                    reason: "index inside an index".to_owned(),
                });
            }
        }
        if manifest.layers.is_empty() {
            return Err(Error::UnsupportedManifest {
                reference: whole.clone(),
                reason: "no layers".to_owned(),
            });
        }
        for layer in &manifest.layers {
            if !TAR_LAYERS.contains(&layer.media_type.as_str()) {
                return Err(Error::UnsupportedLayer(layer.media_type.clone()));
            }
            digest_hex(&layer.digest)?;
        }
        let image_id = manifest.config.digest.clone();
        digest_hex(&image_id)?;
        let size = self.check_sizes(&manifest, &whole)?;

        pinned.push(manifest_digest.clone());
        pinned.push(image_id.clone());
        pinned.extend(manifest.layers.iter().map(|l| l.digest.clone()));
        let _pin = self.pin(&pinned);

        self.put_blob(&top_digest, &top_bytes, &format!("manifest of {whole}"))?;
        self.put_blob(
            &manifest_digest,
            &manifest_bytes,
            &format!("linux/amd64 manifest of {whole}"),
        )?;

        let progress = PullProgress::new(size);
        self.fetch_blob(&registry_client, &progress, &manifest.config).await?;
        let config_bytes = self.read_blob(&image_id)?;
        let config = oci_spec::image::ImageConfiguration::from_reader(&config_bytes[..])
            .map_err(|e| Error::ParseConfig { digest: image_id.clone(), reason: e.to_string() })?;
        let diff_ids = config.rootfs().diff_ids().clone();
        if diff_ids.len() != manifest.layers.len() {
            return Err(Error::LayerCountMismatch {
                digest: image_id.clone(),
                diff_ids: diff_ids.len(),
                layers: manifest.layers.len(),
            });
        }
        let user = parse_image_config(&image_id, &config_bytes)?.user;

        let (registry_ref, progress_ref) = (&registry_client, &progress);
        let downloads = futures::stream::iter(manifest.layers.clone())
            .map(|layer| async move { self.fetch_blob(registry_ref, progress_ref, &layer).await })
            .buffer_unordered(self.config.max_concurrent_downloads.max(1))
            .try_collect::<Vec<PathBuf>>();
        tokio::select! {
            downloaded = downloads => { downloaded?; }
            () = progress.log_every(&whole, self.config.progress_interval) => {}
        }
        // Before the unpack, which is not download time.
        let download_rate = progress.rate();
        let mut record = ImageRecord {
            id: image_id.clone(),
            repo_tags: Vec::new(),
            repo_digests: vec![format!(
                "{}/{}@{top_digest}",
                parsed.registry(),
                parsed.repository()
            )],
            size,
            user,
            manifest_digest,
            index_digests: index_digest.into_iter().collect(),
            layers: manifest.layers.iter().map(|l| l.digest.clone()).collect(),
            diff_ids,
            pulled_at: crate::now_ns() / 1_000_000_000,
        };
        if parsed.digest().is_none() {
            record.repo_tags.push(whole.clone());
        }

        // Unpack before the record exists: an image that cannot be unpacked is not pulled.
        let job = self.unpack_job(&record)?;
        tokio::task::spawn_blocking(move || job.run())
            .await
            .map_err(|e| Error::UnpackTask(e.to_string()))??;

        let record = self.commit_record(record)?;
        info!(
            reference = %whole,
            from = %source.host,
            image = %record.id,
            size = record.size,
            received = progress.received.load(Ordering::Relaxed),
            bytes_per_second = download_rate,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "image pulled"
        );
        Ok(record)
    }

    /// Tries the endpoints of `parsed`'s registry in order (its mirrors, then the upstream
    /// unless disabled) for the top-level manifest; an endpoint that is unreachable, lacks
    /// the image, refuses us or fails moves on to the next. Returns the endpoint that
    /// answered, which serves the rest of the pull, and the manifest.
    async fn first_source_with(
        &self,
        parsed: &Reference,
        whole: &str,
        credentials: Option<&RegistryCredentials>,
    ) -> Result<(Source, Vec<u8>)> {
        let endpoints = mirrors::endpoints(&self.config.registries, parsed.registry());
        let what = format!("manifest of {whole}");
        let mut tried = Vec::new();
        for (n, endpoint) in endpoints.iter().enumerate() {
            let result = match self.source_for(*endpoint, parsed, credentials) {
                Ok(source) => {
                    let target = source.target(whole, self.config.pull_progress_timeout);
                    let registry = source.registry_client(&target, self.config.max_manifest_bytes);
                    let fetched = target
                        .within_progress_timeout(
                            "the manifest",
                            registry.manifest(&source.reference, &what),
                        )
                        .await
                        .and_then(|manifest| manifest);
                    fetched.map(|manifest| (source.clone(), manifest))
                }
                Err(e) => Err(e),
            };
            let error = match result {
                Ok(found) => return Ok(found),
                Err(error) if endpoints.len() == 1 => return Err(error),
                Err(error) if !moves_on(&error) => return Err(error),
                Err(error) => error,
            };
            let described = endpoint.describe(parsed.registry());
            if n + 1 < endpoints.len() {
                warn!(reference = whole, endpoint = %described, %error, "trying the next endpoint");
            }
            tried.push(format!("{described}: {error}"));
            if n + 1 == endpoints.len() {
                return Err(Error::EndpointsFailed {
                    reference: whole.to_owned(),
                    tried: tried.join("; "),
                    last: Box::new(error),
                });
            }
        }
        unreachable!("endpoints() always gives one endpoint at least")
    }

    /// A pull's connection to one endpoint. Credentials are those of the host contacted:
    /// CRI's (kubelet's, for the image's registry) and the docker config's for the upstream,
    /// the docker config's entry for the mirror's own host for a mirror.
    fn source_for(
        &self,
        endpoint: Endpoint<'_>,
        parsed: &Reference,
        credentials: Option<&RegistryCredentials>,
    ) -> Result<Source> {
        match endpoint {
            Endpoint::Upstream => {
                let host = parsed.resolve_registry().to_owned();
                let tls = self
                    .config
                    .registries
                    .get(parsed.registry())
                    .map(|hosts| hosts.upstream_tls.clone())
                    .unwrap_or_default();
                // TLS settings for the upstream mean HTTPS, even for a loopback address.
                let plain_http = !tls.is_configured() && self.is_insecure(&host);
                let auth = self.registry_auth(parsed.registry(), credentials)?;
                Ok(Source {
                    http: self.registry_http(&host, plain_http, parsed.repository(), &tls, auth)?,
                    reference: parsed.clone(),
                    host,
                })
            }
            Endpoint::Mirror(mirror) => {
                let host = mirror.host.clone();
                let repository = mirror.repository(parsed.repository());
                let reference = match parsed.digest() {
                    Some(digest) => Reference::with_digest(host.clone(), repository, digest.into()),
                    None => Reference::with_tag(
                        host.clone(),
                        repository,
                        parsed.tag().unwrap_or("latest").to_owned(),
                    ),
                };
                let auth = self.registry_auth(&host, None)?;
                let http = self.registry_http(
                    &host,
                    mirror.plain_http,
                    reference.repository(),
                    &mirror.tls,
                    auth,
                )?;
                Ok(Source { http, reference, host })
            }
        }
    }

    /// Checks what the manifest declares before anything is downloaded: every size there
    /// (the spec requires one), the config within `max_config_bytes`, all of it within
    /// `max_image_bytes`. Returns the image's size.
    fn check_sizes(&self, manifest: &OciImageManifest, reference: &str) -> Result<u64> {
        let config = declared_size(&manifest.config.digest, manifest.config.size)?;
        if config > self.config.max_config_bytes {
            return Err(Error::ConfigTooLarge {
                digest: manifest.config.digest.clone(),
                size: config,
                limit: self.config.max_config_bytes,
            });
        }
        let mut total = config;
        for layer in &manifest.layers {
            total = total.saturating_add(declared_size(&layer.digest, layer.size)?);
        }
        if total > self.config.max_image_bytes {
            return Err(Error::ImageTooLarge {
                reference: reference.to_owned(),
                size: total,
                limit: self.config.max_image_bytes,
            });
        }
        Ok(total)
    }

    /// Ensures the blob `descriptor` names is stored and verified, downloading it if needed.
    async fn fetch_blob(
        &self,
        registry: &RegistryClient<'_>,
        progress: &PullProgress,
        descriptor: &OciDescriptor,
    ) -> Result<PathBuf> {
        let digest = descriptor.digest.as_str();
        let path = self.blob_path(digest)?;
        let blob_lock = self.blob_lock(digest);
        let result = {
            let _one_download = blob_lock.lock().await;
            if path.exists() {
                progress.already_stored(u64::try_from(descriptor.size).unwrap_or(0));
                Ok(())
            } else {
                let temp = self.temp_path(&format!("blob-{}", digest_hex(digest)?));
                let result = self.download_blob(registry, progress, descriptor, &temp, &path).await;
                if result.is_err() {
                    // Best effort: tmp/ is emptied on the next open anyway.
                    let _ = tokio::fs::remove_file(&temp).await;
                } else {
                    self.blobs_downloaded.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                result
            }
        };
        self.release_blob_lock(digest, blob_lock);
        result.map(|()| path)
    }

    async fn download_blob(
        &self,
        registry: &RegistryClient<'_>,
        progress: &PullProgress,
        descriptor: &OciDescriptor,
        temp: &std::path::Path,
        path: &std::path::Path,
    ) -> Result<()> {
        let digest = descriptor.digest.as_str();
        // A blob is exactly its declared size (checked non-negative with the manifest): no
        // size, no unbounded download.
        let expected_size = declared_size(digest, descriptor.size)?;
        let what = format!("blob {digest}");
        let target = registry.target;
        let response = target.within_progress_timeout(&what, registry.blob(digest)).await??;
        let total = response.content_length().unwrap_or(expected_size);
        if total > expected_size {
            return Err(Error::SizeMismatch {
                digest: digest.to_owned(),
                expected: expected_size,
                actual: total,
            });
        }
        let mut stream = response.bytes_stream();
        let write_error = |source| Error::WriteBlob { path: temp.to_owned(), source };
        let mut file = tokio::fs::File::create(temp).await.map_err(write_error)?;
        let mut hasher = sha2::Sha256::new();
        let mut received = 0u64;
        let started = Instant::now();
        debug!(digest, total, "downloading blob");
        while let Some(chunk) = target.within_progress_timeout(&what, stream.next()).await? {
            let chunk = chunk.map_err(|e| Error::DownloadBlob {
                digest: digest.to_owned(),
                source: std::io::Error::other(error_chain(&e)),
            })?;
            hasher.update(&chunk);
            received += chunk.len() as u64;
            self.bytes_downloaded.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            progress.received(chunk.len() as u64);
            if received > expected_size {
                return Err(Error::SizeMismatch {
                    digest: digest.to_owned(),
                    expected: expected_size,
                    actual: received,
                });
            }
            file.write_all(&chunk).await.map_err(write_error)?;
        }
        file.sync_all().await.map_err(write_error)?;
        drop(file);
        let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
        if actual != digest {
            return Err(Error::DigestMismatch {
                what: format!("blob {digest}"),
                expected: digest.to_owned(),
                actual,
            });
        }
        if received != expected_size {
            return Err(Error::SizeMismatch {
                digest: digest.to_owned(),
                expected: expected_size,
                actual: received,
            });
        }
        tokio::fs::rename(temp, path)
            .await
            .map_err(|source| Error::WriteBlob { path: path.to_owned(), source })?;
        if let Some(parent) = path.parent() {
            crate::sync_dir(parent)
                .map_err(|source| Error::WriteBlob { path: parent.to_owned(), source })?;
        }
        debug!(
            digest,
            received,
            total,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "blob downloaded"
        );
        Ok(())
    }
}

/// A descriptor's size, which must not be negative.
fn declared_size(digest: &str, size: i64) -> Result<u64> {
    u64::try_from(size).map_err(|_| Error::InvalidSize { digest: digest.to_owned(), size })
}

/// Checks fetched content against the descriptor that named it.
fn check_content(digest: &str, size: u64, bytes: &[u8], what: &str) -> Result<()> {
    let actual = sha256_digest(bytes);
    if actual != digest {
        return Err(Error::DigestMismatch {
            what: what.to_owned(),
            expected: digest.to_owned(),
            actual,
        });
    }
    if bytes.len() as u64 != size {
        return Err(Error::SizeMismatch {
            digest: digest.to_owned(),
            expected: size,
            actual: bytes.len() as u64,
        });
    }
    Ok(())
}

/// One pull's requests to its endpoint: manifests (size-limited, checked against
/// `Docker-Content-Digest`) and blob responses, failing as `target` reports them.
struct RegistryClient<'a> {
    http: &'a RegistryHttp,
    target: &'a Target<'a>,
    max_manifest_bytes: u64,
}

impl RegistryClient<'_> {
    /// The manifest or index `reference` names (by tag or digest), at most
    /// `max_manifest_bytes` of it, checked against the registry's `Docker-Content-Digest`.
    async fn manifest(&self, reference: &Reference, what: &str) -> Result<Vec<u8>> {
        let name = reference.digest().or(reference.tag()).unwrap_or("latest");
        let url = self.http.url("manifests", name);
        let response = self
            .http
            .get(&url, &ACCEPTED_MANIFESTS.join(", "))
            .await
            .map_err(|e| self.target.error(e))?;
        let status = response.status();
        let header_digest = response
            .headers()
            .get("Docker-Content-Digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = self.read_limited(response, what).await?;
        if status != StatusCode::OK {
            return Err(self.target.error(status_error(status, &body, &url)));
        }
        if let Some(header) = header_digest.filter(|d| d.starts_with("sha256:")) {
            let actual = sha256_digest(&body);
            if actual != header {
                return Err(Error::DigestMismatch {
                    what: what.to_owned(),
                    expected: header,
                    actual,
                });
            }
        }
        Ok(body)
    }

    /// The successful response for blob `digest`, its body unread.
    async fn blob(&self, digest: &str) -> Result<reqwest::Response> {
        let url = self.http.url("blobs", digest);
        let response = self.http.get(&url, "*/*").await.map_err(|e| self.target.error(e))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = read_small(response).await.map_err(|e| self.target.error(e))?;
        Err(self.target.error(status_error(status, &body, &url)))
    }

    /// The body, failing (and dropping the connection) as soon as it exceeds the limit.
    async fn read_limited(&self, mut response: reqwest::Response, what: &str) -> Result<Vec<u8>> {
        let limit = self.max_manifest_bytes;
        let too_large = || Error::ManifestTooLarge { what: what.to_owned(), limit };
        if response.content_length().is_some_and(|n| n > limit) {
            return Err(too_large());
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| self.target.error(e.into()))? {
            if (body.len() + chunk.len()) as u64 > limit {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }
}
