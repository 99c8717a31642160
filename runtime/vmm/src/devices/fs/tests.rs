//! vhost-user-fs tests against a real virtiofsd (skipped with a reason when none is
//! installed): the simulated driver sends FUSE_INIT through the request queue and reads
//! virtiofsd's reply from the used ring.

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::*;
use crate::devices::virtio::test_utils::{memfd_guest_memory, VirtioTestDriver};

const FUSE_LOOKUP: u32 = 1;
const FUSE_OPEN: u32 = 14;
const FUSE_READ: u32 = 15;
const FUSE_INIT: u32 = 26;
const FUSE_ROOT_ID: u64 = 1;

/// Sends one FUSE request on the request queue and returns the reply body (after the
/// 16-byte fuse_out_header, whose error must be 0).
fn fuse_call(
    driver: &mut VirtioTestDriver,
    device: &Arc<Mutex<VhostUserFsDevice>>,
    opcode: u32,
    unique: u64,
    nodeid: u64,
    body: &[u8],
) -> Vec<u8> {
    let mut request = Vec::new();
    request.extend_from_slice(&(40 + body.len() as u32).to_le_bytes());
    request.extend_from_slice(&opcode.to_le_bytes());
    request.extend_from_slice(&unique.to_le_bytes());
    request.extend_from_slice(&nodeid.to_le_bytes());
    request.extend_from_slice(&[0u8; 16]); // uid, gid, pid, padding
    request.extend_from_slice(body);
    let req_addr = driver.buffer_with(&request);
    let reply_addr = driver.alloc(8192);
    let head =
        driver.add_chain(1, &[(req_addr, request.len() as u32, false), (reply_addr, 8192, true)]);
    driver.kick(1);
    let deadline = Instant::now() + Duration::from_secs(10);
    let used = loop {
        device.lock().unwrap().process_call_events();
        let used = driver.take_used(1);
        if !used.is_empty() {
            break used;
        }
        assert!(Instant::now() < deadline, "no reply from virtiofsd to opcode {opcode}");
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(used, vec![(u32::from(head), used[0].1)]);
    // virtiofsd fills the used ring before it signals the call eventfd: the interrupt can
    // trail the reply we just saw.
    while driver.interrupt_status() & 1 == 0 && Instant::now() < deadline {
        device.lock().unwrap().process_call_events();
        std::thread::sleep(Duration::from_millis(1));
    }
    let reply = driver.read_mem(reply_addr, used[0].1 as usize);
    assert!(reply.len() >= 16, "short reply to opcode {opcode}");
    let len = u32::from_le_bytes(reply[..4].try_into().unwrap());
    let error = i32::from_le_bytes(reply[4..8].try_into().unwrap());
    let reply_unique = u64::from_le_bytes(reply[8..16].try_into().unwrap());
    assert_eq!((error, reply_unique), (0, unique), "opcode {opcode}");
    assert_eq!(len as usize, reply.len());
    reply[16..].to_vec()
}

struct Virtiofsd(Child);

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The virtiofsd binaries on this machine: the Rust one (`cargo install virtiofsd`) and
/// QEMU's C one, which take different flags.
fn virtiofsd_binaries() -> Vec<(PathBuf, bool)> {
    let home = std::env::var("HOME").unwrap_or_default();
    [
        (PathBuf::from(home).join(".cargo/bin/virtiofsd"), true),
        (PathBuf::from("/usr/lib/qemu/virtiofsd"), false),
    ]
    .into_iter()
    .filter(|(path, _)| path.exists())
    .collect()
}

/// Starts virtiofsd on `socket` sharing `dir`.
fn start_virtiofsd(
    binary: &Path,
    rust: bool,
    socket: &Path,
    dir: &Path,
) -> Result<Virtiofsd, String> {
    let mut cmd = Command::new(binary);
    cmd.arg(format!("--socket-path={}", socket.display()));
    if rust {
        cmd.arg(format!("--shared-dir={}", dir.display())).arg("--sandbox=none");
    } else {
        cmd.args(["-o", &format!("source={}", dir.display()), "-o", "sandbox=chroot"]);
    }
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("spawning {}: {e}", binary.display()))?;
    let daemon = Virtiofsd(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if Instant::now() > deadline {
            return Err(format!("{} did not create its socket", binary.display()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(daemon)
}

fn skip_or_fail(reason: &str) {
    assert!(
        std::env::var("PODVISOR_REQUIRE_E2E").as_deref() != Ok("1"),
        "virtiofsd required: {reason}"
    );
    eprintln!("SKIP vhost-user-fs test: {reason}");
}

#[test]
fn invalid_tag_is_refused() {
    let err = VhostUserFsDevice::new(Path::new("/nonexistent.sock"), "").err().unwrap();
    assert!(matches!(err, FsError::InvalidTag(_)));
    let err =
        VhostUserFsDevice::new(Path::new("/nonexistent.sock"), &"x".repeat(37)).err().unwrap();
    assert!(matches!(err, FsError::InvalidTag(_)));
    let err = VhostUserFsDevice::new(Path::new("/nonexistent.sock"), "share").err().unwrap();
    assert!(matches!(err, FsError::Connect(..)));
}

#[test]
fn fuse_requests_through_virtiofsd() {
    let binaries = virtiofsd_binaries();
    if binaries.is_empty() {
        return skip_or_fail("no virtiofsd (~/.cargo/bin/virtiofsd or /usr/lib/qemu/virtiofsd)");
    }
    for (binary, rust) in binaries {
        fuse_round_trip(&binary, rust);
    }
}

fn fuse_round_trip(binary: &Path, rust: bool) {
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::write(shared.join("hello"), b"hi").unwrap();
    let socket = dir.path().join("vfs.sock");
    let _daemon = match start_virtiofsd(binary, rust, &socket, &shared) {
        Ok(daemon) => daemon,
        Err(reason) => return skip_or_fail(&reason),
    };
    let device = Arc::new(Mutex::new(VhostUserFsDevice::new(&socket, "myfs").unwrap()));
    let mut driver = VirtioTestDriver::with_memory(memfd_guest_memory(), device.clone());
    assert_eq!(driver.read_reg(0x08), TYPE_FS);
    let config = driver.read_config(0, TAG_LEN + 4);
    assert_eq!(&config[..4], b"myfs");
    assert!(config[4..TAG_LEN].iter().all(|&b| b == 0));
    assert_eq!(&config[TAG_LEN..], &1u32.to_le_bytes());
    driver.activate(0);

    // FUSE_INIT, then LOOKUP + OPEN + READ of a file in the shared directory.
    let mut init = Vec::new();
    init.extend_from_slice(&7u32.to_le_bytes()); // major
    init.extend_from_slice(&31u32.to_le_bytes()); // minor
    init.extend_from_slice(&(128u32 * 1024).to_le_bytes()); // max_readahead
    init.extend_from_slice(&[0u8; 52]); // flags, flags2, unused
    let reply = fuse_call(&mut driver, &device, FUSE_INIT, 1, 0, &init);
    let major = u32::from_le_bytes(reply[..4].try_into().unwrap());
    assert_eq!(major, 7);
    assert_ne!(driver.interrupt_status() & 1, 0, "used-buffer interrupt raised");

    let entry = fuse_call(&mut driver, &device, FUSE_LOOKUP, 2, FUSE_ROOT_ID, b"hello\0");
    let nodeid = u64::from_le_bytes(entry[..8].try_into().unwrap());
    assert_ne!(nodeid, 0);
    let open = fuse_call(&mut driver, &device, FUSE_OPEN, 3, nodeid, &[0u8; 8]);
    let fh = u64::from_le_bytes(open[..8].try_into().unwrap());
    let mut read_in = Vec::new();
    read_in.extend_from_slice(&fh.to_le_bytes());
    read_in.extend_from_slice(&0u64.to_le_bytes()); // offset
    read_in.extend_from_slice(&4096u32.to_le_bytes()); // size
    read_in.extend_from_slice(&[0u8; 20]); // read_flags, lock_owner, flags, padding
    let data = fuse_call(&mut driver, &device, FUSE_READ, 4, nodeid, &read_in);
    assert_eq!(data, b"hi");

    // Reset stops the rings in the backend; a re-initialised driver is served again.
    driver.write_reg(0x70, 0);
    assert_eq!(driver.read_reg(0x70), 0);
    driver.activate(0);
    let entry = fuse_call(&mut driver, &device, FUSE_LOOKUP, 5, FUSE_ROOT_ID, b"hello\0");
    assert_eq!(u64::from_le_bytes(entry[..8].try_into().unwrap()), nodeid);
}
