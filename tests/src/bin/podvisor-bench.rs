//! `make bench`: figures for the record, printed, never asserted.
//! - pod start latency: RunPodSandbox → CreateContainer → StartContainer → Running,
//!   p50/p90 over PODVISOR_BENCH_RUNS (default 10) pods;
//! - per-pod host memory: RSS of the VM's processes (VMM + helpers) with one pod running;
//! - ExecSync round trip (`true` in a running container), p50/p99 over PODVISOR_BENCH_EXECS
//!   (default 200) calls;
//!
//! The VM-template figures are `podvisor-template-bench`'s (built-in VMM only).

use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use podvisor_e2e::daemon::{container_config, e2e_missing, pod_config, TestDaemon};
use podvisor_e2e::registry::TestRegistry;

fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    if let Some(why) = e2e_missing() {
        anyhow::bail!("cannot benchmark: {why}");
    }
    let runs: usize =
        std::env::var("PODVISOR_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let registry = TestRegistry::start()?;
    let image = registry.push_busybox("busybox:bench")?;
    let daemon = TestDaemon::start("").await?;
    let mut images = daemon.images().await?;
    images
        .pull_image(cri::PullImageRequest {
            image: Some(cri::ImageSpec { image: image.clone(), ..Default::default() }),
            ..Default::default()
        })
        .await?;
    let mut rt = daemon.runtime().await?;
    let log_dir = daemon.dir.path().join("logs");

    let execs: usize =
        std::env::var("PODVISOR_BENCH_EXECS").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let mut latencies = Vec::with_capacity(runs);
    let mut exec_latencies = Vec::with_capacity(execs);
    let mut rss_samples = Vec::new();
    for i in 0..runs {
        let pod_cfg = pod_config(&format!("bench-{i}"), &log_dir);
        let started = Instant::now();
        let pod = rt
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(pod_cfg.clone()),
                runtime_handler: String::new(),
            })
            .await?
            .into_inner()
            .pod_sandbox_id;
        let booted = started.elapsed();
        let cid = rt
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(container_config("c", &image, &["/bin/sh", "-c", "sleep 3600"])),
                sandbox_config: Some(pod_cfg),
            })
            .await?
            .into_inner()
            .container_id;
        rt.start_container(cri::StartContainerRequest { container_id: cid.clone() }).await?;
        let status = rt
            .container_status(cri::ContainerStatusRequest {
                container_id: cid.clone(),
                verbose: false,
            })
            .await?
            .into_inner()
            .status
            .unwrap_or_default();
        let elapsed = started.elapsed();
        anyhow::ensure!(
            status.state == cri::ContainerState::ContainerRunning as i32,
            "container not running"
        );
        latencies.push(elapsed);
        // Let the guest settle, then weigh the pod's host processes.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let procs = daemon.vm_processes();
        let total: u64 = procs.iter().map(|(pid, _)| rss_kib(*pid)).sum();
        rss_samples.push((
            total,
            procs
                .iter()
                .map(|(pid, cmd)| {
                    (
                        cmd.split(' ')
                            .next()
                            .unwrap_or("")
                            .rsplit('/')
                            .next()
                            .unwrap_or("")
                            .to_string(),
                        rss_kib(*pid),
                    )
                })
                .collect::<Vec<_>>(),
        ));
        eprintln!(
            "run {i}: boot {booted:?}, container running after {elapsed:?}, pod RSS {total} KiB"
        );
        if i + 1 == runs {
            for _ in 0..execs {
                let started = Instant::now();
                let out = rt
                    .exec_sync(cri::ExecSyncRequest {
                        container_id: cid.clone(),
                        cmd: vec!["true".into()],
                        timeout: 30,
                    })
                    .await?
                    .into_inner();
                anyhow::ensure!(out.exit_code == 0, "exec failed: {out:?}");
                exec_latencies.push(started.elapsed());
            }
        }
        rt.stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id: pod.clone() }).await?;
        rt.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: pod }).await?;
    }
    latencies.sort();
    let mut rss: Vec<u64> = rss_samples.iter().map(|(t, _)| *t).collect();
    rss.sort();
    println!(
        "pod start latency (RunPodSandbox -> container running), {runs} runs, backend {}:",
        rt.status(cri::StatusRequest { verbose: true })
            .await?
            .into_inner()
            .info
            .get("hypervisor")
            .cloned()
            .unwrap_or_default()
    );
    println!(
        "  p50 {:?}  p90 {:?}  min {:?}  max {:?}",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.9),
        latencies[0],
        latencies[latencies.len() - 1]
    );
    println!(
        "per-pod host memory (RSS of VMM + helpers, 256 MiB guest): median {} KiB",
        rss[rss.len() / 2]
    );
    if let Some((_, parts)) = rss_samples.first() {
        for (name, kib) in parts {
            println!("  {name}: {kib} KiB");
        }
    }
    exec_latencies.sort();
    if !exec_latencies.is_empty() {
        println!(
            "ExecSync round trip (`true`), {} calls: p50 {:?}  p99 {:?}",
            exec_latencies.len(),
            percentile(&exec_latencies, 0.5),
            percentile(&exec_latencies, 0.99)
        );
    }
    Ok(())
}
