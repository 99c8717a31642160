//! virtio-vsock (device type 19) with a Firecracker-style hybrid unix-socket muxer.
//!
//! Queues: 0 = rx (device → guest), 1 = tx (guest → device), 2 = event.
//! Guest tx is processed synchronously on the vCPU thread that kicked the queue; host-side
//! readiness arrives through the muxer's epoll fd, which [`VsockDevice`] exposes to the
//! core's `event-manager` loop (`MutEventSubscriber`, register `Arc<Mutex<VsockDevice>>`).

mod event_handler;
pub mod muxer;
pub mod packet;

mod metrics;

pub use self::metrics::VsockMetrics;

use std::path::Path;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};

use self::muxer::{Muxer, MuxerError, RxPayload};
use self::packet::*;
use super::virtio::{
    pop_chain, read_config_bytes, ActivateContext, ActivateError, ChainBuffers, GuestMemory,
    Interrupt, VirtioDevice, FEATURE_VERSION_1, TYPE_VSOCK,
};

/// Queue size of each of the three queues.
pub const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
const EVENT: usize = 2;
/// Largest guest → host payload accepted in one packet.
const MAX_TX_PAYLOAD: usize = 64 * 1024;
/// The guest CID when the config names none.
pub const DEFAULT_GUEST_CID: u64 = 3;

/// Failures building a vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// CIDs 0–2 are reserved (hypervisor, local, host).
    #[error("guest CID {0} is reserved")]
    ReservedCid(u64),
    /// The host-side socket could not be set up.
    #[error(transparent)]
    Muxer(#[from] MuxerError),
}

struct Active {
    mem: GuestMemory,
    queues: Vec<Queue>,
    interrupt: Arc<Interrupt>,
    /// An rx chain popped while no data turned out to be ready, kept for the next packet.
    held_rx: Option<ChainBuffers>,
}

/// The vsock device.
pub struct VsockDevice {
    cid: u64,
    queue_sizes: [u16; 3],
    muxer: Muxer,
    active: Option<Active>,
    metrics: VsockMetrics,
}

impl VsockDevice {
    /// A device for guest `cid` whose host side listens on `uds_path` (guest → host
    /// connections to port P go to `<uds_path>_P`).
    pub fn new(cid: u64, uds_path: &Path) -> Result<Self, VsockError> {
        if cid <= HOST_CID {
            return Err(VsockError::ReservedCid(cid));
        }
        Ok(VsockDevice {
            cid,
            queue_sizes: [QUEUE_SIZE; 3],
            muxer: Muxer::new(cid, uds_path)?,
            active: None,
            metrics: VsockMetrics::default(),
        })
    }

    /// The guest CID.
    pub fn cid(&self) -> u64 {
        self.cid
    }

    /// Counters so far.
    pub fn metrics(&self) -> (VsockMetrics, muxer::MuxerCounters) {
        (self.metrics, self.muxer.counters())
    }

    /// How long a host client's `CONNECT` waits for the guest before it is closed
    /// (default 2 s, as in Firecracker).
    pub fn set_connect_timeout(&mut self, timeout: std::time::Duration) {
        self.muxer.set_connect_timeout(timeout);
    }

    /// Live connections.
    pub fn connection_count(&self) -> usize {
        self.muxer.connection_count()
    }

    /// After a snapshot restore: drop every connection and tell the guest with
    /// VIRTIO_VSOCK_EVENT_TRANSPORT_RESET on the event queue.
    pub fn send_transport_reset(&mut self) {
        self.muxer.clear();
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = &active.mem;
        let Some(chain) = pop_chain(&mut active.queues[EVENT], mem, &active.interrupt) else {
            tracing::warn!("vsock: no event buffer for TRANSPORT_RESET");
            return;
        };
        let head = chain.head_index();
        let len = match ChainBuffers::parse(chain, usize::from(QUEUE_SIZE))
            .and_then(|c| c.write_at(mem, 0, &EVENT_TRANSPORT_RESET.to_le_bytes()).map(|()| 4))
        {
            Ok(len) => len,
            Err(err) => {
                tracing::warn!("vsock: bad event buffer: {err}");
                self.metrics.malformed_chains += 1;
                0
            }
        };
        if active.queues[EVENT].add_used(mem, head, len).is_ok() {
            active.interrupt.signal_used_queue();
        }
    }

    /// Host sockets became ready (called by the event loop; also usable directly).
    pub fn process_host_events(&mut self) {
        self.muxer.process_host_events();
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
                    handle_tx_chain(self.cid, &mut self.muxer, &mut self.metrics, mem, &buffers)
                }
                Err(err) => {
                    tracing::warn!("vsock: dropping malformed tx chain: {err}");
                    self.metrics.malformed_chains += 1;
                }
            }
            if let Err(err) = active.queues[TX].add_used(mem, head, 0) {
                tracing::error!("vsock: tx used ring: {err}");
                active.interrupt.signal_needs_reset();
                return;
            }
            used_any = true;
        }
        if used_any {
            active.interrupt.signal_used_queue();
        }
    }

    fn process_rx(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = &active.mem;
        let mut used_any = false;
        while active.held_rx.is_some() || self.muxer.has_rx() {
            let buffers = match active.held_rx.take() {
                Some(buffers) => buffers,
                None => match pop_chain(&mut active.queues[RX], mem, &active.interrupt) {
                    None => break,
                    Some(chain) => {
                        let head = chain.head_index();
                        match ChainBuffers::parse(chain, usize::from(QUEUE_SIZE)) {
                            Ok(b) if b.readable.is_empty() && b.writable_len() >= HEADER_SIZE => b,
                            Ok(_) | Err(_) => {
                                tracing::warn!("vsock: dropping malformed rx chain {head}");
                                self.metrics.malformed_chains += 1;
                                if active.queues[RX].add_used(mem, head, 0).is_err() {
                                    active.interrupt.signal_needs_reset();
                                    return;
                                }
                                used_any = true;
                                continue;
                            }
                        }
                    }
                },
            };
            let room = buffers.writable_len() - HEADER_SIZE;
            let Some((hdr, payload)) = self.muxer.next_rx(room) else {
                active.held_rx = Some(buffers);
                break;
            };
            let written = buffers.write_at(mem, 0, &hdr.to_bytes()).and_then(|()| match &payload {
                RxPayload::None => Ok(HEADER_SIZE),
                RxPayload::Data(data) => {
                    buffers.write_at(mem, HEADER_SIZE, data).map(|()| HEADER_SIZE + data.len())
                }
            });
            let len = match written {
                Ok(len) => len as u32,
                Err(err) => {
                    // Validated above, so only a memory hot-unplug could get here.
                    tracing::error!("vsock: writing rx packet: {err}");
                    0
                }
            };
            self.metrics.rx_packets += 1;
            if active.queues[RX].add_used(mem, buffers.head_index, len).is_err() {
                active.interrupt.signal_needs_reset();
                return;
            }
            used_any = true;
        }
        if used_any {
            active.interrupt.signal_used_queue();
        }
    }
}

fn handle_tx_chain(
    cid: u64,
    muxer: &mut Muxer,
    metrics: &mut VsockMetrics,
    mem: &GuestMemory,
    buffers: &ChainBuffers,
) {
    if !buffers.writable.is_empty() {
        tracing::warn!("vsock: tx chain with device-writable buffers");
        metrics.malformed_chains += 1;
        return;
    }
    let mut raw = [0u8; HEADER_SIZE];
    if let Err(err) = buffers.read_at(mem, 0, &mut raw) {
        tracing::warn!("vsock: tx packet without a full header: {err}");
        metrics.malformed_chains += 1;
        return;
    }
    let hdr = Header::from_bytes(&raw);
    let len = hdr.len as usize;
    if len > MAX_TX_PAYLOAD || HEADER_SIZE + len > buffers.readable_len() {
        tracing::warn!("vsock: tx packet length {len} exceeds its buffers");
        metrics.malformed_chains += 1;
        return;
    }
    metrics.tx_packets += 1;
    if hdr.src_cid != cid || hdr.dst_cid != HOST_CID || hdr.type_ != TYPE_STREAM {
        // Only stream packets from the guest to the host exist on this device.
        metrics.rejected_packets += 1;
        return;
    }
    let mut payload = vec![0u8; if hdr.op == OP_RW { len } else { 0 }];
    if let Err(err) = buffers.read_at(mem, HEADER_SIZE, &mut payload) {
        tracing::warn!("vsock: reading tx payload: {err}");
        metrics.malformed_chains += 1;
        return;
    }
    muxer.handle_guest_packet(&hdr, &payload);
}

impl VirtioDevice for VsockDevice {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn avail_features(&self) -> u64 {
        FEATURE_VERSION_1
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.cid.to_le_bytes(), offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if ctx.queues.len() != 3 {
            return Err(ActivateError::QueueCount { expected: 3, got: ctx.queues.len() });
        }
        self.active = Some(Active {
            mem: ctx.mem,
            queues: ctx.queues,
            interrupt: ctx.interrupt,
            held_rx: None,
        });
        // Host clients may have connected before the driver came up.
        self.process_rx();
        Ok(())
    }

    fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
        let active = self.active.as_ref()?;
        let mut states: Vec<_> = active.queues.iter().map(Queue::state).collect();
        // A held rx chain was popped but never used: rewind so the restored device pops it
        // again instead of losing one of the guest's receive buffers.
        if active.held_rx.is_some() {
            states[RX].next_avail = states[RX].next_avail.wrapping_sub(1);
        }
        Some(states)
    }

    /// The guest's connections went with the snapshotted VM's host side: it must drop them.
    fn restored(&mut self) {
        self.send_transport_reset();
    }

    fn queue_notify(&mut self, queue_index: u32) {
        match queue_index as usize {
            TX => {
                self.process_tx();
                self.process_rx();
            }
            RX => self.process_rx(),
            // New event buffers: nothing to do until a transport reset.
            EVENT => {}
            other => tracing::warn!("vsock: notify for unknown queue {other}"),
        }
    }

    fn reset(&mut self) {
        self.active = None;
        self.muxer.clear();
    }
}

#[cfg(test)]
mod tests;
