//! `make bench`, network part: figures for the record, printed, never asserted. The same
//! busybox echo server (`nc -ll -e cat`) is measured
//! - in a pod, from the host by pod IP (CNI bridge → tc redirect → tap → virtio-net), against
//!   a plain network namespace joined to the host by a veth (the ratio is the VM's cost);
//! - in a pod through the streaming server's PortForward (SPDY over TCP, then vsock to the
//!   guest's loopback), against a plain loopback TCP copy of the same bytes.
//!
//! Each figure: throughput of PODVISOR_BENCH_NET_MIB (default 8) MiB echoed back on one
//! connection, and the round trip of a 64-byte message, p50 over 200.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use k8s_cri::v1 as cri;
use podvisor_e2e::cni::TestNetwork;
use podvisor_e2e::daemon::{container_config, e2e_missing, pod_config, wait_for, TestDaemon};
use podvisor_e2e::registry::TestRegistry;
use podvisor_e2e::streaming::PortForward;

const ECHO_PORT: u16 = 9000;
const BASELINE_NETNS: &str = "podvisor-bench";

/// Echoes `payload` through `stream`; returns the elapsed time.
fn echo_bulk(stream: TcpStream, payload: &[u8]) -> anyhow::Result<Duration> {
    let mut reader = stream.try_clone()?;
    let started = Instant::now();
    let to_send = payload.to_vec();
    let mut writer = stream;
    let sender = std::thread::spawn(move || writer.write_all(&to_send));
    let mut got = vec![0u8; payload.len()];
    reader.read_exact(&mut got)?;
    let elapsed = started.elapsed();
    sender.join().map_err(|_| anyhow::anyhow!("sender panicked"))??;
    anyhow::ensure!(got == payload, "the echo differs");
    Ok(elapsed)
}

/// p50 of 200 round trips of 64 bytes on one connection.
fn echo_rtt(mut stream: TcpStream) -> anyhow::Result<Duration> {
    stream.set_nodelay(true)?;
    let msg = [7u8; 64];
    let mut buf = [0u8; 64];
    let mut samples = Vec::with_capacity(200);
    for _ in 0..200 {
        let started = Instant::now();
        stream.write_all(&msg)?;
        stream.read_exact(&mut buf)?;
        samples.push(started.elapsed());
    }
    samples.sort();
    Ok(samples[samples.len() / 2])
}

fn connect(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(s) => {
                // An echo that answers is ready (nc may accept before cat runs).
                let mut probe = s.try_clone()?;
                probe.set_read_timeout(Some(Duration::from_secs(5)))?;
                probe.write_all(b"x")?;
                let mut b = [0u8; 1];
                if probe.read_exact(&mut b).is_ok() {
                    return Ok(s);
                }
            }
            Err(e) if Instant::now() > deadline => return Err(e).context(format!("{addr}")),
            Err(_) => {}
        }
        if Instant::now() > deadline {
            bail!("{addr} never echoed");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// (seconds for the bulk echo, RTT p50) against `addr`, on fresh connections.
fn measure(addr: SocketAddr, payload: &[u8]) -> anyhow::Result<(Duration, Duration)> {
    let bulk = echo_bulk(connect(addr)?, payload)?;
    let rtt = echo_rtt(connect(addr)?)?;
    Ok((bulk, rtt))
}

fn mib_per_s(bytes: usize, elapsed: Duration) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / elapsed.as_secs_f64()
}

/// The baseline: a network namespace with a veth to the host and the echo server in it.
struct Baseline {
    server: Child,
}

impl Baseline {
    fn start() -> anyhow::Result<Self> {
        let _ = Command::new("ip")
            .args(["netns", "del", BASELINE_NETNS])
            .stderr(std::process::Stdio::null())
            .status();
        let ip = |args: &str| -> anyhow::Result<()> {
            let ok = Command::new("ip").args(args.split(' ')).status()?.success();
            anyhow::ensure!(ok, "ip {args}");
            Ok(())
        };
        ip(&format!("netns add {BASELINE_NETNS}"))?;
        ip(&format!("link add pvbench0 type veth peer name pvbench1 netns {BASELINE_NETNS}"))?;
        ip("addr add 10.215.0.1/30 dev pvbench0")?;
        ip("link set pvbench0 up")?;
        ip(&format!("-n {BASELINE_NETNS} addr add 10.215.0.2/30 dev pvbench1"))?;
        ip(&format!("-n {BASELINE_NETNS} link set pvbench1 up"))?;
        ip(&format!("-n {BASELINE_NETNS} link set lo up"))?;
        let server = Command::new("ip")
            .args(["netns", "exec", BASELINE_NETNS, "busybox", "nc", "-ll", "-p"])
            .arg(ECHO_PORT.to_string())
            .args(["-e", "cat"])
            .spawn()?;
        Ok(Self { server })
    }
}

impl Drop for Baseline {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = Command::new("ip").args(["link", "del", "pvbench0"]).status();
        let _ = Command::new("ip").args(["netns", "del", BASELINE_NETNS]).status();
    }
}

/// An echo server on the host (busybox nc cannot bind one address; the client uses loopback).
fn loopback_echo(port: u16) -> anyhow::Result<Child> {
    Ok(Command::new("busybox").args(["nc", "-ll", "-p", &port.to_string(), "-e", "cat"]).spawn()?)
}

/// A fresh PortForward URL (each is good for one connection).
async fn forward_url(daemon: &TestDaemon, pod: &str) -> anyhow::Result<String> {
    let mut rt = daemon.runtime().await?;
    let request = cri::PortForwardRequest { pod_sandbox_id: pod.into(), port: vec![] };
    Ok(rt.port_forward(request).await?.into_inner().url)
}

/// The bulk echo through a PortForward session.
async fn port_forward_bulk(
    daemon: &TestDaemon,
    pod: &str,
    payload: &[u8],
) -> anyhow::Result<Duration> {
    let answered = wait_for(Duration::from_secs(30), || async {
        let mut f = PortForward::connect(&forward_url(daemon, pod).await.ok()?).await.ok()?;
        let got = f.round_trip(ECHO_PORT, b"ping").await.ok()?;
        f.close().await;
        (got == b"ping").then_some(())
    })
    .await;
    answered.context("the pod's echo server never answered through PortForward")?;
    let mut forward = PortForward::connect(&forward_url(daemon, pod).await?).await?;
    let started = Instant::now();
    let got = forward.round_trip(ECHO_PORT, payload).await?;
    let elapsed = started.elapsed();
    forward.close().await;
    anyhow::ensure!(got == payload, "port-forward echo differs ({} bytes back)", got.len());
    Ok(elapsed)
}

fn ratio(pod: Duration, base: Duration) -> f64 {
    pod.as_secs_f64() / base.as_secs_f64()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    if let Some(why) = e2e_missing() {
        bail!("cannot benchmark: {why}");
    }
    let mib: usize =
        std::env::var("PODVISOR_BENCH_NET_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(8);
    let payload: Vec<u8> = (0..mib << 20).map(|i| (i % 251) as u8).collect();

    let registry = TestRegistry::start()?;
    let image = registry.push_busybox("busybox:netbench")?;
    let scratch = tempfile::Builder::new().prefix("podvisor-netbench-").tempdir_in("/var/tmp")?;
    let net = TestNetwork::new(scratch.path(), "podvisor-bench", "pvbench-br0", "10.214.7");
    net.write_config();
    let daemon = TestDaemon::start(&net.daemon_config()).await?;
    daemon.pull(&image).await;
    let log_dir = daemon.dir.path().join("logs");
    let pod_cfg = pod_config("netbench", &log_dir);
    let mut rt = daemon.runtime().await?;
    let pod = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(pod_cfg.clone()),
            runtime_handler: String::new(),
        })
        .await?
        .into_inner()
        .pod_sandbox_id;
    let echo = format!("exec nc -ll -p {ECHO_PORT} -e cat");
    daemon
        .create_and_start(&pod, &pod_cfg, container_config("echo", &image, &["sh", "-c", &echo]))
        .await;
    let status = rt
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: pod.clone(),
            verbose: true,
        })
        .await?
        .into_inner();
    let pod_ip = status.status.and_then(|s| s.network).map(|n| n.ip).unwrap_or_default();
    let backend = status.info.get("info").cloned().unwrap_or_default();
    let backend = if backend.contains("\"builtin\"") { "builtin" } else { "qemu" };

    let (pod_bulk, pod_rtt) = measure(format!("{pod_ip}:{ECHO_PORT}").parse()?, &payload)?;
    let baseline = Baseline::start()?;
    let (base_bulk, base_rtt) = measure(format!("10.215.0.2:{ECHO_PORT}").parse()?, &payload)?;
    drop(baseline);
    let bytes = payload.len();
    println!(
        "host -> pod TCP by pod IP ({backend} backend, {mib} MiB echoed, 64-byte RTT p50 of 200):"
    );
    println!(
        "  pod:   {:8.1} MiB/s  rtt {:?}\n  netns: {:8.1} MiB/s  rtt {:?}  (plain netns + veth)",
        mib_per_s(bytes, pod_bulk),
        pod_rtt,
        mib_per_s(bytes, base_bulk),
        base_rtt
    );
    println!(
        "  ratio pod/netns: time {:.1}x, rtt {:.1}x",
        ratio(pod_bulk, base_bulk),
        ratio(pod_rtt, base_rtt)
    );

    let forward = port_forward_bulk(&daemon, &pod, &payload).await?;
    let loop_port = 19000 + (std::process::id() % 1000) as u16;
    let mut loopback = loopback_echo(loop_port)?;
    let local = echo_bulk(connect(format!("127.0.0.1:{loop_port}").parse()?)?, &payload);
    let _ = loopback.kill();
    let _ = loopback.wait();
    let local = local?;
    println!("port-forward ({mib} MiB echoed through the streaming URL) vs a loopback TCP copy:");
    println!(
        "  port-forward: {:8.1} MiB/s\n  loopback:     {:8.1} MiB/s\n  ratio: time {:.1}x",
        mib_per_s(bytes, forward),
        mib_per_s(bytes, local),
        ratio(forward, local)
    );
    daemon.remove_pod(&pod).await;
    Ok(())
}
