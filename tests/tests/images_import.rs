//! End-to-end: `podvisor images import` into a running daemon, without any registry, then a
//! pod from the imported image; `podvisor images export` of it.

use std::process::Command;

use k8s_cri::v1 as cri;
use podvisor_e2e::daemon::{container_config, e2e_can_run, podvisor_bin, TestDaemon};
use podvisor_e2e::registry::TestRegistry;

/// Runs `podvisor images ARGS`: its stdout (result lines) and stderr (progress lines).
fn images_cli(daemon: &TestDaemon, args: &[&std::ffi::OsStr]) -> (String, String) {
    let output = Command::new(podvisor_bin())
        .arg("images")
        .arg("--root")
        .arg(daemon.root())
        .arg("--state")
        .arg(daemon.state())
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "podvisor images {args:?}: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        daemon.log_tail()
    );
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imported_docker_archive_runs_a_pod_with_no_registry() {
    if !e2e_can_run() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let archive = work.path().join("busybox-docker.tar");
    {
        let registry = TestRegistry::start().unwrap();
        let reference = registry.push_busybox("busybox:1").unwrap();
        let output = Command::new("skopeo")
            .args(["copy", "--insecure-policy", "--quiet", "--src-tls-verify=false"])
            .arg(format!("docker://{reference}"))
            .arg(format!("docker-archive:{}:registry.k8s.io/e2e/busybox:1", archive.display()))
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    } // The registry is gone before the daemon ever hears of the image.

    let daemon = TestDaemon::start("").await.unwrap();
    let (printed, progress) = images_cli(&daemon, &["import".as_ref(), archive.as_os_str()]);
    // Not a terminal: plain progress lines from the daemon, no escape codes.
    let file = archive.display().to_string();
    for step in ["extract", "copy", "unpack"] {
        assert!(progress.contains(&format!("{file}: {step}")), "{step}: {progress}");
    }
    assert!(progress.contains("(100%)") && !progress.contains('\x1b'), "{progress}");
    assert!(printed.contains("registry.k8s.io/e2e/busybox:1"), "{printed}");
    let mut images = daemon.images().await.unwrap();
    let status = images
        .image_status(cri::ImageStatusRequest {
            image: Some(cri::ImageSpec {
                image: "registry.k8s.io/e2e/busybox:1".into(),
                ..Default::default()
            }),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner();
    let image = status.image.expect("the daemon knows the imported image");
    assert!(printed.starts_with(&image.id), "{printed}");

    let (pod, pod_config) = daemon.run_pod("imported", &daemon.dir.path().join("logs")).await;
    let config =
        container_config("c", "registry.k8s.io/e2e/busybox:1", &["/bin/sh", "-c", "sleep 3600"]);
    let id = daemon.create_and_start(&pod, &pod_config, config).await;
    let out = daemon.exec(&id, &["/bin/sh", "-c", "echo imported"], 20).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "imported\n");

    let exported = work.path().join("exported.tar");
    let (printed, progress) = images_cli(
        &daemon,
        &["export".as_ref(), "registry.k8s.io/e2e/busybox:1".as_ref(), exported.as_os_str()],
    );
    assert!(printed.starts_with(&image.id), "{printed}");
    assert!(exported.is_file());
    assert!(progress.contains("registry.k8s.io/e2e/busybox:1: write"), "{progress}");
    daemon.remove_pod(&pod).await;
    daemon.assert_nothing_left();
}
