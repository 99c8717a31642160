//! `podvisor images import|export` and the way they reach the image store.
//!
//! The daemon holds an exclusive `flock` on `<root>/images/lock` for its lifetime and serves
//! `<state>/images.sock` (mode 0600): one JSON request line, one JSON answer line. The command
//! asks the daemon through that socket when it runs (the daemon reads and writes the files
//! itself, so paths are sent absolute); when no daemon answers it takes the lock and opens the
//! store itself, so a daemon starting meanwhile waits for it. Before its answer the daemon
//! sends progress lines (`{"progress":{"item":…,"step":"copy","done":…,"total":…}}`).

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::fcntl::{Flock, FlockArg};
use podvisor_image::{ArchiveProgress, ImageRecord, ImageStore, ImageStoreConfig};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tracing::{info, warn};

/// Why an images command or the control socket failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The lock file cannot be opened.
    #[error("open the image store lock {path}: {source}")]
    OpenLock {
        /// `<root>/images/lock`.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Someone holds the lock but the socket does not answer.
    #[error(
        "the image store {path} is locked (a daemon or another `podvisor images` holds it) and \
         {socket} does not answer"
    )]
    Locked {
        /// The lock file.
        path: PathBuf,
        /// The control socket.
        socket: PathBuf,
    },
    /// Taking the lock failed otherwise.
    #[error("lock the image store {path}: {source}")]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// The cause.
        source: nix::Error,
    },
    /// A file named on the command line does not exist.
    #[error("{path}: {source}")]
    Path {
        /// As given.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Talking to the daemon failed.
    #[error("talk to the daemon at {socket}: {source}")]
    Socket {
        /// The control socket.
        socket: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The daemon's answer does not parse.
    #[error("unreadable answer from the daemon at {socket}: {source}")]
    Answer {
        /// The control socket.
        socket: PathBuf,
        /// The cause.
        source: serde_json::Error,
    },
    /// The import or export failed (in the daemon or here).
    #[error("{0}")]
    Store(String),
    /// The control socket cannot be set up.
    #[error("serve {socket}: {source}")]
    Serve {
        /// The control socket.
        socket: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// One request on the control socket.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    /// Archives or layout directories, absolute.
    Import(Vec<PathBuf>),
    /// An image and the absolute path of the OCI layout tar to write.
    Export { reference: String, file: PathBuf },
}

/// One image an import or export handled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Done {
    /// The image id.
    pub id: String,
    /// Its tags.
    pub tags: Vec<String>,
}

/// How far one file's import, or an export, is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// The archive imported, or the image exported.
    pub item: String,
    /// `extract`, `copy`, `unpack` (import) or `write` (export).
    pub step: String,
    /// Bytes done.
    pub done: u64,
    /// Bytes in all; 0 when unknown.
    pub total: u64,
}

/// A line from the daemon: progress lines, then the answer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Answer {
    Progress(Progress),
    Ok(Vec<Done>),
    Error(String),
}

fn done(record: &ImageRecord) -> Done {
    Done { id: record.id.clone(), tags: record.repo_tags.clone() }
}

/// `<root>/images/lock`.
pub fn lock_path(root: &Path) -> PathBuf {
    root.join("images").join("lock")
}

/// `<state>/images.sock`.
pub fn socket_path(state: &Path) -> PathBuf {
    state.join("images.sock")
}

fn open_lock(root: &Path) -> Result<File, ControlError> {
    let path = lock_path(root);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|source| ControlError::OpenLock { path: path.clone(), source })?;
    }
    File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| ControlError::OpenLock { path, source })
}

/// The store lock, held until dropped.
pub struct StoreLock(#[allow(dead_code)] Flock<File>);

/// Takes the store lock without waiting: None when someone holds it.
fn try_lock(root: &Path) -> Result<Option<StoreLock>, ControlError> {
    match Flock::lock(open_lock(root)?, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Some(StoreLock(lock))),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, source)) => Err(ControlError::Lock { path: lock_path(root), source }),
    }
}

/// Takes the store lock for the daemon, waiting (with a log line) for an images command that
/// holds it. Blocking.
pub fn lock_for_daemon(root: &Path) -> Result<StoreLock, ControlError> {
    if let Some(lock) = try_lock(root)? {
        return Ok(lock);
    }
    warn!(lock = %lock_path(root).display(), "image store locked (another daemon, or `podvisor images` running): waiting");
    Flock::lock(open_lock(root)?, FlockArg::LockExclusive)
        .map(StoreLock)
        .map_err(|(_, source)| ControlError::Lock { path: lock_path(root), source })
}

fn progress_of<'a>(item: &'a str, report: &'a dyn Fn(&Progress)) -> impl Fn(&ArchiveProgress) + 'a {
    move |p: &ArchiveProgress| {
        report(&Progress {
            item: item.to_owned(),
            step: p.step.to_owned(),
            done: p.done,
            total: p.total,
        })
    }
}

fn run(
    store: &ImageStore,
    request: Request,
    report: &dyn Fn(&Progress),
) -> Result<Vec<Done>, String> {
    match request {
        Request::Import(paths) => {
            let mut all = Vec::new();
            for path in paths {
                let item = path.display().to_string();
                let records = store
                    .import_reporting(&path, &progress_of(&item, report))
                    .map_err(|e| format!("import {item}: {e}"))?;
                all.extend(records.iter().map(done));
            }
            Ok(all)
        }
        Request::Export { reference, file } => store
            .export_reporting(&reference, &file, &progress_of(&reference, report))
            .map(|record| vec![done(&record)])
            .map_err(|e| format!("export {reference}: {e}")),
    }
}

/// Serves the control socket until the daemon exits.
pub fn serve(state: &Path, store: Arc<ImageStore>) -> Result<(), ControlError> {
    let socket = socket_path(state);
    let serve_error = |source| ControlError::Serve { socket: socket.clone(), source };
    match std::fs::remove_file(&socket) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(serve_error(e)),
        _ => {}
    }
    let listener = tokio::net::UnixListener::bind(&socket).map_err(serve_error)?;
    // Root only: an import reads any file the daemon can.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))
        .map_err(serve_error)?;
    info!(socket = %socket.display(), "serving image import/export");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            tokio::spawn(answer(stream, store.clone()));
        }
    });
    Ok(())
}

async fn answer(stream: tokio::net::UnixStream, store: Arc<ImageStore>) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    // Requests are a line of paths: a megabyte is plenty, and bounds a hostile client.
    let mut reader = tokio::io::BufReader::new(tokio::io::AsyncReadExt::take(read, 1 << 20));
    if reader.read_line(&mut line).await.is_err() {
        return;
    }
    let answer = match serde_json::from_str::<Request>(&line) {
        Ok(request) => {
            info!(?request, "images request");
            let (progress, mut progress_lines) = tokio::sync::mpsc::unbounded_channel();
            let task = tokio::task::spawn_blocking(move || {
                run(&store, request, &|p| {
                    // The client may be gone; the import goes on regardless.
                    let _ = progress.send(p.clone());
                })
            });
            // Ends when the task does (and drops the sender).
            while let Some(p) = progress_lines.recv().await {
                // A client that stopped reading still gets its import; progress is lossy.
                let _ = send_line(&mut write, &Answer::Progress(p)).await;
            }
            match task.await {
                Ok(Ok(done)) => Answer::Ok(done),
                Ok(Err(message)) => Answer::Error(message),
                Err(e) => Answer::Error(format!("images task failed: {e}")),
            }
        }
        Err(e) => Answer::Error(format!("bad request: {e}")),
    };
    let _ = send_line(&mut write, &answer).await;
}

async fn send_line(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    answer: &Answer,
) -> std::io::Result<()> {
    let mut bytes = serde_json::to_vec(answer).unwrap_or_default();
    bytes.push(b'\n');
    write.write_all(&bytes).await
}

fn absolute(path: &Path) -> Result<PathBuf, ControlError> {
    std::path::absolute(path).map_err(|source| ControlError::Path { path: path.to_owned(), source })
}

/// Runs `request` in the daemon if one answers on `state`'s socket, else on the store under
/// `root` directly (holding its lock, with `config`: the daemon's limits). Paths in `request`
/// may be relative. `report` sees the progress. Blocking.
pub fn request(
    root: &Path,
    state: &Path,
    config: ImageStoreConfig,
    request: Request,
    report: &dyn Fn(&Progress),
) -> Result<Vec<Done>, ControlError> {
    let request = match request {
        Request::Import(paths) => {
            Request::Import(paths.iter().map(|p| absolute(p)).collect::<Result<_, _>>()?)
        }
        Request::Export { reference, file } => {
            Request::Export { reference, file: absolute(&file)? }
        }
    };
    let socket = socket_path(state);
    match UnixStream::connect(&socket) {
        Ok(stream) => ask_daemon(&socket, stream, &request, report),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            let Some(_lock) = try_lock(root)? else {
                return Err(ControlError::Locked { path: lock_path(root), socket });
            };
            let store =
                ImageStore::open(root, config).map_err(|e| ControlError::Store(e.to_string()))?;
            run(&store, request, report).map_err(ControlError::Store)
        }
        Err(source) => Err(ControlError::Socket { socket, source }),
    }
}

fn ask_daemon(
    socket: &Path,
    mut stream: UnixStream,
    request: &Request,
    report: &dyn Fn(&Progress),
) -> Result<Vec<Done>, ControlError> {
    let socket_error = |source| ControlError::Socket { socket: socket.to_owned(), source };
    let mut line = serde_json::to_vec(request)
        .map_err(|source| ControlError::Answer { socket: socket.to_owned(), source })?;
    line.push(b'\n');
    stream.write_all(&line).map_err(socket_error)?;
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).map_err(socket_error)? == 0 {
            let closed = std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the daemon closed the socket without an answer",
            );
            return Err(socket_error(closed));
        }
        match serde_json::from_str(&line)
            .map_err(|source| ControlError::Answer { socket: socket.to_owned(), source })?
        {
            Answer::Progress(progress) => report(&progress),
            Answer::Ok(done) => return Ok(done),
            Answer::Error(message) => return Err(ControlError::Store(message)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An OCI layout tar of a one-file image named `example.com/tiny:1`.
    fn tiny_archive(dir: &Path) -> PathBuf {
        let layout = dir.join("layout");
        std::fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
        let blob = |data: &[u8]| {
            let digest = format!("sha256:{}", hex_digest(data));
            std::fs::write(layout.join("blobs/sha256").join(&digest[7..]), data).unwrap();
            (digest, data.len())
        };
        let mut tar = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_ustar();
        header.set_size(2);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut header, "hello", &b"hi"[..]).unwrap();
        let layer = tar.into_inner().unwrap();
        let (layer_digest, layer_size) = blob(&layer);
        let config = serde_json::json!({
            "architecture": "amd64", "os": "linux", "config": {},
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        })
        .to_string();
        let (config_digest, config_size) = blob(config.as_bytes());
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": config_digest, "size": config_size},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": layer_digest, "size": layer_size}],
        })
        .to_string();
        let (manifest_digest, manifest_size) = blob(manifest.as_bytes());
        let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest, "size": manifest_size,
            "annotations": {"org.opencontainers.image.ref.name": "example.com/tiny:1"},
        }]});
        std::fs::write(layout.join("index.json"), index.to_string()).unwrap();
        std::fs::write(layout.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        layout
    }

    fn hex_digest(data: &[u8]) -> String {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(data))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn import_and_export_go_through_a_running_daemon_and_without_one_through_the_lock() {
        let work = tempfile::tempdir().unwrap();
        let layout = tiny_archive(work.path());
        let state = work.path().join("state");
        std::fs::create_dir_all(&state).unwrap();
        let blocking = |root: PathBuf, state: PathBuf, req: Request| {
            tokio::task::spawn_blocking(move || {
                request(&root, &state, Default::default(), req, &|_| {})
            })
        };

        // No daemon: the command opens the store itself.
        let alone = work.path().join("alone");
        let done = blocking(alone, work.path().join("none"), Request::Import(vec![layout.clone()]))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(done[0].tags, vec!["example.com/tiny:1".to_owned()]);

        // A daemon: the lock held and the socket served; what it imports its store resolves.
        let root = work.path().join("daemon");
        let lock = lock_for_daemon(&root).unwrap();
        let store = Arc::new(ImageStore::open(&root, Default::default()).unwrap());
        serve(&state, store.clone()).unwrap();
        let imported = blocking(root.clone(), state.clone(), Request::Import(vec![layout.clone()]))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(imported, done);
        assert_eq!(store.resolve("example.com/tiny:1").map(|r| r.id), Some(done[0].id.clone()));
        let archive = work.path().join("tiny.tar");
        let export =
            Request::Export { reference: "example.com/tiny:1".into(), file: archive.clone() };
        let exported = blocking(root.clone(), state.clone(), export).await.unwrap().unwrap();
        assert_eq!(exported, done);

        // The export, into a fresh store with no daemon: the same image.
        let fresh = work.path().join("fresh");
        let again = blocking(fresh, work.path().join("none"), Request::Import(vec![archive]))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(again, done);

        // A daemon's error comes back as such.
        let missing = Request::Import(vec![work.path().join("missing.tar")]);
        let err = blocking(root.clone(), state.clone(), missing).await.unwrap().unwrap_err();
        assert!(matches!(err, ControlError::Store(_)), "{err}");

        // The lock held but no socket answering: refused, not a second writer.
        std::fs::remove_file(socket_path(&state)).unwrap();
        let err = blocking(root, state, Request::Import(vec![layout])).await.unwrap().unwrap_err();
        assert!(matches!(err, ControlError::Locked { .. }), "{err}");
        drop(lock);
    }
}
