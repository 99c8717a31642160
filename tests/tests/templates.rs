//! End-to-end: VM templates on the CRI socket. With `[vm] templates = true`, a pod whose VM
//! cannot start from a template (today every VM pod: QEMU keeps cold boot, and the built-in
//! VMM cannot restore vhost-user virtio-fs shares) cold-boots and says why in verbose
//! PodSandboxStatus, builds no template, and verbose Status lists the (no) templates.

use k8s_cri::v1 as cri;
use podvisor_e2e::daemon::{e2e_can_run, TestDaemon};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_that_cannot_use_a_template_cold_boots_and_says_why() {
    if !e2e_can_run() {
        return;
    }
    let daemon = TestDaemon::start_with_vm("", "templates = true").await.unwrap();
    let log_dir = daemon.dir.path().join("pod-logs");
    let (pod, _) = daemon.run_pod("cold", &log_dir).await;
    let info = daemon.pod_verbose_info(&pod).await;
    assert_eq!(info["startPath"], "cold", "{info}");
    let reason = info["startReason"].as_str().unwrap_or_else(|| panic!("no reason: {info}"));
    assert!(
        reason.contains("cannot snapshot") || reason.contains("shared directories"),
        "{reason}"
    );
    let mut rt = daemon.runtime().await.unwrap();
    let status = rt.status(cri::StatusRequest { verbose: true }).await.unwrap().into_inner();
    let templates: serde_json::Value =
        serde_json::from_str(status.info.get("templates").expect("a templates field")).unwrap();
    assert_eq!(templates, serde_json::json!([]), "a refused VM builds no template");
    let built = std::fs::read_dir(daemon.state().join("templates")).into_iter().flatten().count();
    assert_eq!(built, 0, "nothing under <state>/templates");
    daemon.remove_pod(&pod).await;
}
