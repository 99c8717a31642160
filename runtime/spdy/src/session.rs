//! SPDY sessions: one connection, both roles. See the crate docs for the model and the limits.
//!
//! Shared state lives in one [`Inner`] behind an `Arc`: the stream table (one `std` mutex, never
//! held across an await), the two writer queues, and three watch channels that carry the
//! session's life cycle: `stop` (tells both tasks to drain or abort), `end` (the final result,
//! set once), `peer_spoke` (the server's gate: opened by the first frame read).
//!
//! Lock order: the stream table, then a stream's flags; never the reverse.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, trace};

use crate::error::{FrameError, SpdyError};
use crate::frame::{goaway, rst, Frame, FrameDecoder, FrameEncoder, MAX_STREAM_ID};
use crate::headers::{encode_block, header, Headers};

/// The largest header block, uncompressed, that a peer may send (and that we send).
pub const MAX_HEADER_BLOCK: usize = 64 * 1024;
/// The most streams the peer may have open at once; more are refused.
pub const MAX_PEER_STREAMS: usize = 128;
/// Unread data buffered per stream before the reader waits for the application.
pub const STREAM_BUFFER_BYTES: usize = 1024 * 1024;
/// The largest data frame we send; longer writes are split.
pub const MAX_DATA_FRAME: usize = 32 * 1024;

/// Frames the application may queue for the writer before its calls wait.
const WRITE_QUEUE: usize = 64;
/// Frames the reader may queue by itself (echoes, refusals); beyond that it drops them, since a
/// peer that lets so many pile up is not reading.
const CONTROL_QUEUE: usize = 64;
/// Peer-opened streams waiting for `Incoming::next`.
const INCOMING_QUEUE: usize = 16;
/// The writer gathers up to this much before a write call.
const WRITE_BATCH: usize = 64 * 1024;
/// Read buffer growth step.
const READ_CHUNK: usize = 16 * 1024;
/// How long the writer keeps flushing queued frames once the session has ended.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Client,
    Server,
}

impl Role {
    /// Whether `id` (stream or ping) is of our parity: clients odd, servers even.
    fn owns(self, id: u32) -> bool {
        (id % 2 == 1) == (self == Role::Client)
    }
}

/// What the two tasks are told to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Run,
    /// The session ended: the writer flushes what is queued (bounded), then shuts down.
    Drain,
    /// Stop at once.
    Abort,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere while holding the lock leaves plain flags behind: still usable.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

struct Inner {
    role: Role,
    state: Mutex<State>,
    /// Frames from the application, in call order.
    queue: mpsc::Sender<Frame>,
    /// Frames the reader sends by itself; written ahead of `queue`.
    control: mpsc::Sender<Frame>,
    stop: watch::Sender<Stop>,
    end: watch::Sender<Option<Result<(), SpdyError>>>,
    peer_spoke: watch::Sender<bool>,
    writer_done: watch::Sender<bool>,
}

struct State {
    streams: HashMap<u32, Entry>,
    /// Entries opened by the peer (bounded by `MAX_PEER_STREAMS`).
    peer_streams: usize,
    /// Ours, as u64 so that running past the 31-bit range is seen, not wrapped.
    next_stream_id: u64,
    last_peer_stream_id: u32,
    next_ping_id: u32,
    pings: HashMap<u32, oneshot::Sender<()>>,
    goaway_sent: bool,
    peer_goaway: Option<u32>,
    ended: bool,
}

impl State {
    fn insert(&mut self, entry: Entry) {
        if !entry.shared.ours {
            self.peer_streams += 1;
        }
        self.streams.insert(entry.shared.id, entry);
    }

    fn remove(&mut self, id: u32) -> Option<Entry> {
        let entry = self.streams.remove(&id)?;
        if !entry.shared.ours {
            self.peer_streams -= 1;
        }
        Some(entry)
    }

    /// Forgets a stream that is now closed both ways.
    fn forget_if_done(&mut self, id: u32, flags: &Flags) {
        if flags.local_closed && flags.remote_closed {
            self.remove(id);
        }
    }

    /// Removes `id` as reset with `status`; true if it was there.
    fn reset(&mut self, id: u32, status: u32) -> bool {
        let Some(entry) = self.remove(id) else {
            return false;
        };
        entry.shared.mark_reset(status);
        entry.close_data();
        if let Some(reply) = entry.reply {
            let _ = reply.send(Err(status));
        }
        true
    }
}

/// A stream in the table.
struct Entry {
    shared: Arc<StreamShared>,
    /// Where the peer's data goes; `None` after the peer's FIN.
    data: Option<DataSender>,
    /// Our streams until the peer's SYN_REPLY (`Err`: its RST_STREAM status).
    reply: Option<oneshot::Sender<Result<Headers, u32>>>,
}

impl Entry {
    /// Wakes a reader task waiting for buffer room on this stream, and ends further buffering.
    fn close_data(&self) {
        if let Some(data) = &self.data {
            data.budget.close();
        }
    }
}

/// The peer's data for one stream: an unbounded channel whose contents are bounded by a
/// semaphore of `STREAM_BUFFER_BYTES` permits, returned as the application reads.
#[derive(Clone)]
struct DataSender {
    tx: mpsc::UnboundedSender<Chunk>,
    budget: Arc<Semaphore>,
}

struct Chunk {
    data: Bytes,
    _permit: OwnedSemaphorePermit,
}

fn data_channel() -> (DataSender, mpsc::UnboundedReceiver<Chunk>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (DataSender { tx, budget: Arc::new(Semaphore::new(STREAM_BUFFER_BYTES)) }, rx)
}

/// Per-stream state shared by the table and the stream's handles.
struct StreamShared {
    id: u32,
    /// We opened it.
    ours: bool,
    flags: Mutex<Flags>,
    /// Serializes writes, replies and FIN so one call's frames stay together and in order.
    write_lock: tokio::sync::Mutex<()>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Flags {
    /// We sent FIN (or may not send: unidirectional).
    local_closed: bool,
    /// The peer sent FIN.
    remote_closed: bool,
    /// Peer-opened streams: we sent SYN_REPLY.
    replied: bool,
    /// Reset by either side, with this status.
    reset: Option<u32>,
}

impl StreamShared {
    fn new(id: u32, ours: bool, flags: Flags) -> Arc<Self> {
        Arc::new(StreamShared {
            id,
            ours,
            flags: Mutex::new(flags),
            write_lock: tokio::sync::Mutex::new(()),
        })
    }

    fn mark_reset(&self, status: u32) {
        let mut f = lock(&self.flags);
        if f.reset.is_none() {
            f.reset = Some(status);
        }
        f.local_closed = true;
        f.remote_closed = true;
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn is_ended(&self) -> bool {
        self.end.borrow().is_some()
    }

    /// Ends the session once: records `result`, closes every stream, fails pending calls and
    /// tells the tasks to drain.
    fn finish(&self, result: Result<(), SpdyError>) {
        {
            let mut st = self.lock();
            if st.ended {
                return;
            }
            st.ended = true;
            for (_, entry) in st.streams.drain() {
                let mut f = lock(&entry.shared.flags);
                f.local_closed = true;
                f.remote_closed = true;
                drop(f);
                entry.close_data();
                // Dropping `entry` drops its data sender (reads end) and reply sender
                // (`open_stream` fails with SessionClosed).
            }
            st.peer_streams = 0;
            st.pings.clear();
        }
        match &result {
            Ok(()) => debug!(role = ?self.role, "SPDY session ended"),
            Err(e) => debug!(role = ?self.role, error = %e, "SPDY session failed"),
        }
        self.end.send_replace(Some(result));
        self.stop.send_if_modified(|s| {
            let run = *s == Stop::Run;
            if run {
                *s = Stop::Drain;
            }
            run
        });
    }

    /// Queues a frame the reader sends on its own, ahead of the application's.
    fn send_control(&self, frame: Frame) {
        if let Err(e) = self.control.try_send(frame) {
            debug!(frame = e.into_inner().kind(), "SPDY control queue full: frame dropped");
        }
    }

    /// Resets `id` locally and tells the peer (reader side).
    fn refuse(&self, st: &mut State, id: u32, status: u32) {
        st.reset(id, status);
        self.send_control(Frame::RstStream { stream_id: id, status });
    }

    fn open_gate(&self) {
        self.peer_spoke.send_if_modified(|spoke| !std::mem::replace(spoke, true));
    }

    /// Every handle of a stream is gone: forget it, resetting it (CANCEL) if it was still open.
    fn abandon(&self, shared: &Arc<StreamShared>) {
        {
            let mut st = self.lock();
            if st.ended {
                return;
            }
            match st.streams.get(&shared.id) {
                Some(entry) if Arc::ptr_eq(&entry.shared, shared) => {}
                _ => return,
            }
            st.reset(shared.id, rst::CANCEL);
        }
        debug!(stream = shared.id, "SPDY stream dropped while open: reset (CANCEL)");
        // Through the application queue, behind any data already queued for the stream.
        let frame = Frame::RstStream { stream_id: shared.id, status: rst::CANCEL };
        if let Err(TrySendError::Full(frame)) = self.queue.try_send(frame) {
            // Drop cannot wait: hand the wait to a task, if there is a runtime to run it.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let queue = self.queue.clone();
                rt.spawn(async move {
                    let _ = queue.send(frame).await;
                });
            }
        }
    }
}

/// One SPDY/3.1 connection, client or server. Cheap to clone: clones share the session.
#[derive(Clone)]
pub struct Session {
    inner: Arc<Inner>,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("role", &self.inner.role)
            .field("closed", &self.inner.is_ended())
            .finish()
    }
}

/// The streams the peer opens, in order (each with its SYN_STREAM headers; reply to accept).
#[derive(Debug)]
pub struct Incoming {
    rx: mpsc::Receiver<Stream>,
}

impl Incoming {
    /// The next stream the peer opened; `None` once the session has ended.
    pub async fn next(&mut self) -> Option<Stream> {
        self.rx.recv().await
    }
}

impl Session {
    /// Starts a server session over `io` (an upgraded connection); returns it and the streams
    /// the peer opens. Nothing is written until the client's first frame has been read.
    ///
    /// Must be called inside a Tokio runtime.
    pub fn server<T>(io: T) -> (Session, Incoming)
    where
        T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        Self::start(io, Role::Server)
    }

    /// Starts a client session over `io`; returns it and the streams the peer opens.
    ///
    /// Must be called inside a Tokio runtime.
    pub fn client<T>(io: T) -> (Session, Incoming)
    where
        T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        Self::start(io, Role::Client)
    }

    fn start<T>(io: T, role: Role) -> (Session, Incoming)
    where
        T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (read_half, write_half) = tokio::io::split(io);
        let (queue, queue_rx) = mpsc::channel(WRITE_QUEUE);
        let (control, control_rx) = mpsc::channel(CONTROL_QUEUE);
        let (incoming_tx, incoming_rx) = mpsc::channel(INCOMING_QUEUE);
        let inner = Arc::new(Inner {
            role,
            state: Mutex::new(State {
                streams: HashMap::new(),
                peer_streams: 0,
                next_stream_id: if role == Role::Client { 1 } else { 2 },
                last_peer_stream_id: 0,
                next_ping_id: if role == Role::Client { 1 } else { 2 },
                pings: HashMap::new(),
                goaway_sent: false,
                peer_goaway: None,
                ended: false,
            }),
            queue,
            control,
            stop: watch::channel(Stop::Run).0,
            end: watch::channel(None).0,
            // A client may speak first.
            peer_spoke: watch::channel(role == Role::Client).0,
            writer_done: watch::channel(false).0,
        });
        tokio::spawn(run_reader(inner.clone(), read_half, incoming_tx));
        tokio::spawn(run_writer(inner.clone(), write_half, control_rx, queue_rx));
        (Session { inner }, Incoming { rx: incoming_rx })
    }

    /// Whether this is the server end.
    pub fn is_server(&self) -> bool {
        self.inner.role == Role::Server
    }

    /// Opens a stream: sends SYN_STREAM with `headers` (`fin`: half-closed from our side at
    /// once) and waits for the peer's SYN_REPLY, whose headers the returned stream carries.
    ///
    /// Fails with [`SpdyError::Reset`] if the peer refuses the stream (or its GOAWAY excludes
    /// it), [`SpdyError::GoingAway`] after the peer's GOAWAY, [`SpdyError::SessionClosed`] if
    /// the session ends first. Cancelling the call resets the stream.
    pub async fn open_stream(&self, headers: Headers, fin: bool) -> Result<Stream, SpdyError> {
        check_headers(&headers)?;
        let inner = &self.inner;
        let permit = inner.queue.reserve().await.map_err(|_| SpdyError::SessionClosed)?;
        let (reply_tx, reply_rx) = oneshot::channel();
        let (data, rx) = data_channel();
        let shared = {
            let mut st = inner.lock();
            if st.ended {
                return Err(SpdyError::SessionClosed);
            }
            if st.peer_goaway.is_some() {
                return Err(SpdyError::GoingAway);
            }
            let id = st.next_stream_id;
            if id > u64::from(MAX_STREAM_ID) {
                return Err(SpdyError::StreamIdsExhausted);
            }
            let id = id as u32;
            st.next_stream_id += 2;
            let shared =
                StreamShared::new(id, true, Flags { local_closed: fin, ..Flags::default() });
            st.insert(Entry { shared: shared.clone(), data: Some(data), reply: Some(reply_tx) });
            // Sent under the table lock so that stream ids reach the wire in increasing order.
            permit.send(Frame::SynStream {
                stream_id: id,
                associated_id: 0,
                priority: 0,
                slot: 0,
                fin,
                unidirectional: false,
                headers,
            });
            shared
        };
        let id = shared.id;
        debug!(stream = id, "SPDY stream opened");
        // Made now so that dropping this future (cancellation) resets the stream.
        let handle = Arc::new(StreamRef { inner: inner.clone(), shared });
        match reply_rx.await {
            Ok(Ok(headers)) => Ok(Stream { handle, headers, rx }),
            Ok(Err(status)) => Err(SpdyError::Reset { stream_id: id, status }),
            Err(_) if inner.lock().peer_goaway.is_some() => Err(SpdyError::GoingAway),
            Err(_) => Err(SpdyError::SessionClosed),
        }
    }

    /// Sends GOAWAY (status OK, naming the last peer stream we took) once; later calls do
    /// nothing. New peer streams are refused afterwards; open ones go on.
    pub async fn goaway(&self) -> Result<(), SpdyError> {
        let permit = self.inner.queue.reserve().await.map_err(|_| SpdyError::SessionClosed)?;
        let mut st = self.inner.lock();
        if st.ended {
            return Err(SpdyError::SessionClosed);
        }
        if !st.goaway_sent {
            st.goaway_sent = true;
            permit.send(Frame::GoAway {
                last_good_stream_id: st.last_peer_stream_id,
                status: goaway::OK,
            });
        }
        Ok(())
    }

    /// Sends a PING and waits for the peer's echo; returns the round-trip time.
    pub async fn ping(&self) -> Result<Duration, SpdyError> {
        let permit = self.inner.queue.reserve().await.map_err(|_| SpdyError::SessionClosed)?;
        let (tx, rx) = oneshot::channel();
        {
            let mut st = self.inner.lock();
            if st.ended {
                return Err(SpdyError::SessionClosed);
            }
            let mut id = st.next_ping_id;
            if id == 0 {
                // Wrapped (servers' ids are even): spdystream rejects ping id 0.
                id = 2;
            }
            st.next_ping_id = id.wrapping_add(2);
            st.pings.insert(id, tx);
            permit.send(Frame::Ping { id });
        }
        let start = Instant::now();
        rx.await.map_err(|_| SpdyError::SessionClosed)?;
        Ok(start.elapsed())
    }

    /// Resolves when the session has ended: `Ok` if the peer closed the connection or
    /// [`close`](Self::close) was called, the cause otherwise.
    pub async fn closed(&self) -> Result<(), SpdyError> {
        let mut end = self.inner.end.subscribe();
        let result = match end.wait_for(Option::is_some).await {
            Ok(result) => result.clone().unwrap_or(Ok(())),
            // The sender lives as long as `inner`, which we hold.
            Err(_) => Ok(()),
        };
        result
    }

    /// Whether the session has ended.
    pub fn is_closed(&self) -> bool {
        self.inner.is_ended()
    }

    /// Ends the session: frames already queued are flushed (for at most 10 s), the connection
    /// is shut down for writing and dropped. Returns when the writer is done.
    pub async fn close(&self) {
        self.inner.finish(Ok(()));
        let mut done = self.inner.writer_done.subscribe();
        let _ = done.wait_for(|done| *done).await;
    }

    /// Ends the session at once, without flushing.
    pub fn abort(&self) {
        self.inner.stop.send_replace(Stop::Abort);
        self.inner.finish(Ok(()));
    }
}

fn check_headers(headers: &Headers) -> Result<(), SpdyError> {
    let block = encode_block(headers).map_err(SpdyError::Headers)?;
    if block.len() > MAX_HEADER_BLOCK {
        return Err(SpdyError::Headers(FrameError::HeaderBlockTooLarge {
            limit: MAX_HEADER_BLOCK,
        }));
    }
    Ok(())
}

/// What a stream's handles share; the last one dropped abandons the stream.
struct StreamRef {
    inner: Arc<Inner>,
    shared: Arc<StreamShared>,
}

impl Drop for StreamRef {
    fn drop(&mut self) {
        self.inner.abandon(&self.shared);
    }
}

/// One stream: the peer's data (read) and its headers; [`writer`](Self::writer) sends ours.
pub struct Stream {
    handle: Arc<StreamRef>,
    headers: Headers,
    rx: mpsc::UnboundedReceiver<Chunk>,
}

impl fmt::Debug for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stream")
            .field("id", &self.handle.shared.id)
            .field("headers", &self.headers)
            .finish()
    }
}

impl Stream {
    /// The stream id (odd: opened by the client, even: by the server).
    pub fn id(&self) -> u32 {
        self.handle.shared.id
    }

    /// The peer's SYN_STREAM headers for a stream it opened, its SYN_REPLY headers for ours.
    pub fn headers(&self) -> &Headers {
        &self.headers
    }

    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    /// Accepts a stream the peer opened: sends SYN_REPLY with `headers` (`fin`: and
    /// half-closes our side). Once only, and before any [`StreamWriter::write`].
    pub async fn reply(&self, headers: Headers, fin: bool) -> Result<(), SpdyError> {
        let shared = &self.handle.shared;
        let inner = &self.handle.inner;
        let stream_id = shared.id;
        if shared.ours {
            return Err(SpdyError::Reply { stream_id, reason: "we opened it" });
        }
        check_headers(&headers)?;
        let _order = shared.write_lock.lock().await;
        let permit = inner.queue.reserve().await.map_err(|_| SpdyError::SessionClosed)?;
        let mut st = inner.lock();
        let mut f = lock(&shared.flags);
        if st.ended {
            return Err(SpdyError::SessionClosed);
        }
        if let Some(status) = f.reset {
            return Err(SpdyError::Reset { stream_id, status });
        }
        if f.replied {
            return Err(SpdyError::Reply { stream_id, reason: "already replied" });
        }
        if f.local_closed {
            // Only a unidirectional stream is closed on our side before the reply.
            return Err(SpdyError::StreamClosed { stream_id });
        }
        f.replied = true;
        f.local_closed = fin;
        let flags = *f;
        drop(f);
        st.forget_if_done(stream_id, &flags);
        permit.send(Frame::SynReply { stream_id, fin, headers });
        Ok(())
    }

    /// The next data from the peer; `None` after the peer's FIN, a reset, or the session's end.
    /// Empty DATA frames are not returned. Data that arrived before a reset is still returned:
    /// a peer that sends its last bytes and FIN, then drops the stream (a RST CANCEL), meant
    /// them to be read.
    pub async fn read(&mut self) -> Option<Bytes> {
        // A reset removes the stream's sender, so this ends once what arrived is read.
        let chunk = self.rx.recv().await?;
        // Dropping the chunk's permit frees its room in the stream's buffer.
        Some(chunk.data)
    }

    /// A handle that sends on this stream (cloneable; the stream lives while any handle does).
    pub fn writer(&self) -> StreamWriter {
        StreamWriter { handle: self.handle.clone() }
    }

    /// The RST_STREAM status if the stream was reset (by either side).
    pub fn reset_status(&self) -> Option<u32> {
        lock(&self.handle.shared.flags).reset
    }
}

/// Sends on one stream. Clones share the stream; calls from clones are serialized.
#[derive(Clone)]
pub struct StreamWriter {
    handle: Arc<StreamRef>,
}

impl fmt::Debug for StreamWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamWriter").field("id", &self.handle.shared.id).finish()
    }
}

impl StreamWriter {
    /// The stream id.
    pub fn id(&self) -> u32 {
        self.handle.shared.id
    }

    fn writable(&self, f: &Flags) -> Result<(), SpdyError> {
        let stream_id = self.handle.shared.id;
        if self.handle.inner.is_ended() {
            return Err(SpdyError::SessionClosed);
        }
        if let Some(status) = f.reset {
            return Err(SpdyError::Reset { stream_id, status });
        }
        if f.local_closed {
            return Err(SpdyError::StreamClosed { stream_id });
        }
        if !self.handle.shared.ours && !f.replied {
            return Err(SpdyError::NotReplied { stream_id });
        }
        Ok(())
    }

    /// Queues `data` as DATA frames of at most [`MAX_DATA_FRAME`] bytes. Returns once queued
    /// (waiting while the writer's queue is full), not once written.
    pub async fn write(&self, data: &[u8]) -> Result<(), SpdyError> {
        let shared = &self.handle.shared;
        let _order = shared.write_lock.lock().await;
        self.writable(&lock(&shared.flags))?;
        for chunk in data.chunks(MAX_DATA_FRAME) {
            let permit =
                self.handle.inner.queue.reserve().await.map_err(|_| SpdyError::SessionClosed)?;
            // Checked again per frame: the peer may reset the stream part-way.
            self.writable(&lock(&shared.flags))?;
            permit.send(Frame::Data {
                stream_id: shared.id,
                fin: false,
                data: Bytes::copy_from_slice(chunk),
            });
        }
        Ok(())
    }

    /// Half-closes our side (an empty DATA frame with FIN). The peer may go on sending. A second
    /// call does nothing.
    pub async fn close(&self) -> Result<(), SpdyError> {
        let shared = &self.handle.shared;
        let inner = &self.handle.inner;
        let _order = shared.write_lock.lock().await;
        let permit = inner.queue.reserve().await.map_err(|_| SpdyError::SessionClosed)?;
        let mut st = inner.lock();
        let mut f = lock(&shared.flags);
        if f.local_closed && f.reset.is_none() && !st.ended {
            return Ok(());
        }
        self.writable(&f)?;
        f.local_closed = true;
        let flags = *f;
        drop(f);
        st.forget_if_done(shared.id, &flags);
        permit.send(Frame::Data { stream_id: shared.id, fin: true, data: Bytes::new() });
        Ok(())
    }

    /// Resets the stream (RST_STREAM with `status`, see [`crate::frame::rst`]): both directions
    /// end and pending reads return `None`. Does nothing on a stream already reset or closed
    /// both ways.
    pub async fn reset(&self, status: u32) -> Result<(), SpdyError> {
        if status == 0 {
            return Err(SpdyError::InvalidStatus);
        }
        let shared = &self.handle.shared;
        let inner = &self.handle.inner;
        // No write lock: a reset must not wait behind a write stuck on a full queue.
        let permit = inner.queue.reserve().await.map_err(|_| SpdyError::SessionClosed)?;
        let mut st = inner.lock();
        if st.ended {
            return Err(SpdyError::SessionClosed);
        }
        {
            let f = lock(&shared.flags);
            if f.reset.is_some() || (f.local_closed && f.remote_closed) {
                return Ok(());
            }
        }
        st.reset(shared.id, status);
        shared.mark_reset(status);
        permit.send(Frame::RstStream { stream_id: shared.id, status });
        Ok(())
    }
}

async fn run_reader<R: AsyncRead + Unpin>(
    inner: Arc<Inner>,
    io: R,
    incoming: mpsc::Sender<Stream>,
) {
    let mut stop = inner.stop.subscribe();
    let mut reader = Reader {
        inner: inner.clone(),
        incoming,
        io,
        decoder: FrameDecoder::new(MAX_HEADER_BLOCK),
        buf: BytesMut::with_capacity(READ_CHUNK),
    };
    let result = tokio::select! {
        result = reader.run() => result,
        _ = stop.wait_for(|s| *s != Stop::Run) => return,
    };
    if let Err(SpdyError::Protocol(_)) = &result {
        // Bytes did arrive, so the peer is past the upgrade and can take our answer.
        inner.open_gate();
        let last_good_stream_id = inner.lock().last_peer_stream_id;
        inner.send_control(Frame::GoAway { last_good_stream_id, status: goaway::PROTOCOL_ERROR });
    }
    inner.finish(result);
}

struct Reader<R> {
    inner: Arc<Inner>,
    incoming: mpsc::Sender<Stream>,
    io: R,
    decoder: FrameDecoder,
    buf: BytesMut,
}

impl<R: AsyncRead + Unpin> Reader<R> {
    /// Reads and dispatches frames until the peer closes (`Ok`) or something fails.
    async fn run(&mut self) -> Result<(), SpdyError> {
        loop {
            while let Some(frame) =
                self.decoder.decode(&mut self.buf).map_err(SpdyError::Protocol)?
            {
                self.inner.open_gate();
                trace!(frame = frame.kind(), "SPDY frame received");
                self.dispatch(frame).await?;
            }
            self.buf.reserve(READ_CHUNK);
            if self.io.read_buf(&mut self.buf).await.map_err(SpdyError::read)? == 0 {
                return self.decoder.decode_eof(&self.buf).map_err(SpdyError::Protocol);
            }
        }
    }

    async fn dispatch(&mut self, frame: Frame) -> Result<(), SpdyError> {
        match frame {
            Frame::SynStream { stream_id, fin, unidirectional, headers, .. } => {
                self.syn_stream(stream_id, fin, unidirectional, headers).await
            }
            Frame::SynReply { stream_id, fin, headers } => {
                self.syn_reply(stream_id, fin, headers);
                Ok(())
            }
            Frame::RstStream { stream_id, status } => {
                debug!(stream = stream_id, status, "SPDY stream reset by the peer");
                self.inner.lock().reset(stream_id, status);
                Ok(())
            }
            Frame::Ping { id } => {
                if self.inner.role.owns(id) {
                    if let Some(waiter) = self.inner.lock().pings.remove(&id) {
                        let _ = waiter.send(());
                    }
                } else {
                    self.inner.send_control(Frame::Ping { id });
                }
                Ok(())
            }
            Frame::GoAway { last_good_stream_id, status } => {
                self.goaway(last_good_stream_id, status);
                Ok(())
            }
            Frame::Headers { stream_id, fin, .. } => {
                // Trailing headers carry nothing the streaming protocols use; only FIN matters.
                if fin {
                    self.remote_fin(stream_id);
                }
                Ok(())
            }
            Frame::Data { stream_id, fin, data } => self.data(stream_id, fin, data).await,
            // No flow control (see the crate docs), no settings we act on, and the spec says to
            // ignore unknown control frames.
            Frame::Settings { .. } | Frame::WindowUpdate { .. } | Frame::Unknown { .. } => Ok(()),
        }
    }

    async fn syn_stream(
        &mut self,
        id: u32,
        fin: bool,
        unidirectional: bool,
        headers: Headers,
    ) -> Result<(), SpdyError> {
        let inner = &self.inner;
        let stream = {
            let mut st = inner.lock();
            if inner.role.owns(id) {
                // The peer used our parity: a stream error, not a session one.
                drop(st);
                inner.send_control(Frame::RstStream { stream_id: id, status: rst::PROTOCOL_ERROR });
                return Ok(());
            }
            if id <= st.last_peer_stream_id {
                return Err(SpdyError::Protocol(FrameError::StreamIdOrder {
                    id,
                    last: st.last_peer_stream_id,
                }));
            }
            st.last_peer_stream_id = id;
            if st.goaway_sent || st.peer_streams >= MAX_PEER_STREAMS {
                debug!(stream = id, open = st.peer_streams, "SPDY stream refused");
                drop(st);
                inner.send_control(Frame::RstStream { stream_id: id, status: rst::REFUSED_STREAM });
                return Ok(());
            }
            let flags =
                Flags { local_closed: unidirectional, remote_closed: fin, ..Flags::default() };
            let shared = StreamShared::new(id, false, flags);
            let (data, rx) = data_channel();
            st.insert(Entry { shared: shared.clone(), data: (!fin).then_some(data), reply: None });
            st.forget_if_done(id, &flags);
            Stream { handle: Arc::new(StreamRef { inner: inner.clone(), shared }), headers, rx }
        };
        debug!(stream = id, fin, "SPDY stream opened by the peer");
        // If nobody takes streams any more, the returned stream's drop resets it.
        let _ = self.incoming.send(stream).await;
        Ok(())
    }

    fn syn_reply(&self, id: u32, fin: bool, headers: Headers) {
        let mut st = self.inner.lock();
        let Some(entry) = st.streams.get_mut(&id) else {
            // Abandoned or reset already.
            trace!(stream = id, "SYN_REPLY for an unknown stream ignored");
            return;
        };
        if !entry.shared.ours {
            self.inner.refuse(&mut st, id, rst::PROTOCOL_ERROR);
            return;
        }
        let Some(reply) = entry.reply.take() else {
            self.inner.refuse(&mut st, id, rst::STREAM_IN_USE);
            return;
        };
        if fin {
            entry.data = None;
        }
        if reply.send(Ok(headers)).is_err() {
            // `open_stream` was cancelled between its drop and ours: nobody wants the stream.
            self.inner.refuse(&mut st, id, rst::CANCEL);
            return;
        }
        if fin {
            let flags = {
                let mut f = lock(&entry.shared.flags);
                f.remote_closed = true;
                *f
            };
            st.forget_if_done(id, &flags);
        }
    }

    fn goaway(&self, last_good: u32, status: u32) {
        debug!(last_good, status, "SPDY GOAWAY from the peer");
        let mut st = self.inner.lock();
        st.peer_goaway = Some(last_good);
        // Our streams above `last_good` were never processed: they are implicitly refused.
        let doomed: Vec<u32> = st
            .streams
            .values()
            .filter(|e| e.shared.ours && e.shared.id > last_good)
            .map(|e| e.shared.id)
            .collect();
        for id in doomed {
            st.reset(id, rst::REFUSED_STREAM);
        }
    }

    fn remote_fin(&self, id: u32) {
        let mut st = self.inner.lock();
        if let Some(entry) = st.streams.get_mut(&id) {
            entry.data = None;
            let flags = {
                let mut f = lock(&entry.shared.flags);
                f.remote_closed = true;
                *f
            };
            st.forget_if_done(id, &flags);
        }
    }

    async fn data(&mut self, id: u32, fin: bool, data: Bytes) -> Result<(), SpdyError> {
        let sender = {
            let mut st = self.inner.lock();
            let Some(entry) = st.streams.get(&id) else {
                // Forgotten (reset, or closed both ways): late data is moot.
                trace!(stream = id, "DATA for an unknown stream ignored");
                return Ok(());
            };
            if entry.reply.is_some() {
                // Data before SYN_REPLY on our stream: spdystream would drop it; buffering it
                // could block us before the reply that lets the application read.
                self.inner.refuse(&mut st, id, rst::PROTOCOL_ERROR);
                return Ok(());
            }
            match &entry.data {
                Some(sender) => sender.clone(),
                None => {
                    self.inner.refuse(&mut st, id, rst::STREAM_ALREADY_CLOSED);
                    return Ok(());
                }
            }
        };
        if !data.is_empty() && !sender.tx.is_closed() {
            let permits = data.len().min(STREAM_BUFFER_BYTES) as u32;
            // Backpressure: wait until the application has read enough. A reset or the end of
            // the session closes the semaphore, which drops the data.
            if let Ok(permit) = sender.budget.clone().acquire_many_owned(permits).await {
                let _ = sender.tx.send(Chunk { data, _permit: permit });
            }
        }
        drop(sender);
        if fin {
            self.remote_fin(id);
        }
        Ok(())
    }
}

enum WriterExit {
    /// Told to stop: drain (unless aborting).
    Stopped,
    Aborted,
    Failed(SpdyError),
}

async fn run_writer<W: AsyncWrite + Unpin>(
    inner: Arc<Inner>,
    io: W,
    mut control: mpsc::Receiver<Frame>,
    mut queue: mpsc::Receiver<Frame>,
) {
    let mut stop = inner.stop.subscribe();
    let mut gate = inner.peer_spoke.subscribe();
    let mut w = Writer { io, encoder: FrameEncoder::new(), buf: BytesMut::new() };
    // The server's rule: nothing on the wire before the client's first frame.
    let gate_open = tokio::select! {
        biased;
        _ = gate.wait_for(|spoke| *spoke) => true,
        _ = stop.wait_for(|s| *s != Stop::Run) => *inner.peer_spoke.borrow(),
    };
    let exit = if gate_open {
        loop {
            let frame = tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s != Stop::Run) => break WriterExit::Stopped,
                Some(frame) = control.recv() => frame,
                Some(frame) = queue.recv() => frame,
                else => break WriterExit::Stopped,
            };
            if let Err(e) = w.fill(frame, &mut control, &mut queue) {
                break WriterExit::Failed(e);
            }
            tokio::select! {
                result = w.flush() => if let Err(e) = result {
                    break WriterExit::Failed(SpdyError::write(e));
                },
                _ = give_up(&mut stop) => break WriterExit::Aborted,
            }
        }
    } else {
        WriterExit::Stopped
    };
    match exit {
        WriterExit::Failed(e) => inner.finish(Err(e)),
        WriterExit::Aborted => {}
        WriterExit::Stopped if *stop.borrow() == Stop::Abort => {}
        WriterExit::Stopped => {
            let drain = async {
                if gate_open {
                    w.drain(&mut control, &mut queue).await;
                }
                let _ = w.io.shutdown().await;
            };
            tokio::select! {
                _ = tokio::time::timeout(DRAIN_TIMEOUT, drain) => {}
                _ = stop.wait_for(|s| *s == Stop::Abort) => {}
            }
        }
    }
    inner.writer_done.send_replace(true);
}

/// Resolves when an in-flight write should be abandoned: at once on abort, or `DRAIN_TIMEOUT`
/// after the session ended (a peer that stopped reading must not pin `close`).
async fn give_up(stop: &mut watch::Receiver<Stop>) {
    let aborted = stop.wait_for(|s| *s != Stop::Run).await.map(|s| *s == Stop::Abort);
    if aborted.unwrap_or(true) {
        return;
    }
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, stop.wait_for(|s| *s == Stop::Abort)).await;
}

struct Writer<W> {
    io: W,
    encoder: FrameEncoder,
    buf: BytesMut,
}

impl<W: AsyncWrite + Unpin> Writer<W> {
    fn encode(&mut self, frame: &Frame) -> Result<(), SpdyError> {
        trace!(frame = frame.kind(), "SPDY frame sent");
        self.encoder.encode(frame, &mut self.buf).map_err(SpdyError::Encode)
    }

    /// Encodes `first`, then whatever else is queued right now (control first), up to a batch.
    fn fill(
        &mut self,
        first: Frame,
        control: &mut mpsc::Receiver<Frame>,
        queue: &mut mpsc::Receiver<Frame>,
    ) -> Result<(), SpdyError> {
        self.encode(&first)?;
        while self.buf.len() < WRITE_BATCH {
            let Some(frame) = control.try_recv().or_else(|_| queue.try_recv()).ok() else {
                break;
            };
            self.encode(&frame)?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        self.io.write_all(&self.buf).await?;
        self.buf.clear();
        self.io.flush().await
    }

    /// Writes everything still queued; stops at the first failure (the peer may be gone).
    async fn drain(
        &mut self,
        control: &mut mpsc::Receiver<Frame>,
        queue: &mut mpsc::Receiver<Frame>,
    ) {
        while let Ok(frame) = control.try_recv().or_else(|_| queue.try_recv()) {
            if self.fill(frame, control, queue).is_err() || self.flush().await.is_err() {
                return;
            }
        }
        if !self.buf.is_empty() {
            let _ = self.flush().await;
        }
    }
}
