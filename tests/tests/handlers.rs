//! RuntimeClass handlers and VM sizing on real guests: Status lists the configured handlers, an
//! unknown one is refused naming the known ones, a pod asking for 2 vCPUs and 512 MiB (as
//! kubelet sums its containers' limits and its overhead) sees them in /proc/cpuinfo and
//! /proc/meminfo, a pod on another handler gets that handler's VM, and a container limit
//! larger than its pod's VM is refused. Also the daemon's log formats (plain text in a file,
//! JSON lines).

use k8s_cri::v1 as cri;
use podvisor_e2e::daemon::{container_config, e2e_can_run, pod_config, TestDaemon};
use podvisor_e2e::registry::TestRegistry;

/// UpdatePodSandboxResources, which k8s-cri 0.11's client lacks: its request, by field number.
#[derive(Clone, PartialEq, prost::Message)]
struct UpdatePodSandboxResourcesRequest {
    #[prost(string, tag = "1")]
    pod_sandbox_id: String,
    #[prost(message, optional, tag = "2")]
    overhead: Option<cri::LinuxContainerResources>,
    #[prost(message, optional, tag = "3")]
    resources: Option<cri::LinuxContainerResources>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct UpdatePodSandboxResourcesResponse {}

async fn update_pod_resources(
    daemon: &TestDaemon,
    id: &str,
    memory: i64,
) -> Result<(), tonic::Status> {
    let channel = podvisor_e2e::daemon::cri_channel(&daemon.socket()).await.unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let request = UpdatePodSandboxResourcesRequest {
        pod_sandbox_id: id.into(),
        overhead: None,
        resources: Some(cri::LinuxContainerResources {
            memory_limit_in_bytes: memory,
            ..Default::default()
        }),
    };
    let path = http::uri::PathAndQuery::from_static(
        "/runtime.v1.RuntimeService/UpdatePodSandboxResources",
    );
    grpc.unary::<_, UpdatePodSandboxResourcesResponse, _>(
        tonic::Request::new(request),
        path,
        tonic_prost::ProstCodec::default(),
    )
    .await
    .map(drop)
}

const CONFIG: &str = "[runtimes.tiny]\nvcpus = 1\nmemory_mib = 160\n";

/// (processors, MemTotal in KiB) as the container sees them.
async fn vm_shape(daemon: &TestDaemon, cid: &str) -> (usize, u64) {
    let out = daemon.exec(cid, &["cat", "/proc/cpuinfo", "/proc/meminfo"], 30).await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let cpus = text.lines().filter(|l| l.starts_with("processor")).count();
    let mem = text
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (cpus, mem)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handlers_select_vm_flavours_and_pods_get_the_vm_they_ask_for() {
    if !e2e_can_run() {
        return;
    }
    let registry = TestRegistry::start().unwrap();
    let image = registry.push_busybox("busybox:handlers").unwrap();
    let daemon = TestDaemon::start(CONFIG).await.unwrap();
    daemon.pull(&image).await;
    let log_dir = daemon.dir.path().join("pod-logs");

    let mut rt = daemon.runtime().await.unwrap();
    let status = rt.status(cri::StatusRequest { verbose: false }).await.unwrap().into_inner();
    let names: Vec<String> = status.runtime_handlers.into_iter().map(|h| h.name).collect();
    assert_eq!(names, ["", "tiny"]);

    let err = daemon.run_pod_sandbox(&pod_config("nowhere", &log_dir), "gvisor").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("\"tiny\""), "{err:?}");

    // kubelet's sandbox resources: the containers' limits (1.5 CPU, 448 MiB) ...
    let mut big_cfg = pod_config("big", &log_dir);
    let linux = big_cfg.linux.get_or_insert_with(Default::default);
    linux.resources = Some(cri::LinuxContainerResources {
        cpu_period: 100_000,
        cpu_quota: 150_000,
        memory_limit_in_bytes: 448 << 20,
        ..Default::default()
    });
    // ... and the RuntimeClass overhead (0.25 CPU, 64 MiB).
    linux.overhead = Some(cri::LinuxContainerResources {
        cpu_period: 100_000,
        cpu_quota: 25_000,
        memory_limit_in_bytes: 64 << 20,
        ..Default::default()
    });
    let tiny_cfg = pod_config("tiny", &log_dir);
    let (big, tiny) = tokio::join!(
        daemon.run_pod_sandbox(&big_cfg, ""),
        daemon.run_pod_sandbox(&tiny_cfg, "tiny")
    );
    let (big, tiny) = (
        big.unwrap_or_else(|e| panic!("{e}\n{}", daemon.log_tail())),
        tiny.unwrap_or_else(|e| panic!("{e}\n{}", daemon.log_tail())),
    );
    let sleeper = || container_config("c", &image, &["sleep", "3600"]);
    let big_c = daemon.create_and_start(&big, &big_cfg, sleeper()).await;
    let tiny_c = daemon.create_and_start(&tiny, &tiny_cfg, sleeper()).await;

    let (cpus, mem_kib) = vm_shape(&daemon, &big_c).await;
    assert_eq!(cpus, 2, "1.75 CPUs asked: a 2-vCPU VM");
    assert!(mem_kib >= 512 * 1024, "512 MiB asked, the guest has {mem_kib} KiB");
    let (cpus, mem_kib) = vm_shape(&daemon, &tiny_c).await;
    assert_eq!(cpus, 1);
    assert!(mem_kib < 160 * 1024, "the tiny handler's VM has {mem_kib} KiB");

    // A limit larger than the tiny VM is refused, naming the VM's size.
    let mut greedy = container_config("greedy", &image, &["sleep", "3600"]);
    greedy.linux = Some(cri::LinuxContainerConfig {
        resources: Some(cri::LinuxContainerResources {
            memory_limit_in_bytes: 256 << 20,
            ..Default::default()
        }),
        ..Default::default()
    });
    let err = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: tiny.clone(),
            config: Some(greedy),
            sandbox_config: Some(tiny_cfg.clone()),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("160 MiB"), "{err:?}");

    // In-place pod resize: within the VM it is accepted, beyond it refused (no hotplug).
    update_pod_resources(&daemon, &big, 256 << 20).await.unwrap();
    let err = update_pod_resources(&daemon, &big, 2 << 30).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("hotplug"), "{err:?}");

    // The handler is the pod's.
    let status = rt
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: tiny.clone(),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert_eq!(status.runtime_handler, "tiny");

    daemon.remove_pod(&big).await;
    daemon.remove_pod(&tiny).await;
    daemon.assert_nothing_left();

    // A log that is a file carries no terminal colour codes.
    let log = std::fs::read_to_string(daemon.log_file()).unwrap();
    assert!(log.contains("pod sandbox ready") && !log.contains('\x1b'), "{log}");
}

/// `log_format = "json"`: one JSON object per line, for log shippers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_log_has_one_object_per_line() {
    if !e2e_can_run() {
        return;
    }
    let daemon = TestDaemon::start("log_format = \"json\"\n").await.unwrap();
    let mut rt = daemon.runtime().await.unwrap();
    rt.version(cri::VersionRequest::default()).await.unwrap();
    let log = std::fs::read_to_string(daemon.log_file()).unwrap();
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty());
    for line in lines {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(value.get("level").is_some() && value.get("fields").is_some(), "{line}");
    }
}
