//! The WebSocket transport of the streaming server (`crictl --transport websocket`, critest
//! `-websocket-*`): the RFC 6455 handshake on hyper's upgrade (tungstenite does the framing),
//! and [`WebSocketIo`], a byte stream over binary messages for protocols that tunnel one
//! (`SPDY/3.1+portforward.k8s.io`: the SPDY session runs on it unchanged).

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use futures::{Sink, Stream};
use hyper::header::{HeaderMap, HeaderValue};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

/// The largest message we take from a client: as large as a SPDY frame can be (24-bit
/// length), far more than any client sends in one (client-go writes 32 KiB at most).
pub const MAX_MESSAGE: usize = 16 * 1024 * 1024;

/// Why a WebSocket upgrade request is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HandshakeError {
    #[error("Sec-WebSocket-Version must be 13")]
    Version,
    #[error("Sec-WebSocket-Key is required")]
    Key,
}

/// Whether the request asks for a WebSocket upgrade.
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers
        .get_all(hyper::header::UPGRADE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|v| v.trim().eq_ignore_ascii_case("websocket"))
}

/// The `Sec-WebSocket-Accept` value that answers the request's key.
pub fn accept_key(headers: &HeaderMap) -> Result<HeaderValue, HandshakeError> {
    let version = headers.get(hyper::header::SEC_WEBSOCKET_VERSION);
    if version.is_none_or(|v| v.as_bytes() != b"13") {
        return Err(HandshakeError::Version);
    }
    let key = headers.get(hyper::header::SEC_WEBSOCKET_KEY).ok_or(HandshakeError::Key)?;
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    // Base64 text: always a valid header value.
    HeaderValue::from_str(&accept).map_err(|_| HandshakeError::Key)
}

/// Limits on what a client may send.
pub fn config() -> WebSocketConfig {
    WebSocketConfig::default().max_message_size(Some(MAX_MESSAGE)).max_frame_size(Some(MAX_MESSAGE))
}

/// The close frame that ends a session normally (client-go takes only 1000 as a clean end).
pub fn normal_close() -> Message {
    Message::Close(Some(CloseFrame { code: CloseCode::Normal, reason: "".into() }))
}

/// A byte stream over a WebSocket: what is written goes out as binary messages (one per
/// write), what binary messages carry is read back with their boundaries ignored. The peer's
/// close frame (or hang-up) is the end of the stream; shutting down sends a normal close.
pub struct WebSocketIo<S> {
    ws: WebSocketStream<S>,
    /// What is left of the last message read.
    unread: Bytes,
    read_done: bool,
    close_sent: bool,
}

impl<S> WebSocketIo<S> {
    pub fn new(ws: WebSocketStream<S>) -> Self {
        Self { ws, unread: Bytes::new(), read_done: false, close_sent: false }
    }
}

fn io_error(e: tungstenite::Error) -> io::Error {
    match e {
        tungstenite::Error::Io(e) => e,
        e => io::Error::other(e),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WebSocketIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        while this.unread.is_empty() && !this.read_done {
            match ready!(Pin::new(&mut this.ws).poll_next(cx)) {
                Some(Ok(Message::Binary(data))) => this.unread = data,
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "a text message in a binary stream",
                    )))
                }
                // Pings are answered by tungstenite itself.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Close(_))) | None => this.read_done = true,
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
            }
        }
        let n = this.unread.len().min(buf.remaining());
        buf.put_slice(&this.unread[..n]);
        this.unread.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WebSocketIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let ws = Pin::new(&mut self.ws);
        ready!(ws.poll_ready(cx)).map_err(io_error)?;
        let message = Message::Binary(Bytes::copy_from_slice(buf));
        Pin::new(&mut self.ws).start_send(message).map_err(io_error)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws).poll_flush(cx).map_err(io_error)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // A connection the peer has closed already is as shut down as it gets.
        let settled = |result: Result<(), tungstenite::Error>| match result {
            Err(e) if !is_closed(&e) => Err(io_error(e)),
            _ => Ok(()),
        };
        if !self.close_sent {
            if let Err(e) = ready!(Pin::new(&mut self.ws).poll_ready(cx)) {
                return Poll::Ready(settled(Err(e)));
            }
            self.close_sent = true;
            settled(Pin::new(&mut self.ws).start_send(normal_close()))?;
        }
        Pin::new(&mut self.ws).poll_flush(cx).map(settled)
    }
}

/// Whether the error only says the connection is closed (by us, the peer, or both).
fn is_closed(e: &tungstenite::Error) -> bool {
    use tungstenite::error::ProtocolError;
    matches!(
        e,
        tungstenite::Error::ConnectionClosed
            | tungstenite::Error::AlreadyClosed
            | tungstenite::Error::Protocol(ProtocolError::SendAfterClosing)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{SinkExt, StreamExt};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio_tungstenite::tungstenite::protocol::Role;

    async fn pair() -> (WebSocketIo<DuplexStream>, WebSocketStream<DuplexStream>) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let server = WebSocketStream::from_raw_socket(a, Role::Server, Some(config())).await;
        let client = WebSocketStream::from_raw_socket(b, Role::Client, None).await;
        (WebSocketIo::new(server), client)
    }

    #[test]
    fn the_accept_key_is_rfc_6455s() {
        let mut headers = HeaderMap::new();
        headers.insert("sec-websocket-key", HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="));
        assert_eq!(accept_key(&headers), Err(HandshakeError::Version));
        headers.insert("sec-websocket-version", HeaderValue::from_static("13"));
        assert_eq!(accept_key(&headers).unwrap(), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        headers.remove("sec-websocket-key");
        assert_eq!(accept_key(&headers), Err(HandshakeError::Key));
    }

    #[test]
    fn upgrades_are_recognised_in_any_case() {
        let mut headers = HeaderMap::new();
        assert!(!is_upgrade(&headers));
        headers.insert("upgrade", HeaderValue::from_static("SPDY/3.1"));
        assert!(!is_upgrade(&headers));
        headers.insert("upgrade", HeaderValue::from_static("WebSocket"));
        assert!(is_upgrade(&headers));
    }

    #[tokio::test]
    async fn bytes_cross_message_boundaries_both_ways() {
        let (mut io, mut client) = pair().await;
        for part in [&b"hel"[..], b"", b"lo wor", b"ld"] {
            client.send(Message::Binary(Bytes::copy_from_slice(part))).await.unwrap();
        }
        client.send(Message::Ping(Bytes::from_static(b"p"))).await.unwrap();
        let mut got = vec![0u8; 11];
        io.read_exact(&mut got).await.unwrap();
        assert_eq!(got, b"hello world");

        io.write_all(b"back").await.unwrap();
        io.flush().await.unwrap();
        let mut back = Vec::new();
        while back.len() < 4 {
            match client.next().await.unwrap().unwrap() {
                Message::Binary(data) => back.extend_from_slice(&data),
                Message::Pong(_) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(back, b"back");
    }

    #[tokio::test]
    async fn a_close_is_the_end_of_the_stream_and_shutdown_closes_normally() {
        let (mut io, mut client) = pair().await;
        client.send(Message::Binary(Bytes::from_static(b"last"))).await.unwrap();
        client.send(normal_close()).await.unwrap();
        let mut got = Vec::new();
        io.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"last");
        io.shutdown().await.unwrap();
        let frame = client.next().await.unwrap().unwrap();
        let Message::Close(Some(frame)) = frame else { panic!("{frame:?}") };
        assert_eq!(frame.code, CloseCode::Normal);
    }

    #[tokio::test]
    async fn a_spdy_session_runs_unchanged_over_the_messages() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let server = WebSocketStream::from_raw_socket(a, Role::Server, Some(config())).await;
        let client = WebSocketStream::from_raw_socket(b, Role::Client, None).await;
        let (server, mut incoming) = podvisor_spdy::Session::server(WebSocketIo::new(server));
        let (client, _) = podvisor_spdy::Session::client(WebSocketIo::new(client));
        let echo = tokio::spawn(async move {
            let mut stream = incoming.next().await.unwrap();
            stream.reply(Vec::new(), false).await.unwrap();
            let writer = stream.writer();
            while let Some(data) = stream.read().await {
                writer.write(&data).await.unwrap();
            }
            writer.close().await.unwrap();
            server
        });
        let headers = vec![("streamtype".to_string(), "data".to_string())];
        let mut stream = client.open_stream(headers, false).await.unwrap();
        let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let writer = stream.writer();
        let send = async {
            for chunk in payload.chunks(40_000) {
                writer.write(chunk).await.unwrap();
            }
            writer.close().await.unwrap();
        };
        let receive = async {
            let mut got = Vec::new();
            while let Some(data) = stream.read().await {
                got.extend_from_slice(&data);
            }
            got
        };
        let ((), got) = tokio::join!(send, receive);
        assert!(got == payload, "{} bytes back", got.len());
        client.close().await;
        echo.await.unwrap().closed().await.unwrap();
    }

    #[tokio::test]
    async fn text_in_a_byte_stream_is_an_error_not_a_panic() {
        let (mut io, mut client) = pair().await;
        client.send(Message::text("hi")).await.unwrap();
        let mut buf = [0u8; 8];
        let err = io.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn an_oversized_message_ends_the_stream_with_an_error() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let small = WebSocketConfig::default().max_message_size(Some(16)).max_frame_size(Some(16));
        let server = WebSocketStream::from_raw_socket(a, Role::Server, Some(small)).await;
        let mut client = WebSocketStream::from_raw_socket(b, Role::Client, None).await;
        let mut io = WebSocketIo::new(server);
        let sending = tokio::spawn(async move {
            let _ = client.send(Message::Binary(Bytes::from(vec![7u8; 1024]))).await;
            client
        });
        let mut buf = vec![0u8; 2048];
        assert!(io.read(&mut buf).await.is_err());
        drop(sending.await);
    }
}
