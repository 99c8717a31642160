//! The CRI client of the nested end-to-end test (`tests/tests/builtin_vmm_nested.rs`): it runs
//! inside the L1 VM, next to a daemon with `hypervisor = "builtin"`, and drives one pod through
//! the flow kubelet would: pull, run the pod, create and start a container that logs, exec in
//! it, stop and remove the pod. The daemon runs with `[vm] templates = true`: that first pod
//! cold-boots while its VM template is built; then two pods start from the template, each
//! runs a container, execs and logs, answers HTTP on its CNI address, and they differ in boot
//! id, random bytes, hostname and MAC; removing them leaves the template in place. A pod with
//! a user namespace starts from the same template, and its volume's files get the mapped host
//! owners. A corrupted template makes the next pod
//! cold-boot with a log line naming it, and is rebuilt; a changed initramfs makes a new
//! template replace the old one.
//!
//! Usage: `podvisor-nested-client [bench] <cri socket> <image> [<pod log dir>]`; with `bench`,
//! it measures `make bench`'s template figures instead (`podvisor_e2e::template_bench`) and
//! prints them as `NESTED-BENCH <line>`.
//!
//! Prints `NESTED-TIMING <step> <seconds>` for every step and ends with `NESTED-RESULT ok` or
//! `NESTED-RESULT fail: <reason>` (exit code 0 or 1): the host only sees the L1 serial console.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use podvisor_e2e::daemon::{container_config, cri_channel, pod_config, processes_matching};
use podvisor_e2e::template_bench::{pod_info, template_states, wait_for_template};
use tonic::transport::Channel;

/// The daemon's metrics endpoint in L1 (tests/nested/init configures it).
const L1_METRICS: &str = "127.0.0.1:9090";
/// What the container prints to its log, and what the exec prints.
const LOG_LINE: &str = "hello-nested";
const EXEC_OUTPUT: &str = "exec-ok";

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let bench = args.first().is_some_and(|a| a == "bench");
    if bench {
        args.remove(0);
    }
    let (Some(socket), Some(image)) = (args.first(), args.get(1)) else {
        println!(
            "NESTED-RESULT fail: usage: podvisor-nested-client <cri socket> <image> [<log dir>]"
        );
        std::process::exit(2);
    };
    let log_dir = PathBuf::from(args.get(2).map_or("/var/log/pods/nested", String::as_str));
    let outcome = if bench {
        run_bench(Path::new(socket), image, &log_dir).await
    } else {
        run(Path::new(socket), image, &log_dir).await
    };
    match outcome {
        Ok(()) => println!("NESTED-RESULT ok"),
        Err(error) => {
            println!("NESTED-RESULT fail: {error:#}");
            std::process::exit(1);
        }
    }
}

/// Times one step, printing `NESTED-TIMING`, and fails it after `limit`.
async fn step<T>(
    name: &str,
    limit: Duration,
    future: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    let started = Instant::now();
    let result = tokio::time::timeout(limit, future)
        .await
        .with_context(|| format!("{name}: no answer within {limit:?}"))?
        .with_context(|| name.to_string());
    println!("NESTED-TIMING {name} {:.1}", started.elapsed().as_secs_f64());
    result
}

/// The template figures: pull, then `template_bench::run`.
async fn run_bench(socket: &Path, image: &str, log_dir: &Path) -> Result<()> {
    let channel = step("daemon-ready", Duration::from_secs(120), wait_for_daemon(socket)).await?;
    let mut images = ImageServiceClient::new(channel.clone());
    step("pull", Duration::from_secs(180), async {
        let spec = cri::ImageSpec { image: image.into(), ..Default::default() };
        let request = cri::PullImageRequest { image: Some(spec), ..Default::default() };
        Ok(images.pull_image(request).await?.into_inner().image_ref)
    })
    .await?;
    let figures = step(
        "bench",
        Duration::from_secs(3600),
        podvisor_e2e::template_bench::run(channel, image, log_dir, Some(L1_METRICS.parse()?)),
    )
    .await?;
    for line in figures.report() {
        println!("NESTED-BENCH {line}");
    }
    Ok(())
}

async fn run(socket: &Path, image: &str, log_dir: &Path) -> Result<()> {
    // The daemon was started just before this client, under emulation: give it time to listen.
    let channel = step("daemon-ready", Duration::from_secs(120), wait_for_daemon(socket)).await?;
    let mut runtime = RuntimeServiceClient::new(channel.clone());
    let mut images = ImageServiceClient::new(channel);

    step("pull", Duration::from_secs(180), async {
        let spec = cri::ImageSpec { image: image.into(), ..Default::default() };
        let request = cri::PullImageRequest { image: Some(spec), ..Default::default() };
        Ok(images.pull_image(request).await?.into_inner().image_ref)
    })
    .await?;

    let pod_config = pod_config("nested", log_dir);
    let pod = step("run-pod", Duration::from_secs(300), async {
        let request = cri::RunPodSandboxRequest {
            config: Some(pod_config.clone()),
            runtime_handler: String::new(),
        };
        Ok(runtime.run_pod_sandbox(request).await?.into_inner().pod_sandbox_id)
    })
    .await?;

    step("vmm-confined", Duration::from_secs(10), async { vmm_runs_confined(&pod) }).await?;

    let command = [
        "/bin/sh",
        "-c",
        "echo hello-nested; mkdir -p /www; echo net-ok > /www/index.html; exec httpd -f -p 8080 -h /www",
    ];
    let container = step("start-container", Duration::from_secs(180), async {
        let request = cri::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(container_config("app", image, &command)),
            sandbox_config: Some(pod_config.clone()),
        };
        let id = runtime.create_container(request).await?.into_inner().container_id;
        runtime.start_container(cri::StartContainerRequest { container_id: id.clone() }).await?;
        Ok(id)
    })
    .await?;

    let log = log_dir.join("app.log");
    step("log-line", Duration::from_secs(120), wait_for_log_line(&log)).await?;

    step("exec", Duration::from_secs(120), async {
        let request = cri::ExecSyncRequest {
            container_id: container.clone(),
            cmd: vec!["echo".into(), EXEC_OUTPUT.into()],
            timeout: 60,
        };
        let response = runtime.exec_sync(request).await?.into_inner();
        let stdout = String::from_utf8_lossy(&response.stdout);
        if response.exit_code != 0 || stdout != format!("{EXEC_OUTPUT}\n") {
            bail!(
                "exit code {}, stdout {stdout:?}, stderr {:?}",
                response.exit_code,
                String::from_utf8_lossy(&response.stderr)
            );
        }
        Ok(())
    })
    .await?;

    // The pod's CNI interface reaches the guest through the tap the daemon handed the VMM.
    step("pod-network", Duration::from_secs(120), pod_serves(&mut runtime, &pod, "net-ok")).await?;

    templates(&mut runtime, image, log_dir).await?;

    step("stop-remove-pod", Duration::from_secs(120), async {
        runtime
            .stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id: pod.clone() })
            .await?;
        runtime
            .remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: pod.clone() })
            .await?;
        let mut left = processes_matching(" vmm ");
        left.extend(processes_matching("virtiofsd"));
        if !left.is_empty() {
            bail!("processes left after RemovePodSandbox: {left:?}");
        }
        Ok(())
    })
    .await
}

/// What must differ between two pods of one template.
#[derive(Debug)]
struct Identity {
    boot_id: String,
    random: String,
    hostname: String,
    mac: String,
}

/// Waits until the pod's CNI address answers `GET /` on port 8080 with `body`.
async fn pod_serves(
    runtime: &mut RuntimeServiceClient<Channel>,
    pod: &str,
    body: &str,
) -> Result<()> {
    let request = cri::PodSandboxStatusRequest { pod_sandbox_id: pod.into(), verbose: false };
    let status = runtime.pod_sandbox_status(request).await?.into_inner().status;
    let ip = status.and_then(|s| s.network).map(|n| n.ip).unwrap_or_default();
    if ip.is_empty() {
        bail!("the pod has no IP");
    }
    let addr: std::net::SocketAddr = format!("{ip}:8080").parse()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(100);
    loop {
        match http_get(addr) {
            Ok(answer) if answer.trim_end().ends_with(body) => return Ok(()),
            Ok(answer) => bail!("{addr} answered {answer:?}"),
            Err(e) if std::time::Instant::now() > deadline => bail!("GET {addr}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// ExecSync `cmd` in `container`; its stdout.
async fn exec_out(
    runtime: &mut RuntimeServiceClient<Channel>,
    container: &str,
    cmd: &[&str],
) -> Result<String> {
    let request = cri::ExecSyncRequest {
        container_id: container.into(),
        cmd: cmd.iter().map(|c| c.to_string()).collect(),
        timeout: 60,
    };
    let response = runtime.exec_sync(request).await?.into_inner();
    if response.exit_code != 0 {
        bail!(
            "{cmd:?}: exit code {}, stderr {:?}",
            response.exit_code,
            String::from_utf8_lossy(&response.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&response.stdout).into_owned())
}

/// The VM-template phase: wait for the template the first pod's start asked for, then start
/// two pods from it and compare what should differ.
async fn templates(
    runtime: &mut RuntimeServiceClient<Channel>,
    image: &str,
    log_dir: &Path,
) -> Result<()> {
    let key = step("template-built", Duration::from_secs(600), wait_for_template(runtime)).await?;
    println!("NESTED-TEMPLATES {}", template_states(runtime).await?);
    let mut seen = Vec::new();
    for name in ["tpl-a", "tpl-b"] {
        let config = pod_config(name, log_dir);
        let pod = run_from_template(runtime, name, &config, &key).await?;
        let log_name = format!("{name}.log");
        let container = step(&format!("start-container-{name}"), Duration::from_secs(180), async {
            let serve = format!(
                "echo hello-nested; mkdir -p /www; echo net-{name} > /www/index.html; \
                 exec httpd -f -p 8080 -h /www"
            );
            let mut c = container_config(name, image, &["/bin/sh", "-c", &serve]);
            c.log_path = log_name.clone();
            let request = cri::CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(c),
                sandbox_config: Some(config.clone()),
            };
            let id = runtime.create_container(request).await?.into_inner().container_id;
            runtime
                .start_container(cri::StartContainerRequest { container_id: id.clone() })
                .await?;
            Ok(id)
        })
        .await?;
        step(
            &format!("log-line-{name}"),
            Duration::from_secs(120),
            wait_for_log_line(&log_dir.join(&log_name)),
        )
        .await?;
        let identity = step(&format!("identity-{name}"), Duration::from_secs(120), async {
            let boot_id =
                exec_out(runtime, &container, &["cat", "/proc/sys/kernel/random/boot_id"]).await?;
            let random = exec_out(
                runtime,
                &container,
                &["sh", "-c", "head -c 16 /dev/urandom | od -An -tx1"],
            )
            .await?;
            let hostname = exec_out(runtime, &container, &["hostname"]).await?;
            let mac =
                exec_out(runtime, &container, &["cat", "/sys/class/net/eth0/address"]).await?;
            Ok(Identity {
                boot_id: boot_id.trim().to_string(),
                random: random.trim().to_string(),
                hostname: hostname.trim().to_string(),
                mac: mac.trim().to_string(),
            })
        })
        .await?;
        println!("NESTED-TEMPLATE-IDENTITY {name} {identity:?}");
        if identity.hostname != name {
            bail!("pod {name} has hostname {:?}", identity.hostname);
        }
        step(
            &format!("pod-network-{name}"),
            Duration::from_secs(120),
            pod_serves(runtime, &pod, &format!("net-{name}")),
        )
        .await?;
        seen.push((pod, identity));
    }
    let ((_, a), (_, b)) = (&seen[0], &seen[1]);
    if a.boot_id == b.boot_id || a.random == b.random || a.mac == b.mac {
        bail!("two pods of one template share a boot id, random bytes or a MAC: {a:?} {b:?}");
    }
    step("remove-template-pods", Duration::from_secs(120), async {
        for (pod, _) in &seen {
            runtime
                .stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id: pod.clone() })
                .await?;
            runtime
                .remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: pod.clone() })
                .await?;
        }
        let templates = template_states(runtime).await?;
        if !templates
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t["key"] == key.as_str() && t["state"] == "ready"))
        {
            bail!("removing the pods took template {key}: {templates}");
        }
        Ok(())
    })
    .await?;

    userns_pod_from_template(runtime, image, log_dir, &key).await?;

    // A corrupt template: the next pod cold-boots, the daemon's log names it, it is rebuilt.
    let state = Path::new("/run/pv/templates").join(&key).join("snapshot/vm.state");
    std::fs::write(&state, b"PVSNAPST not a snapshot")
        .with_context(|| format!("corrupting {}", state.display()))?;
    let reason = cold_pod(runtime, log_dir, "tpl-corrupt").await?;
    if !reason.contains("corrupt") || !reason.contains(&key) {
        bail!("the pod on a corrupt template cold-booted for another reason: {reason}");
    }
    let log = std::fs::read_to_string("/run/daemon.log").unwrap_or_default();
    let line = log.lines().find(|l| l.contains("VM template is corrupt") && l.contains(&key));
    println!("NESTED-TEMPLATE-CORRUPT {}", line.unwrap_or("no log line"));
    if line.is_none() {
        bail!("no log line names the corrupt template {key}");
    }
    step("template-rebuilt", Duration::from_secs(600), wait_template_ready(runtime, &key)).await?;

    // A changed initramfs (zero padding, which the kernel skips) is a new key: the next pod
    // cold-boots, the new template is built and the old one removed.
    let initrd = Path::new("/l2/initramfs.cpio");
    let mut padded = std::fs::read(initrd).context("reading the L2 initramfs")?;
    padded.extend_from_slice(&[0u8; 512]);
    std::fs::write(initrd, padded).context("changing the L2 initramfs")?;
    let reason = cold_pod(runtime, log_dir, "tpl-new-initrd").await?;
    if !reason.contains("no template") || reason.contains(&key) {
        bail!("after the initramfs changed: {reason}");
    }
    step("template-replaced", Duration::from_secs(600), async {
        loop {
            let templates = template_states(runtime).await?;
            let list = templates.as_array().cloned().unwrap_or_default();
            if list.len() == 1 && list[0]["state"] == "ready" && list[0]["key"] != key.as_str() {
                println!("NESTED-TEMPLATES {templates}");
                return Ok(());
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    })
    .await
}

/// kubelet's user namespace for a pod (`hostUsers: false`): container ids 0.. at guest ids
/// 131072.., 65536 of them, uids and gids alike.
const USERNS_BASE: u32 = 131_072;

/// A pod with a user namespace (POD mode, as `tests/tests/userns.rs` makes it) starts from the
/// same template as the others (the key has no mapping: the template's shares translate
/// nothing, each restored pod's fs-serve gets its own translation); its fs-serve translates
/// (no virtiofsd); what its container's root and uid 1000 write to a host volume is the host's
/// uid 0 and 1000, and the host root's file is the container root's.
async fn userns_pod_from_template(
    runtime: &mut RuntimeServiceClient<Channel>,
    image: &str,
    log_dir: &Path,
    key: &str,
) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let name = "tpl-userns";
    let mut config = pod_config(name, log_dir);
    let map = cri::IdMapping { container_id: 0, host_id: USERNS_BASE, length: 65_536 };
    let namespaces = cri::NamespaceOption {
        pid: cri::NamespaceMode::Container as i32,
        userns_options: Some(cri::UserNamespace {
            mode: cri::NamespaceMode::Pod as i32,
            uids: vec![map],
            gids: vec![map],
        }),
        ..Default::default()
    };
    config.linux = Some(cri::LinuxPodSandboxConfig {
        security_context: Some(cri::LinuxSandboxSecurityContext {
            namespace_options: Some(namespaces),
            ..Default::default()
        }),
        ..Default::default()
    });
    let volume = Path::new("/run/pv-userns-data");
    let _ = std::fs::remove_dir_all(volume);
    std::fs::create_dir_all(volume).context("making the userns pod's volume")?;
    std::fs::write(volume.join("from-host"), "host\n")?;

    let pod = run_from_template(runtime, name, &config, key).await?;
    let translating: Vec<_> = processes_matching("fs-serve")
        .into_iter()
        .filter(|(_, cmd)| {
            cmd.contains(&pod[..16]) && cmd.contains("--translate-uid map:131072:0:65536")
        })
        .collect();
    let virtiofsds = processes_matching("virtiofsd");
    if translating.is_empty() || !virtiofsds.is_empty() {
        bail!("expected translating fs-serve processes and no virtiofsd: {translating:?} {virtiofsds:?}");
    }

    let log_name = format!("{name}.log");
    let script = "echo back > /data/from-container && touch /data/as-1000 && \
                  chown 1000:1000 /data/as-1000 && echo hello-nested; exec sleep 3600";
    let container = step("start-container-userns", Duration::from_secs(180), async {
        let mut c = container_config(name, image, &["/bin/sh", "-c", script]);
        c.log_path = log_name.clone();
        c.mounts = vec![cri::Mount {
            container_path: "/data".into(),
            host_path: volume.display().to_string(),
            ..Default::default()
        }];
        let request = cri::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(c),
            sandbox_config: Some(config.clone()),
        };
        let id = runtime.create_container(request).await?.into_inner().container_id;
        runtime.start_container(cri::StartContainerRequest { container_id: id.clone() }).await?;
        Ok(id)
    })
    .await?;
    step("log-line-userns", Duration::from_secs(120), wait_for_log_line(&log_dir.join(&log_name)))
        .await?;
    step("owners-userns", Duration::from_secs(120), async {
        let seen = exec_out(
            runtime,
            &container,
            &["sh", "-c", "cat /proc/self/uid_map; stat -c '%n %u:%g' /data/from-host"],
        )
        .await?;
        let owner = |file: &str| -> Result<(u32, u32)> {
            let m = std::fs::metadata(volume.join(file)).with_context(|| file.to_string())?;
            Ok((m.uid(), m.gid()))
        };
        let written = (owner("from-container")?, owner("as-1000")?);
        println!("NESTED-USERNS seen={seen:?} host owners={written:?}");
        let fields: Vec<&str> = seen.split_whitespace().collect();
        if fields != ["0", "131072", "65536", "/data/from-host", "0:0"] {
            bail!("in the container: {seen:?}");
        }
        if written != ((0, 0), (1000, 1000)) {
            bail!("host owners of what the container's root and uid 1000 wrote: {written:?}");
        }
        Ok(())
    })
    .await?;
    runtime.stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id: pod.clone() }).await?;
    runtime.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: pod }).await?;
    Ok(())
}

/// Runs pod `name` (`config`) and checks it started from template `key`; its id.
async fn run_from_template(
    runtime: &mut RuntimeServiceClient<Channel>,
    name: &str,
    config: &cri::PodSandboxConfig,
    key: &str,
) -> Result<String> {
    let pod = step(&format!("run-pod-from-template-{name}"), Duration::from_secs(300), async {
        let request = cri::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: String::new(),
        };
        Ok(runtime.run_pod_sandbox(request).await?.into_inner().pod_sandbox_id)
    })
    .await?;
    let info = pod_info(runtime, &pod).await?;
    println!(
        "NESTED-TEMPLATE-POD {name} startPath={} template={} reason={}",
        info["startPath"], info["template"], info["startReason"]
    );
    if info["startPath"] != "template" || info["template"] != key {
        bail!("pod {name} did not start from template {key}: {info}");
    }
    Ok(pod)
}

/// Runs pod `name`, checks it cold-booted, removes it; the reason it gives.
async fn cold_pod(
    runtime: &mut RuntimeServiceClient<Channel>,
    log_dir: &Path,
    name: &str,
) -> Result<String> {
    let config = pod_config(name, log_dir);
    let pod = step(&format!("run-pod-cold-{name}"), Duration::from_secs(300), async {
        let request =
            cri::RunPodSandboxRequest { config: Some(config), runtime_handler: String::new() };
        Ok(runtime.run_pod_sandbox(request).await?.into_inner().pod_sandbox_id)
    })
    .await?;
    let info = pod_info(runtime, &pod).await?;
    println!(
        "NESTED-TEMPLATE-POD {name} startPath={} reason={}",
        info["startPath"], info["startReason"]
    );
    runtime.stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id: pod.clone() }).await?;
    runtime.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: pod }).await?;
    if info["startPath"] != "cold" {
        bail!("pod {name} did not cold-boot: {info}");
    }
    Ok(info["startReason"].as_str().unwrap_or_default().to_string())
}

/// Waits until template `key` is ready (a failed build fails).
async fn wait_template_ready(runtime: &mut RuntimeServiceClient<Channel>, key: &str) -> Result<()> {
    loop {
        let templates = template_states(runtime).await?;
        let list = templates.as_array().cloned().unwrap_or_default();
        if let Some(t) = list.iter().find(|t| t["key"] == key) {
            if t["state"] == "ready" {
                return Ok(());
            }
            if t["state"] == "failed" {
                bail!("building template {key} failed: {t}");
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// `GET /` from `addr`: the whole answer.
fn http_get(addr: std::net::SocketAddr) -> Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    stream.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer)
}

/// A channel to the daemon once it answers Version.
async fn wait_for_daemon(socket: &Path) -> Result<Channel> {
    loop {
        if let Ok(channel) = cri_channel(socket).await {
            let mut runtime = RuntimeServiceClient::new(channel.clone());
            if runtime.version(cri::VersionRequest::default()).await.is_ok() {
                return Ok(channel);
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the container's CRI log holds its line on stdout.
async fn wait_for_log_line(log: &Path) -> Result<()> {
    let wanted = format!(" stdout F {LOG_LINE}");
    loop {
        if let Ok(text) = std::fs::read_to_string(log) {
            if text.lines().any(|line| line.ends_with(&wanted)) {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The pod's VMM runs jailed and filtered: no uid of it (real, effective, saved, fs) is root,
/// it has a network namespace of its own, and every thread of it has a seccomp filter
/// (`Seccomp: 2`).
fn vmm_runs_confined(pod: &str) -> Result<()> {
    // The pod's own (a template's VMM may be running beside it).
    let vmms: Vec<_> = processes_matching(" vmm ")
        .into_iter()
        .filter(|(_, cmd)| cmd.contains(&pod[..16]))
        .collect();
    let [(pid, _)] = vmms.as_slice() else {
        bail!("expected one `podvisor vmm` process, found {vmms:?}");
    };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let uids = status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .with_context(|| format!("no Uid line in /proc/{pid}/status"))?;
    if uids.split_whitespace().any(|id| id == "0") {
        bail!("the VMM (pid {pid}) runs with uid 0: Uid:{uids}");
    }
    println!("NESTED-VMM pid {pid} Uid:{uids}");
    let netns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/net")).ok();
    if netns(&pid.to_string()).is_none() || netns(&pid.to_string()) == netns("self") {
        bail!("the VMM (pid {pid}) shares the host's network namespace");
    }
    let mut unfiltered = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .with_context(|| format!("listing /proc/{pid}/task"))?
        .flatten()
    {
        // A thread that exited meanwhile has no status left to read.
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else { continue };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .unwrap_or("?")
                .trim()
                .to_string()
        };
        let (thread, seccomp) = (field("Name:"), field("Seccomp:"));
        println!("NESTED-VMM thread {thread:?} Seccomp: {seccomp}");
        if seccomp != "2" {
            unfiltered.push(thread);
        }
    }
    if !unfiltered.is_empty() {
        bail!("VMM threads without a seccomp filter: {unfiltered:?}");
    }
    Ok(())
}
