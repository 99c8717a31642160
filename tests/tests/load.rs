//! End-to-end load: many pods started at once (RunPodSandbox + CreateContainer +
//! StartContainer, all concurrent), then many ExecSync across them, with no error and nothing
//! leaked once they are removed (VM processes, daemon fds, mounts), and the daemon's RSS
//! printed before, under load and after.
//!
//! `make test` runs 8 pods and 100 ExecSync; `make load` runs 50 pods and 1,000
//! (`PODVISOR_LOAD_PODS`, `PODVISOR_LOAD_EXECS`).

use std::time::Instant;

use futures::stream::{self, StreamExt};
use podvisor_e2e::daemon::{container_config, e2e_can_run, processes_matching, TestDaemon};
use podvisor_e2e::registry::TestRegistry;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// What the host shows of the daemon and its VMs.
#[derive(Debug)]
struct Figures {
    vm_processes: usize,
    daemon_fds: usize,
    mounts: usize,
    daemon_rss_kib: u64,
}

fn figures(daemon: &TestDaemon) -> Figures {
    let needle = format!("--config {}", daemon.dir.path().join("config.toml").display());
    let pid = processes_matching(&needle)
        .into_iter()
        .find(|(_, cmd)| cmd.contains(" daemon "))
        .map(|(pid, _)| pid)
        .expect("the daemon runs");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    Figures {
        vm_processes: daemon.vm_processes().len(),
        daemon_fds: std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0),
        mounts: daemon.mounts().len(),
        daemon_rss_kib: rss,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_pods_at_once_then_many_execs_leave_no_error_and_no_leak() {
    if !e2e_can_run() {
        return;
    }
    let pods = env_or("PODVISOR_LOAD_PODS", 8);
    let execs = env_or("PODVISOR_LOAD_EXECS", 100);
    let registry = TestRegistry::start().unwrap();
    let image = registry.push_busybox("busybox:load").unwrap();
    let daemon = TestDaemon::start("").await.unwrap();
    daemon.pull(&image).await;
    let before = figures(&daemon);
    eprintln!("before: {before:?}");

    let started = Instant::now();
    let logs = daemon.dir.path().join("logs");
    let running: Vec<(String, String)> = futures::future::join_all((0..pods).map(|n| {
        let (daemon, image, logs) = (&daemon, &image, &logs);
        async move {
            let (pod, cfg) = daemon.run_pod(&format!("load{n}"), logs).await;
            let c = container_config("c", image, &["sleep", "100000"]);
            let cid = daemon.create_and_start(&pod, &cfg, c).await;
            (pod, cid)
        }
    }))
    .await;
    let start_took = started.elapsed();
    eprintln!("{pods} pods running after {start_took:.1?} (all started at once)");
    let under_load = figures(&daemon);
    eprintln!("{pods} pods: {under_load:?}");

    let started = Instant::now();
    let failures: Vec<String> = stream::iter(0..execs)
        .map(|n| {
            let (daemon, cid) = (&daemon, &running[n % running.len()].1);
            async move {
                let word = format!("exec-{n}");
                match daemon.exec(cid, &["echo", &word], 60).await {
                    Ok(out)
                        if out.exit_code == 0 && out.stdout == format!("{word}\n").as_bytes() =>
                    {
                        None
                    }
                    Ok(out) => Some(format!("exec {n}: {out:?}")),
                    Err(e) => Some(format!("exec {n}: {e}")),
                }
            }
        })
        .buffer_unordered(16)
        .filter_map(|f| async move { f })
        .collect()
        .await;
    let exec_took = started.elapsed();
    eprintln!(
        "{execs} ExecSync (16 at a time) in {exec_took:.1?}: {:.1} per second",
        execs as f64 / exec_took.as_secs_f64()
    );
    assert!(failures.is_empty(), "{} ExecSync failed: {failures:?}", failures.len());
    let after_execs = figures(&daemon);
    eprintln!("after the execs: {after_execs:?}");
    // Each exec's streams and hub are released: the fds are the pods', not the execs'.
    assert!(
        after_execs.daemon_fds <= under_load.daemon_fds + 8,
        "the execs leaked fds: {under_load:?} -> {after_execs:?}"
    );

    futures::future::join_all(running.iter().map(|(pod, _)| daemon.remove_pod(pod))).await;
    let after = figures(&daemon);
    eprintln!("after removing them: {after:?}");
    eprintln!(
        "daemon RSS: {} KiB before, {} KiB with {pods} pods, {} KiB after {execs} execs, {} KiB \
         after removing them",
        before.daemon_rss_kib,
        under_load.daemon_rss_kib,
        after_execs.daemon_rss_kib,
        after.daemon_rss_kib
    );
    assert_eq!((after.vm_processes, after.mounts), (0, 0), "{after:?}");
    assert!(after.daemon_fds <= before.daemon_fds + 4, "fds leaked: {before:?} -> {after:?}");
    daemon.assert_nothing_left();
}
