//! End-to-end: VM templates on the CRI socket, on by default. The first pod cold-boots and
//! says why in verbose PodSandboxStatus: on QEMU (this machine's backend) the backend cannot
//! snapshot, no template is built, and the reason is logged once (info), not per pod; on the
//! built-in VMM its template is being built (the nested-SVM test runs pods from it). Verbose
//! Status lists the templates.

use k8s_cri::v1 as cri;
use podvisor_e2e::daemon::{e2e_can_run, TestDaemon};

/// The daemon's one line per handler and reason when its pods cannot use a template.
const COLD_BOOT_LINE: &str = "pods cold-boot: no VM template";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_that_cannot_use_a_template_cold_boots_and_says_why() {
    if !e2e_can_run() {
        return;
    }
    // No `templates` key: the default.
    let daemon = TestDaemon::start("").await.unwrap();
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
        // A second pod: the same reason, and no second log line.
        let (again, _) = daemon.run_pod("cold-again", &log_dir).await;
        assert_eq!(daemon.pod_verbose_info(&again).await["startReason"], reason);
        let log = std::fs::read_to_string(daemon.log_file()).unwrap();
        assert_eq!(log.matches(COLD_BOOT_LINE).count(), 1, "{}", daemon.log_tail());
        let noisy: Vec<&str> =
            log.lines().filter(|l| l.contains("WARN") && l.contains("template")).collect();
        assert!(noisy.is_empty(), "template warnings on a backend that refuses them: {noisy:?}");
        daemon.remove_pod(&again).await;
    } else {
        assert!(reason.contains("no template") && reason.contains("building"), "{reason}");
        assert!(templates.as_array().is_some_and(|t| !t.is_empty()), "{templates}");
    }
    daemon.remove_pod(&pod).await;
}
