//! A container process's stdio as the agent sees it: pipes (stdout, stderr, optional stdin) or
//! a pseudo-terminal master received over libcontainer's console socket.
//!
//! Output is pumped from the fds into a bounded channel; with no reader attached the channel
//! fills, the pump stops reading, the pipe fills and the process blocks: nothing is lost and
//! memory stays bounded. One reader at a time takes the channel's receiving end and gives it
//! back when it detaches.
//!
//! Every chunk carries its offset in its stream. What a reader was sent may not have reached
//! the host when its stream breaks (it sat in HTTP/2 buffers), so the last
//! [`REPLAY_BYTES`] sent are kept, and a reader attaching with the offsets the host has gets
//! the part beyond them again before new output.

use std::os::fd::{AsRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use podvisor_proto::agent::{OutputChunk, OutputStream};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::mpsc;

use crate::reaper::ExitWatch;

/// Largest chunk read from a process at once.
const CHUNK_SIZE: usize = 32 * 1024;
/// Chunks buffered while no reader is attached (at most CHUNK_SIZE each).
const BUFFERED_CHUNKS: usize = 32;
/// Output already sent that is kept for a reader re-attaching after a broken stream: more than
/// HTTP/2 lets be in flight to a host that advertises at most
/// [`podvisor_proto::AGENT_STREAM_WINDOW`], plus a chunk being encoded.
pub const REPLAY_BYTES: usize = podvisor_proto::OUTPUT_REPLAY_BYTES;
/// After the process exited, output still arriving this quickly is its last bytes (a pty's
/// line discipline forwards asynchronously); silence this long ends the stream even if a
/// descendant still holds the fd open.
const DRAIN_IDLE: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    #[error("creating a pipe: {0}")]
    Pipe(nix::Error),
    #[error("setting O_NONBLOCK: {0}")]
    NonBlocking(nix::Error),
    #[error("registering with the event loop: {0}")]
    Register(std::io::Error),
    #[error("writing to stdin: {0}")]
    Write(std::io::Error),
    #[error("stdin is not open")]
    StdinClosed,
    #[error("the process has no terminal")]
    NoTty,
    #[error("resizing the terminal: {0}")]
    Resize(nix::Error),
    #[error("another reader is attached to this process's output")]
    ReaderAttached,
    #[error("an output offset is beyond what the process wrote")]
    OffsetAhead,
    #[error("receiving the terminal from the console socket: {0}")]
    ConsoleSocket(std::io::Error),
}

fn set_nonblocking(fd: &OwnedFd) -> Result<(), StdioError> {
    let flags = fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL).map_err(StdioError::NonBlocking)?;
    let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags)).map_err(StdioError::NonBlocking)?;
    Ok(())
}

fn async_fd(fd: OwnedFd) -> Result<Arc<AsyncFd<OwnedFd>>, StdioError> {
    set_nonblocking(&fd)?;
    // SAFETY: an OwnedFd is a valid open descriptor that keeps referring to the same file
    // description until it is dropped, which happens only with the AsyncFd.
    unsafe { AsyncFd::register(fd) }
        .map(Arc::new)
        .map_err(|e| StdioError::Register(e.into_parts().1))
}

/// Reads once; `Ok(0)` is end of file (EIO from a pty master whose slave is closed counts).
async fn read_some(fd: &AsyncFd<OwnedFd>, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        let mut guard = fd.readable().await?;
        match guard.try_io(|inner| {
            nix::unistd::read(inner.get_ref().as_raw_fd(), buf).map_err(std::io::Error::from)
        }) {
            Ok(Ok(n)) => return Ok(n),
            Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Ok(0),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
}

async fn write_all(fd: &AsyncFd<OwnedFd>, mut data: &[u8]) -> std::io::Result<()> {
    while !data.is_empty() {
        let mut guard = fd.ready(Interest::WRITABLE).await?;
        match guard
            .try_io(|inner| nix::unistd::write(inner.get_ref(), data).map_err(std::io::Error::from))
        {
            Ok(Ok(n)) => data = &data[n..],
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => {}
        }
    }
    Ok(())
}

/// The descriptors handed to the helper for the new process (its end of the pipes).
pub struct ChildStdio {
    pub stdin: Option<OwnedFd>,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
}

/// The agent's ends of a process's pipes, before the process exists.
pub struct PipeSet {
    stdin: Option<OwnedFd>,
    stdout: OwnedFd,
    stderr: OwnedFd,
}

/// Creates stdout/stderr pipes, and a stdin pipe when asked.
pub fn pipes(with_stdin: bool) -> Result<(PipeSet, ChildStdio), StdioError> {
    let cloexec = OFlag::O_CLOEXEC;
    let (out_r, out_w) = nix::unistd::pipe2(cloexec).map_err(StdioError::Pipe)?;
    let (err_r, err_w) = nix::unistd::pipe2(cloexec).map_err(StdioError::Pipe)?;
    let (stdin_agent, stdin_child) = if with_stdin {
        let (in_r, in_w) = nix::unistd::pipe2(cloexec).map_err(StdioError::Pipe)?;
        (Some(in_w), Some(in_r))
    } else {
        (None, None)
    };
    Ok((
        PipeSet { stdin: stdin_agent, stdout: out_r, stderr: err_r },
        ChildStdio { stdin: stdin_child, stdout: Some(out_w), stderr: Some(err_w) },
    ))
}

/// Where stdin writes go.
enum StdinSink {
    Pipe(Arc<AsyncFd<OwnedFd>>),
    Tty(Arc<AsyncFd<OwnedFd>>),
}

/// The last output chunks sent to readers, oldest first, at most [`REPLAY_BYTES`] of data.
#[derive(Default)]
struct SentWindow {
    chunks: std::collections::VecDeque<OutputChunk>,
    bytes: usize,
    /// Per stream (stdout, stderr): the offset just past the last byte sent.
    end: [u64; 2],
}

impl SentWindow {
    fn record(&mut self, chunk: &OutputChunk) {
        let slot = stream_slot(chunk.stream);
        self.end[slot] = self.end[slot].max(chunk.offset + chunk.data.len() as u64);
        self.bytes += chunk.data.len();
        self.chunks.push_back(chunk.clone());
        while self.bytes > REPLAY_BYTES {
            match self.chunks.pop_front() {
                Some(old) => self.bytes -= old.data.len(),
                None => break,
            }
        }
    }

    /// The kept chunks beyond `have` (bytes of stdout, stderr the reader has), trimmed so
    /// nothing it has is repeated.
    fn beyond(&self, have: [u64; 2]) -> Result<Vec<OutputChunk>, StdioError> {
        if have[0] > self.end[0] || have[1] > self.end[1] {
            return Err(StdioError::OffsetAhead);
        }
        let mut out = Vec::new();
        for chunk in &self.chunks {
            let have = have[stream_slot(chunk.stream)];
            let end = chunk.offset + chunk.data.len() as u64;
            if end <= have {
                continue;
            }
            let skip = have.saturating_sub(chunk.offset) as usize;
            out.push(OutputChunk {
                stream: chunk.stream,
                data: chunk.data[skip..].to_vec(),
                offset: chunk.offset + skip as u64,
            });
        }
        Ok(out)
    }
}

fn stream_slot(stream: i32) -> usize {
    usize::from(stream == OutputStream::Stderr as i32)
}

/// Called each time a reader reaches the end of the output (see [`ProcessIo::on_drained`]).
type DrainedHook = Box<dyn Fn() + Send + Sync>;

/// A live process's stdio.
pub struct ProcessIo {
    stdin: tokio::sync::Mutex<Option<StdinSink>>,
    tty: Option<Arc<AsyncFd<OwnedFd>>>,
    output: Arc<Mutex<Option<mpsc::Receiver<OutputChunk>>>>,
    sent: Mutex<SentWindow>,
    stdin_once: bool,
    /// A reader was handed the last byte and then the end of the output.
    drained: AtomicBool,
    on_drained: OnceLock<DrainedHook>,
}

impl ProcessIo {
    /// Starts pumping a pipe-based process's output.
    pub fn from_pipes(
        pipes: PipeSet,
        stdin_once: bool,
        exit: ExitWatch,
    ) -> Result<Arc<Self>, StdioError> {
        let stdout = async_fd(pipes.stdout)?;
        let stderr = async_fd(pipes.stderr)?;
        let stdin = match pipes.stdin {
            Some(fd) => Some(StdinSink::Pipe(async_fd(fd)?)),
            None => None,
        };
        let (tx, rx) = mpsc::channel(BUFFERED_CHUNKS);
        tokio::spawn(pump(
            vec![(stdout, OutputStream::Stdout), (stderr, OutputStream::Stderr)],
            tx,
            exit,
        ));
        Ok(Arc::new(ProcessIo {
            stdin: tokio::sync::Mutex::new(stdin),
            tty: None,
            output: Arc::new(Mutex::new(Some(rx))),
            sent: Mutex::new(SentWindow::default()),
            stdin_once,
            drained: AtomicBool::new(false),
            on_drained: OnceLock::new(),
        }))
    }

    /// Starts pumping a terminal process's output (all of it is stdout).
    pub fn from_tty(
        master: OwnedFd,
        with_stdin: bool,
        stdin_once: bool,
        exit: ExitWatch,
    ) -> Result<Arc<Self>, StdioError> {
        let master = async_fd(master)?;
        let (tx, rx) = mpsc::channel(BUFFERED_CHUNKS);
        tokio::spawn(pump(vec![(master.clone(), OutputStream::Stdout)], tx, exit));
        Ok(Arc::new(ProcessIo {
            stdin: tokio::sync::Mutex::new(with_stdin.then(|| StdinSink::Tty(master.clone()))),
            tty: Some(master),
            output: Arc::new(Mutex::new(Some(rx))),
            sent: Mutex::new(SentWindow::default()),
            stdin_once,
            drained: AtomicBool::new(false),
            on_drained: OnceLock::new(),
        }))
    }

    pub async fn write_stdin(&self, data: &[u8]) -> Result<(), StdioError> {
        let stdin = self.stdin.lock().await;
        match &*stdin {
            None => Err(StdioError::StdinClosed),
            Some(StdinSink::Pipe(fd)) | Some(StdinSink::Tty(fd)) => {
                write_all(fd, data).await.map_err(StdioError::Write)
            }
        }
    }

    /// Closes stdin: the pipe's write end, or for a terminal an end-of-file character.
    pub async fn close_stdin(&self) -> Result<(), StdioError> {
        let mut stdin = self.stdin.lock().await;
        match stdin.take() {
            Some(StdinSink::Tty(fd)) => write_all(&fd, &[0x04]).await.map_err(StdioError::Write),
            Some(StdinSink::Pipe(_)) | None => Ok(()),
        }
    }

    pub fn resize(&self, width: u16, height: u16) -> Result<(), StdioError> {
        let tty = self.tty.as_ref().ok_or(StdioError::NoTty)?;
        let size = libc::winsize { ws_row: height, ws_col: width, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: TIOCSWINSZ reads a winsize that lives for the call from a valid pty fd.
        let rc = unsafe { libc::ioctl(tty.get_ref().as_raw_fd(), libc::TIOCSWINSZ, &size) };
        if rc < 0 {
            return Err(StdioError::Resize(nix::Error::last()));
        }
        Ok(())
    }

    /// Whether a reader has reached the end of the output: everything the process wrote has
    /// been sent, and the stream ended.
    pub fn drained(&self) -> bool {
        // SeqCst pairs with the owner's flag (see `Process::claimed`): of two threads each
        // storing its own flag then loading the other's, at least one sees both.
        self.drained.load(Ordering::SeqCst)
    }

    /// Sets what runs each time a reader reaches the end of the output (after [`drained`]
    /// turned true). Only the first hook set is kept.
    ///
    /// [`drained`]: ProcessIo::drained
    pub fn on_drained(&self, hook: DrainedHook) {
        let _ = self.on_drained.set(hook);
    }

    fn mark_drained(&self) {
        self.drained.store(true, Ordering::SeqCst);
        if let Some(hook) = self.on_drained.get() {
            hook();
        }
    }

    /// Attaches the (single) reader, which has `have` bytes of (stdout, stderr) already: it
    /// first gets what was sent beyond that and is still kept, then new output.
    pub fn attach_reader(self: &Arc<Self>, have: [u64; 2]) -> Result<OutputReader, StdioError> {
        let mut output = self.output.lock().unwrap_or_else(|e| e.into_inner());
        if output.is_none() {
            return Err(StdioError::ReaderAttached);
        }
        let replay = self.sent.lock().unwrap_or_else(|e| e.into_inner()).beyond(have)?;
        let rx = output.take();
        Ok(OutputReader { replay: replay.into(), rx, io: self.clone() })
    }
}

/// Copies output from `sources` into `tx` until every source is at end of file, or the process
/// has exited and its output has gone quiet.
async fn pump(
    sources: Vec<(Arc<AsyncFd<OwnedFd>>, OutputStream)>,
    tx: mpsc::Sender<OutputChunk>,
    mut exit: ExitWatch,
) {
    let (tx_chunks, mut rx_chunks) = mpsc::channel::<Option<OutputChunk>>(1);
    // One reader task per fd; each forwards chunks, then None at end of file.
    let mut readers = Vec::new();
    for (fd, stream) in sources {
        let tx_chunks = tx_chunks.clone();
        readers.push(tokio::spawn(async move {
            let mut buf = vec![0u8; CHUNK_SIZE];
            loop {
                match read_some(&fd, &mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let chunk = OutputChunk {
                            stream: stream as i32,
                            data: buf[..n].to_vec(),
                            offset: 0, // stamped in order below
                        };
                        if tx_chunks.send(Some(chunk)).await.is_err() {
                            return;
                        }
                    }
                }
            }
            let _ = tx_chunks.send(None).await;
        }));
    }
    drop(tx_chunks);
    let mut open = readers.len();
    let mut exited = exit.borrow().is_some();
    // Per stream (stdout, stderr): bytes read so far.
    let mut offsets = [0u64; 2];
    while open > 0 {
        let next = if exited {
            match tokio::time::timeout(DRAIN_IDLE, rx_chunks.recv()).await {
                Ok(next) => next,
                Err(_idle) => break,
            }
        } else {
            tokio::select! {
                next = rx_chunks.recv() => next,
                changed = exit.changed() => {
                    // A dropped sender means the process's entry is gone: drain and stop.
                    exited = changed.is_err() || exit.borrow().is_some();
                    continue;
                }
            }
        };
        match next {
            Some(Some(mut chunk)) => {
                let slot = stream_slot(chunk.stream);
                chunk.offset = offsets[slot];
                offsets[slot] += chunk.data.len() as u64;
                if tx.send(chunk).await.is_err() {
                    break;
                }
            }
            Some(None) => open -= 1,
            None => break,
        }
    }
    for reader in readers {
        reader.abort();
    }
}

/// The attached reader's end of a process's output; detaches (gives the channel back) on drop.
pub struct OutputReader {
    /// Sent before, possibly lost: goes out first (and is already in the sent window).
    replay: std::collections::VecDeque<OutputChunk>,
    rx: Option<mpsc::Receiver<OutputChunk>>,
    io: Arc<ProcessIo>,
}

impl futures::Stream for OutputReader {
    type Item = Result<OutputChunk, tonic::Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if let Some(chunk) = this.replay.pop_front() {
            return Poll::Ready(Some(Ok(chunk)));
        }
        let Some(rx) = this.rx.as_mut() else {
            return Poll::Ready(None);
        };
        match rx.poll_recv(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(chunk)) => {
                this.io.sent.lock().unwrap_or_else(|e| e.into_inner()).record(&chunk);
                Poll::Ready(Some(Ok(chunk)))
            }
            // The pump is done and every chunk it sent has gone out: the output is drained.
            Poll::Ready(None) => {
                this.io.mark_drained();
                Poll::Ready(None)
            }
        }
    }
}

impl Drop for OutputReader {
    fn drop(&mut self) {
        if let Some(rx) = self.rx.take() {
            *self.io.output.lock().unwrap_or_else(|e| e.into_inner()) = Some(rx);
        }
        if self.io.stdin_once {
            let io = self.io.clone();
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move {
                    let _ = io.close_stdin().await;
                });
            }
        }
    }
}

/// Accepts one connection on a console socket and receives the pty master libcontainer sends.
pub async fn receive_pty_master(listener: tokio::net::UnixListener) -> Result<OwnedFd, StdioError> {
    let (stream, _) = listener.accept().await.map_err(StdioError::ConsoleSocket)?;
    loop {
        stream.readable().await.map_err(StdioError::ConsoleSocket)?;
        match stream.try_io(Interest::READABLE, || recv_fd(stream.as_raw_fd())) {
            Ok(fd) => return Ok(fd),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(StdioError::ConsoleSocket(e)),
        }
    }
}

fn recv_fd(socket: std::os::fd::RawFd) -> std::io::Result<OwnedFd> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};
    use std::io::IoSliceMut;
    use std::os::fd::FromRawFd;
    let mut name = [0u8; 4096];
    let mut iov = [IoSliceMut::new(&mut name)];
    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<UnixAddr>(socket, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)
        .map_err(std::io::Error::from)?;
    for message in msg.cmsgs().map_err(std::io::Error::from)? {
        if let ControlMessageOwned::ScmRights(fds) = message {
            if let Some(&fd) = fds.first() {
                // SAFETY: SCM_RIGHTS just installed `fd` in this process; we are its only owner.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        "console socket message carried no descriptor",
    ))
}
