//! What of the device a snapshot keeps: only its queues (the transport saves them through
//! [`VirtioDevice::queue_states`](crate::devices::VirtioDevice::queue_states)). No FUSE
//! session crosses a snapshot: a template's guest has probed the device but mounted nothing,
//! and the restored VM's device talks to a fresh server on the socket of its own config.
//!
//! Requests are served to completion inside the QueueNotify that made them, so a paused VM
//! (every vCPU outside KVM_RUN and outside device code) never has one in flight.

use super::VirtioFsDevice;

impl VirtioFsDevice {
    /// The ring positions of the active queues (hiprio first), or `None` before DRIVER_OK.
    pub fn saved_queues(&self) -> Option<Vec<virtio_queue::QueueState>> {
        Some(self.active.as_ref()?.queues.iter().map(|q| q.state()).collect())
    }
}
