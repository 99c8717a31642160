//! Builds the OCI runtime spec for a container from its [`ContainerSpec`] and its image's
//! config. The host builds the whole spec; the agent only fills in the rootfs path and cgroup
//! path.

use std::path::{Path, PathBuf};

use super::seccomp::{self, SeccompError};
use super::types::{
    ContainerSpec, IdMapping, NamespaceMode, Propagation, Resources, SeccompProfile,
    SecurityContext, SupplementalGroupsPolicy, UserNamespace,
};
use oci_spec::runtime::{
    Capability, Linux, LinuxCapabilities, LinuxCapabilitiesBuilder, LinuxCpuBuilder,
    LinuxDeviceCgroupBuilder, LinuxIdMapping, LinuxIdMappingBuilder, LinuxMemoryBuilder,
    LinuxNamespace, LinuxNamespaceBuilder, LinuxNamespaceType, LinuxResourcesBuilder, LinuxSeccomp,
    Mount, MountBuilder, PosixRlimitBuilder, PosixRlimitType, Process, Spec, UserBuilder,
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
    #[error("invalid user or group id {0}: ids are 0..=4294967295")]
    InvalidId(i64),
    #[error("capabilities.{field}: unknown capability {name:?}")]
    UnknownCapability { field: &'static str, name: String },
    #[error("{field}: {path:?} is not an absolute path")]
    RelativePath { field: &'static str, path: String },
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
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
    /// Read-only in the guest (the host enforces read-only binds in any case).
    pub read_only: bool,
    /// Mounts below are read-only too (mount_setattr(AT_RECURSIVE) in the guest).
    pub recursive_read_only: bool,
    pub propagation: Propagation,
    /// An image volume: also nosuid and nodev, as an image's setuid files and device nodes
    /// are the image author's, not the pod's.
    pub from_image: bool,
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
/// /etc/group (the host reads the unpacked image, so the agent never has to). The
/// supplementary groups start with the primary group, as containerd's do, then (policy Merge)
/// the image's groups of the user, then the requested ones.
pub fn resolve_identity(
    security: &SecurityContext,
    image: &ImageDefaults,
) -> Result<Identity, SpecError> {
    let passwd = std::fs::read_to_string(image.rootfs.join("etc/passwd")).unwrap_or_default();
    let group = std::fs::read_to_string(image.rootfs.join("etc/group")).unwrap_or_default();
    let (user_part, group_part) = requested_user(security, image)?;
    let (uid, mut gid, username) = lookup_user(&user_part, &passwd)?;
    if let Some(g) = group_part.filter(|g| !g.is_empty()) {
        gid = lookup_group(g, &group)?;
    }
    if let Some(rg) = security.run_as_group {
        gid = id_from(rg)?;
    }
    let additional_gids = supplementary_groups(security, gid, username.as_deref(), &group)?;
    Ok(Identity { uid, gid, additional_gids })
}

/// A CRI id (int64) as a kernel id.
fn id_from(value: i64) -> Result<u32, SpecError> {
    u32::try_from(value).map_err(|_| SpecError::InvalidId(value))
}

/// The user (name or uid) and the group, if the image's `user:group` named one.
fn requested_user(
    security: &SecurityContext,
    image: &ImageDefaults,
) -> Result<(String, Option<String>), SpecError> {
    if let Some(uid) = security.run_as_user {
        return Ok((id_from(uid)?.to_string(), None));
    }
    if !security.run_as_username.is_empty() {
        return Ok((security.run_as_username.clone(), None));
    }
    Ok(match image.user.split_once(':') {
        Some((u, g)) => (u.to_string(), Some(g.to_string())),
        None => (image.user.clone(), None),
    })
}

/// (uid, primary gid, name if passwd knows the user).
fn lookup_user(user: &str, passwd: &str) -> Result<(u32, u32, Option<String>), SpecError> {
    if user.is_empty() {
        return Ok((0, 0, Some("root".to_string())));
    }
    if let Ok(uid) = user.parse::<u32>() {
        // A numeric uid need not exist in passwd; its primary group then is the uid's entry or 0.
        let entry = passwd_entries(passwd).find(|e| e.1 == uid);
        return Ok((uid, entry.as_ref().map(|e| e.2).unwrap_or(0), entry.map(|e| e.0)));
    }
    let entry = passwd_entries(passwd)
        .find(|e| e.0 == user)
        .ok_or_else(|| SpecError::UnknownUser(user.to_string()))?;
    Ok((entry.1, entry.2, Some(entry.0)))
}

fn lookup_group(group: String, group_file: &str) -> Result<u32, SpecError> {
    match group.parse::<u32>() {
        Ok(gid) => Ok(gid),
        Err(_) => group_entries(group_file)
            .find(|e| e.0 == group)
            .map(|e| e.1)
            .ok_or(SpecError::UnknownGroup(group)),
    }
}

fn supplementary_groups(
    security: &SecurityContext,
    gid: u32,
    username: Option<&str>,
    group_file: &str,
) -> Result<Vec<u32>, SpecError> {
    let mut gids = vec![gid];
    let mut add = |g: u32| {
        if !gids.contains(&g) {
            gids.push(g);
        }
    };
    if let (SupplementalGroupsPolicy::Merge, Some(name)) =
        (security.supplemental_groups_policy, username)
    {
        for (_, g, members) in group_entries(group_file) {
            if members.iter().any(|m| m == name) {
                add(g);
            }
        }
    }
    for g in &security.supplemental_groups {
        add(id_from(*g)?);
    }
    Ok(gids)
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
    volume_mount(&GuestMount {
        guest_source: source.to_path_buf(),
        container_path: destination.to_string(),
        read_only,
        recursive_read_only: false,
        propagation: Propagation::Private,
        from_image: false,
    })
}

/// A bind with runc's options: `ro` makes only the bind read-only, `rro` every mount below it.
fn volume_mount(m: &GuestMount) -> Result<Mount, SpecError> {
    let propagation = match m.propagation {
        Propagation::Private => "rprivate",
        Propagation::HostToContainer => "rslave",
        Propagation::Bidirectional => "rshared",
    };
    let mut options = vec!["rbind".to_string(), propagation.to_string()];
    options.push(if m.read_only { "ro" } else { "rw" }.to_string());
    if m.recursive_read_only {
        options.push("rro".to_string());
    }
    if m.from_image {
        options.extend(["nosuid".to_string(), "nodev".to_string()]);
    }
    let (source, destination) = (&m.guest_source, m.container_path.as_str());
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
    /// The pod's user namespace, if it has one.
    pub user_namespace: Option<UserNamespace>,
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
    let capabilities = capability_set(security)?;
    spec.set_process(Some(process(config, image, &capabilities)?));
    // The container shares the VM's UTS namespace, whose hostname the agent set to the pod's;
    // runtimes refuse a hostname without a private UTS namespace.
    spec.set_hostname(None);
    if let Some(root) = spec.root_mut() {
        root.set_readonly(Some(security.readonly_rootfs));
    }
    let defaults = spec.mounts().clone().unwrap_or_default();
    spec.set_mounts(Some(container_mounts(defaults, security.privileged, mounts)?));
    let mut linux = spec.linux().clone().unwrap_or_default();
    set_namespaces(&mut linux, sandbox.pid_mode);
    // As containerd does: an rshared volume needs a shared root, or the container's mounts
    // would stay in its own peer group.
    if mounts.iter().any(|m| m.propagation == Propagation::Bidirectional) {
        linux.set_rootfs_propagation(Some("shared".to_string()));
    }
    if let Some(userns) = &sandbox.user_namespace {
        set_user_namespace(&mut spec, &mut linux, userns)?;
    }
    // Resources first: a privileged container's allow-all device rule goes into them.
    if let Some(res) = &config.resources {
        linux.set_resources(Some(resources(res)?));
    }
    set_confinement(&mut linux, security, &capabilities.granted)?;
    spec.set_linux(Some(linux));
    Ok(serde_json::to_vec(&spec)?)
}

/// The container's process: argv, env, cwd, identity, limits and capabilities.
fn process(
    config: &ContainerSpec,
    image: &ImageDefaults,
    capabilities: &CapabilitySet,
) -> Result<Process, SpecError> {
    let security = &config.security;
    let identity = resolve_identity(security, image)?;
    let mut process = Process::default();
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
            .additional_gids(identity.additional_gids)
            .build()?,
    );
    // Unset rather than false: with `false` libcontainer loads the seccomp filter after
    // dropping capabilities, which fails without CAP_SYS_ADMIN.
    process.set_no_new_privileges(security.no_new_privs.then_some(true));
    process.set_rlimits(Some(vec![PosixRlimitBuilder::default()
        .typ(PosixRlimitType::RlimitNofile)
        .hard(1_048_576u64)
        .soft(1_048_576u64)
        .build()?]));
    process.set_capabilities(Some(capabilities.oci()?));
    Ok(process)
}

/// The defaults, the pod's hostname/hosts/resolv.conf, then the CRI mounts (which may replace
/// a default at the same path). A privileged container gets /sys and its cgroup tree
/// read-write.
fn container_mounts(
    defaults: Vec<Mount>,
    privileged: bool,
    mounts: &[GuestMount],
) -> Result<Vec<Mount>, SpecError> {
    let mut all_mounts = defaults;
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
        all_mounts.push(volume_mount(m)?);
    }
    Ok(all_mounts)
}

/// Runs the container in a user namespace of the pod's mappings. The VM's network and IPC
/// namespaces belong to the guest's initial user namespace, in which the container has no
/// privileges: it cannot mount sysfs or mqueue of its own. It gets the VM's /sys read-only
/// (as runc does for such containers) and no /dev/mqueue (the guest mounts none to lend).
fn set_user_namespace(
    spec: &mut Spec,
    linux: &mut Linux,
    userns: &UserNamespace,
) -> Result<(), SpecError> {
    let mut namespaces = linux.namespaces().clone().unwrap_or_default();
    if !namespaces.iter().any(|ns| ns.typ() == LinuxNamespaceType::User) {
        namespaces.push(LinuxNamespaceBuilder::default().typ(LinuxNamespaceType::User).build()?);
    }
    linux.set_namespaces(Some(namespaces));
    let oci = |maps: &[IdMapping]| -> Result<Vec<LinuxIdMapping>, SpecError> {
        maps.iter()
            .map(|m| {
                Ok(LinuxIdMappingBuilder::default()
                    .container_id(m.container_id)
                    .host_id(m.host_id)
                    .size(m.length)
                    .build()?)
            })
            .collect()
    };
    linux.set_uid_mappings(Some(oci(&userns.uids)?));
    linux.set_gid_mappings(Some(oci(&userns.gids)?));
    let mut mounts = spec.mounts().clone().unwrap_or_default();
    mounts.retain(|m| m.typ().as_deref() != Some("mqueue"));
    for m in mounts.iter_mut() {
        if m.typ().as_deref() == Some("sysfs") {
            m.set_typ(Some("bind".into()));
            m.set_source(Some(PathBuf::from("/sys")));
            let options = ["rbind", "nosuid", "nodev", "noexec", "ro"];
            m.set_options(Some(options.iter().map(|o| o.to_string()).collect()));
        }
    }
    spec.set_mounts(Some(mounts));
    Ok(())
}

/// The VM is the pod: containers share its network, IPC and UTS namespaces; each gets its own
/// mount and cgroup namespaces, and a PID namespace unless the pod shares one (POD: the agent
/// joins them to the pod's, held by a pause process; NODE: the VM's).
fn set_namespaces(linux: &mut Linux, pid_mode: NamespaceMode) {
    let keep_pid = pid_mode == NamespaceMode::Container;
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
}

/// Masked and read-only paths and the seccomp filter. A privileged container has none of
/// them and may use every device: it has all of the VM (never more: the VM stays the
/// boundary).
fn set_confinement(
    linux: &mut Linux,
    security: &SecurityContext,
    capabilities: &[Capability],
) -> Result<(), SpecError> {
    if security.privileged {
        linux.set_masked_paths(None);
        linux.set_readonly_paths(None);
        linux.set_seccomp(None);
        let mut resources = linux.resources().clone().unwrap_or_default();
        resources.set_devices(Some(vec![LinuxDeviceCgroupBuilder::default()
            .allow(true)
            .access("rwm")
            .build()?]));
        linux.set_resources(Some(resources));
        return Ok(());
    }
    // Empty lists keep the defaults, as with containerd (the CRI cannot tell empty from unset).
    if !security.masked_paths.is_empty() {
        linux.set_masked_paths(Some(absolute_paths("masked_paths", &security.masked_paths)?));
    }
    if !security.readonly_paths.is_empty() {
        linux.set_readonly_paths(Some(absolute_paths("readonly_paths", &security.readonly_paths)?));
    }
    linux.set_seccomp(seccomp_filter(&security.seccomp, capabilities)?);
    Ok(())
}

fn absolute_paths(field: &'static str, paths: &[String]) -> Result<Vec<String>, SpecError> {
    for path in paths {
        if !Path::new(path).is_absolute() {
            return Err(SpecError::RelativePath { field, path: path.clone() });
        }
    }
    Ok(paths.to_vec())
}

fn seccomp_filter(
    profile: &SeccompProfile,
    capabilities: &[Capability],
) -> Result<Option<LinuxSeccomp>, SpecError> {
    Ok(match profile {
        SeccompProfile::Unconfined => None,
        SeccompProfile::RuntimeDefault => Some(seccomp::runtime_default(capabilities)?),
        SeccompProfile::Localhost(path) => Some(seccomp::load_localhost(path, capabilities)?),
    })
}

/// The capabilities of the container's process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapabilitySet {
    /// Bounding, permitted and effective.
    pub granted: Vec<Capability>,
    /// Inheritable and ambient (CRI add_ambient_capabilities).
    pub ambient: Vec<Capability>,
}

impl CapabilitySet {
    /// Every set given explicitly: oci-spec's builder would fill the missing ones with its
    /// own defaults (an inheritable set outside an empty bounding set cannot be applied).
    fn oci(&self) -> Result<LinuxCapabilities, SpecError> {
        let granted: oci_spec::runtime::Capabilities = self.granted.iter().copied().collect();
        let ambient: oci_spec::runtime::Capabilities = self.ambient.iter().copied().collect();
        Ok(LinuxCapabilitiesBuilder::default()
            .bounding(granted.clone())
            .effective(granted.clone())
            .permitted(granted)
            .inheritable(ambient.clone())
            .ambient(ambient)
            .build()?)
    }
}

/// containerd's rules: privileged gets every capability (add/drop have no effect, as the CRI
/// allows); else the defaults, then ALL of add, ALL of drop, the named adds, the named drops.
pub fn capability_set(security: &SecurityContext) -> Result<CapabilitySet, SpecError> {
    if security.privileged {
        return Ok(CapabilitySet { granted: all_capabilities(), ambient: Vec::new() });
    }
    let add = parse_capabilities("add_capabilities", &security.add_capabilities)?;
    let drop = parse_capabilities("drop_capabilities", &security.drop_capabilities)?;
    let ambient =
        parse_capabilities("add_ambient_capabilities", &security.add_ambient_capabilities)?;
    let mut granted = DEFAULT_CAPABILITIES.to_vec();
    if add.all {
        granted = all_capabilities();
    }
    if drop.all {
        granted.clear();
    }
    let ambient_named = if ambient.all { all_capabilities() } else { ambient.named };
    for cap in add.named.iter().chain(&ambient_named) {
        if !granted.contains(cap) {
            granted.push(*cap);
        }
    }
    granted.retain(|cap| !drop.named.contains(cap));
    let ambient = ambient_named.into_iter().filter(|cap| granted.contains(cap)).collect();
    Ok(CapabilitySet { granted, ambient })
}

/// Capability names of one CRI list.
struct NamedCapabilities {
    all: bool,
    named: Vec<Capability>,
}

fn parse_capabilities(
    field: &'static str,
    names: &[String],
) -> Result<NamedCapabilities, SpecError> {
    let mut parsed = NamedCapabilities { all: false, named: Vec::new() };
    for name in names {
        if name.trim().eq_ignore_ascii_case("ALL") {
            parsed.all = true;
        } else {
            parsed.named.push(parse_capability(field, name)?);
        }
    }
    Ok(parsed)
}

/// `NET_RAW`, `net_raw` or `CAP_NET_RAW`.
fn parse_capability(field: &'static str, name: &str) -> Result<Capability, SpecError> {
    let upper = name.trim().to_ascii_uppercase();
    let full = if upper.starts_with("CAP_") { upper } else { format!("CAP_{upper}") };
    serde_json::from_value(serde_json::Value::String(full))
        .map_err(|_| SpecError::UnknownCapability { field, name: name.to_string() })
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
        let id = |sc: &SecurityContext, img: &ImageDefaults| resolve_identity(sc, img).unwrap();
        let identity = |uid, gid, additional_gids: &[u32]| Identity {
            uid,
            gid,
            additional_gids: additional_gids.to_vec(),
        };
        assert_eq!(id(&SecurityContext::default(), &img), identity(0, 0, &[0]));
        img.user = "web".into();
        assert_eq!(id(&SecurityContext::default(), &img), identity(1000, 1001, &[1001, 2000]));
        img.user = "1234:1234".into();
        assert_eq!(id(&SecurityContext::default(), &img), identity(1234, 1234, &[1234]));
        img.user = "web:extra".into();
        assert_eq!(id(&SecurityContext::default(), &img), identity(1000, 2000, &[2000]));
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
        assert_eq!(id(&sc, &img), identity(7, 8, &[8, 9]));
        let by_name = SecurityContext { run_as_username: "web".into(), ..Default::default() };
        assert_eq!(id(&by_name, &img), identity(1000, 1001, &[1001, 2000]));
        let unknown = SecurityContext { run_as_username: "ghost".into(), ..Default::default() };
        assert!(matches!(resolve_identity(&unknown, &img), Err(SpecError::UnknownUser(_))));
        for bad in [
            SecurityContext { run_as_user: Some(-1), ..Default::default() },
            SecurityContext { run_as_user: Some(1), run_as_group: Some(1 << 32), ..sc.clone() },
            SecurityContext { supplemental_groups: vec![-5], ..sc.clone() },
        ] {
            assert!(matches!(resolve_identity(&bad, &img), Err(SpecError::InvalidId(_))));
        }
    }

    /// Merge adds the image's groups of the user to the requested ones; Strict only the
    /// requested ones. Both keep the primary group first.
    #[test]
    fn supplemental_groups_follow_the_policy() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(dir.path());
        let merge = SecurityContext {
            run_as_user: Some(1000),
            run_as_group: Some(3000),
            supplemental_groups: vec![4000, 3000],
            ..Default::default()
        };
        assert_eq!(resolve_identity(&merge, &img).unwrap().additional_gids, vec![3000, 2000, 4000]);
        let strict = SecurityContext {
            supplemental_groups_policy: SupplementalGroupsPolicy::Strict,
            ..merge.clone()
        };
        assert_eq!(resolve_identity(&strict, &img).unwrap().additional_gids, vec![3000, 4000]);
        // A uid passwd does not know has no image groups to merge.
        let stranger = SecurityContext { run_as_user: Some(4242), ..merge };
        assert_eq!(resolve_identity(&stranger, &img).unwrap().additional_gids, vec![3000, 4000]);
    }

    fn caps(add: &[&str], drop: &[&str]) -> SecurityContext {
        SecurityContext {
            add_capabilities: add.iter().map(|s| s.to_string()).collect(),
            drop_capabilities: drop.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn capabilities_follow_containerds_rules() {
        let granted = |sc: &SecurityContext| capability_set(sc).unwrap().granted;
        assert_eq!(granted(&caps(&[], &[])), DEFAULT_CAPABILITIES.to_vec());
        let dropped = granted(&caps(&[], &["NET_RAW", "cap_chown"]));
        assert!(!dropped.contains(&Capability::NetRaw) && !dropped.contains(&Capability::Chown));
        assert!(dropped.contains(&Capability::Kill));
        assert!(granted(&caps(&["SYS_ADMIN"], &[])).contains(&Capability::SysAdmin));
        assert!(granted(&caps(&[], &["ALL"])).is_empty());
        // Kubernetes' usual pattern: drop everything, add back what is needed.
        assert_eq!(
            granted(&caps(&["NET_BIND_SERVICE"], &["ALL"])),
            vec![Capability::NetBindService]
        );
        let all_but = granted(&caps(&["ALL"], &["CHOWN"]));
        assert_eq!(all_but.len(), all_capabilities().len() - 1);
        let privileged = SecurityContext { privileged: true, ..caps(&[], &["ALL"]) };
        assert_eq!(granted(&privileged), all_capabilities());
        let ambient = SecurityContext {
            add_ambient_capabilities: vec!["NET_ADMIN".into()],
            ..caps(&[], &["ALL"])
        };
        let set = capability_set(&ambient).unwrap();
        assert_eq!(
            (set.granted.clone(), set.ambient.clone()),
            (vec![Capability::NetAdmin], vec![Capability::NetAdmin])
        );
        for (sc, field) in [
            (caps(&["NOT_A_CAP"], &[]), "add_capabilities"),
            (caps(&[], &["CAP_FLY"]), "drop_capabilities"),
        ] {
            let err = capability_set(&sc).unwrap_err();
            assert!(
                matches!(err, SpecError::UnknownCapability { field: f, .. } if f == field),
                "{err}"
            );
        }
    }

    fn built(security: SecurityContext) -> Spec {
        let dir = tempfile::tempdir().unwrap();
        let img = image(dir.path());
        let c = ContainerSpec { security, ..Default::default() };
        let ctx = SandboxContext { pid_mode: NamespaceMode::Pod, user_namespace: None };
        serde_json::from_slice(&build_spec(&c, &img, &ctx, &[]).unwrap()).unwrap()
    }

    /// Every set is explicit: dropping ALL must leave nothing for the runtime to apply (an
    /// inheritable set outside an empty bounding set fails inside libcontainer).
    #[test]
    fn a_privileged_container_with_resources_keeps_every_device() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(dir.path());
        let c = ContainerSpec {
            security: SecurityContext { privileged: true, ..Default::default() },
            resources: Some(Resources { memory_limit_bytes: 64 << 20, ..Default::default() }),
            ..Default::default()
        };
        let ctx = SandboxContext { pid_mode: NamespaceMode::Pod, user_namespace: None };
        let spec: Spec = serde_json::from_slice(&build_spec(&c, &img, &ctx, &[]).unwrap()).unwrap();
        let resources = spec.linux().clone().unwrap().resources().clone().unwrap();
        assert_eq!(resources.memory().as_ref().unwrap().limit(), Some(64 << 20));
        let devices = resources.devices().clone().unwrap();
        assert!(devices[0].allow() && devices[0].access().as_deref() == Some("rwm"));
    }

    #[test]
    fn dropping_all_capabilities_empties_every_set() {
        let spec = built(caps(&[], &["ALL"]));
        let c = spec.process().as_ref().unwrap().capabilities().clone().unwrap();
        for set in [c.bounding(), c.effective(), c.permitted(), c.inheritable(), c.ambient()] {
            assert_eq!(set.as_ref().map(|s| s.len()), Some(0));
        }
        let plain = built(SecurityContext::default());
        let c = plain.process().as_ref().unwrap().capabilities().clone().unwrap();
        assert_eq!(c.inheritable().as_ref().map(|s| s.len()), Some(0));
        assert_eq!(c.bounding().as_ref().map(|s| s.len()), Some(DEFAULT_CAPABILITIES.len()));
    }

    #[test]
    fn no_new_privs_is_set_or_left_unset() {
        let nnp = |spec: &Spec| spec.process().as_ref().unwrap().no_new_privileges();
        assert_eq!(nnp(&built(SecurityContext::default())), None);
        assert_eq!(
            nnp(&built(SecurityContext { no_new_privs: true, ..Default::default() })),
            Some(true)
        );
    }

    #[test]
    fn seccomp_masked_and_readonly_paths() {
        let linux = |spec: Spec| spec.linux().clone().unwrap();
        let plain = linux(built(SecurityContext::default()));
        assert!(plain.seccomp().is_none());
        assert!(plain.masked_paths().as_ref().unwrap().contains(&"/proc/kcore".to_string()));
        assert!(plain.readonly_paths().as_ref().unwrap().contains(&"/proc/sys".to_string()));

        let confined = linux(built(SecurityContext {
            seccomp: SeccompProfile::RuntimeDefault,
            masked_paths: vec!["/secret".into()],
            readonly_paths: vec!["/data".into()],
            ..Default::default()
        }));
        assert_eq!(
            confined.seccomp().as_ref().unwrap().default_action(),
            oci_spec::runtime::LinuxSeccompAction::ScmpActErrno
        );
        assert_eq!(confined.masked_paths().clone().unwrap(), vec!["/secret"]);
        assert_eq!(confined.readonly_paths().clone().unwrap(), vec!["/data"]);

        let privileged = built(SecurityContext {
            privileged: true,
            seccomp: SeccompProfile::RuntimeDefault,
            masked_paths: vec!["/secret".into()],
            ..Default::default()
        });
        let sys = privileged
            .mounts()
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.destination() == Path::new("/sys"))
            .unwrap();
        assert!(!sys.options().as_ref().unwrap().iter().any(|o| o == "ro"));
        let privileged = linux(privileged);
        assert!(privileged.seccomp().is_none());
        assert!(privileged.masked_paths().is_none() && privileged.readonly_paths().is_none());
        let devices = privileged.resources().as_ref().unwrap().devices().clone().unwrap();
        assert!(devices[0].allow() && devices[0].access().as_deref() == Some("rwm"));

        let dir = tempfile::tempdir().unwrap();
        let img = image(dir.path());
        let ctx = SandboxContext { pid_mode: NamespaceMode::Pod, user_namespace: None };
        for security in [
            SecurityContext { masked_paths: vec!["proc/kcore".into()], ..Default::default() },
            SecurityContext {
                seccomp: SeccompProfile::Localhost(dir.path().join("none.json")),
                ..Default::default()
            },
        ] {
            let c = ContainerSpec { security, ..Default::default() };
            assert!(build_spec(&c, &img, &ctx, &[]).is_err());
        }
    }

    #[test]
    fn spec_shares_pod_namespaces_and_mounts_sandbox_files() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(dir.path());
        let c = ContainerSpec { tty: true, ..Default::default() };
        let ctx = SandboxContext { pid_mode: NamespaceMode::Container, user_namespace: None };
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

    #[test]
    fn a_user_namespace_gets_the_pods_mappings_and_the_vms_sys() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(dir.path());
        let range = IdMapping { container_id: 0, host_id: 131_072, length: 65_536 };
        let ctx = SandboxContext {
            pid_mode: NamespaceMode::Container,
            user_namespace: Some(UserNamespace { uids: vec![range], gids: vec![range] }),
        };
        let json = build_spec(&ContainerSpec::default(), &img, &ctx, &[]).unwrap();
        let spec: Spec = serde_json::from_slice(&json).unwrap();
        let linux = spec.linux().as_ref().unwrap();
        let ns = linux.namespaces().as_ref().unwrap();
        assert!(ns.iter().any(|n| n.typ() == LinuxNamespaceType::User), "{ns:?}");
        for maps in [linux.uid_mappings(), linux.gid_mappings()] {
            let maps = maps.as_ref().unwrap();
            assert_eq!(maps.len(), 1);
            assert_eq!(
                (maps[0].container_id(), maps[0].host_id(), maps[0].size()),
                (0, 131_072, 65_536)
            );
        }
        let mounts = spec.mounts().as_ref().unwrap();
        assert!(!mounts.iter().any(|m| m.typ().as_deref() == Some("mqueue")));
        let sys = mounts.iter().find(|m| m.destination() == Path::new("/sys")).unwrap();
        assert_eq!(sys.typ().as_deref(), Some("bind"));
    }
}
