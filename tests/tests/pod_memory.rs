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
    // What the whole VM costs the host (the VMM and every helper, their children too): the
    // figure a RuntimeClass's `overhead.podFixed.memory` is sized from (README).
    let pids: Vec<u32> = info["processes"]
        .as_array()
        .unwrap_or_else(|| panic!("processes: {info}"))
        .iter()
        .filter_map(|p| p["pid"].as_u64())
        .map(|pid| pid as u32)
        .collect();
    assert!(!pids.is_empty(), "{info}");
    let all = with_descendants(&pids);
    for &pid in &all {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let shmem = status.lines().find(|l| l.starts_with("RssShmem:")).unwrap_or("").trim();
        println!("  {pid} {}: PSS {} KiB, {shmem}", comm.trim(), pss_kib(pid));
    }
    let total: u64 = all.iter().map(|&pid| pss_kib(pid)).sum();
    assert!(total >= pss, "total {total} < VMM {pss}");
    println!("pod VM processes ({} with helpers' children): PSS {total} KiB", pids.len());
    daemon.remove_pod(&pod).await;
}

/// `roots` and every process below them.
fn with_descendants(roots: &[u32]) -> Vec<u32> {
    let mut all = roots.to_vec();
    let mut next = 0;
    while next < all.len() {
        let pid = all[next];
        next += 1;
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { continue };
        for task in tasks.flatten() {
            let children =
                std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            all.extend(children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()));
        }
    }
    all.sort_unstable();
    all.dedup();
    all
}

/// A process's proportional set size (0 if it is gone).
fn pss_kib(pid: u32) -> u64 {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    rollup
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}
