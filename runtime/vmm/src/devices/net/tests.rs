//! virtio-net tests: a SOCK_SEQPACKET socketpair stands in for the tap's frame fd, and one
//! test runs over a real tap (skipped with a reason when tap creation is not allowed).

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::GuestAddress;

use super::*;
use crate::devices::virtio::test_utils::{VirtioTestDriver, F_NEXT};

const MAC: [u8; 6] = [0x02, 0x50, 0x44, 0x56, 0x00, 0x01];
const ETHERTYPE_TEST: u16 = 0x88b5;

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_SIZE];
    f.extend_from_slice(&[0xff; 6]); // dst: broadcast
    f.extend_from_slice(&MAC);
    f.extend_from_slice(&ETHERTYPE_TEST.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

struct Harness {
    device: Arc<Mutex<NetDevice>>,
    driver: VirtioTestDriver,
    rx_heads: HashMap<u16, GuestAddress>,
}

impl Harness {
    fn new(device: NetDevice) -> Self {
        let device = Arc::new(Mutex::new(device));
        let mut driver = VirtioTestDriver::new(device.clone());
        driver.activate(0);
        Harness { device, driver, rx_heads: HashMap::new() }
    }

    /// Device + the host end of a frame socketpair.
    fn with_socketpair() -> (Self, UnixDatagram) {
        let (device, host) = device_on_socketpair(MAC);
        (Self::new(device), host)
    }

    fn add_rx_buffers(&mut self, count: usize, size: u32) {
        for _ in 0..count {
            let addr = self.driver.alloc(size as usize);
            let head = self.driver.add_chain(RX, &[(addr, size, true)]);
            self.rx_heads.insert(head, addr);
        }
        self.driver.kick(RX);
    }

    fn guest_send(&mut self, frame: &[u8]) {
        let addr = self.driver.buffer_with(frame);
        self.driver.add_chain(TX, &[(addr, frame.len() as u32, false)]);
        self.driver.kick(TX);
    }

    fn guest_recv(&mut self) -> Vec<Vec<u8>> {
        self.driver
            .take_used(RX)
            .into_iter()
            .map(|(id, len)| self.driver.read_mem(self.rx_heads[&(id as u16)], len as usize))
            .collect()
    }
}

/// A device with `mac` on one end of a frame socketpair; returns the host end too.
fn device_on_socketpair(mac: [u8; 6]) -> (NetDevice, UnixDatagram) {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid array of two ints for socketpair to fill.
    let ret = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(ret, 0);
    // SAFETY: both fds were just created by socketpair and are owned by nobody else.
    let (dev_fd, host_fd) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let host = UnixDatagram::from(host_fd);
    host.set_nonblocking(false).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    (NetDevice::from_frame_fd(dev_fd, mac), host)
}

#[test]
fn a_restored_device_moves_frames_on_its_own_backend_from_the_saved_rings() {
    use crate::snapshot::Snapshottable;
    let (mut h, template_host) = Harness::with_socketpair();
    h.add_rx_buffers(4, 2048);
    h.guest_send(&frame(b"template"));
    let mut buf = vec![0u8; 4096];
    assert!(template_host.recv(&mut buf).unwrap() > 0);
    let state = h.driver.transport.lock().unwrap().save_state().unwrap();
    assert_eq!(state.queues.len(), 2);

    // The pod's VM: its own backend (tap) and MAC, the snapshot's rings.
    let pod_mac = [0x02, 0, 0, 0, 0, 0x42];
    let (device, pod_host) = device_on_socketpair(pod_mac);
    let device = Arc::new(Mutex::new(device));
    let irq = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mut transport =
        crate::devices::MmioTransport::new(h.driver.mem.clone(), irq, device.clone());
    transport.restore_state(&state).unwrap();
    h.driver.transport = Arc::new(Mutex::new(transport));
    h.device = device;
    assert_eq!(h.driver.read_config(0, 6), pod_mac);

    h.guest_send(&frame(b"pod"));
    let n = pod_host.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], &frame(b"pod")[..]);
    assert_eq!(h.driver.take_used(TX).len(), 2, "both tx chains were used, in ring order");
    pod_host.send(&frame(b"to pod")).unwrap();
    h.device.lock().unwrap().process_backend_events();
    assert_eq!(h.guest_recv(), vec![frame(b"to pod")], "on an rx buffer posted before");
}

#[test]
fn config_has_mac_and_link_up() {
    let (mut h, _host) = Harness::with_socketpair();
    assert_eq!(h.driver.read_reg(0x08), TYPE_NET);
    assert_eq!(h.driver.read_config(0, 6), MAC);
    assert_eq!(h.driver.read_config(6, 2), [1, 0]);
}

#[test]
fn tx_and_rx_over_a_frame_socket() {
    let (mut h, host) = Harness::with_socketpair();
    h.add_rx_buffers(4, 2048);
    let out = frame(b"from guest");
    h.guest_send(&out);
    let mut buf = vec![0u8; 4096];
    let n = host.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], &out[..]);
    assert_eq!(h.driver.take_used(TX).len(), 1);

    let inbound = frame(b"from host");
    host.send(&inbound).unwrap();
    h.device.lock().unwrap().process_backend_events();
    assert_eq!(h.guest_recv(), vec![inbound]);
    let m = h.device.lock().unwrap().metrics();
    assert_eq!((m.tx_frames, m.rx_frames), (1, 1));
}

#[test]
fn rx_waits_for_buffers() {
    let (mut h, host) = Harness::with_socketpair();
    host.send(&frame(b"one")).unwrap();
    host.send(&frame(b"two")).unwrap();
    h.device.lock().unwrap().process_backend_events();
    assert!(h.guest_recv().is_empty());
    h.add_rx_buffers(1, 2048);
    assert_eq!(h.guest_recv(), vec![frame(b"one")]);
    h.add_rx_buffers(1, 2048);
    assert_eq!(h.guest_recv(), vec![frame(b"two")]);
}

#[test]
fn malformed_chains_are_dropped() {
    let (mut h, host) = Harness::with_socketpair();
    // tx: shorter than a vnet header, device-writable, outside memory, loop.
    let tiny = h.driver.buffer_with(&[0u8; 4]);
    h.driver.add_chain(TX, &[(tiny, 4, false)]);
    let w = h.driver.alloc(64);
    h.driver.add_chain(TX, &[(w, 64, true)]);
    h.driver.add_chain(TX, &[(GuestAddress(u64::MAX - 16), 64, false)]);
    let slot = h.driver.queues[TX].next_desc;
    h.driver.add_raw_chain(TX, &[(tiny.0, 4, F_NEXT, slot)]);
    h.driver.kick(TX);
    assert_eq!(h.driver.take_used(TX).len(), 4);
    assert_eq!(h.device.lock().unwrap().metrics().malformed_chains, 4);
    // Nothing reached the host.
    host.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 64];
    assert!(host.recv(&mut buf).is_err());
    host.set_nonblocking(false).unwrap();

    // rx: a buffer too small for the frame and a device-readable one.
    let small = h.driver.alloc(16);
    let a = h.driver.add_chain(RX, &[(small, 16, true)]);
    let ro = h.driver.alloc(2048);
    let b = h.driver.add_chain(RX, &[(ro, 2048, false)]);
    h.driver.kick(RX);
    host.send(&frame(b"x")).unwrap();
    host.send(&frame(b"y")).unwrap();
    h.device.lock().unwrap().process_backend_events();
    assert_eq!(h.driver.take_used(RX), vec![(u32::from(a), 0), (u32::from(b), 0)]);
    assert!(!h.driver.needs_reset());
}

/// Raw AF_PACKET socket bound to one interface (root only).
struct PacketSocket(OwnedFd);

impl PacketSocket {
    fn bind(ifname: &str) -> std::io::Result<Self> {
        let name = std::ffi::CString::new(ifname).unwrap();
        // SAFETY: `name` is a valid NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            return Err(std::io::Error::last_os_error());
        }
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2) call with constant arguments.
        let fd = unsafe {
            libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_NONBLOCK, i32::from(proto))
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = proto;
        addr.sll_ifindex = ifindex as i32;
        // SAFETY: `addr` is a valid sockaddr_ll and the length matches its size.
        let ret = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &addr as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if ret < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(PacketSocket(fd))
    }

    fn send(&self, frame: &[u8]) -> std::io::Result<()> {
        // SAFETY: the pointer/length pair describes `frame`, valid for the call.
        let n = unsafe { libc::send(self.0.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Next frame with the test ethertype, within `timeout`.
    fn recv_test_frame(&self, timeout: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 4096];
        while Instant::now() < deadline {
            // SAFETY: the pointer/length pair describes `buf`, valid for the call.
            let n =
                unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n >= 14 && buf[12..14] == ETHERTYPE_TEST.to_be_bytes() {
                return Some(buf[..n as usize].to_vec());
            }
            if n < 0 {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        None
    }
}

#[test]
fn tx_and_rx_over_a_real_tap() {
    let name = format!("pvtap{}", std::process::id() % 100_000);
    let device = match NetDevice::new(&name, MAC) {
        Ok(device) => device,
        Err(err) => {
            assert!(
                std::env::var("PODVISOR_REQUIRE_E2E").as_deref() != Ok("1"),
                "tap required: {err}"
            );
            eprintln!("SKIP tx_and_rx_over_a_real_tap: cannot create tap {name}: {err}");
            return;
        }
    };
    let up = std::process::Command::new("ip").args(["link", "set", "dev", &name, "up"]).status();
    let socket = match (up, PacketSocket::bind(&name)) {
        (Ok(status), Ok(socket)) if status.success() => socket,
        (up, socket) => {
            eprintln!(
                "SKIP tx_and_rx_over_a_real_tap: bringing {name} up: {up:?} / {:?}",
                socket.err()
            );
            return;
        }
    };
    let mut h = Harness::new(device);
    h.add_rx_buffers(32, 2048);

    // Guest → tap: the frame appears on the host interface without the vnet header.
    let out = frame(b"guest to tap");
    h.guest_send(&out);
    let seen = socket.recv_test_frame(Duration::from_secs(2)).expect("frame on the tap");
    assert_eq!(seen, out[VNET_HDR_SIZE..]);

    // Host interface → guest: with a zero vnet header in front.
    let inbound = frame(b"tap to guest");
    socket.send(&inbound[VNET_HDR_SIZE..]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut got = None;
    while got.is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
        h.device.lock().unwrap().process_backend_events();
        got = h.guest_recv().into_iter().find(|f| {
            f.len() >= VNET_HDR_SIZE + 14
                && f[VNET_HDR_SIZE + 12..VNET_HDR_SIZE + 14] == ETHERTYPE_TEST.to_be_bytes()
        });
    }
    let got = got.expect("frame from the tap in the rx ring");
    assert_eq!(&got[VNET_HDR_SIZE..], &inbound[VNET_HDR_SIZE..]);
}
