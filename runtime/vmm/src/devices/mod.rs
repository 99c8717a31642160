//! Guest-visible devices of the built-in VMM.
//!
//! Every device sits on the MMIO (or PIO) bus behind [`BusDevice`]. Virtio devices are
//! exposed through the virtio-mmio v2 transport in [`virtio::mmio::MmioTransport`], which
//! implements [`BusDevice`] and forwards to a [`virtio::VirtioDevice`] (vsock, blk, net,
//! vhost-user-fs).
//!
//! Threading model: queue notifications (a write to QueueNotify) are processed
//! synchronously on the vCPU thread that did the write; host-side events (a vsock peer
//! writes to its unix socket, a tap has a frame) are handled by each device's
//! `event-manager` subscriber, which the core runs on its event-loop thread. Both paths lock
//! the same device state, so the transport owns the device behind an `Arc<Mutex<_>>`.

/// A device on the MMIO or PIO bus; called on the vCPU thread on a guest access.
pub trait BusDevice: Send {
    /// Guest read of `data.len()` bytes at `offset` from the device's base address.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write of `data` at `offset` from the device's base address.
    fn write(&mut self, offset: u64, data: &[u8]);
}

pub mod block;
pub mod fs;
pub mod net;
pub mod virtio;
pub mod vsock;

pub use block::BlockDevice;
pub use fs::VhostUserFsDevice;
pub use net::NetDevice;
pub use virtio::mmio::MmioTransport;
pub use virtio::{Interrupt, VirtioDevice};
pub use vsock::VsockDevice;
