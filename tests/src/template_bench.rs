//! `make bench`'s VM-template figures, measured through the CRI socket of a daemon whose
//! default handler has templates on and whose `cold` handler has them off (same VM size,
//! kernel and initramfs), in one run:
//! - start latency, RunPodSandbox → container running, cold boot vs template restore;
//! - per-pod host memory (PSS and USS summed over the pod's VM processes, from
//!   `/proc/<pid>/smaps_rollup`) with `PODS` idle busybox pods of each kind running at once;
//! - how many such idle pods fit in [`MEMORY_BUDGET_MIB`] either way, from those PSS figures
//!   (PSS adds up to what the pods cost together: shared pages count once, split among them);
//! - where the daemon's metrics endpoint is given, the mean of each start phase
//!   (`podvisor_pod_start_duration_seconds`) per kind, to tell where a start's time goes.
//!
//! Runs inside the nested L1 VM (`podvisor-nested-client bench`) where KVM cannot boot Linux,
//! or against a host daemon where it can (`podvisor-template-bench`).

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use k8s_cri::v1 as cri;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::Channel;

use crate::daemon::{container_config, pod_config};

/// Idle pods of each kind measured together.
pub const PODS: usize = 3;
/// The fixed amount of host memory the "pods that fit" figure divides.
pub const MEMORY_BUDGET_MIB: u64 = 4096;
/// The handler with templates off (the daemon's config defines it).
pub const COLD_HANDLER: &str = "cold";
/// How long pods idle before they are weighed: the guest settles after its start.
const SETTLE: Duration = Duration::from_secs(5);

/// One pod's start.
#[derive(Debug, Clone, Copy)]
struct Start {
    run_pod: Duration,
    to_running: Duration,
}

/// A pod's host memory, KiB.
#[derive(Debug, Clone, Copy, Default)]
struct Memory {
    pss_kib: u64,
    uss_kib: u64,
}

/// One kind's figures: every pod's start and memory, and the mean of each start phase.
#[derive(Debug, Default)]
struct Kind {
    starts: Vec<Start>,
    memory: Vec<Memory>,
    phases: Vec<(String, f64)>,
}

impl Kind {
    fn median_to_running(&self) -> Duration {
        median(self.starts.iter().map(|s| s.to_running).collect())
    }

    fn median_run_pod(&self) -> Duration {
        median(self.starts.iter().map(|s| s.run_pod).collect())
    }

    fn mean_pss_kib(&self) -> u64 {
        self.memory.iter().map(|m| m.pss_kib).sum::<u64>() / self.memory.len().max(1) as u64
    }

    fn mean_uss_kib(&self) -> u64 {
        self.memory.iter().map(|m| m.uss_kib).sum::<u64>() / self.memory.len().max(1) as u64
    }

    fn pods_in_budget(&self) -> u64 {
        (MEMORY_BUDGET_MIB * 1024) / self.mean_pss_kib().max(1)
    }
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values.get(values.len() / 2).copied().unwrap_or_default()
}

/// Both kinds, measured in one run.
#[derive(Debug)]
pub struct Figures {
    cold: Kind,
    template: Kind,
}

impl Figures {
    /// The figures as lines for the record.
    pub fn report(&self) -> Vec<String> {
        let (cold, tpl) = (&self.cold, &self.template);
        let ratio = cold.median_to_running().as_secs_f64()
            / tpl.median_to_running().as_secs_f64().max(1e-9);
        let saved = 100.0 * (1.0 - tpl.mean_pss_kib() as f64 / cold.mean_pss_kib().max(1) as f64);
        let mut lines = Vec::new();
        for (name, kind) in [("cold boot", cold), ("template restore", tpl)] {
            lines.push(format!(
                "{name}: RunPodSandbox -> container running, median of {}: {:.2} s \
                 (RunPodSandbox alone {:.2} s); each: {}",
                kind.starts.len(),
                kind.median_to_running().as_secs_f64(),
                kind.median_run_pod().as_secs_f64(),
                kind.starts
                    .iter()
                    .map(|s| format!("{:.2}", s.to_running.as_secs_f64()))
                    .collect::<Vec<_>>()
                    .join(" ")
            ));
        }
        lines.push(format!("template restore is {ratio:.1}x faster to a running container"));
        for (name, kind) in [("cold boot", cold), ("template restore", tpl)] {
            lines.push(format!(
                "{name}: per-pod host memory with {} idle busybox pods running: PSS {} KiB, \
                 USS {} KiB (mean); {} pods fit in {MEMORY_BUDGET_MIB} MiB",
                kind.memory.len(),
                kind.mean_pss_kib(),
                kind.mean_uss_kib(),
                kind.pods_in_budget()
            ));
        }
        lines.push(format!("templates save {saved:.0}% of per-pod PSS"));
        for (name, kind) in [("cold boot", cold), ("template restore", tpl)] {
            if !kind.phases.is_empty() {
                let phases: Vec<String> =
                    kind.phases.iter().map(|(p, secs)| format!("{p} {secs:.2} s")).collect();
                lines.push(format!("{name}: mean start phases: {}", phases.join(", ")));
            }
        }
        lines
    }
}

/// Measures both kinds: a warm-up pod asks for the template and its build is waited for; then
/// `PODS` cold pods start one after another, idle, are weighed and removed; then the same from
/// the template. `metrics` is the daemon's metrics endpoint, if it has one.
pub async fn run(
    channel: Channel,
    image: &str,
    log_dir: &Path,
    metrics: Option<SocketAddr>,
) -> Result<Figures> {
    let mut runtime = RuntimeServiceClient::new(channel);
    let warm = start_pod(&mut runtime, "bench-warm", "", image, log_dir).await?;
    wait_for_template(&mut runtime).await?;
    remove_pods(&mut runtime, &[warm.0]).await?;
    let mut kinds = Vec::new();
    for (handler, path) in [(COLD_HANDLER, "cold"), ("", "template")] {
        let before = phase_totals(metrics)?;
        let mut kind = measure(&mut runtime, handler, path, image, log_dir).await?;
        let after = phase_totals(metrics)?;
        kind.phases = phase_means(&before, &after);
        kinds.push(kind);
    }
    let template = kinds.pop().unwrap_or_default();
    let cold = kinds.pop().unwrap_or_default();
    Ok(Figures { cold, template })
}

/// Per start phase, the histogram's (sum, count) from the metrics endpoint; empty without one.
fn phase_totals(metrics: Option<SocketAddr>) -> Result<Vec<(String, f64, f64)>> {
    let Some(addr) = metrics else { return Ok(Vec::new()) };
    let text = http_get(addr, "/metrics")?;
    let value = |series: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series))
            .and_then(|rest| rest.trim().parse().ok())
            .unwrap_or(0.0)
    };
    let phases =
        ["network", "vm_start", "agent_ready", "sandbox_setup", "pod_ready", "container_running"];
    Ok(phases
        .iter()
        .map(|phase| {
            let sum =
                value(&format!(r#"podvisor_pod_start_duration_seconds_sum{{phase="{phase}"}}"#));
            let count =
                value(&format!(r#"podvisor_pod_start_duration_seconds_count{{phase="{phase}"}}"#));
            (phase.to_string(), sum, count)
        })
        .collect())
}

/// The mean of each phase between two readings.
fn phase_means(before: &[(String, f64, f64)], after: &[(String, f64, f64)]) -> Vec<(String, f64)> {
    after
        .iter()
        .zip(before)
        .filter(|((_, _, count), (_, _, was))| count > was)
        .map(|((phase, sum, count), (_, was_sum, was_count))| {
            (phase.clone(), (sum - was_sum) / (count - was_count))
        })
        .collect()
}

/// `GET path` from `addr` over HTTP/1.0: the body.
fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer.split_once("\r\n\r\n").map_or(answer.clone(), |(_, body)| body.to_string()))
}

/// `PODS` pods of `handler`, each checked to have started by `path`, weighed together.
async fn measure(
    runtime: &mut RuntimeServiceClient<Channel>,
    handler: &str,
    path: &str,
    image: &str,
    log_dir: &Path,
) -> Result<Kind> {
    let mut kind = Kind::default();
    let mut pods = Vec::new();
    for i in 0..PODS {
        let name = format!("bench-{path}-{i}");
        let (pod, start) = start_pod(runtime, &name, handler, image, log_dir).await?;
        let info = pod_info(runtime, &pod).await?;
        if info["startPath"] != path {
            bail!("pod {name} did not start by {path}: {info}");
        }
        println!("bench: {name}: container running after {:.2} s", start.to_running.as_secs_f64());
        kind.starts.push(start);
        pods.push(pod);
    }
    tokio::time::sleep(SETTLE).await;
    for pod in &pods {
        kind.memory.push(pod_memory(&pod_info(runtime, pod).await?)?);
    }
    remove_pods(runtime, &pods).await?;
    Ok(kind)
}

/// Runs pod `name` on `handler` with an idle busybox container; its id and start times.
async fn start_pod(
    runtime: &mut RuntimeServiceClient<Channel>,
    name: &str,
    handler: &str,
    image: &str,
    log_dir: &Path,
) -> Result<(String, Start)> {
    let config = pod_config(name, log_dir);
    let started = Instant::now();
    let request =
        cri::RunPodSandboxRequest { config: Some(config.clone()), runtime_handler: handler.into() };
    let pod = runtime
        .run_pod_sandbox(request)
        .await
        .with_context(|| format!("RunPodSandbox {name}"))?
        .into_inner()
        .pod_sandbox_id;
    let run_pod = started.elapsed();
    let mut container = container_config(name, image, &["/bin/sh", "-c", "exec sleep 3600"]);
    container.log_path = format!("{name}.log");
    let request = cri::CreateContainerRequest {
        pod_sandbox_id: pod.clone(),
        config: Some(container),
        sandbox_config: Some(config),
    };
    let id = runtime.create_container(request).await?.into_inner().container_id;
    runtime.start_container(cri::StartContainerRequest { container_id: id.clone() }).await?;
    let request = cri::ContainerStatusRequest { container_id: id, verbose: false };
    let state = runtime.container_status(request).await?.into_inner().status.unwrap_or_default();
    if state.state != cri::ContainerState::ContainerRunning as i32 {
        bail!("pod {name}'s container is not running: {state:?}");
    }
    Ok((pod, Start { run_pod, to_running: started.elapsed() }))
}

async fn remove_pods(runtime: &mut RuntimeServiceClient<Channel>, pods: &[String]) -> Result<()> {
    for pod in pods {
        let id = pod.clone();
        runtime.stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id: id.clone() }).await?;
        runtime.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: id }).await?;
    }
    Ok(())
}

/// Waits until the daemon's verbose Status lists a ready template (a failed build fails);
/// its key.
pub async fn wait_for_template(runtime: &mut RuntimeServiceClient<Channel>) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        let templates = template_states(runtime).await?;
        let list = templates.as_array().cloned().unwrap_or_default();
        if let Some(ready) = list.iter().find(|t| t["state"] == "ready") {
            return Ok(ready["key"].as_str().unwrap_or_default().to_string());
        }
        if let Some(failed) = list.iter().find(|t| t["state"] == "failed") {
            bail!("the template build failed: {failed}");
        }
        if Instant::now() > deadline {
            bail!("no template was built within 900 s: {templates}");
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Verbose Status's `templates`.
pub async fn template_states(
    runtime: &mut RuntimeServiceClient<Channel>,
) -> Result<serde_json::Value> {
    let status = runtime.status(cri::StatusRequest { verbose: true }).await?.into_inner();
    Ok(serde_json::from_str(status.info.get("templates").map_or("null", String::as_str))?)
}

/// Verbose PodSandboxStatus's `info` JSON.
pub async fn pod_info(
    runtime: &mut RuntimeServiceClient<Channel>,
    pod: &str,
) -> Result<serde_json::Value> {
    let request = cri::PodSandboxStatusRequest { pod_sandbox_id: pod.into(), verbose: true };
    let info = runtime.pod_sandbox_status(request).await?.into_inner().info;
    Ok(serde_json::from_str(info.get("info").map_or("null", String::as_str))?)
}

/// The pod's host memory: PSS and USS summed over its VM's processes (the VMM and its file
/// servers), as verbose status lists them.
fn pod_memory(info: &serde_json::Value) -> Result<Memory> {
    let processes = info["processes"].as_array().context("verbose status lists no processes")?;
    let mut memory = Memory::default();
    for pid in processes.iter().filter_map(|p| p["pid"].as_i64()) {
        let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
            .with_context(|| format!("reading /proc/{pid}/smaps_rollup"))?;
        let field = |name: &str| -> u64 {
            rollup
                .lines()
                .filter_map(|l| l.strip_prefix(name))
                .filter_map(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
                .sum()
        };
        memory.pss_kib += field("Pss:");
        memory.uss_kib += field("Private_Clean:") + field("Private_Dirty:");
    }
    Ok(memory)
}
