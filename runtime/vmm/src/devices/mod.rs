//! Guest-visible devices of the built-in VMM.
//!
//! Every device sits on the MMIO (or PIO) bus behind [`BusDevice`]. Virtio devices are
//! exposed through the virtio-mmio v2 transport, [`MmioTransport`], which implements
//! [`BusDevice`] and drives a [`VirtioDevice`]:
//!
//! | device | type | built with |
//! |---|---|---|
//! | [`VsockDevice`] | 19 | `VsockDevice::new(cid, uds_path)` (hybrid vsock, Firecracker's protocol) |
//! | [`BlockDevice`] | 2 | `BlockDevice::new(path, read_only)`; `swap_backing(path)` |
//! | [`NetDevice`] | 1 | `NetDevice::new(tap_name, mac)` |
//! | [`VhostUserFsDevice`] | 26 | `VhostUserFsDevice::new(virtiofsd_socket, tag)` |
//! | [`VirtioFsDevice`] | 26 | `VirtioFsDevice::new(fuse_server_socket, tag)` (in-process rings, FUSE over a unix socket) |
//!
//! Wiring, per device: wrap it in `Arc<Mutex<_>>`, give a clone to
//! `MmioTransport::new(guest_memory, irq_eventfd, device)` (the transport is the bus
//! device of the 4 KiB MMIO window; `irq_eventfd` is registered with KVM irqfd), and add
//! another clone to the `event-manager` loop as a `MutEventSubscriber` (vsock, net, vhost-user
//! fs; blk and in-process virtio-fs have no host-side events).
//!
//! Threading: queue notifications (a guest write to QueueNotify) are processed
//! synchronously on the vCPU thread that wrote it (vsock tx, blk I/O, net tx, the
//! vhost-user setup at DRIVER_OK, in-process virtio-fs requests with their FUSE server's
//! replies); host-side readiness (a vsock peer wrote to its unix socket, the tap has a
//! frame, virtiofsd used buffers) is handled on the event-loop
//! thread. Both lock the same device mutex. Nothing on either path blocks on the guest or
//! on a peer, except file I/O (blk), vhost-user request/reply with virtiofsd and the FUSE
//! server's replies (bounded by `virtiofs::REPLY_TIMEOUT`).
//!
//! Guest input is never trusted: every descriptor chain is walked by
//! [`virtio::ChainBuffers::parse`] (bounds, loops, length, direction) before any access; a
//! bad chain is returned to the guest unprocessed (or with an error status), and a corrupt
//! available ring sets DEVICE_NEEDS_RESET.

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
pub mod virtiofs;
pub mod vsock;

pub use block::BlockDevice;
pub use fs::VhostUserFsDevice;
pub use net::NetDevice;
pub use virtio::mmio::{MmioTransport, TransportState};
pub use virtio::{Interrupt, VirtioDevice};
pub use virtiofs::VirtioFsDevice;
pub use vsock::VsockDevice;
