//! Errors of the sandbox layer, one variant per way an operation fails. The CRI layer maps
//! them to gRPC codes.

use std::time::Duration;

use super::logs::LogError;
use super::records::ContainerState;
use super::spec::SpecError;
use crate::agent::AgentError;
use crate::hypervisor::HypervisorError;
use crate::resource::network::NetworkError;
use crate::resource::ShareError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("pod sandbox {0} not found")]
    SandboxNotFound(String),
    #[error("container {0} not found")]
    ContainerNotFound(String),
    #[error("image {0:?} not found: pull it first")]
    ImageNotFound(String),
    #[error("pod sandbox {namespace}/{name} attempt {attempt} already exists as {existing}")]
    SandboxExists { namespace: String, name: String, attempt: u32, existing: String },
    #[error(
        "container {name} attempt {attempt} already exists in pod sandbox {sandbox} as {existing}"
    )]
    ContainerExists { name: String, attempt: u32, sandbox: String, existing: String },
    #[error("pod sandbox {0} is not ready")]
    SandboxNotReady(String),
    #[error("pod sandbox {0} is not running")]
    SandboxNotRunning(String),
    #[error("container {id} is {state:?}, not created")]
    ContainerNotCreated { id: String, state: ContainerState },
    #[error("container {0} is not running")]
    ContainerNotRunning(String),
    #[error("config.mounts[{index}].image: image {image:?} not found: pull it first")]
    VolumeImageNotFound { index: usize, image: String },
    #[error("config.mounts[{index}].image_sub_path: {path:?} {why}")]
    ImageSubPath { index: usize, path: String, why: &'static str },
    #[error("mount source {0} does not exist")]
    MountSourceMissing(String),
    #[error(
        "mount source {path} is on a private mount, so host mounts cannot propagate from it \
         ({propagation:?} needs a shared or slave mount, as with runc)"
    )]
    MountSourceNotShared { path: String, propagation: super::Propagation },
    #[error(
        "config.devices[{index}] ({path}): not in [vm] allowed_devices (a VM has none of the \
         host's devices; allowed ones are the guest's own)"
    )]
    DeviceNotAllowed { index: usize, path: String },
    #[error("runtime handler {name:?} is not configured; known handlers: {known}")]
    UnknownHandler { name: String, known: String },
    #[error(
        "config.linux.security_context.namespace_options.{field}: NODE (the host's namespace) is \
         not supported by a VM sandbox; run the pod on a handler with hypervisor = \"host\" (or \
         set route_host_namespace_pods)"
    )]
    HostNamespaceInVm { field: &'static str },
    #[error(
        "config.linux.security_context.namespace_options.userns_options: POD mode is not \
         supported by the host handler (only by VM handlers)"
    )]
    UserNamespaceOnHost,
    #[error("the pod asks for a VM of {vcpus} vCPUs and {memory_mib} MiB; at most {max_vcpus} vCPUs and {max_mib} MiB")]
    VmTooLarge { vcpus: u32, memory_mib: u32, max_vcpus: u32, max_mib: u32 },
    #[error(
        "the pod now asks for {vcpus} vCPUs and {memory_mib} MiB, more than its VM's {vm_vcpus} \
         vCPUs and {vm_mib} MiB (growing a VM needs hotplug, which Podvisor does not do yet)"
    )]
    PodOutgrowsVm { vcpus: u32, memory_mib: u32, vm_vcpus: u32, vm_mib: u32 },
    #[error("a memory limit of {limit} bytes is larger than the pod's VM ({vm_mib} MiB)")]
    LimitExceedsVm { limit: i64, vm_mib: u32 },
    #[error(
        "the stored process of container {id} cannot be read ({reason}); recreate the container"
    )]
    StoredProcess { id: String, reason: String },
    #[error("command {cmd:?} timed out after {timeout:?}")]
    ExecTimeout { cmd: Vec<String>, timeout: Duration },
    #[error("container {0} did not exit after SIGKILL")]
    KillTimeout(String),
    #[error("pod sandbox {sandbox} did not come up: {reason}")]
    Boot { sandbox: String, reason: String },
    #[error("hypervisor: {0}")]
    Hypervisor(#[from] HypervisorError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error("state store: {0}")]
    Store(#[from] StoreError),
    #[error("sandbox share: {0}")]
    Share(#[from] ShareError),
    #[error("pod network: {0}")]
    Network(#[from] NetworkError),
    #[error("container spec: {0}")]
    Spec(#[from] SpecError),
    #[error("container log: {0}")]
    Log(#[from] LogError),
    #[error("image store: {0}")]
    Image(String),
}

pub type Result<T> = std::result::Result<T, SandboxError>;
