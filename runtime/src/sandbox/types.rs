//! The sandbox layer's vocabulary: what a pod and a container are asked to be, as the CRI
//! layer translated them. Nothing here knows CRI or agent wire types.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::hypervisor::{IdTranslation, IdTranslations};

pub use super::handlers::PodDemand;
use super::records::{DnsSettings, PodMetadata};
pub use crate::resource::network::PortMapping;

/// Which namespace a pod's containers share (CRI `NamespaceMode`, in our words).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum NamespaceMode {
    /// One namespace for the whole pod (the CRI default).
    #[default]
    Pod,
    /// Each container its own.
    Container,
    /// The node's (inside a VM sandbox: the VM's).
    Node,
    /// Another container's.
    Target,
}

/// The pod's network, PID and IPC namespace modes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceModes {
    pub network: NamespaceMode,
    pub pid: NamespaceMode,
    pub ipc: NamespaceMode,
}

/// One range of a user namespace's id map.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdMapping {
    pub container_id: u32,
    /// The id outside the container (in the guest, which has no ids of the host's).
    pub host_id: u32,
    pub length: u32,
}

/// A pod's user namespace (userns_options mode POD): its containers' ids as the guest sees
/// them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserNamespace {
    pub uids: Vec<IdMapping>,
    pub gids: Vec<IdMapping>,
}

/// The id space past the host's overflow id that a squashed range shows as (`nobody`).
const OVERFLOW_ID: u32 = 65_534;

impl UserNamespace {
    /// How the pod's file servers (virtiofsd or fs-serve) translate file owners so that the
    /// host's ids are the container's, as Kubernetes' idmapped volume mounts make them on runc:
    /// a host file of id `c` (in a mapping `c → g`) appears in the guest as `g`, which the
    /// container sees as `c`, and what the container's `c` writes is the host's `c`. Host ids
    /// that would otherwise pass through into the mapped guest range (the container would see
    /// them as its own) are squashed to the overflow id, where the ranges allow.
    pub fn share_translation(&self) -> IdTranslations {
        IdTranslations { uids: translation(&self.uids), gids: translation(&self.gids) }
    }
}

fn translation(maps: &[IdMapping]) -> Vec<IdTranslation> {
    let end = |start: u32, length: u32| u64::from(start) + u64::from(length);
    let host_side_taken = |start: u32, length: u32| {
        maps.iter().any(|m| {
            u64::from(start) < end(m.container_id, m.length)
                && u64::from(m.container_id) < end(start, length)
        })
    };
    let mapped = maps.iter().map(|m| IdTranslation::Map {
        guest: m.host_id,
        host: m.container_id,
        count: m.length,
    });
    let squashed = maps.iter().filter(|m| !host_side_taken(m.host_id, m.length)).map(|m| {
        IdTranslation::SquashHost { host: m.host_id, guest: OVERFLOW_ID, count: m.length }
    });
    mapped.chain(squashed).collect()
}

/// A pod as RunPodSandbox asked for it, already validated.
#[derive(Debug, Clone, Default)]
pub struct PodSpec {
    pub metadata: PodMetadata,
    pub labels: HashMap<String, String>,
    pub annotations: HashMap<String, String>,
    pub log_directory: String,
    pub hostname: String,
    pub runtime_handler: String,
    pub dns: DnsSettings,
    pub namespaces: NamespaceModes,
    pub sysctls: HashMap<String, String>,
    /// hostPort mappings, handed to the CNI plugins that ask for them.
    pub port_mappings: Vec<PortMapping>,
    /// What the pod asks of its VM (its resources plus overhead).
    pub demand: PodDemand,
    /// The pod's user namespace; `None`: the containers run in the VM's.
    pub user_namespace: Option<UserNamespace>,
}

/// A host path, or an image's tree, mounted into a container (a volume).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VolumeMount {
    pub container_path: String,
    /// Empty for an image volume.
    pub host_path: String,
    pub read_only: bool,
    /// Mounts below the host path are read-only too (only with `read_only`).
    pub recursive_read_only: bool,
    pub propagation: Propagation,
    /// Set for an image volume (kubelet's ImageVolume): always read-only.
    pub image: Option<ImageVolume>,
}

/// The image an image volume mounts, and which part of its tree.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageVolume {
    /// A reference, tag, digest or id, as the image store resolves them.
    pub image: String,
    /// A path inside the image's tree to mount instead of its root; empty = the root.
    pub sub_path: String,
}

/// A CRI device: the node at `path` (in the guest: a VM has none of the host's devices),
/// given at `container_path`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceRequest {
    pub path: String,
    pub container_path: String,
    /// A subset of "rwm".
    pub permissions: String,
}

/// How mounts propagate between a volume's host path and the container.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Propagation {
    /// Neither way (rprivate).
    #[default]
    Private,
    /// Host mounts made later under the path appear in the container (rslave).
    HostToContainer,
    /// As HostToContainer, and the container's mounts reach the pod's other containers of the
    /// volume (rshared inside the VM; they cannot cross the VM boundary to the host).
    Bidirectional,
}

/// Cgroup limits of a container (applied inside the guest).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    pub cpu_period: i64,
    pub cpu_quota: i64,
    pub cpu_shares: i64,
    pub cpuset_cpus: String,
    pub cpuset_mems: String,
    pub memory_limit_bytes: i64,
    pub memory_swap_limit_bytes: i64,
    /// cgroup v2 files and values, as given.
    pub unified: HashMap<String, String>,
}

/// How a container's supplementary groups are found (CRI `SupplementalGroupsPolicy`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SupplementalGroupsPolicy {
    /// The groups the image's /etc/group gives the user, plus the requested ones.
    #[default]
    Merge,
    /// Only the requested groups (and the primary group).
    Strict,
}

/// Which seccomp filter a container runs under.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum SeccompProfile {
    /// No filter (the CRI's meaning of an empty profile).
    #[default]
    Unconfined,
    /// The runtime's own profile (see `sandbox/seccomp.rs`).
    RuntimeDefault,
    /// A profile file on the node, by absolute path; the daemon reads it.
    Localhost(std::path::PathBuf),
}

/// Who the container's process runs as, and with which privileges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SecurityContext {
    pub run_as_user: Option<i64>,
    pub run_as_username: String,
    pub run_as_group: Option<i64>,
    pub supplemental_groups: Vec<i64>,
    pub supplemental_groups_policy: SupplementalGroupsPolicy,
    pub privileged: bool,
    pub readonly_rootfs: bool,
    pub no_new_privs: bool,
    pub add_capabilities: Vec<String>,
    pub drop_capabilities: Vec<String>,
    /// Added to every set, the ambient one included.
    pub add_ambient_capabilities: Vec<String>,
    /// Empty: the runtime's defaults.
    pub masked_paths: Vec<String>,
    /// Empty: the runtime's defaults.
    pub readonly_paths: Vec<String>,
    pub seccomp: SeccompProfile,
    /// Fields that were given but mean nothing inside the VM (AppArmor, SELinux), by name:
    /// accepted, and reported as not applicable.
    pub not_applicable: Vec<String>,
}

/// A container as CreateContainer asked for it, already validated.
#[derive(Debug, Clone, Default)]
pub struct ContainerSpec {
    pub name: String,
    pub attempt: u32,
    /// The image as the request named it.
    pub image: String,
    pub command: Vec<String>,
    pub args: Vec<String>,
    pub working_dir: String,
    /// Environment, in order (a later key replaces an earlier one).
    pub envs: Vec<(String, String)>,
    pub mounts: Vec<VolumeMount>,
    pub devices: Vec<DeviceRequest>,
    pub labels: HashMap<String, String>,
    pub annotations: HashMap<String, String>,
    /// Relative to the pod's log directory.
    pub log_path: String,
    pub stdin: bool,
    pub stdin_once: bool,
    pub tty: bool,
    pub resources: Option<Resources>,
    pub security: SecurityContext,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn share_translation_makes_host_ids_the_containers() {
        let kubelet = IdMapping { container_id: 0, host_id: 100_000, length: 65_536 };
        let ns = UserNamespace { uids: vec![kubelet], gids: vec![kubelet] };
        let ids = ns.share_translation();
        let want = vec![
            IdTranslation::Map { guest: 100_000, host: 0, count: 65_536 },
            IdTranslation::SquashHost { host: 100_000, guest: OVERFLOW_ID, count: 65_536 },
        ];
        assert_eq!((ids.uids.clone(), ids.gids), (want.clone(), want));
        let args: Vec<String> = ids.uids.iter().map(IdTranslation::virtiofsd_arg).collect();
        assert_eq!(args, ["map:100000:0:65536", "squash-host:100000:65534:65536"]);
        // A guest range that is also a host-side range of the map cannot be squashed.
        let identity = IdMapping { container_id: 0, host_id: 0, length: 65_536 };
        let ns = UserNamespace { uids: vec![identity], gids: vec![identity] };
        assert_eq!(
            ns.share_translation().uids,
            vec![IdTranslation::Map { guest: 0, host: 0, count: 65_536 }]
        );
    }
}
