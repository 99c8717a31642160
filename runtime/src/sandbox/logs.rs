//! Container output → the CRI log file kubelet reads:
//! `<RFC3339Nano timestamp> <stdout|stderr> <F|P> <line>`, one entry per line; a line longer
//! than [`MAX_LINE`] is split into partial (`P`) entries.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;

/// Longest log entry before it is split (containerd's default is 16 KiB).
pub const MAX_LINE: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("creating log directory {path}: {source}")]
    CreateDir { path: PathBuf, source: std::io::Error },
    #[error("opening log file {path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("writing log file {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

/// Bytes of formatted entries buffered before they go to the file: a chunk of newlines
/// becomes many times its size in entries, which must not all sit in memory at once.
const WRITE_BUFFER: usize = 64 * 1024;

/// One container's log file; `reopen` serves ReopenContainerLog after rotation.
///
/// Its methods do blocking file I/O: call them from the blocking pool, never from an async
/// worker (which serves every other pod's CRI calls meanwhile).
pub struct LogWriter {
    path: PathBuf,
    file: Mutex<std::fs::File>,
    streams: Mutex<[LineSplitter; 2]>,
    /// The threads the file was written from, for the test that none is an async worker.
    #[cfg(test)]
    write_threads: Mutex<Vec<std::thread::ThreadId>>,
}

fn open(path: &Path) -> Result<std::fs::File, LogError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|source| LogError::CreateDir { path: dir.into(), source })?;
    }
    // kubelet reads the logs as root; the group may read, as containerd's 0640.
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
        .map_err(|source| LogError::Open { path: path.into(), source })
}

const STREAM_NAMES: [&str; 2] = ["stdout", "stderr"];

impl LogWriter {
    pub fn open(path: &Path) -> Result<Self, LogError> {
        Ok(Self {
            path: path.into(),
            file: Mutex::new(open(path)?),
            streams: Mutex::new(Default::default()),
            #[cfg(test)]
            write_threads: Mutex::new(Vec::new()),
        })
    }

    /// Reopens the file at the same path (after kubelet rotated it).
    pub fn reopen(&self) -> Result<(), LogError> {
        let f = open(&self.path)?;
        *self.file.lock().unwrap_or_else(|p| p.into_inner()) = f;
        Ok(())
    }

    /// Appends a chunk of output of `stream` (0 = stdout, 1 = stderr). Linear in the chunk:
    /// an unfinished line is held back and never rescanned.
    pub fn write_chunk(&self, stream: usize, data: &[u8]) -> Result<(), LogError> {
        let stream = stream.min(1);
        let mut streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        let prefix = format!("{} {} ", timestamp(), STREAM_NAMES[stream]);
        self.with_file(|out| streams[stream].feed(data, |tag, line| entry(out, &prefix, tag, line)))
    }

    /// Bytes of `stream` (0 = stdout, 1 = stderr) held back as an unfinished line, not yet in
    /// the file.
    pub fn pending_len(&self, stream: usize) -> usize {
        self.streams.lock().unwrap_or_else(|p| p.into_inner())[stream.min(1)].pending.len()
    }

    /// Writes out whatever partial lines are left (the process is gone).
    pub fn flush_partial(&self) -> Result<(), LogError> {
        let mut streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        let now = timestamp();
        self.with_file(|out| {
            for (splitter, name) in streams.iter_mut().zip(STREAM_NAMES) {
                if !splitter.pending.is_empty() {
                    entry(out, &format!("{now} {name} "), 'F', &splitter.pending)?;
                    splitter.pending.clear();
                }
            }
            Ok(())
        })
    }

    /// Runs `write` on a bounded buffer in front of the file.
    fn with_file(
        &self,
        write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
    ) -> Result<(), LogError> {
        #[cfg(test)]
        self.write_threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(std::thread::current().id());
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = std::io::BufWriter::with_capacity(WRITE_BUFFER, &mut *file);
        write(&mut out)
            .and_then(|()| out.flush())
            .map_err(|source| LogError::Write { path: self.path.clone(), source })
    }

    #[cfg(test)]
    pub fn write_threads(&self) -> Vec<std::thread::ThreadId> {
        self.write_threads.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Cuts one stream into log entries: `F` for a line (at most [`MAX_LINE`] bytes), `P` for the
/// first [`MAX_LINE`] bytes of a longer one. What follows the last entry is held back in
/// `pending` (never more than [`MAX_LINE`] bytes, and never a newline) until the next chunk.
#[derive(Default)]
struct LineSplitter {
    pending: Vec<u8>,
    /// Bytes copied, scanned and moved so far: the test's measure of the work per chunk.
    #[cfg(test)]
    work: usize,
}

impl LineSplitter {
    fn feed(
        &mut self,
        data: &[u8],
        mut emit: impl FnMut(char, &[u8]) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        // What was held back has no newline: scanning starts at the new bytes.
        let mut clean = self.pending.len();
        self.pending.extend_from_slice(data);
        self.count(data.len());
        let buf = &self.pending;
        let mut pos = 0;
        let mut result = Ok(());
        let mut scanned = 0;
        while result.is_ok() {
            // A newline further than MAX_LINE away ends no entry of its own: look no further.
            let window_end = buf.len().min(pos + MAX_LINE + 1);
            let from = clean.max(pos).min(window_end);
            if let Some(i) = buf[from..window_end].iter().position(|b| *b == b'\n') {
                scanned += i + 1;
                let nl = from + i;
                result = emit('F', &buf[pos..nl]);
                pos = nl + 1;
                clean = pos;
            } else if buf.len() - pos > MAX_LINE {
                scanned += window_end - from;
                result = emit('P', &buf[pos..pos + MAX_LINE]);
                pos += MAX_LINE;
                // The window held no newline, and it reaches past the new `pos`.
                clean = window_end;
            } else {
                scanned += window_end - from;
                break;
            }
        }
        let moved = if pos > 0 { self.pending.len() - pos } else { 0 };
        self.count(scanned + moved);
        // Once per chunk, and only what follows the last entry.
        self.pending.drain(..pos);
        result
    }

    #[cfg(test)]
    fn count(&mut self, bytes: usize) {
        self.work += bytes;
    }

    #[cfg(not(test))]
    fn count(&mut self, _bytes: usize) {}
}

fn entry(out: &mut dyn Write, prefix: &str, tag: char, line: &[u8]) -> std::io::Result<()> {
    out.write_all(prefix.as_bytes())?;
    out.write_all(&[tag as u8, b' '])?;
    out.write_all(line)?;
    out.write_all(b"\n")
}

fn timestamp() -> String {
    humantime::format_rfc3339_nanos(SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_partials_and_streams() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c/0.log");
        let w = LogWriter::open(&path).unwrap();
        w.write_chunk(0, b"hello\nwor").unwrap();
        w.write_chunk(1, b"oops\n").unwrap();
        w.write_chunk(0, b"ld\n").unwrap();
        w.write_chunk(0, &vec![b'x'; MAX_LINE + 10]).unwrap();
        w.flush_partial().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5);
        let parts: Vec<Vec<&str>> = lines.iter().map(|l| l.splitn(4, ' ').collect()).collect();
        assert_eq!(&parts[0][1..], &["stdout", "F", "hello"]);
        assert_eq!(&parts[1][1..], &["stderr", "F", "oops"]);
        assert_eq!(&parts[2][1..], &["stdout", "F", "world"]);
        assert_eq!(parts[3][2], "P");
        assert_eq!(parts[3][3].len(), MAX_LINE);
        assert_eq!(parts[4][3], "x".repeat(10));
        assert!(parts[0][0].ends_with('Z') && parts[0][0].contains('T'));
    }

    fn split(splitter: &mut LineSplitter, data: &[u8]) -> Vec<(char, Vec<u8>)> {
        let mut entries = Vec::new();
        splitter
            .feed(data, |tag, line| {
                entries.push((tag, line.to_vec()));
                Ok(())
            })
            .unwrap();
        entries
    }

    #[test]
    fn line_boundaries_at_and_around_max_line() {
        let mut s = LineSplitter::default();
        let exact = vec![b'a'; MAX_LINE];
        let mut data = exact.clone();
        data.push(b'\n');
        assert_eq!(split(&mut s, &data), vec![('F', exact.clone())]);
        // One byte over: a partial entry, then the rest of the line.
        let mut data = vec![b'b'; MAX_LINE + 1];
        data.push(b'\n');
        assert_eq!(split(&mut s, &data), vec![('P', vec![b'b'; MAX_LINE]), ('F', b"b".to_vec())]);
        // Exactly MAX_LINE without a newline is held back; one more byte makes it a partial.
        assert!(split(&mut s, &exact).is_empty());
        assert_eq!(s.pending.len(), MAX_LINE);
        assert_eq!(split(&mut s, b"c"), vec![('P', exact)]);
        assert_eq!(split(&mut s, b"\n\n"), vec![('F', b"c".to_vec()), ('F', Vec::new())]);
        assert!(s.pending.is_empty());
    }

    /// A container printing newlines, or one endless line, costs the writer work linear in
    /// its output, however the output is cut into chunks (it used to move the whole rest of
    /// the buffer for every line: quadratic).
    #[test]
    fn splitting_is_linear_in_the_output() {
        const TOTAL: usize = 2 << 20;
        let newlines = vec![b'\n'; TOTAL];
        let long_line = vec![b'x'; TOTAL];
        let mixed: Vec<u8> =
            (0..TOTAL).map(|i| if i % 1000 == 999 { b'\n' } else { b'y' }).collect();
        for data in [&newlines, &long_line, &mixed] {
            for chunk in [TOTAL, 64 * 1024, 4096, 7, 1] {
                let mut s = LineSplitter::default();
                let mut entries = 0;
                for part in data.chunks(chunk) {
                    s.feed(part, |_, _| {
                        entries += 1;
                        Ok(())
                    })
                    .unwrap();
                }
                assert!(entries > 0);
                assert!(
                    s.work <= 4 * TOTAL,
                    "{} bytes of work for {TOTAL} bytes in chunks of {chunk}",
                    s.work
                );
            }
        }
    }

    /// Container output is the tenant's and often holds secrets: no other host user reads it.
    #[test]
    fn log_files_are_not_world_readable() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        let w = LogWriter::open(&path).unwrap();
        w.write_chunk(0, b"secret\n").unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o037, 0, "mode {mode:o}");
    }

    #[test]
    fn reopen_after_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        let w = LogWriter::open(&path).unwrap();
        w.write_chunk(0, b"a\n").unwrap();
        std::fs::rename(&path, dir.path().join("0.log.1")).unwrap();
        w.reopen().unwrap();
        w.write_chunk(0, b"b\n").unwrap();
        assert!(std::fs::read_to_string(&path).unwrap().ends_with(" stdout F b\n"));
    }
}
