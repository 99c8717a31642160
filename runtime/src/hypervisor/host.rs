//! The `host` backend: no VM. A pod's "VM" is one `podvisor-agent` process on the host, in
//! host-pod mode (see the agent's `host_pod` module), running the pod's containers with
//! libcontainer directly: in the pod's CNI network namespace or the host's (hostNetwork), the
//! host's IPC namespace or one of its own, and a private mount namespace in which the pod's
//! shares sit where a guest would mount them. It is for trusted system pods (kube-proxy, CNI
//! daemonsets): not a tenant boundary.
//!
//! - The agent is spawned in its own process group (as VMMs are), so it outlives a daemon
//!   restart; its pid and start time are the handle's only process, and a restarted daemon
//!   re-attaches through its socket.
//! - The daemon reaches it on `<run_dir>/agent.sock` (gRPC, no vsock handshake) and forwards
//!   ports through `<run_dir>/portforward.sock`, the agent's port-forward listener, which dials
//!   `localhost:<port>` in the pod's network namespace.
//! - Every process of the pod (the agent, its pause process, containers, execs) lives under the
//!   pod's cgroup `<cgroup2>/podvisor-host/<run dir name>`: stop kills the cgroup and removes
//!   it, so nothing outlives the pod even when the agent is killed before it cleaned up.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use tokio::net::UnixStream;
use tokio::time::Instant;

use super::process::Starting;
use super::{
    remove_dir_if_exists, terminate_processes, AgentReady, GuestConnector, Hypervisor,
    HypervisorError, PreparedVm, Result, RunRoot, VmHandle, VmSpec,
};
use crate::agent::PORT_FORWARD_VSOCK_PORT;

/// The backend's name, in handler configs and records.
pub const NAME: &str = "host";
/// The cgroup, below the cgroup2 root, that holds every host pod's cgroup.
const CGROUP_PARENT: &str = "podvisor-host";
/// How long the cgroup's processes may take to die after `cgroup.kill`.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);

/// How to run host pods.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// The `podvisor-agent` binary.
    pub agent_binary: PathBuf,
    /// Where pods' run directories go (beside the VMs').
    pub run_root: PathBuf,
    /// How long the agent may take to create its socket.
    pub startup_timeout: Duration,
}

/// The host [`Hypervisor`].
#[derive(Debug)]
pub struct HostBackend {
    agent: PathBuf,
    run_root: RunRoot,
    /// `<cgroup2 mount>/podvisor-host`.
    cgroup_parent: PathBuf,
    startup_timeout: Duration,
}

fn agent_socket(run_dir: &Path) -> PathBuf {
    run_dir.join("agent.sock")
}

fn port_forward_socket(run_dir: &Path) -> PathBuf {
    run_dir.join("portforward.sock")
}

impl HostBackend {
    /// Checks the agent binary and finds the cgroup2 hierarchy.
    pub fn new(config: HostConfig) -> Result<Self> {
        if !crate::check::is_executable(&config.agent_binary) {
            return Err(HypervisorError::MissingBinary {
                binary: config.agent_binary.display().to_string(),
                hint: "build it with `make guest` or set host.agent in the config".into(),
            });
        }
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let cgroup2 = cgroup2_mount(&mountinfo).ok_or_else(|| {
            HypervisorError::InvalidConfig(
                "the host handler needs a cgroup2 hierarchy and this host has none mounted".into(),
            )
        })?;
        Ok(Self {
            agent: config.agent_binary,
            run_root: RunRoot(config.run_root),
            cgroup_parent: cgroup2.join(CGROUP_PARENT),
            startup_timeout: config.startup_timeout,
        })
    }

    /// The pod's cgroup, named like its run directory (a prefix of the sandbox id).
    fn pod_cgroup(&self, run_dir: &Path) -> PathBuf {
        self.cgroup_parent.join(run_dir.file_name().unwrap_or_default())
    }

    /// Makes the pod's cgroup, delegating the controllers the hierarchy has (none on a hybrid
    /// host: there its containers get no resource limits).
    fn create_pod_cgroup(&self, cgroup: &Path) -> Result<()> {
        std::fs::create_dir_all(cgroup)
            .map_err(|source| HypervisorError::RunDir { path: cgroup.to_path_buf(), source })?;
        for dir in [&self.cgroup_parent, &cgroup.to_path_buf()] {
            delegate_controllers(dir);
        }
        Ok(())
    }

    fn agent_args(&self, run_dir: &Path, cgroup: &Path, spec: &VmSpec) -> Vec<OsString> {
        let mut listen = OsString::from("unix:");
        listen.push(agent_socket(run_dir));
        let mut port_forward = OsString::from("unix:");
        port_forward.push(port_forward_socket(run_dir));
        let mut args: Vec<OsString> = vec![
            "--listen".into(),
            listen,
            "--port-forward".into(),
            port_forward,
            "--pod-cgroup".into(),
            cgroup.into(),
        ];
        match (&spec.netns, spec.host_namespaces.network) {
            (_, true) => {}
            (Some(netns), false) => args.extend(["--netns".into(), netns.into()]),
            (None, false) => args.push("--own-netns".into()),
        }
        if !spec.host_namespaces.ipc {
            args.push("--own-ipc".into());
        }
        for dir in &spec.shared_dirs {
            let mut share = OsString::from(format!("{}=", dir.tag));
            share.push(&dir.host_path);
            args.extend(["--share".into(), share]);
        }
        args
    }
}

/// The mount point of the cgroup2 hierarchy in `/proc/self/mountinfo` text.
fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (fields, fs) = line.split_once(" - ")?;
        (fs.split(' ').next() == Some("cgroup2"))
            .then(|| fields.split(' ').nth(4))?
            .map(PathBuf::from)
    })
}

/// Enables in `dir`'s children every controller `dir` has (best effort: a controller that
/// cannot be delegated only means no limits of that kind).
fn delegate_controllers(dir: &Path) {
    let Ok(controllers) = std::fs::read_to_string(dir.join("cgroup.controllers")) else { return };
    let wanted: Vec<String> = controllers.split_whitespace().map(|c| format!("+{c}")).collect();
    if !wanted.is_empty() {
        if let Err(e) = std::fs::write(dir.join("cgroup.subtree_control"), wanted.join(" ")) {
            tracing::debug!(cgroup = %dir.display(), error = %e, "delegating cgroup controllers");
        }
    }
}

/// Every cgroup at and below `dir`, deepest first.
fn cgroups_deepest_first(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            found.extend(cgroups_deepest_first(&entry.path()));
        }
    }
    found.push(dir.to_path_buf());
    found
}

fn cgroup_is_empty(dir: &Path) -> bool {
    cgroups_deepest_first(dir).iter().all(|cg| {
        std::fs::read_to_string(cg.join("cgroup.procs"))
            .map(|p| p.trim().is_empty())
            .unwrap_or(true)
    })
}

/// Kills every process in the pod's cgroup and removes it (and its children). A cgroup that
/// is gone already is fine.
async fn kill_and_remove_cgroup(cgroup: &Path) -> Result<()> {
    if !cgroup.exists() {
        return Ok(());
    }
    if std::fs::write(cgroup.join("cgroup.kill"), "1").is_err() {
        // Kernels before 5.14 have no cgroup.kill: signal each process.
        for cg in cgroups_deepest_first(cgroup) {
            let procs = std::fs::read_to_string(cg.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.lines().filter_map(|p| p.trim().parse::<i32>().ok()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
    let deadline = Instant::now() + KILL_TIMEOUT;
    while !cgroup_is_empty(cgroup) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for cg in cgroups_deepest_first(cgroup) {
        match std::fs::remove_dir(&cg) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(HypervisorError::Stop(format!(
                    "removing the pod cgroup {}: {e}",
                    cg.display()
                )))
            }
            _ => {}
        }
    }
    Ok(())
}

/// Ready once the agent's socket accepts a connection.
struct SocketReady {
    path: PathBuf,
}

#[async_trait]
impl AgentReady for SocketReady {
    async fn wait(&self, timeout: Duration, vm_exited: BoxFuture<'static, ()>) -> Result<()> {
        let connect = async {
            while UnixStream::connect(&self.path).await.is_err() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::select! {
            () = connect => Ok(()),
            () = vm_exited => Err(HypervisorError::ExitedBeforeReady),
            () = tokio::time::sleep(timeout) => Err(HypervisorError::HostAgentNotReady {
                path: self.path.clone(),
                timeout,
            }),
        }
    }
}

/// Dials a host pod's agent and its port-forward listener on their unix sockets.
#[derive(Debug)]
struct HostAgentConnector {
    agent: PathBuf,
    port_forward: PathBuf,
}

async fn connect(path: &Path) -> Result<UnixStream> {
    UnixStream::connect(path)
        .await
        .map_err(|source| HypervisorError::HostAgentConnect { path: path.to_path_buf(), source })
}

#[async_trait]
impl GuestConnector for HostAgentConnector {
    async fn dial(&self) -> Result<UnixStream> {
        connect(&self.agent).await
    }

    async fn dial_port(&self, port: u32) -> Result<UnixStream> {
        if port != PORT_FORWARD_VSOCK_PORT {
            return Err(HypervisorError::NoHostPort { port });
        }
        connect(&self.port_forward).await
    }

    fn describe(&self) -> String {
        format!("host agent at {}", self.agent.display())
    }
}

#[async_trait]
impl Hypervisor for HostBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn template_refusal(&self, _spec: &VmSpec) -> Option<String> {
        Some("host pods run without a VM: there is nothing to start from a template".into())
    }

    async fn prepare(&self, sandbox_id: &str) -> Result<PreparedVm> {
        use std::os::unix::fs::DirBuilderExt;
        let run_dir = self.run_root.run_dir(sandbox_id)?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&run_dir)
            .map_err(|source| HypervisorError::RunDir { path: run_dir.clone(), source })?;
        let ready = SocketReady { path: agent_socket(&run_dir) };
        Ok(PreparedVm::new(run_dir, Box::new(ready)))
    }

    async fn start(&self, prepared: &PreparedVm, spec: &VmSpec) -> Result<VmHandle> {
        let run_dir = prepared.run_dir.clone();
        let cgroup = self.pod_cgroup(&run_dir);
        self.create_pod_cgroup(&cgroup)?;
        let socket = agent_socket(&run_dir);
        let _ = std::fs::remove_file(&socket);
        let mut starting = Starting::new("agent", self.startup_timeout, &run_dir);
        let args = self.agent_args(&run_dir, &cgroup, spec);
        let deadline = Instant::now() + self.startup_timeout;
        let started =
            match starting.spawn("agent", self.agent.as_os_str(), &args, run_dir.join("agent.log"))
            {
                Ok(()) => starting.wait_for_path("agent", &socket, deadline).await,
                Err(e) => Err(e),
            };
        if let Err(e) = started {
            starting.abort().await;
            let _ = kill_and_remove_cgroup(&cgroup).await;
            return Err(e);
        }
        Ok(VmHandle {
            backend: NAME.into(),
            run_dir,
            vsock_uds: socket,
            processes: starting.finish(),
        })
    }

    fn agent_connector(&self, vm: &VmHandle) -> Arc<dyn GuestConnector> {
        Arc::new(HostAgentConnector {
            agent: vm.vsock_uds.clone(),
            port_forward: port_forward_socket(&vm.run_dir),
        })
    }

    fn describe(&self, vm: &VmHandle) -> serde_json::Value {
        serde_json::json!({
            "backend": vm.backend,
            "processes": vm.processes,
            "agent_socket": vm.vsock_uds,
            "cgroup": self.pod_cgroup(&vm.run_dir),
        })
    }

    async fn reclaim_interrupted_start(&self, sandbox_id: &str) -> Result<()> {
        let run_dir = self.run_root.run_dir(sandbox_id)?;
        super::process::reclaim_interrupted_start(&run_dir).await?;
        kill_and_remove_cgroup(&self.pod_cgroup(&run_dir)).await
    }

    /// SIGTERM lets the agent remove its containers; then whatever is left in the pod's cgroup
    /// is killed.
    async fn stop(&self, vm: &VmHandle, grace: Duration) -> Result<()> {
        terminate_processes(&vm.processes, grace).await;
        kill_and_remove_cgroup(&self.pod_cgroup(&vm.run_dir)).await
    }

    async fn cleanup(&self, vm: &VmHandle) -> Result<()> {
        kill_and_remove_cgroup(&self.pod_cgroup(&vm.run_dir)).await?;
        remove_dir_if_exists(&vm.run_dir)
            .map_err(|source| HypervisorError::RunDir { path: vm.run_dir.clone(), source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup2_mount_is_found_on_hybrid_and_unified_hosts() {
        let hybrid = "25 24 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
                      26 25 0:23 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n\
                      27 25 0:24 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        assert_eq!(cgroup2_mount(hybrid), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        let unified = "30 24 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup2_mount(unified), Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(cgroup2_mount("27 25 0:24 / /x rw - cgroup cgroup rw\n"), None);
    }

    fn spec(host_network: bool, netns: Option<&str>) -> VmSpec {
        VmSpec {
            sandbox_id: "sb".into(),
            vcpus: 1,
            memory_mib: 128,
            kernel: PathBuf::new(),
            initrd: PathBuf::new(),
            extra_kernel_args: String::new(),
            console_log: PathBuf::new(),
            console_log_max_bytes: 0,
            shared_dirs: vec![super::super::SharedDir {
                tag: "podvisor".into(),
                host_path: "/state/sb/share/shared".into(),
                read_only: true,
                cache: "always".into(),
                ids: Default::default(),
            }],
            block_devices: vec![],
            net_devices: vec![],
            netns: netns.map(PathBuf::from),
            host_namespaces: super::super::HostNamespaces { network: host_network, ipc: false },
        }
    }

    #[test]
    fn the_agent_joins_the_namespaces_the_pod_asks_for() {
        let backend = HostBackend {
            agent: "/agent".into(),
            run_root: RunRoot("/run/vms".into()),
            cgroup_parent: "/cg/podvisor-host".into(),
            startup_timeout: Duration::from_secs(1),
        };
        let run = Path::new("/run/vms/sb");
        let text = |spec: &VmSpec| -> Vec<String> {
            backend
                .agent_args(run, &backend.pod_cgroup(run), spec)
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect()
        };
        let own = text(&spec(false, Some("/netns/sb")));
        assert_eq!(
            own,
            [
                "--listen",
                "unix:/run/vms/sb/agent.sock",
                "--port-forward",
                "unix:/run/vms/sb/portforward.sock",
                "--pod-cgroup",
                "/cg/podvisor-host/sb",
                "--netns",
                "/netns/sb",
                "--own-ipc",
                "--share",
                "podvisor=/state/sb/share/shared",
            ]
        );
        let host = text(&spec(true, None));
        assert!(!host.iter().any(|a| a.contains("netns")), "{host:?}");
        assert!(text(&spec(false, None)).contains(&"--own-netns".to_string()));
    }
}
