//! kubelet's older WebSocket port-forward (`v4.channel.k8s.io`), which Python's
//! `kubernetes.stream.portforward` still speaks: the ports come in the URL's query
//! (`?port=80&port=8080`, or `?ports=80,8080` as the API server takes them), one connection
//! each; port i has data channel 2i and error channel 2i+1, each opened by a message carrying
//! the port (u16, little endian). The data channel carries the connection's bytes both ways,
//! the error channel text about a failure. The session ends when every connection has ended
//! or the client leaves.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tracing::debug;

use crate::sandbox::SandboxManager;
use crate::streaming::remotecommand::websocket::{write_client, Framing, Inbound};
use crate::streaming::websocket::normal_close;

pub const PROTOCOL: &str = "v4.channel.k8s.io";
/// Ports one session may forward: two channels each, and a channel is one byte.
pub const MAX_PORTS: usize = 64;
/// Client messages waiting for one guest connection.
const INPUT_QUEUE: usize = 16;
/// Messages waiting for the client.
const OUTPUT_QUEUE: usize = 64;
/// Bytes read from the guest per message.
const CHUNK: usize = 32 * 1024;
/// How long the connection has to take what is queued after the end.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Why the query names no ports to forward.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QueryError {
    #[error("the query names no port (?port=N)")]
    NoPort,
    #[error("{0:?} is not a port")]
    BadPort(String),
    #[error("more than {MAX_PORTS} ports")]
    TooMany,
}

/// The ports of `?port=A&port=B` or `?ports=A,B` (a comma may come URL-encoded).
pub fn ports_from_query(query: Option<&str>) -> Result<Vec<u16>, QueryError> {
    let mut ports = Vec::new();
    for pair in query.unwrap_or_default().split('&') {
        let Some(("port" | "ports", values)) = pair.split_once('=') else {
            continue;
        };
        for value in values.replace("%2C", ",").replace("%2c", ",").split(',') {
            match value.parse::<u16>() {
                Ok(port) if port != 0 => ports.push(port),
                _ => return Err(QueryError::BadPort(value.to_string())),
            }
        }
    }
    match ports.len() {
        0 => Err(QueryError::NoPort),
        n if n > MAX_PORTS => Err(QueryError::TooMany),
        _ => Ok(ports),
    }
}

/// Port i's data channel (its error channel is the next one).
fn data_channel(index: usize) -> u8 {
    // MAX_PORTS keeps 2i + 1 within a byte.
    u8::try_from(index * 2).unwrap_or(u8::MAX - 1)
}

/// Serves one session forwarding `ports` of `sandbox_id`.
pub async fn serve<S>(
    ws: WebSocketStream<S>,
    ports: Vec<u16>,
    sandbox_id: String,
    manager: Arc<SandboxManager>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sink, mut messages) = ws.split();
    let (queue, queue_rx) = mpsc::channel(OUTPUT_QUEUE);
    let gone = Arc::new(watch::channel(false).0);
    let writer = tokio::spawn(write_client(sink, queue_rx, gone));
    let mut upstreams = Vec::with_capacity(ports.len());
    let mut connections = JoinSet::new();
    for (index, port) in ports.into_iter().enumerate() {
        let channel = data_channel(index);
        // Each channel opens with its port, as kubelet's do.
        for channel in [channel, channel + 1] {
            let _ = queue.send(Framing::Binary.encode(channel, &port.to_le_bytes())).await;
        }
        let (tx, rx) = mpsc::channel(INPUT_QUEUE);
        upstreams.push(Some(tx));
        let forward = Forward { port, channel, queue: queue.clone() };
        connections.spawn(forward.run(manager.clone(), sandbox_id.clone(), rx));
    }
    loop {
        tokio::select! {
            message = messages.next() => match message {
                Some(Ok(message)) => {
                    if !route(&mut upstreams, message).await {
                        break;
                    }
                }
                Some(Err(e)) => {
                    debug!(error = %e, "reading from the port-forward client");
                    break;
                }
                None => break,
            },
            ended = connections.join_next() => {
                if ended.is_none() {
                    // Every connection has ended.
                    break;
                }
            }
        }
    }
    connections.abort_all();
    let _ = queue.send(normal_close()).await;
    drop(queue);
    let abort_writer = writer.abort_handle();
    let _ = tokio::time::timeout(CLOSE_GRACE, writer).await;
    abort_writer.abort();
}

/// Takes one client message: bytes on a data channel go to its connection. False once the
/// client has closed.
async fn route(upstreams: &mut [Option<mpsc::Sender<Bytes>>], message: Message) -> bool {
    let (channel, payload) = match Framing::Binary.decode(message) {
        Ok(Inbound::Channel(channel, payload)) => (channel, payload),
        Ok(Inbound::Closed) => return false,
        Ok(Inbound::Control) => return true,
        Err(e) => {
            debug!(error = %e, "ignoring a port-forward message");
            return true;
        }
    };
    let index = usize::from(channel / 2);
    match upstreams.get_mut(index) {
        Some(upstream) if channel % 2 == 0 && !payload.is_empty() => {
            // A connection that has ended drops its receiver: stop sending to it.
            if let Some(tx) = upstream {
                if tx.send(payload).await.is_err() {
                    *upstream = None;
                }
            }
        }
        _ => debug!(channel, "ignoring a message on a channel we do not read"),
    }
    true
}

/// One forwarded port of a session.
struct Forward {
    port: u16,
    /// Its data channel; its error channel is the next.
    channel: u8,
    queue: mpsc::Sender<Message>,
}

impl Forward {
    /// Connects to the port in the pod and copies until the guest side ends (the client's
    /// end is the session's, see [`serve`]).
    async fn run(
        self,
        manager: Arc<SandboxManager>,
        sandbox_id: String,
        mut from_client: mpsc::Receiver<Bytes>,
    ) {
        let connection = match manager.port_forward(&sandbox_id, self.port).await {
            Ok(connection) => connection,
            Err(e) => {
                let message =
                    format!("error forwarding port {} to pod {sandbox_id}: {e}", self.port);
                let error = Framing::Binary.encode(self.channel + 1, message.as_bytes());
                let _ = self.queue.send(error).await;
                return;
            }
        };
        let (mut from_guest, mut to_guest) = connection.into_split();
        let upstream = async {
            while let Some(data) = from_client.recv().await {
                if to_guest.write_all(&data).await.is_err() {
                    return;
                }
            }
            // No half-close on the hybrid vsock (see the module above): keep the guest side.
            std::future::pending::<()>().await
        };
        let downstream = async {
            let mut buf = vec![0u8; CHUNK];
            while let Ok(n @ 1..) = from_guest.read(&mut buf).await {
                let message = Framing::Binary.encode(self.channel, &buf[..n]);
                if self.queue.send(message).await.is_err() {
                    return;
                }
            }
        };
        tokio::select! {
            () = upstream => {}
            () = downstream => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_come_from_either_query_form() {
        assert_eq!(ports_from_query(Some("port=80&port=8080")), Ok(vec![80, 8080]));
        assert_eq!(ports_from_query(Some("ports=80%2C8080&x=1")), Ok(vec![80, 8080]));
        assert_eq!(ports_from_query(Some("ports=9,10")), Ok(vec![9, 10]));
        assert_eq!(ports_from_query(None), Err(QueryError::NoPort));
        assert_eq!(ports_from_query(Some("other=1")), Err(QueryError::NoPort));
        assert_eq!(ports_from_query(Some("port=0")), Err(QueryError::BadPort("0".into())));
        assert_eq!(ports_from_query(Some("port=99999")), Err(QueryError::BadPort("99999".into())));
        let many = vec!["port=1"; MAX_PORTS + 1].join("&");
        assert_eq!(ports_from_query(Some(&many)), Err(QueryError::TooMany));
    }

    #[test]
    fn every_ports_channels_fit_in_a_byte() {
        assert_eq!(data_channel(0), 0);
        assert_eq!(data_channel(3), 6);
        assert!(data_channel(MAX_PORTS - 1) < u8::MAX);
    }

    #[tokio::test]
    async fn client_bytes_reach_their_port_and_nothing_else_does() {
        let (tx0, mut rx0) = mpsc::channel(4);
        let (tx1, rx1) = mpsc::channel(4);
        let mut upstreams = vec![Some(tx0), Some(tx1)];
        let data = |channel: u8, payload: &[u8]| {
            let mut message = vec![channel];
            message.extend_from_slice(payload);
            Message::Binary(message.into())
        };
        assert!(route(&mut upstreams, data(0, b"to port 0")).await);
        assert!(route(&mut upstreams, data(1, b"an error channel is not read")).await);
        assert!(route(&mut upstreams, data(9, b"no such port")).await);
        assert!(route(&mut upstreams, Message::Binary(Bytes::new())).await);
        drop(rx1);
        assert!(route(&mut upstreams, data(2, b"a connection that ended")).await);
        assert!(upstreams[1].is_none());
        assert!(!route(&mut upstreams, normal_close()).await);
        assert_eq!(rx0.recv().await, Some(Bytes::from_static(b"to port 0")));
        assert!(rx0.try_recv().is_err());
    }
}
