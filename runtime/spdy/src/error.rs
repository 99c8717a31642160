//! Errors: [`FrameError`] for the codec, [`SpdyError`] for sessions.

use std::io;
use std::sync::Arc;

use crate::frame::rst_status_name;

/// A frame that cannot be decoded (the peer broke the protocol) or encoded (a bad value of ours).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A control frame carries a version other than 3.
    #[error("control frame of unsupported SPDY version {0}")]
    UnsupportedVersion(u16),
    /// A frame's length does not fit its type's fixed layout.
    #[error("{kind} frame with invalid length {length}")]
    BadLength {
        /// The frame type.
        kind: &'static str,
        /// The length field.
        length: usize,
    },
    /// A frame that must name a stream names stream 0.
    #[error("{kind} frame for stream 0")]
    ZeroStreamId {
        /// The frame type.
        kind: &'static str,
    },
    /// A SYN_STREAM whose id is not above every stream id the peer opened before.
    #[error("SYN_STREAM for stream {id} after stream {last}")]
    StreamIdOrder {
        /// The id in the frame.
        id: u32,
        /// The highest id the peer had opened.
        last: u32,
    },
    /// The connection ended part-way through a frame.
    #[error("connection ended inside a frame ({have} of {need} bytes)")]
    Truncated {
        /// Bytes received of the frame.
        have: usize,
        /// Bytes the frame needs (at least).
        need: usize,
    },
    /// A decompressed header block is larger than the limit.
    #[error("header block exceeds {limit} bytes")]
    HeaderBlockTooLarge {
        /// The limit in force.
        limit: usize,
    },
    /// A decompressed header block does not parse.
    #[error("malformed header block: {0}")]
    BadHeaderBlock(&'static str),
    /// A header name that SPDY cannot carry (empty, or containing NUL).
    #[error("invalid header name {0:?}")]
    InvalidHeaderName(String),
    /// zlib refused a header block of the peer.
    #[error("header block decompression: {0}")]
    Decompress(String),
    /// zlib failed while compressing one of our header blocks.
    #[error("header block compression: {0}")]
    Compress(String),
    /// A value of ours does not fit its wire field (31-bit stream id, 3-bit priority, 24-bit
    /// length).
    #[error("{what} {value} does not fit its field")]
    FieldOverflow {
        /// The field.
        what: &'static str,
        /// The value given.
        value: u64,
    },
}

/// Why a session call failed, or why a session ended.
///
/// Cheap to clone (I/O errors are shared) because every waiter on [`crate::Session::closed`]
/// gets the same value.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SpdyError {
    /// Reading from the connection failed.
    #[error("read from the SPDY connection: {0}")]
    Read(Arc<io::Error>),
    /// Writing to the connection failed.
    #[error("write to the SPDY connection: {0}")]
    Write(Arc<io::Error>),
    /// The peer broke the protocol; the session ended (after a GOAWAY with PROTOCOL_ERROR).
    #[error("SPDY protocol error from the peer: {0}")]
    Protocol(FrameError),
    /// One of our frames could not be encoded; the session ended (its compressor may be out of
    /// step with the peer's).
    #[error("encode a SPDY frame: {0}")]
    Encode(FrameError),
    /// Headers given to `open_stream` or `reply` cannot be sent.
    #[error("headers cannot be sent: {0}")]
    Headers(FrameError),
    /// The session has ended; nothing more can be sent or opened.
    #[error("SPDY session closed")]
    SessionClosed,
    /// `open_stream`: the peer has sent GOAWAY, so it takes no new streams.
    #[error("the peer sent GOAWAY: no new streams")]
    GoingAway,
    /// `open_stream`: no stream ids are left (they are 31-bit and never reused).
    #[error("SPDY stream ids exhausted")]
    StreamIdsExhausted,
    /// The stream was reset (RST_STREAM), by the peer or by us.
    #[error("stream {stream_id} reset: {}", rst_status_name(*status))]
    Reset {
        /// The stream.
        stream_id: u32,
        /// The RST_STREAM status code.
        status: u32,
    },
    /// `write`, `reply`: we have already half-closed the stream (FIN sent, or the peer opened it
    /// unidirectional).
    #[error("stream {stream_id} is closed for writing")]
    StreamClosed {
        /// The stream.
        stream_id: u32,
    },
    /// `write`, `close` on a peer-opened stream before `reply`: the peer would drop the data.
    #[error("stream {stream_id} has not been replied to")]
    NotReplied {
        /// The stream.
        stream_id: u32,
    },
    /// `reply` on a stream we opened, or a second `reply`.
    #[error("stream {stream_id} cannot be replied to: {reason}")]
    Reply {
        /// The stream.
        stream_id: u32,
        /// Why.
        reason: &'static str,
    },
    /// `reset` with status 0, which the protocol does not allow.
    #[error("RST_STREAM status 0 is invalid")]
    InvalidStatus,
}

impl SpdyError {
    pub(crate) fn read(e: io::Error) -> Self {
        SpdyError::Read(Arc::new(e))
    }

    pub(crate) fn write(e: io::Error) -> Self {
        SpdyError::Write(Arc::new(e))
    }
}
