//! virtio-blk (device type 2) on a raw file, read-only or read-write.
//!
//! Requests are served synchronously on the vCPU thread that kicked the queue (as
//! Firecracker's sync engine does); the backing file can be swapped at run time
//! ([`BlockDevice::swap_backing`]), which updates the capacity and raises a
//! configuration-change interrupt so the guest re-reads it.

mod metrics;

pub use self::metrics::BlockMetrics;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::{Queue, QueueT};

use super::virtio::{
    pop_chain, read_config_bytes, ActivateContext, ActivateError, ChainBuffers, GuestMemory,
    Interrupt, VirtioDevice, FEATURE_VERSION_1, TYPE_BLOCK,
};

/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
/// Queue size.
pub const QUEUE_SIZE: u16 = 256;
/// Request header: type u32, reserved u32, sector u64.
const REQUEST_HEADER_SIZE: usize = 16;
/// Largest piece copied between the file and guest memory at once.
const IO_CHUNK: usize = 128 * 1024;

/// Failures opening a backing file.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// Opening the backing file.
    #[error("open {0}: {1}")]
    Open(PathBuf, std::io::Error),
    /// Reading the backing file's metadata.
    #[error("stat {0}: {1}")]
    Metadata(PathBuf, std::io::Error),
}

struct Backing {
    path: PathBuf,
    file: File,
    /// Capacity in sectors (a trailing partial sector is not exposed).
    capacity: u64,
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
}

impl Backing {
    fn open(path: &Path, read_only: bool) -> Result<Self, BlockError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| BlockError::Open(path.into(), e))?;
        let meta = file.metadata().map_err(|e| BlockError::Metadata(path.into(), e))?;
        // Like Firecracker: an id unique per backing file, from its device and inode.
        let id_text = format!("{}{}{}", meta.dev(), meta.rdev(), meta.ino());
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let n = id_text.len().min(id.len());
        id[..n].copy_from_slice(&id_text.as_bytes()[..n]);
        Ok(Backing { path: path.into(), file, capacity: meta.len() / SECTOR_SIZE, id })
    }
}

struct Active {
    mem: GuestMemory,
    queue: Queue,
    interrupt: Arc<Interrupt>,
}

/// The block device.
pub struct BlockDevice {
    read_only: bool,
    backing: Backing,
    queue_sizes: [u16; 1],
    active: Option<Active>,
    /// Kept across resets so a config-change interrupt can be raised after a swap even
    /// while the driver re-initialises.
    interrupt: Option<Arc<Interrupt>>,
    metrics: BlockMetrics,
}

enum Outcome {
    /// Status byte plus this many data bytes written to the guest.
    Done { status: u32, data_written: usize },
}

impl BlockDevice {
    /// A disk backed by the raw file at `path`.
    pub fn new(path: &Path, read_only: bool) -> Result<Self, BlockError> {
        Ok(BlockDevice {
            read_only,
            backing: Backing::open(path, read_only)?,
            queue_sizes: [QUEUE_SIZE],
            active: None,
            interrupt: None,
            metrics: BlockMetrics::default(),
        })
    }

    /// Replaces the backing file (same read-only mode), updates the capacity and raises a
    /// configuration-change interrupt.
    pub fn swap_backing(&mut self, path: &Path) -> Result<(), BlockError> {
        self.backing = Backing::open(path, self.read_only)?;
        if let Some(interrupt) = &self.interrupt {
            interrupt.signal_config_change();
        }
        Ok(())
    }

    /// Path of the current backing file.
    pub fn backing_path(&self) -> &Path {
        &self.backing.path
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.backing.capacity
    }

    /// Counters so far.
    pub fn metrics(&self) -> BlockMetrics {
        self.metrics
    }

    fn config(&self) -> [u8; 16] {
        let mut config = [0u8; 16];
        config[..8].copy_from_slice(&self.backing.capacity.to_le_bytes());
        // size_max (unused: no VIRTIO_BLK_F_SIZE_MAX) and seg_max.
        config[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        config
    }

    fn process_queue(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = &active.mem;
        let mut used_any = false;
        while let Some(chain) = pop_chain(&mut active.queue, mem, &active.interrupt) {
            let head = chain.head_index();
            let used_len = match ChainBuffers::parse(chain, usize::from(QUEUE_SIZE)) {
                Ok(buffers) => {
                    let outcome =
                        execute(&self.backing, self.read_only, &mut self.metrics, mem, &buffers);
                    finish(&mut self.metrics, mem, &buffers, outcome)
                }
                Err(err) => {
                    tracing::warn!("virtio-blk: dropping malformed chain {head}: {err}");
                    self.metrics.malformed_chains += 1;
                    0
                }
            };
            if let Err(err) = active.queue.add_used(mem, head, used_len) {
                tracing::error!("virtio-blk: used ring: {err}");
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

/// Writes the status byte (last writable byte) and returns the used length.
fn finish(
    metrics: &mut BlockMetrics,
    mem: &GuestMemory,
    buffers: &ChainBuffers,
    outcome: Option<Outcome>,
) -> u32 {
    let Some(Outcome::Done { status, data_written }) = outcome else {
        metrics.malformed_chains += 1;
        return 0;
    };
    match status {
        VIRTIO_BLK_S_IOERR => metrics.io_errors += 1,
        VIRTIO_BLK_S_UNSUPP => metrics.unsupported += 1,
        _ => {}
    }
    let status_offset = buffers.writable_len() - 1;
    if buffers.write_at(mem, status_offset, &[status as u8]).is_err() {
        return 0;
    }
    (data_written + 1) as u32
}

/// Runs one request. `None` when the chain cannot even carry a status byte or header.
fn execute(
    backing: &Backing,
    read_only: bool,
    metrics: &mut BlockMetrics,
    mem: &GuestMemory,
    buffers: &ChainBuffers,
) -> Option<Outcome> {
    if buffers.writable_len() == 0 {
        tracing::warn!("virtio-blk: request without a status byte");
        return None;
    }
    let mut header = [0u8; REQUEST_HEADER_SIZE];
    if let Err(err) = buffers.read_at(mem, 0, &mut header) {
        tracing::warn!("virtio-blk: short request header: {err}");
        return Some(Outcome::Done { status: VIRTIO_BLK_S_IOERR, data_written: 0 });
    }
    let request_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let mut sector_bytes = [0u8; 8];
    sector_bytes.copy_from_slice(&header[8..16]);
    let sector = u64::from_le_bytes(sector_bytes);
    let status = |ok: bool| if ok { VIRTIO_BLK_S_OK } else { VIRTIO_BLK_S_IOERR };

    // Data area: for IN, the writable part minus the status byte; for OUT, the readable
    // part after the header.
    let in_len = buffers.writable_len() - 1;
    let out_len = buffers.readable_len() - REQUEST_HEADER_SIZE;
    let outcome = match request_type {
        VIRTIO_BLK_T_IN => {
            metrics.read_requests += 1;
            match check_range(backing, sector, in_len) {
                Some(offset) => {
                    let ok = copy_file_to_guest(backing, offset, in_len, mem, buffers);
                    if ok {
                        metrics.read_bytes += in_len as u64;
                    }
                    Outcome::Done { status: status(ok), data_written: if ok { in_len } else { 0 } }
                }
                None => Outcome::Done { status: VIRTIO_BLK_S_IOERR, data_written: 0 },
            }
        }
        VIRTIO_BLK_T_OUT => {
            metrics.write_requests += 1;
            let ok = !read_only
                && check_range(backing, sector, out_len).is_some_and(|offset| {
                    copy_guest_to_file(backing, offset, out_len, mem, buffers)
                });
            if ok {
                metrics.write_bytes += out_len as u64;
            }
            Outcome::Done { status: status(ok), data_written: 0 }
        }
        VIRTIO_BLK_T_FLUSH => {
            metrics.flush_requests += 1;
            let ok = read_only || backing.file.sync_all().is_ok();
            Outcome::Done { status: status(ok), data_written: 0 }
        }
        VIRTIO_BLK_T_GET_ID => {
            let n = in_len.min(backing.id.len());
            let ok = buffers.write_at(mem, 0, &backing.id[..n]).is_ok();
            Outcome::Done { status: status(ok), data_written: if ok { n } else { 0 } }
        }
        _ => Outcome::Done { status: VIRTIO_BLK_S_UNSUPP, data_written: 0 },
    };
    Some(outcome)
}

/// The byte offset of `sector` if `len` bytes from there lie within the disk and `len` is
/// whole sectors.
fn check_range(backing: &Backing, sector: u64, len: usize) -> Option<u64> {
    if !(len as u64).is_multiple_of(SECTOR_SIZE) {
        tracing::warn!("virtio-blk: request of {len} bytes is not whole sectors");
        return None;
    }
    let end = sector.checked_add(len as u64 / SECTOR_SIZE)?;
    if end > backing.capacity {
        tracing::debug!("virtio-blk: sectors {sector}..{end} beyond capacity {}", backing.capacity);
        return None;
    }
    sector.checked_mul(SECTOR_SIZE)
}

fn copy_file_to_guest(
    backing: &Backing,
    offset: u64,
    len: usize,
    mem: &GuestMemory,
    buffers: &ChainBuffers,
) -> bool {
    let mut buf = vec![0u8; IO_CHUNK.min(len)];
    let mut done = 0usize;
    while done < len {
        let n = IO_CHUNK.min(len - done);
        if let Err(err) = backing.file.read_exact_at(&mut buf[..n], offset + done as u64) {
            tracing::warn!("virtio-blk: read {}: {err}", backing.path.display());
            return false;
        }
        if buffers.write_at(mem, done, &buf[..n]).is_err() {
            return false;
        }
        done += n;
    }
    true
}

fn copy_guest_to_file(
    backing: &Backing,
    offset: u64,
    len: usize,
    mem: &GuestMemory,
    buffers: &ChainBuffers,
) -> bool {
    let mut buf = vec![0u8; IO_CHUNK.min(len)];
    let mut done = 0usize;
    while done < len {
        let n = IO_CHUNK.min(len - done);
        if buffers.read_at(mem, REQUEST_HEADER_SIZE + done, &mut buf[..n]).is_err() {
            return false;
        }
        if let Err(err) = backing.file.write_all_at(&buf[..n], offset + done as u64) {
            tracing::warn!("virtio-blk: write {}: {err}", backing.path.display());
            return false;
        }
        done += n;
    }
    true
}

impl VirtioDevice for BlockDevice {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn avail_features(&self) -> u64 {
        let mut features = FEATURE_VERSION_1 | 1 << VIRTIO_BLK_F_FLUSH | 1 << VIRTIO_BLK_F_SEG_MAX;
        if self.read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        features
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let got = ctx.queues.len();
        let Some(queue) = ctx.queues.into_iter().next().filter(|_| got == 1) else {
            return Err(ActivateError::QueueCount { expected: 1, got });
        };
        self.interrupt = Some(ctx.interrupt.clone());
        self.active = Some(Active { mem: ctx.mem, queue, interrupt: ctx.interrupt });
        Ok(())
    }

    fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
        Some(vec![self.active.as_ref()?.queue.state()])
    }

    fn queue_notify(&mut self, queue_index: u32) {
        if queue_index == 0 {
            self.process_queue();
        }
    }

    fn reset(&mut self) {
        self.active = None;
    }
}

#[cfg(test)]
mod tests;
