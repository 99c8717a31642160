//! WebSocket clients for the streaming URLs, as client-go's `--transport websocket` ones:
//! remotecommand over `v5.channel.k8s.io` (or `v4`), one channel byte per message, and
//! port-forward over `SPDY/3.1+portforward.k8s.io`, a SPDY session on the bytes of binary
//! messages. Written from the protocol description, apart from the server's code.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures::{SinkExt, StreamExt};
use podvisor_spdy::Session;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::streaming::{Finished, PortForward};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub const STDIN: u8 = 0;
pub const STDOUT: u8 = 1;
pub const STDERR: u8 = 2;
pub const ERROR: u8 = 3;
pub const RESIZE: u8 = 4;
pub const CLOSE: u8 = 255;

/// Opens a WebSocket to `url` (`http://…`) offering `protocols` (comma-separated); returns it
/// and the protocol the server chose.
pub async fn connect(url: &str, protocols: &str) -> Result<(Ws, String)> {
    let ws_url = url.strip_prefix("http://").context("not an http:// URL")?;
    let mut request = format!("ws://{ws_url}").into_client_request()?;
    request.headers_mut().insert("sec-websocket-protocol", protocols.parse()?);
    let (ws, response) = tokio_tungstenite::connect_async(request).await?;
    let protocol = response
        .headers()
        .get("sec-websocket-protocol")
        .and_then(|v| v.to_str().ok())
        .context("no Sec-WebSocket-Protocol in the answer")?
        .to_string();
    Ok((ws, protocol))
}

/// A remotecommand session over WebSocket.
pub struct WsRemoteCommand {
    pub protocol: String,
    ws: Ws,
    got: Finished,
    /// Whether the server's close frame has come.
    ended: bool,
}

impl WsRemoteCommand {
    /// Connects to an Exec or Attach URL offering `protocols`.
    pub async fn connect(url: &str, protocols: &str) -> Result<Self> {
        let (ws, protocol) = connect(url, protocols).await?;
        Ok(Self { protocol, ws, got: Finished::default(), ended: false })
    }

    /// Sends one message: the channel byte, then `payload`.
    pub async fn send(&mut self, channel: u8, payload: &[u8]) -> Result<()> {
        let mut message = vec![channel];
        message.extend_from_slice(payload);
        self.ws.send(Message::Binary(message.into())).await?;
        Ok(())
    }

    /// Sends any message as it is (for malformed input).
    pub async fn send_raw(&mut self, message: Message) -> Result<()> {
        self.ws.send(message).await?;
        Ok(())
    }

    pub async fn stdin(&mut self, data: &[u8]) -> Result<()> {
        self.send(STDIN, data).await
    }

    /// v5: stdin's half-close.
    pub async fn close_stdin(&mut self) -> Result<()> {
        self.send(CLOSE, &[STDIN]).await
    }

    /// A terminal size, as client-go sends it (JSON and a newline).
    pub async fn resize(&mut self, width: u16, height: u16) -> Result<()> {
        self.send(RESIZE, format!("{{\"Width\":{width},\"Height\":{height}}}\n").as_bytes()).await
    }

    /// Reads one message into the channels; false once the session has ended.
    async fn read_one(&mut self) -> Result<bool> {
        if self.ended {
            return Ok(false);
        }
        let message = match self.ws.next().await {
            Some(message) => message?,
            None => bail!("the connection ended without a close frame"),
        };
        match message {
            Message::Binary(data) => {
                let Some((&channel, payload)) = data.split_first() else {
                    bail!("an empty message from the server");
                };
                match channel {
                    STDOUT => self.got.stdout.extend_from_slice(payload),
                    STDERR => self.got.stderr.extend_from_slice(payload),
                    ERROR => self.got.status.push_str(&String::from_utf8_lossy(payload)),
                    other => bail!("a message on channel {other} from the server"),
                }
            }
            Message::Close(frame) => {
                let code = frame.as_ref().map(|f| f.code);
                if code != Some(CloseCode::Normal) {
                    bail!("the server closed with {frame:?}");
                }
                self.ended = true;
            }
            Message::Ping(_) | Message::Pong(_) => {}
            other => bail!("unexpected {other:?} from the server"),
        }
        Ok(!self.ended)
    }

    /// Reads until stdout holds `needle` (or `timeout` passes); returns stdout so far.
    pub async fn read_stdout_until(&mut self, needle: &str, timeout: Duration) -> Result<Vec<u8>> {
        let read = async {
            while !String::from_utf8_lossy(&self.got.stdout).contains(needle) {
                if !self.read_one().await? {
                    break;
                }
            }
            Ok::<_, anyhow::Error>(())
        };
        // A timeout is no error: the caller checks what came.
        if let Ok(read) = tokio::time::timeout(timeout, read).await {
            read?;
        }
        Ok(self.got.stdout.clone())
    }

    /// Reads to the server's normal close; returns everything the channels carried.
    pub async fn finish(mut self, timeout: Duration) -> Result<Finished> {
        let all = async {
            while self.read_one().await? {}
            Ok::<_, anyhow::Error>(())
        };
        tokio::time::timeout(timeout, all).await.context("the session did not end")??;
        // The close handshake: our answer goes out as the stream ends.
        while let Some(Ok(_)) = self.ws.next().await {}
        Ok(self.got)
    }

    /// Closes from our side, as a client that is done early.
    pub async fn close(mut self) -> Result<()> {
        let frame = CloseFrame { code: CloseCode::Normal, reason: "".into() };
        self.ws.close(Some(frame)).await?;
        Ok(())
    }
}

/// A byte stream over binary messages, for the SPDY session of port-forward: two tasks copy
/// between the WebSocket and one end of a pipe; the other end is returned.
fn byte_stream(ws: Ws) -> DuplexStream {
    let (ours, theirs) = tokio::io::duplex(256 * 1024);
    let (mut sink, mut messages) = ws.split();
    let (mut from_session, mut to_session) = tokio::io::split(theirs);
    tokio::spawn(async move {
        while let Some(Ok(message)) = messages.next().await {
            let go_on = match message {
                Message::Binary(data) => to_session.write_all(&data).await.is_ok(),
                Message::Close(_) => false,
                _ => true,
            };
            if !go_on {
                break;
            }
        }
        let _ = to_session.shutdown().await;
    });
    tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n @ 1..) = from_session.read(&mut buf).await {
            if sink.send(Message::Binary(buf[..n].to_vec().into())).await.is_err() {
                return;
            }
        }
        let frame = CloseFrame { code: CloseCode::Normal, reason: "".into() };
        let _ = sink.send(Message::Close(Some(frame))).await;
    });
    ours
}

impl PortForward {
    /// Connects to a PortForward URL over WebSocket (`SPDY/3.1+portforward.k8s.io`).
    pub async fn connect_websocket(url: &str) -> Result<Self> {
        let (ws, protocol) = connect(url, "SPDY/3.1+portforward.k8s.io").await?;
        if protocol != "SPDY/3.1+portforward.k8s.io" {
            bail!("the server chose {protocol}");
        }
        let (session, _incoming) = Session::client(byte_stream(ws));
        Ok(Self::from_session(session))
    }
}

/// The Python with PyPI's `kubernetes` package that `make deps` installs
/// (`$PODVISOR_CACHE/venv`), or `PODVISOR_PYTHON`; Err says why it is not usable.
pub fn k8s_python() -> Result<std::path::PathBuf> {
    let python = match std::env::var_os("PODVISOR_PYTHON") {
        Some(python) => std::path::PathBuf::from(python),
        None => {
            let cache = std::env::var_os("PODVISOR_CACHE").unwrap_or("/var/cache/podvisor".into());
            std::path::Path::new(&cache).join("venv/bin/python3")
        }
    };
    let probe = std::process::Command::new(&python)
        .args(["-c", "import kubernetes.stream.ws_client"])
        .output()
        .with_context(|| format!("running {} (make deps installs it)", python.display()))?;
    if !probe.status.success() {
        bail!(
            "{} has no kubernetes package (make deps installs it): {}",
            python.display(),
            String::from_utf8_lossy(&probe.stderr)
        );
    }
    Ok(python)
}

/// Runs `tests/clients/<script>` (on the `kubernetes` package's WebSocket clients) on a
/// streaming URL; returns the JSON it prints.
pub async fn k8s_client(
    python: &std::path::Path,
    script: &str,
    url: &str,
    args: &[&str],
) -> Result<serde_json::Value> {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("clients").join(script);
    let out = tokio::process::Command::new(python)
        .arg(&script)
        .arg(url)
        .args(args)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), out)
        .await
        .with_context(|| format!("{} did not finish", script.display()))??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("{} failed: {stdout} {}", script.display(), String::from_utf8_lossy(&out.stderr));
    }
    serde_json::from_str(stdout.trim())
        .with_context(|| format!("{} printed {stdout:?}", script.display()))
}
