//! Pod networking end to end, on real guests with Debian's CNI plugins (bridge, host-local,
//! portmap) in a private configuration: NetworkReady follows the configuration, pods get
//! addresses that PodSandboxStatus reports, reach each other and are reached from the host
//! by pod IP and by hostPort; DNS, hosts file and hostname are the pod's; a daemon killed in
//! the middle of RunPodSandbox leaves nothing a later StopPodSandbox does not clean up; and
//! after removal no netns, veth, iptables rule or IP lease is left.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use k8s_cri::v1 as cri;
use podvisor_e2e::cni::{node_ip, TestNetwork};
use podvisor_e2e::daemon::{container_config, e2e_can_run, pod_config, wait_for, TestDaemon};
use podvisor_e2e::registry::TestRegistry;

/// `GET /` from `addr`, the body if it answered.
fn http_get(addr: SocketAddr) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream.write_all(b"GET / HTTP/1.0\r\nHost: pod\r\n\r\n").ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    answer.split_once("\r\n\r\n").map(|(_, body)| body.trim().to_string())
}

async fn http_get_eventually(addr: SocketAddr) -> Option<String> {
    wait_for(Duration::from_secs(30), || async move {
        tokio::task::spawn_blocking(move || http_get(addr)).await.ok().flatten()
    })
    .await
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("0.0.0.0:0").unwrap().local_addr().unwrap().port()
}

async fn network_ready(daemon: &TestDaemon) -> (bool, String) {
    let mut rt = daemon.runtime().await.unwrap();
    let status = rt.status(cri::StatusRequest { verbose: false }).await.unwrap().into_inner();
    let condition = status
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.r#type == "NetworkReady")
        .expect("a NetworkReady condition");
    (condition.status, condition.message)
}

async fn pod_ips(daemon: &TestDaemon, id: &str) -> Vec<String> {
    let mut rt = daemon.runtime().await.unwrap();
    let status = rt
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: id.into(),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    let network = status.network.unwrap_or_default();
    std::iter::once(network.ip)
        .chain(network.additional_ips.into_iter().map(|i| i.ip))
        .filter(|ip| !ip.is_empty())
        .collect()
}

async fn run_pod(daemon: &TestDaemon, config: &cri::PodSandboxConfig) -> String {
    let mut rt = daemon.runtime().await.unwrap();
    rt.run_pod_sandbox(cri::RunPodSandboxRequest {
        config: Some(config.clone()),
        runtime_handler: String::new(),
    })
    .await
    .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", daemon.log_tail()))
    .into_inner()
    .pod_sandbox_id
}

/// A container serving `body` over HTTP on port 8080.
fn web_server(image: &str, body: &str) -> cri::ContainerConfig {
    let script =
        format!("mkdir -p /www && echo {body} > /www/index.html && exec httpd -f -p 8080 -h /www");
    container_config("web", image, &["sh", "-c", &script])
}

async fn exec_text(daemon: &TestDaemon, cid: &str, cmd: &[&str]) -> String {
    let out = daemon.exec(cid, cmd, 30).await.unwrap();
    assert_eq!(out.exit_code, 0, "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_get_addresses_reach_each_other_and_leave_nothing_behind() {
    if !e2e_can_run() {
        return;
    }
    let registry = TestRegistry::start().unwrap();
    let image = registry.push_busybox("busybox:net").unwrap();
    let scratch = tempfile::Builder::new().prefix("podvisor-net-").tempdir_in("/var/tmp").unwrap();
    let net = TestNetwork::new(scratch.path(), "podvisor-e2e", "pve2e0", "10.213.7");
    std::fs::create_dir_all(&net.conf_dir).unwrap();
    let mut daemon = TestDaemon::start(&net.daemon_config()).await.unwrap();
    let log_dir = daemon.dir.path().join("pod-logs");

    // No configuration yet: not ready, and pods are refused as containerd refuses them.
    let (ready, why) = network_ready(&daemon).await;
    assert!(!ready, "NetworkReady without a CNI configuration");
    assert!(why.contains("no CNI network configuration"), "{why}");
    let mut rt = daemon.runtime().await.unwrap();
    let refused = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(pod_config("too-early", &log_dir)),
            runtime_handler: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");

    // A configuration written after the daemon started is picked up.
    net.write_config();
    let (ready, why) = network_ready(&daemon).await;
    assert!(ready, "NetworkReady stays false with a configuration: {why}");
    daemon.pull(&image).await;

    let host_port = free_port();
    let mut a_cfg = pod_config("net-a", &log_dir);
    a_cfg.dns_config = Some(cri::DnsConfig {
        servers: vec!["10.213.7.53".into()],
        searches: vec!["e2e.svc.cluster.local".into()],
        options: vec!["ndots:5".into()],
    });
    a_cfg.port_mappings = vec![cri::PortMapping {
        protocol: cri::Protocol::Tcp as i32,
        container_port: 8080,
        host_port: i32::from(host_port),
        host_ip: String::new(),
    }];
    let b_cfg = pod_config("net-b", &log_dir);
    let (a, b) = tokio::join!(run_pod(&daemon, &a_cfg), run_pod(&daemon, &b_cfg));

    let (a_ips, b_ips) = (pod_ips(&daemon, &a).await, pod_ips(&daemon, &b).await);
    assert_eq!(a_ips.len(), 1, "{a_ips:?}");
    assert!(a_ips[0].starts_with("10.213.7."), "pod A's address {a_ips:?} is outside the range");
    assert!(b_ips[0].starts_with("10.213.7."), "pod B's address {b_ips:?} is outside the range");
    assert_ne!(a_ips, b_ips);
    let (a_ip, b_ip) = (a_ips[0].clone(), b_ips[0].clone());

    let a_web = daemon.create_and_start(&a, &a_cfg, web_server(&image, "pod-a")).await;
    let b_web = daemon.create_and_start(&b, &b_cfg, web_server(&image, "pod-b")).await;

    // The host reaches both by pod IP.
    let a_addr: SocketAddr = format!("{a_ip}:8080").parse().unwrap();
    let b_addr: SocketAddr = format!("{b_ip}:8080").parse().unwrap();
    assert_eq!(
        http_get_eventually(a_addr).await.as_deref(),
        Some("pod-a"),
        "{}",
        daemon.log_tail()
    );
    assert_eq!(http_get_eventually(b_addr).await.as_deref(), Some("pod-b"));

    // Pod to pod, both ways.
    // busybox-static's wget crashes in glibc's static resolver; nc speaks plain TCP.
    let get = |ip: &str| format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {ip} 8080");
    let got = exec_text(&daemon, &a_web, &["sh", "-c", &get(&b_ip)]).await;
    assert!(got.trim_end().ends_with("pod-b"), "pod A got {got:?} from pod B");
    let got = exec_text(&daemon, &b_web, &["sh", "-c", &get(&a_ip)]).await;
    assert!(got.trim_end().ends_with("pod-a"), "pod B got {got:?} from pod A");

    // hostPort, through portmap's DNAT on the node's address.
    let node = node_ip().expect("the node's address");
    let mapped: SocketAddr = format!("{node}:{host_port}").parse().unwrap();
    assert_eq!(http_get_eventually(mapped).await.as_deref(), Some("pod-a"), "hostPort {mapped}");

    // Pod stats carry the interface's traffic (the requests above went both ways).
    let mut rt = daemon.runtime().await.unwrap();
    let stats = rt
        .pod_sandbox_stats(cri::PodSandboxStatsRequest { pod_sandbox_id: a.clone() })
        .await
        .unwrap()
        .into_inner()
        .stats
        .unwrap();
    let iface = stats.linux.unwrap().network.unwrap().default_interface.unwrap();
    assert_eq!(iface.name, "eth0");
    let bytes = |v: Option<cri::UInt64Value>| v.map(|v| v.value).unwrap_or(0);
    assert!(bytes(iface.rx_bytes) > 0 && bytes(iface.tx_bytes) > 0, "{iface:?}");

    // The pod's DNS, hosts file and hostname.
    let resolv = exec_text(&daemon, &a_web, &["cat", "/etc/resolv.conf"]).await;
    for line in ["nameserver 10.213.7.53", "search e2e.svc.cluster.local", "options ndots:5"] {
        assert!(resolv.lines().any(|l| l == line), "resolv.conf lacks {line:?}:\n{resolv}");
    }
    let hosts = exec_text(&daemon, &a_web, &["cat", "/etc/hosts"]).await;
    assert!(
        hosts.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == [a_ip.as_str(), "net-a"]),
        "/etc/hosts lacks the pod's own line:\n{hosts}"
    );
    assert_eq!(exec_text(&daemon, &a_web, &["hostname"]).await.trim(), "net-a");
    let route = exec_text(&daemon, &a_web, &["ip", "route"]).await;
    assert!(route.contains("default via 10.213.7.1"), "guest routes:\n{route}");

    // A daemon killed between ADD and the VM's start: the record made before anything
    // (marked `creating`) lets the restarted daemon undo the start itself: DEL, and the pod
    // is gone (its RunPodSandbox never answered).
    let c_cfg = pod_config("net-c", &log_dir);
    let crashing = {
        let socket = daemon.socket();
        let c_cfg = c_cfg.clone();
        tokio::spawn(async move {
            let channel = podvisor_e2e::daemon::cri_channel(&socket).await.unwrap();
            let mut rt = cri::runtime_service_client::RuntimeServiceClient::new(channel);
            rt.run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(c_cfg),
                runtime_handler: String::new(),
            })
            .await
        })
    };
    let leased = wait_for(Duration::from_secs(30), || {
        let n = net.allocations().len();
        async move { (n >= 3).then_some(()) }
    })
    .await;
    assert!(leased.is_some(), "pod C never got an address");
    daemon.kill();
    let _ = crashing.await;
    daemon.restart().await.unwrap();
    let mut rt = daemon.runtime().await.unwrap();
    let sandboxes = rt
        .list_pod_sandbox(cri::ListPodSandboxRequest::default())
        .await
        .unwrap()
        .into_inner()
        .items;
    assert!(
        !sandboxes.iter().any(|s| s.metadata.as_ref().is_some_and(|m| m.name == "net-c")),
        "the interrupted start of pod C was undone, not listed: {sandboxes:?}"
    );
    assert_eq!(net.allocations().len(), 2, "pod C's lease was not released");
    assert_eq!(net.bridge_ports().len(), 2, "pod C's veth was not removed");

    // Pods A and B survived the restart with their network.
    assert_eq!(http_get_eventually(a_addr).await.as_deref(), Some("pod-a"));
    daemon.remove_pod(&a).await;
    daemon.remove_pod(&b).await;
    for id in [&a, &b] {
        let left = net.leftovers(id);
        assert!(left.is_empty(), "pod {id} left {left:?}");
    }
    daemon.assert_nothing_left();
}
