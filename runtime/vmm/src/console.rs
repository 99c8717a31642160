//! A size-capped log file for a guest's serial console. What the guest prints is the guest's
//! to choose, but the log lives on the host (on tmpfs, i.e. in RAM, by default): past `max`
//! bytes the file is cut back to its newest `max / 2` bytes, so it always holds the last
//! stretch of output, which is what a boot failure needs.
//!
//! Cutting back copies at most `max / 2` bytes once every `max / 2` appended bytes: appending
//! stays O(1) per byte. It works on the open descriptor alone (positioned reads and writes and
//! `ftruncate`), so a jailed VMM, which cannot see the file's path any more, can still do it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// What the daemon caps a console log at unless configured otherwise.
pub const DEFAULT_MAX_BYTES: u64 = 1 << 20;

/// Bytes moved per read/write when cutting back.
const MOVE_CHUNK: usize = 64 * 1024;

/// An append-only file that keeps its newest bytes.
#[derive(Debug)]
pub struct CappedLog {
    file: File,
    len: u64,
    max: u64,
}

impl CappedLog {
    /// Opens (creating it 0600) the log at `path`, to be appended to; an existing file
    /// larger than `max` is cut back at once.
    pub fn open(path: &Path, max: u64) -> io::Result<Self> {
        // Not O_APPEND: Linux's pwrite ignores the offset on such files, and cutting back
        // writes at the start.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)?;
        let len = file.metadata()?.len();
        let mut log = Self { file, len, max };
        if len > max {
            log.cut_back(&[])?;
        }
        Ok(log)
    }

    /// The file's length as this writer keeps it.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `data`, cutting the file back first if it would grow past the cap.
    pub fn append(&mut self, data: &[u8]) -> io::Result<()> {
        let grown = self.len.saturating_add(data.len() as u64);
        if grown <= self.max {
            self.file.write_all_at(data, self.len)?;
            self.len = grown;
            return Ok(());
        }
        self.cut_back(data)
    }

    /// Leaves the newest `max / 2` bytes of the file followed by `data`.
    fn cut_back(&mut self, data: &[u8]) -> io::Result<()> {
        let keep = self.max / 2;
        let data_len = data.len() as u64;
        if data_len >= keep {
            let tail = usize::try_from(data_len - keep).unwrap_or(usize::MAX);
            self.file.write_all_at(data.get(tail..).unwrap_or_default(), 0)?;
        } else {
            let from_file = (keep - data_len).min(self.len);
            self.move_to_front(self.len - from_file, from_file)?;
            self.file.write_all_at(data, from_file)?;
        }
        let new_len = keep.min(self.len.saturating_add(data_len));
        self.file.set_len(new_len)?;
        self.len = new_len;
        Ok(())
    }

    /// Copies `count` bytes at `from` to the start of the file. The destination is always
    /// below the source, so copying in ascending chunks never overwrites what is still to be
    /// read.
    fn move_to_front(&self, from: u64, count: u64) -> io::Result<()> {
        if from == 0 {
            return Ok(());
        }
        let mut buf = vec![0u8; MOVE_CHUNK];
        let mut done = 0u64;
        while done < count {
            let n = usize::try_from(count - done).unwrap_or(MOVE_CHUNK).min(MOVE_CHUNK);
            self.file.read_exact_at(&mut buf[..n], from + done)?;
            self.file.write_all_at(&buf[..n], done)?;
            done += n as u64;
        }
        Ok(())
    }
}

impl io::Write for CappedLog {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.append(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The last `max` bytes of the file at `path`, starting at a line boundary unless the whole
/// file fits: a boot failure reports the end of the console without reading all of it.
pub fn read_tail(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    let start = len.saturating_sub(max);
    let mut buf = vec![0u8; usize::try_from(len - start).unwrap_or(0)];
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], start + got as u64)? {
            0 => break,
            n => got += n,
        }
    }
    buf.truncate(got);
    if start > 0 {
        let cut = buf.iter().position(|b| *b == b'\n').map_or(0, |i| i + 1);
        buf.drain(..cut);
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn appends_below_the_cap_and_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut log = CappedLog::open(&path, 100).unwrap();
        log.append(b"hello ").unwrap();
        log.append(b"world").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"hello world");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // Reopened (a VMM restarted on the same log): appends after what is there.
        let mut log = CappedLog::open(&path, 100).unwrap();
        log.append(b"!").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"hello world!");
    }

    /// A guest writing without end leaves at most `max` bytes, and always the newest ones.
    #[test]
    fn a_flood_keeps_the_newest_bytes_within_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let max = 4096;
        let mut log = CappedLog::open(&path, max).unwrap();
        let mut written = Vec::new();
        for i in 0..50_000u32 {
            let line = format!("line {i}\n");
            // Byte by byte, as the serial port writes, for some of it.
            if i % 7 == 0 {
                for b in line.as_bytes() {
                    log.append(std::slice::from_ref(b)).unwrap();
                }
            } else {
                log.append(line.as_bytes()).unwrap();
            }
            written.extend_from_slice(line.as_bytes());
            let size = std::fs::metadata(&path).unwrap().len();
            assert!(size <= max, "{size} bytes after line {i}");
            assert_eq!(size, log.len());
        }
        let kept = std::fs::read(&path).unwrap();
        assert!(kept.len() as u64 >= max / 2);
        assert!(written.ends_with(&kept), "the file is not the newest output");
    }

    #[test]
    fn writes_larger_than_the_cap_keep_their_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut log = CappedLog::open(&path, 10).unwrap();
        log.append(b"abc").unwrap();
        log.append(b"0123456789ABCDEF").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"BCDEF");
        log.append(b"xyz").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"BCDEFxyz");
        log.append(b"123").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"yz123");
        // An oversized file left from before is cut back when opened.
        std::fs::write(&path, vec![b'o'; 100]).unwrap();
        let log = CappedLog::open(&path, 10).unwrap();
        assert_eq!(log.len(), 5);
        assert_eq!(std::fs::read(&path).unwrap().len(), 5);
    }

    #[test]
    fn the_tail_starts_at_a_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        std::fs::write(&path, b"first line\nsecond line\nthird\n").unwrap();
        assert_eq!(read_tail(&path, 15).unwrap(), b"third\n");
        assert_eq!(read_tail(&path, 1000).unwrap(), b"first line\nsecond line\nthird\n");
        assert!(read_tail(&dir.path().join("missing"), 10).is_err());
    }
}
