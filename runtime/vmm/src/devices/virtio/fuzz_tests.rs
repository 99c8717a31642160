//! Random descriptor chains against every built-in device: whatever the guest writes in
//! its rings, the VMM must not panic or touch memory outside the guest's.

use std::sync::{Arc, Mutex};

use vm_memory::{Address, Bytes, GuestAddress};

use super::test_utils::{VirtioTestDriver, F_NEXT, F_WRITE, MEM_SIZE};
use super::VirtioDevice;
use crate::devices::{BlockDevice, NetDevice, VsockDevice};

/// xorshift64*: deterministic, so a failure replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn random_descriptor(rng: &mut Rng, queue_size: u16) -> (u64, u32, u16, u16) {
    let addr = match rng.below(4) {
        0 => rng.next(),                                        // anywhere
        1 => (MEM_SIZE as u64).saturating_sub(rng.below(4096)), // straddling the end
        _ => 0x100_0000 + rng.below(0x80_0000),                 // the data area
    };
    let len = match rng.below(4) {
        0 => rng.next() as u32,
        1 => 0,
        _ => rng.below(70_000) as u32,
    };
    let flags = (rng.below(4) as u16) & (F_NEXT | F_WRITE);
    let next =
        if rng.below(8) == 0 { rng.next() as u16 } else { rng.below(u64::from(queue_size)) as u16 };
    (addr, len, flags, next)
}

/// Returns how many chains the device returned (to show it did process them).
fn hammer(device: Arc<Mutex<dyn VirtioDevice>>, seed: u64) -> usize {
    let mut rng = Rng(seed);
    let mut driver = VirtioTestDriver::new(device);
    driver.activate(0);
    // Valid-looking request headers in the data area give the devices something to parse.
    for i in 0..64u64 {
        let mut header = [0u8; 64];
        for b in header.iter_mut() {
            *b = rng.next() as u8;
        }
        header[0] = (i % 9) as u8; // blk request types 0..8
        driver.mem.write_slice(&header, GuestAddress(0x100_0000 + i * 0x2_0000)).unwrap();
    }
    let mut used = 0;
    for _ in 0..2000 {
        let queue = rng.below(driver.queues.len() as u64) as usize;
        let size = driver.queues[queue].size;
        let count = 1 + rng.below(4) as usize;
        let descs: Vec<_> = (0..count).map(|_| random_descriptor(&mut rng, size)).collect();
        driver.add_raw_chain(queue, &descs);
        if rng.below(50) == 0 {
            // A corrupt available index.
            let avail = driver.queues[queue].avail;
            driver.mem.write_obj(rng.next() as u16, avail.unchecked_add(2)).unwrap();
        }
        driver.kick(queue);
        used += driver.take_used(queue).len();
        if driver.needs_reset() {
            driver.write_reg(0x70, 0);
            driver.activate(0);
        }
    }
    used
}

#[test]
fn random_chains_never_crash_vsock() {
    let dir = tempfile::tempdir().unwrap();
    let device = VsockDevice::new(3, &dir.path().join("v.sock")).unwrap();
    let device = Arc::new(Mutex::new(device));
    for seed in 1..=3 {
        assert!(hammer(device.clone(), seed) > 100);
    }
}

#[test]
fn random_chains_never_crash_block() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk");
    std::fs::write(&path, vec![0u8; 64 * 1024]).unwrap();
    let device = BlockDevice::new(&path, false).unwrap();
    let device = Arc::new(Mutex::new(device));
    for seed in 11..=13 {
        assert!(hammer(device.clone(), seed) > 100);
    }
    // Whatever was written stayed inside the file.
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 64 * 1024);
}

#[test]
fn random_chains_never_crash_net() {
    let (a, _b) = std::os::unix::net::UnixDatagram::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    let device = NetDevice::from_frame_fd(a.into(), [2, 0, 0, 0, 0, 1]);
    let device = Arc::new(Mutex::new(device));
    for seed in 21..=23 {
        assert!(hammer(device.clone(), seed) > 100);
    }
}
