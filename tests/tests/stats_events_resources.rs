//! End-to-end, on a real guest: pod and container stats that move when a container burns CPU
//! and fills memory, an OOM kill reported as OOMKilled/137, UpdateContainerResources limits
//! the guest enforces (and one larger than the VM refused), the GetContainerEvents stream
//! over one pod's life, the same figures under cAdvisor's names (ListMetricDescriptors,
//! ListPodSandboxMetrics), and the daemon's own metrics endpoint over that life.

use std::time::Duration;

use futures::StreamExt;
use k8s_cri::v1 as cri;
use podvisor_e2e::daemon::{
    container_config, e2e_can_run, metric_samples, metric_value, wait_for, TestDaemon,
};
use podvisor_e2e::registry::TestRegistry;

fn with_memory_limit(mut c: cri::ContainerConfig, bytes: i64) -> cri::ContainerConfig {
    c.linux = Some(cri::LinuxContainerConfig {
        resources: Some(cri::LinuxContainerResources {
            memory_limit_in_bytes: bytes,
            ..Default::default()
        }),
        ..Default::default()
    });
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_oom_live_resources_and_events() {
    if !e2e_can_run() {
        return;
    }
    let registry = TestRegistry::start().unwrap();
    let image = registry.push_busybox("busybox:stats").unwrap();
    let daemon = TestDaemon::start("[metrics]\nenabled = true\nport = 0\n").await.unwrap();
    daemon.pull(&image).await;
    let mut rt = daemon.runtime().await.unwrap();
    let t0 = std::time::Instant::now();
    let stage = |what: &str| eprintln!("{:>7.1?} {what}", t0.elapsed());

    // Events from before the pod exists, collected until the pod is deleted.
    let mut stream = rt.get_container_events(cri::GetEventsRequest {}).await.unwrap().into_inner();
    let collector = tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Ok(Some(Ok(event))) =
            tokio::time::timeout(Duration::from_secs(300), stream.next()).await
        {
            let pod_deleted = event.container_event_type
                == cri::ContainerEventType::ContainerDeletedEvent as i32
                && event.pod_sandbox_status.as_ref().is_some_and(|p| p.id == event.container_id);
            seen.push(event);
            if pod_deleted {
                break;
            }
        }
        seen
    });

    let log_dir = daemon.dir.path().join("pod-logs");
    let (pod, pod_cfg) = daemon.run_pod("stats", &log_dir).await;
    let burner = daemon
        .create_and_start(
            &pod,
            &pod_cfg,
            with_memory_limit(
                container_config(
                    "burner",
                    &image,
                    &["sh", "-c", "dd if=/dev/zero of=/fill bs=1M count=24; while :; do :; done"],
                ),
                128 << 20,
            ),
        )
        .await;

    stage("pod and burner running");
    // Stats move: CPU rate from two samples, memory and the writable layer from the fill.
    let sample = |rt: &mut cri::runtime_service_client::RuntimeServiceClient<_>| {
        let pod = pod.clone();
        let mut rt = rt.clone();
        async move {
            rt.pod_sandbox_stats(cri::PodSandboxStatsRequest { pod_sandbox_id: pod })
                .await
                .unwrap()
                .into_inner()
                .stats
                .unwrap()
        }
    };
    let _first = sample(&mut rt).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stats = wait_for(Duration::from_secs(30), || {
        let mut rt = rt.clone();
        let sample = sample(&mut rt);
        async move {
            let s = sample.await;
            let linux = s.linux.clone().unwrap();
            let c = linux.containers.first().cloned()?;
            let layer = c.writable_layer.as_ref()?.used_bytes.as_ref()?.value;
            (layer >= 20 << 20).then_some(s)
        }
    })
    .await
    .expect("the writable layer never showed the 24 MiB fill");
    let linux = stats.linux.unwrap();
    let pod_cpu = linux.cpu.unwrap();
    let pod_cores = pod_cpu.usage_nano_cores.map(|v| v.value).unwrap_or(0);
    let pod_memory = linux.memory.unwrap();
    let working_set = pod_memory.working_set_bytes.unwrap().value;
    let processes = linux.process.unwrap().process_count.unwrap().value;
    let c = &linux.containers[0];
    let c_cores = c.cpu.as_ref().unwrap().usage_nano_cores.map(|v| v.value).unwrap_or(0);
    println!(
        "pod: {:.2} cores, working set {} MiB, {processes} processes; burner {:.2} cores, \
         writable layer {} MiB",
        pod_cores as f64 / 1e9,
        working_set >> 20,
        c_cores as f64 / 1e9,
        c.writable_layer.as_ref().unwrap().used_bytes.as_ref().unwrap().value >> 20
    );
    assert!(pod_cores > 200_000_000, "a busy loop shows as CPU use: {pod_cores}");
    assert!(c_cores > 200_000_000, "{c_cores}");
    assert!(working_set >= 20 << 20, "the fill shows in the pod's memory: {working_set}");
    assert!(processes >= 1);
    let listed = rt
        .list_pod_sandbox_stats(cri::ListPodSandboxStatsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .stats;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].attributes.as_ref().unwrap().id, pod);
    stage("stats checked");
    check_cri_metrics(&rt, &pod, &burner).await;
    stage("CRI metrics checked");
    check_daemon_metrics_while_running(&daemon).await;
    // The busy loop would starve the one-vCPU guest for the rest of the test.
    rt.stop_container(cri::StopContainerRequest { container_id: burner.clone(), timeout: 0 })
        .await
        .unwrap();

    stage("daemon metrics checked");
    // Live resources: the guest enforces them, ContainerStatus reports them, and a limit
    // larger than the VM is refused.
    let idle = daemon
        .create_and_start(
            &pod,
            &pod_cfg,
            with_memory_limit(container_config("idle", &image, &["sleep", "3600"]), 128 << 20),
        )
        .await;
    rt.update_container_resources(cri::UpdateContainerResourcesRequest {
        container_id: idle.clone(),
        linux: Some(cri::LinuxContainerResources {
            memory_limit_in_bytes: 96 << 20,
            cpu_quota: 20_000,
            cpu_period: 100_000,
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("UpdateContainerResources: {e}\n{}", daemon.log_tail()));
    let out = daemon
        .exec(&idle, &["cat", "/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/cpu.max"], 30)
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{}\n20000 100000\n", 96 << 20));
    let status = daemon.container_status(&idle).await;
    let reported = status.resources.unwrap().linux.unwrap();
    assert_eq!((reported.memory_limit_in_bytes, reported.cpu_quota), (96 << 20, 20_000));
    let too_big = rt
        .update_container_resources(cri::UpdateContainerResourcesRequest {
            container_id: idle.clone(),
            linux: Some(cri::LinuxContainerResources {
                memory_limit_in_bytes: 4 << 30,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(too_big.code(), tonic::Code::InvalidArgument, "{too_big}");
    assert!(too_big.message().contains("larger than the pod's VM"), "{too_big}");

    stage("resources checked");
    // The guest's OOM killer: exit 137, reason OOMKilled.
    let hog = daemon
        .create_and_start(
            &pod,
            &pod_cfg,
            with_memory_limit(
                container_config(
                    "hog",
                    &image,
                    &["sh", "-c", "head -c 200000000 /dev/zero | tail"],
                ),
                32 << 20,
            ),
        )
        .await;
    let exited = wait_for(Duration::from_secs(60), || {
        let daemon = &daemon;
        let hog = hog.clone();
        async move {
            let s = daemon.container_status(&hog).await;
            (s.state == cri::ContainerState::ContainerExited as i32).then_some(s)
        }
    })
    .await
    .expect("the memory hog never exited");
    assert_eq!((exited.exit_code, exited.reason.as_str()), (137, "OOMKilled"), "{exited:?}");

    stage("hog exited");
    daemon.remove_pod(&pod).await;
    stage("pod removed");
    let events = collector.await.unwrap();
    stage("events collected");
    let of = |id: &str| -> Vec<i32> {
        events.iter().filter(|e| e.container_id == id).map(|e| e.container_event_type).collect()
    };
    use cri::ContainerEventType as T;
    let lifecycle = [
        T::ContainerCreatedEvent,
        T::ContainerStartedEvent,
        T::ContainerStoppedEvent,
        T::ContainerDeletedEvent,
    ]
    .map(|t| t as i32)
    .to_vec();
    assert_eq!(of(&pod), lifecycle, "pod events");
    assert_eq!(of(&burner), lifecycle, "burner events");
    assert_eq!(of(&idle), lifecycle, "idle events");
    assert_eq!(of(&hog), lifecycle, "hog events");
    let hog_stopped = events
        .iter()
        .find(|e| {
            e.container_id == hog && e.container_event_type == T::ContainerStoppedEvent as i32
        })
        .unwrap();
    assert_eq!(hog_stopped.containers_statuses[0].reason, "OOMKilled");
    check_daemon_metrics_after(&daemon).await;
    daemon.assert_nothing_left();
}

/// The value of the first metric called `name`.
fn value(metrics: &[cri::Metric], name: &str) -> Option<u64> {
    metrics.iter().find(|m| m.name == name).and_then(|m| m.value.as_ref()).map(|v| v.value)
}

/// ListMetricDescriptors and ListPodSandboxMetrics on the running pod: cAdvisor's names with
/// their label keys, and the burner's CPU and memory in them.
async fn check_cri_metrics(
    rt: &cri::runtime_service_client::RuntimeServiceClient<tonic::transport::Channel>,
    pod: &str,
    burner: &str,
) {
    let descriptors = rt
        .clone()
        .list_metric_descriptors(cri::ListMetricDescriptorsRequest {})
        .await
        .unwrap()
        .into_inner()
        .descriptors;
    for name in [
        "container_cpu_usage_seconds_total",
        "container_memory_working_set_bytes",
        "container_memory_usage_bytes",
        "container_memory_rss",
        "container_spec_memory_limit_bytes",
        "container_threads",
        "container_fs_usage_bytes",
        "container_last_seen",
    ] {
        assert!(descriptors.iter().any(|d| d.name == name), "{name} not described");
    }
    // CPU time comes in whole seconds: wait until the busy loop has used one.
    let metrics = wait_for(Duration::from_secs(30), || {
        let mut rt = rt.clone();
        async move {
            let all = rt
                .list_pod_sandbox_metrics(cri::ListPodSandboxMetricsRequest {})
                .await
                .ok()?
                .into_inner()
                .pod_metrics;
            let p = all.into_iter().find(|p| p.pod_sandbox_id == pod)?;
            let c = p.container_metrics.iter().find(|c| c.container_id == burner)?;
            (value(&c.metrics, "container_cpu_usage_seconds_total")? >= 1).then_some(p)
        }
    })
    .await
    .expect("the burner's CPU seconds never showed in ListPodSandboxMetrics");
    let c = metrics.container_metrics.iter().find(|c| c.container_id == burner).unwrap();
    let all = metrics.metrics.iter().chain(&c.metrics);
    for m in all {
        let d = descriptors.iter().find(|d| d.name == m.name).expect(&m.name);
        assert_eq!(m.label_values.len(), d.label_keys.len(), "{}", m.name);
        assert!(m.timestamp > 0, "{}", m.name);
    }
    let pod_metric = |name| value(&metrics.metrics, name).unwrap_or(0);
    let ctr_metric = |name| value(&c.metrics, name).unwrap_or(0);
    println!(
        "ListPodSandboxMetrics: pod {} CPU s, working set {} MiB; burner {} CPU s, working set \
         {} MiB, writable layer {} MiB",
        pod_metric("container_cpu_usage_seconds_total"),
        pod_metric("container_memory_working_set_bytes") >> 20,
        ctr_metric("container_cpu_usage_seconds_total"),
        ctr_metric("container_memory_working_set_bytes") >> 20,
        ctr_metric("container_fs_usage_bytes") >> 20,
    );
    assert!(pod_metric("container_cpu_usage_seconds_total") >= 1);
    assert!(pod_metric("container_memory_working_set_bytes") >= 20 << 20);
    assert!(pod_metric("container_memory_usage_bytes") > 0);
    assert!(ctr_metric("container_memory_working_set_bytes") > 0);
    assert!(ctr_metric("container_fs_usage_bytes") >= 20 << 20);
    assert_eq!(ctr_metric("container_spec_memory_limit_bytes"), 128 << 20);
    assert!(ctr_metric("container_threads") >= 1);
    // The pod's names label its series; the pod-level ones have an empty container.
    let pod_cpu = metrics.metrics.iter().find(|m| m.name == "container_cpu_usage_seconds_total");
    assert_eq!(pod_cpu.unwrap().label_values, [pod, "", "e2e", "stats", "", "total"]);
    assert_eq!(c.metrics[0].label_values[2..5], ["e2e", "stats", "burner"]);
}

fn series_count(text: &str, series: &str) -> f64 {
    metric_value(text, series).unwrap_or(0.0)
}

/// The daemon's own metrics while the pod runs: CRI calls by method and code, every boot
/// phase once, the burner's create-to-running, the pull, and one VM.
async fn check_daemon_metrics_while_running(daemon: &TestDaemon) {
    let text = daemon.scrape_metrics().await;
    let calls = |method: &str, code: &str| {
        series_count(
            &text,
            &format!(r#"podvisor_cri_requests_total{{code="{code}",method="{method}"}}"#),
        )
    };
    assert_eq!(calls("RunPodSandbox", "OK"), 1.0, "{text}");
    assert_eq!(calls("CreateContainer", "OK"), 1.0, "{text}");
    assert!(calls("PullImage", "OK") >= 1.0, "{text}");
    assert!(calls("PodSandboxStats", "OK") >= 2.0, "{text}");
    assert!(calls("ListPodSandboxMetrics", "OK") >= 1.0, "{text}");
    let timed = r#"podvisor_cri_request_duration_seconds_count{method="RunPodSandbox"}"#;
    assert_eq!(series_count(&text, timed), 1.0, "{text}");
    for phase in ["network", "vm_start", "agent_ready", "sandbox_setup", "pod_ready"] {
        let count = format!(r#"podvisor_pod_start_duration_seconds_count{{phase="{phase}"}}"#);
        assert_eq!(series_count(&text, &count), 1.0, "{count}\n{text}");
    }
    let running = r#"podvisor_pod_start_duration_seconds_count{phase="container_running"}"#;
    assert_eq!(series_count(&text, running), 1.0, "{text}");
    let ready = r#"podvisor_pod_start_duration_seconds_sum{phase="pod_ready"}"#;
    println!("pod ready after {:.2} s (from the metrics)", series_count(&text, ready));
    assert!(series_count(&text, ready) > 0.0);
    let vms = metric_samples(&text, "podvisor_vms_running");
    assert_eq!(vms.iter().map(|(_, v)| v).sum::<f64>(), 1.0, "{vms:?}");
    // busybox-static alone is over a MiB.
    let pulled = series_count(&text, "podvisor_image_pull_bytes_total");
    assert!(pulled >= 500_000.0, "pulled {pulled} bytes\n{text}");
    assert!(series_count(&text, "podvisor_image_pull_duration_seconds_count") >= 1.0);
}

/// After the pod's removal: no VM, and the refused update counted with its code.
async fn check_daemon_metrics_after(daemon: &TestDaemon) {
    let text = daemon.scrape_metrics().await;
    let vms = metric_samples(&text, "podvisor_vms_running");
    assert!(!vms.is_empty(), "the default backend is always listed\n{text}");
    assert_eq!(vms.iter().map(|(_, v)| v).sum::<f64>(), 0.0, "{vms:?}");
    let refused =
        r#"podvisor_cri_requests_total{code="InvalidArgument",method="UpdateContainerResources"}"#;
    assert_eq!(series_count(&text, refused), 1.0, "{text}");
    let removed = r#"podvisor_cri_requests_total{code="OK",method="RemovePodSandbox"}"#;
    assert!(series_count(&text, removed) >= 1.0, "{text}");
    let running = r#"podvisor_pod_start_duration_seconds_count{phase="container_running"}"#;
    assert_eq!(series_count(&text, running), 3.0, "burner, idle and hog\n{text}");
}
