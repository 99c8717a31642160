//! vhost-user-fs tests against a real virtiofsd (skipped with a reason when none is
//! installed): the simulated driver sends FUSE_INIT through the request queue and reads
//! virtiofsd's reply from the used ring.

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{Address, Bytes};

use super::*;
use crate::devices::virtio::test_utils::{memfd_guest_memory, VirtioTestDriver};

const FUSE_INIT: u32 = 26;

struct Virtiofsd(Child);

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts virtiofsd on `socket` sharing `dir`: the Rust one if installed, else QEMU's.
fn start_virtiofsd(socket: &Path, dir: &Path) -> Result<Virtiofsd, String> {
    let home = std::env::var("HOME").unwrap_or_default();
    let rust = PathBuf::from(home).join(".cargo/bin/virtiofsd");
    let qemu = PathBuf::from("/usr/lib/qemu/virtiofsd");
    let mut cmd = if rust.exists() {
        let mut cmd = Command::new(rust);
        cmd.arg(format!("--socket-path={}", socket.display()))
            .arg(format!("--shared-dir={}", dir.display()))
            .arg("--sandbox=none");
        cmd
    } else if qemu.exists() {
        let mut cmd = Command::new(qemu);
        cmd.arg(format!("--socket-path={}", socket.display()))
            .arg("-o")
            .arg(format!("source={}", dir.display()))
            .arg("-o")
            .arg("sandbox=chroot");
        cmd
    } else {
        return Err("no virtiofsd (~/.cargo/bin/virtiofsd or /usr/lib/qemu/virtiofsd)".into());
    };
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("spawning virtiofsd: {e}"))?;
    let daemon = Virtiofsd(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if Instant::now() > deadline {
            return Err("virtiofsd did not create its socket".into());
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
fn fuse_init_round_trip_through_virtiofsd() {
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::write(shared.join("hello"), b"hi").unwrap();
    let socket = dir.path().join("vfs.sock");
    let _daemon = match start_virtiofsd(&socket, &shared) {
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

    // FUSE_INIT: fuse_in_header (40 bytes) + fuse_init_in (64 bytes).
    let mut request = Vec::new();
    request.extend_from_slice(&104u32.to_le_bytes()); // len
    request.extend_from_slice(&FUSE_INIT.to_le_bytes());
    request.extend_from_slice(&7u64.to_le_bytes()); // unique
    request.extend_from_slice(&0u64.to_le_bytes()); // nodeid
    request.extend_from_slice(&[0u8; 16]); // uid, gid, pid, padding
    request.extend_from_slice(&7u32.to_le_bytes()); // major
    request.extend_from_slice(&31u32.to_le_bytes()); // minor
    request.extend_from_slice(&(128u32 * 1024).to_le_bytes()); // max_readahead
    request.extend_from_slice(&[0u8; 52]); // flags, flags2, unused
    assert_eq!(request.len(), 104);
    let req_addr = driver.buffer_with(&request);
    let reply_addr = driver.alloc(4096);
    let head = driver.add_chain(1, &[(req_addr, 104, false), (reply_addr, 4096, true)]);
    driver.kick(1);

    let deadline = Instant::now() + Duration::from_secs(10);
    let used = loop {
        device.lock().unwrap().process_call_events();
        let used = driver.take_used(1);
        if !used.is_empty() {
            break used;
        }
        assert!(Instant::now() < deadline, "no reply from virtiofsd");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(used[0].0, u32::from(head));
    assert!(used[0].1 >= 16 + 24, "reply of {} bytes", used[0].1);
    let len: u32 = driver.mem.read_obj(reply_addr).unwrap();
    let error: i32 = driver.mem.read_obj(reply_addr.unchecked_add(4)).unwrap();
    let unique: u64 = driver.mem.read_obj(reply_addr.unchecked_add(8)).unwrap();
    let major: u32 = driver.mem.read_obj(reply_addr.unchecked_add(16)).unwrap();
    assert_eq!((error, unique, major), (0, 7, 7));
    assert_eq!(len, used[0].1);
    assert_ne!(driver.interrupt_status() & 1, 0, "used-buffer interrupt raised");

    // Reset stops the rings in the backend without errors.
    driver.write_reg(0x70, 0);
    assert_eq!(driver.read_reg(0x70), 0);
}
