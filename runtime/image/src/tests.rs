//! Store tests against a real `docker-registry` on 127.0.0.1 with images built from
//! busybox-static (see `podvisor_e2e::registry`). Skipped with a message when the tools are
//! missing, unless PODVISOR_REQUIRE_E2E=1.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use podvisor_e2e::registry::{registry_tests_can_run, TestRegistry};

use super::*;

mod import;
mod progress;

fn store(dir: &Path) -> ImageStore {
    ImageStore::open(dir, ImageStoreConfig::default()).expect("open store")
}

fn blob_count(store: &ImageStore) -> usize {
    std::fs::read_dir(store.dir().join("blobs/sha256")).unwrap().count()
}

fn tmp_is_empty(store: &ImageStore) -> bool {
    std::fs::read_dir(store.dir().join("tmp")).unwrap().count() == 0
}

macro_rules! require_registry {
    () => {
        if !registry_tests_can_run() {
            return;
        }
    };
}

#[tokio::test]
async fn pull_by_tag_and_digest_then_resolve_and_remove() {
    require_registry!();
    let reg = TestRegistry::start().unwrap();
    let reference = reg.push_busybox("busybox:1").unwrap();
    let manifest_digest = reg.manifest_digest(&reference).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());

    let record = store.pull(&reference, None).await.unwrap();
    assert_eq!(record.repo_tags, vec![reference.clone()]);
    let repo_digest = format!("{}/busybox@{manifest_digest}", reg.host());
    assert_eq!(record.repo_digests, vec![repo_digest.clone()]);
    assert!(record.size > 500_000, "size {}", record.size);
    assert_eq!(record.user, None);

    let rootfs = store.rootfs_dir(&record.id).unwrap();
    assert!(rootfs.join("bin/busybox").is_file());
    assert_eq!(std::fs::read_link(rootfs.join("bin/sh")).unwrap(), Path::new("busybox"));
    let tmp_mode = std::fs::metadata(rootfs.join("tmp")).unwrap().mode();
    assert_eq!(tmp_mode & 0o7777, 0o1777);
    let config = store.image_config(&record.id).unwrap();
    assert_eq!(config.cmd, vec!["sh".to_owned()]);
    assert_eq!(config.architecture, "amd64");
    assert_eq!(config.labels.get("org.podvisor.test").map(String::as_str), Some("true"));

    // By digest: same image, nothing downloaded again.
    let downloads = store.blobs_downloaded();
    let by_digest = store.pull(&repo_digest, None).await.unwrap();
    assert_eq!(by_digest.id, record.id);
    assert_eq!(store.blobs_downloaded(), downloads);
    assert_eq!(store.list().len(), 1);

    let hex = record.id.trim_start_matches("sha256:");
    for name in [
        reference.as_str(),
        repo_digest.as_str(),
        record.id.as_str(),
        hex,
        &hex[..12],
        manifest_digest.as_str(),
    ] {
        assert_eq!(store.resolve(name).map(|r| r.id), Some(record.id.clone()), "{name}");
    }
    assert!(store.resolve("busybox").is_none());
    assert!(store.resolve(&format!("{}/busybox:2", reg.host())).is_none());

    // Records survive a restart.
    drop(store);
    let store = super::tests::store(dir.path());
    assert_eq!(store.resolve(&reference).map(|r| r.id), Some(record.id.clone()));

    let removed = store.remove(&reference).unwrap().unwrap();
    assert_eq!(removed.id, record.id);
    assert!(store.resolve(&record.id).is_none());
    assert!(store.remove(&reference).unwrap().is_none(), "not found is Ok");
    assert_eq!(blob_count(&store), 0, "GC leaves no orphan blobs");
    assert!(!rootfs.exists());
}

#[tokio::test]
async fn remove_by_id_and_by_digest_keeps_shared_blobs_of_other_images() {
    require_registry!();
    let reg = TestRegistry::start().unwrap();
    let busybox = reg.push_busybox("busybox:1").unwrap();
    let multi = reg.push_multilayer("multi:1").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let a = store.pull(&busybox, None).await.unwrap();
    let b = store.pull(&multi, None).await.unwrap();
    // The multi-layer image's lowest layer differs from busybox's: 1 + 3 layers, 2 configs,
    // 2 manifests.
    assert_eq!(blob_count(&store), 8);

    store.remove(&a.id).unwrap().unwrap();
    assert_eq!(blob_count(&store), 5);
    let digest = b.repo_digests[0].clone();
    store.remove(&digest).unwrap().unwrap();
    assert_eq!(blob_count(&store), 0);
    assert!(store.list().is_empty());
    assert_eq!(store.gc().unwrap(), GcReport::default());
}

#[tokio::test]
async fn multi_arch_index_resolves_to_linux_amd64() {
    require_registry!();
    let reg = TestRegistry::start().unwrap();
    let reference = reg.push_multiarch("multiarch:1").unwrap();
    let index_digest = reg.manifest_digest(&reference).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let record = store.pull(&reference, None).await.unwrap();
    assert_eq!(record.index_digests, vec![index_digest.clone()]);
    assert_ne!(record.manifest_digest, index_digest);
    assert_eq!(record.repo_digests, vec![format!("{}/multiarch@{index_digest}", reg.host())]);
    let rootfs = store.rootfs_dir(&record.id).unwrap();
    assert_eq!(std::fs::read(rootfs.join("arch")).unwrap(), b"amd64\n");
    assert_eq!(store.image_config(&record.id).unwrap().architecture, "amd64");
}

#[tokio::test]
async fn index_without_amd64_names_the_platforms_found() {
    require_registry!();
    let reg = TestRegistry::start().unwrap();
    let reference = reg.push_arm64_only("arm:1").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let err = store.pull(&reference, None).await.unwrap_err();
    assert!(matches!(err, Error::NoMatchingPlatform { .. }), "{err}");
    assert!(err.to_string().contains("linux/arm64"), "{err}");
    assert!(store.list().is_empty());
}

#[tokio::test]
async fn multilayer_whiteouts_opaque_dirs_links_and_owners_are_applied() {
    require_registry!();
    let reg = TestRegistry::start().unwrap();
    let reference = reg.push_multilayer("multi:1").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let record = store.pull(&reference, None).await.unwrap();
    assert_eq!(record.layers.len(), 3);
    let rootfs = store.rootfs_dir(&record.id).unwrap();
    assert!(!rootfs.join("etc/removed.txt").exists());
    assert!(!rootfs.join("etc/.wh.removed.txt").exists());
    assert!(!rootfs.join("data/old/a.txt").exists());
    assert!(!rootfs.join("data/old/b.txt").exists());
    assert!(!rootfs.join("data/old/.wh..wh..opq").exists());
    assert_eq!(std::fs::read(rootfs.join("data/old/new.txt")).unwrap(), b"new\n");
    assert_eq!(std::fs::read(rootfs.join("data/keep.txt")).unwrap(), b"keep\n");
    let keep = std::fs::metadata(rootfs.join("data/keep.txt")).unwrap();
    let hardlink = std::fs::metadata(rootfs.join("data/hardlink")).unwrap();
    assert_eq!(keep.ino(), hardlink.ino());
    assert_eq!(std::fs::read_link(rootfs.join("data/link")).unwrap(), Path::new("keep.txt"));
    let owned = std::fs::symlink_metadata(rootfs.join("data/owned.txt")).unwrap();
    assert_eq!(owned.mode() & 0o7777, 0o600);
    assert_eq!(owned.mtime(), 1_700_000_000);
    if nix::unistd::geteuid().is_root() {
        assert_eq!((owned.uid(), owned.gid()), (1234, 1234));
    }
}

#[tokio::test]
async fn non_root_user_is_recorded_as_uid_or_name() {
    require_registry!();
    let reg = TestRegistry::start().unwrap();
    let by_uid = reg.push_with_user("user:uid", "1234:1234").unwrap();
    let by_name = reg.push_with_user("user:name", "app").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let record = store.pull(&by_uid, None).await.unwrap();
    assert_eq!(record.user.as_deref(), Some("1234:1234"));
    assert_eq!(record.uid(), Some(1234));
    assert_eq!(record.username(), None);
    let record = store.pull(&by_name, None).await.unwrap();
    assert_eq!(record.uid(), None);
    assert_eq!(record.username(), Some("app"));
    assert_eq!(store.image_config(&record.id).unwrap().user.as_deref(), Some("app"));
    let rootfs = store.rootfs_dir(&record.id).unwrap();
    let passwd = std::fs::read_to_string(rootfs.join("etc/passwd")).unwrap();
    assert!(passwd.contains("app:x:1000:1000"));
}

#[tokio::test]
async fn docker_schema2_media_types_are_pulled() {
    require_registry!();
    let reg = TestRegistry::start().unwrap();
    let reference = reg.push_busybox_docker("docker:1").unwrap();
    let raw: serde_json::Value =
        serde_json::from_slice(&reg.raw_manifest(&reference).unwrap()).unwrap();
    assert_eq!(raw["mediaType"], "application/vnd.docker.distribution.manifest.v2+json");
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let record = store.pull(&reference, None).await.unwrap();
    assert!(store.rootfs_dir(&record.id).unwrap().join("bin/busybox").is_file());
    assert_eq!(store.image_config(&record.id).unwrap().cmd, vec!["sh".to_owned()]);
}

#[tokio::test]
async fn zstd_layers_are_unpacked() {
    require_registry!();
    let reg = TestRegistry::start().unwrap();
    let reference = reg.push_busybox_zstd("zstd:1").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let record = store.pull(&reference, None).await.unwrap();
    let rootfs = store.rootfs_dir(&record.id).unwrap();
    assert!(rootfs.join("bin/busybox").is_file());
}

#[tokio::test]
async fn basic_auth_with_right_and_wrong_credentials() {
    require_registry!();
    let reg = TestRegistry::start_with_basic_auth("alice", "s3cret").unwrap();
    let reference = reg.push_busybox("private:1").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());

    let err = store.pull(&reference, None).await.unwrap_err();
    assert!(matches!(err, Error::Unauthorized { .. }), "{err}");
    assert!(err.to_string().contains(&reg.host()), "{err}");

    let wrong = RegistryCredentials::Basic { username: "alice".into(), password: "wrong".into() };
    let err = store.pull(&reference, Some(&wrong)).await.unwrap_err();
    assert!(matches!(err, Error::Unauthorized { .. }), "{err}");
    assert!(store.list().is_empty());

    let right = RegistryCredentials::from_fields("alice", "s3cret", "", "", "").unwrap().unwrap();
    let record = store.pull(&reference, Some(&right)).await.unwrap();
    assert!(store.rootfs_dir(&record.id).unwrap().join("bin/busybox").exists());

    // The same credentials from a docker config.json.
    let config_path = dir.path().join("config.json");
    std::fs::write(
        &config_path,
        format!(r#"{{"auths":{{"{}":{{"auth":"YWxpY2U6czNjcmV0"}}}}}}"#, reg.host()),
    )
    .unwrap();
    let other = tempfile::tempdir().unwrap();
    let with_config = ImageStore::open(
        other.path(),
        ImageStoreConfig { docker_config: Some(config_path), ..Default::default() },
    )
    .unwrap();
    with_config.pull(&reference, None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pulls_of_one_image_download_each_blob_once() {
    require_registry!();
    let reg = TestRegistry::start().unwrap();
    let reference = reg.push_multilayer("multi:1").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(store(dir.path()));
    let pulls: Vec<_> = (0..4)
        .map(|_| {
            let store = store.clone();
            let reference = reference.clone();
            tokio::spawn(async move { store.pull(&reference, None).await })
        })
        .collect();
    let mut ids = Vec::new();
    for pull in pulls {
        ids.push(pull.await.unwrap().unwrap().id);
    }
    ids.dedup();
    assert_eq!(ids.len(), 1);
    // Three layers and the config, each once: their bytes are the image's size.
    assert_eq!(store.blobs_downloaded(), 4);
    assert_eq!(store.list().len(), 1);
    assert_eq!(store.bytes_downloaded(), store.list()[0].size);
    assert!(tmp_is_empty(&store));
}

#[tokio::test]
async fn tampered_blob_is_rejected_and_nothing_is_kept() {
    require_registry!();
    let reg = TestRegistry::start().unwrap();
    let reference = reg.push_busybox("busybox:1").unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&reg.raw_manifest(&reference).unwrap()).unwrap();
    let layer = manifest["layers"][0]["digest"].as_str().unwrap().to_owned();
    let data_path = reg.blob_data_path(&layer);
    let mut data = std::fs::read(&data_path).unwrap();
    let middle = data.len() / 2;
    data[middle] ^= 0xff;
    std::fs::write(&data_path, data).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let err = store.pull(&reference, None).await.unwrap_err();
    match &err {
        Error::DigestMismatch { expected, actual, .. } => {
            assert_eq!(expected, &layer);
            assert_ne!(actual, &layer);
        }
        other => panic!("expected a digest mismatch, got {other}"),
    }
    assert!(store.list().is_empty());
    assert!(!store.blob_path(&layer).unwrap().exists());
    assert!(tmp_is_empty(&store));
    assert_eq!(std::fs::read_dir(store.dir().join("rootfs")).unwrap().count(), 0);
}

#[tokio::test]
async fn hostile_layer_is_refused_without_writing_outside() {
    require_registry!();
    let reg = TestRegistry::start().unwrap();
    let hostile = podvisor_e2e::images::LayerBuilder::new()
        .file("ok.txt", b"ok", 0o644)
        .unwrap()
        .raw_entry(b"../../../../escaped", tar::EntryType::Regular, None, b"x")
        .unwrap()
        .finish()
        .unwrap();
    let image = podvisor_e2e::images::TestImage::new(vec![hostile]);
    let reference = reg.push_image("hostile:1", &image).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let err = store.pull(&reference, None).await.unwrap_err();
    assert!(matches!(err, Error::Unpack { source: UnpackError::UnsafePath { .. }, .. }), "{err}");
    assert!(store.list().is_empty());
    assert!(tmp_is_empty(&store));
    assert!(!dir.path().join("escaped").exists());
    assert!(!Path::new("/escaped").exists());
}

#[tokio::test]
async fn registry_errors_name_their_cause() {
    require_registry!();
    let reg = TestRegistry::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());

    let err = store.pull(&format!("{}/nothing:here", reg.host()), None).await.unwrap_err();
    assert!(matches!(err, Error::ManifestUnknown { .. }), "{err}");

    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let err = store.pull(&format!("127.0.0.1:{port}/busybox:1"), None).await.unwrap_err();
    assert!(matches!(err, Error::RegistryUnreachable { .. }), "{err}");
    assert!(err.to_string().contains(&format!("127.0.0.1:{port}")), "{err}");

    let err = store.pull("Invalid//Reference", None).await.unwrap_err();
    assert!(matches!(err, Error::InvalidReference { .. }), "{err}");
}

#[tokio::test]
async fn fs_info_counts_bytes_and_inodes() {
    require_registry!();
    let reg = TestRegistry::start().unwrap();
    let reference = reg.push_busybox("busybox:1").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let empty = store.fs_info().unwrap();
    store.pull(&reference, None).await.unwrap();
    let full = store.fs_info().unwrap();
    assert_eq!(full.mountpoint, dir.path().join("images"));
    assert!(full.used_bytes > empty.used_bytes + 2_000_000, "{full:?}");
    // busybox applet symlinks alone are > 250 inodes.
    assert!(full.inodes_used > empty.inodes_used + 250, "{full:?}");
    assert!(full.timestamp_ns > 0);
}

#[test]
fn digests_that_name_files_are_validated() {
    assert!(digest_hex(&format!("sha256:{}", "a".repeat(64))).is_ok());
    assert!(digest_hex("sha256:../../etc/passwd").is_err());
    assert!(digest_hex(&format!("sha512:{}", "a".repeat(64))).is_err());
    assert!(digest_hex(&format!("sha256:{}", "A".repeat(64))).is_err());
}

#[test]
fn user_field_parses_to_uid_or_name() {
    let mut record = ImageRecord {
        id: String::new(),
        repo_tags: vec![],
        repo_digests: vec![],
        size: 0,
        user: Some("1234".into()),
        manifest_digest: String::new(),
        index_digests: vec![],
        layers: vec![],
        diff_ids: vec![],
        pulled_at: 0,
    };
    assert_eq!(record.uid(), Some(1234));
    record.user = Some("www:staff".into());
    assert_eq!((record.uid(), record.username()), (None, Some("www")));
    record.user = None;
    assert_eq!((record.uid(), record.username()), (None, None));
}

/// Mounts a tmpfs of `size` on `dir` for the full-disk test; None (test skipped) if not
/// permitted here.
fn mount_small_tmpfs(dir: &Path, size: &str) -> Option<()> {
    let mounted = nix::mount::mount(
        Some("tmpfs"),
        dir,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some(format!("size={size}").as_str()),
    );
    match mounted {
        Ok(()) => Some(()),
        Err(e) => {
            if std::env::var("PODVISOR_REQUIRE_E2E").as_deref() == Ok("1") {
                panic!("PODVISOR_REQUIRE_E2E=1 but cannot mount a tmpfs: {e}");
            }
            eprintln!("skipping full-disk test: cannot mount a tmpfs ({e})");
            None
        }
    }
}

#[tokio::test]
async fn full_disk_during_pull_leaves_the_store_consistent() {
    require_registry!();
    let reg = TestRegistry::start().unwrap();
    let reference = reg.push_busybox("busybox:1").unwrap();
    // 512 KiB: the layer download fails; 1700 KiB: the layer fits, the unpack does not.
    for size in ["512k", "1700k"] {
        let dir = tempfile::tempdir().unwrap();
        if mount_small_tmpfs(dir.path(), size).is_none() {
            return;
        }
        let store = store(dir.path());
        let err = store.pull(&reference, None).await.unwrap_err();
        assert!(
            err.to_string().contains("No space left") || format!("{err:?}").contains("StorageFull"),
            "{size}: {err}"
        );
        assert!(store.list().is_empty());
        assert!(tmp_is_empty(&store), "{size}");
        assert_eq!(std::fs::read_dir(store.dir().join("rootfs")).unwrap().count(), 0);
        drop(store);
        let reopened = super::tests::store(dir.path());
        reopened.gc().unwrap();
        assert_eq!(blob_count(&reopened), 0);
        drop(reopened);
        nix::mount::umount(dir.path()).unwrap();
    }
}

#[test]
fn short_names_resolve_like_crictl() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let id = format!("sha256:{}", "ab".repeat(32));
    let record = ImageRecord {
        id: id.clone(),
        repo_tags: vec!["docker.io/library/busybox:latest".into()],
        repo_digests: vec![format!("docker.io/library/busybox@sha256:{}", "cd".repeat(32))],
        size: 1,
        user: None,
        manifest_digest: format!("sha256:{}", "cd".repeat(32)),
        index_digests: vec![],
        layers: vec![],
        diff_ids: vec![],
        pulled_at: 0,
    };
    store.commit_record(record).unwrap();
    for name in [
        "busybox",
        "busybox:latest",
        "library/busybox",
        "docker.io/library/busybox:latest",
        "index.docker.io/library/busybox",
        &format!("busybox@sha256:{}", "cd".repeat(32)),
        "abab",
        &id,
    ] {
        assert_eq!(store.resolve(name).map(|r| r.id), Some(id.clone()), "{name}");
    }
    assert!(store.resolve("busybox:1").is_none());
    assert!(store.resolve("ab").is_none(), "prefixes need 3 digits");
    // Moving the tag to another image leaves the first one untagged.
    let other = format!("sha256:{}", "ef".repeat(32));
    let mut second = store.resolve("busybox").unwrap();
    second.id = other.clone();
    second.repo_digests.clear();
    store.commit_record(second).unwrap();
    assert_eq!(store.resolve("busybox").map(|r| r.id), Some(other));
    assert!(store.resolve(&id).unwrap().repo_tags.is_empty());
}

/// Token (bearer) auth: the registry answers 401 with `WWW-Authenticate: Bearer realm=…`,
/// the pull fetches a JWT from the realm with the basic credentials (or anonymously) and
/// retries with `Authorization: Bearer <jwt>`.
#[tokio::test]
async fn bearer_token_auth_with_right_and_wrong_credentials() {
    if !podvisor_e2e::registry::token_auth_tests_can_run() {
        return;
    }
    let reg = TestRegistry::start_with_token_auth("alice", "s3cret").unwrap();
    let reference = reg.push_busybox("private:1").unwrap();
    let tokens = reg.token_server().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());

    // Anonymous: the token server hands out a token granting nothing, the registry refuses it.
    let issued = tokens.tokens_issued();
    let err = store.pull(&reference, None).await.unwrap_err();
    assert!(matches!(err, Error::Unauthorized { .. }), "{err}");
    assert!(err.to_string().contains(&reg.host()), "{err}");
    assert!(tokens.tokens_issued() > issued, "no anonymous token was asked for");

    // Wrong credentials: the token server answers 401.
    let wrong = RegistryCredentials::Basic { username: "alice".into(), password: "wrong".into() };
    let err = store.pull(&reference, Some(&wrong)).await.unwrap_err();
    assert!(matches!(err, Error::Unauthorized { .. }), "{err}");
    assert!(store.list().is_empty());

    // The right ones are exchanged for a token that can pull.
    let issued = tokens.tokens_issued();
    let right = RegistryCredentials::from_fields("alice", "s3cret", "", "", "").unwrap().unwrap();
    let record = store.pull(&reference, Some(&right)).await.unwrap();
    assert!(store.rootfs_dir(&record.id).unwrap().join("bin/busybox").exists());
    assert!(tokens.tokens_issued() > issued, "the pull did not go through the token server");

    // CRI's registry_token: a token fetched from the token server beforehand, sent as is.
    let token = reg.bearer_token("repository:private:pull", false).unwrap();
    let creds = RegistryCredentials::from_fields("", "", "", "", &token).unwrap().unwrap();
    assert!(matches!(creds, RegistryCredentials::RegistryToken(_)));
    let other = tempfile::tempdir().unwrap();
    let with_token = ImageStore::open(other.path(), ImageStoreConfig::default()).unwrap();
    let issued = tokens.tokens_issued();
    let record = with_token.pull(&reference, Some(&creds)).await.unwrap();
    assert!(with_token.rootfs_dir(&record.id).unwrap().join("bin/busybox").exists());
    assert_eq!(tokens.tokens_issued(), issued, "a registry token must be sent as is");

    // A registry token for another repository, or an anonymous one, does not let it pull.
    for token in [
        reg.bearer_token("repository:other:pull", false).unwrap(),
        reg.bearer_token("repository:private:pull", true).unwrap(),
    ] {
        let third = tempfile::tempdir().unwrap();
        let creds = RegistryCredentials::RegistryToken(token);
        let fresh = ImageStore::open(third.path(), ImageStoreConfig::default()).unwrap();
        let err = fresh.pull(&reference, Some(&creds)).await.unwrap_err();
        assert!(matches!(err, Error::Unauthorized { .. }), "{err}");
    }
}

#[tokio::test]
async fn fs_info_falls_by_what_remove_frees_and_list_sizes_match() {
    require_registry!();
    let reg = TestRegistry::start().unwrap();
    let busybox = reg.push_busybox("busybox:1").unwrap();
    let multi = reg.push_multilayer("multi:1").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let a = store.pull(&busybox, None).await.unwrap();
    let b = store.pull(&multi, None).await.unwrap();
    for (record, reference) in [(&a, &busybox), (&b, &multi)] {
        // The two share no blob, so each frees exactly its own usage.
        let usage = store.disk_usage(record).unwrap();
        assert!(usage.bytes > record.size, "{usage:?} vs compressed {}", record.size);
        let before = store.fs_info().unwrap();
        store.remove(reference).unwrap().unwrap();
        let after = store.fs_info().unwrap();
        assert_eq!(before.used_bytes - after.used_bytes, usage.bytes, "{reference}");
        assert_eq!(before.inodes_used - after.inodes_used, usage.inodes, "{reference}");
    }
    assert!(store.list().is_empty());
}

#[tokio::test]
async fn pinned_images_are_reported_and_never_removed() {
    require_registry!();
    let reg = TestRegistry::start().unwrap();
    let busybox = reg.push_busybox("busybox:1").unwrap();
    let multi = reg.push_multilayer("multi:1").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = ImageStoreConfig { pinned: vec![busybox.clone()], ..Default::default() };
    let store = ImageStore::open(dir.path(), config).unwrap();
    let a = store.pull(&busybox, None).await.unwrap();
    let b = store.pull(&multi, None).await.unwrap();
    assert_eq!(store.pinned_by(&a), Some(busybox.as_str()));
    assert_eq!(store.pinned_by(&b), None);
    // By id, tag or digest: refused all the same, and nothing is deleted.
    let blobs = blob_count(&store);
    for name in [a.id.as_str(), busybox.as_str(), a.repo_digests[0].as_str()] {
        let err = store.remove(name).unwrap_err();
        assert!(matches!(err, Error::ImagePinned { .. }), "{err}");
        assert!(err.to_string().contains(&busybox), "{err}");
    }
    assert_eq!(blob_count(&store), blobs);
    assert!(store.rootfs_dir(&a.id).unwrap().is_dir());
    store.remove(&b.id).unwrap().unwrap();
    assert_eq!(store.list().len(), 1);
}

fn store_with(dir: &Path, limits: impl FnOnce(&mut ImageStoreConfig)) -> ImageStore {
    let mut config = ImageStoreConfig::default();
    limits(&mut config);
    ImageStore::open(dir, config).expect("open store")
}

/// Nothing of a refused pull is kept: no record, no blob, no tree, nothing in tmp/.
fn nothing_kept(store: &ImageStore) {
    assert!(store.list().is_empty());
    assert_eq!(blob_count(store), 0);
    assert!(tmp_is_empty(store));
    assert_eq!(std::fs::read_dir(store.dir().join("rootfs")).unwrap().count(), 0);
}

/// A registry that answers every manifest request with an endless body, counting what it
/// managed to send before the client hung up.
struct EndlessManifestRegistry {
    port: u16,
    sent: Arc<std::sync::atomic::AtomicU64>,
}

impl EndlessManifestRegistry {
    /// Bytes offered per response: far more than any limit, and than a test wants in memory.
    const OFFERED: u64 = 256 << 20;

    fn start() -> Self {
        use std::io::{BufRead, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = sent.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
                let mut request_line = String::new();
                let _ = reader.read_line(&mut request_line);
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                    line.clear();
                }
                if !request_line.contains("/manifests/") {
                    let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
                    continue;
                }
                // Chunked: no Content-Length for the client to refuse up front.
                let _ = stream.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\n\
                      Transfer-Encoding: chunked\r\n\r\n",
                );
                let chunk = vec![b' '; 64 * 1024];
                let framed =
                    [format!("{:x}\r\n", chunk.len()).into_bytes(), chunk, b"\r\n".to_vec()]
                        .concat();
                let mut offered = 0;
                while offered < Self::OFFERED && stream.write_all(&framed).is_ok() {
                    offered += 64 * 1024;
                    counter.fetch_add(64 * 1024, std::sync::atomic::Ordering::Relaxed);
                }
                let _ = stream.write_all(b"0\r\n\r\n");
            }
        });
        Self { port, sent }
    }
}

/// A registry that sends a manifest without end is cut off at the limit: the pull fails
/// naming it, having read about the limit, not the whole body into memory.
#[tokio::test]
async fn an_endless_manifest_is_cut_off_at_the_limit() {
    let registry = EndlessManifestRegistry::start();
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let err = store.pull(&format!("127.0.0.1:{}/endless:1", registry.port), None).await;
    let err = err.unwrap_err();
    assert!(matches!(err, Error::ManifestTooLarge { limit, .. } if limit == 4 << 20), "{err}");
    // Wait for the server to notice the client is gone.
    let mut sent = 0;
    for _ in 0..100 {
        std::thread::sleep(std::time::Duration::from_millis(20));
        let now = registry.sent.load(std::sync::atomic::Ordering::Relaxed);
        if now == sent {
            break;
        }
        sent = now;
    }
    // The limit plus what the sockets' buffers took.
    assert!(sent < 32 << 20, "the client read {sent} bytes of an endless manifest");
    nothing_kept(&store);
}

/// Manifests, configs and images past their limits are refused before their blobs are
/// downloaded.
#[tokio::test]
async fn manifest_config_and_image_limits_are_checked_before_downloading() {
    require_registry!();
    let reg = TestRegistry::start().unwrap();
    let reference = reg.push_busybox("busybox:1").unwrap();
    let manifest_len = reg.raw_manifest(&reference).unwrap().len() as u64;
    let index = reg.push_multiarch("multiarch:1").unwrap();
    type Limit = fn(&mut ImageStoreConfig, u64);
    let cases: [(&str, &str, Limit); 4] = [
        ("manifest", &reference, |c, manifest| c.max_manifest_bytes = manifest - 1),
        ("index", &index, |c, _| c.max_manifest_bytes = 200),
        ("config", &reference, |c, _| c.max_config_bytes = 10),
        ("image", &reference, |c, _| c.max_image_bytes = 100_000),
    ];
    for (what, reference, limit) in cases {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with(dir.path(), |c| limit(c, manifest_len));
        let err = store.pull(reference, None).await.unwrap_err();
        let refused = match what {
            "manifest" | "index" => matches!(err, Error::ManifestTooLarge { .. }),
            "config" => matches!(err, Error::ConfigTooLarge { size, limit: 10, .. } if size > 10),
            _ => matches!(err, Error::ImageTooLarge { size, .. } if size > 500_000),
        };
        assert!(refused, "{what}: {err}");
        assert_eq!(store.blobs_downloaded(), 0, "{what}: a blob was downloaded");
        nothing_kept(&store);
    }
}

/// Every descriptor carries a size and every blob is that size: a missing or negative one is
/// refused, and a zero one no longer lets a registry send any amount (it used to disable the
/// size check).
#[tokio::test]
async fn declared_sizes_are_required_and_enforced() {
    require_registry!();
    let reg = TestRegistry::start().unwrap();
    let reference = reg.push_busybox("sizes:1").unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&reg.raw_manifest(&reference).unwrap()).unwrap();
    let media_type = podvisor_e2e::images::MEDIA_TYPE_MANIFEST;
    let variant = |tag: &str, edit: &dyn Fn(&mut serde_json::Value)| {
        let mut m = manifest.clone();
        edit(&mut m);
        reg.put_manifest("sizes", tag, media_type, &serde_json::to_vec(&m).unwrap()).unwrap()
    };
    let negative = variant("negative", &|m| m["layers"][0]["size"] = (-1).into());
    let zero = variant("zero", &|m| m["layers"][0]["size"] = 0.into());
    let missing = variant("missing", &|m| {
        m["config"].as_object_mut().unwrap().remove("size");
    });
    for (name, reference) in [("negative", &negative), ("zero", &zero), ("missing", &missing)] {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let err = store.pull(reference, None).await.unwrap_err();
        let refused = match name {
            "negative" => matches!(err, Error::InvalidSize { size: -1, .. }),
            "zero" => matches!(err, Error::SizeMismatch { expected: 0, .. }),
            _ => matches!(err, Error::ParseManifest { .. }),
        };
        assert!(refused, "{name}: {err}");
        assert!(store.list().is_empty() && tmp_is_empty(&store), "{name}");
    }
}

/// An image whose layers unpack past the limit is refused and its partial tree discarded.
#[tokio::test]
async fn an_image_unpacking_past_the_limit_is_discarded() {
    require_registry!();
    let reg = TestRegistry::start().unwrap();
    let zeros = vec![0u8; 8 << 20];
    let bomb = podvisor_e2e::images::LayerBuilder::new()
        .file("zeros", &zeros, 0o644)
        .unwrap()
        .finish()
        .unwrap();
    let image = podvisor_e2e::images::TestImage::new(vec![bomb]);
    let reference = reg.push_image("bomb:1", &image).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = store_with(dir.path(), |c| c.max_unpacked_bytes = 4 << 20);
    let err = store.pull(&reference, None).await.unwrap_err();
    assert!(
        matches!(err, Error::Unpack { source: UnpackError::TooLarge { limit }, .. } if limit == 4 << 20),
        "{err}"
    );
    assert!(store.list().is_empty());
    assert!(tmp_is_empty(&store));
    assert_eq!(std::fs::read_dir(store.dir().join("rootfs")).unwrap().count(), 0);
    // Within the default limits the same image is fine.
    let other = tempfile::tempdir().unwrap();
    let record = super::tests::store(other.path()).pull(&reference, None).await.unwrap();
    assert_eq!(record.layers.len(), 1);
}
