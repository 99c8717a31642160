//! End-to-end: what a pod's VM costs the host, as the daemon reports it on the CRI socket
//! (verbose PodSandboxStatus `vmmMemory`: RSS, PSS and USS of the VMM process).

use podvisor_e2e::daemon::{e2e_can_run, TestDaemon};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verbose_pod_status_reports_the_vmms_pss_and_uss() {
    if !e2e_can_run() {
        return;
    }
    let daemon = TestDaemon::start("").await.unwrap();
    let log_dir = daemon.dir.path().join("pod-logs");
    let (pod, _) = daemon.run_pod("memory", &log_dir).await;
    let info = daemon.pod_verbose_info(&pod).await;
    let memory = &info["vmmMemory"];
    let field = |name: &str| memory[name].as_u64().unwrap_or_else(|| panic!("{name}: {info}"));
    let (rss, pss, uss) = (field("rssKib"), field("pssKib"), field("ussKib"));
    // The VMM's own pages are private; its binary and libraries are shared with others.
    assert!(uss > 0 && pss >= uss && rss >= pss, "rss {rss} pss {pss} uss {uss}");
    // The guest's RAM (a booted kernel and agent) is in it: more than a few MiB.
    assert!(uss > 8 * 1024, "uss {uss} KiB");
    println!("pod VMM memory: RSS {rss} KiB, PSS {pss} KiB, USS {uss} KiB");
    daemon.remove_pod(&pod).await;
}
