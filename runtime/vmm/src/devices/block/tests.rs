//! virtio-blk tests: a simulated driver against a temporary raw file.

use std::io::Write;
use std::sync::{Arc, Mutex};

use vm_memory::{Address, Bytes, GuestAddress};

use super::*;
use crate::devices::virtio::test_utils::{VirtioTestDriver, F_NEXT, F_WRITE};

const SECTORS: u64 = 16;

struct Harness {
    _dir: tempfile::TempDir,
    path: PathBuf,
    device: Arc<Mutex<BlockDevice>>,
    driver: VirtioTestDriver,
}

fn disk(dir: &Path, name: &str, sectors: u64, fill: u8) -> PathBuf {
    let path = dir.join(name);
    let mut file = File::create(&path).unwrap();
    file.write_all(&vec![fill; (sectors * SECTOR_SIZE) as usize]).unwrap();
    path
}

impl Harness {
    fn new(read_only: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = disk(dir.path(), "disk.raw", SECTORS, 0);
        // Recognisable content: sector n is filled with byte n.
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        for n in 0..SECTORS {
            file.write_all_at(&[n as u8; SECTOR_SIZE as usize], n * SECTOR_SIZE).unwrap();
        }
        let device = Arc::new(Mutex::new(BlockDevice::new(&path, read_only).unwrap()));
        let mut driver = VirtioTestDriver::new(device.clone());
        driver.activate(0);
        Harness { _dir: dir, path, device, driver }
    }

    fn header(&mut self, request_type: u32, sector: u64) -> GuestAddress {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&request_type.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.driver.buffer_with(&h)
    }

    /// Submits a request, returns (status, used len, data buffer address).
    fn request(
        &mut self,
        request_type: u32,
        sector: u64,
        data: Option<(&[u8], bool)>,
    ) -> (u8, u32, GuestAddress) {
        let hdr = self.header(request_type, sector);
        let status = self.driver.alloc(1);
        self.driver.mem.write_obj(0xffu8, status).unwrap();
        let mut chain = vec![(hdr, 16, false)];
        let mut data_addr = GuestAddress(0);
        if let Some((bytes, writable)) = data {
            data_addr = self.driver.buffer_with(bytes);
            chain.push((data_addr, bytes.len() as u32, writable));
        }
        chain.push((status, 1, true));
        let head = self.driver.add_chain(0, &chain);
        self.driver.kick(0);
        let used = self.driver.take_used(0);
        assert_eq!(used.len(), 1);
        assert_eq!(used[0].0, u32::from(head));
        let status: u8 = self.driver.mem.read_obj(status).unwrap();
        (status, used[0].1, data_addr)
    }
}

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

#[test]
fn config_and_features() {
    let mut h = Harness::new(true);
    assert_eq!(h.driver.read_reg(0x08), TYPE_BLOCK);
    assert_eq!(h.driver.read_config(0, 8), SECTORS.to_le_bytes());
    h.driver.write_reg(0x14, 0);
    let features = h.driver.read_reg(0x10);
    assert_ne!(features & (1 << VIRTIO_BLK_F_RO), 0);
    assert_ne!(features & (1 << VIRTIO_BLK_F_FLUSH), 0);
}

#[test]
fn a_restored_device_serves_the_saved_ring_from_its_own_disk() {
    use crate::snapshot::Snapshottable;
    let mut h = Harness::new(false);
    assert_eq!(h.request(VIRTIO_BLK_T_IN, 1, Some((&[0u8; 512], true))).0, OK);
    let state = h.driver.transport.lock().unwrap().save_state().unwrap();

    // The pod's VM: a disk of its own (sectors filled with 0xaa), the snapshot's ring.
    let pod_disk = disk(h._dir.path(), "pod.raw", SECTORS, 0xaa);
    let device = Arc::new(Mutex::new(BlockDevice::new(&pod_disk, false).unwrap()));
    let irq = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mut transport =
        crate::devices::MmioTransport::new(h.driver.mem.clone(), irq, device.clone());
    transport.restore_state(&state).unwrap();
    h.driver.transport = Arc::new(Mutex::new(transport));
    h.device = device;

    let (status, _, data) = h.request(VIRTIO_BLK_T_IN, 1, Some((&[0u8; 512], true)));
    assert_eq!(status, OK);
    assert!(h.driver.read_mem(data, 512).iter().all(|&b| b == 0xaa), "read from the pod's disk");
    assert_eq!(h.request(VIRTIO_BLK_T_OUT, 2, Some((&[7u8; 512], false))).0, OK);
    let mut sector = vec![0u8; 512];
    File::open(&pod_disk).unwrap().read_exact_at(&mut sector, 2 * SECTOR_SIZE).unwrap();
    assert!(sector.iter().all(|&b| b == 7), "the write went to the pod's disk");
    let mut template = vec![0u8; 512];
    File::open(&h.path).unwrap().read_exact_at(&mut template, 2 * SECTOR_SIZE).unwrap();
    assert!(template.iter().all(|&b| b == 2), "the template's disk is untouched");
}

#[test]
fn read_sectors() {
    let mut h = Harness::new(false);
    let (status, len, data) = h.request(VIRTIO_BLK_T_IN, 3, Some((&[0u8; 1024], true)));
    assert_eq!(status, OK);
    assert_eq!(len, 1025);
    let bytes = h.driver.read_mem(data, 1024);
    assert!(bytes[..512].iter().all(|&b| b == 3));
    assert!(bytes[512..].iter().all(|&b| b == 4));
}

#[test]
fn write_then_flush() {
    let mut h = Harness::new(false);
    let (status, len, _) = h.request(VIRTIO_BLK_T_OUT, 5, Some((&[0xab; 512], false)));
    assert_eq!((status, len), (OK, 1));
    let (status, _, _) = h.request(VIRTIO_BLK_T_FLUSH, 0, None);
    assert_eq!(status, OK);
    let content = std::fs::read(&h.path).unwrap();
    assert!(content[5 * 512..6 * 512].iter().all(|&b| b == 0xab));
    assert!(content[6 * 512..7 * 512].iter().all(|&b| b == 6));
    let m = h.device.lock().unwrap().metrics();
    assert_eq!((m.write_requests, m.write_bytes, m.flush_requests), (1, 512, 1));
}

#[test]
fn read_only_disk_refuses_writes() {
    let mut h = Harness::new(true);
    let (status, _, _) = h.request(VIRTIO_BLK_T_OUT, 0, Some((&[0xab; 512], false)));
    assert_eq!(status, IOERR);
    assert!(std::fs::read(&h.path).unwrap()[..512].iter().all(|&b| b == 0));
    let (status, _, _) = h.request(VIRTIO_BLK_T_IN, 0, Some((&[0u8; 512], true)));
    assert_eq!(status, OK);
}

#[test]
fn out_of_range_and_partial_sectors_fail() {
    let mut h = Harness::new(false);
    let (status, len, _) = h.request(VIRTIO_BLK_T_IN, SECTORS - 1, Some((&[0u8; 1024], true)));
    assert_eq!((status, len), (IOERR, 1));
    let (status, _, _) = h.request(VIRTIO_BLK_T_OUT, SECTORS, Some((&[1u8; 512], false)));
    assert_eq!(status, IOERR);
    let (status, _, _) = h.request(VIRTIO_BLK_T_IN, u64::MAX, Some((&[0u8; 512], true)));
    assert_eq!(status, IOERR);
    let (status, _, _) = h.request(VIRTIO_BLK_T_IN, 0, Some((&[0u8; 100], true)));
    assert_eq!(status, IOERR);
    assert_eq!(std::fs::metadata(&h.path).unwrap().len(), SECTORS * SECTOR_SIZE);
}

#[test]
fn get_id_and_unsupported() {
    let mut h = Harness::new(false);
    let (status, len, data) = h.request(VIRTIO_BLK_T_GET_ID, 0, Some((&[0u8; 20], true)));
    assert_eq!(status, OK);
    assert_eq!(len, 21);
    let id = h.driver.read_mem(data, 20);
    assert!(id[0].is_ascii_digit());
    let (status, _, _) = h.request(0x1234, 0, None);
    assert_eq!(status, UNSUPP);
}

#[test]
fn swap_backing_updates_capacity_and_raises_config_interrupt() {
    let mut h = Harness::new(false);
    let gen = h.driver.read_reg(0xfc);
    h.driver.write_reg(0x64, 0xffff_ffff);
    let other = disk(h._dir.path(), "other.raw", 64, 0x5a);
    h.device.lock().unwrap().swap_backing(&other).unwrap();
    assert_eq!(h.driver.read_config(0, 8), 64u64.to_le_bytes());
    assert_eq!(h.driver.read_reg(0xfc), gen + 1);
    assert_ne!(h.driver.interrupt_status() & super::super::virtio::INTERRUPT_CONFIG, 0);
    let (status, _, data) = h.request(VIRTIO_BLK_T_IN, 40, Some((&[0u8; 512], true)));
    assert_eq!(status, OK);
    assert!(h.driver.read_mem(data, 512).iter().all(|&b| b == 0x5a));
    // A missing file leaves the old backing in place.
    assert!(h.device.lock().unwrap().swap_backing(Path::new("/nonexistent/disk")).is_err());
    assert_eq!(h.device.lock().unwrap().capacity(), 64);
}

#[test]
fn malformed_chains_never_touch_the_file() {
    let mut h = Harness::new(false);
    // No status byte at all (everything device-readable).
    let hdr = h.header(VIRTIO_BLK_T_OUT, 0);
    h.driver.add_chain(0, &[(hdr, 16, false)]);
    // Short header.
    let short = h.driver.buffer_with(&[0u8; 8]);
    let status = h.driver.alloc(1);
    h.driver.add_chain(0, &[(short, 8, false), (status, 1, true)]);
    // Readable after writable.
    let hdr = h.header(VIRTIO_BLK_T_OUT, 0);
    let data = h.driver.buffer_with(&[9u8; 512]);
    h.driver.add_chain(0, &[(status, 1, true), (hdr, 16, false), (data, 512, false)]);
    // Data outside guest memory.
    let hdr = h.header(VIRTIO_BLK_T_IN, 0);
    h.driver
        .add_chain(0, &[(hdr, 16, false), (GuestAddress(1 << 40), 512, true), (status, 1, true)]);
    // Loop.
    let slot = h.driver.queues[0].next_desc;
    h.driver.add_raw_chain(0, &[(hdr.0, 16, F_NEXT, slot)]);
    // Next out of table, writable.
    h.driver.add_raw_chain(0, &[(status.0, 1, F_NEXT | F_WRITE, 4000)]);
    h.driver.kick(0);
    let used = h.driver.take_used(0);
    assert_eq!(used.len(), 6, "every chain is returned");
    // Short header gets an IOERR status, the rest are dropped with length 0.
    assert_eq!(used[1].1, 1);
    assert!(used.iter().enumerate().all(|(i, u)| i == 1 || u.1 == 0), "{used:?}");
    assert!(!h.driver.needs_reset());
    let content = std::fs::read(&h.path).unwrap();
    assert!(content[..512].iter().all(|&b| b == 0));
    // Still serving.
    let (status, _, _) = h.request(VIRTIO_BLK_T_IN, 1, Some((&[0u8; 512], true)));
    assert_eq!(status, OK);
}

#[test]
fn large_read_spans_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let path = disk(dir.path(), "big.raw", 1024, 0x11);
    let device = Arc::new(Mutex::new(BlockDevice::new(&path, true).unwrap()));
    let mut driver = VirtioTestDriver::new(device);
    driver.activate(0);
    let mut h = Harness {
        _dir: dir,
        path,
        device: Arc::new(Mutex::new(BlockDevice::new(Path::new("/dev/null"), true).unwrap())),
        driver,
    };
    let len = 300 * 1024;
    let (status, used, data) = h.request(VIRTIO_BLK_T_IN, 0, Some((&vec![0u8; len], true)));
    assert_eq!((status, used), (OK, len as u32 + 1));
    assert!(h.driver.read_mem(data, len).iter().all(|&b| b == 0x11));
}

#[test]
fn corrupt_avail_index_asks_for_reset() {
    let mut h = Harness::new(false);
    // The driver claims 1000 new chains on a 256-entry queue.
    let avail = h.driver.queues[0].avail;
    h.driver.mem.write_obj(1000u16, avail.unchecked_add(2)).unwrap();
    h.driver.kick(0);
    assert!(h.driver.needs_reset());
    assert!(h.driver.take_used(0).is_empty());
    assert_ne!(h.driver.interrupt_status() & super::super::virtio::INTERRUPT_CONFIG, 0);
    // Reset and re-initialise: the device works again.
    h.driver.write_reg(0x70, 0);
    h.driver.activate(0);
    let (status, _, _) = h.request(VIRTIO_BLK_T_IN, 2, Some((&[0u8; 512], true)));
    assert_eq!(status, OK);
}
