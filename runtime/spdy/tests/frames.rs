//! The frame codec: round trips of every frame type, incremental decoding, malformed input, and
//! frames compressed by an independent zlib.

use bytes::{Bytes, BytesMut};
use podvisor_spdy::frame::{flags, frame_type, rst, Setting};
use podvisor_spdy::{Frame, FrameDecoder, FrameEncoder, FrameError, Headers, MAX_HEADER_BLOCK};

fn h(pairs: &[(&str, &str)]) -> Headers {
    pairs.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect()
}

fn every_frame_type() -> Vec<Frame> {
    vec![
        Frame::SynStream {
            stream_id: 1,
            associated_id: 0,
            priority: 0,
            slot: 0,
            fin: false,
            unidirectional: false,
            headers: h(&[("streamtype", "error")]),
        },
        Frame::SynStream {
            stream_id: 0x7fff_ffff,
            associated_id: 7,
            priority: 7,
            slot: 3,
            fin: true,
            unidirectional: true,
            headers: h(&[("streamtype", "stdin"), ("x", "a"), ("x", "b"), ("empty", "")]),
        },
        Frame::SynReply { stream_id: 1, fin: false, headers: h(&[]) },
        Frame::SynReply { stream_id: 3, fin: true, headers: h(&[("status", "200")]) },
        Frame::RstStream { stream_id: 5, status: rst::CANCEL },
        Frame::Settings {
            clear: true,
            entries: vec![
                Setting { flags: 1, id: 4, value: 100 },
                Setting { flags: 0, id: 7, value: 65_536 },
            ],
        },
        Frame::Settings { clear: false, entries: vec![] },
        Frame::Ping { id: 1 },
        Frame::Ping { id: u32::MAX },
        Frame::GoAway { last_good_stream_id: 9, status: 0 },
        Frame::Headers { stream_id: 11, fin: true, headers: h(&[("trailer", "yes")]) },
        Frame::WindowUpdate { stream_id: 0, delta: 0x7fff_ffff },
        Frame::Data { stream_id: 1, fin: false, data: Bytes::from_static(b"hello") },
        Frame::Data { stream_id: 3, fin: true, data: Bytes::new() },
        Frame::Data { stream_id: 13, fin: false, data: Bytes::from(vec![0xa5; 70_000]) },
        Frame::Unknown { frame_type: 10, flags: 0, payload: Bytes::from_static(b"credential") },
    ]
}

#[test]
fn every_frame_type_round_trips_on_one_connection() {
    let frames = every_frame_type();
    let mut enc = FrameEncoder::new();
    let mut dec = FrameDecoder::new(MAX_HEADER_BLOCK);
    let mut wire = BytesMut::new();
    for frame in &frames {
        enc.encode(frame, &mut wire).unwrap();
    }
    let mut back = Vec::new();
    while let Some(frame) = dec.decode(&mut wire).unwrap() {
        back.push(frame);
    }
    assert!(wire.is_empty());
    dec.decode_eof(&wire).unwrap();
    assert_eq!(back, frames);
}

#[test]
fn decoding_byte_by_byte_gives_the_same_frames() {
    let frames = every_frame_type();
    let mut enc = FrameEncoder::new();
    let mut wire = BytesMut::new();
    for frame in &frames {
        enc.encode(frame, &mut wire).unwrap();
    }
    let mut dec = FrameDecoder::new(MAX_HEADER_BLOCK);
    let mut buf = BytesMut::new();
    let mut back = Vec::new();
    for byte in wire.iter() {
        buf.extend_from_slice(&[*byte]);
        while let Some(frame) = dec.decode(&mut buf).unwrap() {
            back.push(frame);
        }
    }
    assert_eq!(back, frames);
}

#[test]
fn wire_layout_matches_the_spec() {
    let mut enc = FrameEncoder::new();
    let mut wire = BytesMut::new();
    enc.encode(&Frame::Ping { id: 0x0102_0304 }, &mut wire).unwrap();
    assert_eq!(&wire[..], &[0x80, 0x03, 0x00, 0x06, 0x00, 0x00, 0x00, 0x04, 1, 2, 3, 4]);
    wire.clear();
    enc.encode(&Frame::RstStream { stream_id: 3, status: 5 }, &mut wire).unwrap();
    assert_eq!(&wire[..], &[0x80, 3, 0, 3, 0, 0, 0, 8, 0, 0, 0, 3, 0, 0, 0, 5]);
    wire.clear();
    enc.encode(
        &Frame::Data { stream_id: 3, fin: true, data: Bytes::from_static(b"ab") },
        &mut wire,
    )
    .unwrap();
    assert_eq!(&wire[..], &[0, 0, 0, 3, flags::FIN, 0, 0, 2, b'a', b'b']);
    wire.clear();
    enc.encode(&Frame::GoAway { last_good_stream_id: 7, status: 1 }, &mut wire).unwrap();
    assert_eq!(&wire[..], &[0x80, 3, 0, 7, 0, 0, 0, 8, 0, 0, 0, 7, 0, 0, 0, 1]);
    wire.clear();
    enc.encode(&Frame::WindowUpdate { stream_id: 1, delta: 2 }, &mut wire).unwrap();
    assert_eq!(&wire[..], &[0x80, 3, 0, 9, 0, 0, 0, 8, 0, 0, 0, 1, 0, 0, 0, 2]);
    wire.clear();
    let syn = Frame::SynStream {
        stream_id: 1,
        associated_id: 0,
        priority: 2,
        slot: 0,
        fin: true,
        unidirectional: true,
        headers: h(&[]),
    };
    enc.encode(&syn, &mut wire).unwrap();
    assert_eq!(&wire[..4], &[0x80, 3, 0, frame_type::SYN_STREAM as u8]);
    assert_eq!(wire[4], flags::FIN | flags::UNIDIRECTIONAL);
    assert_eq!(&wire[8..18], &[0, 0, 0, 1, 0, 0, 0, 0, 2 << 5, 0]);
    // The first block opens a zlib stream naming the SPDY dictionary: 78 xx, then DICTID.
    assert_eq!(wire[18], 0x78);
    assert_eq!(&wire[20..24], &[0xe3, 0xc6, 0xa7, 0xc2]);
}

#[test]
fn encoder_rejects_values_that_do_not_fit() {
    let mut enc = FrameEncoder::new();
    let mut wire = BytesMut::new();
    let too_big_id = Frame::RstStream { stream_id: 0x8000_0000, status: 1 };
    assert!(matches!(enc.encode(&too_big_id, &mut wire), Err(FrameError::FieldOverflow { .. })));
    let data = Frame::Data { stream_id: 1, fin: false, data: Bytes::from(vec![0; 1 << 24]) };
    assert!(matches!(enc.encode(&data, &mut wire), Err(FrameError::FieldOverflow { .. })));
    let priority = Frame::SynStream {
        stream_id: 1,
        associated_id: 0,
        priority: 8,
        slot: 0,
        fin: false,
        unidirectional: false,
        headers: h(&[]),
    };
    assert!(enc.encode(&priority, &mut wire).is_err());
    assert!(wire.is_empty(), "nothing written for rejected frames");
}

fn decode_all(bytes: &[u8]) -> Result<Vec<Frame>, FrameError> {
    let mut dec = FrameDecoder::new(MAX_HEADER_BLOCK);
    let mut buf = BytesMut::from(bytes);
    let mut out = Vec::new();
    while let Some(frame) = dec.decode(&mut buf)? {
        out.push(frame);
    }
    dec.decode_eof(&buf)?;
    Ok(out)
}

#[test]
fn malformed_frames_are_errors_not_panics() {
    // SPDY/2 control frame.
    assert_eq!(
        decode_all(&[0x80, 0x02, 0, 6, 0, 0, 0, 4, 0, 0, 0, 1]),
        Err(FrameError::UnsupportedVersion(2))
    );
    // A bad version is seen from the header alone, before the (bogus) payload arrives.
    let mut dec = FrameDecoder::new(MAX_HEADER_BLOCK);
    let mut buf = BytesMut::from(&[0x80u8, 0x07, 0, 1, 0, 0xff, 0xff, 0xff][..]);
    assert_eq!(dec.decode(&mut buf), Err(FrameError::UnsupportedVersion(7)));
    // Fixed-size frames of the wrong size.
    assert!(matches!(
        decode_all(&[0x80, 3, 0, 6, 0, 0, 0, 3, 0, 0, 1]),
        Err(FrameError::BadLength { kind: "PING", .. })
    ));
    assert!(decode_all(&[0x80, 3, 0, 3, 0, 0, 0, 4, 0, 0, 0, 1]).is_err());
    assert!(decode_all(&[0x80, 3, 0, 7, 0, 0, 0, 4, 0, 0, 0, 1]).is_err());
    assert!(decode_all(&[0x80, 3, 0, 9, 0, 0, 0, 0]).is_err());
    // SETTINGS whose count disagrees with its length (and a huge count).
    assert!(decode_all(&[0x80, 3, 0, 4, 0, 0, 0, 4, 0, 0, 0, 1]).is_err());
    assert!(decode_all(&[
        0x80, 3, 0, 4, 0, 0, 0, 12, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 1, 0, 0, 0, 1
    ])
    .is_err());
    // SYN_STREAM too short for its fixed fields, and for stream 0.
    assert!(decode_all(&[0x80, 3, 0, 1, 0, 0, 0, 2, 0, 0]).is_err());
    assert!(matches!(
        decode_all(&[0x80, 3, 0, 1, 0, 0, 0, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
        Err(FrameError::ZeroStreamId { .. })
    ));
    // SYN_STREAM whose header block is not zlib.
    assert!(matches!(
        decode_all(&[0x80, 3, 0, 1, 0, 0, 0, 14, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4]),
        Err(FrameError::Decompress(_))
    ));
    // DATA for stream 0.
    assert!(matches!(decode_all(&[0, 0, 0, 0, 0, 0, 0, 0]), Err(FrameError::ZeroStreamId { .. })));
    // Truncated: a header alone, and part of a payload.
    assert_eq!(decode_all(&[0x80, 3, 0]), Err(FrameError::Truncated { have: 3, need: 8 }));
    assert_eq!(
        decode_all(&[0, 0, 0, 1, 0, 0, 0, 5, b'a']),
        Err(FrameError::Truncated { have: 9, need: 13 })
    );
}

#[test]
fn oversized_header_blocks_are_rejected() {
    let mut enc = FrameEncoder::new();
    let mut wire = BytesMut::new();
    let big = Frame::SynStream {
        stream_id: 1,
        associated_id: 0,
        priority: 0,
        slot: 0,
        fin: false,
        unidirectional: false,
        headers: h(&[("cookie", &"z".repeat(MAX_HEADER_BLOCK))]),
    };
    enc.encode(&big, &mut wire).unwrap();
    assert!(wire.len() < 4096, "the block compresses well: {} bytes", wire.len());
    assert_eq!(decode_all(&wire), Err(FrameError::HeaderBlockTooLarge { limit: MAX_HEADER_BLOCK }));
}

/// Three SYN_STREAMs as spdystream frames them (priority 0, slot 0, header names lowercased, one
/// zlib stream at level 9 with the SPDY/3 dictionary, a sync flush after each block), the
/// headers of a remotecommand `error` and `stdin` stream and a port-forward `data` stream. The
/// bytes come from CPython's zlib module (the system zlib, an implementation independent of the
/// one this crate uses), not from this crate.
const FOREIGN_SYN_STREAMS: &str = concat!(
    "80030001000000280000000100000000000078f9e3c6a7c202a62346703a2b29",
    "4a4dcc851625aca9a08006000000ffff80030001000000170000000300000000",
    "0000c22e555c02cc2e00000000ffff800300010000002e000000050000000000",
    "0002255548a95d04ce2016061606409ab30812cb99a0d4cf6880a11954442502",
    "000000ffff",
);

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

#[test]
fn decodes_syn_streams_compressed_by_another_zlib() {
    let frames = decode_all(&unhex(FOREIGN_SYN_STREAMS)).unwrap();
    let syn = |stream_id, headers| Frame::SynStream {
        stream_id,
        associated_id: 0,
        priority: 0,
        slot: 0,
        fin: false,
        unidirectional: false,
        headers,
    };
    assert_eq!(
        frames,
        vec![
            syn(1, h(&[("streamtype", "error")])),
            syn(3, h(&[("streamtype", "stdin")])),
            syn(5, h(&[("port", "8080"), ("requestid", "0"), ("streamtype", "data")])),
        ]
    );
}
