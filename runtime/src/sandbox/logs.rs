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

/// One container's log file; `reopen` serves ReopenContainerLog after rotation.
pub struct LogWriter {
    path: PathBuf,
    file: Mutex<std::fs::File>,
    pending: Mutex<[Vec<u8>; 2]>,
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

impl LogWriter {
    pub fn open(path: &Path) -> Result<Self, LogError> {
        Ok(Self {
            path: path.into(),
            file: Mutex::new(open(path)?),
            pending: Mutex::new([Vec::new(), Vec::new()]),
        })
    }

    /// Reopens the file at the same path (after kubelet rotated it).
    pub fn reopen(&self) -> Result<(), LogError> {
        let f = open(&self.path)?;
        *self.file.lock().unwrap_or_else(|p| p.into_inner()) = f;
        Ok(())
    }

    /// Appends a chunk of output of `stream` (0 = stdout, 1 = stderr).
    pub fn write_chunk(&self, stream: usize, data: &[u8]) -> Result<(), LogError> {
        let stream = stream.min(1);
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let buf = &mut pending[stream];
        buf.extend_from_slice(data);
        let mut out = Vec::new();
        let now = timestamp();
        let name = if stream == 0 { "stdout" } else { "stderr" };
        loop {
            if let Some(nl) = buf.iter().position(|b| *b == b'\n') {
                if nl <= MAX_LINE {
                    entry(&mut out, &now, name, 'F', &buf[..nl]);
                    buf.drain(..=nl);
                    continue;
                }
            }
            if buf.len() > MAX_LINE {
                entry(&mut out, &now, name, 'P', &buf[..MAX_LINE]);
                buf.drain(..MAX_LINE);
                continue;
            }
            break;
        }
        drop(pending);
        self.append(&out)
    }

    /// Bytes of `stream` (0 = stdout, 1 = stderr) held back as an unfinished line, not yet in
    /// the file.
    pub fn pending_len(&self, stream: usize) -> usize {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())[stream.min(1)].len()
    }

    /// Writes out whatever partial lines are left (the process is gone).
    pub fn flush_partial(&self) -> Result<(), LogError> {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let now = timestamp();
        let mut out = Vec::new();
        for (i, name) in ["stdout", "stderr"].iter().enumerate() {
            if !pending[i].is_empty() {
                entry(&mut out, &now, name, 'F', &pending[i]);
                pending[i].clear();
            }
        }
        drop(pending);
        self.append(&out)
    }

    fn append(&self, out: &[u8]) -> Result<(), LogError> {
        if out.is_empty() {
            return Ok(());
        }
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        f.write_all(out).map_err(|source| LogError::Write { path: self.path.clone(), source })
    }
}

fn entry(out: &mut Vec<u8>, ts: &str, stream: &str, tag: char, line: &[u8]) {
    out.extend_from_slice(format!("{ts} {stream} {tag} ").as_bytes());
    out.extend_from_slice(line);
    out.push(b'\n');
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
