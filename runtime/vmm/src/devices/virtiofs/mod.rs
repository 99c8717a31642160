//! In-process virtio-fs (device type 26): the rings are served by the VMM, the file system by
//! a FUSE server process (`podvisor fs-serve`, crate `podvisor-fs-server`) at the end of a
//! unix stream socket.
//!
//! Unlike the vhost-user frontend ([`super::fs`]), nothing outside the VMM maps guest memory,
//! so a VM restored onto a private copy-on-write mapping of a snapshot works ([`persist`]).
//! The file system still stays out of the jailed VMM: the server runs as root in its own
//! sandbox, because the share holds files of every owner.
//!
//! Each chain is one FUSE request: its device-readable part (`fuse_in_header` + arguments) is
//! copied out of guest memory and sent, with the header's length set to the bytes sent (FUSE's
//! own framing, so the server never trusts the guest's length); the reply (`fuse_out_header`
//! led by its length) is read back and copied into the device-writable part. FORGET and
//! BATCH_FORGET have no reply. Requests are served synchronously on the vCPU thread that
//! kicked the queue, as the block device does file I/O: one request in flight per device, and
//! the two message buffers are allocated once at [`MAX_MESSAGE`] each, so neither a hostile
//! guest nor a hostile server can grow the VMM's heap.
//!
//! A chain the device cannot take (malformed, a request longer than [`MAX_MESSAGE`], a reply
//! larger than the guest's buffers) gets a FUSE error reply when its writable part can hold a
//! `fuse_out_header`, and is returned empty otherwise. A server that hangs up, breaks the
//! framing, answers out of turn or takes longer than [`REPLY_TIMEOUT`] is given up on: every
//! later request gets EIO.

mod metrics;
pub mod persist;

pub use self::metrics::VirtioFsMetrics;

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use virtio_queue::{Queue, QueueT};

use super::virtio::{
    pop_chain, read_config_bytes, ActivateContext, ActivateError, ChainBuffers, GuestMemory,
    Interrupt, VirtioDevice, FEATURE_VERSION_1, TYPE_FS,
};

/// Longest tag the config space holds.
pub const TAG_LEN: usize = 36;
/// Size of each queue (hiprio and the one request queue).
pub const QUEUE_SIZE: u16 = 1024;
/// Largest FUSE message either way: the FUSE server's 1 MiB data limit plus a page of
/// headers (`podvisor_fs_server::MAX_MESSAGE`; the server advertises what fits in FUSE_INIT).
pub const MAX_MESSAGE: usize = (1 << 20) + 4096;
/// How long a reply may take before the server is given up on.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(60);
/// `sizeof(struct fuse_in_header)`.
const IN_HEADER_LEN: usize = 40;
/// `sizeof(struct fuse_out_header)`.
const OUT_HEADER_LEN: usize = 16;
const FUSE_FORGET: u32 = 2;
const FUSE_BATCH_FORGET: u32 = 42;

/// Failures setting up the device.
#[derive(Debug, thiserror::Error)]
pub enum VirtioFsError {
    /// The tag is empty or longer than 36 bytes.
    #[error("virtio-fs tag {0:?} must be 1 to 36 bytes")]
    InvalidTag(String),
    /// Connecting to the FUSE server's socket.
    #[error("connect to the FUSE server at {0}: {1}")]
    Connect(PathBuf, std::io::Error),
    /// Setting the socket's timeouts.
    #[error("setting the FUSE server socket's timeouts: {0}")]
    Timeout(std::io::Error),
}

/// Why a request got no reply from the server.
#[derive(Debug, thiserror::Error)]
enum ServerError {
    #[error("the connection broke earlier")]
    Broken,
    #[error("sending the request: {0}")]
    Send(std::io::Error),
    #[error("receiving the reply: {0}")]
    Receive(std::io::Error),
    #[error("reply length {0} is outside {OUT_HEADER_LEN}..={MAX_MESSAGE}")]
    ReplyLength(u32),
    #[error("reply for request {got} while {want} was waiting")]
    ReplyUnique { want: u64, got: u64 },
}

struct Active {
    mem: GuestMemory,
    queues: Vec<Queue>,
    interrupt: Arc<Interrupt>,
}

/// The unix socket to the FUSE server and the two message buffers.
struct ServerLink {
    stream: UnixStream,
    broken: bool,
    request: Vec<u8>,
    reply: Vec<u8>,
}

/// The in-process virtio-fs device.
pub struct VirtioFsDevice {
    config: Vec<u8>,
    queue_sizes: [u16; 2],
    link: ServerLink,
    active: Option<Active>,
    metrics: VirtioFsMetrics,
}

/// The header fields the device reads.
#[derive(Debug, Clone, Copy)]
struct RequestHeader {
    opcode: u32,
    unique: u64,
}

impl VirtioFsDevice {
    /// Connects to the FUSE server listening at `socket` and exposes it as `tag`.
    pub fn new(socket: &Path, tag: &str) -> Result<Self, VirtioFsError> {
        check_tag(tag)?;
        let stream =
            UnixStream::connect(socket).map_err(|e| VirtioFsError::Connect(socket.into(), e))?;
        Self::with_stream(stream, tag)
    }

    /// Serves `tag` through an already connected stream to a FUSE server.
    pub fn with_stream(stream: UnixStream, tag: &str) -> Result<Self, VirtioFsError> {
        check_tag(tag)?;
        stream.set_read_timeout(Some(REPLY_TIMEOUT)).map_err(VirtioFsError::Timeout)?;
        stream.set_write_timeout(Some(REPLY_TIMEOUT)).map_err(VirtioFsError::Timeout)?;
        let mut config = vec![0u8; TAG_LEN + 4];
        config[..tag.len()].copy_from_slice(tag.as_bytes());
        config[TAG_LEN..].copy_from_slice(&1u32.to_le_bytes());
        Ok(VirtioFsDevice {
            config,
            queue_sizes: [QUEUE_SIZE; 2],
            // Zeroed allocations: untouched pages of the buffers cost no memory.
            link: ServerLink {
                stream,
                broken: false,
                request: vec![0; MAX_MESSAGE],
                reply: vec![0; MAX_MESSAGE],
            },
            active: None,
            metrics: VirtioFsMetrics::default(),
        })
    }

    /// Counters so far.
    pub fn metrics(&self) -> VirtioFsMetrics {
        self.metrics
    }

    fn process_queue(&mut self, index: usize) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let Some(queue) = active.queues.get_mut(index) else {
            return;
        };
        let mem = &active.mem;
        let mut used_any = false;
        while let Some(chain) = pop_chain(queue, mem, &active.interrupt) {
            let head = chain.head_index();
            let used_len = match ChainBuffers::parse(chain, usize::from(QUEUE_SIZE)) {
                Ok(buffers) => serve_chain(&mut self.link, &mut self.metrics, mem, &buffers),
                Err(err) => {
                    tracing::warn!("virtio-fs: dropping malformed chain {head}: {err}");
                    self.metrics.malformed_chains += 1;
                    0
                }
            };
            if let Err(err) = queue.add_used(mem, head, used_len) {
                tracing::error!("virtio-fs: used ring: {err}");
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

fn check_tag(tag: &str) -> Result<(), VirtioFsError> {
    if tag.is_empty() || tag.len() > TAG_LEN {
        return Err(VirtioFsError::InvalidTag(tag.into()));
    }
    Ok(())
}

/// Serves one chain; returns the bytes written into its writable part.
fn serve_chain(
    link: &mut ServerLink,
    metrics: &mut VirtioFsMetrics,
    mem: &GuestMemory,
    buffers: &ChainBuffers,
) -> u32 {
    let mut header_bytes = [0u8; IN_HEADER_LEN];
    if buffers.read_at(mem, 0, &mut header_bytes).is_err() {
        tracing::warn!("virtio-fs: request shorter than a fuse_in_header");
        metrics.malformed_chains += 1;
        return 0;
    }
    let header = RequestHeader {
        opcode: u32::from_le_bytes([
            header_bytes[4],
            header_bytes[5],
            header_bytes[6],
            header_bytes[7],
        ]),
        unique: u64::from_le_bytes(le_array(&header_bytes[8..16])),
    };
    let len = buffers.readable_len();
    if len > MAX_MESSAGE {
        tracing::warn!("virtio-fs: request of {len} bytes is over {MAX_MESSAGE}");
        return error_reply(metrics, mem, buffers, header.unique, libc::E2BIG);
    }
    if buffers.read_at(mem, 0, &mut link.request[..len]).is_err() {
        metrics.malformed_chains += 1;
        return 0;
    }
    link.request[..4].copy_from_slice(&(len as u32).to_le_bytes());
    metrics.requests += 1;
    metrics.request_bytes += len as u64;
    let expects_reply = header.opcode != FUSE_FORGET && header.opcode != FUSE_BATCH_FORGET;
    match link.exchange(len, header, expects_reply) {
        Ok(0) => 0,
        Ok(reply_len) => {
            if buffers.write_at(mem, 0, &link.reply[..reply_len]).is_err() {
                tracing::warn!(
                    "virtio-fs: reply of {reply_len} bytes does not fit the guest's {} bytes",
                    buffers.writable_len()
                );
                return error_reply(metrics, mem, buffers, header.unique, libc::EIO);
            }
            metrics.replies += 1;
            metrics.reply_bytes += reply_len as u64;
            reply_len as u32
        }
        Err(err) => {
            if !matches!(err, ServerError::Broken) {
                tracing::error!("virtio-fs: FUSE server failed, giving up on it: {err}");
                metrics.server_failures += 1;
            }
            link.broken = true;
            if expects_reply {
                error_reply(metrics, mem, buffers, header.unique, libc::EIO)
            } else {
                0
            }
        }
    }
}

/// Writes a `fuse_out_header` with `-errno` if the chain has room for one.
fn error_reply(
    metrics: &mut VirtioFsMetrics,
    mem: &GuestMemory,
    buffers: &ChainBuffers,
    unique: u64,
    errno: i32,
) -> u32 {
    let mut reply = [0u8; OUT_HEADER_LEN];
    reply[..4].copy_from_slice(&(OUT_HEADER_LEN as u32).to_le_bytes());
    reply[4..8].copy_from_slice(&(-errno).to_le_bytes());
    reply[8..].copy_from_slice(&unique.to_le_bytes());
    if buffers.write_at(mem, 0, &reply).is_err() {
        metrics.malformed_chains += 1;
        return 0;
    }
    metrics.error_replies += 1;
    OUT_HEADER_LEN as u32
}

fn le_array<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&bytes[..N]);
    out
}

impl ServerLink {
    /// Sends the first `len` bytes of the request buffer and, if one is due, reads the reply
    /// into the reply buffer; returns its length (0 without a reply).
    fn exchange(
        &mut self,
        len: usize,
        header: RequestHeader,
        expects_reply: bool,
    ) -> Result<usize, ServerError> {
        if self.broken {
            return Err(ServerError::Broken);
        }
        write_all(&mut self.stream, &self.request[..len]).map_err(ServerError::Send)?;
        if !expects_reply {
            return Ok(0);
        }
        read_exact(&mut self.stream, &mut self.reply[..OUT_HEADER_LEN])
            .map_err(ServerError::Receive)?;
        let reply_len = u32::from_le_bytes(le_array(&self.reply[..4]));
        let total = reply_len as usize;
        if !(OUT_HEADER_LEN..=MAX_MESSAGE).contains(&total) {
            return Err(ServerError::ReplyLength(reply_len));
        }
        let got = u64::from_le_bytes(le_array(&self.reply[8..16]));
        if got != header.unique {
            return Err(ServerError::ReplyUnique { want: header.unique, got });
        }
        read_exact(&mut self.stream, &mut self.reply[OUT_HEADER_LEN..total])
            .map_err(ServerError::Receive)?;
        Ok(total)
    }
}

/// `write_all` that retries after the vCPU kick signal interrupted it.
fn write_all(stream: &mut UnixStream, mut data: &[u8]) -> std::io::Result<()> {
    while !data.is_empty() {
        match stream.write(data) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `read_exact` that retries after the vCPU kick signal interrupted it.
fn read_exact(stream: &mut UnixStream, mut buf: &mut [u8]) -> std::io::Result<()> {
    while !buf.is_empty() {
        match stream.read(buf) {
            Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
            Ok(n) => buf = &mut buf[n..],
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl VirtioDevice for VirtioFsDevice {
    fn device_type(&self) -> u32 {
        TYPE_FS
    }

    fn avail_features(&self) -> u64 {
        FEATURE_VERSION_1
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
        self.active = Some(Active { mem: ctx.mem, queues: ctx.queues, interrupt: ctx.interrupt });
        Ok(())
    }

    fn queue_notify(&mut self, queue_index: u32) {
        self.process_queue(queue_index as usize);
    }

    fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
        self.saved_queues()
    }

    fn reset(&mut self) {
        self.active = None;
    }
}

#[cfg(test)]
mod tests;
