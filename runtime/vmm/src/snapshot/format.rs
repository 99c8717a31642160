//! The on-disk form of a snapshot's state file: a fixed header, then a JSON payload.
//!
//! ```text
//! offset 0   8 bytes  magic "PVSNAPST"
//! offset 8   u32 LE   format version (FORMAT_VERSION)
//! offset 12  u32 LE   CRC-32 (IEEE) of the payload
//! offset 16  u64 LE   payload length in bytes
//! offset 24  payload  JSON of the state
//! ```
//! Every check happens before the payload is decoded, so a truncated, padded or bit-flipped
//! file is refused with the reason, never half-read.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// First bytes of every state file.
pub const MAGIC: [u8; 8] = *b"PVSNAPST";
/// Bumped whenever the payload's meaning changes; older files are refused, not migrated.
pub const FORMAT_VERSION: u32 = 1;
/// Header size in bytes.
pub const HEADER_LEN: usize = 24;
/// Largest payload accepted (a VM's state is tens of KiB per vCPU).
pub const MAX_PAYLOAD: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("reading the snapshot state file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("writing the snapshot state file {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a snapshot state file (bad magic)")]
    BadMagic { path: PathBuf },
    #[error("{path} has snapshot format version {found}; this VMM reads version {FORMAT_VERSION}")]
    Version { path: PathBuf, found: u32 },
    #[error(
        "{path} is truncated or padded: header says {expected} payload bytes, file has {found}"
    )]
    Length { path: PathBuf, expected: u64, found: u64 },
    #[error("{path} is corrupt: payload CRC-32 {found:#010x}, header says {expected:#010x}")]
    Checksum { path: PathBuf, expected: u32, found: u32 },
    #[error("decoding the snapshot state in {path}: {source}")]
    Decode { path: PathBuf, source: serde_json::Error },
    #[error("encoding the snapshot state for {path}: {source}")]
    Encode { path: PathBuf, source: serde_json::Error },
}

/// Encodes `state` with the header (the bytes [`decode`] accepts).
pub fn encode<T: Serialize>(state: &T, path: &Path) -> Result<Vec<u8>, FormatError> {
    let payload = serde_json::to_vec(state)
        .map_err(|source| FormatError::Encode { path: path.to_path_buf(), source })?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Checks the header of `bytes` (read from `path`) and decodes the payload.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], path: &Path) -> Result<T, FormatError> {
    let path_buf = || path.to_path_buf();
    let (header, payload) = bytes.split_at_checked(HEADER_LEN).ok_or_else(|| {
        FormatError::Length { path: path_buf(), expected: HEADER_LEN as u64, found: 0 }
    })?;
    let field = |range: std::ops::Range<usize>| &header[range];
    if field(0..8) != MAGIC {
        return Err(FormatError::BadMagic { path: path_buf() });
    }
    let version = u32::from_le_bytes(le_array(field(8..12)));
    if version != FORMAT_VERSION {
        return Err(FormatError::Version { path: path_buf(), found: version });
    }
    let expected_crc = u32::from_le_bytes(le_array(field(12..16)));
    let expected_len = u64::from_le_bytes(le_array(field(16..24)));
    if expected_len != payload.len() as u64 {
        return Err(FormatError::Length {
            path: path_buf(),
            expected: expected_len,
            found: payload.len() as u64,
        });
    }
    let crc = crc32fast::hash(payload);
    if crc != expected_crc {
        return Err(FormatError::Checksum { path: path_buf(), expected: expected_crc, found: crc });
    }
    serde_json::from_slice(payload)
        .map_err(|source| FormatError::Decode { path: path_buf(), source })
}

/// Copies a header field (the caller's slice has exactly `N` bytes).
fn le_array<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(bytes);
    out
}

/// Writes `state` to `path` and syncs it: the snapshot is only usable once its state file is
/// complete, so the state file is the last file of a snapshot written.
pub fn write_file<T: Serialize>(state: &T, path: &Path) -> Result<(), FormatError> {
    let bytes = encode(state, path)?;
    let write_err = |source| FormatError::Write { path: path.to_path_buf(), source };
    let mut file = std::fs::File::create(path).map_err(write_err)?;
    file.write_all(&bytes).map_err(write_err)?;
    file.sync_all().map_err(write_err)
}

/// Reads and checks the state file at `path`.
pub fn read_file<T: DeserializeOwned>(path: &Path) -> Result<T, FormatError> {
    let read_err = |source| FormatError::Read { path: path.to_path_buf(), source };
    let len = std::fs::metadata(path).map_err(read_err)?.len();
    if len > MAX_PAYLOAD + HEADER_LEN as u64 {
        return Err(FormatError::Length {
            path: path.to_path_buf(),
            expected: MAX_PAYLOAD,
            found: len.saturating_sub(HEADER_LEN as u64),
        });
    }
    let bytes = std::fs::read(path).map_err(read_err)?;
    decode(&bytes, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Sample {
        name: String,
        values: Vec<u64>,
    }

    fn sample() -> Sample {
        Sample { name: "vm".into(), values: vec![1, 2, u64::MAX] }
    }

    #[test]
    fn round_trip_through_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.state");
        write_file(&sample(), &path).unwrap();
        assert_eq!(read_file::<Sample>(&path).unwrap(), sample());
    }

    #[test]
    fn every_kind_of_damage_is_refused_with_its_reason() {
        let path = Path::new("vm.state");
        let good = encode(&sample(), path).unwrap();

        let mut flipped = good.clone();
        *flipped.last_mut().unwrap() ^= 0x40;
        assert!(matches!(decode::<Sample>(&flipped, path), Err(FormatError::Checksum { .. })));

        let truncated = &good[..good.len() - 3];
        assert!(matches!(decode::<Sample>(truncated, path), Err(FormatError::Length { .. })));
        let mut padded = good.clone();
        padded.push(b' ');
        assert!(matches!(decode::<Sample>(&padded, path), Err(FormatError::Length { .. })));
        assert!(matches!(decode::<Sample>(&good[..10], path), Err(FormatError::Length { .. })));

        let mut magic = good.clone();
        magic[0] = b'X';
        assert!(matches!(decode::<Sample>(&magic, path), Err(FormatError::BadMagic { .. })));

        let mut version = good.clone();
        version[8] = 99;
        let err = decode::<Sample>(&version, path).unwrap_err();
        assert!(err.to_string().contains("version 99"), "{err}");

        // A well-formed file holding something else fails to decode, with the path.
        let other = encode(&vec![1u8, 2], path).unwrap();
        let err = decode::<Sample>(&other, path).unwrap_err();
        assert!(matches!(err, FormatError::Decode { .. }));
        assert!(err.to_string().contains("vm.state"));
    }
}
