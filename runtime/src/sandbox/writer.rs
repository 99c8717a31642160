//! Record writes on a thread of their own. A record write is an atomic replace with an fsync
//! of the file and of its directory (milliseconds, far more on a busy disk): on a tokio worker
//! it would stall every task queued there. The thread takes writes and removals in the order
//! they were queued, and callers queue them while holding the state lock, so records reach
//! the disk in the order they changed, and never after their removal. A caller awaits its
//! write before any side effect that needs the record on disk.

use std::path::{Path, PathBuf};
use std::sync::mpsc;

use serde::Serialize;
use tokio::sync::oneshot;

use crate::store::{self, StoreError};

enum Op {
    Write { path: PathBuf, data: Vec<u8> },
    Remove(PathBuf),
}

struct Job {
    op: Op,
    done: oneshot::Sender<Result<(), StoreError>>,
}

/// The queue of record writes and the thread that performs them.
pub struct RecordWriter {
    jobs: mpsc::Sender<Job>,
}

/// A queued write or removal; await [`Pending::done`] for its result.
#[must_use = "a record write is only known to be on disk once awaited"]
pub struct Pending {
    path: PathBuf,
    result: Result<oneshot::Receiver<Result<(), StoreError>>, StoreError>,
}

impl Pending {
    pub async fn done(self) -> Result<(), StoreError> {
        let gone = || StoreError::Write {
            path: self.path.clone(),
            source: std::io::Error::other("the record writer thread stopped"),
        };
        match self.result {
            Ok(answer) => answer.await.unwrap_or_else(|_| Err(gone())),
            Err(e) => Err(e),
        }
    }
}

impl RecordWriter {
    pub fn start() -> Self {
        Self::with_delay(std::time::Duration::ZERO)
    }

    /// `delay` before every operation: a slow disk, for tests.
    fn with_delay(delay: std::time::Duration) -> Self {
        let (jobs, queue) = mpsc::channel::<Job>();
        let spawned =
            std::thread::Builder::new().name("podvisor-records".into()).spawn(move || {
                // Ends when the manager (the only sender) is dropped.
                for job in queue {
                    std::thread::sleep(delay);
                    let result = match &job.op {
                        Op::Write { path, data } => store::write_atomic(path, data, true),
                        Op::Remove(path) => store::remove_path(path),
                    };
                    let _ = job.done.send(result);
                }
            });
        if let Err(e) = spawned {
            // Every write then fails with "the record writer thread stopped".
            tracing::error!("starting the record writer thread: {e}");
        }
        Self { jobs }
    }

    /// Queues `value` as the JSON record at `path` (encoded here, so the queued record is the
    /// caller's state at the time of the call).
    pub fn write_json<T: Serialize>(&self, path: &Path, value: &T) -> Pending {
        let data = serde_json::to_vec_pretty(value)
            .map_err(|source| StoreError::Encode { path: path.into(), source });
        match data {
            Ok(data) => self.queue(Op::Write { path: path.into(), data }, path),
            Err(e) => Pending { path: path.into(), result: Err(e) },
        }
    }

    /// Queues the removal of the record file or directory at `path`.
    pub fn remove(&self, path: &Path) -> Pending {
        self.queue(Op::Remove(path.into()), path)
    }

    fn queue(&self, op: Op, path: &Path) -> Pending {
        let (done, answer) = oneshot::channel();
        // A send fails only once the thread is gone; the receiver then reports it.
        let _ = self.jobs.send(Job { op, done });
        Pending { path: path.into(), result: Ok(answer) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// On a current-thread runtime, a task keeps running while a slow record write is
    /// awaited: the write does not hold the runtime's only thread.
    #[tokio::test(flavor = "current_thread")]
    async fn a_slow_write_does_not_block_the_runtime() {
        let dir = tempfile::tempdir().unwrap();
        let writer = RecordWriter::with_delay(Duration::from_millis(300));
        let ticker = tokio::spawn(async {
            let mut ticks = 0u32;
            let started = Instant::now();
            while started.elapsed() < Duration::from_millis(250) {
                tokio::time::sleep(Duration::from_millis(10)).await;
                ticks += 1;
            }
            ticks
        });
        let started = Instant::now();
        writer.write_json(&dir.path().join("r.json"), &1).done().await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(300));
        let ticks = ticker.await.unwrap();
        assert!(ticks >= 10, "the runtime ran {ticks} ticks during the write");
    }

    /// Writes and removals land in the order they were queued, however they are awaited.
    #[tokio::test]
    async fn operations_keep_their_order() {
        let dir = tempfile::tempdir().unwrap();
        let writer = RecordWriter::start();
        let path = dir.path().join("sandboxes/a/sandbox.json");
        let first = writer.write_json(&path, &"first");
        let second = writer.write_json(&path, &"second");
        let removed = writer.remove(&dir.path().join("sandboxes/a"));
        removed.done().await.unwrap();
        second.done().await.unwrap();
        first.done().await.unwrap();
        assert!(!path.exists());
        for n in 0..20 {
            let _ = writer.write_json(&path, &n);
        }
        writer.write_json(&path, &"last").done().await.unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "\"last\"");
    }
}
