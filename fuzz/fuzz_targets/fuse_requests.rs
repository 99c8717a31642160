//! A stream of FUSE requests (after a valid FUSE_INIT), as a compromised VMM or a guest through
//! it could send them, against `podvisor fs-serve`'s request loop on a small read-only share.
//! Without the sandbox (no root here) the share is read-only so nothing on the host changes.
#![no_main]

use std::io::Write;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::OnceLock;

use podvisor_fs_server::idmap::{IdMap, IdMaps};
use podvisor_fs_server::FileServer;

fn share() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("hello"), b"hi").expect("file");
        std::fs::create_dir(dir.path().join("sub")).expect("dir");
        std::os::unix::fs::symlink("../hello", dir.path().join("sub/link")).expect("link");
        dir
    })
    .path()
}

fn init_request() -> Vec<u8> {
    let mut r = Vec::new();
    r.extend_from_slice(&104u32.to_le_bytes());
    r.extend_from_slice(&26u32.to_le_bytes()); // FUSE_INIT
    r.extend_from_slice(&1u64.to_le_bytes());
    r.extend_from_slice(&[0u8; 24]);
    r.extend_from_slice(&7u32.to_le_bytes());
    r.extend_from_slice(&31u32.to_le_bytes());
    r.extend_from_slice(&(128u32 << 10).to_le_bytes());
    r.extend_from_slice(&[0u8; 52]);
    r
}

/// A pod's owner translation, so that replies go through its wrapper too.
fn ids() -> IdMaps {
    let rules = ["map:131072:0:65536".to_string(), "squash-host:131072:65534:65536".to_string()];
    let map = IdMap::parse(&rules).expect("valid rules");
    IdMaps { uids: map.clone(), gids: map }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(mut server) = FileServer::new(share(), "auto", true, ids()) else { return };
    if server.import().is_err() {
        return;
    }
    let Ok((mut client, mut server_end)) = UnixStream::pair() else { return };
    // Everything is written before the server runs: non-blocking, a reply that no longer fits
    // the socket buffer ends the run instead of blocking it.
    let _ = server_end.set_nonblocking(true);
    let _ = client.write_all(&init_request());
    let _ = client.write_all(&data[..data.len().min(64 << 10)]);
    let _ = client.shutdown(Shutdown::Write);
    let _ = server.serve(&mut server_end);
});
