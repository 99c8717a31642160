//! The agent protocol: what the host daemon asks of `podvisor-agent`, PID 1 in every guest.
//!
//! It is gRPC (tonic) over one vsock stream. Everything long-lived is a real stream
//! (process output, waits, events) so exec/attach/logs never poll.

#![allow(clippy::all)]

pub mod agent {
    tonic::include_proto!("podvisor.agent.v1");
}

/// The guest vsock port the agent listens on.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// Where the agent mounts the sandbox's shared filesystem (virtio-fs tag [`SHARED_FS_TAG`]).
pub const GUEST_SHARED_DIR: &str = "/run/podvisor/shared";

/// The virtio-fs tag of the sandbox's shared directory.
pub const SHARED_FS_TAG: &str = "podvisor";
