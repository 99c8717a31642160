//! End-to-end: VM templates on the CRI socket. With `[vm] templates = true`, the first pod
//! cold-boots and says why in verbose PodSandboxStatus: on QEMU (this machine's backend) the
//! backend cannot snapshot and no template is built; on the built-in VMM its template is
//! being built (the nested-SVM test runs pods from it). Verbose Status lists the templates.

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
    let mut rt = daemon.runtime().await.unwrap();
    let status = rt.status(cri::StatusRequest { verbose: true }).await.unwrap().into_inner();
    let templates: serde_json::Value =
        serde_json::from_str(status.info.get("templates").expect("a templates field")).unwrap();
    if reason.contains("cannot snapshot") {
        assert_eq!(templates, serde_json::json!([]), "a refused VM builds no template");
        let built =
            std::fs::read_dir(daemon.state().join("templates")).into_iter().flatten().count();
        assert_eq!(built, 0, "nothing under <state>/templates");
    } else {
        assert!(reason.contains("no template") && reason.contains("building"), "{reason}");
        assert!(templates.as_array().is_some_and(|t| !t.is_empty()), "{templates}");
    }
    daemon.remove_pod(&pod).await;
}
