//! The guest agent's modules; `main.rs` is the `podvisor-agent` binary's entry. A library so
//! fuzz targets can reach the agent's request decoding.

pub mod cgroup;
pub mod container;
pub mod device_cgroup;
pub mod devices;
pub mod helper;
pub mod host_pod;
pub mod init;
pub mod logging;
pub mod network;
pub mod pause;
pub mod portforward;
pub mod reaper;
pub mod rootfs;
pub mod sandbox;
pub mod seccomp;
pub mod server;
pub mod stdio;

/// Entry points for `fuzz/` (compiled always, so `make test` checks them and their seeds).
pub mod fuzzing;
