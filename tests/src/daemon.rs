//! The real `podvisor` daemon for end-to-end tests, on temporary directories, with tonic CRI
//! clients over its unix socket. Nothing is mocked: the daemon boots real guests (QEMU/TCG
//! here) from the project's kernel and initramfs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::{Channel, Endpoint, Uri};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

fn artefact(var: &str, default: &str) -> PathBuf {
    std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| repo_root().join(default))
}

/// The daemon binary, guest kernel and initramfs the tests use (`make test` sets these).
pub fn podvisor_bin() -> PathBuf {
    artefact("PODVISOR_BIN", "build/podvisor")
}
/// The agent binary, which the `host` handler runs on the host.
pub fn guest_agent() -> PathBuf {
    artefact("PODVISOR_AGENT", "build/podvisor-agent")
}
pub fn guest_kernel() -> PathBuf {
    artefact("PODVISOR_KERNEL", "build/vmlinux")
}
pub fn guest_initrd() -> PathBuf {
    artefact("PODVISOR_INITRD", "build/initramfs.cpio")
}

/// `Ok(())` if KVM can boot Linux here, else the reason `podvisor check` prints.
pub fn kvm_can_boot_linux() -> Result<(), String> {
    let out = Command::new(podvisor_bin())
        .arg("check")
        .output()
        .map_err(|e| format!("running podvisor check: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = text
        .lines()
        .find(|l| l.starts_with("KVM can boot a Linux guest:"))
        .ok_or_else(|| format!("podvisor check said nothing about KVM:\n{text}"))?;
    let answer = line.split_once(':').map(|(_, a)| a.trim()).unwrap_or_default();
    if answer.starts_with("yes") {
        Ok(())
    } else {
        Err(answer
            .trim_start_matches("no")
            .trim()
            .trim_start_matches('(')
            .trim_end_matches(')')
            .to_string())
    }
}

/// Why end-to-end tests cannot run here, or None.
pub fn e2e_missing() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("end-to-end tests need root (mounts, VMs)".into());
    }
    for (what, path) in [
        ("daemon", podvisor_bin()),
        ("guest kernel", guest_kernel()),
        ("guest initramfs", guest_initrd()),
    ] {
        if !path.exists() {
            return Some(format!("{what} {} not built (run `make test`)", path.display()));
        }
    }
    if let Some(tools) = crate::registry::missing_tools() {
        return Some(tools);
    }
    None
}

/// True when the e2e test should run; prints why not, and panics instead of skipping when
/// `PODVISOR_REQUIRE_E2E=1` (as `make test` sets).
pub fn e2e_can_run() -> bool {
    match e2e_missing() {
        None => true,
        Some(why) if std::env::var("PODVISOR_REQUIRE_E2E").as_deref() == Ok("1") => {
            panic!("end-to-end test cannot run: {why}")
        }
        Some(why) => {
            eprintln!("skipped: {why}");
            false
        }
    }
}

/// A running daemon on its own temporary root/state/socket.
pub struct TestDaemon {
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    pub extra_config: String,
    /// Keys added to the harness's `[vm]` table.
    pub extra_vm_config: String,
}

impl TestDaemon {
    /// Starts a daemon; `extra_config` goes into its TOML config before the `[vm]` table the
    /// harness writes (top-level keys and other tables).
    pub async fn start(extra_config: &str) -> Result<Self> {
        Self::start_with_vm(extra_config, "").await
    }

    /// [`start`](Self::start), with `extra_vm_config` (keys) in the `[vm]` table.
    pub async fn start_with_vm(extra_config: &str, extra_vm_config: &str) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("podvisor-e2e-")
            .tempdir_in("/var/tmp")
            .context("tempdir")?;
        let mut daemon = Self {
            dir,
            child: None,
            extra_config: extra_config.to_string(),
            extra_vm_config: extra_vm_config.to_string(),
        };
        daemon.spawn().await?;
        Ok(daemon)
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("cri.sock")
    }
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }
    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }
    pub fn log_file(&self) -> PathBuf {
        self.dir.path().join("daemon.log")
    }

    async fn spawn(&mut self) -> Result<()> {
        let config = self.dir.path().join("config.toml");
        // Pods get no network unless a test configures one (tests/tests/networking.rs does).
        let network = if self.extra_config.contains("[network]") {
            ""
        } else {
            "[network]\nenabled = false\n"
        };
        std::fs::write(
            &config,
            format!(
                "log_level = \"info,podvisor=debug\"\n{}\n{network}[vm]\nkernel = {:?}\ninitrd = {:?}\nmemory_mib = 256\n{}\n",
                self.extra_config,
                guest_kernel(),
                guest_initrd(),
                self.extra_vm_config,
            ),
        )?;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_file())?;
        let child = Command::new(podvisor_bin())
            .arg("daemon")
            .arg("--config")
            .arg(&config)
            .arg("--listen")
            .arg(self.socket())
            .arg("--root")
            .arg(self.root())
            .arg("--state")
            .arg(self.state())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning podvisor daemon")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(mut client) = self.runtime().await {
                if client.version(k8s_cri::v1::VersionRequest::default()).await.is_ok() {
                    return Ok(());
                }
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                bail!("daemon exited with {status}:\n{}", self.log_tail());
            }
            if Instant::now() > deadline {
                bail!("daemon did not answer within 30s:\n{}", self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills the daemon abruptly (SIGKILL), leaving its VMs running, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the daemon again on the same directories.
    pub async fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn().await
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_file()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    async fn channel(&self) -> Result<Channel> {
        cri_channel(&self.socket()).await
    }

    pub async fn runtime(&self) -> Result<RuntimeServiceClient<Channel>> {
        Ok(RuntimeServiceClient::new(self.channel().await?))
    }

    pub async fn images(&self) -> Result<ImageServiceClient<Channel>> {
        Ok(ImageServiceClient::new(self.channel().await?))
    }

    /// Host processes whose command line mentions this daemon's state directory (QEMU,
    /// vhost-device-vsock, virtiofsd of its VMs), other than the daemon itself.
    pub fn vm_processes(&self) -> Vec<(i32, String)> {
        let daemon = format!("{} daemon ", podvisor_bin().display());
        let mut found = processes_matching(&self.state().display().to_string());
        found.retain(|(_, cmdline)| !cmdline.starts_with(&daemon));
        found
    }

    /// Mount points under this daemon's directories.
    pub fn mounts(&self) -> Vec<String> {
        let needle = self.dir.path().display().to_string();
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|p| p.starts_with(&needle))
            .map(String::from)
            .collect()
    }

    /// Asserts that no VM process, mount, socket or sandbox directory is left.
    pub fn assert_nothing_left(&self) {
        assert!(self.vm_processes().is_empty(), "VM processes left: {:?}", self.vm_processes());
        assert!(self.mounts().is_empty(), "mounts left: {:?}", self.mounts());
        let leftovers: Vec<PathBuf> = ["sandboxes", "vms", "netns"]
            .iter()
            .flat_map(|d| {
                std::fs::read_dir(self.state().join(d))
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|e| e.path())
            })
            .collect();
        assert!(leftovers.is_empty(), "state left: {leftovers:?}");
        let records: Vec<PathBuf> = std::fs::read_dir(self.root().join("sandboxes"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect();
        assert!(records.is_empty(), "records left: {records:?}");
    }
}

/// The daemon's metrics endpoint, for daemons started with `[metrics] enabled = true`.
impl TestDaemon {
    /// Where the daemon said its metrics endpoint listens (`host:port`).
    pub fn metrics_address(&self) -> Option<String> {
        let log = std::fs::read_to_string(self.log_file()).ok()?;
        let line = log.lines().rev().find(|l| l.contains("metrics endpoint listening"))?;
        let url = &line[line.find("http://")? + "http://".len()..];
        // The log may be coloured: the URL ends at white space or an escape sequence.
        let end = url.find(|c: char| c.is_whitespace() || c == '\x1b').unwrap_or(url.len());
        Some(url[..end].trim_end_matches("/metrics").to_string())
    }

    /// GET /metrics: the exposition, panicking with the daemon's log on failure.
    pub async fn scrape_metrics(&self) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let address = self
            .metrics_address()
            .unwrap_or_else(|| panic!("no metrics endpoint in the log:\n{}", self.log_tail()));
        let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
        let request =
            format!("GET /metrics HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
        assert!(head.starts_with("HTTP/1.1 200"), "scraping {address}: {head}");
        body.to_string()
    }
}

/// The value of `series` (a name and its labels, sorted by name, as exposed) in `text`.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Every sample of the family `name` in `text`: its labels (as exposed) and value.
pub fn metric_samples(text: &str, name: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let labels = series.strip_prefix(name)?;
            (labels.is_empty() || labels.starts_with('{'))
                .then(|| Some((labels.to_string(), value.parse().ok()?)))?
        })
        .collect()
}

/// CRI calls the end-to-end tests share; each panics with the daemon's log on failure.
impl TestDaemon {
    /// PullImage, panicking with the daemon's log on failure.
    pub async fn pull(&self, image: &str) -> String {
        let mut images = self.images().await.unwrap();
        images
            .pull_image(k8s_cri::v1::PullImageRequest {
                image: Some(k8s_cri::v1::ImageSpec { image: image.into(), ..Default::default() }),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("pull {image}: {e}\n{}", self.log_tail()))
            .into_inner()
            .image_ref
    }

    /// RunPodSandbox of [`pod_config`]`(name, log_dir)`: (id, config).
    pub async fn run_pod(
        &self,
        name: &str,
        log_dir: &Path,
    ) -> (String, k8s_cri::v1::PodSandboxConfig) {
        let config = pod_config(name, log_dir);
        let id = self
            .run_pod_sandbox(&config, "")
            .await
            .unwrap_or_else(|e| panic!("RunPodSandbox {name}: {e}\n{}", self.log_tail()));
        (id, config)
    }

    /// RunPodSandbox of `config` on `handler` (empty: the default): the pod id, or the
    /// daemon's refusal.
    pub async fn run_pod_sandbox(
        &self,
        config: &k8s_cri::v1::PodSandboxConfig,
        handler: &str,
    ) -> Result<String, tonic::Status> {
        let mut rt = self.runtime().await.unwrap();
        rt.run_pod_sandbox(k8s_cri::v1::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: handler.into(),
        })
        .await
        .map(|r| r.into_inner().pod_sandbox_id)
    }

    /// CreateContainer + StartContainer: the container id.
    pub async fn create_and_start(
        &self,
        pod: &str,
        pod_config: &k8s_cri::v1::PodSandboxConfig,
        config: k8s_cri::v1::ContainerConfig,
    ) -> String {
        let mut rt = self.runtime().await.unwrap();
        let id = rt
            .create_container(k8s_cri::v1::CreateContainerRequest {
                pod_sandbox_id: pod.into(),
                config: Some(config),
                sandbox_config: Some(pod_config.clone()),
            })
            .await
            .unwrap_or_else(|e| panic!("CreateContainer: {e}\n{}", self.log_tail()))
            .into_inner()
            .container_id;
        rt.start_container(k8s_cri::v1::StartContainerRequest { container_id: id.clone() })
            .await
            .unwrap_or_else(|e| panic!("StartContainer: {e}\n{}", self.log_tail()));
        id
    }

    pub async fn container_status(&self, id: &str) -> k8s_cri::v1::ContainerStatus {
        let mut rt = self.runtime().await.unwrap();
        rt.container_status(k8s_cri::v1::ContainerStatusRequest {
            container_id: id.into(),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap()
    }

    /// ExecSync.
    pub async fn exec(
        &self,
        id: &str,
        cmd: &[&str],
        timeout: i64,
    ) -> Result<k8s_cri::v1::ExecSyncResponse, tonic::Status> {
        let mut rt = self.runtime().await.unwrap();
        rt.exec_sync(k8s_cri::v1::ExecSyncRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout,
        })
        .await
        .map(|r| r.into_inner())
    }

    /// The `info` JSON of a verbose PodSandboxStatus.
    pub async fn pod_verbose_info(&self, pod: &str) -> serde_json::Value {
        let mut rt = self.runtime().await.unwrap();
        let status = rt
            .pod_sandbox_status(k8s_cri::v1::PodSandboxStatusRequest {
                pod_sandbox_id: pod.into(),
                verbose: true,
            })
            .await
            .unwrap()
            .into_inner();
        serde_json::from_str(&status.info["info"]).unwrap()
    }

    /// The pod agent's own figures from verbose PodSandboxStatus: (tracked processes, RSS
    /// bytes).
    pub async fn agent_figures(&self, pod: &str) -> (u64, u64) {
        let info = self.pod_verbose_info(pod).await;
        let agent = &info["agent"];
        match (agent["trackedProcesses"].as_u64(), agent["rssBytes"].as_u64()) {
            (Some(tracked), Some(rss)) => (tracked, rss),
            _ => panic!("no agent figures in the verbose status: {info}"),
        }
    }

    /// Waits (up to `timeout`) until no VM template is being built, as verbose Status lists
    /// them: templates are on by default, and on a backend that can snapshot a pod's first
    /// boot builds one in the background, whose VM `assert_nothing_left` would find.
    pub async fn wait_for_template_builds(&self, timeout: Duration) {
        let settled = wait_for(timeout, || async {
            let mut rt = self.runtime().await.ok()?;
            let status =
                rt.status(k8s_cri::v1::StatusRequest { verbose: true }).await.ok()?.into_inner();
            let templates: serde_json::Value =
                serde_json::from_str(status.info.get("templates")?).ok()?;
            let building = templates.as_array()?.iter().any(|t| t["state"] == "building");
            (!building).then_some(())
        })
        .await;
        assert!(settled.is_some(), "a VM template was still building:\n{}", self.log_tail());
    }

    /// StopPodSandbox + RemovePodSandbox.
    pub async fn remove_pod(&self, id: &str) {
        let mut rt = self.runtime().await.unwrap();
        rt.stop_pod_sandbox(k8s_cri::v1::StopPodSandboxRequest { pod_sandbox_id: id.into() })
            .await
            .unwrap();
        rt.remove_pod_sandbox(k8s_cri::v1::RemovePodSandboxRequest { pod_sandbox_id: id.into() })
            .await
            .unwrap();
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        self.kill();
        // A failed test must not leave VMs or mounts behind on the machine.
        for (pid, _) in self.vm_processes() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        self.kill_host_pod_cgroups();
        let mut mounts = self.mounts();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            let _ = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

impl TestDaemon {
    /// Kills what is left of this daemon's host-handler pods (their pause processes and
    /// containers outlive a SIGKILLed agent) and removes their cgroups, named like their run
    /// directories.
    fn kill_host_pod_cgroups(&self) {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let Some(root) = mountinfo.lines().find_map(|l| {
            let (fields, fs) = l.split_once(" - ")?;
            fs.starts_with("cgroup2 ").then(|| fields.split(' ').nth(4).map(PathBuf::from))?
        }) else {
            return;
        };
        for entry in std::fs::read_dir(self.state().join("vms")).into_iter().flatten().flatten() {
            let cgroup = root.join("podvisor-host").join(entry.file_name());
            if std::fs::write(cgroup.join("cgroup.kill"), "1").is_err() {
                continue;
            }
            std::thread::sleep(Duration::from_millis(200));
            let _ = std::fs::remove_dir(cgroup.join("agent"));
            let children = std::fs::read_dir(cgroup.join("podvisor")).into_iter().flatten();
            for child in children.flatten() {
                let _ = std::fs::remove_dir(child.path());
            }
            let _ = std::fs::remove_dir(cgroup.join("podvisor"));
            let _ = std::fs::remove_dir(&cgroup);
        }
    }
}

/// A CRI channel over the daemon's unix socket `socket`.
pub async fn cri_channel(socket: &Path) -> Result<Channel> {
    let socket = socket.to_path_buf();
    // The URI is a placeholder: the connector always dials the unix socket.
    let channel = Endpoint::try_from("http://[::]:50051")?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await?;
    Ok(channel)
}

/// Processes whose command line (arguments joined by spaces) contains `needle`: (pid, it).
pub fn processes_matching(needle: &str) -> Vec<(i32, String)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(needle) {
            found.push((pid, cmdline));
        }
    }
    found
}

/// A pod config for tests.
pub fn pod_config(name: &str, log_dir: &Path) -> k8s_cri::v1::PodSandboxConfig {
    k8s_cri::v1::PodSandboxConfig {
        metadata: Some(k8s_cri::v1::PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "e2e".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        log_directory: log_dir.display().to_string(),
        labels: [("app".to_string(), name.to_string())].into_iter().collect(),
        ..Default::default()
    }
}

/// A container config for tests.
pub fn container_config(name: &str, image: &str, command: &[&str]) -> k8s_cri::v1::ContainerConfig {
    k8s_cri::v1::ContainerConfig {
        metadata: Some(k8s_cri::v1::ContainerMetadata { name: name.into(), attempt: 0 }),
        image: Some(k8s_cri::v1::ImageSpec { image: image.into(), ..Default::default() }),
        command: command.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}.log"),
        labels: [("container".to_string(), name.to_string())].into_iter().collect(),
        ..Default::default()
    }
}

/// Waits until `f` returns Some, polling every 100 ms, for at most `timeout`.
pub async fn wait_for<T, F, Fut>(timeout: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
