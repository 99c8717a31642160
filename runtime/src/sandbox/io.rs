//! Container I/O, as containerd's `container_io.go`: each process in the guest has one reader
//! of its output on the host ([`ProcessIo::pump`]), which feeds the CRI log (for a container)
//! and any number of subscribers (attach and exec clients, ExecSync); stdin and TTY resizes
//! go the other way through the same hub.
//!
//! The reader survives a broken agent stream: it asks again from the offsets it has, and the
//! agent resends what the break swallowed ([`OutputOffsets`]); for a container the offsets of
//! what reached the log are persisted, so a restarted daemon resumes without loss or repeats.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{mpsc, watch};
use tracing::{debug, warn};

use super::logs::LogWriter;
use crate::agent::{self, GuestAgent, OutputChunk, ProcessId};
use crate::store;

/// Chunks a subscriber may have queued before it counts as slow.
const SUBSCRIBER_QUEUE: usize = 64;
/// Pause before asking the agent again after a broken output stream.
const RETRY_INTERVAL: Duration = Duration::from_millis(500);

/// How output reaches a subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Every byte: a slow subscriber slows the reader (the only client of an exec).
    Lossless,
    /// A subscriber that falls [`SUBSCRIBER_QUEUE`] chunks behind is cut off, so it cannot
    /// hold up the log or the other clients (attach).
    #[cfg_attr(not(test), allow(dead_code))] // Attach (the streaming issue) subscribes so.
    DropWhenSlow,
}

struct Subscriber {
    tx: mpsc::Sender<OutputChunk>,
    delivery: Delivery,
}

/// The I/O hub of one process.
pub struct ProcessIo {
    agent: Arc<dyn GuestAgent>,
    process: ProcessId,
    subscribers: Mutex<Vec<Subscriber>>,
    ended: watch::Sender<bool>,
}

/// Where a container's output goes besides the subscribers.
pub struct LogSink {
    pub writer: Arc<LogWriter>,
    /// Where the offsets of what is in the log are kept across daemon restarts.
    pub offsets_path: PathBuf,
}

impl LogSink {
    /// Appends accepted output and records how far the log has come. Blocking.
    fn append(&self, slot: usize, data: &[u8], offsets: OutputOffsets) {
        if let Err(e) = self.writer.write_chunk(slot, data) {
            warn!(error = %e, "writing container log");
        }
        offsets.save(&self.offsets_path, Some(&self.writer));
    }

    /// The output has ended: what is held back goes out too. Blocking.
    fn finish(&self, offsets: OutputOffsets) {
        if let Err(e) = self.writer.flush_partial() {
            warn!(error = %e, "writing container log");
        }
        offsets.save(&self.offsets_path, Some(&self.writer));
    }
}

impl ProcessIo {
    pub fn new(agent: Arc<dyn GuestAgent>, process: ProcessId) -> Arc<Self> {
        Arc::new(Self {
            agent,
            process,
            subscribers: Mutex::new(Vec::new()),
            ended: watch::channel(false).0,
        })
    }

    fn subscribers(&self) -> std::sync::MutexGuard<'_, Vec<Subscriber>> {
        self.subscribers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Output from now on; the receiver ends when the process's output does (at once if it
    /// already has).
    pub fn subscribe(&self, delivery: Delivery) -> mpsc::Receiver<OutputChunk> {
        let (tx, rx) = mpsc::channel(SUBSCRIBER_QUEUE);
        if !*self.ended.borrow() {
            self.subscribers().push(Subscriber { tx, delivery });
        }
        rx
    }

    /// How many subscribers are attached.
    #[cfg(test)]
    pub fn subscriber_count(&self) -> usize {
        self.subscribers().len()
    }

    /// Whether the process's output has ended.
    pub fn has_ended(&self) -> bool {
        *self.ended.borrow()
    }

    // Stdin and resizes go the other way. Streaming exec and attach (the streaming issue) are
    // their callers; until then only the tests are.

    #[cfg_attr(not(test), allow(dead_code))]
    pub async fn write_stdin(&self, data: Vec<u8>) -> agent::Result<()> {
        self.agent.write_stdin(&self.process, data).await
    }

    #[cfg_attr(not(test), allow(dead_code))]
    pub async fn close_stdin(&self) -> agent::Result<()> {
        self.agent.close_stdin(&self.process).await
    }

    #[cfg_attr(not(test), allow(dead_code))]
    pub async fn resize(&self, width: u32, height: u32) -> agent::Result<()> {
        self.agent.resize_tty(&self.process, width, height).await
    }

    /// Hands `chunk` to every subscriber, dropping those that left or fell behind.
    async fn fan_out(&self, chunk: OutputChunk) {
        let targets: Vec<(mpsc::Sender<OutputChunk>, Delivery)> =
            self.subscribers().iter().map(|s| (s.tx.clone(), s.delivery)).collect();
        let mut gone = Vec::new();
        for (tx, delivery) in targets {
            let delivered = match delivery {
                Delivery::Lossless => tx.send(chunk.clone()).await.is_ok(),
                Delivery::DropWhenSlow => match tx.try_send(chunk.clone()) {
                    Ok(()) => true,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        warn!(process = ?self.process, "an output client fell behind; detaching it");
                        false
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => false,
                },
            };
            if !delivered {
                gone.push(tx);
            }
        }
        if !gone.is_empty() {
            self.subscribers().retain(|s| !gone.iter().any(|g| g.same_channel(&s.tx)));
        }
    }

    /// Runs `work` on the log from the blocking pool: file writes on an async worker would
    /// hold up every other CRI call it serves (a container printing newlines did).
    async fn off_the_workers(
        &self,
        log: &Arc<LogSink>,
        work: impl FnOnce(&LogSink) + Send + 'static,
    ) {
        let log = Arc::clone(log);
        if let Err(e) = tokio::task::spawn_blocking(move || work(&log)).await {
            warn!(process = ?self.process, error = %e, "the container log writer failed");
        }
    }

    /// The output has ended: subscribers see the end of their streams.
    fn finish(&self) {
        self.ended.send_replace(true);
        self.subscribers().clear();
    }

    /// Reads the process's output until it ends, into `log` (if any) and the subscribers.
    /// After a broken stream it asks again while `keep_going` says the process still runs.
    pub async fn pump(
        self: Arc<Self>,
        mut offsets: OutputOffsets,
        log: Option<LogSink>,
        keep_going: impl Fn() -> bool + Send,
    ) {
        let log = log.map(Arc::new);
        loop {
            let from = offsets.written(log.as_ref().map(|l| l.writer.as_ref()));
            match self.agent.output(&self.process, from).await {
                Ok(mut stream) => loop {
                    match stream.next().await {
                        Some(Ok(chunk)) => {
                            let Some((slot, data)) = offsets.accept(&self.process, &chunk) else {
                                continue;
                            };
                            let fresh =
                                OutputChunk { kind: chunk.kind, data: data.to_vec(), offset: 0 };
                            if let Some(log) = &log {
                                let data = fresh.data.clone();
                                self.off_the_workers(log, move |log| {
                                    log.append(slot, &data, offsets)
                                })
                                .await;
                            }
                            self.fan_out(fresh).await;
                        }
                        None => {
                            if let Some(log) = &log {
                                self.off_the_workers(log, move |log| log.finish(offsets)).await;
                            }
                            self.finish();
                            return;
                        }
                        Some(Err(e)) => {
                            debug!(process = ?self.process, error = %e, "output stream broke");
                            break;
                        }
                    }
                },
                Err(e) if e.is_not_found() => {
                    self.finish();
                    return;
                }
                Err(e) => debug!(process = ?self.process, error = %e, "cannot read output yet"),
            }
            // The stream broke (agent restarting, VM stopping): retry while the process runs.
            tokio::time::sleep(RETRY_INTERVAL).await;
            if !keep_going() {
                self.finish();
                return;
            }
        }
    }
}

/// How far a process's output has come, per stream (stdout, stderr): `received` is the
/// offset just past the last byte taken from the agent. The persisted figure is what reached
/// the log file (received minus the unfinished line the writer holds back), so after a
/// restart the agent resends exactly the rest.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct OutputOffsets {
    received: [u64; 2],
}

impl OutputOffsets {
    /// The saved offsets, or zeros (a first reader) when there are none.
    pub fn load(path: &Path) -> Self {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let mut fields = text.split_whitespace().map(|f| f.parse::<u64>().ok());
        match (fields.next().flatten(), fields.next().flatten()) {
            (Some(stdout), Some(stderr)) => Self { received: [stdout, stderr] },
            _ => Self::default(),
        }
    }

    /// Bytes of each stream that are in the log file (all received ones without a log).
    fn written(&self, writer: Option<&LogWriter>) -> [u64; 2] {
        let held = |slot: usize| writer.map_or(0, |w| w.pending_len(slot) as u64);
        [self.received[0].saturating_sub(held(0)), self.received[1].saturating_sub(held(1))]
    }

    /// The part of `chunk` not seen yet, with its stream slot; records it as received. A
    /// chunk whose end does not fit in a u64 is no agent's output: it is dropped (saturating
    /// at u64::MAX instead would take every later chunk for a repeat and silence the log).
    fn accept<'a>(
        &mut self,
        process: &ProcessId,
        chunk: &'a OutputChunk,
    ) -> Option<(usize, &'a [u8])> {
        let slot = chunk.kind.slot();
        let have = self.received[slot];
        let Some(end) =
            u64::try_from(chunk.data.len()).ok().and_then(|len| chunk.offset.checked_add(len))
        else {
            warn!(?process, offset = chunk.offset, "dropping output at an impossible offset");
            return None;
        };
        if end <= have {
            return None;
        }
        if chunk.offset > have {
            warn!(
                ?process,
                lost_bytes = chunk.offset - have,
                "output was lost before reaching the host (older than the agent keeps)"
            );
        }
        // `have < end`, so what to skip is shorter than the chunk.
        let skip = usize::try_from(have.saturating_sub(chunk.offset)).unwrap_or(usize::MAX);
        self.received[slot] = end;
        Some((slot, chunk.data.get(skip..).unwrap_or_default()))
    }

    fn save(&self, path: &Path, writer: Option<&LogWriter>) {
        let written = self.written(writer);
        // Atomic (a daemon killed mid-write must not leave an empty file, which would replay
        // the whole window), not durable (runtime state). Best effort: without it a restart
        // repeats up to the agent's replay window.
        let text = format!("{} {}\n", written[0], written[1]);
        let _ = store::write_atomic(path, text.as_bytes(), false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::fake::FakeAgent;
    use crate::agent::{GuestAgent, NewContainer, OutputKind};

    fn chunk(kind: OutputKind, offset: u64, data: &[u8]) -> OutputChunk {
        OutputChunk { kind, data: data.to_vec(), offset }
    }

    #[test]
    fn output_offsets_drop_repeats_trim_overlaps_and_pass_gaps() {
        use OutputKind::{Stderr, Stdout};
        let p = ProcessId::init("c");
        let mut o = OutputOffsets::default();
        assert_eq!(o.accept(&p, &chunk(Stdout, 0, b"hello ")), Some((0, &b"hello "[..])));
        assert_eq!(o.accept(&p, &chunk(Stderr, 0, b"err")), Some((1, &b"err"[..])));
        // Resent after a broken stream: what we have is dropped, the rest kept.
        assert_eq!(o.accept(&p, &chunk(Stdout, 0, b"hello ")), None);
        assert_eq!(o.accept(&p, &chunk(Stdout, 3, b"lo world")), Some((0, &b"world"[..])));
        // Older than the agent keeps: a gap, logged, and the output goes on.
        assert_eq!(o.accept(&p, &chunk(Stdout, 20, b"!")), Some((0, &b"!"[..])));
        assert_eq!(o.received, [21, 3]);
    }

    /// An agent sending offsets whose end does not fit in a u64 neither panics the daemon nor
    /// silences the log: the chunk is dropped and the stream goes on.
    #[test]
    fn output_offsets_drop_chunks_ending_past_u64() {
        use OutputKind::Stdout;
        let p = ProcessId::init("c");
        let mut o = OutputOffsets::default();
        assert_eq!(o.accept(&p, &chunk(Stdout, 0, b"ok")), Some((0, &b"ok"[..])));
        for offset in [u64::MAX, u64::MAX - 1] {
            assert_eq!(o.accept(&p, &chunk(Stdout, offset, b"xx")), None, "{offset}");
        }
        assert_eq!(o.received, [2, 0]);
        assert_eq!(o.accept(&p, &chunk(Stdout, 2, b"more")), Some((0, &b"more"[..])));
        // The largest end that fits is still output (a gap, as any).
        assert!(o.accept(&p, &chunk(Stdout, u64::MAX - 2, b"xx")).is_some());
        assert_eq!(o.received[0], u64::MAX);
    }

    #[test]
    fn saved_output_offsets_leave_out_unfinished_lines() {
        let dir = tempfile::tempdir().unwrap();
        let writer = LogWriter::open(&dir.path().join("c.log")).unwrap();
        let mut o = OutputOffsets::default();
        let line = chunk(OutputKind::Stdout, 0, b"done\npart");
        let (slot, data) = o.accept(&ProcessId::init("c"), &line).unwrap();
        writer.write_chunk(slot, data).unwrap();
        // "part" is held back by the writer: a restart must have it resent.
        assert_eq!(o.written(Some(&writer)), [5, 0]);
        let path = dir.path().join("c.offsets");
        o.save(&path, Some(&writer));
        assert_eq!(OutputOffsets::load(&path).received, [5, 0]);
        assert_eq!(OutputOffsets::load(&dir.path().join("missing")), OutputOffsets::default());
        std::fs::write(&path, "garbage").unwrap();
        assert_eq!(OutputOffsets::load(&path), OutputOffsets::default());
    }

    async fn running_container(agent: &FakeAgent) -> ProcessId {
        agent
            .create_container(NewContainer { id: "c".into(), ..Default::default() })
            .await
            .unwrap();
        ProcessId::init("c")
    }

    /// One reader feeds the log and every subscriber the same bytes; all see the end.
    #[tokio::test]
    async fn one_reader_fans_out_to_the_log_and_every_subscriber() {
        let dir = tempfile::tempdir().unwrap();
        let agent = FakeAgent::default();
        let process = running_container(&agent).await;
        let io = ProcessIo::new(Arc::new(agent.clone()), process);
        let mut a = io.subscribe(Delivery::DropWhenSlow);
        let mut b = io.subscribe(Delivery::Lossless);
        let writer = Arc::new(LogWriter::open(&dir.path().join("c.log")).unwrap());
        let sink = LogSink { writer: writer.clone(), offsets_path: dir.path().join("c.offsets") };
        let pump = tokio::spawn(io.clone().pump(OutputOffsets::default(), Some(sink), || true));
        agent.emit("c", OutputKind::Stdout, b"one\n");
        agent.emit("c", OutputKind::Stderr, b"two\n");
        agent.exit("c", 0);
        pump.await.unwrap();
        for rx in [&mut a, &mut b] {
            let mut got = Vec::new();
            while let Some(c) = rx.recv().await {
                got.push((c.kind, c.data));
            }
            assert_eq!(
                got,
                vec![
                    (OutputKind::Stdout, b"one\n".to_vec()),
                    (OutputKind::Stderr, b"two\n".to_vec())
                ]
            );
        }
        let log = std::fs::read_to_string(dir.path().join("c.log")).unwrap();
        assert!(log.contains(" stdout F one") && log.contains(" stderr F two"), "{log}");
        assert!(io.has_ended());
        assert_eq!(io.subscriber_count(), 0);
        // A late subscriber sees the end at once.
        assert!(io.subscribe(Delivery::Lossless).recv().await.is_none());
        assert_eq!(OutputOffsets::load(&dir.path().join("c.offsets")).received, [4, 4]);
    }

    /// A container printing newlines must not stall other CRI calls: its log (and the
    /// offsets beside it) are written from the blocking pool, never from the async worker
    /// (a `#[tokio::test]` runs everything else on this one thread).
    #[tokio::test]
    async fn log_writes_stay_off_the_async_worker() {
        let worker = std::thread::current().id();
        let dir = tempfile::tempdir().unwrap();
        let agent = FakeAgent::default();
        let process = running_container(&agent).await;
        let io = ProcessIo::new(Arc::new(agent.clone()), process);
        let writer = Arc::new(LogWriter::open(&dir.path().join("c.log")).unwrap());
        let sink = LogSink { writer: writer.clone(), offsets_path: dir.path().join("c.offsets") };
        let pump = tokio::spawn(io.clone().pump(OutputOffsets::default(), Some(sink), || true));
        const LINES: usize = 256 * 1024;
        agent.emit("c", OutputKind::Stdout, &vec![b'\n'; LINES]);
        agent.emit("c", OutputKind::Stderr, b"unfinished");
        agent.exit("c", 0);
        pump.await.unwrap();
        let threads = writer.write_threads();
        assert!(!threads.is_empty());
        assert!(!threads.contains(&worker), "the log was written from the async worker");
        let log = std::fs::read_to_string(dir.path().join("c.log")).unwrap();
        assert_eq!(log.lines().count(), LINES + 1);
        assert!(log.ends_with(" stderr F unfinished\n"));
        assert_eq!(OutputOffsets::load(&dir.path().join("c.offsets")).received, [LINES as u64, 10]);
    }

    /// A client that stops reading is cut off; the log and the other client go on.
    #[tokio::test]
    async fn a_slow_attach_client_is_detached_without_holding_up_the_rest() {
        let agent = FakeAgent::default();
        let process = running_container(&agent).await;
        let io = ProcessIo::new(Arc::new(agent.clone()), process);
        let _stalled = io.subscribe(Delivery::DropWhenSlow);
        let mut reading = io.subscribe(Delivery::Lossless);
        let pump = tokio::spawn(io.clone().pump(OutputOffsets::default(), None, || true));
        let lines = SUBSCRIBER_QUEUE * 2;
        let reader = tokio::spawn(async move {
            let mut n = 0;
            while reading.recv().await.is_some() {
                n += 1;
            }
            n
        });
        for i in 0..lines {
            agent.emit("c", OutputKind::Stdout, format!("{i}\n").as_bytes());
            tokio::task::yield_now().await;
        }
        agent.exit("c", 0);
        tokio::time::timeout(Duration::from_secs(5), pump).await.unwrap().unwrap();
        assert_eq!(reader.await.unwrap(), lines);
    }

    /// Stdin and resizes reach the process through the hub.
    #[tokio::test]
    async fn stdin_and_resize_go_to_the_process() {
        let agent = FakeAgent::default();
        let process = running_container(&agent).await;
        let io = ProcessIo::new(Arc::new(agent.clone()), process.clone());
        io.write_stdin(b"input".to_vec()).await.unwrap();
        io.close_stdin().await.unwrap();
        io.resize(80, 24).await.unwrap();
        assert_eq!(agent.stdin_of(&process), Some((b"input".to_vec(), true)));
        assert!(agent.calls().contains(&"ResizeTty".to_string()));
    }
}
