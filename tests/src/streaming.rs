//! A remotecommand client over SPDY/3.1, as client-go's (what crictl and kubelet use): an
//! HTTP upgrade on the streaming URL, then one stream per channel marked by `streamtype`,
//! opened in client-go's order (error, stdin, stdout, stderr, resize).

use std::time::Duration;

use anyhow::{bail, Context, Result};
use podvisor_spdy::{Session, Stream, StreamWriter};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What the session should carry.
#[derive(Debug, Clone, Copy, Default)]
pub struct Channels {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub tty: bool,
}

/// A connected remotecommand session.
pub struct RemoteCommand {
    pub protocol: String,
    pub session: Session,
    error: Stream,
    pub stdin: Option<StreamWriter>,
    stdout: Option<Stream>,
    stderr: Option<Stream>,
    pub resize: Option<StreamWriter>,
}

/// What came back.
#[derive(Debug, Default)]
pub struct Finished {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// The error channel's message (the v4 status JSON).
    pub status: String,
}

impl Finished {
    /// The exit code the status says (0 for Success).
    pub fn exit_code(&self) -> Option<i32> {
        let status: serde_json::Value = serde_json::from_str(&self.status).ok()?;
        if status["status"] == "Success" {
            return Some(0);
        }
        status["details"]["causes"].as_array()?.iter().find_map(|cause| {
            (cause["reason"] == "ExitCode").then(|| cause["message"].as_str()?.parse().ok())?
        })
    }
}

/// Upgrades `url` (`http://host:port/path`) to SPDY/3.1, offering `protocols`. Returns the
/// connection and the protocol the server chose.
pub async fn upgrade(url: &str, protocols: &[&str]) -> Result<(TcpStream, String)> {
    let rest = url.strip_prefix("http://").context("not an http:// URL")?;
    let (host, path) = rest.split_once('/').context("no path in the URL")?;
    let mut stream = TcpStream::connect(host).await.with_context(|| format!("connect {host}"))?;
    let mut request = format!(
        "POST /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
    );
    for p in protocols {
        request.push_str(&format!("X-Stream-Protocol-Version: {p}\r\n"));
    }
    request.push_str("Content-Length: 0\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    // Read the response head byte by byte: what follows it is already SPDY.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        if stream.read(&mut byte).await? == 0 || head.len() > 16 * 1024 {
            bail!("the server hung up during the upgrade: {}", String::from_utf8_lossy(&head));
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    if !head.starts_with("HTTP/1.1 101") {
        bail!("no upgrade: {head}");
    }
    let protocol = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("x-stream-protocol-version").then(|| value.trim().to_string())
        })
        .context("no X-Stream-Protocol-Version in the answer")?;
    Ok((stream, protocol))
}

impl RemoteCommand {
    /// Connects to an Exec or Attach URL and opens the channels.
    pub async fn connect(url: &str, channels: Channels) -> Result<Self> {
        let offered = ["v5.channel.k8s.io", "v4.channel.k8s.io", "v3.channel.k8s.io"];
        let (stream, protocol) = upgrade(url, &offered).await?;
        let (session, _incoming) = Session::client(stream);
        let open = |kind: &str| {
            let session = session.clone();
            let headers = vec![("streamtype".to_string(), kind.to_string())];
            async move { session.open_stream(headers, false).await }
        };
        let error = open("error").await?;
        let stdin = if channels.stdin { Some(open("stdin").await?.writer()) } else { None };
        let stdout = if channels.stdout { Some(open("stdout").await?) } else { None };
        let stderr =
            if channels.stderr && !channels.tty { Some(open("stderr").await?) } else { None };
        let resize = if channels.tty { Some(open("resize").await?.writer()) } else { None };
        Ok(Self { protocol, session, error, stdin, stdout, stderr, resize })
    }

    /// Sends a terminal size, as kubectl does on start and on SIGWINCH.
    pub async fn resize(&self, width: u16, height: u16) -> Result<()> {
        let writer = self.resize.as_ref().context("no resize channel (no tty)")?;
        writer.write(format!("{{\"Width\":{width},\"Height\":{height}}}\n").as_bytes()).await?;
        Ok(())
    }

    /// Reads stdout until it holds `needle` (or `timeout` passes); returns what it read.
    pub async fn read_stdout_until(&mut self, needle: &str, timeout: Duration) -> Result<Vec<u8>> {
        let stdout = self.stdout.as_mut().context("no stdout channel")?;
        let mut got = Vec::new();
        let read = async {
            while !String::from_utf8_lossy(&got).contains(needle) {
                match stdout.read().await {
                    Some(data) => got.extend_from_slice(&data),
                    None => break,
                }
            }
        };
        let _ = tokio::time::timeout(timeout, read).await;
        Ok(got)
    }

    /// Reads every channel to its end and the status.
    pub async fn finish(self, timeout: Duration) -> Result<Finished> {
        let Self { session, mut error, stdout, stderr, .. } = self;
        let drain = |stream: Option<Stream>| async move {
            match stream {
                Some(mut stream) => read_all(&mut stream).await,
                None => Vec::new(),
            }
        };
        let all = async {
            let (stdout, stderr, status) =
                tokio::join!(drain(stdout), drain(stderr), read_all(&mut error));
            Finished { stdout, stderr, status: String::from_utf8_lossy(&status).into_owned() }
        };
        let finished =
            tokio::time::timeout(timeout, all).await.context("the session did not end")?;
        session.close().await;
        Ok(finished)
    }
}

/// A port-forward client, as client-go's: per connection an `error` and a `data` stream with
/// the same `port` and `requestid`.
pub struct PortForward {
    session: Session,
    next_request: u32,
}

impl PortForward {
    pub async fn connect(url: &str) -> Result<Self> {
        let (stream, protocol) = upgrade(url, &["portforward.k8s.io"]).await?;
        if protocol != "portforward.k8s.io" {
            bail!("the server chose {protocol}");
        }
        let (session, _incoming) = Session::client(stream);
        Ok(Self::from_session(session))
    }

    /// A client on a SPDY session already set up (over WebSocket, say).
    pub(crate) fn from_session(session: Session) -> Self {
        Self { session, next_request: 0 }
    }

    /// Opens a forwarded connection to `port` in the pod: (error stream, data stream).
    pub async fn open(&mut self, port: u16) -> Result<(Stream, Stream)> {
        let request = self.next_request.to_string();
        self.next_request += 1;
        let headers = |kind: &str| {
            vec![
                ("streamtype".to_string(), kind.to_string()),
                ("port".to_string(), port.to_string()),
                ("requestid".to_string(), request.clone()),
            ]
        };
        let error = self.session.open_stream(headers("error"), false).await?;
        let data = self.session.open_stream(headers("data"), false).await?;
        Ok((error, data))
    }

    /// Sends `payload` on a new connection to `port` while reading what comes back, until as
    /// many bytes came back (or the connection ended); returns them.
    pub async fn round_trip(&mut self, port: u16, payload: &[u8]) -> Result<Vec<u8>> {
        let (mut error, mut data) = self.open(port).await?;
        let writer = data.writer();
        let send = async {
            for chunk in payload.chunks(64 * 1024) {
                writer.write(chunk).await?;
            }
            Ok::<_, anyhow::Error>(())
        };
        let receive = async {
            let mut got = Vec::new();
            while got.len() < payload.len() {
                match data.read().await {
                    Some(bytes) => got.extend_from_slice(&bytes),
                    None => break,
                }
            }
            got
        };
        let (sent, got) = tokio::join!(send, receive);
        sent?;
        writer.close().await?;
        if got.is_empty() && !payload.is_empty() {
            let error = read_all(&mut error).await;
            bail!("nothing came back: {}", String::from_utf8_lossy(&error));
        }
        Ok(got)
    }

    pub async fn close(self) {
        self.session.close().await;
    }
}

/// Reads a stream to its end.
pub async fn read_all(stream: &mut Stream) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(bytes) = stream.read().await {
        out.extend_from_slice(&bytes);
    }
    out
}
