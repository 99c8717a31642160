//! End-to-end: the real daemon boots real guests (QEMU/TCG on machines without hardware
//! KVM), pulls from a real registry, and is driven by a tonic CRI client on its socket.

use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use podvisor_e2e::daemon::{container_config, e2e_can_run, pod_config, wait_for, TestDaemon};
use podvisor_e2e::registry::TestRegistry;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_runs_a_container_in_a_vm_end_to_end() {
    if !e2e_can_run() {
        return;
    }
    let registry = TestRegistry::start().unwrap();
    let image = registry.push_busybox("busybox:e2e").unwrap();
    let daemon = TestDaemon::start("").await.unwrap();
    let mut rt = daemon.runtime().await.unwrap();

    let version = rt.version(cri::VersionRequest::default()).await.unwrap().into_inner();
    assert_eq!(version.runtime_name, "podvisor");
    assert_eq!(version.runtime_api_version, "v1");
    let status = rt.status(cri::StatusRequest { verbose: true }).await.unwrap().into_inner();
    let conditions = status.status.unwrap().conditions;
    assert!(conditions.iter().any(|c| c.r#type == "RuntimeReady" && c.status));
    assert!(conditions.iter().any(|c| c.r#type == "NetworkReady"));

    daemon.pull(&image).await;

    let log_dir = daemon.dir.path().join("pod-logs");
    let started = Instant::now();
    let (pod, pod_cfg) = daemon.run_pod("web", &log_dir).await;
    eprintln!("RunPodSandbox took {:?}", started.elapsed());

    // QEMU runs under its own seccomp filter (-sandbox on).
    for (pid, cmd) in daemon.vm_processes().iter().filter(|(_, c)| c.contains("qemu-system")) {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        assert!(status.lines().any(|l| l == "Seccomp:\t2"), "{cmd} runs without seccomp");
    }

    // A second pod with the same name/namespace/attempt is refused.
    let dup = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(pod_cfg.clone()),
            runtime_handler: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(dup.code(), tonic::Code::AlreadyExists, "{dup}");

    // An unknown image is NotFound, naming the image.
    let missing = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(container_config("ghost", "127.0.0.1:1/nothing:here", &["true"])),
            sandbox_config: Some(pod_cfg.clone()),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound, "{missing}");
    assert!(missing.message().contains("nothing:here"), "{missing}");

    // The container ignores SIGTERM, so StopContainer must escalate to SIGKILL.
    let script =
        "trap '' TERM; echo hello-from-pod; echo to-stderr >&2; while true; do sleep 1; done";
    let cid = daemon
        .create_and_start(
            &pod,
            &pod_cfg,
            container_config("app", &image, &["/bin/sh", "-c", script]),
        )
        .await;
    let st = daemon.container_status(&cid).await;
    assert_eq!(st.state, cri::ContainerState::ContainerRunning as i32);
    assert!(st.started_at > 0);
    assert_eq!(st.log_path, log_dir.join("app.log").display().to_string());

    let out = daemon.exec(&cid, &["echo", "exec-ok"], 10).await.unwrap();
    assert_eq!(out.exit_code, 0);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "exec-ok\n");
    let out = daemon.exec(&cid, &["sh", "-c", "echo err >&2; exit 3"], 10).await.unwrap();
    assert_eq!(out.exit_code, 3);
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
    let timed_out = daemon.exec(&cid, &["sleep", "30"], 1).await.unwrap_err();
    assert_eq!(timed_out.code(), tonic::Code::DeadlineExceeded, "{timed_out}");
    // The guest clock follows the host's (the VM has no RTC under TCG).
    let out = daemon.exec(&cid, &["date", "+%s"], 10).await.unwrap();
    let guest_now: i64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    let host_now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
            as i64;
    assert!((guest_now - host_now).abs() < 120, "guest clock {guest_now} vs host {host_now}");
    // The pod's hostname is the VM's.
    let out = daemon.exec(&cid, &["hostname"], 10).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "web");
    // PID mode POD (the CRI default): the pod's own PID namespace, held by a pause process,
    // in which the agent is not visible.
    let out = daemon.exec(&cid, &["sh", "-c", "cat /proc/1/comm; cat /proc/[0-9]*/comm"], 10).await;
    let out = String::from_utf8_lossy(&out.unwrap().stdout).into_owned();
    assert!(out.starts_with("pause\n"), "{out}");
    assert!(!out.contains("podvisor"), "{out}");

    // The CRI log holds both streams in kubelet's format.
    let log = log_dir.join("app.log");
    let text = wait_for(Duration::from_secs(20), || {
        let log = log.clone();
        async move {
            let t = std::fs::read_to_string(&log).unwrap_or_default();
            (t.contains(" stdout F hello-from-pod") && t.contains(" stderr F to-stderr"))
                .then_some(t)
        }
    })
    .await
    .unwrap_or_else(|| panic!("log lines missing: {:?}", std::fs::read_to_string(&log)));
    let first = text.lines().next().unwrap();
    let ts = first.split(' ').next().unwrap();
    assert!(ts.contains('T') && ts.ends_with('Z'), "RFC3339Nano timestamp: {first}");

    let filtered = rt
        .list_containers(cri::ListContainersRequest {
            filter: Some(cri::ContainerFilter {
                pod_sandbox_id: pod.clone(),
                state: Some(cri::ContainerStateValue {
                    state: cri::ContainerState::ContainerRunning as i32,
                }),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .containers;
    assert_eq!(filtered.len(), 1);

    let stop_started = Instant::now();
    rt.stop_container(cri::StopContainerRequest { container_id: cid.clone(), timeout: 2 })
        .await
        .unwrap();
    let stop_took = stop_started.elapsed();
    assert!(
        stop_took >= Duration::from_secs(2),
        "SIGTERM was ignored, so stop must wait the timeout: {stop_took:?}"
    );
    let st = daemon.container_status(&cid).await;
    assert_eq!(st.state, cri::ContainerState::ContainerExited as i32);
    assert_eq!(st.exit_code, 137, "killed by SIGKILL");
    assert!(st.finished_at >= st.started_at);
    // Stopping again is fine.
    rt.stop_container(cri::StopContainerRequest { container_id: cid.clone(), timeout: 2 })
        .await
        .unwrap();

    // A container that exits by itself reports its code.
    let quick = daemon
        .create_and_start(
            &pod,
            &pod_cfg,
            container_config("quick", &image, &["/bin/sh", "-c", "exit 7"]),
        )
        .await;
    let code = wait_for(Duration::from_secs(20), || {
        let daemon = &daemon;
        let quick = quick.clone();
        async move {
            let st = daemon.container_status(&quick).await;
            (st.state == cri::ContainerState::ContainerExited as i32).then_some(st.exit_code)
        }
    })
    .await;
    assert_eq!(code, Some(7));

    rt.remove_container(cri::RemoveContainerRequest { container_id: cid.clone() }).await.unwrap();
    rt.remove_container(cri::RemoveContainerRequest { container_id: cid.clone() }).await.unwrap();
    let gone = rt
        .container_status(cri::ContainerStatusRequest { container_id: cid.clone(), verbose: false })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), tonic::Code::NotFound);

    daemon.remove_pod(&pod).await;
    // Idempotent, and unknown ids are not errors either.
    daemon.remove_pod(&pod).await;
    let pods = rt
        .list_pod_sandbox(cri::ListPodSandboxRequest::default())
        .await
        .unwrap()
        .into_inner()
        .items;
    assert!(pods.is_empty());
    daemon.assert_nothing_left();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pods_run_in_parallel() {
    if !e2e_can_run() {
        return;
    }
    let registry = TestRegistry::start().unwrap();
    let image = registry.push_busybox("busybox:par").unwrap();
    let daemon = TestDaemon::start("").await.unwrap();
    daemon.pull(&image).await;
    let log_dir = daemon.dir.path().join("logs");
    let ((a, a_cfg), (b, b_cfg)) =
        tokio::join!(daemon.run_pod("pod-a", &log_dir), daemon.run_pod("pod-b", &log_dir));
    assert_ne!(a, b);
    let cmd = ["/bin/sh", "-c", "echo up; sleep 3600"];
    let (ca, cb) = tokio::join!(
        daemon.create_and_start(&a, &a_cfg, container_config("c", &image, &cmd)),
        daemon.create_and_start(&b, &b_cfg, container_config("c", &image, &cmd))
    );
    // Each pod is its own VM: hostnames differ, and a file written in one is not in the other.
    let (ha, hb) =
        tokio::join!(daemon.exec(&ca, &["hostname"], 10), daemon.exec(&cb, &["hostname"], 10));
    assert_eq!(String::from_utf8_lossy(&ha.unwrap().stdout).trim(), "pod-a");
    assert_eq!(String::from_utf8_lossy(&hb.unwrap().stdout).trim(), "pod-b");
    daemon.exec(&ca, &["sh", "-c", "echo secret > /tmp/mark"], 10).await.unwrap();
    let other = daemon.exec(&cb, &["cat", "/tmp/mark"], 10).await.unwrap();
    assert_ne!(other.exit_code, 0);

    let mut rt = daemon.runtime().await.unwrap();
    let only_a = rt
        .list_pod_sandbox(cri::ListPodSandboxRequest {
            filter: Some(cri::PodSandboxFilter {
                label_selector: [("app".to_string(), "pod-a".to_string())].into_iter().collect(),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .items;
    assert_eq!(only_a.len(), 1);
    assert_eq!(only_a[0].id, a);

    tokio::join!(daemon.remove_pod(&a), daemon.remove_pod(&b));
    daemon.assert_nothing_left();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_restart_keeps_pods_running() {
    if !e2e_can_run() {
        return;
    }
    let registry = TestRegistry::start().unwrap();
    let image = registry.push_busybox("busybox:restart").unwrap();
    let mut daemon = TestDaemon::start("").await.unwrap();
    daemon.pull(&image).await;
    let log_dir = daemon.dir.path().join("logs");
    let (pod, pod_cfg) = daemon.run_pod("survivor", &log_dir).await;
    // Numbered lines, fast and long enough that some are in flight when the daemon dies.
    let script = "pad=$(printf '%01000d' 0); i=0; \
                  while true; do echo tick-$i-$pad; i=$((i+1)); sleep 0.02; done";
    let cid = daemon
        .create_and_start(
            &pod,
            &pod_cfg,
            container_config("ticker", &image, &["/bin/sh", "-c", script]),
        )
        .await;
    daemon.exec(&cid, &["sh", "-c", "echo kept > /tmp/state"], 10).await.unwrap();

    // A crash of the daemon does not take the pod down.
    daemon.kill();
    assert!(!daemon.vm_processes().is_empty(), "the VM outlives the daemon");
    daemon.restart().await.unwrap();

    let mut rt = daemon.runtime().await.unwrap();
    let pods = rt
        .list_pod_sandbox(cri::ListPodSandboxRequest::default())
        .await
        .unwrap()
        .into_inner()
        .items;
    assert_eq!(pods.len(), 1);
    assert_eq!(pods[0].state, cri::PodSandboxState::SandboxReady as i32);
    let st = daemon.container_status(&cid).await;
    assert_eq!(st.state, cri::ContainerState::ContainerRunning as i32);
    let out = daemon.exec(&cid, &["cat", "/tmp/state"], 10).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "kept\n");

    // Logging resumes after the restart.
    let log = log_dir.join("ticker.log");
    let before = std::fs::read_to_string(&log).unwrap_or_default().lines().count();
    let grew = wait_for(Duration::from_secs(60), || {
        let log = log.clone();
        async move {
            (std::fs::read_to_string(&log).unwrap_or_default().lines().count() > before + 20)
                .then_some(())
        }
    })
    .await;
    assert!(grew.is_some(), "log did not grow after restart:\n{}", daemon.log_tail());
    // Across the crash, no line was lost or written twice.
    let text = std::fs::read_to_string(&log).unwrap();
    let ticks: Vec<u64> = text
        .lines()
        .filter_map(|l| l.split(" stdout F tick-").nth(1))
        .map(|rest| rest.split('-').next().unwrap().parse().unwrap())
        .collect();
    assert!(ticks.len() > 10, "{} tick lines", ticks.len());
    let expected: Vec<u64> = (0..ticks.len() as u64).collect();
    if ticks != expected {
        let first_bad = ticks.iter().zip(&expected).position(|(a, b)| a != b);
        panic!("tick lines lost or repeated around index {first_bad:?}: {:?}", &ticks[..]);
    }

    daemon.remove_pod(&pod).await;
    daemon.assert_nothing_left();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors() {
    if !e2e_can_run() {
        return;
    }
    let daemon = TestDaemon::start("").await.unwrap();
    let mut rt = daemon.runtime().await.unwrap();
    fn code(r: Result<(), tonic::Status>) -> tonic::Code {
        match r {
            Ok(()) => tonic::Code::Ok,
            Err(e) => e.code(),
        }
    }
    assert_eq!(
        code(rt.run_pod_sandbox(cri::RunPodSandboxRequest::default()).await.map(|_| ())),
        tonic::Code::InvalidArgument
    );
    let mut no_name = pod_config("x", daemon.dir.path());
    no_name.metadata.as_mut().unwrap().name.clear();
    assert_eq!(
        code(
            rt.run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(no_name),
                ..Default::default()
            })
            .await
            .map(|_| ())
        ),
        tonic::Code::InvalidArgument
    );
    assert_eq!(
        code(
            rt.pod_sandbox_status(cri::PodSandboxStatusRequest {
                pod_sandbox_id: "nope".into(),
                verbose: false
            })
            .await
            .map(|_| ())
        ),
        tonic::Code::NotFound
    );
    assert_eq!(
        code(
            rt.container_status(cri::ContainerStatusRequest {
                container_id: "nope".into(),
                verbose: false
            })
            .await
            .map(|_| ())
        ),
        tonic::Code::NotFound
    );
    assert_eq!(
        code(
            rt.start_container(cri::StartContainerRequest { container_id: "nope".into() })
                .await
                .map(|_| ())
        ),
        tonic::Code::NotFound
    );
    assert_eq!(
        code(
            rt.create_container(cri::CreateContainerRequest {
                pod_sandbox_id: "nope".into(),
                config: Some(container_config("c", "busybox", &["true"])),
                sandbox_config: None
            })
            .await
            .map(|_| ())
        ),
        tonic::Code::NotFound
    );
    // Mount fields a VM sandbox cannot honour (an unknown propagation) are refused by name
    // (the translation runs before the pod is looked up; devices: tests/tests/volumes.rs).
    let mut shared = container_config("c", "busybox", &["true"]);
    shared.mounts = vec![cri::Mount {
        container_path: "/data".into(),
        host_path: "/tmp".into(),
        propagation: 7,
        ..Default::default()
    }];
    for (config, field) in [(shared, "config.mounts[0].propagation")] {
        let err = rt
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: "nope".into(),
                config: Some(config),
                sandbox_config: None,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(err.message().starts_with(field), "{err:?}");
    }
    // Stopping and removing what does not exist is not an error (kubelet retries these).
    assert_eq!(
        code(
            rt.stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id: "nope".into() })
                .await
                .map(|_| ())
        ),
        tonic::Code::Ok
    );
    assert_eq!(
        code(
            rt.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: "nope".into() })
                .await
                .map(|_| ())
        ),
        tonic::Code::Ok
    );
    assert_eq!(
        code(
            rt.stop_container(cri::StopContainerRequest {
                container_id: "nope".into(),
                timeout: 1
            })
            .await
            .map(|_| ())
        ),
        tonic::Code::Ok
    );
    assert_eq!(
        code(
            rt.remove_container(cri::RemoveContainerRequest { container_id: "nope".into() })
                .await
                .map(|_| ())
        ),
        tonic::Code::Ok
    );
    assert_eq!(
        code(
            rt.exec_sync(cri::ExecSyncRequest {
                container_id: "nope".into(),
                cmd: vec!["true".into()],
                timeout: 1
            })
            .await
            .map(|_| ())
        ),
        tonic::Code::NotFound
    );
    // The daemon is still serving.
    rt.version(cri::VersionRequest::default()).await.unwrap();
}
