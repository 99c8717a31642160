//! Podvisor's image store.
//!
//! Pulls images from OCI distribution registries (our own `reqwest` client, `oci-client`'s
//! types), keeps content-addressed blobs, image records and their references under
//! `<root>/images/`, and unpacks each image once into a read-only root file system directory
//! that every pod using the image shares (the sandbox manager bind-mounts it into the pod's
//! virtio-fs share; the guest overlays a writable layer).
//!
//! Layout of `<root>/images/`:
//! - `blobs/sha256/<hex>`: manifests, configs and layers, each verified against its digest and
//!   renamed into place only after an fsync.
//! - `records/<hex>.json`: one [`ImageRecord`] per image (id = config digest).
//! - `rootfs/<hex>/`: the unpacked image; renamed into place only once complete.
//! - `tmp/`: downloads and unpacks in progress; emptied when the store opens.

mod auth;
mod import;
mod mirrors;
mod pull;
mod registry;
pub mod unpack;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use oci_client::Reference;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

pub use auth::RegistryCredentials;
pub use import::{ArchiveError, ArchiveProgress};
pub use mirrors::{ClientIdentity, EndpointTls, Mirror, MirrorError, RegistryHosts, TlsFiles};
pub use unpack::UnpackError;

/// Image store errors. The CRI layer maps each to a gRPC code (see `code`-like helpers below).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The reference does not parse.
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference {
        /// As given.
        reference: String,
        /// Parser message.
        reason: String,
    },
    /// The credentials given cannot be decoded.
    #[error("invalid registry credentials: {0}")]
    InvalidCredentials(String),
    /// The docker config file exists but cannot be read.
    #[error("read docker config {path}: {source}")]
    ReadDockerConfig {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The docker config file is not valid JSON.
    #[error("parse docker config {path}: {source}")]
    ParseDockerConfig {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: serde_json::Error,
    },
    /// No image in the store matches.
    #[error("image {0:?} not found")]
    ImageNotFound(String),
    /// The image is in the configured pinned list, so it is never removed.
    #[error("image {reference} ({id}) is pinned by [images] pinned = [.., {pinned:?}, ..]")]
    ImagePinned {
        /// As asked to remove.
        reference: String,
        /// The image id.
        id: String,
        /// The pinned entry that names it.
        pinned: String,
    },
    /// The registry cannot be reached (connection refused, DNS, TLS, timeout).
    #[error("registry {host} is unreachable: {message}")]
    RegistryUnreachable {
        /// host[:port].
        host: String,
        /// The transport error.
        message: String,
    },
    /// No HTTP client could be set up for the registry (e.g. no CA certificates on the host).
    #[error("cannot set up an HTTP client for registry {host}: {message} (is the ca-certificates package installed?)")]
    HttpClient {
        /// host[:port].
        host: String,
        /// Why the client could not be built.
        message: String,
    },
    /// The registry answered 401/403.
    #[error("registry {host} denied access to {reference} (unauthorized): check the credentials")]
    Unauthorized {
        /// host[:port].
        host: String,
        /// The image.
        reference: String,
    },
    /// The registry does not know the repository, tag or digest.
    #[error("{reference} not found in registry {host}")]
    ManifestUnknown {
        /// host[:port].
        host: String,
        /// The image.
        reference: String,
    },
    /// The index has no linux/amd64 manifest.
    #[error("{reference} has no linux/amd64 image; platforms found: [{platforms}]")]
    NoMatchingPlatform {
        /// The image.
        reference: String,
        /// `os/arch[/variant]` of each index entry.
        platforms: String,
    },
    /// Content does not hash to the digest that names it.
    #[error("digest mismatch for {what}: expected {expected}, got {actual}")]
    DigestMismatch {
        /// Which blob.
        what: String,
        /// The digest that names it.
        expected: String,
        /// The digest of what was received.
        actual: String,
    },
    /// The registry sent more or fewer bytes than the descriptor says.
    #[error("size mismatch for {digest}: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        /// The blob.
        digest: String,
        /// From the descriptor.
        expected: u64,
        /// Received.
        actual: u64,
    },
    /// Any other registry error.
    #[error("registry {host} failed for {reference}: {message}")]
    Registry {
        /// host[:port].
        host: String,
        /// The image.
        reference: String,
        /// The client's message.
        message: String,
    },
    /// A manifest or index larger than the store reads.
    #[error("{what} is larger than the {limit}-byte limit on manifests")]
    ManifestTooLarge {
        /// Which manifest.
        what: String,
        /// `max_manifest_bytes`.
        limit: u64,
    },
    /// An image config declared larger than the store reads.
    #[error("image config {digest} is {size} bytes, more than the {limit}-byte limit")]
    ConfigTooLarge {
        /// The config blob.
        digest: String,
        /// As declared.
        size: u64,
        /// `max_config_bytes`.
        limit: u64,
    },
    /// An image whose layers and config add up to more than the store pulls.
    #[error("{reference} is {size} bytes to download, more than the {limit}-byte limit")]
    ImageTooLarge {
        /// The image.
        reference: String,
        /// Its declared blob sizes added up.
        size: u64,
        /// `max_image_bytes`.
        limit: u64,
    },
    /// A descriptor whose size is negative (the spec requires a size of every descriptor).
    #[error("descriptor of {digest} declares an invalid size {size}")]
    InvalidSize {
        /// The blob.
        digest: String,
        /// As declared.
        size: i64,
    },
    /// A manifest of a kind the store cannot run (schema 1, artifact, nested index).
    #[error("unsupported manifest for {reference}: {reason}")]
    UnsupportedManifest {
        /// The image.
        reference: String,
        /// Why.
        reason: String,
    },
    /// A layer media type that is not a tar (e.g. a wasm module).
    #[error("unsupported layer media type {0:?}")]
    UnsupportedLayer(String),
    /// A digest that is not `sha256:` + 64 lowercase hex digits.
    #[error("invalid digest {0:?}")]
    InvalidDigest(String),
    /// A manifest or index that does not parse.
    #[error("parse manifest {digest}: {source}")]
    ParseManifest {
        /// The manifest.
        digest: String,
        /// The cause.
        source: serde_json::Error,
    },
    /// An image config that does not parse.
    #[error("parse image config {digest}: {reason}")]
    ParseConfig {
        /// The config blob.
        digest: String,
        /// The cause.
        reason: String,
    },
    /// The config's diff ids do not match the manifest's layers.
    #[error("image config {digest} lists {diff_ids} diff ids for {layers} layers")]
    LayerCountMismatch {
        /// The config blob.
        digest: String,
        /// In the config.
        diff_ids: usize,
        /// In the manifest.
        layers: usize,
    },
    /// A registry sent no bytes for `pull_progress_timeout`; the partial blob was discarded.
    #[error(
        "pull of {reference} stalled: registry {host} sent nothing for {seconds} s while \
         fetching {what} (see [images] pull_progress_timeout_seconds)"
    )]
    PullStalled {
        /// host[:port].
        host: String,
        /// The image.
        reference: String,
        /// The manifest or blob being fetched.
        what: String,
        /// The timeout that passed.
        seconds: u64,
    },
    /// The download stream broke.
    #[error("download blob {digest}: {source}")]
    DownloadBlob {
        /// The blob.
        digest: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Writing a blob failed (e.g. ENOSPC); nothing was stored.
    #[error("write blob {path}: {source}")]
    WriteBlob {
        /// The temporary or final file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A stored blob cannot be read.
    #[error("read blob {path}: {source}")]
    ReadBlob {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The store's directories cannot be created.
    #[error("create store directory {path}: {source}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// An image record cannot be written.
    #[error("write image record {path}: {source}")]
    WriteRecord {
        /// The record file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Listing a store directory failed.
    #[error("scan {path}: {source}")]
    Scan {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Deleting something from the store failed.
    #[error("remove {path}: {source}")]
    Remove {
        /// What.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Unpacking a layer failed; the partial tree was discarded.
    #[error("unpack image {image}: {source}")]
    Unpack {
        /// The image id.
        image: String,
        /// The cause.
        source: UnpackError,
    },
    /// Preparing the unpack directory failed.
    #[error("prepare unpack directory {path}: {source}")]
    UnpackDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// An archive to import is unreadable or malformed; nothing of it was recorded.
    #[error("image archive: {0}")]
    Archive(#[from] ArchiveError),
    /// Every endpoint of a pull (mirrors, then the upstream) failed; `last` is the last one's
    /// error, which decides the gRPC code.
    #[error("pull of {reference} failed at every endpoint: {tried}")]
    EndpointsFailed {
        /// The image as requested.
        reference: String,
        /// "mirror https://…: error; upstream …: error", in the order tried.
        tried: String,
        /// The last endpoint's error.
        last: Box<Error>,
    },
    /// The blocking unpack task panicked or was cancelled.
    #[error("unpack task failed: {0}")]
    UnpackTask(String),
}

/// Result of image store operations.
pub type Result<T> = std::result::Result<T, Error>;

/// How the store reaches registries.
#[derive(Clone, Debug)]
pub struct ImageStoreConfig {
    /// Registries (`host` or `host:port`) reached over plain HTTP. localhost, 127.0.0.0/8 and
    /// ::1 always are.
    pub insecure_registries: Vec<String>,
    /// A docker `config.json` with `auths`, used when a pull brings no credentials.
    pub docker_config: Option<PathBuf>,
    /// Layers downloaded at once per pull.
    pub max_concurrent_downloads: usize,
    /// TCP connect timeout to registries.
    pub connect_timeout: Duration,
    /// Longest a registry may send nothing (a manifest request, a blob's body) before the pull
    /// is aborted; None waits forever (containerd's `image_pull_progress_timeout`).
    pub pull_progress_timeout: Option<Duration>,
    /// How often a pull logs its bytes done / total.
    pub progress_interval: Duration,
    /// References (tags or digests) of images never removed, reported pinned to kubelet.
    pub pinned: Vec<String>,
    /// Mirrors per registry host as references name it (`docker.io`, `registry.k8s.io`).
    pub registries: BTreeMap<String, RegistryHosts>,
    /// Largest manifest or index read from a registry (what the distribution spec's
    /// reference registry accepts).
    pub max_manifest_bytes: u64,
    /// Largest image config pulled.
    pub max_config_bytes: u64,
    /// Largest image pulled: its layers' and config's declared sizes added up, checked on
    /// the manifest before anything is downloaded (every blob must be the size it declares).
    pub max_image_bytes: u64,
    /// Largest image unpacked: its uncompressed layer tars added up; an unpack past it is
    /// aborted and discarded.
    pub max_unpacked_bytes: u64,
}

impl Default for ImageStoreConfig {
    fn default() -> Self {
        Self {
            insecure_registries: Vec::new(),
            docker_config: None,
            max_concurrent_downloads: 3,
            connect_timeout: Duration::from_secs(10),
            pull_progress_timeout: Some(Duration::from_secs(60)),
            progress_interval: Duration::from_secs(5),
            pinned: Vec::new(),
            registries: BTreeMap::new(),
            max_manifest_bytes: 4 << 20,
            max_config_bytes: 8 << 20,
            max_image_bytes: 32 << 30,
            max_unpacked_bytes: 64 << 30,
        }
    }
}

/// One image in the store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// `sha256:…` of the image config (what CRI calls the image id).
    pub id: String,
    /// Normalised `registry/repository:tag` names pointing at it.
    pub repo_tags: Vec<String>,
    /// `registry/repository@sha256:…` (digest of the manifest or index pulled).
    pub repo_digests: Vec<String>,
    /// Bytes of its compressed layers and config, as pulled.
    pub size: u64,
    /// The config's `User` ("1234", "1234:1234", "app", "app:grp"), if set.
    pub user: Option<String>,
    /// Digest of the linux/amd64 image manifest.
    pub manifest_digest: String,
    /// Digests of the indexes that led to it (one per repo digest that is an index).
    #[serde(default)]
    pub index_digests: Vec<String>,
    /// Layer blob digests, lowest first.
    pub layers: Vec<String>,
    /// Uncompressed layer digests from the config.
    pub diff_ids: Vec<String>,
    /// Unix seconds of the last pull.
    pub pulled_at: i64,
}

impl ImageRecord {
    /// The numeric uid of `user`, if it is one ("1234" or "1234:5678").
    pub fn uid(&self) -> Option<i64> {
        let user = self.user.as_deref()?;
        user.split(':').next()?.parse().ok()
    }

    /// The user name of `user`, if it is a name rather than a uid.
    pub fn username(&self) -> Option<&str> {
        let name = self.user.as_deref()?.split(':').next()?;
        if name.is_empty() || name.parse::<i64>().is_ok() {
            None
        } else {
            Some(name)
        }
    }

    fn blobs(&self) -> impl Iterator<Item = &String> {
        std::iter::once(&self.id)
            .chain(std::iter::once(&self.manifest_digest))
            .chain(&self.index_digests)
            .chain(&self.layers)
    }
}

/// What a container needs from the image config.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ImageConfig {
    /// `Entrypoint`.
    pub entrypoint: Vec<String>,
    /// `Cmd`.
    pub cmd: Vec<String>,
    /// `Env` (`KEY=value`).
    pub env: Vec<String>,
    /// `WorkingDir`, if set.
    pub working_dir: Option<String>,
    /// `User`, if set.
    pub user: Option<String>,
    /// `Labels`.
    pub labels: BTreeMap<String, String>,
    /// `ExposedPorts` keys ("80/tcp").
    pub exposed_ports: Vec<String>,
    /// `Volumes` keys.
    pub volumes: Vec<String>,
    /// `StopSignal`, if set.
    pub stop_signal: Option<String>,
    /// `architecture`.
    pub architecture: String,
    /// `os`.
    pub os: String,
}

/// Space used by the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsUsage {
    /// The directory holding everything (`<root>/images`).
    pub mountpoint: PathBuf,
    /// Bytes allocated on disk.
    pub used_bytes: u64,
    /// Files, directories and links.
    pub inodes_used: u64,
    /// When measured, nanoseconds since the Unix epoch.
    pub timestamp_ns: i64,
}

/// Space on disk: allocated bytes and inodes, each hard-linked file once.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskUsage {
    /// Bytes allocated (st_blocks × 512, not apparent sizes).
    pub bytes: u64,
    /// Files, directories and links.
    pub inodes: u64,
}

impl DiskUsage {
    fn add(&mut self, metadata: &std::fs::Metadata) {
        self.bytes += metadata.blocks() * 512;
        self.inodes += 1;
    }

    /// Counts `metadata` unless it is a hard link to an inode already counted.
    fn add_once(&mut self, metadata: &std::fs::Metadata, seen: &mut HashSet<(u64, u64)>) {
        if metadata.is_dir()
            || metadata.nlink() <= 1
            || seen.insert((metadata.dev(), metadata.ino()))
        {
            self.add(metadata);
        }
    }
}

/// What a garbage collection removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Blobs deleted.
    pub blobs_removed: usize,
    /// Unpacked root file systems deleted.
    pub rootfs_removed: usize,
}

/// The image store. Cheap to share behind an `Arc`; all methods take `&self`.
pub struct ImageStore {
    dir: PathBuf,
    config: ImageStoreConfig,
    records: RwLock<BTreeMap<String, ImageRecord>>,
    /// Serialises record updates (a tag moving between images touches two records).
    record_writes: Mutex<()>,
    /// Blobs a pull in progress needs, with use counts: GC keeps them.
    pins: Mutex<HashMap<String, usize>>,
    /// One download per blob at a time; later pullers find it stored.
    blob_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// One unpack per image at a time.
    unpack_locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// Disk usage of unpacked trees by image id: measured once, the trees never change.
    tree_usage: Mutex<HashMap<String, DiskUsage>>,
    blobs_downloaded: AtomicU64,
    bytes_downloaded: AtomicU64,
    temp_counter: AtomicU64,
}

/// Locks a std mutex, recovering from poisoning (the data it guards stays consistent: every
/// critical section is a single map update).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Checks that `digest` is `sha256:<64 lowercase hex>` and returns the hex part: digests name
/// files, so nothing else may pass.
pub(crate) fn digest_hex(digest: &str) -> Result<&str> {
    let hex =
        digest.strip_prefix("sha256:").ok_or_else(|| Error::InvalidDigest(digest.to_owned()))?;
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return Err(Error::InvalidDigest(digest.to_owned()));
    }
    Ok(hex)
}

pub(crate) fn sha256_digest(data: &[u8]) -> String {
    use sha2::Digest;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// fsyncs a directory so that a rename into it is durable.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Parses and normalises a pullable reference (`busybox` → `docker.io/library/busybox:latest`).
pub fn parse_reference(reference: &str) -> Result<Reference> {
    reference.parse::<Reference>().map_err(|e| Error::InvalidReference {
        reference: reference.to_owned(),
        reason: e.to_string(),
    })
}

impl ImageStore {
    /// Opens (creating if needed) the store under `<root>/images`, discarding leftovers of
    /// interrupted downloads and unpacks.
    pub fn open(root: &Path, config: ImageStoreConfig) -> Result<Self> {
        let dir = root.join("images");
        for sub in ["blobs/sha256", "records", "rootfs", "tmp"] {
            let path = dir.join(sub);
            std::fs::create_dir_all(&path)
                .map_err(|source| Error::CreateDir { path: path.clone(), source })?;
        }
        // Unpacked images hold set-id binaries owned by root: keep host users out.
        for private in ["rootfs", "tmp"] {
            let path = dir.join(private);
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))
                .map_err(|source| Error::CreateDir { path, source })?;
        }
        // Nothing under tmp/ was ever trusted.
        let tmp = dir.join("tmp");
        let leftovers =
            std::fs::read_dir(&tmp).map_err(|source| Error::Scan { path: tmp.clone(), source })?;
        for leftover in leftovers.flatten() {
            let path = leftover.path();
            let removed = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            if let Err(e) = removed {
                warn!(path = %path.display(), error = %e, "cannot remove leftover");
            }
        }
        let mut records = BTreeMap::new();
        let records_dir = dir.join("records");
        let entries = std::fs::read_dir(&records_dir)
            .map_err(|source| Error::Scan { path: records_dir.clone(), source })?;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let parsed = std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<ImageRecord>(&b).map_err(|e| e.to_string()));
            match parsed {
                Ok(record) if digest_hex(&record.id).is_ok() => {
                    records.insert(record.id.clone(), record);
                }
                Ok(_) => warn!(path = %path.display(), "ignoring image record with a bad id"),
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "ignoring unreadable image record")
                }
            }
        }
        info!(dir = %dir.display(), images = records.len(), "image store opened");
        Ok(Self {
            dir,
            config,
            records: RwLock::new(records),
            record_writes: Mutex::new(()),
            pins: Mutex::new(HashMap::new()),
            blob_locks: Mutex::new(HashMap::new()),
            unpack_locks: Mutex::new(HashMap::new()),
            tree_usage: Mutex::new(HashMap::new()),
            blobs_downloaded: AtomicU64::new(0),
            bytes_downloaded: AtomicU64::new(0),
            temp_counter: AtomicU64::new(0),
        })
    }

    /// `<root>/images`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Blobs downloaded from registries since the store was opened (for tests and metrics).
    pub fn blobs_downloaded(&self) -> u64 {
        self.blobs_downloaded.load(Ordering::Relaxed)
    }

    /// Bytes received from registries since the store was opened, failed downloads included
    /// (they crossed the network too).
    pub fn bytes_downloaded(&self) -> u64 {
        self.bytes_downloaded.load(Ordering::Relaxed)
    }

    fn blob_path(&self, digest: &str) -> Result<PathBuf> {
        Ok(self.dir.join("blobs/sha256").join(digest_hex(digest)?))
    }

    fn record_path(&self, id: &str) -> Result<PathBuf> {
        Ok(self.dir.join("records").join(format!("{}.json", digest_hex(id)?)))
    }

    fn temp_path(&self, what: &str) -> PathBuf {
        let n = self.temp_counter.fetch_add(1, Ordering::Relaxed);
        self.dir.join("tmp").join(format!("{what}.{}.{n}", std::process::id()))
    }

    /// Writes `data` as a file atomically: temp file, fsync, rename, fsync of the directory.
    fn write_atomically(&self, path: &Path, data: &[u8]) -> std::io::Result<()> {
        let temp = self.temp_path("write");
        let result = (|| {
            let mut file = std::fs::File::create(&temp)?;
            file.write_all(data)?;
            file.sync_all()?;
            std::fs::rename(&temp, path)?;
            if let Some(parent) = path.parent() {
                sync_dir(parent)?;
            }
            Ok(())
        })();
        if result.is_err() {
            // Best effort: the temp file is never trusted and open() clears tmp/.
            let _ = std::fs::remove_file(&temp);
        }
        result
    }

    /// Stores `data` (already in memory, e.g. a manifest) under `digest` after verifying it.
    fn put_blob(&self, digest: &str, data: &[u8], what: &str) -> Result<()> {
        let path = self.blob_path(digest)?;
        let actual = sha256_digest(data);
        if actual != digest {
            return Err(Error::DigestMismatch {
                what: what.to_owned(),
                expected: digest.to_owned(),
                actual,
            });
        }
        if path.exists() {
            return Ok(());
        }
        self.write_atomically(&path, data).map_err(|source| Error::WriteBlob { path, source })
    }

    /// Reads a stored blob.
    fn read_blob(&self, digest: &str) -> Result<Vec<u8>> {
        let path = self.blob_path(digest)?;
        std::fs::read(&path).map_err(|source| Error::ReadBlob { path, source })
    }

    fn pin(&self, digests: &[String]) -> PinGuard<'_> {
        let mut pins = lock(&self.pins);
        for digest in digests {
            *pins.entry(digest.clone()).or_insert(0) += 1;
        }
        PinGuard { store: self, digests: digests.to_vec() }
    }

    fn blob_lock(&self, digest: &str) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.blob_locks).entry(digest.to_owned()).or_default().clone()
    }

    /// Drops the per-blob lock from the map once nobody else holds or waits for it.
    fn release_blob_lock(&self, digest: &str, blob_lock: Arc<tokio::sync::Mutex<()>>) {
        let mut locks = lock(&self.blob_locks);
        // One reference in the map, one here: nobody else is waiting.
        if Arc::strong_count(&blob_lock) <= 2 {
            locks.remove(digest);
        }
    }

    /// All images.
    pub fn list(&self) -> Vec<ImageRecord> {
        self.records.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }

    /// Finds an image as crictl names it: `busybox`, `busybox:1`,
    /// `registry/repo@sha256:…`, the id `sha256:…`, the id's hex, or a unique prefix of it
    /// (at least 3 hex digits); a bare `sha256:…` also matches a repo digest.
    pub fn resolve(&self, reference: &str) -> Option<ImageRecord> {
        let records = self.records.read().unwrap_or_else(|p| p.into_inner());
        let reference = reference.trim();
        if reference.is_empty() {
            return None;
        }
        if let Some(record) = records.get(reference) {
            return Some(record.clone());
        }
        if let Some(hex) = reference.strip_prefix("sha256:") {
            if let Some(record) =
                records.values().find(|r| r.repo_digests.iter().any(|d| d.ends_with(reference)))
            {
                return Some(record.clone());
            }
            return unique_prefix(&records, hex);
        }
        if let Ok(parsed) = reference.parse::<Reference>() {
            let found = match parsed.digest() {
                Some(digest) => {
                    let name = format!("{}/{}@{digest}", parsed.registry(), parsed.repository());
                    records.values().find(|r| r.repo_digests.contains(&name))
                }
                None => {
                    let name = parsed.whole();
                    records.values().find(|r| r.repo_tags.contains(&name))
                }
            };
            if let Some(record) = found {
                return Some(record.clone());
            }
        }
        if reference.len() >= 3 && reference.bytes().all(|b| b.is_ascii_hexdigit()) {
            return unique_prefix(&records, &reference.to_ascii_lowercase());
        }
        None
    }

    fn get(&self, image_id: &str) -> Result<ImageRecord> {
        self.records
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(image_id)
            .cloned()
            .or_else(|| self.resolve(image_id))
            .ok_or_else(|| Error::ImageNotFound(image_id.to_owned()))
    }

    /// Adds or updates an image record, moving `new_tags` away from other images.
    fn commit_record(&self, mut record: ImageRecord) -> Result<ImageRecord> {
        let _serialised = lock(&self.record_writes);
        let mut updates = Vec::new();
        {
            let records = self.records.read().unwrap_or_else(|p| p.into_inner());
            if let Some(existing) = records.get(&record.id) {
                for tag in &existing.repo_tags {
                    if !record.repo_tags.contains(tag) {
                        record.repo_tags.push(tag.clone());
                    }
                }
                for digest in &existing.repo_digests {
                    if !record.repo_digests.contains(digest) {
                        record.repo_digests.push(digest.clone());
                    }
                }
                for digest in &existing.index_digests {
                    if !record.index_digests.contains(digest) {
                        record.index_digests.push(digest.clone());
                    }
                }
            }
            for other in records.values().filter(|r| r.id != record.id) {
                if other.repo_tags.iter().any(|t| record.repo_tags.contains(t)) {
                    let mut other = other.clone();
                    other.repo_tags.retain(|t| !record.repo_tags.contains(t));
                    updates.push(other);
                }
            }
        }
        updates.push(record.clone());
        for update in &updates {
            let path = self.record_path(&update.id)?;
            let bytes = serde_json::to_vec_pretty(update).map_err(|e| Error::WriteRecord {
                path: path.clone(),
                source: std::io::Error::other(e),
            })?;
            self.write_atomically(&path, &bytes)
                .map_err(|source| Error::WriteRecord { path: path.clone(), source })?;
            self.records
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(update.id.clone(), update.clone());
        }
        Ok(record)
    }

    /// Removes the image `reference` names (id, tag, digest) with all its tags, its unpacked
    /// root file system and the blobs nothing else uses. Not found is Ok(None).
    pub fn remove(&self, reference: &str) -> Result<Option<ImageRecord>> {
        let Some(record) = self.resolve(reference) else {
            return Ok(None);
        };
        if let Some(pinned) = self.pinned_by(&record) {
            return Err(Error::ImagePinned {
                reference: reference.to_owned(),
                id: record.id,
                pinned: pinned.to_owned(),
            });
        }
        {
            let _serialised = lock(&self.record_writes);
            let path = self.record_path(&record.id)?;
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(Error::Remove { path, source }),
            }
            // Best effort durability of the removal; the record is gone either way.
            let _ = sync_dir(&self.dir.join("records"));
            self.records.write().unwrap_or_else(|p| p.into_inner()).remove(&record.id);
        }
        info!(image = %record.id, tags = ?record.repo_tags, "image removed");
        self.gc()?;
        Ok(Some(record))
    }

    /// Deletes blobs and unpacked root file systems that no image and no pull in progress
    /// references.
    pub fn gc(&self) -> Result<GcReport> {
        // Held throughout: a pull pins before it looks for stored blobs, so it either sees
        // a blob that GC keeps or finds it gone and downloads it again.
        let pins = lock(&self.pins);
        let mut keep: HashSet<String> = pins.keys().cloned().collect();
        for record in self.records.read().unwrap_or_else(|p| p.into_inner()).values() {
            keep.extend(record.blobs().cloned());
        }
        let mut report = GcReport::default();
        let blobs = self.dir.join("blobs/sha256");
        let entries = std::fs::read_dir(&blobs)
            .map_err(|source| Error::Scan { path: blobs.clone(), source })?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !keep.contains(&format!("sha256:{name}")) {
                let path = entry.path();
                std::fs::remove_file(&path).map_err(|source| Error::Remove { path, source })?;
                report.blobs_removed += 1;
            }
        }
        let rootfs = self.dir.join("rootfs");
        let entries = std::fs::read_dir(&rootfs)
            .map_err(|source| Error::Scan { path: rootfs.clone(), source })?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !keep.contains(&format!("sha256:{name}")) {
                let path = entry.path();
                remove_tree(&path, &self.temp_path("trash"))?;
                lock(&self.tree_usage).remove(&format!("sha256:{name}"));
                report.rootfs_removed += 1;
            }
        }
        drop(pins);
        if report != GcReport::default() {
            info!(?report, "image store garbage collected");
        }
        Ok(report)
    }

    /// Deletes those of `digests` that no image and no pull or import in progress uses: what
    /// a failed import stored.
    fn discard_unused_blobs(&self, digests: &[String]) {
        let pins = lock(&self.pins);
        let records = self.records.read().unwrap_or_else(|p| p.into_inner());
        for digest in digests {
            let used = pins.contains_key(digest)
                || records.values().any(|record| record.blobs().any(|b| b == digest));
            if !used {
                if let Ok(path) = self.blob_path(digest) {
                    // Best effort: GC takes what is left.
                    let _ = std::fs::remove_file(path);
                }
            }
        }
    }

    /// Bytes and inodes used under `<root>/images` (blobs, unpacked trees, records and
    /// downloads in progress), each hard-linked file once.
    pub fn fs_info(&self) -> Result<FsUsage> {
        let timestamp_ns = now_ns();
        let usage = tree_usage(&self.dir, false)?;
        Ok(FsUsage {
            mountpoint: self.dir.clone(),
            used_bytes: usage.bytes,
            inodes_used: usage.inodes,
            timestamp_ns,
        })
    }

    /// The configured pinned reference that names `record`, if any.
    pub fn pinned_by(&self, record: &ImageRecord) -> Option<&str> {
        self.config
            .pinned
            .iter()
            .find(|pinned| self.resolve(pinned).is_some_and(|r| r.id == record.id))
            .map(String::as_str)
    }

    /// What removing `record` frees when no other image shares its blobs: its record, its
    /// blobs and its unpacked tree. This is the size ListImages reports, so kubelet's image GC
    /// sees the figure ImageFsInfo falls by. Blocking (walks the tree the first time).
    pub fn disk_usage(&self, record: &ImageRecord) -> Result<DiskUsage> {
        let mut usage = DiskUsage::default();
        let mut files = vec![self.record_path(&record.id)?];
        let blobs: HashSet<&String> = record.blobs().collect();
        for blob in blobs {
            files.push(self.blob_path(blob)?);
        }
        for file in files {
            // Gone (a concurrent removal) counts nothing.
            if let Ok(metadata) = std::fs::symlink_metadata(&file) {
                usage.add(&metadata);
            }
        }
        let tree = self.tree_disk_usage(&record.id)?;
        usage.bytes += tree.bytes;
        usage.inodes += tree.inodes;
        Ok(usage)
    }

    fn tree_disk_usage(&self, image_id: &str) -> Result<DiskUsage> {
        if let Some(usage) = lock(&self.tree_usage).get(image_id) {
            return Ok(*usage);
        }
        let tree = self.dir.join("rootfs").join(digest_hex(image_id)?);
        if !tree.is_dir() {
            // Not unpacked (yet): nothing to count or to cache.
            return Ok(DiskUsage::default());
        }
        let usage = tree_usage(&tree, true)?;
        lock(&self.tree_usage).insert(image_id.to_owned(), usage);
        Ok(usage)
    }

    /// The image's config fields a container spec is built from.
    pub fn image_config(&self, image_id: &str) -> Result<ImageConfig> {
        let record = self.get(image_id)?;
        let bytes = self.read_blob(&record.id)?;
        parse_image_config(&record.id, &bytes)
    }

    /// The image's unpacked, complete root file system (unpacking it now if it is not yet).
    /// Blocking: call it from `spawn_blocking` in async code.
    pub fn rootfs_dir(&self, image_id: &str) -> Result<PathBuf> {
        let record = self.get(image_id)?;
        let job = self.unpack_job(&record)?;
        job.run()
    }

    fn unpack_job(&self, record: &ImageRecord) -> Result<UnpackJob> {
        let hex = digest_hex(&record.id)?.to_owned();
        let mut layers = Vec::new();
        for (index, digest) in record.layers.iter().enumerate() {
            layers.push(unpack::Layer {
                blob: self.blob_path(digest)?,
                diff_id: record.diff_ids.get(index).cloned(),
            });
        }
        let lock = lock(&self.unpack_locks).entry(record.id.clone()).or_default().clone();
        Ok(UnpackJob {
            image: record.id.clone(),
            target: self.dir.join("rootfs").join(&hex),
            temp: self.temp_path(&format!("rootfs-{hex}")),
            layers,
            max_bytes: self.config.max_unpacked_bytes,
            lock,
        })
    }
}

/// Disk usage of everything under `root` (and of `root` itself if `with_root`), each
/// hard-linked inode once.
fn tree_usage(root: &Path, with_root: bool) -> Result<DiskUsage> {
    let mut usage = DiskUsage::default();
    let mut seen = HashSet::new();
    if with_root {
        let metadata = std::fs::symlink_metadata(root)
            .map_err(|source| Error::Scan { path: root.to_owned(), source })?;
        usage.add(&metadata);
    }
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            // Removed while walking (a GC or an unpack renaming into place).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(Error::Scan { path: dir, source }),
        };
        for entry in entries.flatten() {
            // DirEntry::metadata does not follow symlinks; a file gone since read_dir is skipped.
            let Ok(metadata) = entry.metadata() else {
                continue;
            };
            usage.add_once(&metadata, &mut seen);
            if metadata.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    Ok(usage)
}

/// Removes a directory tree: first renamed out of the way (atomic), then deleted.
fn remove_tree(path: &Path, trash: &Path) -> Result<()> {
    let doomed = match std::fs::rename(path, trash) {
        Ok(()) => trash,
        Err(_) => path,
    };
    match std::fs::remove_dir_all(doomed) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Error::Remove { path: path.to_owned(), source }),
    }
}

fn unique_prefix(records: &BTreeMap<String, ImageRecord>, hex: &str) -> Option<ImageRecord> {
    if hex.is_empty() {
        return None;
    }
    let mut matches = records
        .values()
        .filter(|r| r.id.strip_prefix("sha256:").is_some_and(|h| h.starts_with(hex)));
    let first = matches.next()?;
    if matches.next().is_some() {
        return None;
    }
    Some(first.clone())
}

struct PinGuard<'a> {
    store: &'a ImageStore,
    digests: Vec<String>,
}

impl Drop for PinGuard<'_> {
    fn drop(&mut self) {
        let mut pins = lock(&self.store.pins);
        for digest in &self.digests {
            if let Some(count) = pins.get_mut(digest) {
                *count -= 1;
                if *count == 0 {
                    pins.remove(digest);
                }
            }
        }
    }
}

/// Everything needed to unpack one image, owned so it can run on a blocking thread.
struct UnpackJob {
    image: String,
    target: PathBuf,
    temp: PathBuf,
    layers: Vec<unpack::Layer>,
    /// Uncompressed bytes the layers may add up to.
    max_bytes: u64,
    lock: Arc<Mutex<()>>,
}

impl UnpackJob {
    fn run(self) -> Result<PathBuf> {
        let _one_at_a_time = lock(&self.lock);
        if self.target.is_dir() {
            return Ok(self.target);
        }
        let started = std::time::Instant::now();
        std::fs::create_dir(&self.temp)
            .map_err(|source| Error::UnpackDir { path: self.temp.clone(), source })?;
        let result = unpack::unpack_layers(&self.layers, &self.temp, self.max_bytes)
            .map_err(|source| Error::Unpack { image: self.image.clone(), source })
            .and_then(|()| {
                // The rename is the "complete" mark: a crash before it leaves only tmp/.
                std::fs::rename(&self.temp, &self.target)
                    .map_err(|source| Error::UnpackDir { path: self.target.clone(), source })
            });
        if let Err(e) = result {
            // Best effort: tmp/ is emptied on the next open anyway.
            let _ = std::fs::remove_dir_all(&self.temp);
            return Err(e);
        }
        if let Some(parent) = self.target.parent() {
            let _ = sync_dir(parent);
        }
        info!(
            image = %self.image,
            layers = self.layers.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "image unpacked"
        );
        Ok(self.target)
    }
}

fn parse_image_config(digest: &str, bytes: &[u8]) -> Result<ImageConfig> {
    let parsed = oci_spec::image::ImageConfiguration::from_reader(bytes)
        .map_err(|e| Error::ParseConfig { digest: digest.to_owned(), reason: e.to_string() })?;
    let mut config = ImageConfig {
        architecture: parsed.architecture().to_string(),
        os: parsed.os().to_string(),
        ..Default::default()
    };
    if let Some(c) = parsed.config() {
        config.entrypoint = c.entrypoint().clone().unwrap_or_default();
        config.cmd = c.cmd().clone().unwrap_or_default();
        config.env = c.env().clone().unwrap_or_default();
        config.working_dir = c.working_dir().clone().filter(|w| !w.is_empty());
        config.user = c.user().clone().filter(|u| !u.is_empty());
        config.labels = c.labels().clone().unwrap_or_default().into_iter().collect();
        config.exposed_ports = c.exposed_ports().clone().unwrap_or_default();
        config.volumes = c.volumes().clone().unwrap_or_default();
        config.stop_signal = c.stop_signal().clone().filter(|s| !s.is_empty());
    }
    Ok(config)
}

#[cfg(test)]
mod tests;
