//! What the daemon persists about sandboxes and containers (JSON under `--root`).

use std::collections::HashMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::hypervisor::VmHandle;

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
    pub id: String,
    pub metadata: PodMetadata,
    pub labels: HashMap<String, String>,
    pub annotations: HashMap<String, String>,
    pub log_directory: String,
    pub hostname: String,
    pub runtime_handler: String,
    pub dns: DnsSettings,
    /// CRI NamespaceMode values of the pod's network, PID and IPC namespaces.
    pub network_mode: i32,
    pub pid_mode: i32,
    pub ipc_mode: i32,
    pub created_at: i64,
    pub state: SandboxState,
    /// The running VM; `None` once stopped.
    pub vm: Option<VmHandle>,
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
    /// Where it is bound in the sandbox share (removed with the container).
    pub share_rel: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerRecord {
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
    pub state: ContainerState,
}
