//! Kubernetes' port-forward protocol over SPDY/3.1 (`portforward.k8s.io`, or
//! `SPDY/3.1+portforward.k8s.io` over WebSocket, the same session on a byte stream that
//! [`super::websocket::WebSocketIo`] makes of the messages): for each forwarded
//! connection the client opens an `error` and a `data` stream carrying the same `port` and
//! `requestid` headers; the server pairs them, connects to the port inside the pod, and
//! copies the data stream's bytes both ways. A failure is text on the error stream and a reset
//! of the data stream, as kubelet does.
//!
//! The client's half-close is not passed on: the hybrid vsock has no half-close (on a host-side
//! EOF vhost-device-vsock 0.3 ends the whole guest connection, dropping the answer in flight).
//! A forwarded connection ends when the guest side closes it or the client hangs up.

pub mod channels;

use std::collections::HashMap;
use std::sync::Arc;

use podvisor_spdy::{Incoming, Session, Stream, StreamWriter};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::debug;

use crate::sandbox::SandboxManager;

/// The protocols we speak over SPDY (the only one there is).
pub const PROTOCOLS: [&str; 1] = ["portforward.k8s.io"];
/// Over WebSocket: the same SPDY session, its bytes carried in binary messages; or kubelet's
/// older channel protocol ([`channels`]).
pub const WEBSOCKET_PROTOCOLS: [&str; 2] = ["SPDY/3.1+portforward.k8s.io", channels::PROTOCOL];
/// RST_STREAM's CANCEL status.
const CANCEL: u32 = 5;
/// Bytes read from the guest per data frame.
const CHUNK: usize = 32 * 1024;

/// The half of a pair that came first.
enum Half {
    Error(StreamWriter),
    Data(Stream),
}

/// Serves one port-forward session for `sandbox_id` until the client hangs up.
pub async fn serve(
    session: Session,
    mut incoming: Incoming,
    sandbox_id: String,
    manager: Arc<SandboxManager>,
) {
    // Halves waiting for their partner, by request id; bounded by the session's stream limit.
    let mut waiting: HashMap<String, (String, Half)> = HashMap::new();
    loop {
        let stream = tokio::select! {
            stream = incoming.next() => match stream {
                Some(stream) => stream,
                None => break,
            },
            _ = session.closed() => break,
        };
        if let Err(e) = stream.reply(Vec::new(), false).await {
            debug!(error = %e, "answering a port-forward stream");
            continue;
        }
        let request = stream.header("requestid").unwrap_or_default().to_string();
        let port = stream.header("port").unwrap_or_default().to_string();
        let half = match stream.header("streamtype") {
            Some("error") => Half::Error(stream.writer()),
            Some("data") => Half::Data(stream),
            other => {
                debug!(streamtype = ?other, "ignoring a port-forward stream of unknown type");
                continue;
            }
        };
        let (error, data) = match (waiting.remove(&request), half) {
            (Some((_, Half::Error(error))), Half::Data(data))
            | (Some((_, Half::Data(data))), Half::Error(error)) => (error, data),
            (_, half) => {
                waiting.insert(request, (port, half));
                continue;
            }
        };
        let (manager, session) = (manager.clone(), session.clone());
        let sandbox_id = sandbox_id.clone();
        tokio::spawn(
            async move { forward(&session, &manager, &sandbox_id, &port, error, data).await },
        );
    }
    session.close().await;
}

/// Connects one pair to the port in the pod and copies until both sides are done.
async fn forward(
    session: &Session,
    manager: &SandboxManager,
    sandbox_id: &str,
    port: &str,
    error: StreamWriter,
    mut data: Stream,
) {
    let data_writer = data.writer();
    let connection = match port.parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("invalid port {port:?}")),
        Ok(number) => manager.port_forward(sandbox_id, number).await.map_err(|e| e.to_string()),
    };
    let connection = match connection {
        Ok(connection) => connection,
        Err(reason) => {
            let message = format!("error forwarding port {port} to pod {sandbox_id}: {reason}");
            let _ = error.write(message.as_bytes()).await;
            let _ = error.close().await;
            let _ = data_writer.reset(CANCEL).await;
            return;
        }
    };
    let (mut from_guest, mut to_guest) = connection.into_split();
    let upstream = async {
        while let Some(bytes) = data.read().await {
            if to_guest.write_all(&bytes).await.is_err() {
                return;
            }
        }
        // The client is done sending; the guest side keeps its connection (see above).
        std::future::pending::<()>().await
    };
    let downstream = async {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match from_guest.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if data_writer.write(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = data_writer.close().await;
    };
    // The guest closed (downstream done), the guest stopped taking bytes, or the client left.
    tokio::select! {
        () = downstream => {}
        () = upstream => {}
        _ = session.closed() => {}
    }
    let _ = error.close().await;
}
