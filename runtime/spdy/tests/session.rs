//! Sessions over an in-memory duplex: a server and a client `Session` talking to each other, and
//! a server `Session` driven frame by frame from a raw client.

use std::future::Future;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use podvisor_spdy::frame::{goaway, rst};
use podvisor_spdy::{
    Frame, FrameDecoder, FrameEncoder, FrameError, Headers, Incoming, Session, SpdyError, Stream,
    MAX_HEADER_BLOCK, MAX_PEER_STREAMS,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::time::timeout;

const LIMIT: Duration = Duration::from_secs(30);

/// Runs a test body with a deadline, so that a hang fails instead of stalling the suite.
async fn bounded<F: Future<Output = ()>>(body: F) {
    timeout(LIMIT, body).await.expect("test timed out");
}

fn h(pairs: &[(&str, &str)]) -> Headers {
    pairs.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect()
}

fn pair() -> ((Session, Incoming), (Session, Incoming)) {
    let (a, b) = tokio::io::duplex(64 * 1024);
    (Session::server(a), Session::client(b))
}

async fn read_all(stream: &mut Stream) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(chunk) = stream.read().await {
        out.extend_from_slice(&chunk);
    }
    out
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect()
}

/// A client that speaks frames by hand, to see exactly what the server sends.
struct Raw {
    io: DuplexStream,
    enc: FrameEncoder,
    dec: FrameDecoder,
    buf: BytesMut,
}

impl Raw {
    fn new(io: DuplexStream) -> Self {
        Raw {
            io,
            enc: FrameEncoder::new(),
            dec: FrameDecoder::new(MAX_HEADER_BLOCK),
            buf: BytesMut::new(),
        }
    }

    async fn send(&mut self, frame: Frame) {
        let mut wire = BytesMut::new();
        self.enc.encode(&frame, &mut wire).unwrap();
        self.io.write_all(&wire).await.unwrap();
    }

    /// The next frame, `None` at EOF, `Err` if nothing comes within `wait`.
    async fn recv_within(&mut self, wait: Duration) -> Result<Option<Frame>, ()> {
        timeout(wait, async {
            loop {
                if let Some(frame) = self.dec.decode(&mut self.buf).unwrap() {
                    return Some(frame);
                }
                match self.io.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        })
        .await
        .map_err(|_| ())
    }

    async fn recv(&mut self) -> Option<Frame> {
        self.recv_within(Duration::from_secs(10)).await.expect("no frame from the server")
    }

    async fn syn(&mut self, stream_id: u32, headers: Headers, fin: bool) {
        self.send(Frame::SynStream {
            stream_id,
            associated_id: 0,
            priority: 0,
            slot: 0,
            fin,
            unidirectional: false,
            headers,
        })
        .await;
    }
}

fn raw_server() -> (Session, Incoming, Raw) {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let (server, incoming) = Session::server(a);
    (server, incoming, Raw::new(b))
}

#[tokio::test]
async fn three_streams_with_headers_replies_and_data_both_ways() {
    bounded(async {
        let ((server, mut incoming), (client, _client_incoming)) = pair();
        let server_task = tokio::spawn(async move {
            let mut handled = Vec::new();
            for _ in 0..3 {
                let mut stream = incoming.next().await.expect("a stream");
                let kind = stream.header("streamtype").unwrap().to_owned();
                handled.push((stream.id(), kind.clone()));
                tokio::spawn(async move {
                    stream.reply(h(&[("accepted", &kind)]), false).await.unwrap();
                    let w = stream.writer();
                    // Echo, uppercased, until the client half-closes; then say goodbye.
                    while let Some(data) = stream.read().await {
                        w.write(&data.to_ascii_uppercase()).await.unwrap();
                    }
                    w.write(format!("bye {kind}").as_bytes()).await.unwrap();
                    w.close().await.unwrap();
                });
            }
            drop(server);
            handled
        });
        let mut streams = Vec::new();
        for kind in ["stdin", "stdout", "stderr"] {
            let stream = client
                .open_stream(h(&[("streamtype", kind), ("x-extra", "1"), ("x-extra", "2")]), false)
                .await
                .unwrap();
            assert_eq!(stream.header("accepted"), Some(kind));
            assert_eq!(stream.headers(), &h(&[("accepted", kind)]));
            streams.push((kind, stream));
        }
        assert_eq!(streams.iter().map(|(_, s)| s.id()).collect::<Vec<_>>(), vec![1, 3, 5]);
        for (kind, stream) in &mut streams {
            let w = stream.writer();
            w.write(format!("hello {kind}").as_bytes()).await.unwrap();
            assert_eq!(stream.read().await.unwrap(), format!("HELLO {}", kind.to_uppercase()));
            w.close().await.unwrap();
            assert_eq!(read_all(stream).await, format!("bye {kind}").into_bytes());
            assert_eq!(
                w.write(b"more").await.unwrap_err().to_string(),
                format!("stream {} is closed for writing", stream.id())
            );
        }
        let handled = server_task.await.unwrap();
        assert_eq!(handled, vec![(1, "stdin".into()), (3, "stdout".into()), (5, "stderr".into())]);
        // Streams closed both ways are forgotten; the session goes on.
        client.ping().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn finished_streams_are_forgotten() {
    bounded(async {
        let ((_server, mut incoming), (client, _)) = pair();
        let n = 3 * MAX_PEER_STREAMS;
        let server_task = tokio::spawn(async move {
            for _ in 0..n {
                let mut stream = incoming.next().await.unwrap();
                stream.reply(h(&[]), true).await.unwrap();
                assert_eq!(stream.read().await, None);
            }
        });
        // Each stream is closed both ways as soon as it is replied to; were closed streams kept,
        // the server would refuse the 129th.
        for _ in 0..n {
            let mut stream = client.open_stream(h(&[("streamtype", "error")]), true).await.unwrap();
            assert_eq!(stream.read().await, None);
        }
        server_task.await.unwrap();
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn close_does_not_hang_on_a_peer_that_stops_reading() {
    bounded(async {
        let (server, mut incoming, mut raw) = raw_server();
        raw.syn(1, h(&[]), false).await;
        let stream = incoming.next().await.unwrap();
        stream.reply(h(&[]), false).await.unwrap();
        // Fill the pipe (64 KiB) and the writer's queue; the raw client never reads.
        let w = stream.writer();
        let writing = tokio::spawn(async move { w.write(&noise(4 << 20, 5)).await });
        tokio::time::sleep(Duration::from_secs(1)).await;
        server.close().await;
        assert!(server.is_closed());
        assert!(matches!(writing.await.unwrap(), Err(SpdyError::SessionClosed)));
        drop(raw);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_mebibyte_each_way_arrives_byte_identical() {
    bounded(async {
        let ((_server, mut incoming), (client, _)) = pair();
        let up = noise(1 << 20, 1);
        let down = noise(1 << 20, 2);
        let (up2, down2) = (up.clone(), down.clone());
        let server_task = tokio::spawn(async move {
            let mut stream = incoming.next().await.unwrap();
            stream.reply(h(&[]), false).await.unwrap();
            let w = stream.writer();
            // Write while reading: neither direction may wait for the other (no flow control).
            let writer = tokio::spawn(async move {
                w.write(&down2).await.unwrap();
                w.close().await.unwrap();
            });
            let got = read_all(&mut stream).await;
            writer.await.unwrap();
            assert!(got == up2, "upload differs ({} bytes)", got.len());
        });
        let mut stream = client.open_stream(h(&[("streamtype", "data")]), false).await.unwrap();
        let w = stream.writer();
        let writer = tokio::spawn(async move {
            w.write(&up).await.unwrap();
            w.close().await.unwrap();
        });
        let got = read_all(&mut stream).await;
        assert!(got == down, "download differs ({} bytes)", got.len());
        writer.await.unwrap();
        server_task.await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn half_close_ends_one_direction_only() {
    bounded(async {
        let ((server, mut incoming), (client, _)) = pair();
        let ours = client.open_stream(h(&[("streamtype", "stdin")]), false);
        tokio::pin!(ours);
        let mut theirs = tokio::select! {
            s = incoming.next() => s.unwrap(),
            _ = &mut ours => panic!("replied before the server did"),
        };
        theirs.reply(h(&[]), false).await.unwrap();
        let mut ours = ours.await.unwrap();
        // stdin, then EOF: an empty DATA with FIN.
        ours.writer().write(b"input").await.unwrap();
        ours.writer().close().await.unwrap();
        assert_eq!(read_all(&mut theirs).await, b"input");
        assert_eq!(theirs.read().await, None, "stays at EOF");
        // The other direction and the session carry on.
        theirs.writer().write(b"output after stdin EOF").await.unwrap();
        assert_eq!(ours.read().await.unwrap(), &b"output after stdin EOF"[..]);
        assert!(!server.is_closed() && !client.is_closed());
        client.ping().await.unwrap();
        theirs.writer().close().await.unwrap();
        assert_eq!(ours.read().await, None);
        // `close` twice is harmless.
        theirs.writer().close().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn open_stream_with_fin_is_half_closed_at_once() {
    bounded(async {
        let ((_server, mut incoming), (client, _)) = pair();
        let server_task = tokio::spawn(async move {
            let mut stream = incoming.next().await.unwrap();
            assert_eq!(stream.read().await, None, "the SYN_STREAM carried FIN");
            stream.reply(h(&[]), false).await.unwrap();
            stream.writer().write(b"error text").await.unwrap();
            stream.writer().close().await.unwrap();
        });
        let mut stream = client.open_stream(h(&[("streamtype", "error")]), true).await.unwrap();
        assert!(matches!(
            stream.writer().write(b"x").await,
            Err(SpdyError::StreamClosed { stream_id: 1 })
        ));
        assert_eq!(read_all(&mut stream).await, b"error text");
        server_task.await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn reset_ends_both_directions() {
    bounded(async {
        let ((_server, mut incoming), (client, _)) = pair();
        let opening = tokio::spawn({
            let client = client.clone();
            async move { client.open_stream(h(&[("streamtype", "data")]), false).await }
        });
        let mut theirs = incoming.next().await.unwrap();
        // Writing before the reply is refused locally.
        assert!(matches!(theirs.writer().write(b"x").await, Err(SpdyError::NotReplied { .. })));
        theirs.reply(h(&[]), false).await.unwrap();
        assert!(matches!(
            theirs.reply(h(&[]), false).await,
            Err(SpdyError::Reply { reason: "already replied", .. })
        ));
        let mut ours = opening.await.unwrap().unwrap();
        ours.writer().write(b"before").await.unwrap();
        assert_eq!(theirs.read().await.unwrap(), &b"before"[..]);
        theirs.writer().reset(rst::CANCEL).await.unwrap();
        assert_eq!(theirs.read().await, None);
        assert_eq!(ours.read().await, None);
        assert_eq!(ours.reset_status(), Some(rst::CANCEL));
        assert!(matches!(
            ours.writer().write(b"after").await,
            Err(SpdyError::Reset { stream_id: 1, status: rst::CANCEL })
        ));
        assert!(matches!(theirs.writer().reset(0).await, Err(SpdyError::InvalidStatus)));

        // The client resets its own stream too.
        let opening = tokio::spawn({
            let client = client.clone();
            async move { client.open_stream(h(&[]), false).await }
        });
        let mut theirs = incoming.next().await.unwrap();
        theirs.reply(h(&[]), false).await.unwrap();
        let ours = opening.await.unwrap().unwrap();
        ours.writer().reset(rst::INTERNAL_ERROR).await.unwrap();
        assert_eq!(theirs.read().await, None);
        assert_eq!(theirs.reset_status(), Some(rst::INTERNAL_ERROR));
        client.ping().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn a_refused_stream_fails_open_stream() {
    bounded(async {
        let ((_server, mut incoming), (client, _)) = pair();
        let server_task = tokio::spawn(async move {
            let stream = incoming.next().await.unwrap();
            stream.writer().reset(rst::REFUSED_STREAM).await.unwrap();
            incoming
        });
        let err = client.open_stream(h(&[]), false).await.unwrap_err();
        assert!(
            matches!(err, SpdyError::Reset { stream_id: 1, status: rst::REFUSED_STREAM }),
            "{err:?}"
        );
        assert_eq!(err.to_string(), "stream 1 reset: REFUSED_STREAM");
        let _incoming = server_task.await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn dropping_every_handle_of_an_open_stream_resets_it() {
    bounded(async {
        let ((_server, mut incoming), (client, _)) = pair();
        let opening = tokio::spawn({
            let client = client.clone();
            async move { client.open_stream(h(&[]), false).await }
        });
        let theirs = incoming.next().await.unwrap();
        theirs.reply(h(&[]), false).await.unwrap();
        let mut ours = opening.await.unwrap().unwrap();
        drop(theirs);
        assert_eq!(ours.read().await, None);
        assert_eq!(ours.reset_status(), Some(rst::CANCEL));
    })
    .await;
}

#[tokio::test]
async fn ping_is_echoed() {
    bounded(async {
        let ((server, _incoming), (client, _)) = pair();
        for _ in 0..3 {
            let rtt = client.ping().await.unwrap();
            assert!(rtt < Duration::from_secs(5));
        }
        // The server pings too (the client has spoken by now).
        server.ping().await.unwrap();

        // Byte for byte: a raw client's PING comes back with the same id.
        let (_server, _incoming, mut raw) = raw_server();
        raw.send(Frame::Ping { id: 7 }).await;
        assert_eq!(raw.recv().await, Some(Frame::Ping { id: 7 }));
        // A PING of the server's parity is an answer, not a request: no echo.
        raw.send(Frame::Ping { id: 8 }).await;
        raw.send(Frame::Ping { id: 9 }).await;
        assert_eq!(raw.recv().await, Some(Frame::Ping { id: 9 }));
    })
    .await;
}

#[tokio::test]
async fn goaway_refuses_new_streams_and_keeps_open_ones() {
    bounded(async {
        let (server, mut incoming, mut raw) = raw_server();
        raw.syn(1, h(&[("streamtype", "stdout")]), false).await;
        let mut stream = incoming.next().await.unwrap();
        stream.reply(h(&[]), false).await.unwrap();
        server.goaway().await.unwrap();
        server.goaway().await.unwrap(); // once only
        assert!(matches!(raw.recv().await, Some(Frame::SynReply { stream_id: 1, .. })));
        assert_eq!(
            raw.recv().await,
            Some(Frame::GoAway { last_good_stream_id: 1, status: goaway::OK })
        );
        raw.syn(3, h(&[]), false).await;
        assert_eq!(
            raw.recv().await,
            Some(Frame::RstStream { stream_id: 3, status: rst::REFUSED_STREAM })
        );
        // Stream 1 still works both ways.
        raw.send(Frame::Data { stream_id: 1, fin: false, data: Bytes::from_static(b"in") }).await;
        assert_eq!(stream.read().await.unwrap(), &b"in"[..]);
        stream.writer().write(b"out").await.unwrap();
        assert_eq!(
            raw.recv().await,
            Some(Frame::Data { stream_id: 1, fin: false, data: Bytes::from_static(b"out") })
        );
        // No second GOAWAY went out.
        raw.send(Frame::Ping { id: 1 }).await;
        assert_eq!(raw.recv().await, Some(Frame::Ping { id: 1 }));

        // Session to session: once the client has the GOAWAY, it opens nothing more.
        let ((server, _si), (client, _ci)) = pair();
        client.ping().await.unwrap(); // the server may write now
        server.goaway().await.unwrap();
        let mut tries = 0;
        loop {
            match client.open_stream(h(&[]), false).await {
                Err(SpdyError::GoingAway) => break,
                // Raced the GOAWAY: refused by the server instead.
                Err(SpdyError::Reset { status: rst::REFUSED_STREAM, .. }) => {}
                other => panic!("{other:?}"),
            }
            tries += 1;
            assert!(tries < 100);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn the_server_sends_nothing_before_the_clients_first_frame() {
    bounded(async {
        let (server, _incoming, mut raw) = raw_server();
        // Things that would write at once if nothing held them back.
        let pinging = tokio::spawn({
            let server = server.clone();
            async move { server.ping().await }
        });
        let goaway = tokio::spawn({
            let server = server.clone();
            async move { server.goaway().await }
        });
        assert_eq!(
            raw.recv_within(Duration::from_millis(300)).await,
            Err(()),
            "server spoke first"
        );
        goaway.await.unwrap().unwrap();
        // The client speaks; now the queued frames flow.
        raw.send(Frame::Ping { id: 1 }).await;
        let mut got = Vec::new();
        for _ in 0..3 {
            got.push(raw.recv().await.unwrap());
        }
        assert!(got.contains(&Frame::Ping { id: 1 }), "{got:?}");
        assert!(got.contains(&Frame::GoAway { last_good_stream_id: 0, status: goaway::OK }));
        let Some(Frame::Ping { id }) = got
            .iter()
            .find(|f| **f != Frame::Ping { id: 1 } && matches!(f, Frame::Ping { .. }))
            .cloned()
        else {
            panic!("no server ping in {got:?}")
        };
        assert_eq!(id % 2, 0, "server pings are even");
        raw.send(Frame::Ping { id }).await;
        pinging.await.unwrap().unwrap();
    })
    .await;
}

#[tokio::test]
async fn close_flushes_queued_output_then_ends() {
    bounded(async {
        let ((server, mut incoming), (client, _)) = pair();
        let server_task = tokio::spawn(async move {
            let stream = incoming.next().await.unwrap();
            stream.reply(h(&[]), false).await.unwrap();
            let w = stream.writer();
            w.write(&noise(300_000, 3)).await.unwrap();
            w.close().await.unwrap();
            server.goaway().await.unwrap();
            server.close().await;
            assert!(server.is_closed());
            assert!(server.closed().await.is_ok());
            assert!(matches!(w.write(b"late").await, Err(SpdyError::SessionClosed)));
        });
        let mut stream = client.open_stream(h(&[]), true).await.unwrap();
        assert!(read_all(&mut stream).await == noise(300_000, 3));
        server_task.await.unwrap();
        // The server shut the connection: the client session ends cleanly.
        client.closed().await.unwrap();
        assert!(matches!(client.open_stream(h(&[]), false).await, Err(SpdyError::SessionClosed)));
        assert!(matches!(client.ping().await, Err(SpdyError::SessionClosed)));
    })
    .await;
}

#[tokio::test]
async fn peer_closing_the_connection_ends_streams_and_incoming() {
    bounded(async {
        let (server, mut incoming, mut raw) = raw_server();
        raw.syn(1, h(&[]), false).await;
        let mut stream = incoming.next().await.unwrap();
        drop(raw);
        assert_eq!(stream.read().await, None);
        assert!(incoming.next().await.is_none());
        server.closed().await.unwrap();
        assert!(matches!(stream.reply(h(&[]), false).await, Err(SpdyError::SessionClosed)));
    })
    .await;
}

async fn expect_protocol_error(server: &Session, raw: &mut Raw) -> FrameError {
    let err = server.closed().await.unwrap_err();
    // The server says why before it goes.
    let mut saw_goaway = false;
    while let Some(frame) = raw.recv().await {
        if let Frame::GoAway { status, .. } = frame {
            assert_eq!(status, goaway::PROTOCOL_ERROR);
            saw_goaway = true;
        }
    }
    assert!(saw_goaway, "no GOAWAY before the end");
    match err {
        SpdyError::Protocol(e) => e,
        other => panic!("not a protocol error: {other:?}"),
    }
}

#[tokio::test]
async fn bad_version_ends_the_session() {
    bounded(async {
        let (server, _incoming, mut raw) = raw_server();
        raw.io.write_all(&[0x80, 0x02, 0x00, 0x06, 0, 0, 0, 4, 0, 0, 0, 1]).await.unwrap();
        assert_eq!(
            expect_protocol_error(&server, &mut raw).await,
            FrameError::UnsupportedVersion(2)
        );
    })
    .await;
}

#[tokio::test]
async fn truncated_frame_ends_the_session() {
    bounded(async {
        let (server, _incoming, mut raw) = raw_server();
        raw.send(Frame::Ping { id: 1 }).await;
        assert_eq!(raw.recv().await, Some(Frame::Ping { id: 1 }));
        // Half a DATA frame, then the client's write side closes.
        raw.io.write_all(&[0, 0, 0, 1, 0, 0, 0, 10, b'x']).await.unwrap();
        raw.io.shutdown().await.unwrap();
        assert_eq!(
            expect_protocol_error(&server, &mut raw).await,
            FrameError::Truncated { have: 9, need: 18 }
        );
    })
    .await;
}

#[tokio::test]
async fn oversized_header_block_ends_the_session() {
    bounded(async {
        let (server, _incoming, mut raw) = raw_server();
        raw.syn(1, h(&[("cookie", &"c".repeat(100_000))]), false).await;
        assert_eq!(
            expect_protocol_error(&server, &mut raw).await,
            FrameError::HeaderBlockTooLarge { limit: MAX_HEADER_BLOCK }
        );
    })
    .await;
}

#[tokio::test]
async fn stream_ids_must_increase() {
    bounded(async {
        let (server, mut incoming, mut raw) = raw_server();
        raw.syn(5, h(&[]), false).await;
        let _first = incoming.next().await.unwrap();
        raw.syn(3, h(&[]), false).await;
        assert_eq!(
            expect_protocol_error(&server, &mut raw).await,
            FrameError::StreamIdOrder { id: 3, last: 5 }
        );
    })
    .await;
}

#[tokio::test]
async fn streams_beyond_the_limit_are_refused() {
    bounded(async {
        let (server, mut incoming, mut raw) = raw_server();
        let collector = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Some(stream) = incoming.next().await {
                held.push(stream);
                if held.len() == MAX_PEER_STREAMS {
                    break;
                }
            }
            (held, incoming)
        });
        for i in 0..=MAX_PEER_STREAMS as u32 {
            raw.syn(2 * i + 1, h(&[("n", &i.to_string())]), false).await;
        }
        let over = 2 * MAX_PEER_STREAMS as u32 + 1;
        assert_eq!(
            raw.recv().await,
            Some(Frame::RstStream { stream_id: over, status: rst::REFUSED_STREAM })
        );
        let (mut held, _incoming) = collector.await.unwrap();
        assert_eq!(held.len(), MAX_PEER_STREAMS);
        // A stream from the peer's parity mistake: a stream error, the session goes on.
        raw.syn(over + 1, h(&[]), false).await;
        assert_eq!(
            raw.recv().await,
            Some(Frame::RstStream { stream_id: over + 1, status: rst::PROTOCOL_ERROR })
        );
        // Finishing one stream frees a slot.
        let done = held.remove(0);
        done.reply(h(&[]), true).await.unwrap();
        assert!(matches!(raw.recv().await, Some(Frame::SynReply { stream_id: 1, fin: true, .. })));
        raw.send(Frame::Data { stream_id: 1, fin: true, data: Bytes::new() }).await;
        raw.syn(over + 2, h(&[]), false).await;
        raw.send(Frame::Ping { id: 1 }).await;
        assert_eq!(raw.recv().await, Some(Frame::Ping { id: 1 }), "no refusal for the new stream");
        assert!(!server.is_closed());
    })
    .await;
}

#[tokio::test]
async fn flow_control_frames_are_ignored_and_never_needed() {
    bounded(async {
        let (_server, mut incoming, mut raw) = raw_server();
        raw.send(Frame::Settings { clear: false, entries: vec![] }).await;
        raw.syn(1, h(&[]), false).await;
        raw.send(Frame::WindowUpdate { stream_id: 1, delta: 1 }).await;
        let stream = incoming.next().await.unwrap();
        stream.reply(h(&[]), false).await.unwrap();
        assert!(matches!(raw.recv().await, Some(Frame::SynReply { .. })));
        // Well past the 64 KiB initial window without a single WINDOW_UPDATE from the client.
        let data = noise(256 * 1024, 4);
        stream.writer().write(&data).await.unwrap();
        stream.writer().close().await.unwrap();
        let mut got = Vec::new();
        loop {
            match raw.recv().await {
                Some(Frame::Data { stream_id: 1, fin, data }) => {
                    assert!(data.len() <= podvisor_spdy::MAX_DATA_FRAME);
                    got.extend_from_slice(&data);
                    if fin {
                        break;
                    }
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(got == data);
    })
    .await;
}

#[tokio::test]
async fn garbage_never_panics() {
    bounded(async {
        // A valid conversation to mutate: SYN_STREAMs, data, pings.
        let mut enc = FrameEncoder::new();
        let mut valid = BytesMut::new();
        for i in 0..4u32 {
            let frame = Frame::SynStream {
                stream_id: 2 * i + 1,
                associated_id: 0,
                priority: 0,
                slot: 0,
                fin: false,
                unidirectional: false,
                headers: h(&[("streamtype", "stdin"), ("requestid", &i.to_string())]),
            };
            enc.encode(&frame, &mut valid).unwrap();
            let data = Frame::Data {
                stream_id: 2 * i + 1,
                fin: i % 2 == 0,
                data: Bytes::from(vec![i as u8; 40]),
            };
            enc.encode(&data, &mut valid).unwrap();
            enc.encode(&Frame::Ping { id: 2 * i + 1 }, &mut valid).unwrap();
        }
        for round in 0..64u64 {
            let mut bytes = valid.to_vec();
            let flips = noise(8, round + 100);
            for pair in flips.chunks(2) {
                let at = (usize::from(pair[0]) * 7 + round as usize * 13) % bytes.len();
                bytes[at] ^= pair[1] | 1;
            }
            if round % 4 == 0 {
                bytes = noise(200, round);
            }
            let (server, mut incoming, mut raw) = raw_server();
            let sink = tokio::spawn(async move {
                while let Some(mut s) = incoming.next().await {
                    let _ = s.reply(h(&[]), false).await;
                    tokio::spawn(async move { while s.read().await.is_some() {} });
                }
            });
            let _ = raw.io.write_all(&bytes).await;
            let _ = raw.io.shutdown().await;
            while raw.recv().await.is_some() {}
            // Whatever happened, the session ended and said how.
            let _ = server.closed().await;
            sink.await.unwrap();
        }
    })
    .await;
}

/// What port-forward's failure path does: text and FIN on one stream, then at once a reset of
/// another, every server handle dropped. The text must still reach the client.
#[tokio::test]
async fn data_queued_on_one_stream_survives_a_reset_of_another() {
    bounded(async {
        let ((_server, mut incoming), (client, _)) = pair();
        let open = |kind: &'static str| {
            let client = client.clone();
            tokio::spawn(async move { client.open_stream(h(&[("streamtype", kind)]), false).await })
        };
        let error_open = open("error");
        let error_theirs = incoming.next().await.unwrap();
        error_theirs.reply(h(&[]), false).await.unwrap();
        let mut error_ours = error_open.await.unwrap().unwrap();
        let data_open = open("data");
        let data_theirs = incoming.next().await.unwrap();
        data_theirs.reply(h(&[]), false).await.unwrap();
        let mut data_ours = data_open.await.unwrap().unwrap();
        let (error_writer, data_writer) = (error_theirs.writer(), data_theirs.writer());
        drop(error_theirs);
        drop(data_theirs);
        error_writer.write(b"refused").await.unwrap();
        error_writer.close().await.unwrap();
        data_writer.reset(rst::CANCEL).await.unwrap();
        drop(error_writer);
        drop(data_writer);
        assert_eq!(read_all(&mut error_ours).await, b"refused");
        assert_eq!(read_all(&mut data_ours).await, b"");
        assert_eq!(data_ours.reset_status(), Some(rst::CANCEL));
    })
    .await;
}
