//! vhost-user-fs frontend (device type 26): the rings are served by virtiofsd.
//!
//! The VMM only owns the config space (tag, number of request queues) and the plumbing:
//! at DRIVER_OK it hands virtiofsd the memory table (the memfd regions of guest memory),
//! the ring addresses (as host virtual addresses, which the memory table maps) and one
//! kick and one call eventfd per queue. A QueueNotify is forwarded to the kick eventfd
//! (the core may instead register [`VhostUserFsDevice::kick_eventfds`] as KVM ioeventfds).
//! virtiofsd signals the call eventfds; the event loop (`MutEventSubscriber`) turns those
//! into the virtio-mmio interrupt, so InterruptStatus is set before the guest looks.

mod event_handler;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::virtio::{
    read_config_bytes, ActivateContext, ActivateError, Interrupt, VirtioDevice, TYPE_FS,
};

/// Longest tag the config space holds.
pub const TAG_LEN: usize = 36;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 1024;
/// VHOST_USER_F_PROTOCOL_FEATURES (bit 30 of the vhost-user feature word).
const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;

/// Failures setting up the frontend.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The tag is empty or longer than 36 bytes.
    #[error("virtio-fs tag {0:?} must be 1 to 36 bytes")]
    InvalidTag(String),
    /// No request queue asked for.
    #[error("at least one request queue is needed")]
    NoRequestQueue,
    /// Connecting to virtiofsd's socket.
    #[error("connect to {0}: {1}")]
    Connect(PathBuf, vhost::Error),
    /// A vhost-user request at setup failed.
    #[error("vhost-user {0}: {1}")]
    Request(&'static str, vhost::Error),
    /// Creating an eventfd.
    #[error("eventfd: {0}")]
    EventFd(std::io::Error),
}

struct Active {
    interrupt: Arc<Interrupt>,
    queue_count: usize,
}

/// The vhost-user-fs frontend.
pub struct VhostUserFsDevice {
    socket_path: PathBuf,
    frontend: Frontend,
    config: Vec<u8>,
    queue_sizes: Vec<u16>,
    avail_features: u64,
    backend_features: u64,
    kick_evts: Vec<EventFd>,
    call_evts: Vec<EventFd>,
    active: Option<Active>,
}

impl VhostUserFsDevice {
    /// Connects to virtiofsd at `socket` and exposes it to the guest as `tag` with one
    /// request queue.
    pub fn new(socket: &Path, tag: &str) -> Result<Self, FsError> {
        Self::with_request_queues(socket, tag, 1)
    }

    /// Like [`Self::new`] with `request_queues` request queues (plus the hiprio queue).
    pub fn with_request_queues(
        socket: &Path,
        tag: &str,
        request_queues: u16,
    ) -> Result<Self, FsError> {
        if tag.is_empty() || tag.len() > TAG_LEN {
            return Err(FsError::InvalidTag(tag.into()));
        }
        if request_queues == 0 {
            return Err(FsError::NoRequestQueue);
        }
        let queue_count = 1 + usize::from(request_queues);
        let mut frontend = Frontend::connect(socket, queue_count as u64)
            .map_err(|e| FsError::Connect(socket.into(), e))?;
        frontend.set_owner().map_err(|e| FsError::Request("SET_OWNER", e))?;
        let backend_features =
            frontend.get_features().map_err(|e| FsError::Request("GET_FEATURES", e))?;
        // The backend serves the rings, so ring features are whatever it supports.
        let supported = 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC;
        let avail_features = backend_features & supported;
        if backend_features & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
            let offered = frontend
                .get_protocol_features()
                .map_err(|e| FsError::Request("GET_PROTOCOL_FEATURES", e))?;
            let protocol_features = offered & VhostUserProtocolFeatures::MQ;
            frontend
                .set_protocol_features(protocol_features)
                .map_err(|e| FsError::Request("SET_PROTOCOL_FEATURES", e))?;
        }
        let mut config = vec![0u8; TAG_LEN + 4];
        config[..tag.len()].copy_from_slice(tag.as_bytes());
        config[TAG_LEN..].copy_from_slice(&u32::from(request_queues).to_le_bytes());
        let new_evt = || EventFd::new(EFD_NONBLOCK).map_err(FsError::EventFd);
        Ok(VhostUserFsDevice {
            socket_path: socket.into(),
            frontend,
            config,
            queue_sizes: vec![QUEUE_SIZE; queue_count],
            avail_features,
            backend_features,
            kick_evts: (0..queue_count).map(|_| new_evt()).collect::<Result<_, _>>()?,
            call_evts: (0..queue_count).map(|_| new_evt()).collect::<Result<_, _>>()?,
            active: None,
        })
    }

    /// The kick eventfd of each queue (usable as KVM ioeventfds on QueueNotify with the
    /// queue index as datamatch).
    pub fn kick_eventfds(&self) -> &[EventFd] {
        &self.kick_evts
    }

    /// virtiofsd's socket.
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    fn setup_backend(&mut self, ctx: &ActivateContext) -> Result<(), String> {
        let err = |what: &str, e: vhost::Error| format!("{what}: {e}");
        let mut features = ctx.acked_features;
        if self.backend_features & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
            features |= VHOST_USER_F_PROTOCOL_FEATURES;
        }
        self.frontend.set_features(features).map_err(|e| err("SET_FEATURES", e))?;
        let regions = ctx
            .mem
            .iter()
            .map(|region| {
                VhostUserMemoryRegionInfo::from_guest_region(region).map_err(|e| {
                    format!(
                        "guest memory region at {:#x} is not fd-backed: {e}",
                        region.start_addr().0
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.frontend.set_mem_table(&regions).map_err(|e| err("SET_MEM_TABLE", e))?;
        for (index, queue) in ctx.queues.iter().enumerate() {
            let host_addr = |gpa: u64| -> Result<u64, String> {
                ctx.mem
                    .get_host_address(GuestAddress(gpa))
                    .map(|p| p as u64)
                    .map_err(|e| format!("queue {index} address {gpa:#x}: {e}"))
            };
            let config = VringConfigData {
                queue_max_size: queue.max_size(),
                queue_size: queue.size(),
                flags: 0,
                desc_table_addr: host_addr(queue.desc_table())?,
                used_ring_addr: host_addr(queue.used_ring())?,
                avail_ring_addr: host_addr(queue.avail_ring())?,
                log_addr: None,
            };
            self.frontend
                .set_vring_num(index, queue.size())
                .map_err(|e| err("SET_VRING_NUM", e))?;
            self.frontend.set_vring_addr(index, &config).map_err(|e| err("SET_VRING_ADDR", e))?;
            self.frontend
                .set_vring_base(index, queue.next_avail())
                .map_err(|e| err("SET_VRING_BASE", e))?;
            self.frontend
                .set_vring_call(index, &self.call_evts[index])
                .map_err(|e| err("SET_VRING_CALL", e))?;
            self.frontend
                .set_vring_kick(index, &self.kick_evts[index])
                .map_err(|e| err("SET_VRING_KICK", e))?;
        }
        if features & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
            for index in 0..ctx.queues.len() {
                self.frontend
                    .set_vring_enable(index, true)
                    .map_err(|e| err("SET_VRING_ENABLE", e))?;
            }
        }
        Ok(())
    }

    /// A call eventfd fired: forward it as a used-buffer interrupt.
    pub fn process_call_events(&mut self) {
        let mut fired = false;
        for evt in &self.call_evts {
            if evt.read().is_ok() {
                fired = true;
            }
        }
        if fired {
            if let Some(active) = &self.active {
                active.interrupt.signal_used_queue();
            }
        }
    }
}

impl VirtioDevice for VhostUserFsDevice {
    fn device_type(&self) -> u32 {
        TYPE_FS
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if ctx.queues.len() != self.queue_sizes.len() {
            return Err(ActivateError::QueueCount {
                expected: self.queue_sizes.len(),
                got: ctx.queues.len(),
            });
        }
        self.setup_backend(&ctx).map_err(ActivateError::VhostUser)?;
        self.active = Some(Active { interrupt: ctx.interrupt, queue_count: ctx.queues.len() });
        Ok(())
    }

    fn queue_notify(&mut self, queue_index: u32) {
        match self.kick_evts.get(queue_index as usize) {
            Some(evt) => {
                if let Err(err) = evt.write(1) {
                    tracing::error!("virtio-fs: kicking queue {queue_index}: {err}");
                }
            }
            None => tracing::warn!("virtio-fs: notify for unknown queue {queue_index}"),
        }
    }

    fn reset(&mut self) {
        if let Some(active) = self.active.take() {
            // GET_VRING_BASE stops each ring in the backend.
            for index in 0..active.queue_count {
                if let Err(err) = self.frontend.get_vring_base(index) {
                    tracing::warn!("virtio-fs: stopping ring {index}: {err}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
