//! End-to-end checks of the restructured sandbox core, on real guests (QEMU/TCG here): a pod
//! that names no hostname (as critest's do), writable and read-only volumes through the
//! volume share, 1,000 ExecSync calls that leave the agent's process table and RSS flat, and a
//! daemon started on records of the previous schema.

use std::path::Path;
use std::time::Instant;

use k8s_cri::v1 as cri;
use podvisor_e2e::daemon::{container_config, e2e_can_run, pod_config, TestDaemon};
use podvisor_e2e::registry::TestRegistry;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_and_a_thousand_execs_in_a_pod_without_hostname() {
    if !e2e_can_run() {
        return;
    }
    let registry = TestRegistry::start().unwrap();
    let image = registry.push_busybox("busybox:core").unwrap();
    let daemon = TestDaemon::start("").await.unwrap();
    daemon.pull(&image).await;
    let log_dir = daemon.dir.path().join("pod-logs");

    // critest's pods: a long name and no hostname. The node's hostname stands in.
    let long_name = format!("sandbox-core-{}", "x".repeat(70));
    let mut pod_cfg = pod_config(&long_name, &log_dir);
    pod_cfg.hostname.clear();
    let mut rt = daemon.runtime().await.unwrap();
    let pod = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(pod_cfg.clone()),
            runtime_handler: String::new(),
        })
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", daemon.log_tail()))
        .into_inner()
        .pod_sandbox_id;

    let rw = daemon.dir.path().join("rw-volume");
    let ro = daemon.dir.path().join("ro-volume");
    for dir in [&rw, &ro] {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(rw.join("from-host"), "host wrote this\n").unwrap();
    std::fs::write(ro.join("config"), "v1\n").unwrap();
    let mut config = container_config("app", &image, &["sleep", "3600"]);
    let volume = |host: &Path, path: &str, readonly: bool| cri::Mount {
        container_path: path.into(),
        host_path: host.display().to_string(),
        readonly,
        ..Default::default()
    };
    config.mounts = vec![volume(&rw, "/data", false), volume(&ro, "/config", true)];
    let cid = daemon.create_and_start(&pod, &pod_cfg, config).await;

    let node = nix::unistd::gethostname().unwrap().to_string_lossy().into_owned();
    let out = daemon.exec(&cid, &["hostname"], 30).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), node);

    // Read-write: both ways, and host-side changes are seen.
    let out = daemon.exec(&cid, &["cat", "/data/from-host"], 30).await.unwrap();
    assert_eq!(out.stdout, b"host wrote this\n");
    let out = daemon
        .exec(&cid, &["sh", "-c", "echo guest wrote this > /data/from-guest"], 30)
        .await
        .unwrap();
    assert_eq!(out.exit_code, 0, "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read_to_string(rw.join("from-guest")).unwrap(), "guest wrote this\n");
    std::fs::write(rw.join("from-host"), "changed\n").unwrap();
    let mut seen = String::new();
    for _ in 0..50 {
        let out = daemon.exec(&cid, &["cat", "/data/from-host"], 30).await.unwrap();
        seen = String::from_utf8_lossy(&out.stdout).into_owned();
        if seen == "changed\n" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(seen, "changed\n", "a host-side change did not reach the guest");
    // Read-only: readable, not writable, and the host file is untouched.
    let out = daemon.exec(&cid, &["cat", "/config/config"], 30).await.unwrap();
    assert_eq!(out.stdout, b"v1\n");
    let out = daemon.exec(&cid, &["sh", "-c", "echo x > /config/config"], 30).await.unwrap();
    assert_ne!(out.exit_code, 0, "a read-only volume was writable");
    assert_eq!(std::fs::read_to_string(ro.join("config")).unwrap(), "v1\n");

    // 1,000 ExecSync calls (a liveness probe every 10 s for almost 3 hours).
    let before = daemon.agent_figures(&pod).await;
    let started = Instant::now();
    for i in 0..1000 {
        let out = daemon.exec(&cid, &["echo", "probe"], 30).await.unwrap();
        assert_eq!((out.exit_code, out.stdout.as_slice()), (0, &b"probe\n"[..]), "exec {i}");
    }
    let took = started.elapsed();
    let after = daemon.agent_figures(&pod).await;
    println!(
        "1000 ExecSync in {took:?} ({:?} each): agent tracked processes {} -> {}, RSS {} KiB -> {} KiB",
        took / 1000,
        before.0,
        after.0,
        before.1 / 1024,
        after.1 / 1024
    );
    assert_eq!(after.0, before.0, "the agent's process table grew");
    // Flat: well under the 1,000 × 256 KiB replay buffers that leaked before.
    assert!(
        after.1 < before.1 + 8 * 1024 * 1024,
        "agent RSS grew from {} to {}",
        before.1,
        after.1
    );

    daemon.remove_pod(&pod).await;
    daemon.assert_nothing_left();
}

/// A daemon upgraded over records of schema 0 (no schema_version, CRI enum integers) starts,
/// lists them, reports the pod whose VM is gone as not ready, and removes it cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_starts_on_records_of_the_previous_schema() {
    if !e2e_can_run() {
        return;
    }
    let mut daemon = TestDaemon::start("").await.unwrap();
    daemon.kill();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/records-v0/sandboxes");
    let status = std::process::Command::new("cp")
        .arg("-r")
        .arg(&fixture)
        .arg(daemon.root())
        .status()
        .unwrap();
    assert!(status.success());
    daemon.restart().await.unwrap();
    let mut rt = daemon.runtime().await.unwrap();
    let pods = rt
        .list_pod_sandbox(cri::ListPodSandboxRequest::default())
        .await
        .unwrap()
        .into_inner()
        .items;
    assert_eq!(pods.len(), 1, "{pods:?}\n{}", daemon.log_tail());
    let pod = &pods[0];
    assert_eq!(pod.metadata.as_ref().unwrap().name, "legacy-pod");
    assert_eq!(pod.state, cri::PodSandboxState::SandboxNotready as i32);
    let status = rt
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: pod.id.clone(),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    let ns = status.linux.unwrap().namespaces.unwrap().options.unwrap();
    assert_eq!(ns.pid, cri::NamespaceMode::Container as i32, "PID mode survived the upgrade");
    let containers = rt
        .list_containers(cri::ListContainersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .containers;
    assert_eq!(containers.len(), 1);
    let c = daemon.container_status(&containers[0].id).await;
    assert_eq!(c.state, cri::ContainerState::ContainerExited as i32);
    assert_eq!(c.reason, "VMExited");
    assert_eq!(c.mounts[0].container_path, "/data");
    daemon.remove_pod(&pod.id).await;
    daemon.assert_nothing_left();
}
