//! Test images built from scratch, without any registry or network: layers are tar archives
//! written with the `tar` crate (optionally gzip/zstd compressed), images are OCI image layouts
//! (`oci-layout`, `index.json`, `blobs/sha256/…`) that `skopeo copy oci:DIR:tag …` pushes.
//!
//! The content comes from the host's `busybox-static` (`/bin/busybox`), so the images run in a
//! real guest.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// Where Debian's `busybox-static` installs its statically linked binary.
pub const BUSYBOX: &str = "/bin/busybox";

/// OCI media types the test images use.
pub const MEDIA_TYPE_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index media type.
pub const MEDIA_TYPE_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image config media type.
pub const MEDIA_TYPE_CONFIG: &str = "application/vnd.oci.image.config.v1+json";

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// How a layer blob is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// Plain tar (`application/vnd.oci.image.layer.v1.tar`).
    None,
    /// `…tar+gzip`.
    Gzip,
    /// `…tar+zstd`.
    Zstd,
}

impl Compression {
    fn media_type(self) -> &'static str {
        match self {
            Compression::None => "application/vnd.oci.image.layer.v1.tar",
            Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }

    fn compress(self, tar: &[u8]) -> Result<Vec<u8>> {
        use std::io::Write;
        Ok(match self {
            Compression::None => tar.to_vec(),
            Compression::Gzip => {
                let mut encoder =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                encoder.write_all(tar)?;
                encoder.finish()?
            }
            Compression::Zstd => zstd::encode_all(tar, 3)?,
        })
    }
}

/// Builds one layer (a tar archive). Paths are relative to the image root ("etc/passwd").
pub struct LayerBuilder {
    builder: tar::Builder<Vec<u8>>,
}

impl Default for LayerBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl LayerBuilder {
    /// An empty layer.
    pub fn new() -> Self {
        let mut builder = tar::Builder::new(Vec::new());
        builder.mode(tar::HeaderMode::Deterministic);
        Self { builder }
    }

    fn header(entry_type: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(entry_type);
        header.set_mode(mode);
        header.set_size(size);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(1_700_000_000);
        header
    }

    /// A directory.
    pub fn dir(mut self, path: &str, mode: u32) -> Result<Self> {
        let mut header = Self::header(tar::EntryType::Directory, mode, 0);
        self.builder
            .append_data(&mut header, path, std::io::empty())
            .with_context(|| format!("tar dir {path}"))?;
        Ok(self)
    }

    /// A regular file owned by root.
    pub fn file(self, path: &str, contents: &[u8], mode: u32) -> Result<Self> {
        self.file_owned(path, contents, mode, 0, 0)
    }

    /// A regular file with an owner.
    pub fn file_owned(
        mut self,
        path: &str,
        contents: &[u8],
        mode: u32,
        uid: u64,
        gid: u64,
    ) -> Result<Self> {
        let mut header = Self::header(tar::EntryType::Regular, mode, contents.len() as u64);
        header.set_uid(uid);
        header.set_gid(gid);
        self.builder
            .append_data(&mut header, path, contents)
            .with_context(|| format!("tar file {path}"))?;
        Ok(self)
    }

    /// A symbolic link `path -> target`.
    pub fn symlink(mut self, path: &str, target: &str) -> Result<Self> {
        let mut header = Self::header(tar::EntryType::Symlink, 0o777, 0);
        self.builder
            .append_link(&mut header, path, target)
            .with_context(|| format!("tar symlink {path}"))?;
        Ok(self)
    }

    /// A hard link `path` to the earlier entry `target` (both image paths).
    pub fn hardlink(mut self, path: &str, target: &str) -> Result<Self> {
        let mut header = Self::header(tar::EntryType::Link, 0o644, 0);
        self.builder
            .append_link(&mut header, path, target)
            .with_context(|| format!("tar hardlink {path}"))?;
        Ok(self)
    }

    /// A whiteout hiding `path` of lower layers (`dir/.wh.name`).
    pub fn whiteout(self, path: &str) -> Result<Self> {
        let (parent, name) = match path.rsplit_once('/') {
            Some((parent, name)) => (format!("{parent}/"), name),
            None => (String::new(), path),
        };
        self.file(&format!("{parent}.wh.{name}"), b"", 0o644)
    }

    /// Marks `dir` opaque: lower layers' content of it is hidden (`dir/.wh..wh..opq`).
    pub fn opaque(self, dir: &str) -> Result<Self> {
        self.file(&format!("{dir}/.wh..wh..opq"), b"", 0o644)
    }

    /// An entry whose name is written verbatim into the header, bypassing the `tar` crate's
    /// path checks: for hostile-image tests (`../escape`, `/abs`).
    pub fn raw_entry(
        mut self,
        name: &[u8],
        entry_type: tar::EntryType,
        link: Option<&[u8]>,
        contents: &[u8],
    ) -> Result<Self> {
        let mut header = Self::header(entry_type, 0o644, contents.len() as u64);
        let gnu = header.as_gnu_mut().context("gnu header")?;
        if name.len() > gnu.name.len() {
            bail!("raw entry name too long");
        }
        gnu.name[..name.len()].copy_from_slice(name);
        if let Some(link) = link {
            if link.len() > gnu.linkname.len() {
                bail!("raw link name too long");
            }
            gnu.linkname[..link.len()].copy_from_slice(link);
        }
        header.set_cksum();
        self.builder.append(&header, contents)?;
        Ok(self)
    }

    /// The directories of a minimal root file system, `/bin/busybox` with a symlink per applet,
    /// `/etc/passwd` (root, nobody) and `/etc/group`.
    pub fn busybox_root(self) -> Result<Self> {
        let busybox = std::fs::read(BUSYBOX).with_context(|| format!("read {BUSYBOX}"))?;
        let mut layer = self;
        for (dir, mode) in [
            ("bin", 0o755),
            ("dev", 0o755),
            ("etc", 0o755),
            ("home", 0o755),
            ("proc", 0o555),
            ("root", 0o700),
            ("sys", 0o555),
            ("tmp", 0o1777),
            ("var", 0o755),
        ] {
            layer = layer.dir(dir, mode)?;
        }
        layer = layer
            .file("bin/busybox", &busybox, 0o755)?
            .file(
                "etc/passwd",
                b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
                0o644,
            )?
            .file("etc/group", b"root:x:0:\nnogroup:x:65534:\n", 0o644)?;
        for applet in busybox_applets()? {
            if applet != "busybox" {
                layer = layer.symlink(&format!("bin/{applet}"), "busybox")?;
            }
        }
        Ok(layer)
    }

    /// The uncompressed tar archive.
    pub fn finish(self) -> Result<Vec<u8>> {
        Ok(self.builder.into_inner()?)
    }
}

/// The applet names `/bin/busybox --list` prints.
pub fn busybox_applets() -> Result<Vec<String>> {
    let output = Command::new(BUSYBOX)
        .arg("--list")
        .output()
        .with_context(|| format!("run {BUSYBOX} --list"))?;
    if !output.status.success() {
        bail!("{BUSYBOX} --list failed");
    }
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::trim)
        .filter(|name| !name.is_empty() && !name.contains('/'))
        .map(str::to_owned)
        .collect())
}

/// One image: layers (uncompressed tars + the compression to push them with) and the `config`
/// section of the image config (Cmd, Env, User, …).
#[derive(Clone, Debug)]
pub struct TestImage {
    /// Uncompressed layer tars, lowest first.
    pub layers: Vec<Vec<u8>>,
    /// Compression of every layer blob.
    pub compression: Compression,
    /// The image config's `config` object.
    pub config: Value,
    /// `architecture` of the image config.
    pub architecture: String,
}

impl TestImage {
    /// A linux/amd64 image with `Cmd ["sh"]` and a PATH.
    pub fn new(layers: Vec<Vec<u8>>) -> Self {
        Self {
            layers,
            compression: Compression::Gzip,
            config: json!({
                "Cmd": ["sh"],
                "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                "WorkingDir": "/",
                "Labels": {"org.podvisor.test": "true"},
            }),
            architecture: "amd64".to_owned(),
        }
    }

    /// The busybox image: one layer from [`LayerBuilder::busybox_root`].
    pub fn busybox() -> Result<Self> {
        Ok(Self::new(vec![LayerBuilder::new().busybox_root()?.finish()?]))
    }

    /// Sets a `config` field (e.g. "User", "Entrypoint").
    pub fn with_config(mut self, key: &str, value: Value) -> Self {
        if let Some(object) = self.config.as_object_mut() {
            object.insert(key.to_owned(), value);
        }
        self
    }
}

/// What was written for one image manifest.
#[derive(Clone, Debug)]
pub struct WrittenManifest {
    /// Digest of the manifest blob.
    pub digest: String,
    /// Size of the manifest blob.
    pub size: usize,
    /// Digest of the config blob (the image id).
    pub config_digest: String,
    /// Digests of the (compressed) layer blobs.
    pub layer_digests: Vec<String>,
}

/// An OCI image layout directory under construction.
pub struct OciLayout {
    dir: PathBuf,
    refs: Vec<Value>,
}

impl OciLayout {
    /// Creates the layout skeleton in `dir` (created if missing).
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir.join("blobs/sha256"))
            .with_context(|| format!("create {}", dir.display()))?;
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        Ok(Self { dir: dir.to_owned(), refs: Vec::new() })
    }

    /// The layout directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes a blob, returning its digest.
    pub fn write_blob(&self, data: &[u8]) -> Result<String> {
        let digest = sha256_digest(data);
        let path = self.dir.join("blobs/sha256").join(&digest["sha256:".len()..]);
        std::fs::write(&path, data).with_context(|| format!("write {}", path.display()))?;
        Ok(digest)
    }

    /// Writes an image's layers, config and manifest (not yet tagged).
    pub fn write_image(&self, image: &TestImage) -> Result<WrittenManifest> {
        let mut layer_descriptors = Vec::new();
        let mut diff_ids = Vec::new();
        let mut layer_digests = Vec::new();
        for tar in &image.layers {
            diff_ids.push(sha256_digest(tar));
            let blob = image.compression.compress(tar)?;
            let digest = self.write_blob(&blob)?;
            layer_descriptors.push(json!({
                "mediaType": image.compression.media_type(),
                "digest": digest,
                "size": blob.len(),
            }));
            layer_digests.push(digest);
        }
        let config = json!({
            "created": "2026-01-01T00:00:00Z",
            "architecture": image.architecture,
            "os": "linux",
            "config": image.config,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [{"created_by": "podvisor-e2e"}],
        });
        let config_bytes = serde_json::to_vec(&config)?;
        let config_digest = self.write_blob(&config_bytes)?;
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_MANIFEST,
            "config": {
                "mediaType": MEDIA_TYPE_CONFIG,
                "digest": config_digest,
                "size": config_bytes.len(),
            },
            "layers": layer_descriptors,
        });
        let manifest_bytes = serde_json::to_vec(&manifest)?;
        let digest = self.write_blob(&manifest_bytes)?;
        Ok(WrittenManifest { digest, size: manifest_bytes.len(), config_digest, layer_digests })
    }

    /// Writes an image index over `(manifest, architecture)` pairs, returning (digest, size).
    pub fn write_index(&self, manifests: &[(WrittenManifest, &str)]) -> Result<(String, usize)> {
        let entries: Vec<Value> = manifests
            .iter()
            .map(|(manifest, arch)| {
                json!({
                    "mediaType": MEDIA_TYPE_MANIFEST,
                    "digest": manifest.digest,
                    "size": manifest.size,
                    "platform": {"architecture": arch, "os": "linux"},
                })
            })
            .collect();
        let index = json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_INDEX,
            "manifests": entries,
        });
        let bytes = serde_json::to_vec(&index)?;
        Ok((self.write_blob(&bytes)?, bytes.len()))
    }

    /// Names `digest` (a manifest or an index) `tag` in the layout's `index.json`.
    pub fn tag(&mut self, tag: &str, media_type: &str, digest: &str, size: usize) -> Result<()> {
        self.refs.push(json!({
            "mediaType": media_type,
            "digest": digest,
            "size": size,
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }));
        let index = json!({"schemaVersion": 2, "manifests": self.refs});
        std::fs::write(self.dir.join("index.json"), serde_json::to_vec(&index)?)?;
        Ok(())
    }
}
