//! In-process virtio-fs against a real FUSE server (`podvisor-fs-server` on a temporary
//! directory, in a thread at the end of a socketpair): the simulated driver sends FUSE
//! requests through the request queue; hostile chains and a hostile server get errors, never
//! a panic; a snapshot restores onto a device talking to a new server.

use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use vm_memory::GuestAddress;

use super::*;
use crate::devices::virtio::test_utils::{VirtioTestDriver, F_NEXT, F_WRITE};
use crate::devices::MmioTransport;
use crate::snapshot::Snapshottable;

const FUSE_LOOKUP: u32 = 1;
const FUSE_GETATTR: u32 = 3;
const FUSE_OPEN: u32 = 14;
const FUSE_READ: u32 = 15;
const FUSE_INIT: u32 = 26;
const FUSE_ROOT_ID: u64 = 1;
const REQUEST_QUEUE: usize = 1;

struct Harness {
    dir: tempfile::TempDir,
    device: Arc<Mutex<VirtioFsDevice>>,
    driver: VirtioTestDriver,
    server: Option<std::thread::JoinHandle<()>>,
}

/// A FUSE server thread on `root`; returns the device's end of the connection.
fn start_server(root: &Path) -> (UnixStream, std::thread::JoinHandle<()>) {
    let (device_end, mut server_end) = UnixStream::pair().unwrap();
    let root = root.to_path_buf();
    let server = std::thread::spawn(move || {
        let mut server =
            podvisor_fs_server::FileServer::new(&root, "auto", false, Default::default()).unwrap();
        server.import().unwrap();
        // Ends when the device's end closes.
        let _ = server.serve(&mut server_end);
    });
    (device_end, server)
}

impl Harness {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("hello"), b"hi").unwrap();
        let (stream, server) = start_server(dir.path());
        let device = Arc::new(Mutex::new(VirtioFsDevice::with_stream(stream, "myfs").unwrap()));
        let mut driver = VirtioTestDriver::new(device.clone());
        driver.activate(0);
        Harness { dir, device, driver, server: Some(server) }
    }

    /// Publishes `chain` on the request queue and returns its used length.
    fn submit(&mut self, chain: &[(GuestAddress, u32, bool)]) -> u32 {
        let head = self.driver.add_chain(REQUEST_QUEUE, chain);
        self.driver.kick(REQUEST_QUEUE);
        let used = self.driver.take_used(REQUEST_QUEUE);
        assert_eq!(used.len(), 1, "one used entry per request");
        assert_eq!(used[0].0, u32::from(head));
        used[0].1
    }

    /// Sends one request with a reply buffer of `reply_len`; returns (error, reply body).
    fn call_with(&mut self, request: &[u8], reply_len: u32) -> (i32, Vec<u8>) {
        let req = self.driver.buffer_with(request);
        let reply = self.driver.alloc(reply_len as usize);
        let used = self.submit(&[(req, request.len() as u32, false), (reply, reply_len, true)]);
        assert!(used as usize >= OUT_HEADER_LEN, "reply of {used} bytes");
        let bytes = self.driver.read_mem(reply, used as usize);
        let len = u32::from_le_bytes(bytes[..4].try_into().unwrap());
        assert_eq!(len, used, "used length is the reply's length");
        let error = i32::from_le_bytes(bytes[4..8].try_into().unwrap());
        let unique = u64::from_le_bytes(bytes[8..16].try_into().unwrap());
        assert_eq!(unique, u64::from_le_bytes(request[8..16].try_into().unwrap()));
        (error, bytes[OUT_HEADER_LEN..].to_vec())
    }

    /// A request that must succeed; returns its reply body.
    fn call(&mut self, opcode: u32, unique: u64, nodeid: u64, body: &[u8]) -> Vec<u8> {
        let (error, reply) = self.call_with(&request(opcode, unique, nodeid, body), 8192);
        assert_eq!(error, 0, "opcode {opcode}");
        reply
    }

    fn init(&mut self) {
        let reply = self.call(FUSE_INIT, 1, 0, &init_body());
        assert_eq!(u32::from_le_bytes(reply[..4].try_into().unwrap()), 7);
    }

    fn lookup_hello(&mut self, unique: u64) -> u64 {
        let entry = self.call(FUSE_LOOKUP, unique, FUSE_ROOT_ID, b"hello\0");
        u64::from_le_bytes(entry[..8].try_into().unwrap())
    }
}

fn request(opcode: u32, unique: u64, nodeid: u64, body: &[u8]) -> Vec<u8> {
    let mut r = Vec::new();
    r.extend_from_slice(&((IN_HEADER_LEN + body.len()) as u32).to_le_bytes());
    r.extend_from_slice(&opcode.to_le_bytes());
    r.extend_from_slice(&unique.to_le_bytes());
    r.extend_from_slice(&nodeid.to_le_bytes());
    r.extend_from_slice(&[0u8; 16]); // uid, gid, pid, padding
    r.extend_from_slice(body);
    r
}

fn init_body() -> Vec<u8> {
    let mut init = Vec::new();
    init.extend_from_slice(&7u32.to_le_bytes()); // major
    init.extend_from_slice(&31u32.to_le_bytes()); // minor
    init.extend_from_slice(&(128u32 * 1024).to_le_bytes()); // max_readahead
    init.extend_from_slice(&[0u8; 52]); // flags, flags2, unused
    init
}

#[test]
fn config_space_and_tag_checks() {
    let (stream, _) = UnixStream::pair().unwrap();
    assert!(matches!(
        VirtioFsDevice::with_stream(stream, &"x".repeat(37)),
        Err(VirtioFsError::InvalidTag(_))
    ));
    assert!(matches!(
        VirtioFsDevice::new(Path::new("/nonexistent.sock"), "share"),
        Err(VirtioFsError::Connect(..))
    ));
    let mut h = Harness::new();
    assert_eq!(h.driver.read_reg(0x08), TYPE_FS);
    let config = h.driver.read_config(0, TAG_LEN + 4);
    assert_eq!(&config[..4], b"myfs");
    assert_eq!(&config[TAG_LEN..], &1u32.to_le_bytes());
}

#[test]
fn init_lookup_getattr_open_read_through_a_real_server() {
    let mut h = Harness::new();
    h.init();
    assert_ne!(h.driver.interrupt_status() & 1, 0, "used-buffer interrupt raised");
    let nodeid = h.lookup_hello(2);
    assert_ne!(nodeid, 0);
    let attr = h.call(FUSE_GETATTR, 3, nodeid, &[0u8; 16]);
    // fuse_attr_out: attr_valid, attr_valid_nsec + dummy, then fuse_attr { ino, size, .. }.
    assert_eq!(u64::from_le_bytes(attr[24..32].try_into().unwrap()), 2);
    let open = h.call(FUSE_OPEN, 4, nodeid, &[0u8; 8]);
    let fh = u64::from_le_bytes(open[..8].try_into().unwrap());
    let mut read_in = Vec::new();
    read_in.extend_from_slice(&fh.to_le_bytes());
    read_in.extend_from_slice(&0u64.to_le_bytes()); // offset
    read_in.extend_from_slice(&4096u32.to_le_bytes()); // size
    read_in.extend_from_slice(&[0u8; 20]); // read_flags, lock_owner, flags, padding
    assert_eq!(h.call(FUSE_READ, 5, nodeid, &read_in), b"hi");
    let (error, _) = h.call_with(&request(FUSE_LOOKUP, 6, FUSE_ROOT_ID, b"nope\0"), 4096);
    assert_eq!(error, -libc::ENOENT);
    let metrics = h.device.lock().unwrap().metrics();
    assert_eq!((metrics.requests, metrics.replies, metrics.error_replies), (6, 6, 0));
}

#[test]
fn hostile_chains_get_errors_without_panics() {
    let mut h = Harness::new();
    h.init();
    // Oversized request: E2BIG from the device, nothing sent.
    let big = vec![0u8; MAX_MESSAGE + 1];
    let mut oversized = request(FUSE_LOOKUP, 10, FUSE_ROOT_ID, b"hello\0");
    oversized.extend_from_slice(&big);
    assert_eq!(h.call_with(&oversized, 64).0, -libc::E2BIG);
    // A request shorter than its header: returned empty.
    let short = h.driver.buffer_with(&[1, 2, 3]);
    let reply = h.driver.alloc(64);
    assert_eq!(h.submit(&[(short, 3, false), (reply, 64, true)]), 0);
    // A header whose length lies: the device frames by what it sends, the server answers.
    let mut lying = request(FUSE_LOOKUP, 11, FUSE_ROOT_ID, b"hello\0");
    lying[..4].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(h.call_with(&lying, 4096).0, 0);
    // Device-readable after device-writable: malformed, returned empty.
    let req = h.driver.buffer_with(&request(FUSE_LOOKUP, 12, FUSE_ROOT_ID, b"hello\0"));
    let w = h.driver.alloc(64);
    assert_eq!(h.submit(&[(w, 64, true), (req, 46, false)]), 0);
    // A descriptor loop: malformed.
    let base = h.driver.alloc(64).0;
    let slot = h.driver.queues[REQUEST_QUEUE].next_desc;
    h.driver.add_raw_chain(REQUEST_QUEUE, &[(base, 64, F_NEXT, slot)]);
    h.driver.kick(REQUEST_QUEUE);
    assert_eq!(h.driver.take_used(REQUEST_QUEUE).first().map(|u| u.1), Some(0));
    // A buffer outside guest memory: malformed.
    h.driver.add_raw_chain(REQUEST_QUEUE, &[(u64::MAX - 8, 64, F_WRITE, 0)]);
    h.driver.kick(REQUEST_QUEUE);
    assert_eq!(h.driver.take_used(REQUEST_QUEUE).first().map(|u| u.1), Some(0));
    // A reply larger than the guest's buffer: EIO in what fits.
    assert_eq!(h.call_with(&request(FUSE_LOOKUP, 13, FUSE_ROOT_ID, b"hello\0"), 20).0, -libc::EIO);
    // No writable part at all: returned empty.
    let req = h.driver.buffer_with(&request(FUSE_LOOKUP, 14, FUSE_ROOT_ID, b"hello\0"));
    assert_eq!(h.submit(&[(req, 46, false)]), 0);
    // FORGET has no reply.
    let forget = h.driver.buffer_with(&request(2, 15, 2, &1u64.to_le_bytes()));
    assert_eq!(h.submit(&[(forget, 48, false)]), 0);
    // Nothing of that broke the device or the server.
    assert_ne!(h.lookup_hello(16), 0);
    assert!(!h.driver.needs_reset());
    assert!(h.device.lock().unwrap().metrics().malformed_chains >= 4);
}

/// A server that answers with `reply` to the first request, then hangs up.
fn hostile_server(reply: Vec<u8>) -> UnixStream {
    let (device_end, mut server_end) = UnixStream::pair().unwrap();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; MAX_MESSAGE];
        let _ = podvisor_fs_server::read_request(&mut server_end, &mut buf);
        let _ = server_end.write_all(&reply);
    });
    device_end
}

#[test]
fn a_hostile_server_is_given_up_on() {
    let reply_header = |len: u32, unique: u64| {
        let mut r = len.to_le_bytes().to_vec();
        r.extend_from_slice(&0i32.to_le_bytes());
        r.extend_from_slice(&unique.to_le_bytes());
        r
    };
    for (what, reply) in [
        ("a huge length", reply_header(u32::MAX, 1)),
        ("a length shorter than its header", reply_header(3, 1)),
        ("another request's reply", reply_header(16, 99)),
        ("a truncated reply", reply_header(64, 1)),
        ("no reply", Vec::new()),
    ] {
        let device = VirtioFsDevice::with_stream(hostile_server(reply), "x").unwrap();
        let device = Arc::new(Mutex::new(device));
        let mut driver = VirtioTestDriver::new(device.clone());
        driver.activate(0);
        for unique in [1u64, 2] {
            let req = driver.buffer_with(&request(FUSE_INIT, unique, 0, &init_body()));
            let out = driver.alloc(4096);
            driver.add_chain(REQUEST_QUEUE, &[(req, 104, false), (out, 4096, true)]);
            driver.kick(REQUEST_QUEUE);
            let used = driver.take_used(REQUEST_QUEUE);
            assert_eq!(used.len(), 1, "{what}");
            let bytes = driver.read_mem(out, used[0].1 as usize);
            assert_eq!(bytes.len(), OUT_HEADER_LEN, "{what}");
            let error = i32::from_le_bytes(bytes[4..8].try_into().unwrap());
            assert_eq!(error, -libc::EIO, "{what}: request {unique}");
        }
        assert_eq!(device.lock().unwrap().metrics().server_failures, 1, "{what}");
    }
}

#[test]
fn snapshot_and_restore_onto_a_new_server() {
    let mut h = Harness::new();
    h.init();
    h.lookup_hello(2);
    let saved = h.driver.transport.lock().unwrap().save_state().unwrap();
    assert_eq!(saved.queues.len(), 2);

    // The restored VM: the same guest memory, a new device on a new server's connection.
    std::fs::write(h.dir.path().join("after"), b"restored").unwrap();
    let (stream, _server) = start_server(h.dir.path());
    let restored = Arc::new(Mutex::new(VirtioFsDevice::with_stream(stream, "myfs").unwrap()));
    let irq = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mut transport = MmioTransport::new(h.driver.mem.clone(), irq, restored.clone());
    transport.restore_state(&saved).unwrap();
    h.driver.transport = Arc::new(Mutex::new(transport));
    h.device = restored;
    // The old device is gone: its server sees the hang-up and exits.
    h.server.take().unwrap().join().unwrap();

    // The guest mounts after the restore: a fresh session on the same rings.
    h.init();
    let entry = h.call(FUSE_LOOKUP, 3, FUSE_ROOT_ID, b"after\0");
    assert_ne!(u64::from_le_bytes(entry[..8].try_into().unwrap()), 0);
    assert_ne!(h.lookup_hello(4), 0);
    assert_eq!(h.device.lock().unwrap().metrics().replies, 3);
}
