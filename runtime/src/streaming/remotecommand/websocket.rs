//! remotecommand over WebSocket (`v5.channel.k8s.io`, `v4.channel.k8s.io`, and
//! `v4.base64.channel.k8s.io`): every message is one channel byte then its payload (0 stdin,
//! 1 stdout, 2 stderr, 3 the status, 4 resize JSON); v5 adds 255, whose payload names a
//! channel the client closes (stdin's half-close). The base64 variant sends text messages:
//! the channel as an ASCII digit, the payload in base64. The session ends with the status on
//! channel 3 and a normal close.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tracing::debug;

use super::{ClientInput, ClientOutput, Outcome, ResizeDecoder, TerminalSize, Want};
use crate::agent::OutputKind;
use crate::sandbox::SandboxManager;
use crate::streaming::tokens::StreamRequest;
use crate::streaming::websocket::normal_close;

/// The protocols we speak, in our order of preference; the client's order decides.
pub const PROTOCOLS: [&str; 3] =
    ["v5.channel.k8s.io", "v4.channel.k8s.io", "v4.base64.channel.k8s.io"];

const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const ERROR: u8 = 3;
const RESIZE: u8 = 4;
/// v5: the payload's first byte is a channel the client is done writing to.
const CLOSE: u8 = 255;

/// Client messages waiting for the process (stdin) or the terminal (resize).
const INPUT_QUEUE: usize = 16;
/// Messages waiting for the connection.
const OUTPUT_QUEUE: usize = 64;
/// How long the client has to answer our close, and the connection to take what is queued.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Why a client message carries nothing for a channel.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("an empty message has no channel")]
    Empty,
    #[error("{0:?} is not a base64 channel digit")]
    Base64Channel(char),
    #[error("the payload is not base64: {0}")]
    Base64Payload(#[from] base64::DecodeError),
}

/// What a client message is.
#[derive(Debug, PartialEq, Eq)]
pub(in crate::streaming) enum Inbound {
    Channel(u8, Bytes),
    /// The client's close frame.
    Closed,
    /// Ping, pong (tungstenite answers pings).
    Control,
}

/// How channel messages are framed (kubelet's WebSocket port-forward frames so too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::streaming) enum Framing {
    /// Binary messages, channel byte first. Text messages are taken the same way (the Python
    /// client sends text when it writes a `str`).
    Binary,
    /// Text messages: the channel as `'0' + n`, the payload in base64.
    Base64,
}

impl Framing {
    fn of(protocol: &str) -> Self {
        if protocol.contains(".base64.") {
            Self::Base64
        } else {
            Self::Binary
        }
    }

    pub(in crate::streaming) fn encode(self, channel: u8, payload: &[u8]) -> Message {
        match self {
            Self::Binary => {
                let mut message = Vec::with_capacity(payload.len() + 1);
                message.push(channel);
                message.extend_from_slice(payload);
                Message::Binary(message.into())
            }
            Self::Base64 => {
                let digit = char::from(b'0' + channel);
                let payload = base64::engine::general_purpose::STANDARD.encode(payload);
                Message::text(format!("{digit}{payload}"))
            }
        }
    }

    pub(in crate::streaming) fn decode(self, message: Message) -> Result<Inbound, FrameError> {
        let bytes = match message {
            Message::Binary(bytes) => bytes,
            Message::Text(text) => Bytes::from(text),
            Message::Close(_) => return Ok(Inbound::Closed),
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => return Ok(Inbound::Control),
        };
        let (&first, payload) = bytes.split_first().ok_or(FrameError::Empty)?;
        match self {
            Self::Binary => Ok(Inbound::Channel(first, bytes.slice(1..))),
            Self::Base64 => {
                let digit = char::from(first);
                let channel = digit
                    .to_digit(10)
                    .and_then(|d| u8::try_from(d).ok())
                    .ok_or(FrameError::Base64Channel(digit))?;
                let payload = base64::engine::general_purpose::STANDARD.decode(payload)?;
                Ok(Inbound::Channel(channel, payload.into()))
            }
        }
    }
}

/// Where the client's input goes while the session runs: dropping `stdin` is its EOF.
struct InputSenders {
    stdin: Option<mpsc::Sender<Bytes>>,
    resize: Option<mpsc::Sender<TerminalSize>>,
}

fn input_channels(want: Want) -> (ClientInput, InputSenders) {
    let (stdin_tx, stdin) = want.stdin.then(|| mpsc::channel(INPUT_QUEUE)).unzip();
    let (resize_tx, resize) = want.resize.then(|| mpsc::channel(INPUT_QUEUE)).unzip();
    let input = ClientInput {
        stdin: stdin.map(|rx| ReceiverStream::new(rx).boxed()),
        resize: resize.map(|rx| ReceiverStream::new(rx).boxed()),
    };
    (input, InputSenders { stdin: stdin_tx, resize: resize_tx })
}

/// Reads the client's messages and routes them to the channels until it closes or hangs up;
/// then says the client is gone.
async fn read_client<S>(
    mut messages: SplitStream<WebSocketStream<S>>,
    framing: Framing,
    closes_channels: bool,
    mut senders: InputSenders,
    gone: Arc<watch::Sender<bool>>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    while let Some(message) = messages.next().await {
        let message = match message {
            Ok(message) => message,
            Err(e) => {
                debug!(error = %e, "reading from the WebSocket client");
                break;
            }
        };
        match framing.decode(message) {
            Ok(Inbound::Channel(channel, payload)) => {
                route(&mut senders, closes_channels, channel, payload).await
            }
            Ok(Inbound::Closed) => break,
            Ok(Inbound::Control) => {}
            Err(e) => debug!(error = %e, "ignoring a client message"),
        }
    }
    gone.send_replace(true);
}

/// Takes one channel message from the client.
async fn route(senders: &mut InputSenders, closes_channels: bool, channel: u8, payload: Bytes) {
    match channel {
        STDIN if payload.is_empty() => {}
        STDIN => {
            // A process that no longer takes stdin drops the receiver: stop sending.
            if let Some(tx) = &senders.stdin {
                if tx.send(payload).await.is_err() {
                    senders.stdin = None;
                }
            }
        }
        RESIZE => {
            // One size per message, with or without a newline.
            let mut decoder = ResizeDecoder::default();
            let sizes = decoder.push(&payload).into_iter().chain(decoder.finish());
            for size in sizes {
                if let Some(tx) = &senders.resize {
                    if tx.send(size).await.is_err() {
                        senders.resize = None;
                    }
                }
            }
        }
        CLOSE if closes_channels => match payload.first() {
            Some(&STDIN) => senders.stdin = None,
            other => debug!(channel = ?other, "ignoring the close of a channel we do not read"),
        },
        other => debug!(channel = other, "ignoring a message on a channel we do not read"),
    }
}

/// Writes queued messages to the client, flushing when the queue is empty, until the queue
/// ends (after our close) or the connection fails (then the client counts as gone).
pub(in crate::streaming) async fn write_client<S>(
    mut sink: SplitSink<WebSocketStream<S>, Message>,
    mut queue: mpsc::Receiver<Message>,
    gone: Arc<watch::Sender<bool>>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    while let Some(message) = queue.recv().await {
        let mut written = sink.feed(message).await;
        while let (Ok(()), Ok(message)) = (&written, queue.try_recv()) {
            written = sink.feed(message).await;
        }
        if let Err(e) = written.and(sink.flush().await) {
            debug!(error = %e, "writing to the WebSocket client");
            gone.send_replace(true);
            return;
        }
    }
}

/// The output side: the writer's queue, and whether the client is gone.
struct WebSocketOutput {
    queue: mpsc::Sender<Message>,
    framing: Framing,
    gone: watch::Receiver<bool>,
}

impl WebSocketOutput {
    async fn send_channel(&self, channel: u8, payload: &[u8]) {
        // A closed queue means the connection failed; `closed` says so.
        let _ = self.queue.send(self.framing.encode(channel, payload)).await;
    }
}

impl ClientOutput for WebSocketOutput {
    async fn send(&self, kind: OutputKind, data: Bytes) {
        let channel = match kind {
            OutputKind::Stdout => STDOUT,
            OutputKind::Stderr => STDERR,
        };
        self.send_channel(channel, &data).await;
    }

    async fn closed(&self) {
        let mut gone = self.gone.clone();
        let _ = gone.wait_for(|gone| *gone).await;
    }
}

/// Serves one exec or attach session on an accepted WebSocket.
pub async fn serve<S>(
    ws: WebSocketStream<S>,
    protocol: &'static str,
    request: StreamRequest,
    manager: Arc<SandboxManager>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Some(want) = Want::of(&request, protocol) else {
        debug!("a port-forward request reached remotecommand");
        let mut ws = ws;
        let _ = ws.close(None).await;
        return;
    };
    let framing = Framing::of(protocol);
    let (sink, messages) = ws.split();
    let (gone_tx, gone) = watch::channel(false);
    let gone_tx = Arc::new(gone_tx);
    let (queue, queue_rx) = mpsc::channel(OUTPUT_QUEUE);
    let writer = tokio::spawn(write_client(sink, queue_rx, gone_tx.clone()));
    let output = WebSocketOutput { queue, framing, gone };
    let (input, senders) = input_channels(want);
    let closes_channels = super::version(protocol) >= 5;
    let reader = tokio::spawn(read_client(messages, framing, closes_channels, senders, gone_tx));
    // As kubelet: an empty message on the first channel we write says the session is up.
    let first = if want.stdout {
        STDOUT
    } else if want.stderr {
        STDERR
    } else {
        ERROR
    };
    output.send_channel(first, &[]).await;
    let outcome = super::run(request, want, &manager, input, &output).await;
    finish(output, writer, reader, protocol, outcome).await;
}

/// Ends cleanly: the status on the error channel, a normal close, and a moment for the
/// connection to take them and the client to answer (closing at once could lose output).
async fn finish(
    output: WebSocketOutput,
    writer: tokio::task::JoinHandle<()>,
    reader: tokio::task::JoinHandle<()>,
    protocol: &str,
    outcome: Outcome,
) {
    if let Some(message) = super::status_message(protocol, &outcome) {
        output.send_channel(ERROR, &message).await;
    }
    let _ = output.queue.send(normal_close()).await;
    let WebSocketOutput { queue, gone, .. } = output;
    // The writer ends once it has written what the queue holds.
    drop(queue);
    let abort_writer = writer.abort_handle();
    let drained = async {
        let _ = writer.await;
        let mut gone = gone;
        let _ = gone.wait_for(|gone| *gone).await;
    };
    let _ = tokio::time::timeout(CLOSE_GRACE, drained).await;
    abort_writer.abort();
    reader.abort();
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::DuplexStream;
    use tokio_tungstenite::tungstenite::protocol::Role;

    #[test]
    fn binary_messages_are_a_channel_byte_and_the_payload() {
        let message = Framing::Binary.encode(STDOUT, b"hi");
        assert_eq!(message, Message::Binary(Bytes::from_static(b"\x01hi")));
        let decoded = Framing::Binary.decode(Message::Binary(Bytes::from_static(b"\x00in")));
        assert_eq!(decoded, Ok(Inbound::Channel(STDIN, Bytes::from_static(b"in"))));
        // The Python client writes a str as text: chr(0) + data.
        let decoded = Framing::Binary.decode(Message::text("\u{0}typed"));
        assert_eq!(decoded, Ok(Inbound::Channel(STDIN, Bytes::from_static(b"typed"))));
        assert_eq!(Framing::Binary.decode(Message::Binary(Bytes::new())), Err(FrameError::Empty));
        let close = Framing::Binary.decode(Message::Binary(Bytes::from_static(&[CLOSE, STDIN])));
        assert_eq!(close, Ok(Inbound::Channel(CLOSE, Bytes::from_static(&[STDIN]))));
    }

    #[test]
    fn base64_messages_are_a_digit_and_base64() {
        assert_eq!(Framing::of("v4.base64.channel.k8s.io"), Framing::Base64);
        assert_eq!(Framing::of("v5.channel.k8s.io"), Framing::Binary);
        assert_eq!(Framing::Base64.encode(STDERR, b"oops"), Message::text("2b29wcw=="));
        assert_eq!(Framing::Base64.encode(STDOUT, b""), Message::text("1"));
        let decoded = Framing::Base64.decode(Message::text("0aGk="));
        assert_eq!(decoded, Ok(Inbound::Channel(STDIN, Bytes::from_static(b"hi"))));
        assert_eq!(
            Framing::Base64.decode(Message::text("xaGk=")),
            Err(FrameError::Base64Channel('x'))
        );
        assert!(matches!(
            Framing::Base64.decode(Message::text("0!!")),
            Err(FrameError::Base64Payload(_))
        ));
    }

    #[test]
    fn control_messages_carry_no_channel() {
        let ping = Framing::Binary.decode(Message::Ping(Bytes::new()));
        assert_eq!(ping, Ok(Inbound::Control));
        assert_eq!(Framing::Binary.decode(normal_close()), Ok(Inbound::Closed));
    }

    fn want_all() -> Want {
        Want { stdin: true, stdout: true, stderr: true, resize: true }
    }

    #[tokio::test]
    async fn v5_close_of_stdin_ends_stdin_and_nothing_else() {
        let (mut input, mut senders) = input_channels(want_all());
        route(&mut senders, true, STDIN, Bytes::from_static(b"abc")).await;
        route(&mut senders, true, RESIZE, Bytes::from_static(br#"{"Width":80,"Height":24}"#)).await;
        route(&mut senders, true, 9, Bytes::from_static(b"unknown channel")).await;
        route(&mut senders, true, CLOSE, Bytes::new()).await;
        route(&mut senders, true, CLOSE, Bytes::from_static(&[STDIN])).await;
        route(&mut senders, true, STDIN, Bytes::from_static(b"after the close")).await;
        let mut stdin = input.stdin.take().unwrap();
        assert_eq!(stdin.next().await, Some(Bytes::from_static(b"abc")));
        assert_eq!(stdin.next().await, None, "stdin ends at the close");
        assert!(senders.resize.is_some(), "the session goes on");
        drop(senders);
        let sizes: Vec<_> = input.resize.take().unwrap().collect().await;
        assert_eq!(sizes, vec![TerminalSize { width: 80, height: 24 }]);
    }

    #[tokio::test]
    async fn v4_has_no_close_channel() {
        let (mut input, mut senders) = input_channels(want_all());
        route(&mut senders, false, CLOSE, Bytes::from_static(&[STDIN])).await;
        route(&mut senders, false, STDIN, Bytes::from_static(b"still open")).await;
        drop(senders);
        let mut stdin = input.stdin.take().unwrap();
        assert_eq!(stdin.next().await, Some(Bytes::from_static(b"still open")));
    }

    #[tokio::test]
    async fn stdin_a_process_no_longer_takes_is_dropped_not_blocking() {
        let (input, mut senders) = input_channels(want_all());
        drop(input);
        for _ in 0..INPUT_QUEUE * 2 {
            route(&mut senders, true, STDIN, Bytes::from_static(b"x")).await;
        }
        assert!(senders.stdin.is_none());
    }

    async fn pair() -> (WebSocketStream<DuplexStream>, WebSocketStream<DuplexStream>) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let config = crate::streaming::websocket::config();
        let server = WebSocketStream::from_raw_socket(a, Role::Server, Some(config)).await;
        let client = WebSocketStream::from_raw_socket(b, Role::Client, None).await;
        (server, client)
    }

    #[tokio::test]
    async fn the_reader_routes_until_the_client_closes_then_says_it_is_gone() {
        let (server, mut client) = pair().await;
        let (_sink, messages) = server.split();
        let (mut input, senders) = input_channels(want_all());
        let (gone_tx, mut gone) = watch::channel(false);
        let reader =
            tokio::spawn(read_client(messages, Framing::Binary, true, senders, Arc::new(gone_tx)));
        client.send(Message::Binary(Bytes::new())).await.unwrap();
        client.send(Message::Binary(Bytes::from_static(b"\x00data"))).await.unwrap();
        client.send(normal_close()).await.unwrap();
        let stdin: Vec<_> = input.stdin.take().unwrap().collect().await;
        assert_eq!(stdin, vec![Bytes::from_static(b"data")]);
        gone.wait_for(|g| *g).await.unwrap();
        reader.await.unwrap();
    }

    #[tokio::test]
    async fn finish_sends_output_then_the_status_then_a_normal_close() {
        let (server, mut client) = pair().await;
        let (sink, messages) = server.split();
        let (gone_tx, gone) = watch::channel(false);
        let gone_tx = Arc::new(gone_tx);
        let (queue, queue_rx) = mpsc::channel(OUTPUT_QUEUE);
        let writer = tokio::spawn(write_client(sink, queue_rx, gone_tx.clone()));
        let (_input, senders) = input_channels(want_all());
        let reader = tokio::spawn(read_client(messages, Framing::Binary, true, senders, gone_tx));
        let output = WebSocketOutput { queue, framing: Framing::Binary, gone };
        for i in 0..200u32 {
            output.send(OutputKind::Stdout, Bytes::from(i.to_string())).await;
        }
        let client_side = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(Ok(message)) = client.next().await {
                got.push(message);
            }
            got
        });
        let finishing = finish(output, writer, reader, "v5.channel.k8s.io", Outcome::Exited(4));
        tokio::time::timeout(Duration::from_secs(10), finishing).await.unwrap();
        let got = client_side.await.unwrap();
        assert_eq!(got.len(), 202, "{got:?}");
        assert_eq!(got[199], Message::Binary(Bytes::from_static(b"\x01199")));
        let Message::Binary(status) = &got[200] else { panic!("{:?}", got[200]) };
        assert_eq!(status[0], ERROR);
        let status: serde_json::Value = serde_json::from_slice(&status[1..]).unwrap();
        assert_eq!(status["details"]["causes"][0]["message"], "4");
        assert_eq!(got[201], normal_close());
    }
}
