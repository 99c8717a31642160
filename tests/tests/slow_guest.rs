//! End-to-end: a slow or hostile guest delays no other pod's CRI calls beyond a stated bound,
//! and its own pod can still be stopped and removed. Real guests (QEMU/TCG), a real registry.
//!
//! Bounds (what the README promises; each call is timed and checked here):
//! - with one pod's VM frozen (SIGSTOP of its QEMU: a paused guest, or an agent that never
//!   answers), ListPodSandbox, ListContainers and PodSandboxStatus answer within
//!   [`QUICK_BOUND`], another pod's ExecSync within [`EXEC_BOUND`], and ListContainerStats
//!   (which leaves the frozen pod out) within its per-pod deadline (3 s) plus [`QUICK_BOUND`];
//! - StopPodSandbox of the frozen pod finishes within [`STOP_BOUND`] (one call deadline for
//!   its containers, the 2 s shutdown, the 3 s stop grace), RemovePodSandbox within
//!   [`QUICK_BOUND`] after it;
//! - a container flooding its stdout does not push another pod's ExecSync past
//!   [`EXEC_BOUND`].

use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use podvisor_e2e::daemon::{container_config, e2e_can_run, TestDaemon};
use podvisor_e2e::registry::TestRegistry;

/// Calls that read only the daemon's own state.
const QUICK_BOUND: Duration = Duration::from_secs(2);
/// An ExecSync in a healthy pod (a guest round trip under TCG on a shared 2-core host).
const EXEC_BOUND: Duration = Duration::from_secs(10);
/// How long List*Stats wait for one guest (`cri::runtime::LIST_STATS_DEADLINE`).
const LIST_STATS_DEADLINE: Duration = Duration::from_secs(3);
/// StopPodSandbox of a pod whose guest never answers.
const STOP_BOUND: Duration = Duration::from_secs(20);

/// Runs `call`, prints and returns how long it took.
async fn timed<T>(what: &str, call: impl std::future::Future<Output = T>) -> (T, Duration) {
    let started = Instant::now();
    let out = call.await;
    let took = started.elapsed();
    eprintln!("{what}: {took:.2?}");
    (out, took)
}

/// The QEMU process of pod `pod` (its run directory is named by the id's first 16 digits).
fn qemu_of(daemon: &TestDaemon, pod: &str) -> i32 {
    let run_dir = daemon.state().join("vms").join(&pod[..16]).display().to_string();
    daemon
        .vm_processes()
        .into_iter()
        .find(|(_, cmd)| cmd.contains("qemu-system") && cmd.contains(&run_dir))
        .map(|(pid, _)| pid)
        .unwrap_or_else(|| panic!("no QEMU for pod {pod}: {:?}", daemon.vm_processes()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_or_flooding_guest_delays_no_other_pod_and_its_pod_can_be_stopped() {
    if !e2e_can_run() {
        return;
    }
    let registry = TestRegistry::start().unwrap();
    let image = registry.push_busybox("busybox:slow").unwrap();
    let daemon = TestDaemon::start("").await.unwrap();
    daemon.pull(&image).await;
    let logs = daemon.dir.path().join("logs");
    let mut rt = daemon.runtime().await.unwrap();

    let (frozen, frozen_cfg) = daemon.run_pod("frozen", &logs).await;
    daemon
        .create_and_start(&frozen, &frozen_cfg, container_config("c", &image, &["sleep", "1000"]))
        .await;
    let (healthy, healthy_cfg) = daemon.run_pod("healthy", &logs).await;
    let healthy_cid = daemon
        .create_and_start(&healthy, &healthy_cfg, container_config("c", &image, &["sleep", "1000"]))
        .await;

    // The frozen pod's guest stops answering anything.
    let qemu = qemu_of(&daemon, &frozen);
    kill(Pid::from_raw(qemu), Signal::SIGSTOP).unwrap();

    let (pods, took) =
        timed("ListPodSandbox", rt.list_pod_sandbox(cri::ListPodSandboxRequest::default())).await;
    assert_eq!(pods.unwrap().into_inner().items.len(), 2);
    assert!(took < QUICK_BOUND, "ListPodSandbox took {took:?}");
    let (ctrs, took) =
        timed("ListContainers", rt.list_containers(cri::ListContainersRequest::default())).await;
    assert_eq!(ctrs.unwrap().into_inner().containers.len(), 2);
    assert!(took < QUICK_BOUND, "ListContainers took {took:?}");
    let status = rt.pod_sandbox_status(cri::PodSandboxStatusRequest {
        pod_sandbox_id: frozen.clone(),
        verbose: false,
    });
    let (status, took) = timed("PodSandboxStatus (frozen pod)", status).await;
    status.unwrap();
    assert!(took < QUICK_BOUND, "PodSandboxStatus took {took:?}");
    let (out, took) =
        timed("ExecSync (healthy pod)", daemon.exec(&healthy_cid, &["echo", "ok"], 30)).await;
    assert_eq!(out.unwrap().stdout, b"ok\n");
    assert!(took < EXEC_BOUND, "ExecSync in the healthy pod took {took:?}");
    let stats = rt.list_container_stats(cri::ListContainerStatsRequest::default());
    let (stats, took) = timed("ListContainerStats", stats).await;
    let stats = stats.unwrap().into_inner().stats;
    assert_eq!(stats.len(), 1, "the healthy pod's container is listed, the frozen one left out");
    assert!(took < LIST_STATS_DEADLINE + QUICK_BOUND, "ListContainerStats took {took:?}");
    let stats = rt.list_pod_sandbox_stats(cri::ListPodSandboxStatsRequest::default());
    let (stats, took) = timed("ListPodSandboxStats", stats).await;
    assert_eq!(stats.unwrap().into_inner().stats.len(), 1, "the frozen pod is left out");
    assert!(took < LIST_STATS_DEADLINE + QUICK_BOUND, "ListPodSandboxStats took {took:?}");

    // The frozen pod can be stopped (its QEMU is killed) and removed, and the healthy pod's
    // calls go on meanwhile.
    let stop = {
        let mut rt = daemon.runtime().await.unwrap();
        let frozen = frozen.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let out =
                rt.stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id: frozen }).await;
            (out, started.elapsed())
        })
    };
    let (out, took) =
        timed("ExecSync during the stop", daemon.exec(&healthy_cid, &["echo", "ok"], 30)).await;
    assert_eq!(out.unwrap().stdout, b"ok\n");
    assert!(took < EXEC_BOUND, "ExecSync during the frozen pod's stop took {took:?}");
    let (out, took) = stop.await.unwrap();
    eprintln!("StopPodSandbox (frozen pod): {took:.2?}");
    out.unwrap_or_else(|e| panic!("StopPodSandbox: {e}\n{}", daemon.log_tail()));
    assert!(took < STOP_BOUND, "StopPodSandbox of the frozen pod took {took:?}");
    let remove =
        rt.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: frozen.clone() });
    let (out, took) = timed("RemovePodSandbox (frozen pod)", remove).await;
    out.unwrap();
    assert!(took < QUICK_BOUND, "RemovePodSandbox took {took:?}");
    assert!(
        !std::path::Path::new(&format!("/proc/{qemu}")).exists()
            || std::fs::read_to_string(format!("/proc/{qemu}/stat"))
                .is_ok_and(|s| s.contains(") Z ")),
        "the frozen pod's QEMU was killed"
    );

    // A container flooding its stdout (into its CRI log) in a third pod.
    let (flood, flood_cfg) = daemon.run_pod("flood", &logs).await;
    let script = "yes podvisor-floods-its-log-with-this-line | head -c 300000000; sleep 1000";
    daemon
        .create_and_start(&flood, &flood_cfg, container_config("f", &image, &["sh", "-c", script]))
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut worst = Duration::ZERO;
    for _ in 0..5 {
        let (out, took) =
            timed("ExecSync beside a flood", daemon.exec(&healthy_cid, &["echo", "ok"], 30)).await;
        assert_eq!(out.unwrap().stdout, b"ok\n");
        worst = worst.max(took);
    }
    let flooded = std::fs::metadata(logs.join("f.log")).map(|m| m.len()).unwrap_or(0);
    eprintln!("flood log after the execs: {} MiB", flooded >> 20);
    assert!(flooded > 1 << 20, "the flood ran ({flooded} bytes logged)");
    assert!(worst < EXEC_BOUND, "ExecSync beside a flooding pod took {worst:?}");

    daemon.remove_pod(&flood).await;
    daemon.remove_pod(&healthy).await;
    daemon.assert_nothing_left();
}
