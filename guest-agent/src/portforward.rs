//! Port-forward inside the guest: each forwarded connection is a vsock connection of its own
//! on [`PORT_FORWARD_VSOCK_PORT`], spliced to `localhost:<port>` in the VM (the pod's network
//! namespace). See the constant for the one-line handshake. An agent on the host (a
//! `host`-handler pod) serves the same handshake on a unix socket instead ([`spawn_unix`]).

use std::sync::Arc;
use std::time::Duration;

use podvisor_proto::PORT_FORWARD_VSOCK_PORT;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_vsock::{VsockAddr, VsockListener};

/// Forwarded connections at once: a host that opens more waits for a slot.
const MAX_CONNECTIONS: usize = 256;
/// The handshake line is `PORT <n>\n`.
const MAX_LINE: usize = 32;
/// How long the host has to send it, and the guest port to accept.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum PortForwardError {
    #[error("binding vsock port {PORT_FORWARD_VSOCK_PORT}: {0}")]
    Bind(std::io::Error),
    #[error("reading the handshake: {0}")]
    Handshake(String),
    #[error("connecting to localhost:{port}: {source}")]
    Connect { port: u16, source: std::io::Error },
    #[error("answering the host: {0}")]
    Answer(std::io::Error),
}

/// Serves forwarded connections until the listener fails.
pub fn spawn() -> Result<(), PortForwardError> {
    let addr = VsockAddr::new(libc::VMADDR_CID_ANY, PORT_FORWARD_VSOCK_PORT);
    let listener = VsockListener::bind(addr).map_err(PortForwardError::Bind)?;
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else { return };
            match listener.accept().await {
                Ok((stream, _)) => serve(stream, permit),
                Err(e) => accept_failed(e).await,
            }
        }
    });
    Ok(())
}

/// Serves forwarded connections arriving on a unix socket (host mode) until it fails.
pub fn spawn_unix(listener: tokio::net::UnixListener) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else { return };
            match listener.accept().await {
                Ok((stream, _)) => serve(stream, permit),
                Err(e) => accept_failed(e).await,
            }
        }
    });
}

/// Forwards one connection in a task of its own, holding a slot until it ends.
fn serve<S>(stream: S, permit: tokio::sync::OwnedSemaphorePermit)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = forward(stream).await {
            tracing::debug!(error = %e, "port-forward connection ended");
        }
        drop(permit);
    });
}

async fn accept_failed(e: std::io::Error) {
    tracing::warn!(error = %e, "accepting a port-forward connection");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// The port of a handshake line.
fn parse_port(line: &[u8]) -> Result<u16, String> {
    let text = std::str::from_utf8(line).map_err(|_| "not text".to_string())?;
    let port = text
        .trim_end_matches('\n')
        .strip_prefix("PORT ")
        .ok_or_else(|| format!("unexpected handshake {text:?}"))?;
    match port.parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("invalid port {port:?}")),
        Ok(port) => Ok(port),
    }
}

/// Reads the handshake line byte by byte: what follows it already belongs to the TCP peer.
async fn read_line<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Vec<u8>, String> {
    let mut line = Vec::with_capacity(MAX_LINE);
    loop {
        let mut byte = [0u8; 1];
        match stream.read(&mut byte).await {
            Ok(0) => return Err("the host closed the connection".into()),
            Ok(_) if byte[0] == b'\n' => return Ok(line),
            Ok(_) if line.len() >= MAX_LINE => return Err("handshake line too long".into()),
            Ok(_) => line.push(byte[0]),
            Err(e) => return Err(e.to_string()),
        }
    }
}

async fn forward<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S) -> Result<(), PortForwardError> {
    let line = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_line(&mut stream))
        .await
        .map_err(|_| PortForwardError::Handshake("no handshake in time".into()))?
        .map_err(PortForwardError::Handshake)?;
    let port = match parse_port(&line) {
        Ok(port) => port,
        Err(reason) => {
            let _ = stream.write_all(format!("ERR {reason}\n").as_bytes()).await;
            return Err(PortForwardError::Handshake(reason));
        }
    };
    let connected =
        tokio::time::timeout(HANDSHAKE_TIMEOUT, TcpStream::connect(("localhost", port))).await;
    let mut tcp = match connected {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(source)) => {
            return refuse(&mut stream, PortForwardError::Connect { port, source }).await
        }
        Err(_) => {
            let source = std::io::Error::from(std::io::ErrorKind::TimedOut);
            return refuse(&mut stream, PortForwardError::Connect { port, source }).await;
        }
    };
    stream.write_all(b"OK\n").await.map_err(PortForwardError::Answer)?;
    // Both directions until both ends are done; errors just end the connection.
    let _ = tokio::io::copy_bidirectional(&mut stream, &mut tcp).await;
    Ok(())
}

/// Tells the host why, then ends the connection.
async fn refuse<S: AsyncWrite + Unpin>(
    stream: &mut S,
    error: PortForwardError,
) -> Result<(), PortForwardError> {
    let _ = stream.write_all(format!("ERR {error}\n").as_bytes()).await;
    Err(error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_lines_are_checked() {
        assert_eq!(parse_port(b"PORT 8080"), Ok(8080));
        assert_eq!(parse_port(b"PORT 8080\n"), Ok(8080));
        for bad in [&b"PORT 0"[..], b"PORT 70000", b"PORT x", b"HELLO", b"PORT \xff"] {
            assert!(parse_port(bad).is_err(), "{bad:?}");
        }
    }
}
