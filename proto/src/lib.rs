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

/// The host vsock port (CID 2) the agent connects to once it listens on [`AGENT_VSOCK_PORT`],
/// writing [`AGENT_READY_LINE`]. Through the hybrid vsock this reaches the unix socket
/// `<vsock uds>_1025`, on which the host waits instead of dialling a guest that is still
/// booting: a host-initiated connect that lands while the guest driver is bringing the vsock
/// device up can wedge vhost-device-vsock 0.3 for good (its worker thread exits on the
/// "queue not ready" error), and polling also costs up to one retry interval of start latency.
pub const AGENT_READY_VSOCK_PORT: u32 = 1025;

/// The guest vsock port that carries port-forwarded connections, one vsock connection per
/// forwarded TCP connection (bytes are spliced, never wrapped in protobuf messages). The host
/// writes `PORT <n>\n`; the agent connects to `localhost:<n>` in the guest and answers
/// `OK\n`, after which the connection carries the TCP bytes both ways, or `ERR <reason>\n`.
pub const PORT_FORWARD_VSOCK_PORT: u32 = 1026;

/// What the agent writes on its [`AGENT_READY_VSOCK_PORT`] connection.
pub const AGENT_READY_LINE: &str = "podvisor-agent ready\n";

/// Where the agent mounts the sandbox's image share (virtio-fs tag [`SHARED_FS_TAG`]):
/// container root filesystems' lower directories are relative to it.
pub const GUEST_SHARED_DIR: &str = "/run/podvisor/shared";

/// The virtio-fs tag of the sandbox's read-only image share.
pub const SHARED_FS_TAG: &str = "podvisor";

/// Where the agent mounts the sandbox's writable volume share (tag [`VOLUME_FS_TAG`]).
pub const GUEST_VOLUME_DIR: &str = "/run/podvisor/volumes";

/// The virtio-fs tag of the sandbox's volume share.
pub const VOLUME_FS_TAG: &str = "podvisor-volumes";

/// The HTTP/2 stream window a host client of the agent must advertise (at most): output the
/// agent sent can be lost in flight when a stream breaks, and the agent keeps the last
/// [`OUTPUT_REPLAY_BYTES`] it sent for a new reader, which covers a window this size plus a
/// chunk being encoded. (hyper's client default, 2 MiB, would outrun it.)
pub const AGENT_STREAM_WINDOW: u32 = 128 * 1024;

/// How much sent output the agent keeps per process for a reader that re-attaches.
pub const OUTPUT_REPLAY_BYTES: usize = 256 * 1024;
