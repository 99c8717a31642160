//! End-to-end crash consistency: a workload (PullImage, RunPodSandbox, CreateContainer,
//! StartContainer, ExecSync, StopPodSandbox, RemovePodSandbox) runs against the real daemon
//! with real guests and a real CNI network, and the daemon is killed with SIGKILL at random
//! points of it. After each restart:
//! - every listed pod is Ready and working (ExecSync in each running container, the agent
//!   answers), or it is the pod the workload was stopping, NotReady and removable
//!   (RemovePodSandbox succeeds: a killed stop or remove is finished by the caller's retry, as
//!   kubelet's does); a killed RunPodSandbox leaves no pod;
//! - nothing is leaked: no VM process (QEMU, vhost-user helpers, console copier) naming a pod
//!   not listed, no mount under the daemon's directories outside a listed pod's, no VM run
//!   directory, pod state directory, netns pin or record directory of an unlisted pod, no CNI
//!   lease beyond one per listed pod, and no log writer (an open fd of the daemon on a
//!   container log) other than running containers'.
//!
//! Then the daemon is killed at each of three points inside RemovePodSandbox, which random
//! points rarely hit: a debug daemon holds the call where `<state>/test-hold` says (a
//! test-only hook, compiled out of release builds), and the same invariants are checked.
//!
//! `PODVISOR_CRASH_SEED` replays a run (the seed is printed), `PODVISOR_CRASH_ROUNDS` sets how
//! many kills (20 by default; `make soak` runs 100).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use podvisor_e2e::cni::TestNetwork;
use podvisor_e2e::daemon::{
    container_config, cri_channel, e2e_can_run, pod_config, processes_matching, TestDaemon,
};
use podvisor_e2e::registry::TestRegistry;
use tonic::transport::Channel;

/// A small deterministic generator (xorshift64*), so a seed replays a run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// One round's work, on clients of its own (the daemon dies under it).
async fn workload(
    socket: PathBuf,
    image: String,
    name: String,
    logs: PathBuf,
    to_remove: Option<String>,
) -> Result<(), String> {
    let channel = cri_channel(&socket).await.map_err(|e| e.to_string())?;
    let mut rt = RuntimeServiceClient::new(channel.clone());
    let mut images = k8s_cri::v1::image_service_client::ImageServiceClient::new(channel);
    let err = |what: &'static str| move |e: tonic::Status| format!("{what}: {e}");
    images
        .pull_image(cri::PullImageRequest {
            image: Some(cri::ImageSpec { image: image.clone(), ..Default::default() }),
            ..Default::default()
        })
        .await
        .map_err(err("PullImage"))?;
    let config = pod_config(&name, &logs.join(&name));
    let pod = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: String::new(),
        })
        .await
        .map_err(err("RunPodSandbox"))?
        .into_inner()
        .pod_sandbox_id;
    let cid = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(container_config("c", &image, &["sh", "-c", "echo up; sleep 1000"])),
            sandbox_config: Some(config),
        })
        .await
        .map_err(err("CreateContainer"))?
        .into_inner()
        .container_id;
    rt.start_container(cri::StartContainerRequest { container_id: cid.clone() })
        .await
        .map_err(err("StartContainer"))?;
    rt.exec_sync(cri::ExecSyncRequest {
        container_id: cid,
        cmd: vec!["echo".into(), "ok".into()],
        timeout: 30,
    })
    .await
    .map_err(err("ExecSync"))?;
    if let Some(old) = to_remove {
        rt.stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id: old.clone() })
            .await
            .map_err(err("StopPodSandbox"))?;
        rt.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: old })
            .await
            .map_err(err("RemovePodSandbox"))?;
    }
    Ok(())
}

/// The daemon's pid (the harness's child), found by its config file.
fn daemon_pid(daemon: &TestDaemon) -> i32 {
    let needle = format!("--config {}", daemon.dir.path().join("config.toml").display());
    processes_matching(&needle)
        .into_iter()
        .find(|(_, cmd)| cmd.contains(" daemon "))
        .map(|(pid, _)| pid)
        .expect("the daemon runs")
}

/// Paths the daemon holds open below `dir`.
fn open_files_under(pid: i32, dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter(|p| p.starts_with(dir))
        .collect()
}

fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// Checks the invariants of the module's documentation; removes NotReady pods. Returns the
/// pods left (all Ready and working).
async fn check_after_restart(
    daemon: &TestDaemon,
    rt: &mut RuntimeServiceClient<Channel>,
    net: &TestNetwork,
    logs: &Path,
    being_removed: Option<&str>,
) -> Vec<String> {
    let pods = rt.list_pod_sandbox(cri::ListPodSandboxRequest::default()).await.unwrap();
    let mut live = Vec::new();
    for pod in pods.into_inner().items {
        if pod.state == cri::PodSandboxState::SandboxReady as i32 {
            live.push(pod.id);
        } else {
            // Only a pod the workload was stopping may be left NotReady: an interrupted
            // RunPodSandbox must be undone, not listed.
            assert_eq!(Some(pod.id.as_str()), being_removed, "a NotReady pod was left");
            rt.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: pod.id.clone() })
                .await
                .unwrap_or_else(|e| panic!("removing NotReady pod {}: {e}", pod.id));
        }
    }
    let containers = rt
        .list_containers(cri::ListContainersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .containers;
    let mut running_logs = HashSet::new();
    for pod in &live {
        // The agent answers.
        daemon.agent_figures(pod).await;
        for c in containers.iter().filter(|c| &c.pod_sandbox_id == pod) {
            if c.state != cri::ContainerState::ContainerRunning as i32 {
                continue;
            }
            let out = match daemon.exec(&c.id, &["echo", "alive"], 30).await {
                Ok(out) => out,
                // A StopPodSandbox killed after the agent stopped the container but before
                // its record said so: the restarted daemon's exit watcher records the exit
                // from the agent moments later.
                Err(e) if e.code() == tonic::Code::FailedPrecondition => {
                    assert!(
                        exits_soon(daemon, &c.id).await,
                        "ExecSync in {}: {e}, and it stays listed running",
                        c.id
                    );
                    continue;
                }
                Err(e) => panic!("ExecSync in {}: {e}", c.id),
            };
            assert_eq!(out.stdout, b"alive\n");
            running_logs.insert(PathBuf::from(daemon.container_status(&c.id).await.log_path));
        }
    }
    assert!(containers.iter().all(|c| live.contains(&c.pod_sandbox_id)), "orphan containers");

    let owned = |name: &str| live.iter().any(|id| id.starts_with(name) || name.contains(id));
    let state = daemon.state();
    for d in ["vms", "sandboxes", "netns"] {
        for name in entries(&state.join(d)) {
            assert!(owned(&name), "leaked {d}/{name}; pods {live:?}");
        }
    }
    for name in entries(&daemon.root().join("sandboxes")) {
        assert!(owned(&name), "leaked record directory {name}");
    }
    for (pid, cmd) in daemon.vm_processes() {
        assert!(
            live.iter().any(|id| cmd.contains(&id[..16])),
            "leaked VM process {pid}: {cmd}; pods {live:?}"
        );
    }
    for m in daemon.mounts() {
        assert!(live.iter().any(|id| m.contains(id.as_str())), "leaked mount {m}");
    }
    let leases = net.allocations();
    assert!(leases.len() <= live.len(), "leaked CNI leases {leases:?} for pods {live:?}");
    // Log writers: only running containers' logs are open, each once. A container that
    // exited just now (see the ExecSync above) may still have its writer draining the last
    // output: it must close within seconds, or it leaked.
    let deadline = Instant::now() + Duration::from_secs(10);
    let open_logs = loop {
        let open_logs = open_files_under(daemon_pid(daemon), logs);
        let only_running = open_logs.iter().all(|p| running_logs.contains(p))
            && open_logs.len() <= running_logs.len();
        if only_running || Instant::now() > deadline {
            break open_logs;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        open_logs.iter().all(|p| running_logs.contains(p)) && open_logs.len() <= running_logs.len(),
        "log writers {open_logs:?} for running containers' logs {running_logs:?}"
    );
    live
}

/// Points of RemovePodSandbox a debug daemon can be held at (`<state>/test-hold`, see
/// `SandboxManager::test_hold`): with the VM stopped but its shares and network still there,
/// with the pod stopped, and with its records removed but its state directory not.
const REMOVE_POINTS: [&str; 3] =
    ["teardown:vm-stopped", "remove-sandbox:stopped", "remove-sandbox:records-removed"];

/// Starts a pod, holds its RemovePodSandbox at `point`, kills the daemon there and checks the
/// invariants after the restart: the pod is gone, or listed NotReady and removable.
async fn kill_inside_remove(
    daemon: &mut TestDaemon,
    image: &str,
    net: &TestNetwork,
    logs: &Path,
    point: &str,
) -> Vec<String> {
    let name = format!("hold-{}", point.replace(':', "-"));
    workload(daemon.socket(), image.into(), name.clone(), logs.into(), None)
        .await
        .unwrap_or_else(|e| panic!("starting the pod for {point}: {e}"));
    let mut rt = daemon.runtime().await.unwrap();
    let pods = rt.list_pod_sandbox(cri::ListPodSandboxRequest::default()).await.unwrap();
    let pod = pods
        .into_inner()
        .items
        .into_iter()
        .find(|p| p.metadata.as_ref().is_some_and(|m| m.name == name))
        .expect("the pod is listed")
        .id;
    let marker = format!("test hold: {point}");
    let holds =
        || std::fs::read_to_string(daemon.log_file()).unwrap_or_default().matches(&marker).count();
    let before = holds();
    let hold = daemon.state().join("test-hold");
    std::fs::write(&hold, point).unwrap();
    let remove = tokio::spawn({
        let mut rt = rt.clone();
        let pod = pod.clone();
        async move { rt.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: pod }).await }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    while holds() == before {
        assert!(Instant::now() < deadline, "RemovePodSandbox never reached {point}");
        assert!(!remove.is_finished(), "RemovePodSandbox finished without reaching {point}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    daemon.kill();
    let _ = remove.await;
    std::fs::remove_file(&hold).unwrap();
    daemon.restart().await.unwrap();
    let mut rt = daemon.runtime().await.unwrap();
    let live = check_after_restart(daemon, &mut rt, net, logs, Some(&pod)).await;
    assert!(
        !live.contains(&pod),
        "pod {pod} killed in RemovePodSandbox at {point} is listed Ready"
    );
    eprintln!(
        "SIGKILL inside RemovePodSandbox at {point}: pod gone after the restart, nothing leaked"
    );
    live
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_points_leaves_every_pod_working_or_gone_and_nothing_leaked() {
    if !e2e_can_run() {
        return;
    }
    let seed = env_or(
        "PODVISOR_CRASH_SEED",
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
            as u64
            | 1,
    );
    let rounds: u32 = env_or("PODVISOR_CRASH_ROUNDS", 20);
    eprintln!("crash test: PODVISOR_CRASH_SEED={seed} PODVISOR_CRASH_ROUNDS={rounds}");
    let mut rng = Rng(seed);

    let registry = TestRegistry::start().unwrap();
    let image = registry.push_busybox("busybox:crash").unwrap();
    let scratch = tempfile::tempdir_in("/var/tmp").unwrap();
    let net = TestNetwork::new(scratch.path(), "podvisor-crash", "pvcrash0", "10.213.9");
    net.write_config();
    let mut daemon = TestDaemon::start(&net.daemon_config()).await.unwrap();
    let logs = daemon.dir.path().join("logs");
    let started = Instant::now();
    let mut live: Vec<String> = Vec::new();
    for round in 0..rounds {
        // Keep a few pods: from the third on, each round also removes the oldest.
        let to_remove = (live.len() >= 2).then(|| live[0].clone());
        let task = tokio::spawn(workload(
            daemon.socket(),
            image.clone(),
            format!("p{round}"),
            logs.clone(),
            to_remove.clone(),
        ));
        let kill_after = Duration::from_millis(rng.below(6000));
        tokio::time::sleep(kill_after).await;
        let finished = task.is_finished();
        daemon.kill();
        let outcome = task.await.unwrap();
        eprintln!(
            "round {round}: SIGKILL after {kill_after:?} ({})",
            match (&outcome, finished) {
                (Ok(()), true) => "workload had finished".to_string(),
                (Ok(()), false) => "workload finishing".to_string(),
                (Err(e), _) => format!("interrupted at {}", e.split(':').next().unwrap_or(e)),
            }
        );
        daemon.restart().await.unwrap();
        let mut rt = daemon.runtime().await.unwrap();
        live = check_after_restart(&daemon, &mut rt, &net, &logs, to_remove.as_deref()).await;
    }
    // Random points rarely land inside RemovePodSandbox: kill it at each of its points too.
    for point in REMOVE_POINTS {
        live = kill_inside_remove(&mut daemon, &image, &net, &logs, point).await;
    }
    let log = std::fs::read_to_string(daemon.log_file()).unwrap_or_default();
    eprintln!(
        "{rounds} kills in {:.0?}; {} pods left; the restarts undid {} interrupted starts and \
         swept {} leftovers",
        started.elapsed(),
        live.len(),
        log.matches("undid a pod start").count(),
        log.matches("no record owns").count() + log.matches("half-removed").count(),
    );
    for pod in &live {
        daemon.remove_pod(pod).await;
    }
    daemon.assert_nothing_left();
    assert!(net.allocations().is_empty(), "CNI leases left: {:?}", net.allocations());
    assert!(net.bridge_ports().is_empty(), "bridge ports left: {:?}", net.bridge_ports());
}

/// Whether container `id` is reported exited within 10 s.
async fn exits_soon(daemon: &TestDaemon, id: &str) -> bool {
    for _ in 0..100 {
        if daemon.container_status(id).await.state == cri::ContainerState::ContainerExited as i32 {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    false
}
