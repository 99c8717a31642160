//! Kubernetes' remotecommand protocol (exec and attach), whatever carries it: the session core
//! starts the exec or finds the container to attach to, feeds the client's stdin and terminal
//! sizes to the process, copies its output to the client until it ends or the client goes
//! away, and says how it ended. Two transports adapt a connection to it: [`spdy`] (one SPDY
//! stream per channel, `v5`..`v1.channel.k8s.io`) and [`websocket`] (one channel byte per
//! message, `v5`/`v4.channel.k8s.io`); each also writes the status its way.

pub mod spdy;
pub mod websocket;

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use tracing::{debug, warn};

use super::tokens::StreamRequest;
use crate::agent::{OutputKind, ProcessId, StdioMode};
use crate::sandbox::exec::ExecSession;
use crate::sandbox::io::{Delivery, ProcessIo};
use crate::sandbox::{ContainerState, SandboxManager};

/// The longest resize message we take (they are tiny JSON objects).
const MAX_RESIZE_LINE: usize = 1024;

/// The protocol version in a name such as `v4.channel.k8s.io` (1 for `channel.k8s.io`): v3+
/// have the resize channel, v4+ a JSON status, v5 (WebSocket) the close channel.
pub fn version(protocol: &str) -> u8 {
    protocol
        .strip_prefix('v')
        .and_then(|v| v.split('.').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}

/// The channels a session carries: what the request asked for, as the protocol has them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Want {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub resize: bool,
}

impl Want {
    /// None for a request that is no exec or attach.
    pub fn of(request: &StreamRequest, protocol: &str) -> Option<Self> {
        let (stdin, stdout, stderr, tty) = match request {
            StreamRequest::Exec { stdin, stdout, stderr, tty, .. }
            | StreamRequest::Attach { stdin, stdout, stderr, tty, .. } => {
                (*stdin, *stdout, *stderr, *tty)
            }
            StreamRequest::PortForward { .. } => return None,
        };
        // A terminal merges stderr into stdout.
        Some(Self { stdin, stdout, stderr: stderr && !tty, resize: tty && version(protocol) >= 3 })
    }
}

/// A terminal size as the client sends it: `{"Width":W,"Height":H}` (client-go), or with
/// lowercase keys (the Python client; Go's decoder ignores case too).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
pub struct TerminalSize {
    #[serde(rename = "Width", alias = "width")]
    pub width: u16,
    #[serde(rename = "Height", alias = "height")]
    pub height: u16,
}

/// Splits resize messages out of a byte stream: newline-delimited JSON; the last one may come
/// without its newline ([`ResizeDecoder::finish`]).
#[derive(Debug, Default)]
pub struct ResizeDecoder {
    pending: Vec<u8>,
}

impl ResizeDecoder {
    /// The sizes complete in what has come so far, with `data`.
    pub fn push(&mut self, data: &[u8]) -> Vec<TerminalSize> {
        self.pending.extend_from_slice(data);
        let mut sizes = Vec::new();
        while let Some(end) = self.pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=end).collect();
            sizes.extend(parse_resize(&line));
        }
        if self.pending.len() > MAX_RESIZE_LINE {
            warn!("dropping an oversized resize message");
            self.pending.clear();
        }
        sizes
    }

    /// The size left without a newline, if any.
    pub fn finish(&mut self) -> Option<TerminalSize> {
        let rest = std::mem::take(&mut self.pending);
        parse_resize(&rest)
    }
}

fn parse_resize(line: &[u8]) -> Option<TerminalSize> {
    if line.iter().all(u8::is_ascii_whitespace) {
        return None;
    }
    serde_json::from_slice(line)
        .inspect_err(|e| debug!(error = %e, "ignoring a malformed resize message"))
        .ok()
}

/// The client's input as its transport decodes it. `stdin` ends when the client half-closes
/// it or goes away.
#[derive(Default)]
pub struct ClientInput {
    pub stdin: Option<BoxStream<'static, Bytes>>,
    pub resize: Option<BoxStream<'static, TerminalSize>>,
}

/// Where a transport takes the process's output.
pub trait ClientOutput: Sync {
    /// Sends output on the stdout or stderr channel (only those in [`Want`] are called); a
    /// client that has gone is not an error here, [`closed`](Self::closed) tells.
    fn send(&self, kind: OutputKind, data: Bytes) -> impl Future<Output = ()> + Send;
    /// Resolves once the client has hung up.
    fn closed(&self) -> impl Future<Output = ()> + Send;
}

/// How the command ended, as the error channel says it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Exited(i32),
    Failed(String),
}

/// The error channel's message: the status JSON of v4+, or plain text before.
pub fn status_message(protocol: &str, outcome: &Outcome) -> Option<Vec<u8>> {
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

/// Runs the exec or attach of `request` with the client's `input` and `output` until the
/// process's output ends or the client goes away; says how it ended.
pub async fn run(
    request: StreamRequest,
    want: Want,
    manager: &Arc<SandboxManager>,
    input: ClientInput,
    output: &impl ClientOutput,
) -> Outcome {
    match request {
        StreamRequest::Exec { container_id, cmd, tty, .. } => {
            let stdio = StdioMode { stdin: want.stdin, stdin_once: false, tty };
            match manager.exec(&container_id, cmd, stdio).await {
                Ok(exec) => run_exec(exec, want, input, output).await,
                Err(e) => Outcome::Failed(e.to_string()),
            }
        }
        StreamRequest::Attach { container_id, .. } => {
            run_attach(manager, &container_id, want, input, output).await
        }
        StreamRequest::PortForward { .. } => {
            Outcome::Failed("a port-forward request is no exec or attach".into())
        }
    }
}

async fn run_exec(
    mut exec: ExecSession,
    want: Want,
    input: ClientInput,
    output: &impl ClientOutput,
) -> Outcome {
    spawn_input(input, exec.io.clone(), true);
    loop {
        tokio::select! {
            chunk = exec.output.recv() => match chunk {
                Some(chunk) => deliver(output, want, chunk.kind, Bytes::from(chunk.data)).await,
                // All output is out: the process has ended, or ends now (with a terminal
                // and stdin open, its exit ends the session even though stdin stays open).
                None => break,
            },
            () = output.closed() => {
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
    manager: &SandboxManager,
    container_id: &str,
    want: Want,
    input: ClientInput,
    output: &impl ClientOutput,
) -> Outcome {
    let rec = match manager.container(container_id) {
        Ok(rec) if rec.state == ContainerState::Running => rec,
        Ok(rec) => return Outcome::Failed(format!("container {} is not running", rec.id)),
        Err(e) => return Outcome::Failed(e.to_string()),
    };
    let Some(io) = manager.process_io(&ProcessId::init(&rec.id)) else {
        return Outcome::Failed(format!("container {} has no output to attach to", rec.id));
    };
    if input.stdin.is_some() && !rec.stdin {
        return Outcome::Failed(format!("container {} was not created with stdin", rec.id));
    }
    let mut chunks = io.subscribe(Delivery::DropWhenSlow);
    // stdin_once: the container's stdin closes when this (first) client is done with it.
    spawn_input(input, io, rec.stdin_once);
    loop {
        tokio::select! {
            chunk = chunks.recv() => match chunk {
                Some(chunk) => deliver(output, want, chunk.kind, Bytes::from(chunk.data)).await,
                None => break,
            },
            () = output.closed() => break,
        }
    }
    Outcome::Exited(0)
}

/// Feeds the client's stdin and resizes to the process, in the background; both end with
/// the client's input (or, for stdin, when the process no longer takes it).
fn spawn_input(input: ClientInput, io: Arc<ProcessIo>, close_stdin_at_end: bool) {
    if let Some(mut stdin) = input.stdin {
        let io = io.clone();
        tokio::spawn(async move {
            while let Some(data) = stdin.next().await {
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
    if let Some(mut sizes) = input.resize {
        tokio::spawn(async move {
            while let Some(size) = sizes.next().await {
                if let Err(e) = io.resize(u32::from(size.width), u32::from(size.height)).await {
                    debug!(error = %e, "resizing the terminal");
                }
            }
        });
    }
}

/// Copies output to the client's channels (stderr goes to stdout when the client has no
/// stderr channel, as on a terminal).
async fn deliver(output: &impl ClientOutput, want: Want, kind: OutputKind, data: Bytes) {
    let kind = match kind {
        OutputKind::Stderr if want.stderr => OutputKind::Stderr,
        OutputKind::Stdout | OutputKind::Stderr if want.stdout => OutputKind::Stdout,
        _ => return,
    };
    output.send(kind, data).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_versions_are_read_from_their_names() {
        assert_eq!(version("v4.channel.k8s.io"), 4);
        assert_eq!(version("v5.channel.k8s.io"), 5);
        assert_eq!(version("v4.base64.channel.k8s.io"), 4);
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

    #[test]
    fn a_terminal_has_no_stderr_channel_and_resizes_from_v3() {
        let exec = |tty| StreamRequest::Exec {
            container_id: "c".into(),
            cmd: vec![],
            tty,
            stdin: true,
            stdout: true,
            stderr: true,
        };
        let want = Want::of(&exec(true), "v5.channel.k8s.io").unwrap();
        assert_eq!(want, Want { stdin: true, stdout: true, stderr: false, resize: true });
        assert!(!Want::of(&exec(true), "v2.channel.k8s.io").unwrap().resize);
        assert!(Want::of(&exec(false), "v4.channel.k8s.io").unwrap().stderr);
        let forward = StreamRequest::PortForward { sandbox_id: "p".into() };
        assert_eq!(Want::of(&forward, "v4.channel.k8s.io"), None);
    }

    #[test]
    fn resizes_are_split_at_newlines_and_take_either_case() {
        let mut decoder = ResizeDecoder::default();
        assert_eq!(decoder.push(br#"{"Width":80,"Hei"#), vec![]);
        assert_eq!(
            decoder.push(b"ght\":24}\n{\"width\":100,\"height\":30}\n{\"Width\":1"),
            vec![TerminalSize { width: 80, height: 24 }, TerminalSize { width: 100, height: 30 }]
        );
        assert_eq!(decoder.push(b",\"Height\":2}"), vec![]);
        assert_eq!(decoder.finish(), Some(TerminalSize { width: 1, height: 2 }));
        assert_eq!(decoder.finish(), None);
    }

    #[test]
    fn bad_resizes_are_dropped_not_fatal() {
        let mut decoder = ResizeDecoder::default();
        assert_eq!(decoder.push(b"not json\n{\"Width\":-1,\"Height\":2}\n\n"), vec![]);
        assert!(decoder.push(&vec![b'x'; MAX_RESIZE_LINE + 1]).is_empty());
        assert!(decoder.pending.is_empty(), "an oversized line is not kept");
        assert_eq!(decoder.push(b"{\"Width\":3,\"Height\":4}\n").len(), 1);
    }
}
