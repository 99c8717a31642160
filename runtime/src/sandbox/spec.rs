//! Builds the OCI runtime spec for a container from its [`ContainerSpec`] and its image's
//! config. The host builds the whole spec; the agent only fills in the rootfs path and cgroup
//! path.

use std::path::{Path, PathBuf};

use super::types::{ContainerSpec, NamespaceMode, Resources, SecurityContext};
use oci_spec::runtime::{
    Capability, LinuxCapabilitiesBuilder, LinuxCpuBuilder, LinuxMemoryBuilder, LinuxNamespace,
    LinuxNamespaceType, LinuxResourcesBuilder, Mount, MountBuilder, PosixRlimitBuilder,
    PosixRlimitType, Spec, UserBuilder,
};

/// Where the agent writes the pod's hostname/hosts/resolv.conf inside the guest.
pub const GUEST_SANDBOX_FILES: &str = "/run/podvisor/sandbox";

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("container config has no command and the image has no entrypoint or cmd")]
    NoCommand,
    #[error("user {0:?} not found in the image's /etc/passwd")]
    UnknownUser(String),
    #[error("group {0:?} not found in the image's /etc/group")]
    UnknownGroup(String),
    #[error("invalid user {0:?}")]
    InvalidUser(String),
    #[error("mount with an empty container path")]
    EmptyMountPath,
    #[error("the built spec has no process")]
    NoProcess,
    #[error("building the spec: {0}")]
    Build(#[from] oci_spec::OciSpecError),
    #[error("encoding the spec: {0}")]
    Encode(#[from] serde_json::Error),
}

/// What the container's image says about how to run it.
#[derive(Debug, Clone, Default)]
pub struct ImageDefaults {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: String,
    /// `user`, `uid`, `user:group`, `uid:gid`, as in the image config.
    pub user: String,
    /// The unpacked image root, for resolving user and group names.
    pub rootfs: PathBuf,
    /// The image's StopSignal, if it set one.
    pub stop_signal: Option<String>,
}

/// A mount the sandbox manager resolved to a guest path (volumes come through the share).
#[derive(Debug, Clone)]
pub struct GuestMount {
    pub guest_source: PathBuf,
    pub container_path: String,
    pub read_only: bool,
}

/// The default capabilities of a Kubernetes container (containerd's defaults).
const DEFAULT_CAPABILITIES: &[Capability] = &[
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fsetid,
    Capability::Fowner,
    Capability::Mknod,
    Capability::NetRaw,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setfcap,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::SysChroot,
    Capability::Kill,
    Capability::AuditWrite,
];

/// The process's argv by Kubernetes' rules: `command` replaces the entrypoint, `args` the cmd.
pub fn process_args(
    config: &ContainerSpec,
    image: &ImageDefaults,
) -> Result<Vec<String>, SpecError> {
    let args = if !config.command.is_empty() {
        config.command.iter().chain(config.args.iter()).cloned().collect::<Vec<_>>()
    } else if !config.args.is_empty() {
        image.entrypoint.iter().chain(config.args.iter()).cloned().collect()
    } else {
        image.entrypoint.iter().chain(image.cmd.iter()).cloned().collect()
    };
    if args.is_empty() {
        return Err(SpecError::NoCommand);
    }
    Ok(args)
}

/// Image env first, then the container's, a later key replacing an earlier one.
pub fn merge_env(image_env: &[String], config: &ContainerSpec) -> Vec<String> {
    let mut merged: Vec<(String, String)> = Vec::new();
    let pairs = image_env
        .iter()
        .map(|kv| (kv.split('=').next().unwrap_or_default().to_string(), kv.clone()))
        .chain(config.envs.iter().map(|(k, v)| (k.clone(), format!("{k}={v}"))));
    for (key, entry) in pairs {
        match merged.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = entry,
            None => merged.push((key, entry)),
        }
    }
    if !merged.iter().any(|(k, _)| k == "PATH") {
        merged.push((
            "PATH".into(),
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        ));
    }
    merged.into_iter().map(|(_, entry)| entry).collect()
}

/// The resolved identity of the container's process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
}

/// Resolves the process identity: the security context's run_as_user/run_as_username/
/// run_as_group, else the image's User; names are looked up in the image's /etc/passwd and
/// /etc/group (the host reads the unpacked image, so the agent never has to).
pub fn resolve_identity(
    security: &SecurityContext,
    image: &ImageDefaults,
) -> Result<Identity, SpecError> {
    let passwd = std::fs::read_to_string(image.rootfs.join("etc/passwd")).unwrap_or_default();
    let group = std::fs::read_to_string(image.rootfs.join("etc/group")).unwrap_or_default();

    let (user_part, group_part): (String, Option<String>) = match security {
        SecurityContext { run_as_user: Some(uid), .. } => (uid.to_string(), None),
        sc if !sc.run_as_username.is_empty() => (sc.run_as_username.clone(), None),
        _ => match image.user.split_once(':') {
            Some((u, g)) => (u.to_string(), Some(g.to_string())),
            None => (image.user.clone(), None),
        },
    };
    let (uid, mut gid, username) = if user_part.is_empty() {
        (0, 0, Some("root".to_string()))
    } else if let Ok(uid) = user_part.parse::<u32>() {
        // A numeric uid need not exist in passwd; its primary group then is the uid's entry or 0.
        let entry = passwd_entries(&passwd).find(|e| e.1 == uid);
        (uid, entry.as_ref().map(|e| e.2).unwrap_or(0), entry.map(|e| e.0))
    } else {
        let entry = passwd_entries(&passwd)
            .find(|e| e.0 == user_part)
            .ok_or_else(|| SpecError::UnknownUser(user_part.clone()))?;
        (entry.1, entry.2, Some(entry.0))
    };
    if let Some(g) = group_part.filter(|g| !g.is_empty()) {
        gid = match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => group_entries(&group)
                .find(|e| e.0 == g)
                .map(|e| e.1)
                .ok_or(SpecError::UnknownGroup(g))?,
        };
    }
    if let Some(rg) = security.run_as_group {
        gid = u32::try_from(rg).map_err(|_| SpecError::InvalidUser(rg.to_string()))?;
    }
    let mut additional_gids: Vec<u32> = Vec::new();
    if let Some(name) = username {
        for (_, g, members) in group_entries(&group) {
            if g != gid && members.contains(&name) {
                additional_gids.push(g);
            }
        }
    }
    for g in &security.supplemental_groups {
        let g = u32::try_from(*g).map_err(|_| SpecError::InvalidUser(g.to_string()))?;
        if !additional_gids.contains(&g) {
            additional_gids.push(g);
        }
    }
    Ok(Identity { uid, gid, additional_gids })
}

/// (name, uid, gid) per line of an /etc/passwd.
fn passwd_entries(text: &str) -> impl Iterator<Item = (String, u32, u32)> + '_ {
    text.lines().filter_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 4 {
            return None;
        }
        Some((f[0].to_string(), f[2].parse().ok()?, f[3].parse().ok()?))
    })
}

/// (name, gid, members) per line of an /etc/group.
fn group_entries(text: &str) -> impl Iterator<Item = (String, u32, Vec<String>)> + '_ {
    text.lines().filter_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 3 {
            return None;
        }
        let members = f
            .get(3)
            .map(|m| m.split(',').filter(|s| !s.is_empty()).map(String::from).collect())
            .unwrap_or_default();
        Some((f[0].to_string(), f[2].parse().ok()?, members))
    })
}

fn bind_mount(source: &Path, destination: &str, read_only: bool) -> Result<Mount, SpecError> {
    let mut options = vec!["rbind".to_string(), "rprivate".to_string()];
    options.push(if read_only { "ro" } else { "rw" }.to_string());
    Ok(MountBuilder::default()
        .destination(destination)
        .typ("bind")
        .source(source)
        .options(options)
        .build()?)
}

/// Inputs of [`build_spec`] that come from the sandbox.
#[derive(Debug, Clone)]
pub struct SandboxContext {
    /// The pod's PID namespace mode.
    pub pid_mode: NamespaceMode,
}

/// Builds the container's OCI spec as JSON.
pub fn build_spec(
    config: &ContainerSpec,
    image: &ImageDefaults,
    sandbox: &SandboxContext,
    mounts: &[GuestMount],
) -> Result<Vec<u8>, SpecError> {
    let mut spec = Spec::default();
    let security = &config.security;
    let identity = resolve_identity(security, image)?;
    let privileged = security.privileged;

    let mut process = spec.process().clone().unwrap_or_default();
    process.set_args(Some(process_args(config, image)?));
    process.set_env(Some(merge_env(&image.env, config)));
    let cwd = if !config.working_dir.is_empty() {
        config.working_dir.clone()
    } else if !image.working_dir.is_empty() {
        image.working_dir.clone()
    } else {
        "/".to_string()
    };
    process.set_cwd(PathBuf::from(cwd));
    process.set_terminal(Some(config.tty));
    process.set_user(
        UserBuilder::default()
            .uid(identity.uid)
            .gid(identity.gid)
            .additional_gids(identity.additional_gids.clone())
            .build()?,
    );
    process.set_no_new_privileges(Some(security.no_new_privs));
    process.set_rlimits(Some(vec![PosixRlimitBuilder::default()
        .typ(PosixRlimitType::RlimitNofile)
        .hard(1_048_576u64)
        .soft(1_048_576u64)
        .build()?]));

    // Capabilities: the defaults, plus/minus the security context; privileged gets them all.
    let mut caps: Vec<Capability> =
        if privileged { all_capabilities() } else { DEFAULT_CAPABILITIES.to_vec() };
    {
        let c = security;
        let parse = |name: &str| -> Option<Capability> {
            let n = name.trim().to_ascii_uppercase();
            let n = if n.starts_with("CAP_") { n } else { format!("CAP_{n}") };
            serde_json::from_value(serde_json::Value::String(n)).ok()
        };
        if c.add_capabilities.iter().any(|n| n.eq_ignore_ascii_case("ALL")) {
            caps = all_capabilities();
        } else {
            for cap in c.add_capabilities.iter().filter_map(|n| parse(n)) {
                if !caps.contains(&cap) {
                    caps.push(cap);
                }
            }
        }
        if c.drop_capabilities.iter().any(|n| n.eq_ignore_ascii_case("ALL")) {
            caps.clear();
        } else {
            let drop: Vec<Capability> =
                c.drop_capabilities.iter().filter_map(|n| parse(n)).collect();
            caps.retain(|cap| !drop.contains(cap));
        }
    }
    let cap_set: oci_spec::runtime::Capabilities = caps.into_iter().collect();
    process.set_capabilities(Some(
        LinuxCapabilitiesBuilder::default()
            .bounding(cap_set.clone())
            .effective(cap_set.clone())
            .permitted(cap_set)
            .build()?,
    ));
    spec.set_process(Some(process));
    // The container shares the VM's UTS namespace, whose hostname the agent set to the pod's;
    // runtimes refuse a hostname without a private UTS namespace.
    spec.set_hostname(None);

    if let Some(root) = spec.root_mut() {
        root.set_readonly(Some(security.readonly_rootfs));
    }

    // Mounts: the defaults, the pod's hostname/hosts/resolv.conf, then the CRI mounts
    // (which may replace a default at the same path).
    let mut all_mounts: Vec<Mount> = spec.mounts().clone().unwrap_or_default();
    if privileged {
        for m in all_mounts.iter_mut() {
            if m.destination() == Path::new("/sys")
                || m.destination() == Path::new("/sys/fs/cgroup")
            {
                let opts: Vec<String> = m
                    .options()
                    .clone()
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|o| o != "ro")
                    .collect();
                m.set_options(Some(opts));
            }
        }
    }
    let files = Path::new(GUEST_SANDBOX_FILES);
    for (file, dest) in [
        ("hostname", "/etc/hostname"),
        ("hosts", "/etc/hosts"),
        ("resolv.conf", "/etc/resolv.conf"),
    ] {
        if !mounts.iter().any(|m| m.container_path == dest) {
            all_mounts.push(bind_mount(&files.join(file), dest, false)?);
        }
    }
    for m in mounts {
        if m.container_path.is_empty() {
            return Err(SpecError::EmptyMountPath);
        }
        all_mounts.retain(|existing| existing.destination() != Path::new(&m.container_path));
        all_mounts.push(bind_mount(&m.guest_source, &m.container_path, m.read_only)?);
    }
    spec.set_mounts(Some(all_mounts));

    if let Some(linux) = spec.linux_mut() {
        // The VM is the pod: containers share its network, IPC and UTS namespaces; each gets
        // its own mount and cgroup namespaces, and a PID namespace unless the pod shares one
        // (POD: the agent joins them to the pod's, held by a pause process; NODE: the VM's).
        let keep_pid = sandbox.pid_mode == NamespaceMode::Container;
        let namespaces: Vec<LinuxNamespace> = linux
            .namespaces()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .filter(|ns| match ns.typ() {
                LinuxNamespaceType::Network | LinuxNamespaceType::Ipc | LinuxNamespaceType::Uts => {
                    false
                }
                LinuxNamespaceType::Pid => keep_pid,
                _ => true,
            })
            .collect();
        linux.set_namespaces(Some(namespaces));
        if privileged {
            linux.set_masked_paths(None);
            linux.set_readonly_paths(None);
        }
        if let Some(res) = &config.resources {
            linux.set_resources(Some(resources(res)?));
        }
    }
    Ok(serde_json::to_vec(&spec)?)
}

/// Resources as the OCI `LinuxResources` JSON that UpdateContainer takes.
pub fn resources_json(r: &Resources) -> Result<Vec<u8>, SpecError> {
    Ok(serde_json::to_vec(&resources(r)?)?)
}

/// The process of a built spec, as JSON: execs start from it (env, user, cwd).
pub fn process_of(spec_json: &[u8]) -> Result<String, SpecError> {
    let spec: serde_json::Value = serde_json::from_slice(spec_json)?;
    spec.get("process").map(|p| p.to_string()).ok_or(SpecError::NoProcess)
}

fn all_capabilities() -> Vec<Capability> {
    use Capability::*;
    vec![
        AuditControl,
        AuditRead,
        AuditWrite,
        BlockSuspend,
        Bpf,
        CheckpointRestore,
        Chown,
        DacOverride,
        DacReadSearch,
        Fowner,
        Fsetid,
        IpcLock,
        IpcOwner,
        Kill,
        Lease,
        LinuxImmutable,
        MacAdmin,
        MacOverride,
        Mknod,
        NetAdmin,
        NetBindService,
        NetBroadcast,
        NetRaw,
        Perfmon,
        Setgid,
        Setfcap,
        Setpcap,
        Setuid,
        SysAdmin,
        SysBoot,
        SysChroot,
        SysModule,
        SysNice,
        SysPacct,
        SysPtrace,
        SysRawio,
        SysResource,
        SysTime,
        SysTtyConfig,
        Syslog,
        WakeAlarm,
    ]
}

/// CRI Linux resources → OCI cgroup resources (applied by the agent inside the guest).
fn resources(r: &Resources) -> Result<oci_spec::runtime::LinuxResources, SpecError> {
    let mut cpu = LinuxCpuBuilder::default();
    if r.cpu_shares > 0 {
        cpu = cpu.shares(r.cpu_shares as u64);
    }
    if r.cpu_quota > 0 {
        cpu = cpu.quota(r.cpu_quota);
    }
    if r.cpu_period > 0 {
        cpu = cpu.period(r.cpu_period as u64);
    }
    if !r.cpuset_cpus.is_empty() {
        cpu = cpu.cpus(r.cpuset_cpus.clone());
    }
    if !r.cpuset_mems.is_empty() {
        cpu = cpu.mems(r.cpuset_mems.clone());
    }
    let mut memory = LinuxMemoryBuilder::default();
    if r.memory_limit_bytes > 0 {
        memory = memory.limit(r.memory_limit_bytes);
    }
    if r.memory_swap_limit_bytes > 0 {
        memory = memory.swap(r.memory_swap_limit_bytes);
    }
    let mut builder = LinuxResourcesBuilder::default().cpu(cpu.build()?).memory(memory.build()?);
    if !r.unified.is_empty() {
        builder = builder
            .unified(r.unified.clone().into_iter().collect::<std::collections::HashMap<_, _>>());
    }
    Ok(builder.build()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(dir: &Path) -> ImageDefaults {
        std::fs::create_dir_all(dir.join("etc")).unwrap();
        std::fs::write(
            dir.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nweb:x:1000:1001::/home/web:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(dir.join("etc/group"), "root:x:0:\nweb:x:1001:\nextra:x:2000:web\n")
            .unwrap();
        ImageDefaults {
            entrypoint: vec!["/entry".into()],
            cmd: vec!["serve".into()],
            env: vec!["PATH=/bin".into(), "A=image".into()],
            working_dir: "/srv".into(),
            user: String::new(),
            rootfs: dir.to_path_buf(),
            stop_signal: None,
        }
    }

    #[test]
    fn args_follow_kubernetes_rules() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(dir.path());
        let mut c = ContainerSpec::default();
        assert_eq!(process_args(&c, &img).unwrap(), vec!["/entry", "serve"]);
        c.args = vec!["x".into()];
        assert_eq!(process_args(&c, &img).unwrap(), vec!["/entry", "x"]);
        c.command = vec!["/bin/sh".into()];
        assert_eq!(process_args(&c, &img).unwrap(), vec!["/bin/sh", "x"]);
        let empty = ImageDefaults::default();
        assert!(matches!(
            process_args(&ContainerSpec::default(), &empty),
            Err(SpecError::NoCommand)
        ));
    }

    #[test]
    fn env_is_merged_by_key() {
        let c = ContainerSpec {
            envs: vec![("A".into(), "pod".into()), ("B".into(), "1".into())],
            ..Default::default()
        };
        assert_eq!(
            merge_env(&["PATH=/bin".into(), "A=image".into()], &c),
            vec!["PATH=/bin", "A=pod", "B=1"]
        );
    }

    #[test]
    fn identity_from_image_user_and_security_context() {
        let dir = tempfile::tempdir().unwrap();
        let mut img = image(dir.path());
        assert_eq!(
            resolve_identity(&SecurityContext::default(), &img).unwrap(),
            Identity { uid: 0, gid: 0, additional_gids: vec![] }
        );
        img.user = "web".into();
        assert_eq!(
            resolve_identity(&SecurityContext::default(), &img).unwrap(),
            Identity { uid: 1000, gid: 1001, additional_gids: vec![2000] }
        );
        img.user = "1234:1234".into();
        assert_eq!(
            resolve_identity(&SecurityContext::default(), &img).unwrap(),
            Identity { uid: 1234, gid: 1234, additional_gids: vec![] }
        );
        img.user = "nobody-here".into();
        assert!(matches!(
            resolve_identity(&SecurityContext::default(), &img),
            Err(SpecError::UnknownUser(_))
        ));
        let sc = SecurityContext {
            run_as_user: Some(7),
            run_as_group: Some(8),
            supplemental_groups: vec![9],
            ..Default::default()
        };
        assert_eq!(
            resolve_identity(&sc, &img).unwrap(),
            Identity { uid: 7, gid: 8, additional_gids: vec![9] }
        );
    }

    #[test]
    fn spec_shares_pod_namespaces_and_mounts_sandbox_files() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(dir.path());
        let c = ContainerSpec { tty: true, ..Default::default() };
        let ctx = SandboxContext { pid_mode: NamespaceMode::Container };
        let json = build_spec(&c, &img, &ctx, &[]).unwrap();
        let spec: Spec = serde_json::from_slice(&json).unwrap();
        let ns: Vec<LinuxNamespaceType> = spec
            .linux()
            .as_ref()
            .unwrap()
            .namespaces()
            .as_ref()
            .unwrap()
            .iter()
            .map(|n| n.typ())
            .collect();
        assert!(ns.contains(&LinuxNamespaceType::Pid));
        assert!(ns.contains(&LinuxNamespaceType::Mount));
        assert!(!ns.contains(&LinuxNamespaceType::Network));
        assert!(!ns.contains(&LinuxNamespaceType::Uts));
        assert_eq!(spec.hostname().as_deref(), None);
        assert_eq!(spec.process().as_ref().unwrap().cwd(), Path::new("/srv"));
        assert!(spec
            .mounts()
            .as_ref()
            .unwrap()
            .iter()
            .any(|m| m.destination() == Path::new("/etc/resolv.conf")));
    }
}
