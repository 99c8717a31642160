//! Container output, chunked as the agent streams it, through the daemon's CRI log writer:
//! every line of the file must be a well-formed CRI entry no longer than the cap, and each
//! stream's entries must add up to exactly what the container printed.
#![no_main]

use podvisor::sandbox::logs;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ctr.log");
    let writer = logs::LogWriter::open(&path).expect("open");
    let mut printed: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
    let mut rest = data;
    while let [selector, len_lo, len_hi, tail @ ..] = rest {
        let stream = usize::from(selector & 1);
        // Lengths up to 64 KiB, so lines cross the 16 KiB cap.
        let len = usize::from(u16::from_le_bytes([*len_lo, *len_hi])).min(tail.len());
        let (chunk, after) = tail.split_at(len);
        // A repeated chunk makes long lines cheap to reach.
        let times = if selector & 0x80 != 0 { 1 + usize::from((selector >> 1) & 0x3f) } else { 1 };
        for _ in 0..times {
            writer.write_chunk(stream, chunk).expect("write");
            printed[stream].extend_from_slice(chunk);
        }
        rest = after;
    }
    writer.flush_partial().expect("flush");
    check_log(&std::fs::read(&path).expect("read"), &printed);
});

/// Parses every entry and rebuilds each stream from them.
fn check_log(log: &[u8], printed: &[Vec<u8>; 2]) {
    let mut rebuilt: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
    if !log.is_empty() {
        assert_eq!(log.last(), Some(&b'\n'), "the log ends mid-entry");
    }
    for entry in log.split(|&b| b == b'\n').filter(|e| !e.is_empty()) {
        let mut fields = entry.splitn(4, |&b| b == b' ');
        let timestamp = fields.next().expect("timestamp");
        let stream = fields.next().expect("stream");
        let tag = fields.next().expect("tag");
        let content = fields.next().unwrap_or_default();
        let text = std::str::from_utf8(timestamp).expect("timestamp is text");
        humantime::parse_rfc3339(text).unwrap_or_else(|e| panic!("timestamp {text:?}: {e}"));
        let index = match stream {
            b"stdout" => 0,
            b"stderr" => 1,
            other => panic!("stream {:?}", String::from_utf8_lossy(other)),
        };
        assert!(content.len() <= logs::MAX_LINE, "an entry of {} bytes", content.len());
        rebuilt[index].extend_from_slice(content);
        match tag {
            b"F" => rebuilt[index].push(b'\n'),
            b"P" => {}
            other => panic!("tag {:?}", String::from_utf8_lossy(other)),
        }
    }
    for (rebuilt, printed) in rebuilt.iter().zip(printed) {
        // The last line, unterminated, was flushed as a full entry.
        let flushed_last = !printed.is_empty() && printed.last() != Some(&b'\n');
        let mut expected = printed.clone();
        if flushed_last {
            expected.push(b'\n');
        }
        assert!(*rebuilt == expected, "the entries do not add up to the output");
    }
}
