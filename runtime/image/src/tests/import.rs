//! Imports of OCI layouts and docker archives, with no registry involved in the import.

use std::path::Path;
use std::process::Command;

use podvisor_e2e::images::{OciLayout, TestImage, MEDIA_TYPE_MANIFEST};
use podvisor_e2e::registry::{registry_tests_can_run, TestRegistry};

use super::{store, tmp_is_empty};
use crate::Error;

/// An OCI layout of busybox named `name`; returns its manifest digest.
fn busybox_layout(dir: &Path, name: &str) -> String {
    let mut layout = OciLayout::create(dir).unwrap();
    let manifest = layout.write_image(&TestImage::busybox().unwrap()).unwrap();
    layout.tag(name, MEDIA_TYPE_MANIFEST, &manifest.digest, manifest.size).unwrap();
    manifest.digest
}

fn tar_dir(dir: &Path, archive: &Path) {
    let mut builder = tar::Builder::new(std::fs::File::create(archive).unwrap());
    builder.append_dir_all(".", dir).unwrap();
    builder.finish().unwrap();
}

#[test]
fn oci_layout_dir_and_tar_import_and_resolve_by_name() {
    let source = tempfile::tempdir().unwrap();
    let layout = source.path().join("layout");
    let manifest_digest = busybox_layout(&layout, "example.com/tools/busybox:1");

    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let imported = store.import(&layout).unwrap();
    assert_eq!(imported.len(), 1);
    let record = &imported[0];
    assert_eq!(record.repo_tags, vec!["example.com/tools/busybox:1".to_owned()]);
    assert_eq!(record.repo_digests, vec![format!("example.com/tools/busybox@{manifest_digest}")]);
    let resolved = store.resolve("example.com/tools/busybox:1").expect("resolves by name");
    assert_eq!(resolved.id, record.id);
    assert!(store.rootfs_dir(&record.id).unwrap().join("bin/busybox").is_file());

    // The same layout as a tar, into a fresh store: the same image.
    let archive = source.path().join("busybox.tar");
    tar_dir(&layout, &archive);
    let dir2 = tempfile::tempdir().unwrap();
    let store2 = super::store(dir2.path());
    let again = store2.import(&archive).unwrap();
    assert_eq!(again[0].id, record.id);
    assert!(tmp_is_empty(&store2), "the extracted archive is removed");
}

#[test]
fn tampered_blob_in_a_layout_is_refused_and_nothing_recorded() {
    let source = tempfile::tempdir().unwrap();
    let layout = source.path().join("layout");
    busybox_layout(&layout, "example.com/busybox:1");
    let manifest: serde_json::Value = {
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
        let digest = index["manifests"][0]["digest"].as_str().unwrap().to_owned();
        let blob = layout.join("blobs/sha256").join(digest.trim_start_matches("sha256:"));
        serde_json::from_slice(&std::fs::read(blob).unwrap()).unwrap()
    };
    let layer = manifest["layers"][0]["digest"].as_str().unwrap();
    let path = layout.join("blobs/sha256").join(layer.trim_start_matches("sha256:"));
    let mut data = std::fs::read(&path).unwrap();
    let middle = data.len() / 2;
    data[middle] ^= 0xff;
    std::fs::write(&path, data).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let err = store.import(&layout).unwrap_err();
    assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
    assert!(store.list().is_empty());
    assert!(tmp_is_empty(&store));
}

#[test]
fn hostile_archives_are_refused() {
    let source = tempfile::tempdir().unwrap();
    // A docker archive whose manifest.json points outside it.
    let docker = source.path().join("docker");
    std::fs::create_dir(&docker).unwrap();
    std::fs::write(
        docker.join("manifest.json"),
        br#"[{"Config":"../../etc/passwd","RepoTags":["x:1"],"Layers":[]}]"#,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let err = store.import(&docker).unwrap_err();
    assert!(matches!(err, Error::Archive(crate::ArchiveError::BadName(_))), "{err}");
    // Not a tar at all, and a directory of neither format.
    let junk = source.path().join("junk.tar");
    std::fs::write(&junk, vec![0x5a; 4096]).unwrap();
    assert!(matches!(store.import(&junk).unwrap_err(), Error::Archive(_)));
    let empty = source.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let err = store.import(&empty).unwrap_err();
    assert!(matches!(err, Error::Archive(crate::ArchiveError::UnknownFormat(_))), "{err}");
    assert!(store.list().is_empty());
    assert!(tmp_is_empty(&store));
}

#[tokio::test]
async fn docker_archive_made_by_skopeo_imports_as_the_pulled_image() {
    if !registry_tests_can_run() {
        return;
    }
    let reg = TestRegistry::start().unwrap();
    let reference = reg.push_busybox("busybox:1").unwrap();
    let source = tempfile::tempdir().unwrap();
    let archive = source.path().join("busybox-docker.tar");
    let output = Command::new("skopeo")
        .args(["copy", "--insecure-policy", "--quiet", "--src-tls-verify=false"])
        .arg(format!("docker://{reference}"))
        .arg(format!("docker-archive:{}:registry.k8s.io/busybox:1", archive.display()))
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));

    let pulled_dir = tempfile::tempdir().unwrap();
    let pulled = super::store(pulled_dir.path()).pull(&reference, None).await.unwrap();
    drop(reg); // The import needs no registry.

    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let imported = store.import(&archive).unwrap();
    assert_eq!(imported.len(), 1);
    assert_eq!(imported[0].id, pulled.id, "same config, so the same image id");
    let resolved = store.resolve("registry.k8s.io/busybox:1").expect("resolves by its name");
    assert_eq!(resolved.id, pulled.id);
    assert!(store.rootfs_dir(&pulled.id).unwrap().join("bin/busybox").is_file());
    assert!(tmp_is_empty(&store));
}

#[test]
fn tar_entries_and_links_leaving_the_archive_are_refused() {
    let source = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let escape = |kind: tar::EntryType, name: &str, target: Option<&str>| {
        let archive = source.path().join(format!("{}.tar", name.replace('/', "_")));
        let mut builder = tar::Builder::new(std::fs::File::create(&archive).unwrap());
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_size(0);
        header.set_mode(0o644);
        if let Some(target) = target {
            header.set_link_name(target).unwrap();
        }
        // set_path refuses "..": write the raw name.
        header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        header.set_cksum();
        builder.append(&header, std::io::empty()).unwrap();
        builder.finish().unwrap();
        archive
    };
    for archive in [
        escape(tar::EntryType::Regular, "../escaped", None),
        escape(tar::EntryType::Symlink, "a/link", Some("../../etc/passwd")),
        escape(tar::EntryType::Symlink, "link", Some("/etc/passwd")),
        escape(tar::EntryType::Link, "hard", Some("../outside")),
        escape(tar::EntryType::Char, "dev", None),
    ] {
        let err = store.import(&archive).unwrap_err();
        assert!(matches!(err, Error::Archive(crate::ArchiveError::UnsafeEntry(_))), "{err}");
    }
    assert!(!source.path().join("escaped").exists());
    assert!(!dir.path().join("images/escaped").exists());
    assert!(tmp_is_empty(&store));
}

#[tokio::test]
async fn export_then_import_into_a_fresh_store_gives_the_same_image() {
    if !registry_tests_can_run() {
        return;
    }
    let reg = TestRegistry::start().unwrap();
    let reference = reg.push_multilayer("multi:1").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let pulled = store.pull(&reference, None).await.unwrap();
    drop(reg);
    let out = tempfile::tempdir().unwrap();
    let archive = out.path().join("multi.tar");
    let exported = store.export(&reference, &archive).unwrap();
    assert_eq!(exported.id, pulled.id);
    assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 1, "no partial file left");

    let dir2 = tempfile::tempdir().unwrap();
    let store2 = super::store(dir2.path());
    let imported = store2.import(&archive).unwrap();
    assert_eq!(imported.len(), 1);
    assert_eq!(imported[0].id, pulled.id);
    assert_eq!(imported[0].repo_tags, pulled.repo_tags);
    assert_eq!(imported[0].manifest_digest, pulled.manifest_digest);
    assert_eq!(imported[0].layers, pulled.layers);
    assert_eq!(store2.resolve(&reference).map(|r| r.id), Some(pulled.id.clone()));
    assert!(store2.rootfs_dir(&pulled.id).unwrap().join("etc").is_dir());
    // skopeo reads it as an OCI layout too.
    let output = Command::new("skopeo")
        .args(["inspect", "--raw"])
        .arg(format!("oci-archive:{}", archive.display()))
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(store.export("nothing:here", &out.path().join("x.tar")).is_err());
    assert!(!out.path().join("x.tar").exists());
}

/// An OCI layout whose one layer is `zeros` bytes of zeros (gzip: a few KiB).
fn zeros_layout(dir: &Path, zeros: usize) {
    let layer = podvisor_e2e::images::LayerBuilder::new()
        .file("zeros", &vec![0u8; zeros], 0o644)
        .unwrap()
        .finish()
        .unwrap();
    let mut layout = OciLayout::create(dir).unwrap();
    let manifest = layout.write_image(&TestImage::new(vec![layer])).unwrap();
    layout.tag("example.com/bomb:1", MEDIA_TYPE_MANIFEST, &manifest.digest, manifest.size).unwrap();
}

/// The pull's limits hold for imports: a layer decompressing past `max_unpacked_bytes` is
/// refused, and the import leaves no record, blob, tree or temporary file.
#[test]
fn an_archive_unpacking_past_the_limit_is_refused_and_leaves_nothing() {
    let source = tempfile::tempdir().unwrap();
    let layout = source.path().join("layout");
    zeros_layout(&layout, 8 << 20);
    let archive = source.path().join("bomb.tar");
    tar_dir(&layout, &archive);
    assert!(std::fs::metadata(&archive).unwrap().len() < 1 << 20, "a small archive");

    let dir = tempfile::tempdir().unwrap();
    let store = super::store_with(dir.path(), |c| c.max_unpacked_bytes = 4 << 20);
    let err = store.import(&archive).unwrap_err();
    assert!(
        matches!(err, Error::Unpack { source: crate::UnpackError::TooLarge { limit }, .. } if limit == 4 << 20),
        "{err}"
    );
    super::nothing_kept(&store);
    // Within the default limits the same archive imports.
    let other = tempfile::tempdir().unwrap();
    assert_eq!(super::store(other.path()).import(&archive).unwrap().len(), 1);
}

/// Config, image and manifest limits are checked on the archive's files before anything is
/// copied into the store.
#[test]
fn archive_files_past_the_size_limits_are_refused_before_copying() {
    let source = tempfile::tempdir().unwrap();
    let layout = source.path().join("layout");
    zeros_layout(&layout, 1 << 10);
    type Limit = fn(&mut crate::ImageStoreConfig);
    let limits: [(&str, Limit); 3] = [
        ("image", |c| c.max_image_bytes = 64),
        ("config", |c| c.max_config_bytes = 16),
        ("manifest", |c| c.max_manifest_bytes = 64),
    ];
    for (which, limit) in limits {
        let dir = tempfile::tempdir().unwrap();
        let store = super::store_with(dir.path(), limit);
        let err = store.import(&layout).unwrap_err();
        let expected = match which {
            "image" => matches!(err, Error::ImageTooLarge { limit: 64, .. }),
            "config" => matches!(err, Error::ConfigTooLarge { limit: 16, .. }),
            _ => matches!(err, Error::ManifestTooLarge { limit: 64, .. }),
        };
        assert!(expected, "{which}: {err}");
        super::nothing_kept(&store);
    }
}

/// An OCI archive as `skopeo copy … oci-archive:` writes it imports under the name skopeo
/// gives it, as the image pulled from the registry.
#[tokio::test]
async fn oci_archive_made_by_skopeo_imports_as_the_pulled_image() {
    if !registry_tests_can_run() {
        return;
    }
    let reg = TestRegistry::start().unwrap();
    let reference = reg.push_busybox("busybox:1").unwrap();
    let work = tempfile::tempdir().unwrap();
    let archive = work.path().join("busybox-oci.tar");
    let output = Command::new("skopeo")
        .args(["copy", "--insecure-policy", "--quiet", "--src-tls-verify=false"])
        .arg(format!("docker://{reference}"))
        .arg(format!("oci-archive:{}:example.com/tools/busybox:1", archive.display()))
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));

    let pulled_dir = tempfile::tempdir().unwrap();
    let pulled = store(pulled_dir.path()).pull(&reference, None).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let imported = store.import(&archive).unwrap();
    assert_eq!(imported.len(), 1);
    assert_eq!(imported[0].id, pulled.id);
    assert_eq!(imported[0].repo_tags, vec!["example.com/tools/busybox:1".to_owned()]);
    assert!(store.rootfs_dir(&pulled.id).unwrap().join("bin/busybox").is_file());
    assert!(tmp_is_empty(&store));
}
