//! Host-pod mode: the agent of a pod on the daemon's `host` handler runs on the host itself,
//! not in a VM, and must leave the host as it found it. Before any thread starts it moves into
//! the pod's cgroup (which the daemon kills and removes at stop), joins the pod's network
//! namespace unless the pod uses the host's, and unshares a mount namespace (plus IPC and UTS
//! ones when the pod has its own) in which it arranges what a guest would look like:
//!
//! - `/` becomes a slave, so host mounts still propagate in and nothing done here leaks out;
//! - the pod's cgroup is bind-mounted at `/sys/fs/cgroup`, where libcontainer wants cgroup2
//!   (on a hybrid host it is only at `/sys/fs/cgroup/unified`): containers' cgroups are
//!   created below the pod's;
//! - a tmpfs covers `/run` so that `/run/podvisor` is the agent's, as in a guest; the pod's
//!   shares are bound at their guest paths there at CreateSandbox (from descriptors opened
//!   before `/run` was covered).
//!
//! Nothing here mounts over a host path outside this namespace, sets the clock or reboots;
//! hostname and sysctls are only set in namespaces the pod owns.

use std::collections::HashMap;
use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::fcntl::{open, OFlag};
use nix::mount::{mount, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use nix::sys::stat::Mode;
use podvisor_proto::agent::CreateSandboxRequest;

/// The guest's run directory, which the tmpfs over `/run` provides.
pub const RUN_DIR: &str = "/run/podvisor";

/// Sysctls that live in a pod's IPC namespace (as kubelet lists them), beside `fs.mqueue.*`.
const IPC_SYSCTLS: [&str; 8] = [
    "kernel.shmmax",
    "kernel.shmall",
    "kernel.shmmni",
    "kernel.shm_rmid_forced",
    "kernel.msgmax",
    "kernel.msgmnb",
    "kernel.msgmni",
    "kernel.sem",
];

#[derive(Debug, thiserror::Error)]
pub enum HostPodError {
    #[error("--share must be TAG=PATH, got {0:?}")]
    BadShareArg(String),
    #[error("joining the pod cgroup {0}: {1}")]
    JoinCgroup(PathBuf, std::io::Error),
    #[error("opening {0}: {1}")]
    Open(PathBuf, nix::Error),
    #[error("joining the network namespace {0}: {1}")]
    JoinNetns(PathBuf, nix::Error),
    #[error("unsharing namespaces: {0}")]
    Unshare(nix::Error),
    #[error("mounting {what} at {path}: {source}")]
    Mount { what: String, path: PathBuf, source: nix::Error },
    #[error("creating {0}: {1}")]
    CreateDir(PathBuf, std::io::Error),
    #[error("no share with tag {0:?} was given to this host-mode agent")]
    UnknownShare(String),
    #[error(
        "sysctl {0:?} is not in a namespace this pod owns: on the host handler it would change \
         the host"
    )]
    SysctlOutsidePod(String),
    #[error("bringing up loopback: {0}")]
    Loopback(String),
    #[error("setting the hostname: {0}")]
    SetHostname(nix::Error),
    #[error("setting sysctl {0}: {1}")]
    Sysctl(String, std::io::Error),
}

impl HostPodError {
    /// Whether the request, not the host, is at fault.
    pub fn is_bad_request(&self) -> bool {
        matches!(self, HostPodError::UnknownShare(_) | HostPodError::SysctlOutsidePod(_))
    }
}

/// What the daemon asks of a host pod's agent (its command-line options).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct HostPodArgs {
    /// Host pod: the pod's cgroup2 directory, which the agent joins and containers go under.
    #[arg(long, requires = "listen")]
    pub pod_cgroup: Option<PathBuf>,
    /// Host pod: the network namespace to join (none: the host's).
    #[arg(long, requires = "pod_cgroup")]
    pub netns: Option<PathBuf>,
    /// Host pod: a new network namespace with only loopback (a pod with a network of its own
    /// when the daemon has no CNI networking).
    #[arg(long, requires = "pod_cgroup", conflicts_with = "netns")]
    pub own_netns: bool,
    /// Host pod: an IPC namespace of its own (otherwise the host's).
    #[arg(long, requires = "pod_cgroup")]
    pub own_ipc: bool,
    /// Host pod: a share the guest would mount, `TAG=HOST_PATH` (repeatable).
    #[arg(long = "share", requires = "pod_cgroup")]
    pub shares: Vec<String>,
}

/// The namespaces and shares of a host pod's agent, once entered.
#[derive(Debug)]
pub struct HostPod {
    own_network: bool,
    own_ipc: bool,
    /// Its own UTS namespace (a pod with its own network; a hostNetwork pod has the host's).
    own_uts: bool,
    /// Share tag → its host directory, opened before `/run` was covered.
    shares: HashMap<String, OwnedFd>,
}

fn open_path(path: &Path) -> Result<OwnedFd, HostPodError> {
    let fd = open(path, OFlag::O_PATH | OFlag::O_CLOEXEC | OFlag::O_DIRECTORY, Mode::empty())
        .map_err(|e| HostPodError::Open(path.to_path_buf(), e))?;
    // SAFETY: `open` just returned this descriptor and nothing else owns it.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// The path through which a mount can take an `O_PATH` descriptor as its source.
fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

fn mount_err(what: &str, path: &Path) -> impl FnOnce(nix::Error) -> HostPodError {
    let (what, path) = (what.to_string(), path.to_path_buf());
    move |source| HostPodError::Mount { what, path, source }
}

fn parse_shares(args: &[String]) -> Result<Vec<(String, PathBuf)>, HostPodError> {
    args.iter()
        .map(|arg| match arg.split_once('=') {
            Some((tag, path)) if !tag.is_empty() && path.starts_with('/') => {
                Ok((tag.to_string(), PathBuf::from(path)))
            }
            _ => Err(HostPodError::BadShareArg(arg.clone())),
        })
        .collect()
}

/// Moves this process into `<pod_cgroup>/agent` (a leaf: cgroup2 keeps processes out of
/// cgroups with enabled controllers below them).
fn join_cgroup(pod_cgroup: &Path) -> Result<(), HostPodError> {
    let leaf = pod_cgroup.join("agent");
    let err = |e| HostPodError::JoinCgroup(leaf.clone(), e);
    fs::create_dir_all(&leaf).map_err(err)?;
    fs::write(leaf.join("cgroup.procs"), std::process::id().to_string()).map_err(err)
}

/// Enters the pod's namespaces and lays out its mount namespace. Call before any thread exists
/// (a multi-threaded process cannot unshare its mount namespace).
pub fn enter(pod_cgroup: &Path, args: &HostPodArgs) -> Result<HostPod, HostPodError> {
    let shares = parse_shares(&args.shares)?;
    join_cgroup(pod_cgroup)?;
    if let Some(netns) = &args.netns {
        let fd = open(netns, OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty())
            .map_err(|e| HostPodError::Open(netns.clone(), e))?;
        // SAFETY: `open` just returned this descriptor and nothing else owns it.
        let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        setns(&fd, CloneFlags::CLONE_NEWNET)
            .map_err(|e| HostPodError::JoinNetns(netns.clone(), e))?;
    }
    let own_network = args.netns.is_some() || args.own_netns;
    let mut flags = CloneFlags::CLONE_NEWNS;
    if args.own_netns {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    if args.own_ipc {
        flags |= CloneFlags::CLONE_NEWIPC;
    }
    if own_network {
        flags |= CloneFlags::CLONE_NEWUTS;
    }
    unshare(flags).map_err(HostPodError::Unshare)?;
    if own_network {
        // As in a guest: CNI configures eth0, loopback is the pod's to bring up.
        crate::init::loopback_up().map_err(|e| HostPodError::Loopback(e.to_string()))?;
    }
    let root = Path::new("/");
    mount(None::<&str>, root, None::<&str>, MsFlags::MS_REC | MsFlags::MS_SLAVE, None::<&str>)
        .map_err(mount_err("slave propagation", root))?;
    // Opened here, not before unsharing: a bind's source must be in the caller's namespace.
    let cgroup = open_path(pod_cgroup)?;
    let shares = shares
        .into_iter()
        .map(|(tag, path)| open_path(&path).map(|fd| (tag, fd)))
        .collect::<Result<HashMap<_, _>, _>>()?;
    let cgroup_root = Path::new("/sys/fs/cgroup");
    mount(Some(&fd_path(&cgroup)), cgroup_root, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .map_err(mount_err("the pod cgroup", cgroup_root))?;
    let run = Path::new("/run");
    mount(
        Some("tmpfs"),
        run,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )
    .map_err(mount_err("tmpfs", run))?;
    Ok(HostPod { own_network, own_ipc: args.own_ipc, own_uts: own_network, shares })
}

impl HostPod {
    /// What CreateSandbox does on a host pod beyond writing the pod's files: the hostname and
    /// sysctls in the namespaces the pod owns, and the shares at their guest paths.
    pub fn create_sandbox(&self, req: &CreateSandboxRequest) -> Result<(), HostPodError> {
        let sysctls = req
            .sysctls
            .iter()
            .map(|(name, value)| self.sysctl_in_pod(name).map(|path| (name, path, value)))
            .collect::<Result<Vec<_>, _>>()?;
        for share in &req.shared_fs {
            if !self.shares.contains_key(&share.tag) {
                return Err(HostPodError::UnknownShare(share.tag.clone()));
            }
        }
        if self.own_uts && !req.hostname.is_empty() {
            nix::unistd::sethostname(&req.hostname).map_err(HostPodError::SetHostname)?;
        }
        for (name, path, value) in sysctls {
            fs::write(&path, value).map_err(|e| HostPodError::Sysctl(name.clone(), e))?;
        }
        for share in &req.shared_fs {
            self.bind_share(&share.tag, Path::new(&share.guest_path), share.read_only)?;
        }
        Ok(())
    }

    /// A sysctl's /proc/sys path if it lives in a namespace of the pod's own.
    fn sysctl_in_pod(&self, name: &str) -> Result<PathBuf, HostPodError> {
        let path = crate::sandbox::sysctl_path(name)
            .map_err(|_| HostPodError::SysctlOutsidePod(name.to_string()))?;
        let in_netns = self.own_network && name.starts_with("net.");
        let in_ipc =
            self.own_ipc && (IPC_SYSCTLS.contains(&name) || name.starts_with("fs.mqueue."));
        if in_netns || in_ipc {
            Ok(path)
        } else {
            Err(HostPodError::SysctlOutsidePod(name.to_string()))
        }
    }

    /// Binds a share's host directory at `guest_path` (below [`RUN_DIR`], on this namespace's
    /// tmpfs); the bind is a slave of the daemon's, so images it binds later show up here.
    fn bind_share(
        &self,
        tag: &str,
        guest_path: &Path,
        read_only: bool,
    ) -> Result<(), HostPodError> {
        let fd = self.shares.get(tag).ok_or_else(|| HostPodError::UnknownShare(tag.to_string()))?;
        if is_mount_point(guest_path) {
            return Ok(());
        }
        fs::create_dir_all(guest_path)
            .map_err(|e| HostPodError::CreateDir(guest_path.to_path_buf(), e))?;
        let source = fd_path(fd);
        mount(
            Some(&source),
            guest_path,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(mount_err(tag, guest_path))?;
        if read_only {
            let flags = MsFlags::MS_BIND
                | MsFlags::MS_REMOUNT
                | MsFlags::MS_RDONLY
                | MsFlags::MS_NOSUID
                | MsFlags::MS_NODEV;
            mount(None::<&str>, guest_path, None::<&str>, flags, None::<&str>)
                .map_err(mount_err("read-only", guest_path))?;
        }
        Ok(())
    }
}

/// Lowers the process's rlimits to the agent's own hard limits unless the agent may raise
/// them (CAP_SYS_RESOURCE): the spec's limits are a VM's, and on the host the host's own
/// limits bound them (a root without that capability, as in some containers, cannot exceed
/// them).
pub fn fit_rlimits(process: &mut oci_spec::runtime::Process) {
    if has_sys_resource() {
        return;
    }
    let Some(rlimits) = process.rlimits().clone() else { return };
    let fitted = rlimits
        .into_iter()
        .map(|limit| {
            let Some(ours) = own_hard_limit(limit.typ()) else { return limit };
            if limit.hard() <= ours {
                return limit;
            }
            tracing::info!(rlimit = ?limit.typ(), asked = limit.hard(), host = ours, "lowering an rlimit to the host's");
            oci_spec::runtime::PosixRlimitBuilder::default()
                .typ(limit.typ())
                .hard(ours)
                .soft(limit.soft().min(ours))
                .build()
                .unwrap_or(limit)
        })
        .collect();
    process.set_rlimits(Some(fitted));
}

/// CAP_SYS_RESOURCE's bit in the capability sets.
const CAP_SYS_RESOURCE: u32 = 24;

/// Whether this process's effective set holds CAP_SYS_RESOURCE.
fn has_sys_resource() -> bool {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_SYS_RESOURCE) != 0)
}

fn own_hard_limit(typ: oci_spec::runtime::PosixRlimitType) -> Option<u64> {
    use oci_spec::runtime::PosixRlimitType as T;
    let resource = match typ {
        T::RlimitNofile => libc::RLIMIT_NOFILE,
        T::RlimitNproc => libc::RLIMIT_NPROC,
        T::RlimitCore => libc::RLIMIT_CORE,
        T::RlimitMemlock => libc::RLIMIT_MEMLOCK,
        T::RlimitStack => libc::RLIMIT_STACK,
        T::RlimitFsize => libc::RLIMIT_FSIZE,
        T::RlimitData => libc::RLIMIT_DATA,
        T::RlimitAs => libc::RLIMIT_AS,
        T::RlimitCpu => libc::RLIMIT_CPU,
        T::RlimitLocks => libc::RLIMIT_LOCKS,
        T::RlimitMsgqueue => libc::RLIMIT_MSGQUEUE,
        T::RlimitNice => libc::RLIMIT_NICE,
        T::RlimitRtprio => libc::RLIMIT_RTPRIO,
        T::RlimitRttime => libc::RLIMIT_RTTIME,
        T::RlimitSigpending => libc::RLIMIT_SIGPENDING,
        T::RlimitRss => libc::RLIMIT_RSS,
    };
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into `limit`, which lives for the call; the result is checked.
    (unsafe { libc::getrlimit(resource, &mut limit) } == 0).then_some(limit.rlim_max)
}

/// Drops the resource limits whose cgroup controller the pod's cgroup does not have (a hybrid
/// host has none on cgroup2): libcontainer would fail the create on the missing files, and a
/// system pod must still run; the limits are then not enforced (logged, and documented).
pub fn drop_unavailable_resources(linux: &mut oci_spec::runtime::Linux, cgroup_root: &Path) {
    let Some(mut resources) = linux.resources().clone() else { return };
    let text = fs::read_to_string(cgroup_root.join("cgroup.controllers")).unwrap_or_default();
    let has = |c: &str| text.split_whitespace().any(|have| have == c);
    let mut dropped = Vec::new();
    if let Some(cpu) = resources.cpu().clone() {
        let (cpu_ok, cpuset_ok) = (has("cpu"), has("cpuset"));
        let mut kept = oci_spec::runtime::LinuxCpuBuilder::default();
        if cpu_ok {
            if let Some(shares) = cpu.shares() {
                kept = kept.shares(shares);
            }
            if let Some(quota) = cpu.quota() {
                kept = kept.quota(quota);
            }
            if let Some(period) = cpu.period() {
                kept = kept.period(period);
            }
        } else {
            dropped.push("cpu");
        }
        if cpuset_ok {
            if let Some(cpus) = cpu.cpus() {
                kept = kept.cpus(cpus.clone());
            }
            if let Some(mems) = cpu.mems() {
                kept = kept.mems(mems.clone());
            }
        } else if cpu.cpus().is_some() || cpu.mems().is_some() {
            dropped.push("cpuset");
        }
        resources.set_cpu(if cpu_ok || cpuset_ok { kept.build().ok() } else { None });
    }
    if resources.memory().is_some() && !has("memory") {
        resources.set_memory(None);
        dropped.push("memory");
    }
    if resources.pids().is_some() && !has("pids") {
        resources.set_pids(None);
        dropped.push("pids");
    }
    if resources.block_io().is_some() && !has("io") {
        resources.set_block_io(None);
        dropped.push("io");
    }
    if let Some(unified) = resources.unified().clone() {
        let kept: HashMap<String, String> = unified
            .into_iter()
            .filter(|(key, _)| {
                key.starts_with("cgroup.") || key.split('.').next().is_some_and(&has)
            })
            .collect();
        resources.set_unified(Some(kept));
    }
    if !dropped.is_empty() {
        tracing::warn!(
            ?dropped,
            "the host's cgroup2 lacks these controllers: their limits are not enforced"
        );
    }
    linux.set_resources(Some(resources));
}

/// Whether `path` is a mount point (its device differs from its parent's).
fn is_mount_point(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (fs::metadata(path), path.parent().map(fs::metadata)) {
        (Ok(m), Some(Ok(parent))) => m.dev() != parent.dev(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(own_network: bool, own_ipc: bool) -> HostPod {
        HostPod { own_network, own_ipc, own_uts: own_network, shares: HashMap::new() }
    }

    #[test]
    fn only_sysctls_of_namespaces_the_pod_owns_are_set() {
        let own = pod(true, true);
        assert!(own.sysctl_in_pod("net.ipv4.ip_unprivileged_port_start").is_ok());
        assert!(own.sysctl_in_pod("kernel.shmmax").is_ok());
        assert!(own.sysctl_in_pod("fs.mqueue.msg_max").is_ok());
        for host_wide in ["kernel.panic", "vm.overcommit_memory", "fs.file-max", "net/../x"] {
            assert!(own.sysctl_in_pod(host_wide).is_err(), "{host_wide}");
        }
        let host = pod(false, false);
        assert!(host.sysctl_in_pod("net.ipv4.ip_forward").is_err());
        assert!(host.sysctl_in_pod("kernel.shmmax").is_err());
    }

    #[test]
    fn limits_of_missing_controllers_are_dropped_and_the_others_kept() {
        let spec: oci_spec::runtime::Linux = serde_json::from_value(serde_json::json!({
            "resources": {
                "cpu": {"quota": 50000, "period": 100000, "cpus": "0"},
                "memory": {"limit": 67108864},
                "pids": {"limit": 100},
                "unified": {"memory.high": "1M", "pids.max": "50"}
            }
        }))
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("cgroup.controllers"), "cpu pids\n").unwrap();
        let mut linux = spec.clone();
        drop_unavailable_resources(&mut linux, dir.path());
        let res = linux.resources().clone().unwrap();
        let cpu = res.cpu().clone().unwrap();
        assert_eq!(
            (cpu.quota(), cpu.period(), cpu.cpus().clone()),
            (Some(50000), Some(100000), None)
        );
        assert!(res.memory().is_none());
        assert_eq!(res.pids().as_ref().map(|p| p.limit()), Some(100));
        let unified = res.unified().clone().unwrap();
        assert_eq!(unified.keys().collect::<Vec<_>>(), ["pids.max"]);
        // Nothing available (a hybrid host): no limits at all.
        fs::write(dir.path().join("cgroup.controllers"), "").unwrap();
        let mut linux = spec;
        drop_unavailable_resources(&mut linux, dir.path());
        let res = linux.resources().clone().unwrap();
        assert!(res.cpu().is_none() && res.memory().is_none() && res.pids().is_none());
    }

    #[test]
    fn share_arguments_are_tag_and_absolute_path() {
        let got = parse_shares(&["podvisor=/a/b".into()]).unwrap();
        assert_eq!(got, [("podvisor".to_string(), PathBuf::from("/a/b"))]);
        for bad in ["podvisor", "=/a", "tag=relative"] {
            assert!(parse_shares(&[bad.into()]).is_err(), "{bad}");
        }
    }
}
