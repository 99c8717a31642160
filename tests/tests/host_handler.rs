//! The `host` RuntimeClass handler: pods whose containers the real agent runs on the host
//! itself (no VM), from a real image pulled from the test registry. A hostNetwork pod sees the
//! host's interfaces (a veth pair the test creates), a pod with its own network namespace
//! (CNI bridge) does not; ExecSync, logs, streaming exec, port-forward and stats work; VM handlers refuse host namespaces
//! unless `route_host_namespace_pods` sends such pods to the host handler; a daemon restart
//! keeps the pods (same agent process), an agent killed with SIGKILL makes its pod NotReady,
//! and stop/remove leave no agent, mount, cgroup (so no container process) or directory
//! behind.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use k8s_cri::v1 as cri;
use podvisor_e2e::cni::TestNetwork;
use podvisor_e2e::daemon::{
    container_config, e2e_can_run, guest_agent, pod_config, processes_matching, wait_for,
    TestDaemon,
};
use podvisor_e2e::registry::TestRegistry;
use podvisor_e2e::streaming::{Channels, PortForward, RemoteCommand};

/// A link only the host's network namespace has (one end of a veth pair: the `dummy` module
/// may be missing).
const DUMMY: &str = "pvhh-veth0";

/// Removes the link however the test ends.
struct DummyLink;

impl DummyLink {
    fn create() -> Self {
        let _ = Command::new("ip").args(["link", "del", DUMMY]).stderr(Stdio::null()).status();
        let ok = Command::new("ip")
            .args(["link", "add", DUMMY, "type", "veth", "peer", "name", "pvhh-veth1"])
            .status();
        assert!(ok.is_ok_and(|s| s.success()), "ip link add {DUMMY} type veth failed");
        DummyLink
    }
}

impl Drop for DummyLink {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", DUMMY]).status();
    }
}

fn config(network: &TestNetwork, route: bool) -> String {
    let route = if route { "route_host_namespace_pods = \"host\"\n" } else { "" };
    format!(
        "{route}{}[host]\nagent = {:?}\n[runtimes.host]\nhypervisor = \"host\"\n",
        network.daemon_config(),
        guest_agent()
    )
}

fn host_network(mut config: cri::PodSandboxConfig) -> cri::PodSandboxConfig {
    config.linux = Some(cri::LinuxPodSandboxConfig {
        security_context: Some(cri::LinuxSandboxSecurityContext {
            namespace_options: Some(cri::NamespaceOption {
                network: cri::NamespaceMode::Node as i32,
                pid: cri::NamespaceMode::Pod as i32,
                ipc: cri::NamespaceMode::Pod as i32,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    });
    config
}

/// The host agents' own logs (in their run directories), for failure messages.
fn agent_logs(daemon: &TestDaemon) -> String {
    let vms = daemon.state().join("vms");
    let mut text = String::new();
    for entry in std::fs::read_dir(vms).into_iter().flatten().flatten() {
        let log = std::fs::read_to_string(entry.path().join("agent.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        text += &format!(
            "--- {}:\n{}\n",
            entry.path().display(),
            lines[lines.len().saturating_sub(20)..].join("\n")
        );
    }
    text
}

/// CreateContainer + StartContainer, failing with the agents' logs.
async fn start(
    daemon: &TestDaemon,
    pod: &str,
    pod_config: &cri::PodSandboxConfig,
    config: cri::ContainerConfig,
) -> String {
    let mut rt = daemon.runtime().await.unwrap();
    let created = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.into(),
            config: Some(config),
            sandbox_config: Some(pod_config.clone()),
        })
        .await;
    let id = match created {
        Ok(r) => r.into_inner().container_id,
        Err(e) => panic!("CreateContainer: {e}\n{}", agent_logs(daemon)),
    };
    if let Err(e) =
        rt.start_container(cri::StartContainerRequest { container_id: id.clone() }).await
    {
        panic!("StartContainer: {e}\n{}", agent_logs(daemon));
    }
    id
}

async fn exec_out(daemon: &TestDaemon, cid: &str, cmd: &[&str]) -> String {
    let out = daemon
        .exec(cid, cmd, 30)
        .await
        .unwrap_or_else(|e| panic!("exec {cmd:?}: {e}\n{}", daemon.log_tail()));
    assert_eq!(out.exit_code, 0, "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `sh -c script` in `cid`, which must succeed.
async fn ok_exec(daemon: &TestDaemon, cid: &str, script: &str) {
    let out = daemon.exec(cid, &["sh", "-c", script], 30).await.unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.exit_code, 0, "{script}: {err}");
}

async fn pod_status(daemon: &TestDaemon, id: &str) -> cri::PodSandboxStatus {
    let mut rt = daemon.runtime().await.unwrap();
    rt.pod_sandbox_status(cri::PodSandboxStatusRequest {
        pod_sandbox_id: id.into(),
        verbose: false,
    })
    .await
    .unwrap()
    .into_inner()
    .status
    .unwrap()
}

/// The agents of this daemon's host pods (their command lines name its state directory).
fn agents(daemon: &TestDaemon) -> Vec<(i32, String)> {
    processes_matching(&daemon.state().display().to_string())
        .into_iter()
        .filter(|(_, cmd)| cmd.contains("--pod-cgroup"))
        .collect()
}

/// The cgroup2 mount (hybrid hosts have it at /sys/fs/cgroup/unified).
fn host_pod_cgroups() -> Vec<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let root = mountinfo
        .lines()
        .find_map(|l| {
            let (fields, fs) = l.split_once(" - ")?;
            fs.starts_with("cgroup2 ").then(|| fields.split(' ').nth(4).map(PathBuf::from))?
        })
        .expect("a cgroup2 mount");
    std::fs::read_dir(root.join("podvisor-host"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect()
}

async fn log_contains(path: &Path, needle: &str) -> bool {
    wait_for(Duration::from_secs(10), || async {
        std::fs::read_to_string(path).ok().filter(|t| t.contains(needle)).map(|_| ())
    })
    .await
    .is_some()
}

/// Streaming exec (SPDY): stdin in, stdout out, the exit code on the error channel.
async fn streaming_exec(daemon: &TestDaemon, cid: &str) {
    let channels = Channels { stdin: true, stdout: true, stderr: true, tty: false };
    let mut rt = daemon.runtime().await.unwrap();
    let url = rt
        .exec(cri::ExecRequest {
            container_id: cid.into(),
            cmd: ["sh", "-c", "read line; echo got:$line; exit 3"].map(String::from).to_vec(),
            tty: false,
            stdin: true,
            stdout: true,
            stderr: true,
        })
        .await
        .unwrap()
        .into_inner()
        .url;
    let session = RemoteCommand::connect(&url, channels).await.unwrap();
    let stdin = session.stdin.clone().unwrap();
    stdin.write(b"hello\n").await.unwrap();
    stdin.close().await.unwrap();
    let done = session.finish(Duration::from_secs(30)).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&done.stdout), "got:hello\n");
    assert_eq!(done.exit_code(), Some(3), "status {}", done.status);
}

/// Port-forward reaches `localhost:8080` in the pod's own network namespace (an echo server
/// there), through the agent's port-forward socket.
async fn forward_through(
    daemon: &TestDaemon,
    pod: &str,
    pod_cfg: &cri::PodSandboxConfig,
    image: &str,
) {
    let server = container_config("echo", image, &["nc", "-ll", "-p", "8080", "-e", "cat"]);
    start(daemon, pod, pod_cfg, server).await;
    let mut rt = daemon.runtime().await.unwrap();
    let url = rt
        .port_forward(cri::PortForwardRequest { pod_sandbox_id: pod.into(), port: vec![] })
        .await
        .unwrap()
        .into_inner()
        .url;
    let mut forward = PortForward::connect(&url).await.unwrap();
    let payload: Vec<u8> = (0..256 * 1024u32).map(|i| (i.wrapping_mul(31) >> 3) as u8).collect();
    let mut echoed = Vec::new();
    // The server may still be starting; a refused connection ends at once.
    for _ in 0..50 {
        echoed = forward.round_trip(8080, &payload).await.unwrap_or_default();
        if !echoed.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(echoed == payload, "{} bytes came back through port-forward", echoed.len());
    forward.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_handler_pods_run_on_the_host_and_leave_nothing_behind() {
    if !e2e_can_run() {
        return;
    }
    let registry = TestRegistry::start().unwrap();
    let image = registry.push_busybox("busybox:host-handler").unwrap();
    let _dummy = DummyLink::create();
    let scratch = tempfile::tempdir().unwrap();
    let network = TestNetwork::new(scratch.path(), "hosthandler", "pvhh0", "10.213.61");
    network.write_config();
    let mut daemon = TestDaemon::start(&config(&network, false)).await.unwrap();
    daemon.pull(&image).await;
    let log_dir = daemon.dir.path().join("pod-logs");
    let before = host_pod_cgroups();

    let mut rt = daemon.runtime().await.unwrap();
    let status = rt.status(cri::StatusRequest { verbose: false }).await.unwrap().into_inner();
    let names: Vec<String> = status.runtime_handlers.into_iter().map(|h| h.name).collect();
    assert_eq!(names, ["", "host"]);
    let verbose = rt.status(cri::StatusRequest { verbose: true }).await.unwrap().into_inner();
    let backends: serde_json::Value =
        serde_json::from_str(&verbose.info["runtimeHandlerBackends"]).unwrap();
    assert_eq!(backends["host"], "host", "{backends}");
    assert_eq!(backends[""], "qemu", "{backends}");

    // A VM handler refuses the host's namespaces, naming the field and the way out.
    let hostnet_cfg = host_network(pod_config("hostnet", &log_dir));
    let err = daemon.run_pod_sandbox(&hostnet_cfg, "").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("namespace_options.network"), "{err:?}");
    assert!(err.message().contains("host"), "{err:?}");

    let hostnet = daemon
        .run_pod_sandbox(&hostnet_cfg, "host")
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", daemon.log_tail()));
    let own_cfg = pod_config("ownnet", &log_dir);
    let own = daemon
        .run_pod_sandbox(&own_cfg, "host")
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", daemon.log_tail()));
    let talker = |name: &str| {
        container_config(name, &image, &["sh", "-c", "echo hello from the host; exec sleep 3600"])
    };
    let hostnet_c = start(&daemon, &hostnet, &hostnet_cfg, talker("h")).await;
    let own_c = start(&daemon, &own, &own_cfg, talker("o")).await;

    // hostNetwork sees the host's links; its own namespace has CNI's eth0 and loopback only.
    let links = exec_out(&daemon, &hostnet_c, &["cat", "/proc/net/dev"]).await;
    assert!(links.contains(DUMMY), "the hostNetwork pod does not see {DUMMY}:\n{links}");
    let links = exec_out(&daemon, &own_c, &["cat", "/proc/net/dev"]).await;
    assert!(!links.contains(DUMMY) && links.contains("eth0"), "own netns:\n{links}");
    let own_ip = pod_status(&daemon, &own).await.network.map(|n| n.ip).unwrap_or_default();
    assert!(own_ip.starts_with("10.213.61."), "pod IP {own_ip:?}");
    assert_eq!(exec_out(&daemon, &own_c, &["hostname"]).await.trim(), "ownnet");
    // Not a VM: the container's kernel is the host's.
    let host_kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let seen = exec_out(&daemon, &hostnet_c, &["cat", "/proc/sys/kernel/osrelease"]).await;
    assert_eq!(seen, host_kernel);
    for (c, log) in [(&hostnet_c, "h.log"), (&own_c, "o.log")] {
        assert!(
            log_contains(&log_dir.join(log), "hello from the host").await,
            "log of {c}: {:?}",
            std::fs::read_to_string(log_dir.join(log))
        );
    }
    // Limits need cgroup2 controllers a hybrid host does not have: the container still runs.
    let mut limited = container_config("limited", &image, &["sleep", "3600"]);
    limited.linux = Some(cri::LinuxContainerConfig {
        resources: Some(cri::LinuxContainerResources {
            memory_limit_in_bytes: 64 << 20,
            cpu_quota: 50_000,
            cpu_period: 100_000,
            ..Default::default()
        }),
        ..Default::default()
    });
    let limited = start(&daemon, &own, &own_cfg, limited).await;
    assert_eq!(exec_out(&daemon, &limited, &["echo", "limited"]).await, "limited\n");
    // The device cgroup: host device nodes the container makes (CAP_MKNOD is a default
    // capability) cannot be opened (fuse and loop0 need no other capability, unlike kmsg);
    // the standard devices can.
    ok_exec(
        &daemon,
        &limited,
        ": > /dev/null && mknod /tmp/fuse c 10 229 && mknod /tmp/loop b 7 0",
    )
    .await;
    for node in ["/tmp/fuse", "/tmp/loop"] {
        let script = format!(": < {node}");
        let out = daemon.exec(&limited, &["sh", "-c", &script], 30).await.unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.exit_code != 0 && err.contains("Operation not permitted"), "{node}: {err}");
    }
    forward_through(&daemon, &own, &own_cfg, &image).await;
    streaming_exec(&daemon, &hostnet_c).await;
    // Stats are best effort on a hybrid host (no memory controller on cgroup2): printed.
    let mut rt = daemon.runtime().await.unwrap();
    let stats = rt
        .container_stats(cri::ContainerStatsRequest { container_id: own_c.clone() })
        .await
        .unwrap_or_else(|e| panic!("ContainerStats: {e}\n{}", daemon.log_tail()))
        .into_inner()
        .stats
        .unwrap();
    println!(
        "host pod container stats: cpu {:?} ns, memory working set {:?} bytes",
        stats.cpu.and_then(|c| c.usage_core_nano_seconds).map(|v| v.value),
        stats.memory.and_then(|m| m.working_set_bytes).map(|v| v.value)
    );
    let pids_before: Vec<i32> = agents(&daemon).into_iter().map(|(pid, _)| pid).collect();
    assert_eq!(pids_before.len(), 2, "{:?}", agents(&daemon));

    // A restart (now routing host-namespace pods) keeps both pods on the same agents.
    daemon.extra_config = config(&network, true);
    daemon.restart().await.unwrap();
    let pids_after: Vec<i32> = agents(&daemon).into_iter().map(|(pid, _)| pid).collect();
    assert_eq!(pids_before, pids_after);
    for (pod, c) in [(&hostnet, &hostnet_c), (&own, &own_c)] {
        assert_eq!(pod_status(&daemon, pod).await.state, cri::PodSandboxState::SandboxReady as i32);
        assert_eq!(exec_out(&daemon, c, &["echo", "still here"]).await, "still here\n");
    }

    // With routing, a hostNetwork pod on the default handler goes to the host handler.
    // This one also shares the host's PID and IPC namespaces.
    let mut routed_cfg = host_network(pod_config("routed", &log_dir));
    if let Some(ns) = routed_cfg
        .linux
        .as_mut()
        .and_then(|l| l.security_context.as_mut())
        .and_then(|sc| sc.namespace_options.as_mut())
    {
        ns.pid = cri::NamespaceMode::Node as i32;
        ns.ipc = cri::NamespaceMode::Node as i32;
    }
    let routed = daemon
        .run_pod_sandbox(&routed_cfg, "")
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", daemon.log_tail()));
    assert_eq!(pod_status(&daemon, &routed).await.runtime_handler, "host");
    let routed_c = start(&daemon, &routed, &routed_cfg, talker("r")).await;
    let links = exec_out(&daemon, &routed_c, &["cat", "/proc/net/dev"]).await;
    assert!(links.contains(DUMMY), "the routed pod does not see {DUMMY}:\n{links}");
    // hostPID: PID 1 is the host's init; with a pod PID namespace it is the pause process.
    let host_init = std::fs::read_to_string("/proc/1/comm").unwrap();
    assert_eq!(exec_out(&daemon, &routed_c, &["cat", "/proc/1/comm"]).await, host_init);
    assert_ne!(exec_out(&daemon, &hostnet_c, &["cat", "/proc/1/comm"]).await, host_init);
    let host_ipc = std::fs::read_link("/proc/self/ns/ipc").unwrap().display().to_string();
    assert_eq!(
        exec_out(&daemon, &routed_c, &["readlink", "/proc/self/ns/ipc"]).await.trim(),
        host_ipc
    );
    assert_ne!(
        exec_out(&daemon, &hostnet_c, &["readlink", "/proc/self/ns/ipc"]).await.trim(),
        host_ipc
    );
    assert_eq!(agents(&daemon).len(), 3);

    // An agent that dies (SIGKILL: it cannot clean up) takes its pod down like a VM's death;
    // its containers and pause process are killed with the pod's cgroup at stop.
    let routed_agent = agents(&daemon)
        .into_iter()
        .find(|(pid, _)| !pids_before.contains(pid))
        .map(|(pid, _)| pid)
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(routed_agent),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let not_ready = wait_for(Duration::from_secs(10), || async {
        let state = pod_status(&daemon, &routed).await.state;
        (state == cri::PodSandboxState::SandboxNotready as i32).then_some(())
    })
    .await;
    assert!(not_ready.is_some(), "the pod of a killed agent stays ready");
    assert_eq!(
        daemon.container_status(&routed_c).await.state,
        cri::ContainerState::ContainerExited as i32
    );

    for pod in [&hostnet, &own, &routed] {
        daemon.remove_pod(pod).await;
    }
    assert!(agents(&daemon).is_empty(), "agents left: {:?}", agents(&daemon));
    daemon.assert_nothing_left();
    let after = host_pod_cgroups();
    // A cgroup with a process in it cannot be removed: none of the pods' processes is left.
    assert!(after.iter().all(|cg| before.contains(cg)), "cgroups left: {after:?}");
    assert!(network.leftovers(&own).is_empty(), "{:?}", network.leftovers(&own));
}
