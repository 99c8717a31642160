//! End-to-end with the built-in VMM (`hypervisor = "builtin"`): the daemon boots the guest
//! kernel with `podvisor vmm` (jailed, under seccomp), the agent answers over the VMM's
//! hybrid vsock, and a container from the test registry runs, logs and execs.
//!
//! Where KVM cannot boot Linux (no VMX/SVM, e.g. nested PVM) the pod part is skipped with the
//! reason `podvisor check` gives; what still runs there is the failure path: the guest dies
//! during boot, and RunPodSandbox must say so promptly and leave nothing behind.

use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use podvisor_e2e::daemon::{
    container_config, e2e_can_run, kvm_can_boot_linux, wait_for, TestDaemon,
};
use podvisor_e2e::registry::TestRegistry;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builtin_vmm_runs_a_pod_or_fails_cleanly_where_kvm_cannot_boot_linux() {
    if !e2e_can_run() {
        return;
    }
    if !std::path::Path::new("/dev/kvm").exists() {
        println!("SKIP: the built-in VMM needs /dev/kvm");
        return;
    }
    let daemon = TestDaemon::start("hypervisor = \"builtin\"\n").await.unwrap();
    match kvm_can_boot_linux() {
        Ok(()) => runs_a_pod(&daemon).await,
        Err(reason) => {
            println!("SKIP: the built-in VMM cannot boot a pod here: {reason}");
            fails_cleanly(&daemon).await;
        }
    }
    daemon.assert_nothing_left();
}

/// Where the guest kernel dies during boot: a prompt Unavailable that says the VM exited and
/// shows the console, and no VMM, virtiofsd, socket, mount or record left.
async fn fails_cleanly(daemon: &TestDaemon) {
    let log_dir = daemon.dir.path().join("pod-logs");
    let mut rt = daemon.runtime().await.unwrap();
    let started = Instant::now();
    let err = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(podvisor_e2e::daemon::pod_config("doomed", &log_dir)),
            runtime_handler: String::new(),
        })
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    assert!(err.message().contains("VM exited"), "{err}");
    assert!(err.message().contains("guest console ends with"), "{err}");
    // Reported when the VMM exits, not at the 60 s boot timeout.
    assert!(took < Duration::from_secs(55), "took {took:?}: {err}");
    let pods = rt
        .list_pod_sandbox(cri::ListPodSandboxRequest::default())
        .await
        .unwrap()
        .into_inner()
        .items;
    assert!(pods.is_empty(), "{pods:?}");
}

/// Where KVM boots Linux: the same pod flow as the QEMU end-to-end test, on the built-in VMM.
async fn runs_a_pod(daemon: &TestDaemon) {
    let registry = TestRegistry::start().unwrap();
    let image = registry.push_busybox("busybox:builtin").unwrap();
    let mut rt = daemon.runtime().await.unwrap();
    let status = rt.status(cri::StatusRequest { verbose: true }).await.unwrap().into_inner();
    let info = status.info.values().cloned().collect::<Vec<_>>().join(" ");
    assert!(info.contains("builtin"), "Status info names the backend: {info}");
    daemon.pull(&image).await;

    let log_dir = daemon.dir.path().join("pod-logs");
    let (pod, pod_cfg) = daemon.run_pod("native", &log_dir).await;
    // The VMM runs jailed: unprivileged, under a uid of its own.
    let vmm = daemon
        .vm_processes()
        .into_iter()
        .find(|(_, cmd)| cmd.contains(" vmm "))
        .expect("a podvisor vmm process");
    let proc_status = std::fs::read_to_string(format!("/proc/{}/status", vmm.0)).unwrap();
    let uid = proc_status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(!uid.split_whitespace().skip(1).any(|id| id == "0"), "{uid}");

    let cid = daemon
        .create_and_start(
            &pod,
            &pod_cfg,
            container_config("app", &image, &["/bin/sh", "-c", "echo hello-builtin; sleep 600"]),
        )
        .await;
    let out = daemon.exec(&cid, &["echo", "exec-ok"], 10).await.unwrap();
    assert_eq!((out.exit_code, String::from_utf8_lossy(&out.stdout).as_ref()), (0, "exec-ok\n"));
    let log = log_dir.join("app.log");
    wait_for(Duration::from_secs(20), || {
        let log = log.clone();
        async move {
            std::fs::read_to_string(&log).ok().filter(|t| t.contains(" stdout F hello-builtin"))
        }
    })
    .await
    .unwrap_or_else(|| panic!("log line missing: {:?}", std::fs::read_to_string(&log)));
    rt.stop_container(cri::StopContainerRequest { container_id: cid.clone(), timeout: 2 })
        .await
        .unwrap();
    rt.remove_container(cri::RemoveContainerRequest { container_id: cid }).await.unwrap();
    daemon.remove_pod(&pod).await;
    // The pod's template (on by default) builds once it booted; its VM goes when it is built.
    daemon.wait_for_template_builds(Duration::from_secs(180)).await;
}
