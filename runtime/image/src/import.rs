//! Images without a registry: importing OCI image layouts (a directory or a tar of one) and
//! `docker save` / `skopeo copy … docker-archive:` archives, every blob verified by digest, and
//! exporting an image as an OCI layout tar.

use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};

use oci_client::manifest::{IMAGE_MANIFEST_LIST_MEDIA_TYPE, OCI_IMAGE_INDEX_MEDIA_TYPE};
use serde::Deserialize;
use sha2::Digest;
use tracing::info;

use crate::{digest_hex, parse_image_config, parse_reference, Error, ImageRecord, ImageStore};

/// What is wrong with an archive to import, or why one cannot be written.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// The file or directory cannot be opened.
    #[error("open {path}: {source}")]
    Open {
        /// As given.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The tar cannot be read or extracted.
    #[error("read archive {path}: {source}")]
    ReadTar {
        /// The archive.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// An entry whose path leaves the archive (`..`, absolute) or is not a file or directory.
    #[error("archive entry {0:?} is refused (not a plain file or directory inside the archive)")]
    UnsafeEntry(String),
    /// Neither `index.json` (OCI layout) nor `manifest.json` (docker archive).
    #[error(
        "{0} is neither an OCI image layout (index.json) nor a docker archive (manifest.json)"
    )]
    UnknownFormat(PathBuf),
    /// A file the archive's index names is not in it.
    #[error("archive lacks {0}")]
    Missing(String),
    /// A file names a path that is not a plain relative one.
    #[error("archive names the file {0:?}, which is not a relative path inside it")]
    BadName(String),
    /// An index or manifest does not parse.
    #[error("parse {name}: {source}")]
    Parse {
        /// The file.
        name: String,
        /// The cause.
        source: serde_json::Error,
    },
    /// The archive names no image the store can run.
    #[error("{0}")]
    Unsupported(String),
    /// Writing an exported archive failed; no partial file is left.
    #[error("write archive {path}: {source}")]
    Write {
        /// The archive.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// How far an import or export is, for a progress display.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArchiveProgress {
    /// `extract` (a tar into the store's tmp/), `copy` (blobs into the store, hashed),
    /// `unpack` (the image's tree) or `write` (an export's tar).
    pub step: &'static str,
    /// Bytes done.
    pub done: u64,
    /// Bytes in all; 0 when unknown (the unpack).
    pub total: u64,
}

/// Counts one step's bytes and tells the callback at most every [`Self::EVERY`] bytes, and
/// when the step starts and ends.
struct StepCounter<'a> {
    report: &'a dyn Fn(&ArchiveProgress),
    step: &'static str,
    total: u64,
    done: std::cell::Cell<u64>,
    reported: std::cell::Cell<u64>,
}

impl<'a> StepCounter<'a> {
    const EVERY: u64 = 1 << 20;

    fn start(report: &'a dyn Fn(&ArchiveProgress), step: &'static str, total: u64) -> Self {
        report(&ArchiveProgress { step, done: 0, total });
        Self { report, step, total, done: 0.into(), reported: 0.into() }
    }

    fn add(&self, bytes: u64) {
        let done = self.done.get() + bytes;
        self.done.set(done);
        if done - self.reported.get() >= Self::EVERY {
            self.reported.set(done);
            (self.report)(&ArchiveProgress { step: self.step, done, total: self.total });
        }
    }

    fn finish(&self) {
        let done = self.done.get();
        (self.report)(&ArchiveProgress { step: self.step, done, total: self.total.max(done) });
    }
}

/// A reader that counts what passes through it.
struct Counted<'a, R> {
    inner: R,
    counter: &'a StepCounter<'a>,
}

impl<R: Read> Read for Counted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.counter.add(n as u64);
        Ok(n)
    }
}

/// An image found in an archive, before its blobs are copied.
struct Found {
    /// Normalised names (`registry/repository:tag`).
    names: Vec<String>,
    /// Whether the archive names the manifest by digest (OCI layouts): then repo digests
    /// name it (or the index) as a pull's would.
    by_digest: bool,
    /// The index that led to the manifest, digest and bytes.
    index: Option<(String, Vec<u8>)>,
    manifest: Vec<u8>,
    /// File and expected digest (None: computed, docker archives name files by path).
    config: (PathBuf, Option<String>),
    layers: Vec<(PathBuf, Option<String>)>,
}

#[derive(Deserialize)]
struct Index {
    manifests: Vec<IndexEntry>,
}

#[derive(Deserialize)]
struct IndexEntry {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    platform: Option<Platform>,
    #[serde(default)]
    annotations: std::collections::HashMap<String, String>,
}

#[derive(Deserialize)]
struct Platform {
    os: String,
    architecture: String,
}

#[derive(Deserialize)]
struct Manifest {
    config: Descriptor,
    layers: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Descriptor {
    digest: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// The file `path`, refused past `limit` bytes (the limit on manifests applies to every JSON
/// document of an archive, as it does to a registry's) without reading further.
fn read_capped(path: &Path, limit: u64, what: &str) -> crate::Result<Vec<u8>> {
    let file = std::fs::File::open(path).map_err(|_| ArchiveError::Missing(what.to_owned()))?;
    let mut bytes = Vec::new();
    file.take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|source| Error::ReadBlob { path: path.to_owned(), source })?;
    if bytes.len() as u64 > limit {
        return Err(Error::ManifestTooLarge { what: what.to_owned(), limit });
    }
    Ok(bytes)
}

fn read_json<T: for<'de> Deserialize<'de>>(dir: &Path, name: &str, limit: u64) -> crate::Result<T> {
    let bytes = read_capped(&dir.join(name), limit, name)?;
    serde_json::from_slice(&bytes)
        .map_err(|source| ArchiveError::Parse { name: name.to_owned(), source }.into())
}

/// `dir/name` for a name an archive gives, refusing anything that leaves `dir`.
fn inside(dir: &Path, name: &str) -> Result<PathBuf, ArchiveError> {
    let relative = Path::new(name);
    if name.is_empty() || !relative.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(ArchiveError::BadName(name.to_owned()));
    }
    Ok(dir.join(relative))
}

fn oci_blob(dir: &Path, digest: &str) -> crate::Result<PathBuf> {
    Ok(dir.join("blobs/sha256").join(digest_hex(digest)?))
}

/// The name an OCI index entry gives its image: containerd's full-name annotation, else the
/// standard ref.name when it is a full reference (a bare tag such as "latest" names nothing).
fn oci_name(entry: &IndexEntry) -> Option<String> {
    let name = entry
        .annotations
        .get("io.containerd.image.name")
        .or_else(|| entry.annotations.get("org.opencontainers.image.ref.name"))?;
    if !name.contains('/') {
        return None;
    }
    parse_reference(name).ok().map(|r| r.whole())
}

fn is_index(media_type: &str) -> bool {
    media_type == OCI_IMAGE_INDEX_MEDIA_TYPE || media_type == IMAGE_MANIFEST_LIST_MEDIA_TYPE
}

fn oci_images(dir: &Path, max_manifest_bytes: u64) -> crate::Result<Vec<Found>> {
    let index: Index = read_json(dir, "index.json", max_manifest_bytes)?;
    let mut found = Vec::new();
    for entry in &index.manifests {
        let what = format!("blob {}", entry.digest);
        let top = read_capped(&oci_blob(dir, &entry.digest)?, max_manifest_bytes, &what)?;
        verify(&entry.digest, &top, "manifest")?;
        let (manifest, index) = if is_index(&entry.media_type) {
            let nested: Index = serde_json::from_slice(&top)
                .map_err(|source| ArchiveError::Parse { name: entry.digest.clone(), source })?;
            let Some(amd64) = nested.manifests.iter().find(|m| {
                m.platform.as_ref().is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
            }) else {
                return Err(ArchiveError::Unsupported(format!(
                    "index {} has no linux/amd64 image",
                    entry.digest
                ))
                .into());
            };
            let what = format!("blob {}", amd64.digest);
            let bytes = read_capped(&oci_blob(dir, &amd64.digest)?, max_manifest_bytes, &what)?;
            verify(&amd64.digest, &bytes, "manifest")?;
            (bytes, Some((entry.digest.clone(), top)))
        } else {
            (top, None)
        };
        let parsed: Manifest = serde_json::from_slice(&manifest)
            .map_err(|source| ArchiveError::Parse { name: entry.digest.clone(), source })?;
        let blob = |digest: &String| -> crate::Result<(PathBuf, Option<String>)> {
            Ok((oci_blob(dir, digest)?, Some(digest.clone())))
        };
        found.push(Found {
            names: oci_name(entry).into_iter().collect(),
            by_digest: true,
            index,
            manifest,
            config: blob(&parsed.config.digest)?,
            layers: parsed.layers.iter().map(|l| blob(&l.digest)).collect::<crate::Result<_>>()?,
        });
    }
    Ok(found)
}

fn docker_images(dir: &Path, max_manifest_bytes: u64) -> crate::Result<Vec<Found>> {
    let entries: Vec<DockerEntry> = read_json(dir, "manifest.json", max_manifest_bytes)?;
    let mut found = Vec::new();
    for entry in entries {
        let mut names = Vec::new();
        for tag in entry.repo_tags.unwrap_or_default() {
            names.push(parse_reference(&tag)?.whole());
        }
        let layers = entry
            .layers
            .iter()
            .map(|layer| Ok((inside(dir, layer)?, None)))
            .collect::<Result<Vec<_>, ArchiveError>>()?;
        found.push(Found {
            names,
            by_digest: false,
            index: None,
            // Synthesised once the blobs' digests are known.
            manifest: Vec::new(),
            config: (inside(dir, &entry.config)?, None),
            layers,
        });
    }
    Ok(found)
}

fn verify(expected: &str, data: &[u8], what: &str) -> crate::Result<()> {
    let actual = crate::sha256_digest(data);
    if actual != expected {
        return Err(Error::DigestMismatch {
            what: format!("{what} {expected} in the archive"),
            expected: expected.to_owned(),
            actual,
        });
    }
    Ok(())
}

/// A Docker schema 2 manifest for a docker archive's image (it has none of its own).
fn docker_manifest(config: (&str, u64), layers: &[(String, u64)]) -> Vec<u8> {
    let layers: Vec<serde_json::Value> = layers
        .iter()
        .map(|(digest, size)| {
            serde_json::json!({
                "mediaType": "application/vnd.docker.image.rootfs.diff.tar",
                "digest": digest,
                "size": size,
            })
        })
        .collect();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            "digest": config.0,
            "size": config.1,
        },
        "layers": layers,
    });
    manifest.to_string().into_bytes()
}

/// Removes an extracted archive when the import ends.
struct Extracted(Option<PathBuf>);

impl Drop for Extracted {
    fn drop(&mut self) {
        if let Some(dir) = &self.0 {
            // Best effort: tmp/ is emptied on the next open anyway.
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The archive-relative name a link entry at `name` points at, if it stays inside: hard link
/// targets are archive-relative already, symlink targets relative to the link's directory.
fn link_target(name: &str, target: &str, symbolic: bool) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    if symbolic {
        parts.extend(name.split('/').filter(|p| !p.is_empty() && *p != "."));
        parts.pop();
    }
    if target.starts_with('/') {
        return None;
    }
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            part => parts.push(part),
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

/// Extracts plain files and directories of `archive` into `into`, and links as hard links
/// to files inside it (skopeo's docker archives link `<id>/layer.tar` to `<id>.tar`); refuses
/// anything else.
fn extract(archive: &Path, into: &Path, counter: &StepCounter<'_>) -> Result<(), ArchiveError> {
    let tar_error = |source| ArchiveError::ReadTar { path: archive.to_owned(), source };
    let file = std::fs::File::open(archive)
        .map_err(|source| ArchiveError::Open { path: archive.to_owned(), source })?;
    let mut tar = tar::Archive::new(Counted { inner: file, counter });
    let mut links = Vec::new();
    for entry in tar.entries().map_err(tar_error)? {
        let mut entry = entry.map_err(tar_error)?;
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let trimmed = name.trim_start_matches("./").trim_end_matches('/');
        if trimmed.is_empty() || trimmed == "." {
            continue;
        }
        let path = inside(into, trimmed).map_err(|_| ArchiveError::UnsafeEntry(name.clone()))?;
        match entry.header().entry_type() {
            tar::EntryType::Directory => std::fs::create_dir_all(&path).map_err(tar_error)?,
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent).map_err(tar_error)?;
                }
                let mut out = std::fs::File::create(&path).map_err(tar_error)?;
                std::io::copy(&mut entry, &mut out).map_err(tar_error)?;
            }
            kind @ (tar::EntryType::Symlink | tar::EntryType::Link) => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| String::from_utf8_lossy(&t).into_owned())
                    .unwrap_or_default();
                let target = link_target(trimmed, &target, kind == tar::EntryType::Symlink)
                    .ok_or_else(|| ArchiveError::UnsafeEntry(name.clone()))?;
                let target =
                    inside(into, &target).map_err(|_| ArchiveError::UnsafeEntry(name.clone()))?;
                links.push((path, target));
            }
            _ => return Err(ArchiveError::UnsafeEntry(name)),
        }
    }
    // After every file exists. A link to a link or a directory fails here, which is fine:
    // no image archive needs one.
    for (path, target) in links {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(tar_error)?;
        }
        std::fs::hard_link(&target, &path).map_err(tar_error)?;
    }
    Ok(())
}

impl ImageStore {
    /// Imports every image of `path` (an OCI image layout directory, a tar of one, or a
    /// docker archive), verifying each blob by digest and unpacking each image. Images keep
    /// the names the archive gives them; OCI entries named by a bare tag are imported by id.
    /// Blocking.
    pub fn import(&self, path: &Path) -> crate::Result<Vec<ImageRecord>> {
        self.import_reporting(path, &|_| {})
    }

    /// [`Self::import`], telling `report` how far it is.
    pub fn import_reporting(
        &self,
        path: &Path,
        report: &dyn Fn(&ArchiveProgress),
    ) -> crate::Result<Vec<ImageRecord>> {
        let metadata = std::fs::metadata(path)
            .map_err(|source| ArchiveError::Open { path: path.to_owned(), source })?;
        let (dir, _extracted) = if metadata.is_dir() {
            (path.to_owned(), Extracted(None))
        } else {
            let temp = self.temp_path("import");
            std::fs::create_dir(&temp)
                .map_err(|source| Error::UnpackDir { path: temp.clone(), source })?;
            let extracted = Extracted(Some(temp.clone()));
            let counter = StepCounter::start(report, "extract", metadata.len());
            extract(path, &temp, &counter)?;
            counter.finish();
            (temp, extracted)
        };
        let found = if dir.join("index.json").is_file() {
            oci_images(&dir, self.config.max_manifest_bytes)?
        } else if dir.join("manifest.json").is_file() {
            docker_images(&dir, self.config.max_manifest_bytes)?
        } else {
            return Err(ArchiveError::UnknownFormat(path.to_owned()).into());
        };
        if found.is_empty() {
            return Err(
                ArchiveError::Unsupported(format!("{} holds no image", path.display())).into()
            );
        }
        found.into_iter().map(|image| self.import_one(image, report)).collect()
    }

    /// Imports one image; a failed import leaves none of its blobs behind (the archive is
    /// still there to retry from, unlike a registry's download).
    fn import_one(
        &self,
        image: Found,
        report: &dyn Fn(&ArchiveProgress),
    ) -> crate::Result<ImageRecord> {
        let mut added = Vec::new();
        let result = self.copy_and_unpack(image, &mut added, report);
        if result.is_err() {
            self.discard_unused_blobs(&added);
        }
        result
    }

    /// The limits a pull applies, on the archive's files as they are: the config within
    /// `max_config_bytes`, config and layers within `max_image_bytes` (the unpack checks
    /// `max_unpacked_bytes`).
    /// Returns the bytes to copy.
    fn check_archive_sizes(&self, image: &Found) -> crate::Result<u64> {
        let size_of = |file: &Path| {
            std::fs::metadata(file)
                .map(|m| m.len())
                .map_err(|_| ArchiveError::Missing(file.display().to_string()))
        };
        let config = size_of(&image.config.0)?;
        if config > self.config.max_config_bytes {
            return Err(Error::ConfigTooLarge {
                digest: image
                    .config
                    .1
                    .clone()
                    .unwrap_or_else(|| image.config.0.display().to_string()),
                size: config,
                limit: self.config.max_config_bytes,
            });
        }
        let mut total = config;
        for (file, _) in &image.layers {
            total = total.saturating_add(size_of(file)?);
        }
        if total > self.config.max_image_bytes {
            return Err(Error::ImageTooLarge {
                reference: image
                    .names
                    .first()
                    .cloned()
                    .unwrap_or_else(|| "an archived image".into()),
                size: total,
                limit: self.config.max_image_bytes,
            });
        }
        Ok(total)
    }

    fn copy_and_unpack(
        &self,
        mut image: Found,
        added: &mut Vec<String>,
        report: &dyn Fn(&ArchiveProgress),
    ) -> crate::Result<ImageRecord> {
        let to_copy = self.check_archive_sizes(&image)?;
        let counter = StepCounter::start(report, "copy", to_copy);
        // Every blob stays pinned (kept by a concurrent GC) until the record exists.
        let (config_digest, config_size, _config_pin) =
            self.put_blob_file(&image.config.0, image.config.1.as_deref(), &counter)?;
        added.push(config_digest.clone());
        let mut layers = Vec::new();
        let mut layer_pins = Vec::new();
        for (file, digest) in &image.layers {
            let (digest, size, pin) = self.put_blob_file(file, digest.as_deref(), &counter)?;
            added.push(digest.clone());
            layers.push((digest, size));
            layer_pins.push(pin);
        }
        counter.finish();
        if image.manifest.is_empty() {
            image.manifest = docker_manifest((&config_digest, config_size), &layers);
        }
        let manifest_digest = crate::sha256_digest(&image.manifest);
        let mut top_pins = vec![manifest_digest.clone()];
        top_pins.extend(image.index.iter().map(|(digest, _)| digest.clone()));
        let _top_pin = self.pin(&top_pins);
        added.extend(top_pins.iter().cloned());
        self.put_blob(&manifest_digest, &image.manifest, "manifest")?;
        let mut top_digest = manifest_digest.clone();
        if let Some((digest, bytes)) = &image.index {
            self.put_blob(digest, bytes, "index")?;
            top_digest = digest.clone();
        }
        let config_bytes = self.read_blob(&config_digest)?;
        let config =
            oci_spec::image::ImageConfiguration::from_reader(&config_bytes[..]).map_err(|e| {
                Error::ParseConfig { digest: config_digest.clone(), reason: e.to_string() }
            })?;
        let diff_ids = config.rootfs().diff_ids().clone();
        if diff_ids.len() != layers.len() {
            return Err(Error::LayerCountMismatch {
                digest: config_digest.clone(),
                diff_ids: diff_ids.len(),
                layers: layers.len(),
            });
        }
        let repo_digests = if image.by_digest {
            image
                .names
                .iter()
                .filter_map(|name| parse_reference(name).ok())
                .map(|r| format!("{}/{}@{top_digest}", r.registry(), r.repository()))
                .collect()
        } else {
            Vec::new()
        };
        let record = ImageRecord {
            id: config_digest.clone(),
            repo_tags: image.names.clone(),
            repo_digests,
            size: config_size + layers.iter().map(|(_, size)| size).sum::<u64>(),
            user: parse_image_config(&config_digest, &config_bytes)?.user,
            manifest_digest,
            index_digests: image.index.iter().map(|(digest, _)| digest.clone()).collect(),
            layers: layers.into_iter().map(|(digest, _)| digest).collect(),
            diff_ids,
            pulled_at: crate::now_ns() / 1_000_000_000,
        };
        // Unpacked before the record exists, as a pull does.
        let unpack = StepCounter::start(report, "unpack", 0);
        self.unpack_job(&record)?.run()?;
        unpack.finish();
        let record = self.commit_record(record)?;
        info!(image = %record.id, tags = ?record.repo_tags, "image imported");
        Ok(record)
    }

    /// Copies `file` into the blobs, hashing on the way; `expected` (when the archive names
    /// the blob by digest) must match. Returns the digest, the size and a pin taken as the blob
    /// lands, so a concurrent GC never sees it unpinned.
    fn put_blob_file(
        &self,
        file: &Path,
        expected: Option<&str>,
        counter: &StepCounter<'_>,
    ) -> crate::Result<(String, u64, crate::PinGuard<'_>)> {
        if let Some(digest) = expected {
            digest_hex(digest)?;
        }
        let name = file.display().to_string();
        let mut source =
            std::fs::File::open(file).map_err(|_| ArchiveError::Missing(name.clone()))?;
        let temp = self.temp_path("import-blob");
        // A file this import extracted into tmp/ is the store's own: linked, not copied again
        // (a second write of every layer). Anything else, a layout directory the caller
        // owns, is copied.
        let linked =
            file.starts_with(self.dir.join("tmp")) && std::fs::hard_link(file, &temp).is_ok();
        let result = (|| {
            let write_error = |source| Error::WriteBlob { path: temp.clone(), source };
            let mut out = if linked {
                None
            } else {
                Some(std::fs::File::create(&temp).map_err(write_error)?)
            };
            let mut hasher = sha2::Sha256::new();
            let mut size = 0u64;
            let mut buffer = vec![0u8; 256 * 1024];
            loop {
                let n = source
                    .read(&mut buffer)
                    .map_err(|source| Error::ReadBlob { path: file.to_owned(), source })?;
                if n == 0 {
                    break;
                }
                hasher.update(&buffer[..n]);
                if let Some(out) = &mut out {
                    out.write_all(&buffer[..n]).map_err(write_error)?;
                }
                size += n as u64;
                counter.add(n as u64);
            }
            match &out {
                Some(out) => out.sync_all().map_err(write_error)?,
                // The extracted file's data, before it is named as a blob.
                None => source.sync_all().map_err(write_error)?,
            }
            let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
            if let Some(expected) = expected {
                if actual != expected {
                    return Err(Error::DigestMismatch {
                        what: format!("blob {expected} in the archive"),
                        expected: expected.to_owned(),
                        actual,
                    });
                }
            }
            let path = self.blob_path(&actual)?;
            // Under the pins lock, which GC holds throughout its scan.
            let mut pins = crate::lock(&self.pins);
            if !path.exists() {
                std::fs::rename(&temp, &path)
                    .map_err(|source| Error::WriteBlob { path, source })?;
            }
            *pins.entry(actual.clone()).or_insert(0) += 1;
            drop(pins);
            let pin = crate::PinGuard { store: self, digests: vec![actual.clone()] };
            Ok((actual, size, pin))
        })();
        // Gone after a rename; otherwise a failed or redundant copy.
        let _ = std::fs::remove_file(&temp);
        result
    }
}

/// The OCI layout `index.json` naming one manifest.
fn layout_index(media_type: &str, digest: &str, size: usize, name: Option<&str>) -> Vec<u8> {
    let mut entry = serde_json::json!({"mediaType": media_type, "digest": digest, "size": size});
    if let Some(name) = name {
        // Both: ref.name for skopeo/umoci, the containerd key for ctr and for our import.
        entry["annotations"] = serde_json::json!({
            "org.opencontainers.image.ref.name": name,
            "io.containerd.image.name": name,
        });
    }
    serde_json::json!({"schemaVersion": 2, "manifests": [entry]}).to_string().into_bytes()
}

impl ImageStore {
    /// Writes the image `reference` names as an OCI image layout tar at `file` (its linux/amd64
    /// manifest, config and layers; named by its first tag), atomically. Blocking.
    pub fn export(&self, reference: &str, file: &Path) -> crate::Result<ImageRecord> {
        self.export_reporting(reference, file, &|_| {})
    }

    /// [`Self::export`], telling `report` how far it is.
    pub fn export_reporting(
        &self,
        reference: &str,
        file: &Path,
        report: &dyn Fn(&ArchiveProgress),
    ) -> crate::Result<ImageRecord> {
        let record = self.get(reference)?;
        let manifest = self.read_blob(&record.manifest_digest)?;
        let media_type = serde_json::from_slice::<serde_json::Value>(&manifest)
            .ok()
            .and_then(|m| m.get("mediaType").and_then(|t| t.as_str()).map(str::to_owned))
            .unwrap_or_else(|| oci_client::manifest::OCI_IMAGE_MEDIA_TYPE.to_owned());
        let index = layout_index(
            &media_type,
            &record.manifest_digest,
            manifest.len(),
            record.repo_tags.first().map(String::as_str),
        );
        let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let temp = file.with_file_name(format!(".{name}.partial.{}", std::process::id()));
        let result = self.write_layout_tar(&record, &index, &temp, report).and_then(|()| {
            std::fs::rename(&temp, file)
                .map_err(|source| ArchiveError::Write { path: file.to_owned(), source }.into())
        });
        if result.is_err() {
            let _ = std::fs::remove_file(&temp);
        }
        result?;
        info!(image = %record.id, file = %file.display(), "image exported");
        Ok(record)
    }

    fn write_layout_tar(
        &self,
        record: &ImageRecord,
        index: &[u8],
        path: &Path,
        report: &dyn Fn(&ArchiveProgress),
    ) -> crate::Result<()> {
        let blobs: Vec<&String> = std::iter::once(&record.manifest_digest)
            .chain(std::iter::once(&record.id))
            .chain(&record.layers)
            .collect();
        let mut total = 0u64;
        for digest in &blobs {
            let blob = self.blob_path(digest)?;
            let size = std::fs::metadata(&blob)
                .map_err(|source| Error::ReadBlob { path: blob.clone(), source })?
                .len();
            total = total.saturating_add(size);
        }
        let counter = StepCounter::start(report, "write", total);
        let write_error = |source| ArchiveError::Write { path: path.to_owned(), source };
        let out = std::fs::File::create(path).map_err(write_error)?;
        let mut tar = tar::Builder::new(std::io::BufWriter::new(out));
        let mut add = |name: &str, data: &mut dyn Read, size: u64| {
            let mut header = tar::Header::new_ustar();
            header.set_size(size);
            header.set_mode(0o644);
            header.set_entry_type(tar::EntryType::Regular);
            tar.append_data(&mut header, name, data).map_err(write_error)
        };
        add("oci-layout", &mut &br#"{"imageLayoutVersion":"1.0.0"}"#[..], 30)?;
        add("index.json", &mut &index[..], index.len() as u64)?;
        for digest in blobs {
            let blob = self.blob_path(digest)?;
            let file = std::fs::File::open(&blob)
                .map_err(|source| Error::ReadBlob { path: blob.clone(), source })?;
            let size = file
                .metadata()
                .map_err(|source| Error::ReadBlob { path: blob.clone(), source })?
                .len();
            let mut counted = Counted { inner: &file, counter: &counter };
            add(&format!("blobs/sha256/{}", digest_hex(digest)?), &mut counted, size)?;
        }
        let out = tar.into_inner().map_err(write_error)?;
        let file = out.into_inner().map_err(|e| write_error(e.into_error()))?;
        file.sync_all().map_err(write_error)?;
        counter.finish();
        Ok(())
    }
}
