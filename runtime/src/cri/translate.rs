//! CRI messages ↔ the sandbox layer's types. Requests are validated here: what reaches the
//! sandbox layer is in its own vocabulary, and what it returns becomes CRI status messages.

use std::collections::HashMap;

use k8s_cri::v1 as cri;
use tonic::Status;

use crate::sandbox::events::{EventKind, LifecycleEvent};
use crate::sandbox::stats::{ContainerUsage, PodUsage};
use crate::sandbox::{
    ContainerRecord, ContainerSpec, ContainerState, DeviceRequest, DnsSettings, ImageVolume,
    NamespaceMode, NamespaceModes, PodDemand, PodMetadata, PodSpec, PortMapping, Propagation,
    Resources, SandboxRecord, SandboxState, SeccompProfile, SecurityContext, StartRecord,
    SupplementalGroupsPolicy, VolumeMount,
};

/// The longest hostname the guest kernel takes (HOST_NAME_MAX).
const HOSTNAME_MAX: usize = 64;

pub fn namespace_mode(mode: i32) -> Result<NamespaceMode, Status> {
    match cri::NamespaceMode::try_from(mode) {
        Ok(cri::NamespaceMode::Pod) => Ok(NamespaceMode::Pod),
        Ok(cri::NamespaceMode::Container) => Ok(NamespaceMode::Container),
        Ok(cri::NamespaceMode::Node) => Ok(NamespaceMode::Node),
        Ok(cri::NamespaceMode::Target) => Ok(NamespaceMode::Target),
        Err(_) => Err(Status::invalid_argument(format!("unknown namespace mode {mode}"))),
    }
}

fn cri_namespace_mode(mode: NamespaceMode) -> i32 {
    let mode = match mode {
        NamespaceMode::Pod => cri::NamespaceMode::Pod,
        NamespaceMode::Container => cri::NamespaceMode::Container,
        NamespaceMode::Node => cri::NamespaceMode::Node,
        NamespaceMode::Target => cri::NamespaceMode::Target,
    };
    mode as i32
}

/// The hostname the pod's VM gets: the requested one, else the node's (as containerd and
/// CRI-O do: a pod name can be longer than a hostname may be).
fn pod_hostname(requested: &str) -> Result<String, Status> {
    let hostname = if requested.is_empty() {
        nix::unistd::gethostname()
            .map_err(|e| Status::internal(format!("reading the node's hostname: {e}")))?
            .to_string_lossy()
            .into_owned()
    } else {
        requested.to_string()
    };
    if hostname.len() > HOSTNAME_MAX {
        return Err(Status::invalid_argument(format!(
            "hostname {hostname:?} is longer than {HOSTNAME_MAX} characters"
        )));
    }
    Ok(hostname)
}

/// RunPodSandbox's request as a [`PodSpec`].
pub fn pod_spec(req: cri::RunPodSandboxRequest) -> Result<PodSpec, Status> {
    let config = req.config.ok_or_else(|| Status::invalid_argument("config is required"))?;
    let meta =
        config.metadata.ok_or_else(|| Status::invalid_argument("config.metadata is required"))?;
    if meta.name.is_empty() || meta.namespace.is_empty() {
        return Err(Status::invalid_argument("metadata.name and metadata.namespace are required"));
    }
    let linux = config.linux.unwrap_or_default();
    let ns = linux
        .security_context
        .as_ref()
        .and_then(|s| s.namespace_options.clone())
        .unwrap_or_default();
    let namespaces = NamespaceModes {
        network: namespace_mode(ns.network)?,
        pid: namespace_mode(ns.pid)?,
        ipc: namespace_mode(ns.ipc)?,
    };
    // NODE modes are checked against the pod's handler by the sandbox layer: a VM cannot give
    // them, the host handler can.
    let user_namespace = user_namespace(ns.userns_options.as_ref())?;
    if user_namespace.is_some() {
        refuse_namespaces_beside_user_namespace(namespaces)?;
    }
    let pod_security = linux.security_context.as_ref();
    if pod_security.is_some_and(|sc| sc.run_as_group.is_some() && sc.run_as_user.is_none()) {
        return Err(Status::invalid_argument(
            "config.linux.security_context.run_as_group: needs run_as_user",
        ));
    }
    let port_mappings = config
        .port_mappings
        .iter()
        .enumerate()
        .map(|(n, m)| port_mapping(n, m))
        .collect::<Result<Vec<_>, Status>>()?;
    let dns = config.dns_config.unwrap_or_default();
    let demand = pod_demand(&linux);
    Ok(PodSpec {
        metadata: PodMetadata {
            name: meta.name,
            uid: meta.uid,
            namespace: meta.namespace,
            attempt: meta.attempt,
        },
        labels: config.labels,
        annotations: config.annotations,
        log_directory: config.log_directory,
        hostname: pod_hostname(&config.hostname)?,
        runtime_handler: req.runtime_handler,
        dns: DnsSettings { servers: dns.servers, searches: dns.searches, options: dns.options },
        namespaces,
        sysctls: linux.sysctls,
        port_mappings,
        demand,
        user_namespace,
    })
}

/// Where a pod's user namespace options sit in RunPodSandbox.
const USERNS_OPTIONS: &str = "config.linux.security_context.namespace_options.userns_options";

/// The most lines a kernel id map takes (since Linux 4.15).
const MAX_ID_MAP_LINES: usize = 340;

/// The pod's user namespace: NODE (or none) is the VM's; POD gets the mappings given, made
/// inside the guest. CONTAINER and TARGET are refused, as containerd does: Kubernetes only
/// asks for NODE (hostUsers: true) and POD (hostUsers: false).
fn user_namespace(
    options: Option<&cri::UserNamespace>,
) -> Result<Option<crate::sandbox::UserNamespace>, Status> {
    let Some(options) = options else { return Ok(None) };
    let refuse = |what: String| Err(Status::invalid_argument(format!("{USERNS_OPTIONS}.{what}")));
    let mapped = !options.uids.is_empty() || !options.gids.is_empty();
    match cri::NamespaceMode::try_from(options.mode) {
        Ok(cri::NamespaceMode::Node) if mapped => {
            refuse("uids/gids: NODE mode (the VM's ids) takes no mappings".into())
        }
        Ok(cri::NamespaceMode::Node) => Ok(None),
        Ok(cri::NamespaceMode::Pod) => Ok(Some(crate::sandbox::UserNamespace {
            uids: id_mappings("uids", &options.uids)?,
            gids: id_mappings("gids", &options.gids)?,
        })),
        Ok(mode) => {
            refuse(format!("mode: {} is not supported (only NODE and POD)", mode.as_str_name()))
        }
        Err(_) => refuse(format!("mode: unknown namespace mode {}", options.mode)),
    }
}

/// A user namespace owns the namespaces created with it: the host's network, PID or IPC
/// namespace would belong to another, where the pod's root has no privilege (kubelet's API
/// validation refuses hostUsers: false with hostNetwork, hostPID or hostIPC). A PID namespace
/// shared by the pod is the agent's business: its pause process is made in the pod's user
/// namespace.
fn refuse_namespaces_beside_user_namespace(namespaces: NamespaceModes) -> Result<(), Status> {
    for (field, mode) in
        [("network", namespaces.network), ("pid", namespaces.pid), ("ipc", namespaces.ipc)]
    {
        if mode == NamespaceMode::Node {
            return Err(Status::invalid_argument(format!(
                "config.linux.security_context.namespace_options.{field}: NODE (the host's) is \
                 not supported with a user namespace (userns_options POD)"
            )));
        }
    }
    Ok(())
}

/// One of POD mode's id maps, checked as the kernel would check it when the guest writes it:
/// at least one and at most 340 ranges, none empty, none past the 32-bit id space (-1 is no
/// id), no two overlapping on either side; and one of them must map the container's root.
fn id_mappings(
    field: &str,
    maps: &[cri::IdMapping],
) -> Result<Vec<crate::sandbox::IdMapping>, Status> {
    let refuse = |what: String| Status::invalid_argument(format!("{USERNS_OPTIONS}.{field}{what}"));
    if maps.is_empty() {
        return Err(refuse(": POD mode needs at least one mapping".into()));
    }
    if maps.len() > MAX_ID_MAP_LINES {
        return Err(refuse(format!(": at most {MAX_ID_MAP_LINES} mappings")));
    }
    let end = |start: u32, length: u32| u64::from(start) + u64::from(length);
    for (n, m) in maps.iter().enumerate() {
        if m.length == 0 {
            return Err(refuse(format!("[{n}].length: must not be 0")));
        }
        if end(m.container_id, m.length) > u64::from(u32::MAX)
            || end(m.host_id, m.length) > u64::from(u32::MAX)
        {
            return Err(refuse(format!(
                "[{n}]: container_id/host_id + length must stay below 4294967295"
            )));
        }
        // [a, a + m.length) and [b, b + o.length) share an id.
        let overlap = |o: &cri::IdMapping, a: u32, b: u32| {
            u64::from(a) < end(b, o.length) && u64::from(b) < end(a, m.length)
        };
        if let Some(k) = maps[..n].iter().position(|o| {
            overlap(o, m.container_id, o.container_id) || overlap(o, m.host_id, o.host_id)
        }) {
            return Err(refuse(format!("[{n}]: overlaps {field}[{k}]")));
        }
    }
    // The container's root must be someone: its writable layer and the pod's files are
    // given to the id it maps to (as containerd and CRI-O require).
    if !maps.iter().any(|m| m.container_id == 0) {
        return Err(refuse(": container id 0 (root) must be mapped".into()));
    }
    Ok(maps
        .iter()
        .map(|m| crate::sandbox::IdMapping {
            container_id: m.container_id,
            host_id: m.host_id,
            length: m.length,
        })
        .collect())
}

/// What the pod asks of its VM: kubelet's sum of its containers' limits, plus its overhead.
fn pod_demand(linux: &cri::LinuxPodSandboxConfig) -> PodDemand {
    pod_demand_of(linux.resources.as_ref(), linux.overhead.as_ref())
}

/// The demand of a pod's `resources` (its containers' limits) and `overhead`.
pub fn pod_demand_of(
    resources: Option<&cri::LinuxContainerResources>,
    overhead: Option<&cri::LinuxContainerResources>,
) -> PodDemand {
    let part = |r: Option<&cri::LinuxContainerResources>| {
        let Some(r) = r else { return PodDemand::default() };
        let cpu_millis = if r.cpu_quota > 0 && r.cpu_period > 0 {
            (r.cpu_quota as u64).saturating_mul(1000) / r.cpu_period as u64
        } else {
            0
        };
        PodDemand { cpu_millis, memory_bytes: r.memory_limit_in_bytes.max(0) as u64 }
    };
    let (resources, overhead) = (part(resources), part(overhead));
    PodDemand {
        cpu_millis: resources.cpu_millis.saturating_add(overhead.cpu_millis),
        memory_bytes: resources.memory_bytes.saturating_add(overhead.memory_bytes),
    }
}

/// A CRI port mapping in the network layer's words.
fn port_mapping(n: usize, m: &cri::PortMapping) -> Result<PortMapping, Status> {
    let bad = |what: &str| Status::invalid_argument(format!("config.port_mappings[{n}]: {what}"));
    let protocol = match cri::Protocol::try_from(m.protocol) {
        Ok(cri::Protocol::Tcp) => "tcp",
        Ok(cri::Protocol::Udp) => "udp",
        Ok(cri::Protocol::Sctp) => "sctp",
        Err(_) => return Err(bad(&format!("unknown protocol {}", m.protocol))),
    };
    let container_port = u16::try_from(m.container_port)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| bad(&format!("container_port {} is not 1..=65535", m.container_port)))?;
    let host_port = u16::try_from(m.host_port)
        .map_err(|_| bad(&format!("host_port {} is not 0..=65535", m.host_port)))?;
    if !m.host_ip.is_empty() && m.host_ip.parse::<std::net::IpAddr>().is_err() {
        return Err(bad(&format!("host_ip {:?} is not an IP address", m.host_ip)));
    }
    Ok(PortMapping {
        protocol: protocol.to_string(),
        container_port,
        host_port,
        host_ip: m.host_ip.clone(),
    })
}

/// A CRI mount as a [`VolumeMount`]; `image_sub_path` is the mount's `image_sub_path` (CRI
/// field 10, which k8s-cri 0.11's `Mount` lacks). Fields the VM's volume share cannot honour
/// are refused, naming them, rather than dropped (SELinux relabelling does not apply inside the
/// VM and is accepted).
fn volume_mount(n: usize, m: cri::Mount, image_sub_path: &str) -> Result<VolumeMount, Status> {
    let refuse = |field: &str, why: &str| {
        Err(Status::invalid_argument(format!("config.mounts[{n}].{field}: {why}")))
    };
    let image = m.image.as_ref().map(|i| i.image.clone()).filter(|i| !i.is_empty());
    if m.container_path.is_empty() || (m.host_path.is_empty() && image.is_none()) {
        return Err(Status::invalid_argument(format!(
            "mount {n} needs container_path and host_path (or image)"
        )));
    }
    let propagation = match cri::MountPropagation::try_from(m.propagation) {
        Ok(cri::MountPropagation::PropagationPrivate) => Propagation::Private,
        Ok(cri::MountPropagation::PropagationHostToContainer) => Propagation::HostToContainer,
        Ok(cri::MountPropagation::PropagationBidirectional) => Propagation::Bidirectional,
        Err(_) => return refuse("propagation", "unknown propagation mode"),
    };
    // As containerd: a recursive read-only bind cannot take new mounts from the host, which
    // would not be read-only.
    if m.recursive_read_only && !m.readonly {
        return refuse("recursive_read_only", "needs readonly");
    }
    if m.recursive_read_only && propagation != Propagation::Private {
        return refuse("recursive_read_only", "needs PROPAGATION_PRIVATE");
    }
    if !m.uid_mappings.is_empty() || !m.gid_mappings.is_empty() {
        return refuse("uidMappings", "id-mapped mounts are not supported yet");
    }
    let Some(image) = image else {
        if !image_sub_path.is_empty() {
            return refuse("image_sub_path", "only applies to an image volume");
        }
        return Ok(VolumeMount {
            container_path: m.container_path,
            host_path: m.host_path,
            read_only: m.readonly,
            recursive_read_only: m.recursive_read_only,
            propagation,
            image: None,
        });
    };
    image_volume(n, m, image, image_sub_path, propagation)
}

/// An image volume: read-only whatever `readonly` says (the CRI: "all OCI mounts are per
/// feature definition readonly"), private (an image's tree neither takes nor gives mounts).
fn image_volume(
    n: usize,
    m: cri::Mount,
    image: String,
    sub_path: &str,
    propagation: Propagation,
) -> Result<VolumeMount, Status> {
    let refuse = |field: &str, why: &str| {
        Err(Status::invalid_argument(format!("config.mounts[{n}].{field}: {why}")))
    };
    if !m.host_path.is_empty() {
        return refuse("host_path", "must be empty for an image volume");
    }
    if propagation != Propagation::Private {
        return refuse("propagation", "an image volume is PROPAGATION_PRIVATE");
    }
    let sub = std::path::Path::new(sub_path);
    if sub.components().any(|c| !matches!(c, std::path::Component::Normal(_))) {
        return refuse(
            "image_sub_path",
            "must be a relative path inside the image, without \"..\"",
        );
    }
    Ok(VolumeMount {
        container_path: m.container_path,
        host_path: String::new(),
        read_only: true,
        recursive_read_only: m.recursive_read_only,
        propagation,
        image: Some(ImageVolume { image, sub_path: sub_path.to_string() }),
    })
}

/// A CRI device as a [`DeviceRequest`] (whether it is allowed is the sandbox layer's call).
fn device_request(n: usize, d: cri::Device) -> Result<DeviceRequest, Status> {
    let container_path =
        if d.container_path.is_empty() { d.host_path.clone() } else { d.container_path.clone() };
    let absolute = |p: &str| p.starts_with('/') && !p.split('/').any(|c| c == "..");
    if !absolute(&d.host_path) || !absolute(&container_path) {
        return Err(Status::invalid_argument(format!(
            "config.devices[{n}] ({} -> {}): paths must be absolute, without \"..\"",
            d.host_path, d.container_path
        )));
    }
    let permissions = if d.permissions.is_empty() { "rwm".to_string() } else { d.permissions };
    if !permissions.chars().all(|c| "rwm".contains(c)) {
        return Err(Status::invalid_argument(format!(
            "config.devices[{n}].permissions: {permissions:?} is not a subset of \"rwm\""
        )));
    }
    Ok(DeviceRequest { path: d.host_path, container_path, permissions })
}

/// The CRI propagation of a recorded mount.
fn cri_propagation(p: Propagation) -> i32 {
    let p = match p {
        Propagation::Private => cri::MountPropagation::PropagationPrivate,
        Propagation::HostToContainer => cri::MountPropagation::PropagationHostToContainer,
        Propagation::Bidirectional => cri::MountPropagation::PropagationBidirectional,
    };
    p as i32
}

/// CreateContainer's config as a [`ContainerSpec`].
#[cfg(test)]
pub fn container_spec(config: cri::ContainerConfig) -> Result<ContainerSpec, Status> {
    container_spec_with_sub_paths(config, &[])
}

/// [`container_spec`], with the mounts' `image_sub_path`s (by mount index; see
/// [`super::create_request`]).
pub fn container_spec_with_sub_paths(
    config: cri::ContainerConfig,
    image_sub_paths: &[String],
) -> Result<ContainerSpec, Status> {
    let meta = config
        .metadata
        .filter(|m| !m.name.is_empty())
        .ok_or_else(|| Status::invalid_argument("config.metadata.name is required"))?;
    let image = config.image.map(|i| i.image).unwrap_or_default();
    if image.is_empty() {
        return Err(Status::invalid_argument("container image is required"));
    }
    let mounts = config
        .mounts
        .into_iter()
        .enumerate()
        .map(|(n, m)| {
            volume_mount(n, m, image_sub_paths.get(n).map(String::as_str).unwrap_or_default())
        })
        .collect::<Result<Vec<_>, _>>()?;
    let devices = config
        .devices
        .into_iter()
        .enumerate()
        .map(|(n, d)| device_request(n, d))
        .collect::<Result<Vec<_>, _>>()?;
    // The daemon appends to the log as root: it must stay inside the pod's log directory.
    let log_path = std::path::Path::new(&config.log_path);
    let escapes = log_path.components().any(|c| {
        matches!(
            c,
            std::path::Component::RootDir
                | std::path::Component::Prefix(_)
                | std::path::Component::ParentDir
        )
    });
    if escapes {
        return Err(Status::invalid_argument(format!(
            "log_path {:?} must be relative to the pod's log directory, without \"..\"",
            config.log_path
        )));
    }
    let linux = config.linux.unwrap_or_default();
    Ok(ContainerSpec {
        name: meta.name,
        attempt: meta.attempt,
        image,
        command: config.command,
        args: config.args,
        working_dir: config.working_dir,
        envs: config.envs.into_iter().map(|kv| (kv.key, kv.value)).collect(),
        mounts,
        devices,
        labels: config.labels,
        annotations: config.annotations,
        log_path: config.log_path,
        stdin: config.stdin,
        stdin_once: config.stdin_once,
        tty: config.tty,
        resources: linux.resources.map(resources),
        security: linux.security_context.map(security_context).transpose()?.unwrap_or_default(),
    })
}

pub fn resources(r: cri::LinuxContainerResources) -> Resources {
    Resources {
        cpu_period: r.cpu_period,
        cpu_quota: r.cpu_quota,
        cpu_shares: r.cpu_shares,
        cpuset_cpus: r.cpuset_cpus,
        cpuset_mems: r.cpuset_mems,
        memory_limit_bytes: r.memory_limit_in_bytes,
        memory_swap_limit_bytes: r.memory_swap_limit_in_bytes,
        unified: r.unified.into_iter().collect(),
    }
}

/// Where CreateContainer's security context sits in the request, for error messages.
const SECURITY_CONTEXT: &str = "config.linux.security_context";

fn invalid_security_field(field: &str, what: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{SECURITY_CONTEXT}.{field}: {what}"))
}

fn security_context(sc: cri::LinuxContainerSecurityContext) -> Result<SecurityContext, Status> {
    check_identity_fields(&sc)?;
    let supplemental_groups_policy = supplemental_groups_policy(sc.supplemental_groups_policy)?;
    let seccomp = seccomp_profile(&sc)?;
    let not_applicable = not_applicable_fields(&sc);
    let caps = sc.capabilities.unwrap_or_default();
    Ok(SecurityContext {
        run_as_user: sc.run_as_user.map(|v| v.value),
        run_as_username: sc.run_as_username,
        run_as_group: sc.run_as_group.map(|v| v.value),
        supplemental_groups: sc.supplemental_groups,
        supplemental_groups_policy,
        privileged: sc.privileged,
        readonly_rootfs: sc.readonly_rootfs,
        no_new_privs: sc.no_new_privs,
        add_capabilities: caps.add_capabilities,
        drop_capabilities: caps.drop_capabilities,
        add_ambient_capabilities: caps.add_ambient_capabilities,
        masked_paths: sc.masked_paths,
        readonly_paths: sc.readonly_paths,
        seccomp,
        not_applicable,
    })
}

/// The CRI's rules for who the process is: one of run_as_user and run_as_username, and a
/// group only with one of them.
fn check_identity_fields(sc: &cri::LinuxContainerSecurityContext) -> Result<(), Status> {
    let has_user = sc.run_as_user.is_some() || !sc.run_as_username.is_empty();
    if sc.run_as_user.is_some() && !sc.run_as_username.is_empty() {
        return Err(invalid_security_field(
            "run_as_username",
            "only one of run_as_user and run_as_username may be set",
        ));
    }
    if sc.run_as_group.is_some() && !has_user {
        return Err(invalid_security_field("run_as_group", "needs run_as_user or run_as_username"));
    }
    Ok(())
}

fn supplemental_groups_policy(value: i32) -> Result<SupplementalGroupsPolicy, Status> {
    match cri::SupplementalGroupsPolicy::try_from(value) {
        Ok(cri::SupplementalGroupsPolicy::Merge) => Ok(SupplementalGroupsPolicy::Merge),
        Ok(cri::SupplementalGroupsPolicy::Strict) => Ok(SupplementalGroupsPolicy::Strict),
        Err(_) => Err(invalid_security_field(
            "supplemental_groups_policy",
            format!("unknown policy {value}"),
        )),
    }
}

/// The seccomp profile: `seccomp` if given, else the deprecated `seccomp_profile_path`
/// (empty means unconfined), which older kubelets still send.
#[allow(deprecated)]
fn seccomp_profile(sc: &cri::LinuxContainerSecurityContext) -> Result<SeccompProfile, Status> {
    use cri::security_profile::ProfileType;
    if let Some(profile) = &sc.seccomp {
        let kind = ProfileType::try_from(profile.profile_type).map_err(|_| {
            invalid_security_field(
                "seccomp.profile_type",
                format!("unknown type {}", profile.profile_type),
            )
        })?;
        if kind != ProfileType::Localhost && !profile.localhost_ref.is_empty() {
            return Err(invalid_security_field(
                "seccomp.localhost_ref",
                "may only be set with profile_type Localhost",
            ));
        }
        return match kind {
            ProfileType::RuntimeDefault => Ok(SeccompProfile::RuntimeDefault),
            ProfileType::Unconfined => Ok(SeccompProfile::Unconfined),
            ProfileType::Localhost => {
                localhost_profile("seccomp.localhost_ref", &profile.localhost_ref)
            }
        };
    }
    match sc.seccomp_profile_path.as_str() {
        "" | "unconfined" => Ok(SeccompProfile::Unconfined),
        "runtime/default" | "docker/default" => Ok(SeccompProfile::RuntimeDefault),
        other => match other.strip_prefix("localhost/") {
            Some(path) => localhost_profile("seccomp_profile_path", path),
            None => Err(invalid_security_field(
                "seccomp_profile_path",
                format!(
                    "{other:?} is none of \"runtime/default\", \"unconfined\", \
                     \"localhost/<absolute path>\""
                ),
            )),
        },
    }
}

/// A Localhost profile names a file on the node by its absolute path.
fn localhost_profile(field: &str, path: &str) -> Result<SeccompProfile, Status> {
    let path = std::path::Path::new(path);
    if !path.is_absolute() {
        return Err(invalid_security_field(
            field,
            format!("{path:?}: a Localhost profile must be an absolute path"),
        ));
    }
    Ok(SeccompProfile::Localhost(path.to_path_buf()))
}

/// AppArmor and SELinux confine processes on the host's kernel; inside the VM there is no
/// policy to apply them with, so they are accepted and named here.
#[allow(deprecated)]
fn not_applicable_fields(sc: &cri::LinuxContainerSecurityContext) -> Vec<String> {
    let mut fields = Vec::new();
    if sc.apparmor.is_some() {
        fields.push("apparmor".to_string());
    }
    if !sc.apparmor_profile.is_empty() {
        fields.push("apparmor_profile".to_string());
    }
    let selinux_given = sc.selinux_options.as_ref().is_some_and(|o| {
        !(o.user.is_empty() && o.role.is_empty() && o.r#type.is_empty() && o.level.is_empty())
    });
    if selinux_given {
        fields.push("selinux_options".to_string());
    }
    fields
}

pub fn sandbox_state(s: SandboxState) -> i32 {
    match s {
        SandboxState::Ready => cri::PodSandboxState::SandboxReady as i32,
        SandboxState::NotReady => cri::PodSandboxState::SandboxNotready as i32,
    }
}

pub fn container_state(s: ContainerState) -> i32 {
    match s {
        ContainerState::Created => cri::ContainerState::ContainerCreated as i32,
        ContainerState::Running => cri::ContainerState::ContainerRunning as i32,
        ContainerState::Exited => cri::ContainerState::ContainerExited as i32,
        ContainerState::Unknown => cri::ContainerState::ContainerUnknown as i32,
    }
}

pub fn pod_metadata(r: &SandboxRecord) -> cri::PodSandboxMetadata {
    cri::PodSandboxMetadata {
        name: r.metadata.name.clone(),
        uid: r.metadata.uid.clone(),
        namespace: r.metadata.namespace.clone(),
        attempt: r.metadata.attempt,
    }
}

pub fn container_metadata(c: &ContainerRecord) -> cri::ContainerMetadata {
    cri::ContainerMetadata { name: c.metadata.name.clone(), attempt: c.metadata.attempt }
}

/// The pod's IPs: IPv4 first as `ip`, the rest as `additional_ips`.
fn network_status(r: &SandboxRecord) -> cri::PodSandboxNetworkStatus {
    let mut ips = r.pod_ips().into_iter();
    cri::PodSandboxNetworkStatus {
        ip: ips.next().map(|ip| ip.to_string()).unwrap_or_default(),
        additional_ips: ips.map(|ip| cri::PodIp { ip: ip.to_string() }).collect(),
    }
}

pub fn sandbox_status(r: &SandboxRecord) -> cri::PodSandboxStatus {
    let ns = cri::NamespaceOption {
        network: cri_namespace_mode(r.namespaces.network),
        pid: cri_namespace_mode(r.namespaces.pid),
        ipc: cri_namespace_mode(r.namespaces.ipc),
        ..Default::default()
    };
    cri::PodSandboxStatus {
        id: r.id.clone(),
        metadata: Some(pod_metadata(r)),
        state: sandbox_state(r.state),
        created_at: r.created_at,
        network: Some(network_status(r)),
        linux: Some(cri::LinuxPodSandboxStatus {
            namespaces: Some(cri::Namespace { options: Some(ns) }),
        }),
        labels: r.labels.clone(),
        annotations: r.annotations.clone(),
        runtime_handler: r.runtime_handler.clone(),
    }
}

pub fn pod_sandbox(s: &SandboxRecord) -> cri::PodSandbox {
    cri::PodSandbox {
        id: s.id.clone(),
        metadata: Some(pod_metadata(s)),
        state: sandbox_state(s.state),
        created_at: s.created_at,
        labels: s.labels.clone(),
        annotations: s.annotations.clone(),
        runtime_handler: s.runtime_handler.clone(),
    }
}

pub fn container(c: &ContainerRecord) -> cri::Container {
    cri::Container {
        id: c.id.clone(),
        pod_sandbox_id: c.sandbox_id.clone(),
        metadata: Some(container_metadata(c)),
        image: Some(cri::ImageSpec { image: c.image.clone(), ..Default::default() }),
        image_ref: c.image_ref.clone(),
        image_id: c.image_id.clone(),
        state: container_state(c.state),
        created_at: c.created_at,
        labels: c.labels.clone(),
        annotations: c.annotations.clone(),
    }
}

pub fn container_status(c: &ContainerRecord) -> cri::ContainerStatus {
    cri::ContainerStatus {
        id: c.id.clone(),
        metadata: Some(container_metadata(c)),
        state: container_state(c.state),
        created_at: c.created_at,
        started_at: c.started_at,
        finished_at: c.finished_at,
        exit_code: c.exit_code,
        image: Some(cri::ImageSpec { image: c.image.clone(), ..Default::default() }),
        image_ref: c.image_ref.clone(),
        image_id: c.image_id.clone(),
        reason: c.reason.clone(),
        message: c.message.clone(),
        labels: c.labels.clone(),
        annotations: c.annotations.clone(),
        mounts: c
            .mounts
            .iter()
            .map(|m| cri::Mount {
                container_path: m.container_path.clone(),
                host_path: m.host_path.clone(),
                readonly: m.read_only,
                recursive_read_only: m.recursive_read_only,
                propagation: cri_propagation(m.propagation),
                image: (!m.image.is_empty())
                    .then(|| cri::ImageSpec { image: m.image.clone(), ..Default::default() }),
                ..Default::default()
            })
            .collect(),
        log_path: c.log_path.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
        resources: c.resources.as_ref().map(|r| cri::ContainerResources {
            linux: Some(cri_resources(r)),
            ..Default::default()
        }),
        user: c.process_identity().map(|id| cri::ContainerUser {
            linux: Some(cri::LinuxContainerUser {
                uid: id.uid.into(),
                gid: id.gid.into(),
                supplemental_groups: id.additional_gids.into_iter().map(i64::from).collect(),
            }),
        }),
    }
}

fn cri_resources(r: &Resources) -> cri::LinuxContainerResources {
    cri::LinuxContainerResources {
        cpu_period: r.cpu_period,
        cpu_quota: r.cpu_quota,
        cpu_shares: r.cpu_shares,
        cpuset_cpus: r.cpuset_cpus.clone(),
        cpuset_mems: r.cpuset_mems.clone(),
        memory_limit_in_bytes: r.memory_limit_bytes,
        memory_swap_limit_in_bytes: r.memory_swap_limit_bytes,
        unified: r.unified.clone().into_iter().collect(),
        ..Default::default()
    }
}

fn uint(value: u64) -> Option<cri::UInt64Value> {
    Some(cri::UInt64Value { value })
}

fn cpu_usage(at: i64, total: u64, nano_cores: Option<u64>) -> cri::CpuUsage {
    cri::CpuUsage {
        timestamp: at,
        usage_core_nano_seconds: uint(total),
        usage_nano_cores: nano_cores.and_then(uint),
    }
}

pub fn container_stats(c: &ContainerRecord, u: &ContainerUsage) -> cri::ContainerStats {
    let s = &u.stats;
    let attributes = cri::ContainerAttributes {
        id: c.id.clone(),
        metadata: Some(container_metadata(c)),
        labels: c.labels.clone(),
        annotations: c.annotations.clone(),
    };
    let limit = c.resources.as_ref().map(|r| r.memory_limit_bytes).unwrap_or(0);
    cri::ContainerStats {
        attributes: Some(attributes),
        cpu: Some(cpu_usage(s.timestamp_unix_nanos, s.cpu_usage_nanos, u.nano_cores)),
        memory: Some(cri::MemoryUsage {
            timestamp: s.timestamp_unix_nanos,
            working_set_bytes: uint(s.memory_working_set_bytes),
            // As cAdvisor: what is left under the limit, when there is one.
            available_bytes: u64::try_from(limit)
                .ok()
                .filter(|l| *l > 0)
                .and_then(|l| uint(l.saturating_sub(s.memory_working_set_bytes))),
            usage_bytes: uint(s.memory_usage_bytes),
            rss_bytes: uint(s.memory_rss_bytes),
            page_faults: uint(s.page_faults),
            major_page_faults: uint(s.major_page_faults),
        }),
        writable_layer: Some(cri::FilesystemUsage {
            timestamp: s.timestamp_unix_nanos,
            fs_id: Some(cri::FilesystemIdentifier { mountpoint: "/".into() }),
            used_bytes: uint(s.writable_layer_bytes),
            inodes_used: uint(s.writable_layer_inodes),
        }),
        ..Default::default()
    }
}

pub fn pod_sandbox_stats(p: &PodUsage) -> cri::PodSandboxStats {
    let s = &p.stats;
    let at = s.timestamp_unix_nanos;
    cri::PodSandboxStats {
        attributes: Some(cri::PodSandboxAttributes {
            id: p.sandbox.id.clone(),
            metadata: Some(pod_metadata(&p.sandbox)),
            labels: p.sandbox.labels.clone(),
            annotations: p.sandbox.annotations.clone(),
        }),
        linux: Some(cri::LinuxPodSandboxStats {
            cpu: Some(cpu_usage(at, s.cpu_usage_nanos, p.nano_cores)),
            memory: Some(cri::MemoryUsage {
                timestamp: at,
                working_set_bytes: uint(s.memory_working_set_bytes),
                // The pod's limit is its VM.
                available_bytes: uint(
                    s.memory_total_bytes.saturating_sub(s.memory_working_set_bytes),
                ),
                usage_bytes: uint(s.memory_usage_bytes),
                ..Default::default()
            }),
            network: p.network.as_ref().map(|n| {
                let interface = cri::NetworkInterfaceUsage {
                    name: n.name.clone(),
                    rx_bytes: uint(n.rx_bytes),
                    rx_errors: uint(n.rx_errors),
                    tx_bytes: uint(n.tx_bytes),
                    tx_errors: uint(n.tx_errors),
                };
                cri::NetworkUsage {
                    timestamp: at,
                    default_interface: Some(interface),
                    interfaces: Vec::new(),
                }
            }),
            process: Some(cri::ProcessUsage { timestamp: at, process_count: uint(s.pids) }),
            containers: p.containers.iter().map(|(c, u)| container_stats(c, u)).collect(),
        }),
        windows: None,
    }
}

/// A lifecycle event, with the pod's status and its containers' as they are now.
pub fn container_event(
    event: &LifecycleEvent,
    sandbox: Option<&SandboxRecord>,
    containers: &[ContainerRecord],
) -> cri::ContainerEventResponse {
    let event_type = match event.kind {
        EventKind::Created => cri::ContainerEventType::ContainerCreatedEvent,
        EventKind::Started => cri::ContainerEventType::ContainerStartedEvent,
        EventKind::Stopped => cri::ContainerEventType::ContainerStoppedEvent,
        EventKind::Deleted => cri::ContainerEventType::ContainerDeletedEvent,
    };
    cri::ContainerEventResponse {
        container_id: event.container_id.clone(),
        container_event_type: event_type as i32,
        created_at: event.at,
        pod_sandbox_status: sandbox.map(sandbox_status),
        containers_statuses: containers.iter().map(container_status).collect(),
    }
}

/// The label filter of List* calls.
pub fn labels_match(labels: &HashMap<String, String>, selector: &HashMap<String, String>) -> bool {
    crate::sandbox::labels_match(labels, selector)
}

/// How a pod's VM started, for verbose PodSandboxStatus: `startPath` (`template` | `cold`),
/// `startReason` (why it cold-booted) and `template` (the key it came from).
pub fn start_info(start: &StartRecord) -> serde_json::Map<String, serde_json::Value> {
    let mut info = serde_json::Map::new();
    info.insert("startPath".into(), start.path.clone().into());
    if !start.reason.is_empty() {
        info.insert("startReason".into(), start.reason.clone().into());
    }
    if !start.template.is_empty() {
        info.insert("template".into(), start.template.clone().into());
    }
    info
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pod that cold-booted after its template failed it says so, and why, in verbose
    /// PodSandboxStatus; one restored names its template.
    #[test]
    fn the_start_path_and_reason_reach_verbose_status() {
        let cold = StartRecord {
            path: "cold".into(),
            reason: "the agent restored from template ab12 did not answer within 30 s".into(),
            template: String::new(),
        };
        assert_eq!(
            serde_json::Value::Object(start_info(&cold)),
            serde_json::json!({"startPath": "cold", "startReason": cold.reason})
        );
        let restored =
            StartRecord { path: "template".into(), reason: String::new(), template: "ab12".into() };
        assert_eq!(
            serde_json::Value::Object(start_info(&restored)),
            serde_json::json!({"startPath": "template", "template": "ab12"})
        );
    }

    fn pod(name: &str, hostname: &str) -> cri::RunPodSandboxRequest {
        cri::RunPodSandboxRequest {
            config: Some(cri::PodSandboxConfig {
                metadata: Some(cri::PodSandboxMetadata {
                    name: name.into(),
                    namespace: "ns".into(),
                    ..Default::default()
                }),
                hostname: hostname.into(),
                ..Default::default()
            }),
            runtime_handler: String::new(),
        }
    }

    /// critest's pods have long names and no hostname: the node's hostname stands in.
    #[test]
    fn a_long_named_pod_without_hostname_gets_the_nodes() {
        let long = "x".repeat(100);
        let spec = pod_spec(pod(&long, "")).unwrap();
        let node = nix::unistd::gethostname().unwrap().to_string_lossy().into_owned();
        assert_eq!(spec.hostname, node);
        assert_eq!(pod_spec(pod(&long, "given")).unwrap().hostname, "given");
        assert!(pod_spec(pod("p", &"h".repeat(64))).is_ok());
        let err = pod_spec(pod("p", &"h".repeat(65))).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn namespace_modes_translate_both_ways() {
        for mode in [
            NamespaceMode::Pod,
            NamespaceMode::Container,
            NamespaceMode::Node,
            NamespaceMode::Target,
        ] {
            assert_eq!(namespace_mode(cri_namespace_mode(mode)).unwrap(), mode);
        }
        assert!(namespace_mode(42).is_err());
        let mut req = pod("p", "h");
        let config = req.config.as_mut().unwrap();
        config.linux = Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(cri::NamespaceOption {
                    network: cri::NamespaceMode::Node as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
        // NODE is translated; whether the pod's handler can give it is the sandbox layer's call.
        assert_eq!(pod_spec(req).unwrap().namespaces.network, NamespaceMode::Node);
    }

    #[test]
    fn devices_are_checked_for_shape_and_passed_on() {
        let config = |host: &str, container: &str, permissions: &str| cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata { name: "c".into(), attempt: 0 }),
            image: Some(cri::ImageSpec { image: "busybox".into(), ..Default::default() }),
            devices: vec![cri::Device {
                container_path: container.into(),
                host_path: host.into(),
                permissions: permissions.into(),
            }],
            ..Default::default()
        };
        let spec = container_spec(config("/dev/fuse", "", "")).unwrap();
        let want = DeviceRequest {
            path: "/dev/fuse".into(),
            container_path: "/dev/fuse".into(),
            permissions: "rwm".into(),
        };
        assert_eq!(spec.devices, vec![want]);
        for (host, container, perms) in [
            ("dev/fuse", "/dev/fuse", "rw"),
            ("/dev/../etc", "/x", "r"),
            ("/dev/fuse", "/x", "rwx"),
        ] {
            let err = container_spec(config(host, container, perms)).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
            assert!(err.message().starts_with("config.devices[0]"), "{err:?}");
        }
    }

    fn userns(mode: cri::NamespaceMode, ids: &[(u32, u32, u32)]) -> cri::UserNamespace {
        let maps: Vec<cri::IdMapping> = ids
            .iter()
            .map(|&(container_id, host_id, length)| cri::IdMapping {
                container_id,
                host_id,
                length,
            })
            .collect();
        cri::UserNamespace { mode: mode as i32, uids: maps.clone(), gids: maps }
    }

    #[test]
    fn user_namespaces_node_is_the_vms_and_pod_takes_valid_mappings() {
        use cri::NamespaceMode::{Container, Node, Pod, Target};
        assert_eq!(user_namespace(None).unwrap(), None);
        assert_eq!(user_namespace(Some(&userns(Node, &[]))).unwrap(), None);
        let kubelet = user_namespace(Some(&userns(Pod, &[(0, 65_536, 65_536)]))).unwrap().unwrap();
        let want = crate::sandbox::IdMapping { container_id: 0, host_id: 65_536, length: 65_536 };
        assert_eq!((kubelet.uids, kubelet.gids), (vec![want], vec![want]));
        // Several ranges, as runc takes them.
        user_namespace(Some(&userns(Pod, &[(0, 1000, 1), (1, 200_000, 10)]))).unwrap();
        let cases: &[(cri::UserNamespace, &str)] = &[
            (userns(Node, &[(0, 1000, 1)]), "userns_options.uids/gids: NODE"),
            (userns(Container, &[(0, 1000, 1)]), "userns_options.mode: CONTAINER"),
            (userns(Target, &[(0, 1000, 1)]), "userns_options.mode: TARGET"),
            (cri::UserNamespace { mode: 9, ..Default::default() }, "userns_options.mode"),
            (userns(Pod, &[]), "userns_options.uids: POD mode needs"),
            (userns(Pod, &[(0, 1000, 0)]), "userns_options.uids[0].length"),
            (userns(Pod, &[(0, u32::MAX - 10, 11)]), "userns_options.uids[0]: container_id"),
            (userns(Pod, &[(u32::MAX - 1, 0, 2)]), "userns_options.uids[0]: container_id"),
            (
                userns(Pod, &[(0, 1000, 10), (5, 5000, 1)]),
                "userns_options.uids[1]: overlaps uids[0]",
            ),
            (userns(Pod, &[(0, 1000, 10), (10, 1009, 1)]), "userns_options.uids[1]: overlaps"),
            (userns(Pod, &[(1, 1000, 100_000)]), "userns_options.uids: container id 0"),
        ];
        for (options, want) in cases {
            let err = user_namespace(Some(options)).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
            assert!(err.message().contains(want), "{want}: {err:?}");
        }
        let mut only_uids = userns(Pod, &[(0, 1000, 1)]);
        only_uids.gids.clear();
        let err = user_namespace(Some(&only_uids)).unwrap_err();
        assert!(err.message().contains("userns_options.gids: POD mode needs"), "{err:?}");
    }

    #[test]
    fn user_namespaces_refuse_host_namespaces_beside_them() {
        let pod =
            |network: cri::NamespaceMode, pid: cri::NamespaceMode, ipc: cri::NamespaceMode| {
                pod_spec(cri::RunPodSandboxRequest {
                    config: Some(cri::PodSandboxConfig {
                        metadata: Some(cri::PodSandboxMetadata {
                            name: "p".into(),
                            namespace: "n".into(),
                            ..Default::default()
                        }),
                        linux: Some(cri::LinuxPodSandboxConfig {
                            security_context: Some(cri::LinuxSandboxSecurityContext {
                                namespace_options: Some(cri::NamespaceOption {
                                    network: network as i32,
                                    pid: pid as i32,
                                    ipc: ipc as i32,
                                    userns_options: Some(userns(
                                        cri::NamespaceMode::Pod,
                                        &[(0, 100_000, 65_536)],
                                    )),
                                    ..Default::default()
                                }),
                                ..Default::default()
                            }),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    runtime_handler: String::new(),
                })
            };
        use cri::NamespaceMode::{Container, Node, Pod};
        let spec = pod(Pod, Container, Pod).unwrap();
        assert_eq!(spec.user_namespace.unwrap().uids[0].host_id, 100_000);
        pod(Pod, Pod, Pod).unwrap();
        for (ns, field) in [
            ((Node, Container, Pod), "namespace_options.network: NODE"),
            ((Pod, Node, Pod), "namespace_options.pid: NODE"),
            ((Pod, Container, Node), "namespace_options.ipc: NODE"),
        ] {
            let err = pod(ns.0, ns.1, ns.2).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
            assert!(err.message().contains(field), "{field}: {err:?}");
        }
    }

    #[test]
    fn mount_fields_that_cannot_be_honoured_are_refused_by_name() {
        let ok = cri::Mount {
            container_path: "/data".into(),
            host_path: "/tmp".into(),
            selinux_relabel: true,
            ..Default::default()
        };
        let private = volume_mount(0, ok.clone(), "").unwrap();
        assert_eq!(private.propagation, Propagation::Private);
        let rslave = volume_mount(0, cri::Mount { propagation: 1, ..ok.clone() }, "").unwrap();
        assert_eq!(rslave.propagation, Propagation::HostToContainer);
        let rshared = volume_mount(0, cri::Mount { propagation: 2, ..ok.clone() }, "").unwrap();
        assert_eq!(rshared.propagation, Propagation::Bidirectional);
        let rro = cri::Mount { readonly: true, recursive_read_only: true, ..ok.clone() };
        assert!(volume_mount(0, rro.clone(), "").unwrap().recursive_read_only);
        let cases = [
            (cri::Mount { propagation: 7, ..ok.clone() }, "propagation"),
            (cri::Mount { recursive_read_only: true, ..ok.clone() }, "recursive_read_only"),
            (cri::Mount { propagation: 1, ..rro.clone() }, "recursive_read_only"),
            (
                cri::Mount {
                    uid_mappings: vec![cri::IdMapping { host_id: 1, container_id: 0, length: 1 }],
                    ..ok.clone()
                },
                "uidMappings",
            ),
            (
                cri::Mount {
                    image: Some(cri::ImageSpec { image: "x".into(), ..Default::default() }),
                    ..ok.clone()
                },
                "host_path",
            ),
        ];
        for (mount, field) in cases {
            let err = volume_mount(2, mount, "").unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
            assert!(err.message().starts_with(&format!("config.mounts[2].{field}")), "{err:?}");
        }
    }

    #[test]
    fn image_volumes_are_read_only_and_private_with_a_relative_sub_path() {
        let image = cri::Mount {
            container_path: "/img".into(),
            image: Some(cri::ImageSpec { image: "sha256:abc".into(), ..Default::default() }),
            selinux_relabel: true,
            ..Default::default()
        };
        let m = volume_mount(0, image.clone(), "").unwrap();
        assert!(m.read_only && m.host_path.is_empty());
        let want = ImageVolume { image: "sha256:abc".into(), sub_path: String::new() };
        assert_eq!(m.image, Some(want));
        let sub = volume_mount(0, image.clone(), "etc/ssl").unwrap();
        assert_eq!(sub.image.unwrap().sub_path, "etc/ssl");
        let plain = cri::Mount { image: None, host_path: "/tmp".into(), ..image.clone() };
        let cases = [
            (image.clone(), "../etc", "image_sub_path"),
            (image.clone(), "a/../../b", "image_sub_path"),
            (image.clone(), "/etc", "image_sub_path"),
            (plain, "etc", "image_sub_path"),
            (cri::Mount { propagation: 1, ..image.clone() }, "", "propagation"),
        ];
        for (mount, sub_path, field) in cases {
            let err = volume_mount(1, mount, sub_path).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
            assert!(err.message().starts_with(&format!("config.mounts[1].{field}")), "{err:?}");
        }
    }

    #[test]
    fn port_mappings_are_validated() {
        let ok = cri::PortMapping {
            protocol: cri::Protocol::Udp as i32,
            container_port: 53,
            host_port: 5353,
            host_ip: "127.0.0.1".into(),
        };
        let m = port_mapping(0, &ok).unwrap();
        assert_eq!((m.protocol.as_str(), m.container_port, m.host_port), ("udp", 53, 5353));
        for bad in [
            cri::PortMapping { protocol: 9, ..ok.clone() },
            cri::PortMapping { container_port: 0, ..ok.clone() },
            cri::PortMapping { container_port: 70000, ..ok.clone() },
            cri::PortMapping { host_port: -1, ..ok.clone() },
            cri::PortMapping { host_ip: "localhost".into(), ..ok.clone() },
        ] {
            let err = port_mapping(3, &bad).unwrap_err();
            assert!(err.message().starts_with("config.port_mappings[3]"), "{err:?}");
        }
    }

    #[test]
    fn container_configs_are_validated_and_translated() {
        let mut config = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata { name: "c".into(), attempt: 2 }),
            image: Some(cri::ImageSpec { image: "busybox".into(), ..Default::default() }),
            envs: vec![cri::KeyValue { key: "A".into(), value: "1".into() }],
            mounts: vec![cri::Mount {
                container_path: "/data".into(),
                host_path: "/tmp".into(),
                readonly: true,
                ..Default::default()
            }],
            linux: Some(cri::LinuxContainerConfig {
                resources: Some(cri::LinuxContainerResources {
                    memory_limit_in_bytes: 1 << 20,
                    ..Default::default()
                }),
                security_context: Some(cri::LinuxContainerSecurityContext {
                    run_as_user: Some(cri::Int64Value { value: 7 }),
                    capabilities: Some(cri::Capability {
                        drop_capabilities: vec!["NET_RAW".into()],
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
            }),
            ..Default::default()
        };
        let spec = container_spec(config.clone()).unwrap();
        assert_eq!((spec.name.as_str(), spec.attempt), ("c", 2));
        assert_eq!(spec.envs, vec![("A".to_string(), "1".to_string())]);
        assert!(spec.mounts[0].read_only);
        assert_eq!(spec.resources.unwrap().memory_limit_bytes, 1 << 20);
        assert_eq!(spec.security.run_as_user, Some(7));
        assert_eq!(spec.security.drop_capabilities, vec!["NET_RAW"]);
        config.mounts[0].host_path.clear();
        assert_eq!(
            container_spec(config.clone()).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        config.image = None;
        assert_eq!(container_spec(config).unwrap_err().code(), tonic::Code::InvalidArgument);
    }

    fn with_security(sc: cri::LinuxContainerSecurityContext) -> cri::ContainerConfig {
        cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata { name: "c".into(), attempt: 0 }),
            image: Some(cri::ImageSpec { image: "busybox".into(), ..Default::default() }),
            linux: Some(cri::LinuxContainerConfig {
                security_context: Some(sc),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn security_of(sc: cri::LinuxContainerSecurityContext) -> Result<SecurityContext, Status> {
        container_spec(with_security(sc)).map(|spec| spec.security)
    }

    fn refused_naming(sc: cri::LinuxContainerSecurityContext, field: &str) {
        let err = security_of(sc).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(field), "{field}: {err:?}");
    }

    #[test]
    fn a_group_needs_a_user_and_a_user_is_named_once() {
        let uid = Some(cri::Int64Value { value: 1000 });
        let gid = Some(cri::Int64Value { value: 2000 });
        let sc = cri::LinuxContainerSecurityContext { run_as_group: gid, ..Default::default() };
        refused_naming(sc.clone(), "run_as_group");
        let both = cri::LinuxContainerSecurityContext {
            run_as_user: uid,
            run_as_username: "web".into(),
            ..Default::default()
        };
        refused_naming(both, "run_as_username");
        let ok = security_of(cri::LinuxContainerSecurityContext { run_as_user: uid, ..sc.clone() })
            .unwrap();
        assert_eq!((ok.run_as_user, ok.run_as_group), (Some(1000), Some(2000)));
        let by_name = cri::LinuxContainerSecurityContext { run_as_username: "web".into(), ..sc };
        assert_eq!(security_of(by_name).unwrap().run_as_username, "web");

        // The pod's own security context follows the same rule.
        let mut req = pod("p", "h");
        req.config.as_mut().unwrap().linux = Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                run_as_group: gid,
                ..Default::default()
            }),
            ..Default::default()
        });
        let err = pod_spec(req).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("run_as_group"), "{err:?}");
    }

    #[test]
    fn security_fields_are_carried_over() {
        let sc = cri::LinuxContainerSecurityContext {
            supplemental_groups: vec![4000],
            supplemental_groups_policy: cri::SupplementalGroupsPolicy::Strict as i32,
            masked_paths: vec!["/proc/kcore".into()],
            readonly_paths: vec!["/proc/sys".into()],
            no_new_privs: true,
            readonly_rootfs: true,
            capabilities: Some(cri::Capability {
                add_capabilities: vec!["SYS_ADMIN".into()],
                drop_capabilities: vec!["ALL".into()],
                add_ambient_capabilities: vec!["NET_BIND_SERVICE".into()],
            }),
            ..Default::default()
        };
        let got = security_of(sc).unwrap();
        assert_eq!(got.supplemental_groups_policy, SupplementalGroupsPolicy::Strict);
        assert_eq!(
            (got.masked_paths, got.readonly_paths),
            (vec!["/proc/kcore".to_string()], vec!["/proc/sys".to_string()])
        );
        assert!(got.no_new_privs && got.readonly_rootfs);
        assert_eq!(got.add_ambient_capabilities, vec!["NET_BIND_SERVICE"]);
        assert_eq!(got.seccomp, SeccompProfile::Unconfined);
        refused_naming(
            cri::LinuxContainerSecurityContext {
                supplemental_groups_policy: 7,
                ..Default::default()
            },
            "supplemental_groups_policy",
        );
    }

    #[test]
    #[allow(deprecated)]
    fn seccomp_profiles_in_both_forms() {
        use cri::security_profile::ProfileType;
        let profile = |kind: ProfileType, localhost_ref: &str| cri::LinuxContainerSecurityContext {
            seccomp: Some(cri::SecurityProfile {
                profile_type: kind as i32,
                localhost_ref: localhost_ref.into(),
            }),
            ..Default::default()
        };
        let path = |p: &str| cri::LinuxContainerSecurityContext {
            seccomp_profile_path: p.into(),
            ..Default::default()
        };
        let local = SeccompProfile::Localhost("/etc/profiles/p.json".into());
        for (sc, expected) in [
            (profile(ProfileType::RuntimeDefault, ""), SeccompProfile::RuntimeDefault),
            (profile(ProfileType::Unconfined, ""), SeccompProfile::Unconfined),
            (profile(ProfileType::Localhost, "/etc/profiles/p.json"), local.clone()),
            (path(""), SeccompProfile::Unconfined),
            (path("unconfined"), SeccompProfile::Unconfined),
            (path("runtime/default"), SeccompProfile::RuntimeDefault),
            (path("docker/default"), SeccompProfile::RuntimeDefault),
            (path("localhost//etc/profiles/p.json"), local.clone()),
            // The structured field wins over the deprecated one.
            (
                cri::LinuxContainerSecurityContext {
                    seccomp_profile_path: "unconfined".into(),
                    ..profile(ProfileType::RuntimeDefault, "")
                },
                SeccompProfile::RuntimeDefault,
            ),
        ] {
            assert_eq!(security_of(sc.clone()).unwrap().seccomp, expected, "{sc:?}");
        }
        refused_naming(profile(ProfileType::Localhost, "profiles/p.json"), "seccomp.localhost_ref");
        refused_naming(profile(ProfileType::Localhost, ""), "seccomp.localhost_ref");
        refused_naming(profile(ProfileType::RuntimeDefault, "/p.json"), "seccomp.localhost_ref");
        refused_naming(
            cri::LinuxContainerSecurityContext {
                seccomp: Some(cri::SecurityProfile {
                    profile_type: 9,
                    localhost_ref: String::new(),
                }),
                ..Default::default()
            },
            "seccomp.profile_type",
        );
        refused_naming(path("localhost/relative.json"), "seccomp_profile_path");
        refused_naming(path("strict"), "seccomp_profile_path");
    }

    #[test]
    #[allow(deprecated)]
    fn apparmor_and_selinux_are_accepted_as_not_applicable() {
        let sc = cri::LinuxContainerSecurityContext {
            apparmor: Some(cri::SecurityProfile::default()),
            apparmor_profile: "runtime/default".into(),
            selinux_options: Some(cri::SeLinuxOption {
                r#type: "spc_t".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            security_of(sc).unwrap().not_applicable,
            vec!["apparmor", "apparmor_profile", "selinux_options"]
        );
        let empty_selinux = cri::LinuxContainerSecurityContext {
            selinux_options: Some(cri::SeLinuxOption::default()),
            ..Default::default()
        };
        assert!(security_of(empty_selinux).unwrap().not_applicable.is_empty());
    }

    /// A log path is relative to the pod's log directory and stays in it: the daemon appends
    /// to it as root.
    #[test]
    fn log_paths_cannot_leave_the_log_directory() {
        let config = |log_path: &str| cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata { name: "c".into(), attempt: 0 }),
            image: Some(cri::ImageSpec { image: "busybox".into(), ..Default::default() }),
            log_path: log_path.into(),
            ..Default::default()
        };
        for good in ["", "c.log", "c/0.log", "./c.log"] {
            assert!(container_spec(config(good)).is_ok(), "{good}");
        }
        for bad in ["/etc/shadow", "../../etc/cron.d/x", "c/../../x.log"] {
            let err = container_spec(config(bad)).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad}");
        }
    }
}
