//! The control socket: a unix socket on which the daemon sends one line of JSON per
//! connection and reads one line of JSON back.
//!
//! ```text
//! {"op":"status"}                                   -> {"ok":true,"status":{...}}
//! {"op":"pause"} / {"op":"resume"} / {"op":"stop"}  -> {"ok":true}
//! {"op":"swap_drive","id":"d1","path":"/x.img","read_only":true} -> {"ok":true}
//! {"op":"snapshot","dir":"/run/x/snap"}             -> {"ok":true,"snapshot":{...}}
//! anything else                                     -> {"ok":false,"error":"..."}
//! ```
//! `snapshot` needs a paused VM and a directory without a snapshot in it (see
//! [`crate::snapshot`]); `podvisor vmm --restore <dir>` starts a VM from it.
//! `stop` answers first, then the VMM stops the vCPUs and exits.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use event_manager::{EventOps, Events, MutEventSubscriber};
use serde::{Deserialize, Serialize};
use vmm_sys_util::epoll::EventSet;

use crate::snapshot::SnapshotSummary;
use crate::vmm::RunControl;
use crate::vstate::{ExitReason, RunState};

/// Longest request line accepted.
const MAX_REQUEST: u64 = 64 * 1024;
/// A client that sends nothing for this long is dropped (the loop must not block on it).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("binding the control socket {path}: {source}")]
    Bind { path: PathBuf, source: std::io::Error },
    #[error("talking to the VMM control socket {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("bad answer from the VMM control socket {path}: {source}")]
    Answer { path: PathBuf, source: serde_json::Error },
}

/// A control request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Status,
    Pause,
    Resume,
    Stop,
    SwapDrive {
        id: String,
        path: PathBuf,
        #[serde(default)]
        read_only: bool,
    },
    Snapshot {
        dir: PathBuf,
    },
}

/// What `status` reports.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Status {
    pub state: String,
    pub vcpus: usize,
    pub memory_mib: u32,
    pub pid: u32,
    /// When `main_with_args` started (ns since the epoch).
    pub started_unix_ns: u64,
    /// When vCPU 0 first exited to the VMM (ns since the epoch).
    pub first_exit_unix_ns: Option<u64>,
}

/// The answer to a request.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotSummary>,
}

impl Response {
    fn ok() -> Self {
        Response { ok: true, ..Default::default() }
    }

    fn error(message: impl Into<String>) -> Self {
        Response { ok: false, error: Some(message.into()), ..Default::default() }
    }
}

/// Serves the control socket from the VMM's event loop.
pub struct ControlServer {
    listener: UnixListener,
    run: Arc<RunControl>,
    started_unix_ns: u64,
}

impl ControlServer {
    /// Binds `path` (replacing a stale socket file).
    pub fn bind(
        path: &Path,
        run: Arc<RunControl>,
        started_unix_ns: u64,
    ) -> Result<Self, ControlError> {
        let bind_err = |source| ControlError::Bind { path: path.to_path_buf(), source };
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(bind_err(e)),
            _ => {}
        }
        let listener = UnixListener::bind(path).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        Ok(Self { listener, run, started_unix_ns })
    }

    /// Takes an already bound listener (e.g. bound before entering the jail).
    pub fn from_listener(
        listener: UnixListener,
        run: Arc<RunControl>,
        started_unix_ns: u64,
    ) -> std::io::Result<Self> {
        listener.set_nonblocking(true)?;
        Ok(Self { listener, run, started_unix_ns })
    }

    fn status(&self) -> Status {
        let state = match self.run.control.state() {
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::Stopping => "stopping",
        };
        Status {
            state: state.to_string(),
            vcpus: self.run.vcpus,
            memory_mib: self.run.memory_mib,
            pid: std::process::id(),
            started_unix_ns: self.started_unix_ns,
            first_exit_unix_ns: self.run.control.first_exit_ns(),
        }
    }

    /// Executes one request.
    pub fn handle(&self, request: Request) -> Response {
        match request {
            Request::Status => Response { status: Some(self.status()), ..Response::ok() },
            Request::Pause => match self.run.pause() {
                Ok(()) => Response::ok(),
                Err(e) => Response::error(e.to_string()),
            },
            Request::Resume => {
                self.run.resume();
                Response::ok()
            }
            Request::Stop => {
                self.run.exit.request(ExitReason::HostStop);
                Response::ok()
            }
            Request::Snapshot { dir } => match self.run.snapshot(&dir) {
                Ok(summary) => {
                    tracing::info!(dir = %dir.display(), ?summary, "snapshot written");
                    Response { snapshot: Some(summary), ..Response::ok() }
                }
                Err(e) => Response::error(format!("snapshot into {}: {e}", dir.display())),
            },
            Request::SwapDrive { id, path, read_only } => {
                let drives = self.run.drives.lock().unwrap_or_else(|p| p.into_inner());
                match drives.get(&id) {
                    Some(swap) => match swap(&path, read_only) {
                        Ok(()) => Response::ok(),
                        Err(e) => Response::error(format!("swapping drive {id}: {e}")),
                    },
                    None => Response::error(format!("no drive with id {id:?}")),
                }
            }
        }
    }

    fn serve(&self, stream: UnixStream) {
        // Errors here concern one client only: drop the connection and keep serving.
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_read_timeout(Some(CLIENT_TIMEOUT));
        let _ = stream.set_write_timeout(Some(CLIENT_TIMEOUT));
        let mut line = String::new();
        let Ok(reader) = stream.try_clone() else { return };
        let read = BufReader::new(reader.take(MAX_REQUEST)).read_line(&mut line);
        let response = match read {
            Ok(0) => return,
            Ok(_) => match serde_json::from_str::<Request>(line.trim()) {
                Ok(request) => self.handle(request),
                Err(e) => Response::error(format!("bad request: {e}")),
            },
            Err(e) => Response::error(format!("reading the request: {e}")),
        };
        if let Ok(mut text) = serde_json::to_string(&response) {
            text.push('\n');
            let mut stream = stream;
            let _ = stream.write_all(text.as_bytes());
        }
    }
}

impl MutEventSubscriber for ControlServer {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        while let Ok((stream, _)) = self.listener.accept() {
            self.serve(stream);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.listener, EventSet::IN)) {
            self.run.exit.request(ExitReason::Error(format!("watching the control socket: {e}")));
        }
    }
}

/// Sends one request to the VMM at `path` and waits (up to `timeout`) for the answer.
pub fn request(
    path: &Path,
    request: &Request,
    timeout: Duration,
) -> Result<Response, ControlError> {
    let stream = UnixStream::connect(path)
        .map_err(|source| ControlError::Io { path: path.to_path_buf(), source })?;
    request_on(stream, path, request, timeout)
}

/// Sends one request on `stream`, already connected to the VMM's control socket at `path`
/// (a caller that must check who listens there connects itself).
pub fn request_on(
    mut stream: UnixStream,
    path: &Path,
    request: &Request,
    timeout: Duration,
) -> Result<Response, ControlError> {
    let io_err = |source| ControlError::Io { path: path.to_path_buf(), source };
    stream.set_read_timeout(Some(timeout)).map_err(io_err)?;
    stream.set_write_timeout(Some(timeout)).map_err(io_err)?;
    let mut text = serde_json::to_string(request)
        .map_err(|source| ControlError::Answer { path: path.to_path_buf(), source })?;
    text.push('\n');
    stream.write_all(text.as_bytes()).map_err(io_err)?;
    let mut line = String::new();
    BufReader::new(stream.take(MAX_REQUEST)).read_line(&mut line).map_err(io_err)?;
    serde_json::from_str(line.trim())
        .map_err(|source| ControlError::Answer { path: path.to_path_buf(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_a_stable_wire_form() {
        assert_eq!(serde_json::to_string(&Request::Status).unwrap(), r#"{"op":"status"}"#);
        let swap: Request =
            serde_json::from_str(r#"{"op":"swap_drive","id":"d","path":"/x"}"#).unwrap();
        assert_eq!(
            swap,
            Request::SwapDrive { id: "d".into(), path: "/x".into(), read_only: false }
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"reboot"}"#).is_err());
        let snap: Request = serde_json::from_str(r#"{"op":"snapshot","dir":"/s"}"#).unwrap();
        assert_eq!(snap, Request::Snapshot { dir: "/s".into() });
        let err = serde_json::to_string(&Response::error("x")).unwrap();
        assert_eq!(err, r#"{"ok":false,"error":"x"}"#);
    }
}
