//! The server on a temporary directory (no sandbox: these run as any user), driven over a
//! socketpair the way the VMM's device drives it, including malformed requests.

use std::io::Write;
use std::os::unix::net::UnixStream;

use super::*;

const FUSE_LOOKUP: u32 = 1;
const FUSE_GETATTR: u32 = 3;
const FUSE_INIT: u32 = 26;

fn request(opcode: u32, unique: u64, nodeid: u64, body: &[u8]) -> Vec<u8> {
    let mut r = Vec::new();
    r.extend_from_slice(&((IN_HEADER_LEN + body.len()) as u32).to_le_bytes());
    r.extend_from_slice(&opcode.to_le_bytes());
    r.extend_from_slice(&unique.to_le_bytes());
    r.extend_from_slice(&nodeid.to_le_bytes());
    r.extend_from_slice(&[0u8; 16]);
    r.extend_from_slice(body);
    r
}

fn init_body() -> Vec<u8> {
    let mut init = Vec::new();
    init.extend_from_slice(&7u32.to_le_bytes());
    init.extend_from_slice(&31u32.to_le_bytes());
    init.extend_from_slice(&(128u32 * 1024).to_le_bytes());
    init.extend_from_slice(&[0u8; 52]);
    init
}

/// Reads one reply: (error, unique, body).
fn reply(stream: &mut UnixStream) -> (i32, u64, Vec<u8>) {
    let mut header = [0u8; OUT_HEADER_LEN];
    stream.read_exact(&mut header).unwrap();
    let len = u32::from_le_bytes(header[..4].try_into().unwrap()) as usize;
    let mut body = vec![0u8; len - OUT_HEADER_LEN];
    stream.read_exact(&mut body).unwrap();
    let error = i32::from_le_bytes(header[4..8].try_into().unwrap());
    (error, u64::from_le_bytes(header[8..].try_into().unwrap()), body)
}

struct Served {
    _dir: tempfile::TempDir,
    client: UnixStream,
    thread: std::thread::JoinHandle<Result<(), FsServerError>>,
}

fn serve(readonly: bool) -> Served {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hello"), b"hi").unwrap();
    let (client, mut server_end) = UnixStream::pair().unwrap();
    let root = dir.path().to_path_buf();
    let thread = std::thread::spawn(move || {
        let mut server = FileServer::new(&root, "auto", readonly)?;
        server.import()?;
        server.serve(&mut server_end)
    });
    Served { _dir: dir, client, thread }
}

#[test]
fn init_lookup_getattr_round_trip() {
    let mut s = serve(false);
    s.client.write_all(&request(FUSE_INIT, 1, 0, &init_body())).unwrap();
    let (error, unique, body) = reply(&mut s.client);
    assert_eq!((error, unique), (0, 1));
    assert_eq!(u32::from_le_bytes(body[..4].try_into().unwrap()), 7);
    s.client.write_all(&request(FUSE_LOOKUP, 2, 1, b"hello\0")).unwrap();
    let (error, _, entry) = reply(&mut s.client);
    assert_eq!(error, 0);
    let nodeid = u64::from_le_bytes(entry[..8].try_into().unwrap());
    s.client.write_all(&request(FUSE_GETATTR, 3, nodeid, &[0u8; 16])).unwrap();
    let (error, unique, attr) = reply(&mut s.client);
    assert_eq!((error, unique), (0, 3));
    // fuse_attr_out: attr_valid u64, attr_valid_nsec u32, dummy u32, then fuse_attr (ino, size).
    assert_eq!(u64::from_le_bytes(attr[24..32].try_into().unwrap()), 2, "size of hello");
    s.client.write_all(&request(FUSE_LOOKUP, 4, 1, b"missing\0")).unwrap();
    assert_eq!(reply(&mut s.client).0, -libc::ENOENT);
    drop(s.client);
    s.thread.join().unwrap().unwrap();
}

#[test]
fn malformed_requests_get_errors_not_panics() {
    let mut s = serve(false);
    s.client.write_all(&request(FUSE_INIT, 1, 0, &init_body())).unwrap();
    assert_eq!(reply(&mut s.client).0, 0);
    // Truncated bodies, unknown opcodes, a name without its NUL: each answered with an error.
    let cases: Vec<Vec<u8>> = vec![
        request(FUSE_LOOKUP, 10, 1, b""),
        request(FUSE_LOOKUP, 11, 1, b"hello"),
        request(FUSE_GETATTR, 12, 999_999, &[0u8; 16]),
        request(0xdead, 13, 1, &[1, 2, 3]),
        request(FUSE_INIT, 14, 0, &[0u8; 3]),
        request(15, 15, 1, &[0u8; 4]), // READ with a short fuse_read_in
    ];
    for (i, case) in cases.iter().enumerate() {
        s.client.write_all(case).unwrap();
        let (error, unique, _) = reply(&mut s.client);
        assert!(error < 0, "case {i}: error {error}");
        assert_eq!(unique, 10 + i as u64, "case {i}");
    }
    // Still serving.
    s.client.write_all(&request(FUSE_LOOKUP, 20, 1, b"hello\0")).unwrap();
    assert_eq!(reply(&mut s.client).0, 0);
    // A length below the header's size breaks the framing: the server hangs up.
    let mut bad = request(FUSE_LOOKUP, 21, 1, b"hello\0");
    bad[..4].copy_from_slice(&8u32.to_le_bytes());
    s.client.write_all(&bad).unwrap();
    assert!(matches!(s.thread.join().unwrap(), Err(FsServerError::BadRequestLength(8))));
}

#[test]
fn oversized_request_ends_the_connection() {
    let mut s = serve(false);
    let mut big = request(FUSE_LOOKUP, 1, 1, b"x\0");
    big[..4].copy_from_slice(&((MAX_MESSAGE + 1) as u32).to_le_bytes());
    s.client.write_all(&big).unwrap();
    let result = s.thread.join().unwrap();
    assert!(matches!(result, Err(FsServerError::BadRequestLength(_))), "{result:?}");
}

#[test]
fn readonly_refuses_changes() {
    let mut s = serve(true);
    s.client.write_all(&request(FUSE_INIT, 1, 0, &init_body())).unwrap();
    assert_eq!(reply(&mut s.client).0, 0);
    let mut mkdir = Vec::new();
    mkdir.extend_from_slice(&0o755u32.to_le_bytes());
    mkdir.extend_from_slice(&0u32.to_le_bytes());
    mkdir.extend_from_slice(b"newdir\0");
    s.client.write_all(&request(opcode::MKDIR, 2, 1, &mkdir)).unwrap();
    assert_eq!(reply(&mut s.client).0, -libc::EROFS);
    s.client.write_all(&request(FUSE_LOOKUP, 3, 1, b"hello\0")).unwrap();
    let (_, _, entry) = reply(&mut s.client);
    let hello = u64::from_le_bytes(entry[..8].try_into().unwrap());
    for flags in [libc::O_WRONLY, libc::O_RDWR, libc::O_RDONLY | libc::O_TRUNC] {
        let mut open_in = flags.to_le_bytes().to_vec();
        open_in.extend_from_slice(&0u32.to_le_bytes());
        s.client.write_all(&request(opcode::OPEN, 4, hello, &open_in)).unwrap();
        assert_eq!(reply(&mut s.client).0, -libc::EROFS, "flags {flags:#o}");
    }
    s.client.write_all(&request(opcode::OPEN, 5, hello, &[0u8; 8])).unwrap();
    assert_eq!(reply(&mut s.client).0, 0, "read-only open");
    assert_eq!(std::fs::read(s._dir.path().join("hello")).unwrap(), b"hi");
}

#[test]
fn args_parse() {
    let args: Vec<String> =
        ["podvisor", "fs-serve", "--shared-dir", "/s", "--socket", "/x.sock", "--readonly"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    let o = parse_args(&args).unwrap();
    assert_eq!((o.shared_dir.as_path(), o.readonly), (Path::new("/s"), true));
    assert_eq!((o.cache.as_str(), o.sandbox), ("auto", SandboxMode::Namespace));
    let bad = |a: &[&str]| parse_args(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    assert!(bad(&["--shared-dir", "/s"]).is_err());
    assert!(bad(&["--shared-dir", "/s", "--socket", "/x", "--cache", "sometimes"]).is_err());
    assert!(bad(&["--shared-dir", "/s", "--socket", "/x", "--sandbox", "maybe"]).is_err());
    assert!(seccomp::filter().is_ok());
}

/// The real `podvisor fs-serve` (`$PODVISOR_BIN`), sandboxed as the daemon runs it, answers
/// the requests a guest's mount, `ls`, `cat` and writes make: its seccomp allowlist and
/// capabilities cover them (a blocked syscall would kill it and break the connection).
#[test]
fn sandboxed_server_serves_a_guest_workload() {
    let Some(bin) = std::env::var_os("PODVISOR_BIN") else {
        assert!(std::env::var("PODVISOR_REQUIRE_E2E").as_deref() != Ok("1"), "PODVISOR_BIN unset");
        return eprintln!("SKIP: PODVISOR_BIN unset");
    };
    if !nix::unistd::geteuid().is_root() {
        assert!(std::env::var("PODVISOR_REQUIRE_E2E").as_deref() != Ok("1"), "needs root");
        return eprintln!("SKIP: the sandbox needs root");
    }
    let dir = tempfile::tempdir().unwrap();
    let share = dir.path().join("share");
    std::fs::create_dir(&share).unwrap();
    std::fs::write(share.join("hello"), b"hi").unwrap();
    std::os::unix::fs::symlink("hello", share.join("link")).unwrap();
    let socket = dir.path().join("fs.sock");
    let stderr = std::fs::File::create(dir.path().join("fs-serve.log")).unwrap();
    let mut child = std::process::Command::new(bin)
        .arg("fs-serve")
        .arg("--shared-dir")
        .arg(&share)
        .arg("--socket")
        .arg(&socket)
        .stderr(stderr)
        .spawn()
        .unwrap();
    for _ in 0..500 {
        if socket.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let mut c = UnixStream::connect(&socket).unwrap();
    let log = || std::fs::read_to_string(dir.path().join("fs-serve.log")).unwrap_or_default();
    let mut call = |opcode: u32, unique: u64, nodeid: u64, body: &[u8]| {
        c.write_all(&request(opcode, unique, nodeid, body)).unwrap();
        let mut header = [0u8; OUT_HEADER_LEN];
        if c.read_exact(&mut header).is_err() {
            panic!("fs-serve died at opcode {opcode}: {}", log());
        }
        let len = u32::from_le_bytes(header[..4].try_into().unwrap()) as usize;
        let mut body = vec![0u8; len - OUT_HEADER_LEN];
        c.read_exact(&mut body).unwrap();
        (i32::from_le_bytes(header[4..8].try_into().unwrap()), body)
    };
    let u64_at = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    assert_eq!(call(FUSE_INIT, 1, 0, &init_body()).0, 0);
    let (e, entry) = call(FUSE_LOOKUP, 2, 1, b"hello\0");
    assert_eq!(e, 0);
    let hello = u64_at(&entry, 0);
    assert_eq!(call(FUSE_GETATTR, 3, hello, &[0u8; 16]).0, 0);
    let (e, open) = call(14, 4, hello, &[0u8; 8]); // OPEN
    assert_eq!(e, 0);
    let mut read_in = u64_at(&open, 0).to_le_bytes().to_vec();
    read_in.extend_from_slice(&0u64.to_le_bytes());
    read_in.extend_from_slice(&4096u32.to_le_bytes());
    read_in.extend_from_slice(&[0u8; 20]);
    assert_eq!(call(15, 5, hello, &read_in), (0, b"hi".to_vec())); // READ
    let mut release = u64_at(&open, 0).to_le_bytes().to_vec();
    release.extend_from_slice(&[0u8; 16]);
    assert_eq!(call(18, 6, hello, &release).0, 0); // RELEASE
    let (e, opendir) = call(27, 7, 1, &[0u8; 8]); // OPENDIR
    assert_eq!(e, 0);
    let mut readdir = u64_at(&opendir, 0).to_le_bytes().to_vec();
    readdir.extend_from_slice(&0u64.to_le_bytes());
    readdir.extend_from_slice(&4096u32.to_le_bytes());
    readdir.extend_from_slice(&[0u8; 20]);
    let (e, entries) = call(44, 8, 1, &readdir); // READDIRPLUS
    assert_eq!(e, 0, "{}", log());
    assert!(!entries.is_empty());
    let (e, entry) = call(FUSE_LOOKUP, 9, 1, b"link\0");
    assert_eq!(e, 0);
    assert_eq!(call(5, 10, u64_at(&entry, 0), &[]), (0, b"hello".to_vec())); // READLINK
    assert_eq!(call(17, 11, 1, &[]).0, 0); // STATFS
                                           // Writes: create, write, mkdir, rename, unlink.
                                           // fuse_create_in: flags, mode, umask, open_flags; then the name.
    let mut create: Vec<u8> = [(libc::O_WRONLY | libc::O_CREAT) as u32, 0o644, 0, 0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    create.extend_from_slice(b"new\0");
    let (e, created) = call(opcode::CREATE, 12, 1, &create);
    assert_eq!(e, 0, "{}", log());
    let new_node = u64_at(&created, 0);
    let fh = u64_at(&created, 128); // after fuse_entry_out
    let mut write_in = fh.to_le_bytes().to_vec();
    write_in.extend_from_slice(&0u64.to_le_bytes()); // offset
    write_in.extend_from_slice(&3u32.to_le_bytes()); // size
    write_in.extend_from_slice(&[0u8; 20]); // write_flags, lock_owner, flags, padding
    write_in.extend_from_slice(b"abc");
    assert_eq!(call(opcode::WRITE, 13, new_node, &write_in).0, 0, "{}", log());
    let mut fsync = fh.to_le_bytes().to_vec();
    fsync.extend_from_slice(&[0u8; 8]);
    assert_eq!(call(20, 14, new_node, &fsync).0, 0, "{}", log()); // FSYNC
    let mut mkdir = 0o755u32.to_le_bytes().to_vec();
    mkdir.extend_from_slice(&0u32.to_le_bytes());
    mkdir.extend_from_slice(b"dir\0");
    assert_eq!(call(opcode::MKDIR, 15, 1, &mkdir).0, 0, "{}", log());
    let mut rename = 1u64.to_le_bytes().to_vec();
    rename.extend_from_slice(b"new\0renamed\0");
    assert_eq!(call(opcode::RENAME, 16, 1, &rename).0, 0, "{}", log());
    assert_eq!(call(opcode::UNLINK, 17, 1, b"renamed\0").0, 0, "{}", log());
    assert_eq!(call(opcode::RMDIR, 18, 1, b"dir\0").0, 0, "{}", log());
    drop(c);
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}: {}", log());
    assert!(!share.join("renamed").exists());
}
