//! Kubernetes' remotecommand protocol over SPDY/3.1 (`v5`..`v1` `channel.k8s.io`): the
//! client opens one stream per channel, each marked by a `streamtype` header (`error`,
//! `stdin`, `stdout`, `stderr`, `resize`); the server answers each at once, then carries the
//! process's I/O on them and ends with its status on the error stream.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use podvisor_spdy::{Incoming, Session, Stream, StreamWriter};
use tracing::{debug, warn};

use super::tokens::StreamRequest;
use crate::agent::{OutputKind, ProcessId, StdioMode};
use crate::sandbox::exec::ExecSession;
use crate::sandbox::io::{Delivery, ProcessIo};
use crate::sandbox::{ContainerState, SandboxManager};

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
/// The longest resize message we take (they are tiny JSON objects).
const MAX_RESIZE_LINE: usize = 1024;

/// Whether the protocol has the resize channel and a JSON status (v3+, v4+).
fn version(protocol: &str) -> u8 {
    protocol
        .strip_prefix('v')
        .and_then(|v| v.split('.').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}

/// The channels of one session.
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
}

#[derive(Debug, Clone, Copy)]
struct Want {
    stdin: bool,
    stdout: bool,
    stderr: bool,
    resize: bool,
}

/// How the command ended, as the error channel says it.
enum Outcome {
    Exited(i32),
    Failed(String),
}

/// The error channel's message: the status JSON of v4+, or plain text before.
fn status_message(protocol: &str, outcome: &Outcome) -> Option<Vec<u8>> {
    let v4 = version(protocol) >= 4;
    match outcome {
        Outcome::Exited(0) => v4.then(|| br#"{"metadata":{},"status":"Success"}"#.to_vec()),
        Outcome::Exited(code) => {
            let message = format!("command terminated with non-zero exit code: exit code {code}");
            if !v4 {
                return Some(message.into_bytes());
            }
            let status = serde_json::json!({
                "metadata": {},
                "status": "Failure",
                "message": message,
                "reason": "NonZeroExitCode",
                "details": { "causes": [{ "reason": "ExitCode", "message": code.to_string() }] },
            });
            Some(status.to_string().into_bytes())
        }
        Outcome::Failed(message) => {
            if !v4 {
                return Some(message.clone().into_bytes());
            }
            let status = serde_json::json!({
                "metadata": {},
                "status": "Failure",
                "message": message,
                "reason": "InternalError",
            });
            Some(status.to_string().into_bytes())
        }
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
    let (stdin, stdout, stderr, tty) = match &request {
        StreamRequest::Exec { stdin, stdout, stderr, tty, .. }
        | StreamRequest::Attach { stdin, stdout, stderr, tty, .. } => {
            (*stdin, *stdout, *stderr, *tty)
        }
        StreamRequest::PortForward { .. } => {
            debug!("a port-forward request reached remotecommand");
            session.close().await;
            return;
        }
    };
    let want =
        Want { stdin, stdout, stderr: stderr && !tty, resize: tty && version(protocol) >= 3 };
    let Some(mut channels) = Channels::collect(&mut incoming, want).await else {
        debug!("the client did not open its streams");
        session.close().await;
        return;
    };
    let outcome = match request {
        StreamRequest::Exec { container_id, cmd, .. } => {
            let stdio = StdioMode { stdin, stdin_once: false, tty };
            match manager.exec(&container_id, cmd, stdio).await {
                Ok(exec) => run_exec(&session, &mut channels, exec).await,
                Err(e) => Outcome::Failed(e.to_string()),
            }
        }
        StreamRequest::Attach { container_id, .. } => {
            run_attach(&session, &mut channels, &manager, &container_id).await
        }
        StreamRequest::PortForward { .. } => return,
    };
    finish(&session, channels, protocol, outcome).await;
}

/// Feeds the client's stdin and resizes to the process, in the background.
fn spawn_input(channels: &mut Channels, io: Arc<ProcessIo>, close_stdin_at_end: bool) {
    if let Some(mut stdin) = channels.stdin.take() {
        let io = io.clone();
        tokio::spawn(async move {
            while let Some(data) = stdin.read().await {
                if let Err(e) = io.write_stdin(data.to_vec()).await {
                    debug!(error = %e, "writing stdin");
                    return;
                }
            }
            // The client half-closed stdin (or went away).
            if close_stdin_at_end {
                let _ = io.close_stdin().await;
            }
        });
    }
    if let Some(mut resize) = channels.resize.take() {
        tokio::spawn(async move {
            let mut pending = Vec::new();
            while let Some(data) = resize.read().await {
                pending.extend_from_slice(&data);
                while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=end).collect();
                    apply_resize(&io, &line).await;
                }
                if pending.len() > MAX_RESIZE_LINE {
                    warn!("dropping an oversized resize message");
                    pending.clear();
                }
            }
            // The last message may come without its newline.
            if !pending.is_empty() {
                apply_resize(&io, &pending).await;
            }
        });
    }
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct TerminalSize {
    width: u16,
    height: u16,
}

async fn apply_resize(io: &ProcessIo, line: &[u8]) {
    match serde_json::from_slice::<TerminalSize>(line) {
        Ok(size) => {
            if let Err(e) = io.resize(u32::from(size.width), u32::from(size.height)).await {
                debug!(error = %e, "resizing the terminal");
            }
        }
        Err(e) => debug!(error = %e, "ignoring a malformed resize message"),
    }
}

/// Copies output to the client's streams (a terminal has only stdout).
async fn deliver(channels: &Channels, kind: OutputKind, data: Bytes) {
    let target = match kind {
        OutputKind::Stdout => channels.stdout.as_ref(),
        OutputKind::Stderr => channels.stderr.as_ref().or(channels.stdout.as_ref()),
    };
    if let Some(writer) = target {
        if let Err(e) = writer.write(&data).await {
            debug!(error = %e, "writing output to the client");
        }
    }
}

async fn run_exec(session: &Session, channels: &mut Channels, mut exec: ExecSession) -> Outcome {
    spawn_input(channels, exec.io.clone(), true);
    loop {
        tokio::select! {
            chunk = exec.output.recv() => match chunk {
                Some(chunk) => deliver(channels, chunk.kind, Bytes::from(chunk.data)).await,
                // All output is out: the process has ended, or ends now (with a terminal
                // and stdin open, its exit ends the session even though stdin stays open).
                None => break,
            },
            _ = session.closed() => {
                // The client went away: leave nothing running in the guest.
                let _ = exec.kill().await;
                break;
            }
        }
    }
    match exec.wait().await {
        Ok(status) => Outcome::Exited(status.exit_code),
        Err(e) => Outcome::Failed(e.to_string()),
    }
}

async fn run_attach(
    session: &Session,
    channels: &mut Channels,
    manager: &SandboxManager,
    container_id: &str,
) -> Outcome {
    let rec = match manager.container(container_id) {
        Ok(rec) if rec.state == ContainerState::Running => rec,
        Ok(rec) => return Outcome::Failed(format!("container {} is not running", rec.id)),
        Err(e) => return Outcome::Failed(e.to_string()),
    };
    let Some(io) = manager.process_io(&ProcessId::init(&rec.id)) else {
        return Outcome::Failed(format!("container {} has no output to attach to", rec.id));
    };
    if channels.stdin.is_some() && !rec.stdin {
        return Outcome::Failed(format!("container {} was not created with stdin", rec.id));
    }
    let mut output = io.subscribe(Delivery::DropWhenSlow);
    // stdin_once: the container's stdin closes when this (first) client is done with it.
    spawn_input(channels, io, rec.stdin_once);
    loop {
        tokio::select! {
            chunk = output.recv() => match chunk {
                Some(chunk) => deliver(channels, chunk.kind, Bytes::from(chunk.data)).await,
                None => break,
            },
            _ = session.closed() => break,
        }
    }
    Outcome::Exited(0)
}

/// Ends cleanly: FIN on the output streams, the status, FIN on the error stream, GOAWAY, then
/// a moment for the client to hang up (closing at once could lose output in flight).
async fn finish(session: &Session, channels: Channels, protocol: &str, outcome: Outcome) {
    for writer in [&channels.stdout, &channels.stderr].into_iter().flatten() {
        let _ = writer.close().await;
    }
    if let Some(error) = &channels.error {
        if let Some(message) = status_message(protocol, &outcome) {
            let _ = error.write(&message).await;
        }
        let _ = error.close().await;
    }
    let _ = session.goaway().await;
    let _ = tokio::time::timeout(CLOSE_GRACE, session.closed()).await;
    session.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_versions_are_read_from_their_names() {
        assert_eq!(version("v4.channel.k8s.io"), 4);
        assert_eq!(version("channel.k8s.io"), 1);
    }

    #[test]
    fn status_messages_follow_the_protocol_version() {
        let v4 = "v4.channel.k8s.io";
        assert_eq!(
            status_message(v4, &Outcome::Exited(0)).unwrap(),
            br#"{"metadata":{},"status":"Success"}"#
        );
        let failed: serde_json::Value =
            serde_json::from_slice(&status_message(v4, &Outcome::Exited(3)).unwrap()).unwrap();
        assert_eq!(failed["reason"], "NonZeroExitCode");
        assert_eq!(failed["details"]["causes"][0]["message"], "3");
        assert!(status_message("v2.channel.k8s.io", &Outcome::Exited(0)).is_none());
        let text = status_message("v2.channel.k8s.io", &Outcome::Exited(2)).unwrap();
        assert!(String::from_utf8(text).unwrap().contains("exit code 2"));
    }
}
