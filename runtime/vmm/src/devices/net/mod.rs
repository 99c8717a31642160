//! virtio-net (device type 1) on a tap device.
//!
//! Queues: 0 = rx, 1 = tx. No offloads are offered, so every frame is at most
//! MTU-sized and carries a zero 12-byte `virtio_net_hdr_v1`, which the tap (opened with
//! IFF_VNET_HDR) takes and gives in the same layout: frames pass through unchanged.
//! Guest tx is processed on the vCPU thread that kicked the queue; tap readiness comes
//! through the core's event loop (`MutEventSubscriber`, register `Arc<Mutex<NetDevice>>`).

mod event_handler;
pub mod tap;

mod metrics;

pub use self::metrics::NetMetrics;

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::FromRawFd;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP};
use virtio_queue::{Queue, QueueT};

pub use self::tap::{TapError, VNET_HDR_SIZE};
use super::virtio::{
    pop_chain, read_config_bytes, ActivateContext, ActivateError, ChainBuffers, GuestMemory,
    Interrupt, VirtioDevice, FEATURE_VERSION_1, TYPE_NET,
};

/// Queue size of rx and tx.
pub const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
/// Largest frame (header included) moved in either direction.
pub const MAX_FRAME: usize = VNET_HDR_SIZE + 65535;

struct Active {
    mem: GuestMemory,
    queues: Vec<Queue>,
    interrupt: Arc<Interrupt>,
}

/// The network device.
pub struct NetDevice {
    /// The tap (or, in tests, any fd that reads and writes whole frames).
    backend: File,
    mac: [u8; 6],
    queue_sizes: [u16; 2],
    active: Option<Active>,
    /// Edge-triggered readiness not yet drained.
    backend_readable: bool,
    /// A frame read from the backend that waits for an rx buffer.
    pending_frame: Option<Vec<u8>>,
    metrics: NetMetrics,
}

impl NetDevice {
    /// A NIC with address `mac` on tap `tap_name` (created if it does not exist and the
    /// process may).
    pub fn new(tap_name: &str, mac: [u8; 6]) -> Result<Self, TapError> {
        Ok(Self::from_frame_fd(tap::open_tap(tap_name)?.into(), mac))
    }

    /// A NIC on tap fd `fd`, inherited from the process that started this one.
    pub fn from_inherited_tap(fd: i32, mac: [u8; 6]) -> Result<Self, TapError> {
        if fd < 3 {
            return Err(TapError::BadFd(fd));
        }
        // SAFETY: fcntl(F_GETFD) only queries the descriptor table; a closed fd fails.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(TapError::BadFd(fd));
        }
        // SAFETY: `fd` is open (checked above) and was handed to this process for this device
        // alone: the config names each inherited fd once (checked by `VmmConfig::validate`),
        // so nothing else owns or closes it.
        let file = unsafe { File::from_raw_fd(fd) };
        tap::configure(&file)?;
        tap::set_nonblocking(&file)?;
        Ok(Self::from_frame_fd(file.into(), mac))
    }

    /// A NIC on an already open, non-blocking fd that reads and writes one frame (with a
    /// 12-byte vnet header) per call: a tap, or a SOCK_SEQPACKET socket in tests.
    pub fn from_frame_fd(fd: OwnedFd, mac: [u8; 6]) -> Self {
        NetDevice {
            backend: File::from(fd),
            mac,
            queue_sizes: [QUEUE_SIZE; 2],
            active: None,
            backend_readable: true,
            pending_frame: None,
            metrics: NetMetrics::default(),
        }
    }

    /// The MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Counters so far.
    pub fn metrics(&self) -> NetMetrics {
        self.metrics
    }

    /// The tap became readable (called by the event loop; also usable directly).
    pub fn process_backend_events(&mut self) {
        self.backend_readable = true;
        self.process_rx();
    }

    fn process_tx(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = &active.mem;
        let mut used_any = false;
        while let Some(chain) = pop_chain(&mut active.queues[TX], mem, &active.interrupt) {
            let head = chain.head_index();
            match ChainBuffers::parse(chain, usize::from(QUEUE_SIZE)) {
                Ok(buffers) => {
                    let len = buffers.readable_len();
                    if !buffers.writable.is_empty() || len <= VNET_HDR_SIZE || len > MAX_FRAME {
                        tracing::warn!("virtio-net: dropping tx chain {head} ({len} bytes)");
                        self.metrics.malformed_chains += 1;
                    } else {
                        let mut frame = vec![0u8; len];
                        let sent = buffers
                            .read_at(mem, 0, &mut frame)
                            .is_ok()
                            .then(|| self.backend.write(&frame));
                        match sent {
                            Some(Ok(n)) if n == len => {
                                self.metrics.tx_frames += 1;
                                self.metrics.tx_bytes += (len - VNET_HDR_SIZE) as u64;
                            }
                            other => {
                                tracing::debug!("virtio-net: tx frame dropped: {other:?}");
                                self.metrics.tx_dropped += 1;
                            }
                        }
                    }
                }
                Err(err) => {
                    tracing::warn!("virtio-net: dropping malformed tx chain {head}: {err}");
                    self.metrics.malformed_chains += 1;
                }
            }
            if active.queues[TX].add_used(mem, head, 0).is_err() {
                active.interrupt.signal_needs_reset();
                return;
            }
            used_any = true;
        }
        if used_any {
            active.interrupt.signal_used_queue();
        }
    }

    fn read_frame(&mut self) -> Option<Vec<u8>> {
        let mut frame = vec![0u8; MAX_FRAME];
        loop {
            match self.backend.read(&mut frame) {
                Ok(0) => {
                    self.backend_readable = false;
                    return None;
                }
                Ok(n) => {
                    frame.truncate(n);
                    return Some(frame);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    if e.kind() != ErrorKind::WouldBlock {
                        tracing::warn!("virtio-net: reading the tap: {e}");
                    }
                    self.backend_readable = false;
                    return None;
                }
            }
        }
    }

    fn process_rx(&mut self) {
        if self.active.is_none() {
            return;
        }
        let mut used_any = false;
        loop {
            let frame = match self.pending_frame.take() {
                Some(frame) => frame,
                None if self.backend_readable => match self.read_frame() {
                    Some(frame) => frame,
                    None => break,
                },
                None => break,
            };
            let Some(active) = self.active.as_mut() else {
                break;
            };
            let mem = &active.mem;
            let Some(chain) = pop_chain(&mut active.queues[RX], mem, &active.interrupt) else {
                // No buffers: keep the frame; the tap holds the rest until the guest
                // adds buffers (rx queue notify).
                self.pending_frame = Some(frame);
                break;
            };
            let head = chain.head_index();
            let used_len = match ChainBuffers::parse(chain, usize::from(QUEUE_SIZE)) {
                Ok(buffers)
                    if buffers.readable.is_empty() && buffers.writable_len() >= frame.len() =>
                {
                    match buffers.write_at(mem, 0, &frame) {
                        Ok(()) => {
                            self.metrics.rx_frames += 1;
                            self.metrics.rx_bytes +=
                                (frame.len() - VNET_HDR_SIZE.min(frame.len())) as u64;
                            frame.len() as u32
                        }
                        Err(_) => 0,
                    }
                }
                Ok(_) => {
                    tracing::warn!(
                        "virtio-net: rx chain {head} cannot hold a {}-byte frame",
                        frame.len()
                    );
                    self.metrics.rx_dropped += 1;
                    self.metrics.malformed_chains += 1;
                    0
                }
                Err(err) => {
                    tracing::warn!("virtio-net: dropping malformed rx chain {head}: {err}");
                    self.metrics.malformed_chains += 1;
                    self.metrics.rx_dropped += 1;
                    0
                }
            };
            if active.queues[RX].add_used(mem, head, used_len).is_err() {
                active.interrupt.signal_needs_reset();
                return;
            }
            used_any = true;
        }
        if used_any {
            if let Some(active) = &self.active {
                active.interrupt.signal_used_queue();
            }
        }
    }
}

impl VirtioDevice for NetDevice {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn avail_features(&self) -> u64 {
        FEATURE_VERSION_1 | 1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_STATUS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&self.mac);
        config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        read_config_bytes(&config, offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if ctx.queues.len() != 2 {
            return Err(ActivateError::QueueCount { expected: 2, got: ctx.queues.len() });
        }
        self.active = Some(Active { mem: ctx.mem, queues: ctx.queues, interrupt: ctx.interrupt });
        self.backend_readable = true;
        Ok(())
    }

    fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
        Some(self.active.as_ref()?.queues.iter().map(Queue::state).collect())
    }

    fn queue_notify(&mut self, queue_index: u32) {
        match queue_index as usize {
            RX => self.process_rx(),
            TX => self.process_tx(),
            other => tracing::warn!("virtio-net: notify for unknown queue {other}"),
        }
    }

    fn reset(&mut self) {
        self.active = None;
        self.pending_frame = None;
    }
}

#[cfg(test)]
mod tests;
