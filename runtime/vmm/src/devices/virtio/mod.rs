//! Shared virtio pieces: the device trait the transport drives, the interrupt line a device
//! raises, and a bounds-checked view of a descriptor chain.

pub mod mmio;

pub use mmio::{QueueSnapshot, TransportError, TransportState};

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// Virtio device ids (virtio 1.2, 5).
pub const TYPE_NET: u32 = 1;
/// Block device id.
pub const TYPE_BLOCK: u32 = 2;
/// Socket (vsock) device id.
pub const TYPE_VSOCK: u32 = 19;
/// File system (virtio-fs) device id.
pub const TYPE_FS: u32 = 26;

/// VIRTIO_F_VERSION_1: every device here is a modern (non-legacy) device.
pub const FEATURE_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

/// Interrupt status bit: the device used buffers in a queue.
pub const INTERRUPT_VRING: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
/// Interrupt status bit: the configuration space changed.
pub const INTERRUPT_CONFIG: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

/// The guest memory type every device works on (the core backs it with a memfd).
pub type GuestMemory = GuestMemoryMmap<()>;

/// Why a device could not start after the driver set DRIVER_OK.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver set up a different number of queues than the device has.
    #[error("expected {expected} queues, got {got}")]
    QueueCount { expected: usize, got: usize },
    /// The vhost-user backend refused the setup.
    #[error("vhost-user backend: {0}")]
    VhostUser(String),
    /// A host resource (tap, socket, eventfd) failed.
    #[error("host resource: {0}")]
    Io(#[from] std::io::Error),
}

/// The interrupt line of one virtio-mmio device, shared by the transport (which exposes
/// InterruptStatus and handles InterruptACK) and the device (which raises it).
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    config_generation: AtomicU32,
    needs_reset: AtomicBool,
    irq_evt: EventFd,
}

impl Interrupt {
    /// Wraps the eventfd the core registered with KVM irqfd.
    pub fn new(irq_evt: EventFd) -> Self {
        Interrupt {
            status: AtomicU32::new(0),
            config_generation: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
            irq_evt,
        }
    }

    /// Sets `status_bit` in InterruptStatus and injects the interrupt.
    pub fn trigger(&self, status_bit: u32) {
        self.status.fetch_or(status_bit, Ordering::SeqCst);
        if let Err(err) = self.irq_evt.write(1) {
            tracing::error!("virtio: failed to signal the interrupt eventfd: {err}");
        }
    }

    /// Tells the driver that used buffers are available.
    pub fn signal_used_queue(&self) {
        self.trigger(INTERRUPT_VRING);
    }

    /// Bumps ConfigGeneration and raises a configuration-change interrupt.
    pub fn signal_config_change(&self) {
        self.config_generation.fetch_add(1, Ordering::SeqCst);
        self.trigger(INTERRUPT_CONFIG);
    }

    /// The device hit an error it cannot recover from: the driver sees DEVICE_NEEDS_RESET.
    pub fn signal_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::SeqCst);
        self.trigger(INTERRUPT_CONFIG);
    }

    /// Current InterruptStatus.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Whether the device asked for a reset.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    /// Current ConfigGeneration.
    pub fn config_generation(&self) -> u32 {
        self.config_generation.load(Ordering::SeqCst)
    }

    fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Puts back a snapshot's InterruptStatus and ConfigGeneration (no interrupt is raised:
    /// the restored in-kernel irqchip already holds the line's level).
    pub(crate) fn restore(&self, status: u32, config_generation: u32) {
        self.status.store(status, Ordering::SeqCst);
        self.config_generation.store(config_generation, Ordering::SeqCst);
    }

    fn reset(&self) {
        self.status.store(0, Ordering::SeqCst);
        self.needs_reset.store(false, Ordering::SeqCst);
    }

    /// The eventfd behind this line (vhost-user hands it to the backend as the call fd).
    pub fn eventfd(&self) -> &EventFd {
        &self.irq_evt
    }
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct ActivateContext {
    /// Guest memory.
    pub mem: GuestMemory,
    /// The queues as the driver configured them, in queue-index order.
    pub queues: Vec<Queue>,
    /// The features the driver accepted (a subset of `avail_features`).
    pub acked_features: u64,
    /// The interrupt line.
    pub interrupt: std::sync::Arc<Interrupt>,
}

/// A virtio device behind the mmio transport.
pub trait VirtioDevice: Send {
    /// Virtio device id (`TYPE_*`).
    fn device_type(&self) -> u32;
    /// Features offered to the driver.
    fn avail_features(&self) -> u64;
    /// Maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads the device-specific configuration space; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space (ignored by most devices).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts the device.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// The driver wrote `queue_index` to QueueNotify (called on the vCPU thread).
    fn queue_notify(&mut self, queue_index: u32);
    /// Stops the device and drops its queues (status was set to 0).
    fn reset(&mut self);
    /// The ring positions of an activated device's queues, in queue-index order, for a
    /// snapshot: what a restored device resumes from. `None` when the rings are processed
    /// outside this process (vhost-user), whose positions the VMM cannot know.
    fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
        None
    }
    /// Called once a snapshot restore re-activated the device on its saved queues: the guest
    /// driver believes in host-side state (connections) this new device never had.
    fn restored(&mut self) {}
}

/// Pops the next available chain. A corrupt available ring (an index more than a queue
/// ahead of the device) cannot be processed safely: the device asks for a reset instead.
pub fn pop_chain<'a>(
    queue: &mut Queue,
    mem: &'a GuestMemory,
    interrupt: &Interrupt,
) -> Option<DescriptorChain<&'a GuestMemory>> {
    if interrupt.needs_reset() {
        return None;
    }
    match queue.iter(mem) {
        Ok(mut chains) => chains.next(),
        Err(err) => {
            tracing::warn!("virtio: available ring unusable: {err}");
            interrupt.signal_needs_reset();
            None
        }
    }
}

/// Copies the `data.len()` bytes of `config` at `offset` (zero past its end).
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= config.len() {
        return;
    }
    let end = config.len().min(start.saturating_add(data.len()));
    data[..end - start].copy_from_slice(&config[start..end]);
}

/// A descriptor chain the guest handed over that cannot be processed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    /// The chain does not end: bad next index, a loop, or longer than the queue.
    #[error("descriptor chain is malformed (bad next index, loop, or too long)")]
    Malformed,
    /// More descriptors than the device accepts.
    #[error("descriptor chain has more than {0} descriptors")]
    TooLong(usize),
    /// A device-readable descriptor follows a device-writable one.
    #[error("device-readable descriptor after a device-writable one")]
    WrongDirection,
    /// A buffer lies (partly) outside guest memory.
    #[error("descriptor buffer {addr:#x}+{len:#x} is outside guest memory")]
    BadAddress { addr: u64, len: u32 },
    /// The readable part is shorter than the request needs.
    #[error("readable part too short: need {need} bytes at {offset}, have {have}")]
    ShortReadable { offset: usize, need: usize, have: usize },
    /// The writable part is shorter than the response needs.
    #[error("writable part too short: need {need} bytes at {offset}, have {have}")]
    ShortWritable { offset: usize, need: usize, have: usize },
    /// Guest memory access failed after validation (should not happen).
    #[error("guest memory access: {0}")]
    Memory(String),
}

/// One buffer of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buffer {
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
}

/// A validated descriptor chain: its device-readable buffers followed by its
/// device-writable ones, every buffer checked to lie inside guest memory.
#[derive(Debug, Clone)]
pub struct ChainBuffers {
    /// Head descriptor index (what goes into the used ring).
    pub head_index: u16,
    /// Device-readable buffers, in order.
    pub readable: Vec<Buffer>,
    /// Device-writable buffers, in order.
    pub writable: Vec<Buffer>,
}

impl ChainBuffers {
    /// Walks `chain`, accepting at most `max_descriptors` descriptors.
    pub fn parse(
        chain: DescriptorChain<&GuestMemory>,
        max_descriptors: usize,
    ) -> Result<Self, ChainError> {
        let mem = chain.memory();
        let head_index = chain.head_index();
        let mut readable = Vec::new();
        let mut writable = Vec::new();
        let mut count = 0usize;
        let mut ended = false;
        for desc in chain.clone() {
            count += 1;
            if count > max_descriptors {
                return Err(ChainError::TooLong(max_descriptors));
            }
            let buffer = Buffer { addr: desc.addr(), len: desc.len() };
            if !mem.check_range(buffer.addr, buffer.len as usize) && buffer.len != 0 {
                return Err(ChainError::BadAddress { addr: buffer.addr.0, len: buffer.len });
            }
            if desc.is_write_only() {
                writable.push(buffer);
            } else if !writable.is_empty() {
                return Err(ChainError::WrongDirection);
            } else {
                readable.push(buffer);
            }
            ended = !desc.has_next();
        }
        // The chain iterator stops silently on a bad next index, an unreadable descriptor
        // or after queue-size descriptors (a loop): a chain whose last descriptor still
        // points onwards never ended.
        if !ended {
            return Err(ChainError::Malformed);
        }
        Ok(ChainBuffers { head_index, readable, writable })
    }

    /// Total device-readable bytes.
    pub fn readable_len(&self) -> usize {
        self.readable.iter().map(|b| b.len as usize).sum()
    }

    /// Total device-writable bytes.
    pub fn writable_len(&self) -> usize {
        self.writable.iter().map(|b| b.len as usize).sum()
    }

    /// Reads `buf.len()` bytes of the readable part starting at `offset`.
    pub fn read_at(
        &self,
        mem: &GuestMemory,
        offset: usize,
        buf: &mut [u8],
    ) -> Result<(), ChainError> {
        let have = self.readable_len();
        if offset.checked_add(buf.len()).is_none_or(|end| end > have) {
            return Err(ChainError::ShortReadable { offset, need: buf.len(), have });
        }
        copy_chain(&self.readable, offset, buf.len(), |addr, range| {
            mem.read_slice(&mut buf[range], addr)
        })
    }

    /// Writes `data` into the writable part starting at `offset`.
    pub fn write_at(
        &self,
        mem: &GuestMemory,
        offset: usize,
        data: &[u8],
    ) -> Result<(), ChainError> {
        let have = self.writable_len();
        if offset.checked_add(data.len()).is_none_or(|end| end > have) {
            return Err(ChainError::ShortWritable { offset, need: data.len(), have });
        }
        copy_chain(&self.writable, offset, data.len(), |addr, range| {
            mem.write_slice(&data[range], addr)
        })
    }
}

/// Calls `copy(guest_addr, range_in_caller_buffer)` for each piece of `len` bytes at
/// `offset` of the concatenation of `buffers` (already bounds-checked by the caller).
fn copy_chain<F>(
    buffers: &[Buffer],
    offset: usize,
    len: usize,
    mut copy: F,
) -> Result<(), ChainError>
where
    F: FnMut(GuestAddress, std::ops::Range<usize>) -> Result<(), vm_memory::GuestMemoryError>,
{
    let mut skip = offset;
    let mut done = 0usize;
    for buffer in buffers {
        if done == len {
            break;
        }
        let buffer_len = buffer.len as usize;
        if skip >= buffer_len {
            skip -= buffer_len;
            continue;
        }
        let chunk = (buffer_len - skip).min(len - done);
        let addr = buffer
            .addr
            .checked_add(skip as u64)
            .ok_or(ChainError::BadAddress { addr: buffer.addr.0, len: buffer.len })?;
        copy(addr, done..done + chunk).map_err(|e| ChainError::Memory(e.to_string()))?;
        done += chunk;
        skip = 0;
    }
    Ok(())
}

#[cfg(test)]
mod fuzz_tests;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod test_utils;
