//! The server on a temporary directory (no sandbox: these run as any user), driven over a
//! socketpair the way the VMM's device drives it, including malformed requests.

use std::io::Write;
use std::os::unix::net::UnixStream;

use super::*;

const FUSE_LOOKUP: u32 = 1;
const FUSE_GETATTR: u32 = 3;
const FUSE_INIT: u32 = 26;

fn request(opcode: u32, unique: u64, nodeid: u64, body: &[u8]) -> Vec<u8> {
    request_as(Caller { uid: 0, gid: 0 }, opcode, unique, nodeid, body)
}

/// The guest process a request comes from (`fuse_in_header.uid/gid`).
#[derive(Debug, Clone, Copy)]
struct Caller {
    uid: u32,
    gid: u32,
}

fn request_as(caller: Caller, opcode: u32, unique: u64, nodeid: u64, body: &[u8]) -> Vec<u8> {
    let mut r = Vec::new();
    r.extend_from_slice(&((IN_HEADER_LEN + body.len()) as u32).to_le_bytes());
    r.extend_from_slice(&opcode.to_le_bytes());
    r.extend_from_slice(&unique.to_le_bytes());
    r.extend_from_slice(&nodeid.to_le_bytes());
    r.extend_from_slice(&caller.uid.to_le_bytes());
    r.extend_from_slice(&caller.gid.to_le_bytes());
    r.extend_from_slice(&[0u8; 8]);
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
    serve_translated(readonly, IdMaps::default())
}

fn serve_translated(readonly: bool, ids: IdMaps) -> Served {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hello"), b"hi").unwrap();
    let (client, mut server_end) = UnixStream::pair().unwrap();
    let root = dir.path().to_path_buf();
    let thread = std::thread::spawn(move || {
        let mut server = FileServer::new(&root, "auto", readonly, ids)?;
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

/// A real `podvisor fs-serve` (`$PODVISOR_BIN`), sandboxed as the daemon runs it.
struct RealServer {
    dir: tempfile::TempDir,
    child: std::process::Child,
    client: UnixStream,
}

impl RealServer {
    /// Starts it on `<dir>/share` (which `fill` prepares) with `extra` arguments; `None`
    /// (skipped) without `$PODVISOR_BIN` or root.
    fn start(fill: impl FnOnce(&Path), extra: &[&str]) -> Option<Self> {
        let Some(bin) = std::env::var_os("PODVISOR_BIN") else {
            assert!(
                std::env::var("PODVISOR_REQUIRE_E2E").as_deref() != Ok("1"),
                "PODVISOR_BIN unset"
            );
            eprintln!("SKIP: PODVISOR_BIN unset");
            return None;
        };
        if needs_root() {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let share = dir.path().join("share");
        std::fs::create_dir(&share).unwrap();
        fill(&share);
        let socket = dir.path().join("fs.sock");
        let stderr = std::fs::File::create(dir.path().join("fs-serve.log")).unwrap();
        let mut command = std::process::Command::new(bin);
        // Started with supplementary groups (a daemon run from a login shell has some), which
        // the sandbox drops.
        // SAFETY: setgroups(2) is async-signal-safe; the array outlives the call.
        unsafe {
            use std::os::unix::process::CommandExt;
            command.pre_exec(|| {
                let groups: [libc::gid_t; 2] = [0, 10];
                if libc::setgroups(2, groups.as_ptr()) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command
            .arg("fs-serve")
            .arg("--shared-dir")
            .arg(&share)
            .arg("--socket")
            .arg(&socket)
            .args(extra)
            .stderr(stderr)
            .spawn()
            .unwrap();
        for _ in 0..500 {
            if socket.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let client = UnixStream::connect(&socket).unwrap();
        Some(RealServer { dir, child, client })
    }

    fn share(&self) -> PathBuf {
        self.dir.path().join("share")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("fs-serve.log")).unwrap_or_default()
    }

    /// Sends one request as `caller`: (error, body); panics with the log if the server died.
    fn call(
        &mut self,
        caller: Caller,
        opcode: u32,
        unique: u64,
        nodeid: u64,
        body: &[u8],
    ) -> (i32, Vec<u8>) {
        self.client.write_all(&request_as(caller, opcode, unique, nodeid, body)).unwrap();
        let mut header = [0u8; OUT_HEADER_LEN];
        if self.client.read_exact(&mut header).is_err() {
            panic!("fs-serve died at opcode {opcode}: {}", self.log());
        }
        let len = u32::from_le_bytes(header[..4].try_into().unwrap()) as usize;
        let mut body = vec![0u8; len - OUT_HEADER_LEN];
        self.client.read_exact(&mut body).unwrap();
        (i32::from_le_bytes(header[4..8].try_into().unwrap()), body)
    }

    /// Checks the (serving, so sandboxed) server has no supplementary groups.
    fn assert_no_groups(&self) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let groups = status.lines().find(|l| l.starts_with("Groups:")).unwrap_or_default();
        assert_eq!(groups.trim_end(), "Groups:", "supplementary groups kept");
    }

    /// Hangs up and checks the server exited 0.
    fn finish(mut self) {
        self.client.shutdown(std::net::Shutdown::Both).unwrap();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "{status}: {}", self.log());
    }
}

/// The real server, sandboxed, translating a pod's owners: its seccomp allowlist and
/// capabilities cover serving as the callers' host ids and chown.
#[test]
fn sandboxed_server_translates_owners() {
    let mut args = Vec::new();
    for kind in ["--translate-uid", "--translate-gid"] {
        for rule in POD_RULES {
            args.extend([kind, rule]);
        }
    }
    let Some(mut server) = RealServer::start(translation_share, &args) else { return };
    let share = server.share();
    exercise_translation(&share, &mut |caller, opcode, unique, nodeid, body| {
        server.call(caller, opcode, unique, nodeid, body)
    });
    server.assert_no_groups();
    server.finish();
}

/// The real `podvisor fs-serve` (`$PODVISOR_BIN`), sandboxed as the daemon runs it, answers
/// the requests a guest's mount, `ls`, `cat` and writes make: its seccomp allowlist and
/// capabilities cover them (a blocked syscall would kill it and break the connection).
#[test]
fn sandboxed_server_serves_a_guest_workload() {
    let fill = |share: &Path| {
        std::fs::write(share.join("hello"), b"hi").unwrap();
        std::os::unix::fs::symlink("hello", share.join("link")).unwrap();
    };
    let Some(mut server) = RealServer::start(fill, &[]) else { return };
    let share = server.share();
    let mut call = |opcode: u32, unique: u64, nodeid: u64, body: &[u8]| {
        server.call(Caller { uid: 0, gid: 0 }, opcode, unique, nodeid, body)
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
    assert_eq!(e, 0);
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
    assert_eq!(e, 0);
    let new_node = u64_at(&created, 0);
    let fh = u64_at(&created, 128); // after fuse_entry_out
    let mut write_in = fh.to_le_bytes().to_vec();
    write_in.extend_from_slice(&0u64.to_le_bytes()); // offset
    write_in.extend_from_slice(&3u32.to_le_bytes()); // size
    write_in.extend_from_slice(&[0u8; 20]); // write_flags, lock_owner, flags, padding
    write_in.extend_from_slice(b"abc");
    assert_eq!(call(opcode::WRITE, 13, new_node, &write_in).0, 0);
    let mut fsync = fh.to_le_bytes().to_vec();
    fsync.extend_from_slice(&[0u8; 8]);
    assert_eq!(call(20, 14, new_node, &fsync).0, 0); // FSYNC
    let mut mkdir = 0o755u32.to_le_bytes().to_vec();
    mkdir.extend_from_slice(&0u32.to_le_bytes());
    mkdir.extend_from_slice(b"dir\0");
    assert_eq!(call(opcode::MKDIR, 15, 1, &mkdir).0, 0);
    let mut rename = 1u64.to_le_bytes().to_vec();
    rename.extend_from_slice(b"new\0renamed\0");
    assert_eq!(call(opcode::RENAME, 16, 1, &rename).0, 0);
    assert_eq!(call(opcode::UNLINK, 17, 1, b"renamed\0").0, 0);
    assert_eq!(call(opcode::RMDIR, 18, 1, b"dir\0").0, 0);
    server.finish();
    assert!(!share.join("renamed").exists());
}

/// The daemon's translation for kubelet's usual pod (container ids 0.. at guest ids 131072..,
/// 65536 of them), as `--translate-uid/--translate-gid` values.
const POD_RULES: [&str; 2] = ["map:131072:0:65536", "squash-host:131072:65534:65536"];

fn pod_ids() -> IdMaps {
    let rules: Vec<String> = POD_RULES.iter().map(|r| r.to_string()).collect();
    IdMaps { uids: IdMap::parse(&rules).unwrap(), gids: IdMap::parse(&rules).unwrap() }
}

/// Sends one request as `caller`, returns (error, body).
type Call<'a> = dyn FnMut(Caller, u32, u64, u64, &[u8]) -> (i32, Vec<u8>) + 'a;

/// The share the translation scenario runs on: writable by all, a host root's file, one owned
/// by a host id in the guest range and one by a host id in no range.
fn translation_share(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::write(dir.join("hello"), b"hi").unwrap();
    for (name, id) in [("guest-range", 131_072), ("outside", 300_000)] {
        std::fs::write(dir.join(name), b"x").unwrap();
        std::os::unix::fs::chown(dir.join(name), Some(id), Some(id)).unwrap();
    }
}

/// (uid, gid) of the `fuse_attr` at `at` in a reply.
fn owner_at(body: &[u8], at: usize) -> (u32, u32) {
    let u32_at = |i: usize| u32::from_le_bytes(body[i..i + 4].try_into().unwrap());
    (u32_at(at + 68), u32_at(at + 72))
}

/// `fuse_entry_out`'s attr starts at 40, `fuse_attr_out`'s at 16.
const ENTRY_ATTR: usize = 40;
const ATTR_OUT_ATTR: usize = 16;

fn host_owner(path: &Path) -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(path).unwrap();
    (m.uid(), m.gid())
}

fn setattr_owner(uid: u32, gid: u32) -> Vec<u8> {
    let mut body = vec![0u8; 88];
    const FATTR_UID: u32 = 1 << 1;
    const FATTR_GID: u32 = 1 << 2;
    body[..4].copy_from_slice(&(FATTR_UID | FATTR_GID).to_le_bytes());
    body[76..80].copy_from_slice(&uid.to_le_bytes());
    body[80..84].copy_from_slice(&gid.to_le_bytes());
    body
}

/// virtiofsd's `--translate-uid/--translate-gid` semantics through the FUSE protocol: new
/// files are owned by the caller's host ids, chown sets host ids, and every attribute a reply
/// carries shows the guest's ids; ids in no range pass through in both directions (so a guest
/// id outside the map may come back as another: its host id lies in the mapped host range).
/// LINK too: the passthrough's `linkat(AT_EMPTY_PATH)` needs CAP_DAC_READ_SEARCH, which the
/// sandbox keeps for it.
fn exercise_translation(share: &Path, call: &mut Call) {
    let root = Caller { uid: 0, gid: 0 };
    let container = |id: u32| Caller { uid: 131_072 + id, gid: 131_072 + id };
    let u64_at = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    assert_eq!(call(root, FUSE_INIT, 1, 0, &init_body()).0, 0);

    let (e, hello) = call(root, FUSE_LOOKUP, 2, 1, b"hello\0");
    assert_eq!(e, 0);
    assert_eq!(owner_at(&hello, ENTRY_ATTR), (131_072, 131_072), "host root is container root");
    let (e, attr) = call(root, FUSE_GETATTR, 3, u64_at(&hello, 0), &[0u8; 16]);
    assert_eq!(e, 0);
    assert_eq!(owner_at(&attr, ATTR_OUT_ATTR), (131_072, 131_072));
    let (_, squashed) = call(root, FUSE_LOOKUP, 4, 1, b"guest-range\0");
    assert_eq!(owner_at(&squashed, ENTRY_ATTR), (65_534, 65_534), "guest range is nobody");
    let (_, outside) = call(root, FUSE_LOOKUP, 5, 1, b"outside\0");
    assert_eq!(owner_at(&outside, ENTRY_ATTR), (300_000, 300_000), "unmapped passes");

    let mut create: Vec<u8> = [(libc::O_WRONLY | libc::O_CREAT) as u32, 0o644, 0, 0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    create.extend_from_slice(b"by-1000\0");
    let (e, created) = call(container(1000), opcode::CREATE, 6, 1, &create);
    assert_eq!(e, 0);
    assert_eq!(owner_at(&created, ENTRY_ATTR), (132_072, 132_072));
    assert_eq!(host_owner(&share.join("by-1000")), (1000, 1000));
    let by_1000 = u64_at(&created, 0);

    let mkdir = |name: &str| {
        let mut body = 0o755u32.to_le_bytes().to_vec();
        body.extend_from_slice(&0u32.to_le_bytes());
        body.extend_from_slice(name.as_bytes());
        body.push(0);
        body
    };
    let (e, made) = call(container(0), opcode::MKDIR, 7, 1, &mkdir("by-root"));
    assert_eq!(e, 0);
    assert_eq!(owner_at(&made, ENTRY_ATTR), (131_072, 131_072));
    assert_eq!(host_owner(&share.join("by-root")), (0, 0));
    // A guest id in no range is the same host id, which shows in the guest as mapped.
    let (e, made) = call(Caller { uid: 5000, gid: 5000 }, opcode::MKDIR, 8, 1, &mkdir("by-5000"));
    assert_eq!(e, 0);
    assert_eq!(host_owner(&share.join("by-5000")), (5000, 5000));
    assert_eq!(owner_at(&made, ENTRY_ATTR), (136_072, 136_072));
    let mut link = by_1000.to_le_bytes().to_vec(); // fuse_link_in.oldnodeid, then the name
    link.extend_from_slice(b"hard\0");
    let (e, linked) = call(container(0), opcode::LINK, 9, 1, &link);
    assert_eq!(e, 0, "LINK");
    assert_eq!(owner_at(&linked, ENTRY_ATTR), (132_072, 132_072));
    let links =
        std::fs::metadata(share.join("hard")).map(|m| std::os::unix::fs::MetadataExt::nlink(&m));
    assert_eq!(links.ok(), Some(2));
    let (e, symlink) = call(container(7), opcode::SYMLINK, 10, 1, b"soft\0hello\0");
    assert_eq!(e, 0);
    assert_eq!(owner_at(&symlink, ENTRY_ATTR), (131_079, 131_079));
    assert_eq!(host_owner(&share.join("soft")), (7, 7));

    // chown: the guest's ids are set as the host's; the reply shows them as the guest's.
    let (e, attr) = call(root, opcode::SETATTR, 11, by_1000, &setattr_owner(133_072, 133_072));
    assert_eq!(e, 0);
    assert_eq!(owner_at(&attr, ATTR_OUT_ATTR), (133_072, 133_072));
    assert_eq!(host_owner(&share.join("by-1000")), (2000, 2000));
    let (e, attr) = call(root, opcode::SETATTR, 12, by_1000, &setattr_owner(65_534, 400_000));
    assert_eq!(e, 0);
    assert_eq!(host_owner(&share.join("by-1000")), (65_534, 400_000));
    assert_eq!(owner_at(&attr, ATTR_OUT_ATTR), (196_606, 400_000));

    // READDIRPLUS: each entry's attr too (fuse_entry_out, then fuse_dirent padded to 8).
    let (e, dir) = call(root, 27, 13, 1, &[0u8; 8]); // OPENDIR
    assert_eq!(e, 0);
    let mut readdir = u64_at(&dir, 0).to_le_bytes().to_vec();
    readdir.extend_from_slice(&0u64.to_le_bytes());
    readdir.extend_from_slice(&8192u32.to_le_bytes());
    readdir.extend_from_slice(&[0u8; 20]);
    let (e, entries) = call(root, 44, 14, 1, &readdir);
    assert_eq!(e, 0);
    let mut owners = std::collections::BTreeMap::new();
    let mut at = 0;
    while at + 152 <= entries.len() {
        let namelen = u32::from_le_bytes(entries[at + 144..at + 148].try_into().unwrap()) as usize;
        let name = String::from_utf8_lossy(&entries[at + 152..at + 152 + namelen]).into_owned();
        owners.insert(name, owner_at(&entries[at..], ENTRY_ATTR));
        at += 128 + (24 + namelen).div_ceil(8) * 8;
    }
    assert_eq!(owners.get("hello"), Some(&(131_072, 131_072)), "{owners:?}");
    assert_eq!(owners.get("guest-range"), Some(&(65_534, 65_534)), "{owners:?}");
    assert_eq!(owners.get("by-root"), Some(&(131_072, 131_072)), "{owners:?}");
}

fn needs_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return false;
    }
    assert!(std::env::var("PODVISOR_REQUIRE_E2E").as_deref() != Ok("1"), "needs root");
    eprintln!("SKIP: serving as other uids needs root");
    true
}

#[test]
fn translated_owners_both_ways() {
    if needs_root() {
        return;
    }
    let mut s = serve_translated(false, pod_ids());
    let share = s._dir.path().to_path_buf();
    std::fs::remove_file(share.join("hello")).unwrap();
    translation_share(&share);
    let client = &mut s.client;
    exercise_translation(&share, &mut |caller, opcode, unique, nodeid, body| {
        client.write_all(&request_as(caller, opcode, unique, nodeid, body)).unwrap();
        let (error, got, body) = reply(client);
        assert_eq!(got, unique);
        (error, body)
    });
}

#[test]
fn translation_args_are_checked() {
    let args = |extra: &[&str]| {
        let mut a: Vec<String> =
            ["--shared-dir", "/s", "--socket", "/x"].iter().map(|s| s.to_string()).collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        parse_args(&a)
    };
    let o = args(&["--translate-uid", POD_RULES[0], "--translate-uid", POD_RULES[1]]).unwrap();
    assert_eq!(o.ids, IdMaps { uids: pod_ids().uids, gids: IdMap::default() });
    let err = args(&["--translate-gid", "map:1:2"]).unwrap_err().to_string();
    assert!(err.starts_with("--translate-gid: id translation \"map:1:2\""), "{err}");
    let err = args(&["--translate-uid", "map:0:0:10", "--translate-uid", "map:5:100:1"]);
    assert!(err.unwrap_err().to_string().contains("overlaps"));
    assert!(args(&["--translate-uid"]).is_err());
}
