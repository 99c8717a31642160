//! What the daemon persists about sandboxes and containers (JSON under `--root`).
//!
//! Every record carries `schema_version`. A daemon reads the records of every earlier schema
//! and upgrades them in memory ([`upgrade_sandbox`], [`upgrade_container`]), so a daemon
//! upgrade keeps running pods; what it writes back is the current schema.
//!
//! - 0 (no `schema_version`): namespace modes as CRI enum integers (`network_mode`,
//!   `pid_mode`, `ipc_mode`); one read-only share per pod.
//! - 1: namespace modes as names (`namespaces`), and the pod's share layout.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::handlers::VmSize;
use super::types::{NamespaceMode, NamespaceModes, Resources};
use crate::hypervisor::VmHandle;
use crate::resource::network::NetworkRecord;
use crate::resource::ShareLayout;
use crate::store::{self, StoreError};

/// The schema this daemon writes.
pub const SCHEMA_VERSION: u32 = 1;

/// Errors reading a record.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{path} has schema version {version}, newer than this daemon's {SCHEMA_VERSION}")]
    TooNew { path: PathBuf, version: u64 },
    #[error("{path}: {reason}")]
    Upgrade { path: PathBuf, reason: String },
    #[error("decoding {path}: {source}")]
    Decode { path: PathBuf, source: serde_json::Error },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SandboxState {
    Ready,
    NotReady,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodMetadata {
    pub name: String,
    pub uid: String,
    pub namespace: String,
    pub attempt: u32,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DnsSettings {
    pub servers: Vec<String>,
    pub searches: Vec<String>,
    pub options: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxRecord {
    pub schema_version: u32,
    pub id: String,
    pub metadata: PodMetadata,
    pub labels: HashMap<String, String>,
    pub annotations: HashMap<String, String>,
    pub log_directory: String,
    pub hostname: String,
    pub runtime_handler: String,
    pub dns: DnsSettings,
    pub namespaces: NamespaceModes,
    pub share_layout: ShareLayout,
    pub created_at: i64,
    pub state: SandboxState,
    /// The running VM; `None` once stopped.
    pub vm: Option<VmHandle>,
    /// The pod's CNI attachment, from before ADD until DEL succeeded.
    #[serde(default)]
    pub network: Option<NetworkRecord>,
    /// The VM the pod was given (records of older daemons: the configured default).
    #[serde(default)]
    pub vm_size: Option<VmSize>,
    /// RunPodSandbox has not answered yet. Written before the first side effect (shares, CNI,
    /// VMM), so a daemon killed mid-start finds what to undo; a restarted daemon removes such
    /// a pod (its caller never got an id for it).
    #[serde(default)]
    pub creating: bool,
    /// The pod's user namespace (userns_options POD).
    #[serde(default)]
    pub user_namespace: Option<super::UserNamespace>,
    /// How the pod's VM started (records of older daemons: unknown, they cold-booted).
    #[serde(default)]
    pub start: Option<StartRecord>,
}

/// How a pod's VM started: restored from a VM template, or booted, and why not from one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StartRecord {
    /// `template` or `cold`.
    pub path: String,
    /// Why it cold-booted; empty from a template.
    #[serde(default)]
    pub reason: String,
    /// The template's key, when it came from one.
    #[serde(default)]
    pub template: String,
}

impl SandboxRecord {
    /// The pod's addresses, IPv4 first; none without a network attachment.
    pub fn pod_ips(&self) -> Vec<std::net::IpAddr> {
        self.network.as_ref().map(NetworkRecord::pod_ips).unwrap_or_default()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ContainerState {
    Created,
    Running,
    Exited,
    Unknown,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ContainerMetadata {
    pub name: String,
    pub attempt: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MountRecord {
    pub container_path: String,
    pub host_path: String,
    pub read_only: bool,
    #[serde(default)]
    pub recursive_read_only: bool,
    #[serde(default)]
    pub propagation: super::Propagation,
    /// Where it is bound in the sandbox share (removed with the container); empty for an
    /// image volume, whose tree stays bound with the pod's other images.
    pub share_rel: String,
    /// An image volume's image as the request named it, and its id (empty for a host path).
    #[serde(default)]
    pub image: String,
    #[serde(default)]
    pub image_id: String,
    #[serde(default)]
    pub image_sub_path: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerRecord {
    pub schema_version: u32,
    pub id: String,
    pub sandbox_id: String,
    pub metadata: ContainerMetadata,
    /// The image as the CRI request named it.
    pub image: String,
    /// The resolved image id (config digest).
    pub image_id: String,
    /// A repo digest or tag of the image, as ContainerStatus.image_ref.
    pub image_ref: String,
    pub labels: HashMap<String, String>,
    pub annotations: HashMap<String, String>,
    /// Absolute log path on the host, if the pod has a log directory and the container a path.
    pub log_path: Option<PathBuf>,
    /// The CRI-relative log path, as given.
    pub log_path_relative: String,
    pub tty: bool,
    pub stdin: bool,
    pub stdin_once: bool,
    pub mounts: Vec<MountRecord>,
    /// The container's OCI process (JSON): execs start from it (env, user, cwd).
    pub oci_process_json: String,
    pub created_at: i64,
    pub started_at: i64,
    pub finished_at: i64,
    pub exit_code: i32,
    pub reason: String,
    pub message: String,
    pub pid: u32,
    /// The image's StopSignal as a number; 0 = SIGTERM.
    #[serde(default)]
    pub stop_signal: i32,
    /// The cgroup limits it was created with or last updated to.
    #[serde(default)]
    pub resources: Option<Resources>,
    /// Security fields it was given that mean nothing inside the VM (AppArmor, SELinux).
    #[serde(default)]
    pub not_applicable: Vec<String>,
    pub state: ContainerState,
}

impl ContainerRecord {
    /// Who its first process runs as, from its OCI process (None if that does not say).
    pub fn process_identity(&self) -> Option<super::spec::Identity> {
        let process: oci_spec::runtime::Process =
            serde_json::from_str(&self.oci_process_json).ok()?;
        let user = process.user();
        Some(super::spec::Identity {
            uid: user.uid(),
            gid: user.gid(),
            additional_gids: user.additional_gids().clone().unwrap_or_default(),
        })
    }
}

/// The version a record says it has (0 when it says none).
fn version_of(value: &Value) -> u64 {
    value.get("schema_version").and_then(Value::as_u64).unwrap_or(0)
}

/// A CRI `NamespaceMode` integer of schema 0.
fn mode_from_v0(value: Option<&Value>) -> Result<NamespaceMode, String> {
    match value.and_then(Value::as_i64).unwrap_or(0) {
        0 => Ok(NamespaceMode::Pod),
        1 => Ok(NamespaceMode::Container),
        2 => Ok(NamespaceMode::Node),
        3 => Ok(NamespaceMode::Target),
        other => Err(format!("unknown namespace mode {other}")),
    }
}

/// A sandbox record of any schema, as the current one.
pub fn upgrade_sandbox(path: &Path, mut value: Value) -> Result<SandboxRecord, RecordError> {
    let version = version_of(&value);
    if version > u64::from(SCHEMA_VERSION) {
        return Err(RecordError::TooNew { path: path.into(), version });
    }
    let upgrade_err = |reason: String| RecordError::Upgrade { path: path.into(), reason };
    let object = value.as_object_mut().ok_or_else(|| upgrade_err("not an object".into()))?;
    if version == 0 {
        let modes = NamespaceModes {
            network: mode_from_v0(object.get("network_mode")).map_err(upgrade_err)?,
            pid: mode_from_v0(object.get("pid_mode")).map_err(upgrade_err)?,
            ipc: mode_from_v0(object.get("ipc_mode")).map_err(upgrade_err)?,
        };
        for old in ["network_mode", "pid_mode", "ipc_mode"] {
            object.remove(old);
        }
        let modes = serde_json::to_value(modes).map_err(|e| upgrade_err(e.to_string()))?;
        object.insert("namespaces".into(), modes);
        object.insert("share_layout".into(), Value::String("single".into()));
    }
    object.insert("schema_version".into(), Value::from(SCHEMA_VERSION));
    serde_json::from_value(value)
        .map_err(|source| RecordError::Decode { path: path.into(), source })
}

/// A container record of any schema, as the current one.
pub fn upgrade_container(path: &Path, mut value: Value) -> Result<ContainerRecord, RecordError> {
    let version = version_of(&value);
    if version > u64::from(SCHEMA_VERSION) {
        return Err(RecordError::TooNew { path: path.into(), version });
    }
    let object = value.as_object_mut().ok_or_else(|| RecordError::Upgrade {
        path: path.into(),
        reason: "not an object".into(),
    })?;
    // Schema 1 changed nothing in container records but the version.
    object.insert("schema_version".into(), Value::from(SCHEMA_VERSION));
    serde_json::from_value(value)
        .map_err(|source| RecordError::Decode { path: path.into(), source })
}

/// Reads a sandbox record of any schema.
pub fn load_sandbox(path: &Path) -> Result<SandboxRecord, RecordError> {
    upgrade_sandbox(path, store::read_json(path)?)
}

/// Reads a container record of any schema.
pub fn load_container(path: &Path) -> Result<ContainerRecord, RecordError> {
    upgrade_container(path, store::read_json(path)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records exactly as the daemon of schema 0 wrote them (2026-11, before the split).
    const V0_SANDBOX: &str = include_str!("../../../tests/fixtures/records-v0/sandboxes/5c0e5a3d7d2b4f4e8a1b9c0d1e2f3a4b5c0e5a3d7d2b4f4e8a1b9c0d1e2f3a4b/sandbox.json");
    const V0_CONTAINER: &str = include_str!("../../../tests/fixtures/records-v0/sandboxes/5c0e5a3d7d2b4f4e8a1b9c0d1e2f3a4b5c0e5a3d7d2b4f4e8a1b9c0d1e2f3a4b/containers/9a8b7c6d5e4f30211a2b3c4d5e6f70819a8b7c6d5e4f30211a2b3c4d5e6f7081.json");

    #[test]
    fn schema_0_records_upgrade() {
        let sb =
            upgrade_sandbox(Path::new("v0"), serde_json::from_str(V0_SANDBOX).unwrap()).unwrap();
        assert_eq!(sb.schema_version, SCHEMA_VERSION);
        assert_eq!(
            sb.namespaces,
            NamespaceModes {
                network: NamespaceMode::Pod,
                pid: NamespaceMode::Container,
                ipc: NamespaceMode::Pod
            }
        );
        assert_eq!(sb.share_layout, ShareLayout::Single);
        assert_eq!(sb.metadata.name, "legacy-pod");
        assert_eq!(sb.vm.as_ref().unwrap().backend, "qemu");
        let c = upgrade_container(Path::new("v0"), serde_json::from_str(V0_CONTAINER).unwrap())
            .unwrap();
        assert_eq!(c.schema_version, SCHEMA_VERSION);
        assert_eq!(c.metadata.name, "legacy-ctr");
        assert_eq!(c.mounts[0].share_rel, format!("volumes/{}/0", c.id));
    }

    #[test]
    fn current_records_round_trip_and_newer_ones_are_refused() {
        let sb =
            upgrade_sandbox(Path::new("v0"), serde_json::from_str(V0_SANDBOX).unwrap()).unwrap();
        let again = upgrade_sandbox(Path::new("v1"), serde_json::to_value(&sb).unwrap()).unwrap();
        assert_eq!(again.namespaces, sb.namespaces);
        assert_eq!(again.share_layout, ShareLayout::Single);
        let mut future = serde_json::to_value(&sb).unwrap();
        future["schema_version"] = Value::from(99);
        let err = upgrade_sandbox(Path::new("f"), future).unwrap_err();
        assert!(matches!(err, RecordError::TooNew { version: 99, .. }), "{err}");
        let mut bad: Value = serde_json::from_str(V0_SANDBOX).unwrap();
        bad["pid_mode"] = Value::from(7);
        assert!(matches!(upgrade_sandbox(Path::new("bad"), bad), Err(RecordError::Upgrade { .. })));
    }
}
