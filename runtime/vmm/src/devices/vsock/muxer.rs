//! Host side of the vsock device: Firecracker's hybrid vsock over unix sockets.
//!
//! - host → guest: a client connects to `<uds>`, writes `CONNECT <port>\n`; the muxer sends
//!   OP_REQUEST to guest port `<port>` from a fresh local port and answers
//!   `OK <local port>\n` once the guest replies OP_RESPONSE (OP_RST closes the client).
//! - guest → host: OP_REQUEST to host port P connects to `<uds>_P`.
//!
//! Every host socket is non-blocking and registered edge-triggered in the muxer's own epoll
//! set (the device exposes that one fd to the event manager), so connections can be added
//! from the vCPU thread too. Edge-triggered readiness is remembered per connection
//! (`host_readable`) until a read returns EAGAIN, so a connection without guest credit or
//! without rx buffers simply waits without spinning.
//!
//! Header-only packets owed to the guest wait in one queue, bounded even for a guest that
//! sends without ever posting rx buffers: RSTs past [`MAX_QUEUED_RSTS`] are dropped (an RST
//! answers a packet for a connection that does not exist, or ends one that is gone; the guest
//! times out instead), and what is owed to a connection (REQUEST, RESPONSE) leaves the queue
//! with the connection, so at most one per live connection waits.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{ErrorKind, Read};
use std::num::Wrapping;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::packet::*;

/// Receive buffer each host connection advertises to the guest (our `buf_alloc`).
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;
/// Largest payload put in one rx packet.
pub const MAX_PKT_PAYLOAD: usize = 64 * 1024;
/// Longest `CONNECT <port>\n` line accepted.
const MAX_CONNECT_LINE: usize = 32;
/// First local port handed to host-initiated connections (as Firecracker does).
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// RSTs that may wait for the guest's rx buffers; more are dropped.
pub const MAX_QUEUED_RSTS: usize = 1024;
/// Epoll token of the listening socket.
const LISTENER_TOKEN: u64 = u64::MAX;
/// Epoll token of the request timer.
const TIMER_TOKEN: u64 = u64::MAX - 1;
/// How long a host-initiated connection waits for the guest's OP_RESPONSE (as in
/// Firecracker); then the host client is closed and the guest gets an RST.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Failures setting the muxer up.
#[derive(Debug, thiserror::Error)]
pub enum MuxerError {
    /// Binding the host-side unix socket.
    #[error("bind {0}: {1}")]
    Bind(PathBuf, std::io::Error),
    /// Making the listener non-blocking.
    #[error("set listener non-blocking: {0}")]
    Nonblocking(std::io::Error),
    /// Creating the epoll set.
    #[error("epoll_create: {0}")]
    EpollCreate(std::io::Error),
    /// Registering the listener with epoll.
    #[error("epoll_ctl(listener): {0}")]
    EpollAdd(std::io::Error),
    /// Creating the request timer.
    #[error("timerfd: {0}")]
    Timer(vmm_sys_util::errno::Error),
}

/// Connection key: (host-side port, guest-side port).
type ConnKey = (u32, u32);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConnState {
    /// Host-initiated: OP_REQUEST sent at this time, waiting for the guest's OP_RESPONSE.
    AwaitingResponse(Instant),
    Established,
}

struct Connection {
    stream: UnixStream,
    state: ConnState,
    /// Guest → host bytes not yet written to the host socket.
    tx_pending: VecDeque<u8>,
    /// Bytes forwarded to the host socket (our fwd_cnt).
    fwd_cnt: Wrapping<u32>,
    /// fwd_cnt as last told to the guest.
    last_fwd_cnt_sent: Wrapping<u32>,
    /// Guest's receive buffer and what it has consumed.
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Bytes sent to the guest.
    rx_cnt: Wrapping<u32>,
    /// Epoll said readable and no read returned EAGAIN since.
    host_readable: bool,
    /// The host side reached EOF (SHUTDOWN(SEND) was sent to the guest).
    host_eof: bool,
    /// The guest will send no more data: shut the host write side once flushed.
    guest_shut_send: bool,
    /// The guest will receive no more data.
    guest_shut_rcv: bool,
    /// A CREDIT_UPDATE is owed to the guest.
    credit_update_due: bool,
}

impl Connection {
    fn new(stream: UnixStream, state: ConnState, peer: &Header) -> Self {
        Connection {
            stream,
            state,
            tx_pending: VecDeque::new(),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            peer_buf_alloc: peer.buf_alloc,
            peer_fwd_cnt: Wrapping(peer.fwd_cnt),
            rx_cnt: Wrapping(0),
            host_readable: true,
            host_eof: false,
            guest_shut_send: false,
            guest_shut_rcv: false,
            credit_update_due: false,
        }
    }

    /// Bytes the guest can still take.
    fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn wants_to_send_data(&self) -> bool {
        self.state == ConnState::Established
            && self.host_readable
            && !self.host_eof
            && !self.guest_shut_rcv
            && self.peer_credit() > 0
    }

    /// Writes as much of `tx_pending` to the host socket as it takes.
    fn flush(&mut self) -> std::io::Result<()> {
        while !self.tx_pending.is_empty() {
            let (front, _) = self.tx_pending.as_slices();
            match send_nosignal(&self.stream, front) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.tx_pending.drain(..n);
                    self.fwd_cnt += Wrapping(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        // Tell the guest about freed space once half its window drained, so a guest
        // blocked on zero credit always gets woken (see module docs).
        if (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= CONN_BUF_ALLOC / 2 {
            self.credit_update_due = true;
        }
        if self.tx_pending.is_empty() && self.guest_shut_send {
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        Ok(())
    }
}

/// A host client that connected to `<uds>` and has not finished its CONNECT line.
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
}

/// What a packet bound for the guest carries besides its header.
pub enum RxPayload {
    /// Header only.
    None,
    /// Header + data read from a host socket.
    Data(Vec<u8>),
}

/// Counters, readable by the core for metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MuxerCounters {
    pub conns_added: u64,
    pub conns_removed: u64,
    pub host_connect_failures: u64,
    pub bytes_to_guest: u64,
    pub bytes_from_guest: u64,
    /// RSTs not sent because [`MAX_QUEUED_RSTS`] were already waiting.
    pub rsts_dropped: u64,
}

/// The connection table and its host sockets.
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    request_timer: TimerFd,
    request_timer_armed: bool,
    connect_timeout: Duration,
    /// Where the last rx scan stopped, so connections take turns.
    last_served: Option<ConnKey>,
    handshakes: HashMap<RawFd, Handshake>,
    conns: BTreeMap<ConnKey, Connection>,
    fd_to_conn: HashMap<RawFd, ConnKey>,
    /// Header-only packets owed to the guest (RESPONSE, RST, REQUEST).
    control: VecDeque<Header>,
    /// How many of `control` are RSTs.
    queued_rsts: usize,
    next_local_port: u32,
    counters: MuxerCounters,
}

impl Muxer {
    /// Listens on `uds_path` (removing a stale socket file first).
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, MuxerError> {
        let _ = std::fs::remove_file(uds_path);
        let listener =
            UnixListener::bind(uds_path).map_err(|e| MuxerError::Bind(uds_path.into(), e))?;
        listener.set_nonblocking(true).map_err(MuxerError::Nonblocking)?;
        let epoll = Epoll::new().map_err(MuxerError::EpollCreate)?;
        epoll
            .ctl(
                ControlOperation::Add,
                listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
            )
            .map_err(MuxerError::EpollAdd)?;
        let request_timer = TimerFd::new().map_err(MuxerError::Timer)?;
        epoll
            .ctl(
                ControlOperation::Add,
                request_timer.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TIMER_TOKEN),
            )
            .map_err(MuxerError::EpollAdd)?;
        Ok(Muxer {
            guest_cid,
            uds_path: uds_path.into(),
            listener,
            epoll,
            request_timer,
            request_timer_armed: false,
            connect_timeout: CONNECT_TIMEOUT,
            last_served: None,
            handshakes: HashMap::new(),
            conns: BTreeMap::new(),
            fd_to_conn: HashMap::new(),
            control: VecDeque::new(),
            queued_rsts: 0,
            next_local_port: FIRST_LOCAL_PORT,
            counters: MuxerCounters::default(),
        })
    }

    /// The epoll fd to watch for host-side readiness.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Counters so far.
    pub fn counters(&self) -> MuxerCounters {
        self.counters
    }

    /// Number of live connections (established or pending).
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Drops every connection (device reset or transport reset); host clients see EOF.
    pub fn clear(&mut self) {
        for (_, conn) in std::mem::take(&mut self.conns) {
            self.forget_fd(conn.stream.as_raw_fd());
            self.counters.conns_removed += 1;
        }
        for (fd, _) in std::mem::take(&mut self.handshakes) {
            self.forget_fd(fd);
        }
        self.control.clear();
        self.queued_rsts = 0;
    }

    /// Packets waiting in the control queue.
    #[cfg(test)]
    pub fn queued_control(&self) -> usize {
        self.control.len()
    }

    fn forget_fd(&mut self, fd: RawFd) {
        self.fd_to_conn.remove(&fd);
        let _ = self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
    }

    fn watch(&self, fd: RawFd) -> std::io::Result<()> {
        self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(
                EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED,
                fd as u64,
            ),
        )
    }

    fn header(&self, key: ConnKey, op: u16) -> Header {
        let (fwd_cnt, buf_alloc) =
            self.conns.get(&key).map_or((0, CONN_BUF_ALLOC), |c| (c.fwd_cnt.0, CONN_BUF_ALLOC));
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.0,
            dst_port: key.1,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc,
            fwd_cnt,
        }
    }

    fn queue_rst(&mut self, key: ConnKey) {
        if self.queued_rsts >= MAX_QUEUED_RSTS {
            self.counters.rsts_dropped += 1;
            return;
        }
        let hdr = self.header(key, OP_RST);
        self.control.push_back(hdr);
        self.queued_rsts += 1;
    }

    fn remove(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.remove(&key) {
            self.forget_fd(conn.stream.as_raw_fd());
            self.counters.conns_removed += 1;
            // What was owed to the connection is moot: without this, a guest cycling REQUEST
            // and RST on one port while posting no rx buffers would pile up RESPONSEs.
            self.control.retain(|h| h.op == OP_RST || (h.src_port, h.dst_port) != key);
        }
    }

    /// Handles one packet the guest sent (header already validated as STREAM from the
    /// guest's CID to the host).
    pub fn handle_guest_packet(&mut self, hdr: &Header, payload: &[u8]) {
        let key = (hdr.dst_port, hdr.src_port);
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.peer_buf_alloc = hdr.buf_alloc;
            conn.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        }
        match hdr.op {
            OP_REQUEST => self.guest_connect(hdr, key),
            OP_RESPONSE => self.guest_accepted(key),
            OP_RST => self.remove(key),
            OP_SHUTDOWN => self.guest_shutdown(key, hdr.flags),
            OP_RW => self.guest_data(key, payload),
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => {
                if let Some(conn) = self.conns.get_mut(&key) {
                    conn.credit_update_due = true;
                } else {
                    self.queue_rst(key);
                }
            }
            other => {
                tracing::warn!("vsock: unknown op {other} from guest");
                self.remove(key);
                self.queue_rst(key);
            }
        }
    }

    fn guest_connect(&mut self, hdr: &Header, key: ConnKey) {
        if self.conns.contains_key(&key) {
            // A second REQUEST on a live connection is a protocol violation.
            self.remove(key);
            self.queue_rst(key);
            return;
        }
        let mut path = self.uds_path.clone().into_os_string();
        path.push(format!("_{}", hdr.dst_port));
        let stream = match connect_nonblocking(Path::new(&path)) {
            Ok(stream) => stream,
            Err(err) => {
                tracing::debug!("vsock: guest connect to {path:?}: {err}");
                self.counters.host_connect_failures += 1;
                self.queue_rst(key);
                return;
            }
        };
        if let Err(err) = self.watch(stream.as_raw_fd()) {
            tracing::warn!("vsock: setting up connection to {path:?}: {err}");
            self.queue_rst(key);
            return;
        }
        self.fd_to_conn.insert(stream.as_raw_fd(), key);
        self.conns.insert(key, Connection::new(stream, ConnState::Established, hdr));
        self.counters.conns_added += 1;
        let response = self.header(key, OP_RESPONSE);
        self.control.push_back(response);
    }

    fn guest_accepted(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            self.queue_rst(key);
            return;
        };
        if !matches!(conn.state, ConnState::AwaitingResponse(_)) {
            self.remove(key);
            self.queue_rst(key);
            return;
        }
        conn.state = ConnState::Established;
        // The reply is a few bytes on a fresh socket: it fits in the socket buffer.
        let reply = format!("OK {}\n", key.0);
        let sent = send_nosignal(&conn.stream, reply.as_bytes());
        if let Err(err) =
            sent.and_then(
                |n| {
                    if n == reply.len() {
                        Ok(())
                    } else {
                        Err(ErrorKind::WriteZero.into())
                    }
                },
            )
        {
            tracing::debug!("vsock: host client went away before OK: {err}");
            self.remove(key);
            self.queue_rst(key);
        }
    }

    fn guest_shutdown(&mut self, key: ConnKey, flags: u32) {
        let Some(conn) = self.conns.get_mut(&key) else {
            self.queue_rst(key);
            return;
        };
        if flags & SHUTDOWN_RCV != 0 {
            conn.guest_shut_rcv = true;
        }
        if flags & SHUTDOWN_SEND != 0 {
            conn.guest_shut_send = true;
            if conn.tx_pending.is_empty() {
                let _ = conn.stream.shutdown(std::net::Shutdown::Write);
            }
        }
        // Both directions closed: the connection is over (the guest expects our RST).
        if (conn.guest_shut_rcv || conn.host_eof) && conn.guest_shut_send {
            self.remove(key);
            self.queue_rst(key);
        }
    }

    fn guest_data(&mut self, key: ConnKey, payload: &[u8]) {
        let Some(conn) = self.conns.get_mut(&key) else {
            self.queue_rst(key);
            return;
        };
        if conn.state != ConnState::Established || conn.guest_shut_send {
            self.remove(key);
            self.queue_rst(key);
            return;
        }
        self.counters.bytes_from_guest += payload.len() as u64;
        // The guest may only send what our credit allows: more is a broken driver.
        if conn.tx_pending.len() + payload.len() > CONN_BUF_ALLOC as usize {
            tracing::warn!("vsock: guest overran its credit on {key:?}");
            self.remove(key);
            self.queue_rst(key);
            return;
        }
        conn.tx_pending.extend(payload);
        if let Err(err) = conn.flush() {
            tracing::debug!("vsock: host side of {key:?} failed: {err}");
            self.remove(key);
            self.queue_rst(key);
        }
    }

    /// Handles whatever the host sockets have ready (never blocks).
    pub fn process_host_events(&mut self) {
        let mut events = [EpollEvent::default(); 32];
        loop {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("vsock: epoll_wait: {e}");
                    return;
                }
            };
            for event in &events[..n] {
                let token = event.data();
                if token == LISTENER_TOKEN {
                    self.accept_clients();
                    continue;
                }
                if token == TIMER_TOKEN {
                    let _ = self.request_timer.wait();
                    self.request_timer_armed = false;
                    self.expire_requests();
                    continue;
                }
                let fd = token as RawFd;
                let set = event.event_set();
                if self.handshakes.contains_key(&fd) {
                    self.read_connect_line(fd);
                } else if let Some(&key) = self.fd_to_conn.get(&fd) {
                    self.connection_ready(key, set);
                }
            }
            if n < events.len() {
                return;
            }
        }
    }

    fn accept_clients(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    let fd = stream.as_raw_fd();
                    if let Err(err) = stream.set_nonblocking(true).and_then(|()| self.watch(fd)) {
                        tracing::warn!("vsock: new host client: {err}");
                        continue;
                    }
                    self.handshakes.insert(fd, Handshake { stream, line: Vec::new() });
                    // Data may already be there (edge already passed).
                    self.read_connect_line(fd);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!("vsock: accept on {:?}: {e}", self.uds_path);
                    return;
                }
            }
        }
    }

    /// Reads the CONNECT line one byte at a time so no payload byte after it is consumed.
    fn read_connect_line(&mut self, fd: RawFd) {
        let Some(handshake) = self.handshakes.get_mut(&fd) else {
            return;
        };
        let port = loop {
            let mut byte = [0u8; 1];
            match handshake.stream.read(&mut byte) {
                Ok(0) => break Err("client closed before CONNECT".to_string()),
                Ok(_) if byte[0] == b'\n' => break parse_connect_line(&handshake.line),
                Ok(_) => {
                    handshake.line.push(byte[0]);
                    if handshake.line.len() > MAX_CONNECT_LINE {
                        break Err("CONNECT line too long".to_string());
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => break Err(e.to_string()),
            }
        };
        let Some(handshake) = self.handshakes.remove(&fd) else {
            return;
        };
        let peer_port = match port {
            Ok(port) => port,
            Err(err) => {
                tracing::debug!("vsock: host client rejected: {err}");
                self.forget_fd(fd);
                return;
            }
        };
        let local_port = self.allocate_local_port(peer_port);
        let key = (local_port, peer_port);
        self.fd_to_conn.insert(fd, key);
        let mut conn = Connection::new(
            handshake.stream,
            ConnState::AwaitingResponse(Instant::now()),
            &Header::default(),
        );
        // Bytes after the CONNECT line are left in the socket for after the handshake.
        conn.host_readable = true;
        self.conns.insert(key, conn);
        self.counters.conns_added += 1;
        let request = self.header(key, OP_REQUEST);
        self.control.push_back(request);
        self.arm_request_timer(self.connect_timeout);
    }

    /// How long host-initiated connections wait for the guest (default [`CONNECT_TIMEOUT`]).
    pub fn set_connect_timeout(&mut self, timeout: Duration) {
        self.connect_timeout = timeout;
    }

    fn arm_request_timer(&mut self, after: Duration) {
        if self.request_timer_armed {
            return;
        }
        match self.request_timer.reset(after, None) {
            Ok(()) => self.request_timer_armed = true,
            Err(err) => tracing::error!("vsock: arming the request timer: {err}"),
        }
    }

    /// Closes host-initiated connections the guest did not answer in time.
    fn expire_requests(&mut self) {
        let now = Instant::now();
        let mut next_deadline: Option<Duration> = None;
        let mut expired = Vec::new();
        for (key, conn) in &self.conns {
            if let ConnState::AwaitingResponse(since) = conn.state {
                let age = now.saturating_duration_since(since);
                if age >= self.connect_timeout {
                    expired.push(*key);
                } else {
                    let left = self.connect_timeout - age;
                    next_deadline = Some(next_deadline.map_or(left, |d| d.min(left)));
                }
            }
        }
        for key in expired {
            tracing::debug!("vsock: guest did not answer the connection request {key:?}");
            // A REQUEST still waiting for an rx buffer (driver not up yet) is withdrawn with
            // the connection; one the guest has seen is cancelled with an RST.
            let undelivered =
                self.control.iter().any(|h| h.op == OP_REQUEST && (h.src_port, h.dst_port) == key);
            self.remove(key);
            if !undelivered {
                self.queue_rst(key);
            }
        }
        if let Some(after) = next_deadline {
            self.arm_request_timer(after.max(Duration::from_millis(1)));
        }
    }

    fn allocate_local_port(&mut self, peer_port: u32) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = self.next_local_port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.contains_key(&(port, peer_port)) {
                return port;
            }
        }
    }

    fn connection_ready(&mut self, key: ConnKey, set: EventSet) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if set
            .intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR)
        {
            conn.host_readable = true;
        }
        if set.contains(EventSet::OUT) && conn.state == ConnState::Established {
            if let Err(err) = conn.flush() {
                tracing::debug!("vsock: host side of {key:?} failed: {err}");
                self.remove(key);
                self.queue_rst(key);
            }
        }
    }

    /// Whether some packet is ready for the guest's rx queue.
    pub fn has_rx(&self) -> bool {
        !self.control.is_empty()
            || self.conns.values().any(|c| c.credit_update_due || c.wants_to_send_data())
    }

    /// Produces the next packet for the guest, reading at most `max_payload` bytes from a
    /// host socket. `None` when nothing is ready.
    pub fn next_rx(&mut self, max_payload: usize) -> Option<(Header, RxPayload)> {
        if let Some(hdr) = self.control.pop_front() {
            if hdr.op == OP_RST {
                self.queued_rsts = self.queued_rsts.saturating_sub(1);
            }
            return Some((hdr, RxPayload::None));
        }
        // Start after the connection served last, so none is starved.
        let keys: Vec<ConnKey> = match self.last_served {
            Some(last) => {
                use std::ops::Bound::{Excluded, Included, Unbounded};
                self.conns
                    .range((Excluded(last), Unbounded))
                    .chain(self.conns.range((Unbounded, Included(last))))
                    .map(|(k, _)| *k)
                    .collect()
            }
            None => self.conns.keys().copied().collect(),
        };
        for key in keys {
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            if conn.credit_update_due {
                conn.credit_update_due = false;
                conn.last_fwd_cnt_sent = conn.fwd_cnt;
                return Some((self.header(key, OP_CREDIT_UPDATE), RxPayload::None));
            }
            if !conn.wants_to_send_data() {
                continue;
            }
            let len = max_payload.min(conn.peer_credit() as usize).min(MAX_PKT_PAYLOAD);
            if len == 0 {
                continue;
            }
            let mut buf = vec![0u8; len];
            match conn.stream.read(&mut buf) {
                Ok(0) => {
                    // The host side will send no more (closed, or only half-closed and
                    // still reading): the guest reads EOF but may still send. When the
                    // guest is done too it shuts down or resets, which ends the connection;
                    // a guest write to a fully closed host side ends it with an RST.
                    conn.host_eof = true;
                    let mut hdr = self.header(key, OP_SHUTDOWN);
                    hdr.flags = SHUTDOWN_SEND;
                    return Some((hdr, RxPayload::None));
                }
                Ok(n) => {
                    buf.truncate(n);
                    conn.rx_cnt += Wrapping(n as u32);
                    conn.last_fwd_cnt_sent = conn.fwd_cnt;
                    self.counters.bytes_to_guest += n as u64;
                    let mut hdr = self.header(key, OP_RW);
                    hdr.len = n as u32;
                    self.last_served = Some(key);
                    return Some((hdr, RxPayload::Data(buf)));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => conn.host_readable = false,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!("vsock: reading host side of {key:?}: {e}");
                    self.remove(key);
                    return Some((self.header(key, OP_RST), RxPayload::None));
                }
            }
        }
        None
    }
}

/// Writes to a host socket without raising SIGPIPE when its peer is gone (EPIPE instead),
/// whatever the process's SIGPIPE disposition.
fn send_nosignal(stream: &UnixStream, buf: &[u8]) -> std::io::Result<usize> {
    use nix::sys::socket::{send, MsgFlags};
    Ok(send(stream.as_raw_fd(), buf, MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT)?)
}

/// Connects without blocking: this runs on a vCPU thread, and a blocking connect to a
/// listener with a full backlog would stall the vCPU. A full backlog fails (EAGAIN) and
/// the guest gets an RST.
fn connect_nonblocking(path: &Path) -> std::io::Result<UnixStream> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let addr = UnixAddr::new(path)?;
    connect(fd.as_raw_fd(), &addr)?;
    Ok(UnixStream::from(fd))
}

fn parse_connect_line(line: &[u8]) -> Result<u32, String> {
    let text = std::str::from_utf8(line).map_err(|_| "CONNECT line is not UTF-8".to_string())?;
    let text = text.trim_end_matches('\r');
    let port = text
        .strip_prefix("CONNECT ")
        .ok_or_else(|| format!("expected `CONNECT <port>`, got {text:?}"))?;
    port.trim().parse::<u32>().map_err(|e| format!("bad port {port:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_line_parsing() {
        assert_eq!(parse_connect_line(b"CONNECT 1024"), Ok(1024));
        assert_eq!(parse_connect_line(b"CONNECT 52\r"), Ok(52));
        assert!(parse_connect_line(b"CONNECT").is_err());
        assert!(parse_connect_line(b"CONNECT x").is_err());
        assert!(parse_connect_line(b"HELLO 1").is_err());
        assert!(parse_connect_line(&[0xff, 0xfe]).is_err());
    }
}
