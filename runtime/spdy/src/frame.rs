//! SPDY/3 frames on the wire.
//!
//! Every frame has an 8-byte header. A control frame: `1 | version (15 bits, = 3) | type (16) |
//! flags (8) | length (24)`; a data frame: `0 | stream id (31) | flags (8) | length (24)`; then
//! `length` bytes of payload. [`FrameEncoder`] and [`FrameDecoder`] each own one direction's
//! header-compression stream, so one of each serves a connection, used in wire order.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::FrameError;
use crate::headers::{decode_block, encode_block, HeaderCompressor, HeaderDecompressor, Headers};

/// The protocol version in every control frame.
pub const VERSION: u16 = 3;
/// The largest payload a frame can carry (the 24-bit length field).
pub const MAX_FRAME_LENGTH: usize = 0xff_ffff;
/// The largest stream id (31 bits).
pub const MAX_STREAM_ID: u32 = 0x7fff_ffff;

/// Control frame types.
pub mod frame_type {
    /// Opens a stream.
    pub const SYN_STREAM: u16 = 1;
    /// Accepts a stream.
    pub const SYN_REPLY: u16 = 2;
    /// Aborts a stream.
    pub const RST_STREAM: u16 = 3;
    /// Session settings.
    pub const SETTINGS: u16 = 4;
    /// Round-trip check.
    pub const PING: u16 = 6;
    /// No new streams.
    pub const GOAWAY: u16 = 7;
    /// More headers for a stream.
    pub const HEADERS: u16 = 8;
    /// Flow-control credit.
    pub const WINDOW_UPDATE: u16 = 9;
}

/// Frame flags.
pub mod flags {
    /// Last frame from this side of the stream (SYN_STREAM, SYN_REPLY, HEADERS, DATA).
    pub const FIN: u8 = 0x01;
    /// SYN_STREAM: the recipient may not send on the stream.
    pub const UNIDIRECTIONAL: u8 = 0x02;
    /// SETTINGS: forget persisted settings.
    pub const CLEAR_SETTINGS: u8 = 0x01;
}

/// RST_STREAM status codes.
pub mod rst {
    /// Generic protocol violation.
    pub const PROTOCOL_ERROR: u32 = 1;
    /// A frame for a stream that is not active.
    pub const INVALID_STREAM: u32 = 2;
    /// The stream was refused before any processing.
    pub const REFUSED_STREAM: u32 = 3;
    /// The version is not supported.
    pub const UNSUPPORTED_VERSION: u32 = 4;
    /// The stream is no longer needed.
    pub const CANCEL: u32 = 5;
    /// An internal failure.
    pub const INTERNAL_ERROR: u32 = 6;
    /// The flow-control protocol was violated.
    pub const FLOW_CONTROL_ERROR: u32 = 7;
    /// A SYN_REPLY for a stream already open.
    pub const STREAM_IN_USE: u32 = 8;
    /// Data or a SYN_REPLY for a stream already half-closed.
    pub const STREAM_ALREADY_CLOSED: u32 = 9;
    /// Bad credentials.
    pub const INVALID_CREDENTIALS: u32 = 10;
    /// A frame too large to process.
    pub const FRAME_TOO_LARGE: u32 = 11;
}

/// GOAWAY status codes.
pub mod goaway {
    /// A normal session teardown.
    pub const OK: u32 = 0;
    /// A protocol violation.
    pub const PROTOCOL_ERROR: u32 = 1;
    /// An internal failure.
    pub const INTERNAL_ERROR: u32 = 2;
}

/// The name of an RST_STREAM status, for messages.
pub fn rst_status_name(status: u32) -> &'static str {
    match status {
        rst::PROTOCOL_ERROR => "PROTOCOL_ERROR",
        rst::INVALID_STREAM => "INVALID_STREAM",
        rst::REFUSED_STREAM => "REFUSED_STREAM",
        rst::UNSUPPORTED_VERSION => "UNSUPPORTED_VERSION",
        rst::CANCEL => "CANCEL",
        rst::INTERNAL_ERROR => "INTERNAL_ERROR",
        rst::FLOW_CONTROL_ERROR => "FLOW_CONTROL_ERROR",
        rst::STREAM_IN_USE => "STREAM_IN_USE",
        rst::STREAM_ALREADY_CLOSED => "STREAM_ALREADY_CLOSED",
        rst::INVALID_CREDENTIALS => "INVALID_CREDENTIALS",
        rst::FRAME_TOO_LARGE => "FRAME_TOO_LARGE",
        _ => "unknown status",
    }
}

/// One SETTINGS entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setting {
    /// Entry flags (PERSIST_VALUE = 1, PERSISTED = 2).
    pub flags: u8,
    /// The setting id (24 bits).
    pub id: u32,
    /// Its value.
    pub value: u32,
}

/// A decoded frame. Header blocks are decompressed; flags the session does not use are dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// SYN_STREAM: opens `stream_id`.
    SynStream {
        /// The new stream (odd from clients, even from servers).
        stream_id: u32,
        /// The stream this one is associated with (server push), or 0.
        associated_id: u32,
        /// 0 (highest) to 7.
        priority: u8,
        /// Credential slot, 0 for none.
        slot: u8,
        /// The opener sends nothing more (FLAG_FIN).
        fin: bool,
        /// The recipient may send nothing (FLAG_UNIDIRECTIONAL).
        unidirectional: bool,
        /// The stream's headers.
        headers: Headers,
    },
    /// SYN_REPLY: accepts `stream_id`.
    SynReply {
        /// The stream.
        stream_id: u32,
        /// The replier sends nothing more.
        fin: bool,
        /// Reply headers.
        headers: Headers,
    },
    /// RST_STREAM: aborts `stream_id`.
    RstStream {
        /// The stream.
        stream_id: u32,
        /// See [`rst`].
        status: u32,
    },
    /// SETTINGS.
    Settings {
        /// FLAG_SETTINGS_CLEAR_SETTINGS.
        clear: bool,
        /// The entries.
        entries: Vec<Setting>,
    },
    /// PING: the receiver echoes a ping of the other side's parity.
    Ping {
        /// Odd from clients, even from servers.
        id: u32,
    },
    /// GOAWAY: the sender takes no new streams.
    GoAway {
        /// The last stream id the sender accepted or refused.
        last_good_stream_id: u32,
        /// See [`goaway`].
        status: u32,
    },
    /// HEADERS: more headers for `stream_id`.
    Headers {
        /// The stream.
        stream_id: u32,
        /// The sender sends nothing more.
        fin: bool,
        /// The headers.
        headers: Headers,
    },
    /// WINDOW_UPDATE: flow-control credit (read and ignored: see the crate docs).
    WindowUpdate {
        /// The stream (0: the session, SPDY/3.1).
        stream_id: u32,
        /// The credit, 31 bits.
        delta: u32,
    },
    /// A data frame.
    Data {
        /// The stream.
        stream_id: u32,
        /// The sender sends nothing more on the stream.
        fin: bool,
        /// The payload (may be empty, e.g. a bare FIN).
        data: Bytes,
    },
    /// A control frame of a type this crate does not know (the spec says to ignore these).
    Unknown {
        /// The type field.
        frame_type: u16,
        /// The flags field.
        flags: u8,
        /// The raw payload.
        payload: Bytes,
    },
}

impl Frame {
    /// The frame type's name, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Frame::SynStream { .. } => "SYN_STREAM",
            Frame::SynReply { .. } => "SYN_REPLY",
            Frame::RstStream { .. } => "RST_STREAM",
            Frame::Settings { .. } => "SETTINGS",
            Frame::Ping { .. } => "PING",
            Frame::GoAway { .. } => "GOAWAY",
            Frame::Headers { .. } => "HEADERS",
            Frame::WindowUpdate { .. } => "WINDOW_UPDATE",
            Frame::Data { .. } => "DATA",
            Frame::Unknown { .. } => "unknown control",
        }
    }
}

fn check_id(what: &'static str, id: u32) -> Result<u32, FrameError> {
    if id > MAX_STREAM_ID {
        return Err(FrameError::FieldOverflow { what, value: id.into() });
    }
    Ok(id)
}

fn check_len(what: &'static str, len: usize) -> Result<u32, FrameError> {
    if len > MAX_FRAME_LENGTH {
        return Err(FrameError::FieldOverflow { what, value: len as u64 });
    }
    Ok(len as u32)
}

fn fin_flag(fin: bool) -> u8 {
    if fin {
        flags::FIN
    } else {
        0
    }
}

/// Encodes frames for one connection direction (owns the sending zlib stream).
#[derive(Debug, Default)]
pub struct FrameEncoder {
    compressor: HeaderCompressor,
}

impl FrameEncoder {
    /// A fresh encoder: use one per connection, for every frame sent, in wire order.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends `frame` to `dst`.
    ///
    /// Fields are checked before any header block is compressed, so a field error leaves the
    /// compressor in step with the peer. A header block whose compressed form exceeds the frame
    /// length limit does not: the connection is then unusable.
    pub fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<(), FrameError> {
        match frame {
            Frame::SynStream {
                stream_id,
                associated_id,
                priority,
                slot,
                fin,
                unidirectional,
                headers,
            } => {
                let id = check_id("stream id", *stream_id)?;
                let assoc = check_id("associated stream id", *associated_id)?;
                if *priority > 7 {
                    return Err(FrameError::FieldOverflow {
                        what: "priority",
                        value: (*priority).into(),
                    });
                }
                let mut flags = fin_flag(*fin);
                if *unidirectional {
                    flags |= flags::UNIDIRECTIONAL;
                }
                let mut payload = Vec::with_capacity(64);
                payload.extend_from_slice(&id.to_be_bytes());
                payload.extend_from_slice(&assoc.to_be_bytes());
                payload.push(priority << 5);
                payload.push(*slot);
                self.header_block(headers, &mut payload)?;
                put_control(dst, frame_type::SYN_STREAM, flags, &payload)
            }
            Frame::SynReply { stream_id, fin, headers } => {
                let id = check_id("stream id", *stream_id)?;
                let mut payload = id.to_be_bytes().to_vec();
                self.header_block(headers, &mut payload)?;
                put_control(dst, frame_type::SYN_REPLY, fin_flag(*fin), &payload)
            }
            Frame::Headers { stream_id, fin, headers } => {
                let id = check_id("stream id", *stream_id)?;
                let mut payload = id.to_be_bytes().to_vec();
                self.header_block(headers, &mut payload)?;
                put_control(dst, frame_type::HEADERS, fin_flag(*fin), &payload)
            }
            Frame::RstStream { stream_id, status } => {
                let id = check_id("stream id", *stream_id)?;
                put_control(dst, frame_type::RST_STREAM, 0, &two_words(id, *status))
            }
            Frame::Settings { clear, entries } => {
                let mut payload = Vec::with_capacity(4 + 8 * entries.len());
                let count =
                    u32::try_from(entries.len()).map_err(|_| FrameError::FieldOverflow {
                        what: "settings count",
                        value: entries.len() as u64,
                    })?;
                payload.extend_from_slice(&count.to_be_bytes());
                for s in entries {
                    if s.id > 0xff_ffff {
                        return Err(FrameError::FieldOverflow {
                            what: "setting id",
                            value: s.id.into(),
                        });
                    }
                    payload.extend_from_slice(&((u32::from(s.flags) << 24) | s.id).to_be_bytes());
                    payload.extend_from_slice(&s.value.to_be_bytes());
                }
                let flags = if *clear { flags::CLEAR_SETTINGS } else { 0 };
                put_control(dst, frame_type::SETTINGS, flags, &payload)
            }
            Frame::Ping { id } => put_control(dst, frame_type::PING, 0, &id.to_be_bytes()),
            Frame::GoAway { last_good_stream_id, status } => {
                let id = check_id("last good stream id", *last_good_stream_id)?;
                put_control(dst, frame_type::GOAWAY, 0, &two_words(id, *status))
            }
            Frame::WindowUpdate { stream_id, delta } => {
                let id = check_id("stream id", *stream_id)?;
                let delta = check_id("window delta", *delta)?;
                put_control(dst, frame_type::WINDOW_UPDATE, 0, &two_words(id, delta))
            }
            Frame::Data { stream_id, fin, data } => {
                let id = check_id("stream id", *stream_id)?;
                let len = check_len("data length", data.len())?;
                dst.reserve(8 + data.len());
                dst.put_u32(id);
                dst.put_u32((u32::from(fin_flag(*fin)) << 24) | len);
                dst.put_slice(data);
                Ok(())
            }
            Frame::Unknown { frame_type, flags, payload } => {
                put_control(dst, *frame_type, *flags, payload)
            }
        }
    }

    fn header_block(&mut self, headers: &Headers, payload: &mut Vec<u8>) -> Result<(), FrameError> {
        let block = encode_block(headers)?;
        self.compressor.compress(&block, payload)
    }
}

fn two_words(a: u32, b: u32) -> [u8; 8] {
    let mut out = [0u8; 8];
    out[..4].copy_from_slice(&a.to_be_bytes());
    out[4..].copy_from_slice(&b.to_be_bytes());
    out
}

fn put_control(
    dst: &mut BytesMut,
    frame_type: u16,
    flags: u8,
    payload: &[u8],
) -> Result<(), FrameError> {
    let len = check_len("control frame length", payload.len())?;
    dst.reserve(8 + payload.len());
    dst.put_u16(0x8000 | VERSION);
    dst.put_u16(frame_type);
    dst.put_u32((u32::from(flags) << 24) | len);
    dst.put_slice(payload);
    Ok(())
}

/// Decodes frames for one connection direction (owns the receiving zlib stream).
#[derive(Debug)]
pub struct FrameDecoder {
    decompressor: HeaderDecompressor,
}

impl FrameDecoder {
    /// A fresh decoder whose header blocks may decompress to at most `max_header_block` bytes.
    pub fn new(max_header_block: usize) -> Self {
        FrameDecoder { decompressor: HeaderDecompressor::new(max_header_block) }
    }

    /// Takes the next whole frame off the front of `src`, or returns `None` (and reserves room)
    /// if it has not fully arrived. Any error leaves the connection unusable.
    pub fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if src.len() < 8 {
            return Ok(None);
        }
        let word0 = u32::from_be_bytes([src[0], src[1], src[2], src[3]]);
        let flags = src[4];
        let len = usize::from(src[5]) << 16 | usize::from(src[6]) << 8 | usize::from(src[7]);
        let control = word0 & 0x8000_0000 != 0;
        if control {
            // Checked before waiting for the payload: a bad version means the length is
            // meaningless too.
            let version = ((word0 >> 16) & 0x7fff) as u16;
            if version != VERSION {
                return Err(FrameError::UnsupportedVersion(version));
            }
        }
        if src.len() < 8 + len {
            src.reserve(8 + len - src.len());
            return Ok(None);
        }
        let mut frame = src.split_to(8 + len).freeze();
        frame.advance(8);
        let payload = frame;
        if !control {
            let stream_id = word0 & MAX_STREAM_ID;
            if stream_id == 0 {
                return Err(FrameError::ZeroStreamId { kind: "DATA" });
            }
            return Ok(Some(Frame::Data {
                stream_id,
                fin: flags & flags::FIN != 0,
                data: payload,
            }));
        }
        let fin = flags & flags::FIN != 0;
        let frame_type = (word0 & 0xffff) as u16;
        let frame = match frame_type {
            frame_type::SYN_STREAM => {
                let (stream_id, rest) = stream_prefix("SYN_STREAM", &payload, 10)?;
                let associated_id = read_u32(&payload[4..]) & MAX_STREAM_ID;
                Frame::SynStream {
                    stream_id,
                    associated_id,
                    priority: payload[8] >> 5,
                    slot: payload[9],
                    fin,
                    unidirectional: flags & flags::UNIDIRECTIONAL != 0,
                    headers: self.headers(&rest[6..])?,
                }
            }
            frame_type::SYN_REPLY => {
                let (stream_id, rest) = stream_prefix("SYN_REPLY", &payload, 4)?;
                Frame::SynReply { stream_id, fin, headers: self.headers(rest)? }
            }
            frame_type::HEADERS => {
                let (stream_id, rest) = stream_prefix("HEADERS", &payload, 4)?;
                Frame::Headers { stream_id, fin, headers: self.headers(rest)? }
            }
            frame_type::RST_STREAM => {
                exact_len("RST_STREAM", &payload, 8)?;
                let (stream_id, rest) = stream_prefix("RST_STREAM", &payload, 8)?;
                Frame::RstStream { stream_id, status: read_u32(rest) }
            }
            frame_type::SETTINGS => {
                if payload.len() < 4 {
                    return Err(FrameError::BadLength { kind: "SETTINGS", length: len });
                }
                let count = read_u32(&payload) as usize;
                // Checked: the count is the peer's and may be anything.
                if count.checked_mul(8) != Some(payload.len() - 4) {
                    return Err(FrameError::BadLength { kind: "SETTINGS", length: len });
                }
                let entries = payload[4..]
                    .chunks_exact(8)
                    .map(|e| {
                        let word = read_u32(e);
                        Setting {
                            flags: (word >> 24) as u8,
                            id: word & 0xff_ffff,
                            value: read_u32(&e[4..]),
                        }
                    })
                    .collect();
                Frame::Settings { clear: flags & flags::CLEAR_SETTINGS != 0, entries }
            }
            frame_type::PING => {
                exact_len("PING", &payload, 4)?;
                Frame::Ping { id: read_u32(&payload) }
            }
            frame_type::GOAWAY => {
                exact_len("GOAWAY", &payload, 8)?;
                Frame::GoAway {
                    last_good_stream_id: read_u32(&payload) & MAX_STREAM_ID,
                    status: read_u32(&payload[4..]),
                }
            }
            frame_type::WINDOW_UPDATE => {
                exact_len("WINDOW_UPDATE", &payload, 8)?;
                Frame::WindowUpdate {
                    stream_id: read_u32(&payload) & MAX_STREAM_ID,
                    delta: read_u32(&payload[4..]) & MAX_STREAM_ID,
                }
            }
            _ => Frame::Unknown { frame_type, flags, payload },
        };
        Ok(Some(frame))
    }

    /// Called at end of input: an error if a partial frame is left in `src`.
    pub fn decode_eof(&self, src: &BytesMut) -> Result<(), FrameError> {
        if src.is_empty() {
            return Ok(());
        }
        let need = if src.len() < 8 {
            8
        } else {
            8 + (usize::from(src[5]) << 16 | usize::from(src[6]) << 8 | usize::from(src[7]))
        };
        Err(FrameError::Truncated { have: src.len(), need })
    }

    fn headers(&mut self, compressed: &[u8]) -> Result<Headers, FrameError> {
        let block = self.decompressor.decompress(compressed)?;
        decode_block(&block)
    }
}

/// Callers check the length first; the slice is at least 4 bytes.
fn read_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn exact_len(kind: &'static str, payload: &[u8], want: usize) -> Result<(), FrameError> {
    if payload.len() != want {
        return Err(FrameError::BadLength { kind, length: payload.len() });
    }
    Ok(())
}

/// Checks `payload` has at least `min` bytes and starts with a non-zero stream id; returns the id
/// and the bytes after it.
fn stream_prefix<'a>(
    kind: &'static str,
    payload: &'a [u8],
    min: usize,
) -> Result<(u32, &'a [u8]), FrameError> {
    if payload.len() < min {
        return Err(FrameError::BadLength { kind, length: payload.len() });
    }
    let id = read_u32(payload) & MAX_STREAM_ID;
    if id == 0 {
        return Err(FrameError::ZeroStreamId { kind });
    }
    Ok((id, &payload[4..]))
}
