//! SPDY/3 name/value header blocks and their zlib compression.
//!
//! A block, before compression, is a u32 count followed by that many (u32 length, name,
//! u32 length, value) pairs, all big-endian. Names are lowercase and appear once; several values
//! of one name travel as one value joined with NUL. [`Headers`] is the unjoined form: one
//! `(name, value)` pair per value, in order. [`encode_block`] joins pairs of the same name (at the
//! position of the first), [`decode_block`] splits them again.
//!
//! Each direction of a session is ONE zlib stream primed with [`crate::DICTIONARY`]: the
//! [`HeaderCompressor`] for what we send, the [`HeaderDecompressor`] for what we receive. Every
//! block ends with a sync flush so the peer can decode it at once, and later blocks refer back to
//! earlier ones, so blocks must be compressed and decompressed in exactly the order they are
//! written to and read from the wire.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use crate::dictionary::{DICTIONARY, DICTIONARY_ADLER32};
use crate::error::FrameError;

/// Headers of a stream: `(name, value)` pairs, lowercase names, in order; a name with several
/// values appears once per value.
pub type Headers = Vec<(String, String)>;

/// The first value of `name` in `headers` (names compare case-insensitively).
pub fn header<'a>(headers: &'a Headers, name: &str) -> Option<&'a str> {
    headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
}

/// Encodes `headers` as an uncompressed header block: names lowercased, values of the same name
/// joined with NUL.
pub fn encode_block(headers: &[(String, String)]) -> Result<Vec<u8>, FrameError> {
    // Group values by name, keeping the order of first appearance (few headers: a linear scan).
    let mut groups: Vec<(String, Vec<&str>)> = Vec::new();
    for (name, value) in headers {
        if name.is_empty() || name.contains('\0') {
            return Err(FrameError::InvalidHeaderName(name.clone()));
        }
        let name = name.to_ascii_lowercase();
        match groups.iter_mut().find(|(n, _)| *n == name) {
            Some((_, values)) => values.push(value),
            None => groups.push((name, vec![value])),
        }
    }
    let mut out = Vec::new();
    put_len(&mut out, groups.len(), "header count")?;
    for (name, values) in &groups {
        put_len(&mut out, name.len(), "header name length")?;
        out.extend_from_slice(name.as_bytes());
        let value = values.join("\0");
        put_len(&mut out, value.len(), "header value length")?;
        out.extend_from_slice(value.as_bytes());
    }
    Ok(out)
}

fn put_len(out: &mut Vec<u8>, len: usize, what: &'static str) -> Result<(), FrameError> {
    let len =
        u32::try_from(len).map_err(|_| FrameError::FieldOverflow { what, value: len as u64 })?;
    out.extend_from_slice(&len.to_be_bytes());
    Ok(())
}

/// Decodes an uncompressed header block. Names are lowercased (the spec requires lowercase; being
/// lenient costs nothing), NUL-joined values split into one pair each.
pub fn decode_block(block: &[u8]) -> Result<Headers, FrameError> {
    let mut cur = Cursor(block);
    let count = cur.u32().ok_or(FrameError::BadHeaderBlock("missing header count"))?;
    // Every pair takes at least 8 bytes: reject a count the block cannot hold before allocating.
    if count as usize > cur.0.len() / 8 {
        return Err(FrameError::BadHeaderBlock("header count exceeds the block"));
    }
    let mut headers = Headers::with_capacity(count as usize);
    for _ in 0..count {
        let name = cur.string().ok_or(FrameError::BadHeaderBlock("truncated header name"))?;
        let name = std::str::from_utf8(name)
            .map_err(|_| FrameError::BadHeaderBlock("header name is not UTF-8"))?;
        if name.is_empty() {
            return Err(FrameError::BadHeaderBlock("empty header name"));
        }
        let name = name.to_ascii_lowercase();
        let value = cur.string().ok_or(FrameError::BadHeaderBlock("truncated header value"))?;
        let value = std::str::from_utf8(value)
            .map_err(|_| FrameError::BadHeaderBlock("header value is not UTF-8"))?;
        for v in value.split('\0') {
            headers.push((name.clone(), v.to_owned()));
        }
    }
    if !cur.0.is_empty() {
        return Err(FrameError::BadHeaderBlock("bytes after the last header"));
    }
    Ok(headers)
}

/// A reader over a byte slice that fails (None) instead of panicking when it runs out.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }

    fn u32(&mut self) -> Option<u32> {
        let b = self.take(4)?;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn string(&mut self) -> Option<&'a [u8]> {
        let len = self.u32()?;
        self.take(len as usize)
    }
}

/// Our side's persistent zlib stream (the one we send with).
pub struct HeaderCompressor {
    z: Compress,
    primed: bool,
}

impl Default for HeaderCompressor {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for HeaderCompressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeaderCompressor").field("total_in", &self.z.total_in()).finish()
    }
}

impl HeaderCompressor {
    /// A fresh stream; the dictionary is set before the first block.
    pub fn new() -> Self {
        // Level 9 as spdystream uses: header blocks are small, the ratio is what matters.
        HeaderCompressor { z: Compress::new(Compression::best(), true), primed: false }
    }

    /// Compresses one uncompressed block, appending it, sync-flushed, to `out`.
    pub fn compress(&mut self, block: &[u8], out: &mut Vec<u8>) -> Result<(), FrameError> {
        if !self.primed {
            // zlib takes the dictionary only before the first input.
            let adler = self
                .z
                .set_dictionary(DICTIONARY)
                .map_err(|e| FrameError::Compress(e.to_string()))?;
            if adler != DICTIONARY_ADLER32 {
                return Err(FrameError::Compress(format!("dictionary Adler-32 {adler:#x}")));
            }
            self.primed = true;
        }
        let mut input = block;
        loop {
            // Deflate's worst case is a little over the input; grow generously so that one call
            // usually finishes the flush.
            out.reserve(input.len() + input.len() / 8 + 64);
            let before = self.z.total_in();
            self.z
                .compress_vec(input, out, FlushCompress::Sync)
                .map_err(|e| FrameError::Compress(e.to_string()))?;
            let consumed = (self.z.total_in() - before) as usize;
            input = input.get(consumed..).unwrap_or_default();
            // Done when all input is in and zlib stopped with output room to spare: the flush
            // is then complete (zlib only stops early for lack of output space).
            if input.is_empty() && out.len() < out.capacity() {
                return Ok(());
            }
        }
    }
}

/// The peer's persistent zlib stream (the one we receive with), bounded per block.
pub struct HeaderDecompressor {
    z: Decompress,
    limit: usize,
}

impl std::fmt::Debug for HeaderDecompressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeaderDecompressor")
            .field("total_in", &self.z.total_in())
            .field("limit", &self.limit)
            .finish()
    }
}

impl HeaderDecompressor {
    /// A fresh stream whose blocks may decompress to at most `limit` bytes each.
    pub fn new(limit: usize) -> Self {
        HeaderDecompressor { z: Decompress::new(true), limit }
    }

    /// Decompresses one compressed block (all of `input`), returning the uncompressed block.
    pub fn decompress(&mut self, mut input: &[u8]) -> Result<Vec<u8>, FrameError> {
        let limit = self.limit;
        let mut out = Vec::with_capacity((input.len() * 4 + 64).min(limit + 1));
        loop {
            if out.len() == out.capacity() {
                // Room for one byte past the limit, so that exceeding it is seen, not truncated.
                let room = (out.capacity().max(256)).min(limit + 1 - out.len());
                out.reserve_exact(room);
            }
            let (in_before, out_before) = (self.z.total_in(), self.z.total_out());
            let status = match self.z.decompress_vec(input, &mut out, FlushDecompress::Sync) {
                Ok(status) => status,
                Err(e) => match e.needs_dictionary() {
                    Some(DICTIONARY_ADLER32) => {
                        self.z
                            .set_dictionary(DICTIONARY)
                            .map_err(|e| FrameError::Decompress(e.to_string()))?;
                        Status::Ok
                    }
                    Some(other) => {
                        return Err(FrameError::Decompress(format!(
                            "stream wants dictionary {other:#010x}, not SPDY/3's"
                        )));
                    }
                    None => return Err(FrameError::Decompress(e.to_string())),
                },
            };
            if out.len() > limit {
                return Err(FrameError::HeaderBlockTooLarge { limit });
            }
            let consumed = (self.z.total_in() - in_before) as usize;
            let produced = self.z.total_out() - out_before;
            input = input.get(consumed..).unwrap_or_default();
            if input.is_empty() && out.len() < out.capacity() {
                return Ok(out);
            }
            if status == Status::StreamEnd && !input.is_empty() {
                return Err(FrameError::Decompress("zlib stream ended inside a block".into()));
            }
            if consumed == 0 && produced == 0 && out.len() < out.capacity() {
                // Input left, room left, yet no progress: zlib cannot use what it was given.
                return Err(FrameError::Decompress("no progress decompressing".into()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&str, &str)]) -> Headers {
        pairs.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect()
    }

    #[test]
    fn block_round_trip_joins_and_splits_values() {
        let headers = h(&[("StreamType", "stdout"), ("port", "80"), ("streamtype", "x")]);
        let block = encode_block(&headers).unwrap();
        // Two names on the wire; the second streamtype value joined with NUL.
        assert_eq!(&block[..4], &2u32.to_be_bytes());
        assert!(block.windows(8).any(|w| w == b"stdout\0x"));
        let back = decode_block(&block).unwrap();
        assert_eq!(back, h(&[("streamtype", "stdout"), ("streamtype", "x"), ("port", "80")]));
    }

    #[test]
    fn block_rejects_bad_names_and_garbage() {
        assert!(matches!(encode_block(&h(&[("", "v")])), Err(FrameError::InvalidHeaderName(_))));
        assert!(encode_block(&h(&[("a\0b", "v")])).is_err());
        assert!(decode_block(b"").is_err());
        assert!(decode_block(&[0, 0, 0, 1]).is_err(), "count without pairs");
        assert!(decode_block(&[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]).is_err(), "huge count");
        // One pair whose name length runs past the end.
        assert!(decode_block(&[0, 0, 0, 1, 0, 0, 1, 0, b'a', 0, 0, 0, 0]).is_err());
        // Empty name.
        assert!(decode_block(&[0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0]).is_err());
        // Trailing bytes.
        assert!(decode_block(&[0, 0, 0, 0, 1]).is_err());
        assert_eq!(decode_block(&[0, 0, 0, 0]).unwrap(), Headers::new());
    }

    #[test]
    fn compression_is_one_persistent_stream_per_direction() {
        let mut c = HeaderCompressor::new();
        let mut d = HeaderDecompressor::new(64 * 1024);
        let blocks: Vec<Headers> = (0..4)
            .map(|i| {
                h(&[
                    ("streamtype", "stdout"),
                    ("x-stream-protocol-version", "v4.channel.k8s.io"),
                    ("requestid", &i.to_string()),
                ])
            })
            .collect();
        let mut sizes = Vec::new();
        for headers in &blocks {
            let raw = encode_block(headers).unwrap();
            let mut z = Vec::new();
            c.compress(&raw, &mut z).unwrap();
            // A sync flush ends with an empty stored block.
            assert!(z.ends_with(&[0, 0, 0xff, 0xff]), "{z:x?}");
            sizes.push(z.len());
            assert_eq!(d.decompress(&z).unwrap(), raw);
        }
        // The later blocks compress against the first's history: much smaller.
        assert!(sizes[1] < sizes[0] / 2, "{sizes:?}");
        // And cannot be decoded by a fresh decompressor (no zlib header, no history).
        let mut c2 = HeaderCompressor::new();
        let mut first = Vec::new();
        c2.compress(&encode_block(&blocks[0]).unwrap(), &mut first).unwrap();
        let mut second = Vec::new();
        c2.compress(&encode_block(&blocks[1]).unwrap(), &mut second).unwrap();
        assert!(HeaderDecompressor::new(1 << 16).decompress(&second).is_err());
    }

    #[test]
    fn decompression_is_bounded() {
        let mut c = HeaderCompressor::new();
        let big = h(&[("x", &"a".repeat(100_000))]);
        let mut z = Vec::new();
        c.compress(&encode_block(&big).unwrap(), &mut z).unwrap();
        assert!(z.len() < 1000, "compresses well: {}", z.len());
        let err = HeaderDecompressor::new(64 * 1024).decompress(&z).unwrap_err();
        assert_eq!(err, FrameError::HeaderBlockTooLarge { limit: 64 * 1024 });
    }

    #[test]
    fn decompression_rejects_garbage_and_foreign_dictionaries() {
        assert!(HeaderDecompressor::new(1024).decompress(b"not zlib at all").is_err());
        // A zlib header (CMF 0x78, FLG with FDICT) naming dictionary 0x00000001.
        let foreign = [0x78, 0xbb, 0, 0, 0, 1, 0x03, 0x00];
        let err = HeaderDecompressor::new(1024).decompress(&foreign).unwrap_err();
        assert!(matches!(err, FrameError::Decompress(_)), "{err:?}");
    }
}
