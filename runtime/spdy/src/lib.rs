//! SPDY/3.1 framing and sessions, as the Kubernetes streaming protocols use them.
//!
//! `kubectl`/`crictl` exec, attach and port-forward upgrade an HTTP connection to `SPDY/3.1` and
//! then speak SPDY through `github.com/moby/spdystream`. This crate is the runtime's end of that:
//! a frame codec ([`frame`], [`headers`]) and a [`Session`] that runs one connection in either
//! role.
//!
//! # Model
//!
//! A [`Session`] owns the connection through two tasks: a reader, which decodes frames and
//! dispatches them, and a writer, the only place frames are encoded and written, so frames never
//! interleave and header blocks are compressed in wire order. Calls on the session and its
//! streams queue frames for the writer (a bounded queue: callers wait when it is full); frames
//! the reader answers by itself (PING echoes, refusals) go ahead of that queue.
//!
//! The peer's new streams arrive on [`Incoming`]; [`Session::open_stream`] opens ours. A
//! [`Stream`] reads the peer's data; its [`StreamWriter`]s (cloneable) send ours. A stream is
//! forgotten once both sides have sent FIN, or either reset it; dropping every handle of a stream
//! that is still open resets it with CANCEL.
//!
//! # Behaviour the Kubernetes clients need
//!
//! - **Nothing before the peer speaks.** The Go client drops bytes that arrive right after the
//!   HTTP 101, so a server session writes nothing until it has read the client's first frame;
//!   frames queued earlier wait.
//! - **PINGs are echoed** (the client pings every 5 s); [`Session::ping`] sends our own.
//! - **No flow control.** spdystream never sends WINDOW_UPDATE, so the 64 KiB initial window is
//!   not enforced in either direction: WINDOW_UPDATE and SETTINGS are read and ignored, and none
//!   are sent.
//! - **A bare FIN is a half-close** (stdin EOF): [`Stream::read`] returns `None`, the session
//!   and our direction of the stream go on.
//!
//! # Limits on what the peer may send
//!
//! - A frame: the 24-bit length field (16 MiB).
//! - A header block: [`MAX_HEADER_BLOCK`] bytes decompressed; beyond that the session ends
//!   (GOAWAY PROTOCOL_ERROR).
//! - Open streams opened by the peer: [`MAX_PEER_STREAMS`]; more are refused (RST_STREAM
//!   REFUSED_STREAM) and the session goes on.
//! - Unread data: [`STREAM_BUFFER_BYTES`] per stream (plus the frame that crosses it). When a
//!   stream's buffer is full the reader waits for the application to read, which stalls the
//!   whole connection: read every stream you keep open, or drop it.
//!
//! Malformed frames end the session with [`SpdyError::Protocol`] (after a GOAWAY with
//! PROTOCOL_ERROR); nothing the peer sends can panic the session.
//!
//! A session must be started inside a Tokio runtime (it spawns its two tasks).

mod dictionary;
mod error;
pub mod frame;
pub mod headers;
mod session;

pub use dictionary::{DICTIONARY, DICTIONARY_ADLER32};
pub use error::{FrameError, SpdyError};
pub use frame::{Frame, FrameDecoder, FrameEncoder};
pub use headers::Headers;
pub use session::{
    Incoming, Session, Stream, StreamWriter, MAX_DATA_FRAME, MAX_HEADER_BLOCK, MAX_PEER_STREAMS,
    STREAM_BUFFER_BYTES,
};
