//! remotecommand over SPDY/3.1 (`v5`..`v1.channel.k8s.io`): the client opens one stream per
//! channel, each marked by a `streamtype` header (`error`, `stdin`, `stdout`, `stderr`,
//! `resize`); the server answers each at once, then carries the process's I/O on them and
//! ends with its status on the error stream.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use podvisor_spdy::{Incoming, Session, Stream, StreamWriter};
use tracing::debug;

use super::{ClientInput, ClientOutput, Outcome, ResizeDecoder, Want};
use crate::agent::OutputKind;
use crate::sandbox::SandboxManager;
use crate::streaming::tokens::StreamRequest;

/// The protocols we speak, in our order of preference; the client's order decides.
pub const PROTOCOLS: [&str; 5] = [
    "v5.channel.k8s.io",
    "v4.channel.k8s.io",
    "v3.channel.k8s.io",
    "v2.channel.k8s.io",
    "channel.k8s.io",
];
/// How long the client has to open its streams (client-go waits as long for the replies).
const STREAMS_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the client has to hang up after the status, before we do.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// The streams of one session.
#[derive(Default)]
struct Channels {
    error: Option<StreamWriter>,
    stdin: Option<Stream>,
    stdout: Option<StreamWriter>,
    stderr: Option<StreamWriter>,
    resize: Option<Stream>,
}

impl Channels {
    /// Waits for the streams the request needs; answers every stream as it comes.
    async fn collect(incoming: &mut Incoming, want: Want) -> Option<Self> {
        let mut channels = Self::default();
        let gather = async {
            while !channels.complete(want) {
                let stream = incoming.next().await?;
                if let Err(e) = stream.reply(Vec::new(), false).await {
                    debug!(error = %e, "answering a stream");
                    return None;
                }
                match stream.header("streamtype") {
                    Some("error") => channels.error = Some(stream.writer()),
                    Some("stdin") => channels.stdin = Some(stream),
                    Some("stdout") => channels.stdout = Some(stream.writer()),
                    Some("stderr") => channels.stderr = Some(stream.writer()),
                    Some("resize") => channels.resize = Some(stream),
                    other => debug!(streamtype = ?other, "ignoring a stream of unknown type"),
                }
            }
            Some(())
        };
        tokio::time::timeout(STREAMS_TIMEOUT, gather).await.ok()??;
        Some(channels)
    }

    fn complete(&self, want: Want) -> bool {
        self.error.is_some()
            && (!want.stdin || self.stdin.is_some())
            && (!want.stdout || self.stdout.is_some())
            && (!want.stderr || self.stderr.is_some())
            && (!want.resize || self.resize.is_some())
    }

    /// The input streams for the session core; the output streams stay.
    fn take_input(&mut self) -> ClientInput {
        ClientInput {
            stdin: self.stdin.take().map(|stream| stream_data(stream).boxed()),
            resize: self.resize.take().map(|stream| stream_sizes(stream).boxed()),
        }
    }
}

/// A stream's data until its FIN (stdin's half-close) or reset.
fn stream_data(stream: Stream) -> impl futures::Stream<Item = Bytes> + Send {
    futures::stream::unfold(stream, |mut stream| async move {
        stream.read().await.map(|data| (data, stream))
    })
}

/// The terminal sizes on a resize stream: newline-delimited JSON.
fn stream_sizes(stream: Stream) -> impl futures::Stream<Item = super::TerminalSize> + Send {
    let decoder = ResizeDecoder::default();
    futures::stream::unfold(Some((stream, decoder)), |state| async move {
        let (mut stream, mut decoder) = state?;
        match stream.read().await {
            Some(data) => Some((decoder.push(&data), Some((stream, decoder)))),
            None => Some((decoder.finish().into_iter().collect(), None)),
        }
    })
    .flat_map(futures::stream::iter)
}

/// The output side: the stdout and stderr streams, and the session to watch.
struct SpdyOutput<'a> {
    session: &'a Session,
    channels: &'a Channels,
}

impl ClientOutput for SpdyOutput<'_> {
    async fn send(&self, kind: OutputKind, data: Bytes) {
        let writer = match kind {
            OutputKind::Stdout => self.channels.stdout.as_ref(),
            OutputKind::Stderr => self.channels.stderr.as_ref(),
        };
        if let Some(writer) = writer {
            if let Err(e) = writer.write(&data).await {
                debug!(error = %e, "writing output to the client");
            }
        }
    }

    async fn closed(&self) {
        let _ = self.session.closed().await;
    }
}

/// Serves one exec or attach session.
pub async fn serve(
    session: Session,
    mut incoming: Incoming,
    protocol: &'static str,
    request: StreamRequest,
    manager: Arc<SandboxManager>,
) {
    let Some(want) = Want::of(&request, protocol) else {
        debug!("a port-forward request reached remotecommand");
        session.close().await;
        return;
    };
    let Some(mut channels) = Channels::collect(&mut incoming, want).await else {
        debug!("the client did not open its streams");
        session.close().await;
        return;
    };
    let input = channels.take_input();
    let output = SpdyOutput { session: &session, channels: &channels };
    let outcome = super::run(request, want, &manager, input, &output).await;
    finish(&session, channels, protocol, outcome).await;
}

/// Ends cleanly: FIN on the output streams, the status, FIN on the error stream, GOAWAY, then
/// a moment for the client to hang up (closing at once could lose output in flight).
async fn finish(session: &Session, channels: Channels, protocol: &str, outcome: Outcome) {
    for writer in [&channels.stdout, &channels.stderr].into_iter().flatten() {
        let _ = writer.close().await;
    }
    if let Some(error) = &channels.error {
        if let Some(message) = super::status_message(protocol, &outcome) {
            let _ = error.write(&message).await;
        }
        let _ = error.close().await;
    }
    let _ = session.goaway().await;
    let _ = tokio::time::timeout(CLOSE_GRACE, session.closed()).await;
    session.close().await;
}
