//! Entry points for the cargo-fuzz targets (`/fuzz`, feature `fuzzing`): what a guest controls,
//! driven from fuzzer bytes through the same code paths the running VMM uses.
//!
//! - [`virtqueue_chains`]: descriptor chains in a device's queues, delivered through the
//!   virtio-mmio transport by the simulated driver of the device tests;
//! - [`vsock_packets`]: packets from the guest through the vsock muxer, with its replies drained.

use std::sync::{Arc, Mutex};

use vm_memory::{Address, Bytes, GuestAddress};

use crate::devices::virtio::test_utils::{VirtioTestDriver, F_NEXT, F_WRITE, MEM_SIZE};
use crate::devices::vsock::muxer::Muxer;
use crate::devices::vsock::packet::{Header, HEADER_SIZE, HOST_CID, TYPE_STREAM};
use crate::devices::{BlockDevice, NetDevice, VirtioDevice, VsockDevice};

/// Reads fuzzer bytes as numbers; zeros once they run out.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }
    fn u8(&mut self) -> u8 {
        self.bytes::<1>()[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.bytes())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.bytes())
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Where a descriptor points: mostly into the data area (so devices parse something), else
/// anywhere or across the end of guest memory.
fn descriptor(input: &mut Input, queue_size: u16) -> (u64, u32, u16, u16) {
    let kind = input.u8();
    let raw = u64::from(input.u32());
    let addr = match kind % 4 {
        0 => input.u64(),
        1 => (MEM_SIZE as u64).saturating_sub(raw % 4096),
        _ => 0x100_0000 + raw % 0x80_0000,
    };
    let len = match kind / 4 % 4 {
        0 => input.u32(),
        1 => 0,
        _ => input.u32() % 70_000,
    };
    let flags = u16::from(kind >> 4) & (F_NEXT | F_WRITE);
    let next = input.u16() % queue_size.max(1);
    (addr, len, flags, next)
}

/// Feeds `data` to `device` as request headers in the data area, then as descriptor chains
/// in its queues (with the occasional corrupt available index), kicking after each, and
/// resets the device when it asks for it. Must never panic.
pub fn virtqueue_chains(device: Arc<Mutex<dyn VirtioDevice>>, data: &[u8]) {
    let mut input = Input(data);
    let mut driver = VirtioTestDriver::new(device);
    driver.activate(0);
    let header = input.bytes::<256>();
    for i in 0..16u64 {
        let _ = driver.mem.write_slice(&header, GuestAddress(0x100_0000 + i * 0x2_0000));
    }
    let mut rounds = 0;
    while !input.is_empty() && rounds < 256 {
        rounds += 1;
        let queue = usize::from(input.u8()) % driver.queues.len();
        let size = driver.queues[queue].size;
        let count = 1 + usize::from(input.u8() % 4);
        let descs: Vec<_> = (0..count).map(|_| descriptor(&mut input, size)).collect();
        driver.add_raw_chain(queue, &descs);
        if input.u8() == 0xff {
            let avail = driver.queues[queue].avail;
            let _ = driver.mem.write_obj(input.u16(), avail.unchecked_add(2));
        }
        driver.kick(queue);
        driver.take_used(queue);
        if driver.needs_reset() {
            driver.write_reg(0x70, 0);
            driver.activate(0);
        }
    }
}

/// A block device on a 64 KiB scratch file; the file must keep its size.
pub fn block_chains(data: &[u8]) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("disk");
    std::fs::write(&path, vec![0u8; 64 * 1024]).expect("scratch disk");
    let device = BlockDevice::new(&path, false).expect("block device");
    virtqueue_chains(Arc::new(Mutex::new(device)), data);
    assert_eq!(std::fs::metadata(&path).map(|m| m.len()).ok(), Some(64 * 1024));
}

/// A NIC on one end of a datagram socket pair (frames written to it are dropped).
pub fn net_chains(data: &[u8]) {
    let (a, _b) = std::os::unix::net::UnixDatagram::pair().expect("socketpair");
    a.set_nonblocking(true).expect("nonblocking");
    let device = NetDevice::from_frame_fd(a.into(), [2, 0, 0, 0, 0, 1]);
    virtqueue_chains(Arc::new(Mutex::new(device)), data);
}

/// A vsock device whose host side is a socket in a scratch directory.
pub fn vsock_chains(data: &[u8]) {
    let dir = tempfile::tempdir().expect("tempdir");
    let device = VsockDevice::new(3, &dir.path().join("v.sock")).expect("vsock device");
    virtqueue_chains(Arc::new(Mutex::new(device)), data);
}

/// Packets from the guest (44-byte headers, then up to 255 payload bytes each) through the
/// muxer, a host listener on port 1024 accepting what the guest connects to, with the
/// muxer's replies drained after each packet.
pub fn vsock_packets(data: &[u8]) {
    let dir = tempfile::tempdir().expect("tempdir");
    let uds = dir.path().join("v.sock");
    let mut muxer = Muxer::new(3, &uds).expect("muxer");
    let port = dir.path().join("v.sock_1024");
    let _listener = std::os::unix::net::UnixListener::bind(&port).expect("listener");
    let mut input = Input(data);
    let mut packets = 0;
    while !input.is_empty() && packets < 512 {
        packets += 1;
        let mut header = Header::from_bytes(&input.bytes::<HEADER_SIZE>());
        // What the vsock device's queue handling guarantees before the muxer sees a packet.
        (header.src_cid, header.dst_cid, header.type_) = (3, HOST_CID, TYPE_STREAM);
        let len = usize::from(input.u8());
        let payload: Vec<u8> = (0..len).map(|_| input.u8()).collect();
        muxer.handle_guest_packet(&header, &payload);
        muxer.process_host_events();
        let max_payload = 1 + usize::from(input.u16() % 4096);
        while muxer.next_rx(max_payload).is_some() {}
    }
}
