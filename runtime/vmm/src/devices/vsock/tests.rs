//! vsock device tests: a simulated driver on one side, real unix sockets on the other.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::packet::*;
use super::*;
use crate::devices::virtio::test_utils::VirtioTestDriver;

const GUEST_CID: u64 = 3;
const RX_BUF: u32 = (HEADER_SIZE + 4096) as u32;

struct Harness {
    _dir: tempfile::TempDir,
    uds: std::path::PathBuf,
    device: Arc<Mutex<VsockDevice>>,
    driver: VirtioTestDriver,
    rx_heads: HashMap<u16, GuestAddress>,
    event_heads: HashMap<u16, GuestAddress>,
}

impl Harness {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vm.vsock");
        let device = Arc::new(Mutex::new(VsockDevice::new(GUEST_CID, &uds).unwrap()));
        let mut driver = VirtioTestDriver::new(device.clone());
        driver.activate(0);
        Harness {
            _dir: dir,
            uds,
            device,
            driver,
            rx_heads: HashMap::new(),
            event_heads: HashMap::new(),
        }
    }

    fn add_rx_buffers(&mut self, count: usize, size: u32) {
        for _ in 0..count {
            let addr = self.driver.alloc(size as usize);
            let head = self.driver.add_chain(RX, &[(addr, size, true)]);
            self.rx_heads.insert(head, addr);
        }
        self.driver.kick(RX);
    }

    fn guest_send(&mut self, hdr: Header, payload: &[u8]) {
        let mut hdr = hdr;
        hdr.len = payload.len() as u32;
        let mut bytes = hdr.to_bytes().to_vec();
        bytes.extend_from_slice(payload);
        let addr = self.driver.buffer_with(&bytes);
        self.driver.add_chain(TX, &[(addr, bytes.len() as u32, false)]);
        self.driver.kick(TX);
    }

    /// Packets the device put in the rx ring since the last call.
    fn guest_recv(&mut self) -> Vec<(Header, Vec<u8>)> {
        self.driver
            .take_used(RX)
            .into_iter()
            .map(|(id, len)| {
                let addr = self.rx_heads[&(id as u16)];
                let bytes = self.driver.read_mem(addr, len as usize);
                assert!(bytes.len() >= HEADER_SIZE, "rx packet of {len} bytes");
                let hdr = Header::from_bytes(bytes[..HEADER_SIZE].try_into().unwrap());
                assert_eq!(hdr.len as usize, bytes.len() - HEADER_SIZE);
                (hdr, bytes[HEADER_SIZE..].to_vec())
            })
            .collect()
    }

    fn host_events(&mut self) {
        // Give the kernel a moment to move bytes between the socket ends.
        std::thread::sleep(Duration::from_millis(5));
        self.device.lock().unwrap().process_host_events();
    }
}

fn guest_hdr(src_port: u32, dst_port: u32, op: u16) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len: 0,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 65536,
        fwd_cnt: 0,
    }
}

fn read_line(stream: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while stream.read(&mut byte).unwrap() == 1 && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    String::from_utf8(line).unwrap()
}

/// Host CONNECT → guest OP_REQUEST → guest OP_RESPONSE → `OK <port>`; returns the host
/// stream and the local (host-side) port.
fn host_connect(h: &mut Harness, guest_port: u32) -> (UnixStream, u32) {
    let mut client = UnixStream::connect(&h.uds).unwrap();
    client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    client.write_all(format!("CONNECT {guest_port}\n").as_bytes()).unwrap();
    h.host_events();
    let pkts = h.guest_recv();
    assert_eq!(pkts.len(), 1, "{pkts:?}");
    let req = pkts[0].0;
    assert_eq!(req.op, OP_REQUEST);
    assert_eq!((req.src_cid, req.dst_cid), (HOST_CID, GUEST_CID));
    assert_eq!(req.dst_port, guest_port);
    assert_eq!(req.type_, TYPE_STREAM);
    h.guest_send(guest_hdr(guest_port, req.src_port, OP_RESPONSE), &[]);
    assert_eq!(read_line(&mut client), format!("OK {}", req.src_port));
    (client, req.src_port)
}

#[test]
fn config_space_holds_the_guest_cid() {
    let mut h = Harness::new();
    assert_eq!(h.driver.read_config(0, 8), GUEST_CID.to_le_bytes());
    assert_eq!(h.driver.read_reg(0x08), TYPE_VSOCK);
}

#[test]
fn reserved_cid_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(VsockDevice::new(2, &dir.path().join("s")), Err(VsockError::ReservedCid(2))));
}

#[test]
fn host_initiated_connection_carries_data_both_ways() {
    let mut h = Harness::new();
    h.add_rx_buffers(16, RX_BUF);
    let (mut client, local) = host_connect(&mut h, 1024);

    // Host → guest.
    client.write_all(b"hello").unwrap();
    h.host_events();
    let pkts = h.guest_recv();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].0.op, OP_RW);
    assert_eq!((pkts[0].0.src_port, pkts[0].0.dst_port), (local, 1024));
    assert_eq!(pkts[0].1, b"hello");

    // Guest → host, header and payload in separate descriptors.
    let mut hdr = guest_hdr(1024, local, OP_RW);
    hdr.len = 5;
    let hdr_addr = h.driver.buffer_with(&hdr.to_bytes());
    let data_addr = h.driver.buffer_with(b"world");
    h.driver.add_chain(TX, &[(hdr_addr, HEADER_SIZE as u32, false), (data_addr, 5, false)]);
    h.driver.kick(TX);
    let mut buf = [0u8; 5];
    client.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"world");
    assert_eq!(h.driver.take_used(TX).len(), 2);

    // Credit request → credit update reporting what reached the host.
    h.guest_send(guest_hdr(1024, local, OP_CREDIT_REQUEST), &[]);
    let pkts = h.guest_recv();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].0.op, OP_CREDIT_UPDATE);
    assert_eq!(pkts[0].0.fwd_cnt, 5);
    assert_eq!(pkts[0].0.buf_alloc, muxer::CONN_BUF_ALLOC);

    // Guest RST closes the host stream.
    h.guest_send(guest_hdr(1024, local, OP_RST), &[]);
    assert_eq!(client.read(&mut buf).unwrap(), 0);
    assert_eq!(h.device.lock().unwrap().connection_count(), 0);
    assert!(h.driver.interrupt_status() & 1 != 0);
}

#[test]
fn bytes_after_the_connect_line_are_forwarded_after_ok() {
    let mut h = Harness::new();
    h.add_rx_buffers(8, RX_BUF);
    let mut client = UnixStream::connect(&h.uds).unwrap();
    client.write_all(b"CONNECT 52\nearly").unwrap();
    h.host_events();
    let pkts = h.guest_recv();
    assert_eq!(pkts.len(), 1);
    let local = pkts[0].0.src_port;
    h.guest_send(guest_hdr(52, local, OP_RESPONSE), &[]);
    let pkts = h.guest_recv();
    assert_eq!(pkts.len(), 1, "{pkts:?}");
    assert_eq!(pkts[0].1, b"early");
    assert_eq!(read_line(&mut client), format!("OK {local}"));
}

#[test]
fn guest_rst_to_request_closes_host_client() {
    let mut h = Harness::new();
    h.add_rx_buffers(4, RX_BUF);
    let mut client = UnixStream::connect(&h.uds).unwrap();
    client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    client.write_all(b"CONNECT 99\n").unwrap();
    h.host_events();
    let req = h.guest_recv()[0].0;
    h.guest_send(guest_hdr(99, req.src_port, OP_RST), &[]);
    let mut buf = [0u8; 8];
    assert_eq!(client.read(&mut buf).unwrap(), 0, "client should see EOF, no OK");
}

#[test]
fn bad_connect_line_is_closed() {
    let mut h = Harness::new();
    h.add_rx_buffers(4, RX_BUF);
    let mut client = UnixStream::connect(&h.uds).unwrap();
    client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    client.write_all(b"CONNECT nope\n").unwrap();
    h.host_events();
    assert!(h.guest_recv().is_empty());
    let mut buf = [0u8; 8];
    assert_eq!(client.read(&mut buf).unwrap(), 0);
    // An overlong line without newline is refused too.
    let mut client = UnixStream::connect(&h.uds).unwrap();
    client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    client.write_all(&[b'A'; 64]).unwrap();
    h.host_events();
    // Closed with unread bytes: EOF or ECONNRESET.
    match client.read(&mut buf) {
        Ok(n) => assert_eq!(n, 0),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
    }
}

#[test]
fn guest_initiated_connection_to_uds_port() {
    let mut h = Harness::new();
    h.add_rx_buffers(16, RX_BUF);
    let listener = UnixListener::bind(format!("{}_5000", h.uds.display())).unwrap();
    h.guest_send(guest_hdr(40000, 5000, OP_REQUEST), &[]);
    let pkts = h.guest_recv();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].0.op, OP_RESPONSE);
    assert_eq!((pkts[0].0.src_port, pkts[0].0.dst_port), (5000, 40000));
    let (mut server, _) = listener.accept().unwrap();
    server.set_read_timeout(Some(Duration::from_secs(5))).unwrap();

    h.guest_send(guest_hdr(40000, 5000, OP_RW), b"ping");
    let mut buf = [0u8; 4];
    server.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
    server.write_all(b"pong").unwrap();
    h.host_events();
    let pkts = h.guest_recv();
    assert_eq!(pkts[0].1, b"pong");

    // Host closes: guest is told the host sends no more; a guest write then finds the
    // host side gone and the connection is reset.
    drop(server);
    h.host_events();
    let pkts = h.guest_recv();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].0.op, OP_SHUTDOWN);
    assert_eq!(pkts[0].0.flags, SHUTDOWN_SEND);
    h.guest_send(guest_hdr(40000, 5000, OP_RW), b"late");
    assert_eq!(h.guest_recv()[0].0.op, OP_RST);
    assert_eq!(h.device.lock().unwrap().connection_count(), 0);
}

#[test]
fn guest_connect_without_listener_gets_rst() {
    let mut h = Harness::new();
    h.add_rx_buffers(4, RX_BUF);
    h.guest_send(guest_hdr(40000, 6000, OP_REQUEST), &[]);
    let pkts = h.guest_recv();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].0.op, OP_RST);
    assert_eq!(pkts[0].0.dst_port, 40000);
    // Data on a connection that does not exist: RST as well.
    h.guest_send(guest_hdr(40001, 6000, OP_RW), b"x");
    assert_eq!(h.guest_recv()[0].0.op, OP_RST);
}

#[test]
fn guest_shutdown_both_ways_ends_the_connection() {
    let mut h = Harness::new();
    h.add_rx_buffers(8, RX_BUF);
    let (mut client, local) = host_connect(&mut h, 1024);
    let mut hdr = guest_hdr(1024, local, OP_SHUTDOWN);
    hdr.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    h.guest_send(hdr, &[]);
    let pkts = h.guest_recv();
    assert_eq!(pkts[0].0.op, OP_RST);
    let mut buf = [0u8; 1];
    assert_eq!(client.read(&mut buf).unwrap(), 0);
}

#[test]
fn host_to_guest_respects_guest_credit() {
    let mut h = Harness::new();
    h.add_rx_buffers(16, RX_BUF);
    let mut client = UnixStream::connect(&h.uds).unwrap();
    client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    client.write_all(b"CONNECT 7\n").unwrap();
    h.host_events();
    let local = h.guest_recv()[0].0.src_port;
    let mut resp = guest_hdr(7, local, OP_RESPONSE);
    resp.buf_alloc = 8;
    h.guest_send(resp, &[]);
    read_line(&mut client);

    client.write_all(b"0123456789abcdefghij").unwrap();
    h.host_events();
    let pkts = h.guest_recv();
    let got: Vec<u8> = pkts.iter().flat_map(|p| p.1.clone()).collect();
    assert_eq!(got, b"01234567", "only buf_alloc bytes may be in flight");
    h.host_events();
    assert!(h.guest_recv().is_empty());

    // The guest consumed 8 bytes.
    let mut update = guest_hdr(7, local, OP_CREDIT_UPDATE);
    update.buf_alloc = 8;
    update.fwd_cnt = 8;
    h.guest_send(update, &[]);
    let got: Vec<u8> = h.guest_recv().iter().flat_map(|p| p.1.clone()).collect();
    assert_eq!(got, b"89abcdef");
}

#[test]
fn host_data_waits_for_rx_buffers() {
    let mut h = Harness::new();
    h.add_rx_buffers(2, RX_BUF);
    let (mut client, _local) = host_connect(&mut h, 1024);
    // One rx buffer left (one used by the REQUEST).
    client.write_all(&[7u8; 6000]).unwrap();
    h.host_events();
    let first = h.guest_recv();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].1.len(), 4096);
    // Starved: nothing more until the guest adds buffers, then the rest arrives
    // without a new host edge.
    h.host_events();
    assert!(h.guest_recv().is_empty());
    h.add_rx_buffers(2, RX_BUF);
    let rest = h.guest_recv();
    assert_eq!(rest.iter().map(|p| p.1.len()).sum::<usize>(), 6000 - 4096);
}

#[test]
fn guest_to_host_credit_updates_after_half_window() {
    let mut h = Harness::new();
    h.add_rx_buffers(8, RX_BUF);
    let (mut client, local) = host_connect(&mut h, 1024);
    let chunk = vec![1u8; 32 * 1024];
    let mut sent = 0u32;
    for _ in 0..4 {
        h.guest_send(guest_hdr(1024, local, OP_RW), &chunk);
        sent += chunk.len() as u32;
    }
    let mut sink = vec![0u8; sent as usize];
    client.read_exact(&mut sink).unwrap();
    let pkts = h.guest_recv();
    let update = pkts.iter().find(|p| p.0.op == OP_CREDIT_UPDATE).expect("credit update");
    assert!(update.0.fwd_cnt >= muxer::CONN_BUF_ALLOC / 2);
}

#[test]
fn transport_reset_event_drops_connections() {
    let mut h = Harness::new();
    h.add_rx_buffers(4, RX_BUF);
    let (mut client, _) = host_connect(&mut h, 1024);
    let ev = h.driver.alloc(4);
    h.driver.mem.write_obj(0xffff_ffffu32, ev).unwrap();
    let head = h.driver.add_chain(EVENT, &[(ev, 4, true)]);
    h.event_heads.insert(head, ev);
    h.driver.kick(EVENT);
    h.device.lock().unwrap().send_transport_reset();
    assert_eq!(h.driver.take_used(EVENT), vec![(u32::from(head), 4)]);
    assert_eq!(h.driver.read_mem(ev, 4), EVENT_TRANSPORT_RESET.to_le_bytes());
    let mut buf = [0u8; 1];
    assert_eq!(client.read(&mut buf).unwrap(), 0);
    assert_eq!(h.device.lock().unwrap().connection_count(), 0);
}

#[test]
fn a_restored_device_resets_the_guests_connections_and_serves_new_ones() {
    use crate::snapshot::Snapshottable;
    let mut h = Harness::new();
    h.add_rx_buffers(8, RX_BUF);
    let ev = h.driver.alloc(4);
    let head = h.driver.add_chain(EVENT, &[(ev, 4, true)]);
    h.driver.kick(EVENT);
    let (mut client, _) = host_connect(&mut h, 1024);
    client.write_all(b"before").unwrap();
    h.host_events();
    assert_eq!(h.guest_recv()[0].1, b"before");
    let state = h.driver.transport.lock().unwrap().save_state().unwrap();

    // A new VM from the snapshot: same guest memory and driver, a new device and socket.
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("pod.vsock");
    let device = Arc::new(Mutex::new(VsockDevice::new(GUEST_CID, &uds).unwrap()));
    let irq = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mut transport =
        crate::devices::MmioTransport::new(h.driver.mem.clone(), irq, device.clone());
    transport.restore_state(&state).unwrap();
    h.driver.transport = Arc::new(Mutex::new(transport));
    h.device = device;
    h.uds = uds;

    // The guest learns its connections are gone, on the buffer it posted before the snapshot.
    assert_eq!(h.driver.take_used(EVENT), vec![(u32::from(head), 4)]);
    assert_eq!(h.driver.read_mem(ev, 4), EVENT_TRANSPORT_RESET.to_le_bytes());
    // The old host client belongs to the snapshotted VM: nothing reaches the new one.
    let _ = client.write_all(b"stale");
    h.host_events();
    assert!(h.guest_recv().is_empty());
    // The rings carry on: a new connection works on the rx buffers posted before.
    let (mut fresh, fresh_port) = host_connect(&mut h, 1024);
    fresh.write_all(b"after").unwrap();
    h.host_events();
    let pkts = h.guest_recv();
    assert_eq!((pkts[0].0.src_port, pkts[0].1.as_slice()), (fresh_port, &b"after"[..]));
}

#[test]
fn device_reset_drops_connections_and_reactivates() {
    let mut h = Harness::new();
    h.add_rx_buffers(4, RX_BUF);
    let (mut client, _) = host_connect(&mut h, 1024);
    h.driver.write_reg(0x70, 0);
    let mut buf = [0u8; 1];
    assert_eq!(client.read(&mut buf).unwrap(), 0);
    h.driver.activate(0);
    h.rx_heads.clear();
    h.add_rx_buffers(4, RX_BUF);
    let (_client, _) = host_connect(&mut h, 1024);
}

#[test]
fn event_manager_drives_host_events() {
    use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
    let mut h = Harness::new();
    h.add_rx_buffers(4, RX_BUF);
    let mut manager = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
    manager.add_subscriber(h.device.clone());
    let mut client = UnixStream::connect(&h.uds).unwrap();
    client.write_all(b"CONNECT 1024\n").unwrap();
    for _ in 0..10 {
        manager.run_with_timeout(100).unwrap();
        if h.device.lock().unwrap().connection_count() == 1 {
            break;
        }
    }
    let pkts = h.guest_recv();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].0.op, OP_REQUEST);
}

#[test]
fn malformed_tx_chains_are_dropped() {
    let mut h = Harness::new();
    h.add_rx_buffers(4, RX_BUF);
    // Short header.
    let addr = h.driver.buffer_with(&[0u8; 10]);
    h.driver.add_chain(TX, &[(addr, 10, false)]);
    // Buffer outside guest memory.
    h.driver.add_chain(TX, &[(GuestAddress(1 << 40), 64, false)]);
    // Address + length wrapping around.
    h.driver.add_chain(TX, &[(GuestAddress(u64::MAX - 8), 64, false)]);
    // Device-writable buffer in tx.
    let addr = h.driver.alloc(64);
    h.driver.add_chain(TX, &[(addr, 64, true)]);
    // Length field larger than the buffers.
    let mut hdr = guest_hdr(1, 2, OP_RW);
    hdr.len = 4096;
    let addr = h.driver.buffer_with(&hdr.to_bytes());
    h.driver.add_chain(TX, &[(addr, HEADER_SIZE as u32, false)]);
    // A loop: descriptor pointing at itself.
    let addr = h.driver.buffer_with(&[0u8; 64]);
    let slot = h.driver.queues[TX].next_desc;
    h.driver.add_raw_chain(TX, &[(addr.0, 64, crate::devices::virtio::test_utils::F_NEXT, slot)]);
    // Next index out of the table.
    h.driver.add_raw_chain(TX, &[(addr.0, 64, crate::devices::virtio::test_utils::F_NEXT, 9999)]);
    // Wrong CID: well-formed but rejected.
    let mut bad = guest_hdr(1, 2, OP_REQUEST);
    bad.src_cid = 77;
    let addr = h.driver.buffer_with(&bad.to_bytes());
    h.driver.add_chain(TX, &[(addr, HEADER_SIZE as u32, false)]);
    h.driver.kick(TX);

    assert_eq!(h.driver.take_used(TX).len(), 8, "every chain is returned");
    let (metrics, _) = h.device.lock().unwrap().metrics();
    assert_eq!(metrics.malformed_chains, 7);
    assert_eq!(metrics.rejected_packets, 1);
    assert!(!h.driver.needs_reset());
    // The device still works.
    let (_client, _) = host_connect(&mut h, 1024);
}

#[test]
fn malformed_rx_chains_are_returned_empty() {
    let mut h = Harness::new();
    // Too small for a header, then device-readable: both dropped with length 0.
    let small = h.driver.alloc(8);
    let a = h.driver.add_chain(RX, &[(small, 8, true)]);
    let ro = h.driver.alloc(128);
    let b = h.driver.add_chain(RX, &[(ro, 128, false)]);
    h.driver.kick(RX);
    let mut client = UnixStream::connect(&h.uds).unwrap();
    client.write_all(b"CONNECT 1\n").unwrap();
    h.host_events();
    let used = h.driver.take_used(RX);
    assert_eq!(used, vec![(u32::from(a), 0), (u32::from(b), 0)]);
    // The REQUEST waits for a good buffer.
    h.add_rx_buffers(1, RX_BUF);
    assert_eq!(h.guest_recv()[0].0.op, OP_REQUEST);
}

#[test]
fn unanswered_connect_times_out() {
    let mut h = Harness::new();
    h.device.lock().unwrap().set_connect_timeout(Duration::from_millis(50));
    h.add_rx_buffers(4, RX_BUF);
    let mut client = UnixStream::connect(&h.uds).unwrap();
    client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    client.write_all(b"CONNECT 1024\n").unwrap();
    h.host_events();
    let req = h.guest_recv()[0].0;
    assert_eq!(req.op, OP_REQUEST);
    std::thread::sleep(Duration::from_millis(80));
    h.host_events();
    let pkts = h.guest_recv();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].0.op, OP_RST);
    assert_eq!(pkts[0].0.src_port, req.src_port);
    let mut buf = [0u8; 4];
    assert_eq!(client.read(&mut buf).unwrap(), 0);
    // A late RESPONSE is answered with RST.
    h.guest_send(guest_hdr(1024, req.src_port, OP_RESPONSE), &[]);
    assert_eq!(h.guest_recv()[0].0.op, OP_RST);
}

#[test]
fn busy_connections_take_turns() {
    let mut h = Harness::new();
    h.add_rx_buffers(4, RX_BUF);
    let (mut a, port_a) = host_connect(&mut h, 1);
    let (mut b, port_b) = host_connect(&mut h, 2);
    a.write_all(&[b'a'; 3 * 4096]).unwrap();
    b.write_all(&[b'b'; 3 * 4096]).unwrap();
    h.host_events();
    let pkts = h.guest_recv();
    assert!(pkts.len() >= 2);
    h.add_rx_buffers(6, RX_BUF);
    let pkts: Vec<_> = pkts.into_iter().chain(h.guest_recv()).collect();
    let order: Vec<u32> = pkts.iter().filter(|p| p.0.op == OP_RW).map(|p| p.0.src_port).collect();
    assert_eq!(order.len(), 6, "{order:?}");
    for pair in order.windows(2) {
        assert_ne!(pair[0], pair[1], "connections must alternate: {order:?}");
    }
    assert!(order.contains(&port_a) && order.contains(&port_b));
}

fn pattern(i: usize) -> u8 {
    (i.wrapping_mul(31) ^ (i >> 11)) as u8
}

/// 1 MiB each way at once, with the simulated guest honouring and granting credit like the
/// Linux driver: every byte arrives, in order.
#[test]
fn bulk_transfer_both_ways_keeps_data_intact() {
    const TOTAL: usize = 1 << 20;
    const GUEST_BUF_ALLOC: u32 = 64 * 1024;
    let mut h = Harness::new();
    h.add_rx_buffers(32, RX_BUF);
    let (client, local) = host_connect(&mut h, 1024);
    let mut writer = client.try_clone().unwrap();
    let mut reader = client;
    let host_writer = std::thread::spawn(move || {
        let data: Vec<u8> = (0..TOTAL).map(pattern).collect();
        writer.write_all(&data).unwrap();
    });
    let host_reader = std::thread::spawn(move || {
        let mut got = vec![0u8; TOTAL];
        reader.read_exact(&mut got).unwrap();
        got.iter().enumerate().all(|(i, &b)| b == pattern(i))
    });

    let mut received = 0usize; // guest's fwd_cnt
    let mut credited = 0usize;
    let mut tx_cnt = 0u32;
    let mut peer_fwd_cnt = 0u32;
    let mut peer_buf_alloc = muxer::CONN_BUF_ALLOC;
    let deadline = Instant::now() + Duration::from_secs(30);
    while received < TOTAL || (tx_cnt as usize) < TOTAL {
        assert!(Instant::now() < deadline, "stalled: rx {received}, tx {tx_cnt}");
        h.device.lock().unwrap().process_host_events();
        let pkts = h.guest_recv();
        let consumed = pkts.len();
        for (hdr, data) in pkts {
            peer_fwd_cnt = hdr.fwd_cnt;
            peer_buf_alloc = hdr.buf_alloc;
            match hdr.op {
                OP_RW => {
                    for (i, b) in data.iter().enumerate() {
                        assert_eq!(*b, pattern(received + i), "byte {}", received + i);
                    }
                    received += data.len();
                }
                OP_CREDIT_UPDATE => {}
                // The host closes its end once it has read everything: EOF after the data.
                OP_SHUTDOWN => assert_eq!(received, TOTAL, "EOF before all data"),
                other => panic!("unexpected op {other}"),
            }
        }
        if consumed > 0 {
            h.add_rx_buffers(consumed, RX_BUF);
        }
        if received - credited >= 16 * 1024 || (received == TOTAL && credited < TOTAL) {
            let mut update = guest_hdr(1024, local, OP_CREDIT_UPDATE);
            update.buf_alloc = GUEST_BUF_ALLOC;
            update.fwd_cnt = received as u32;
            h.guest_send(update, &[]);
            credited = received;
        }
        let credit = peer_buf_alloc.saturating_sub(tx_cnt.wrapping_sub(peer_fwd_cnt)) as usize;
        let chunk = credit.min(16 * 1024).min(TOTAL - tx_cnt as usize);
        if chunk > 0 {
            let start = tx_cnt as usize;
            let data: Vec<u8> = (start..start + chunk).map(pattern).collect();
            let mut hdr = guest_hdr(1024, local, OP_RW);
            hdr.buf_alloc = GUEST_BUF_ALLOC;
            hdr.fwd_cnt = received as u32;
            h.guest_send(hdr, &data);
            tx_cnt += chunk as u32;
        } else if consumed == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        // Drop completed tx entries so the ring's used index is consumed.
        h.driver.take_used(TX);
    }
    host_writer.join().unwrap();
    assert!(host_reader.join().unwrap(), "host received corrupted data");
}

#[test]
fn connect_before_the_driver_is_up_is_withdrawn_on_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("vm.vsock");
    let device = Arc::new(Mutex::new(VsockDevice::new(GUEST_CID, &uds).unwrap()));
    device.lock().unwrap().set_connect_timeout(Duration::from_millis(30));
    let mut client = UnixStream::connect(&uds).unwrap();
    client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    client.write_all(b"CONNECT 1024\n").unwrap();
    device.lock().unwrap().process_host_events();
    std::thread::sleep(Duration::from_millis(60));
    device.lock().unwrap().process_host_events();
    let mut buf = [0u8; 4];
    assert_eq!(client.read(&mut buf).unwrap(), 0);
    // The driver comes up late: it sees neither the stale REQUEST nor an RST.
    let mut driver = VirtioTestDriver::new(device.clone());
    driver.activate(0);
    let addr = driver.alloc(RX_BUF as usize);
    driver.add_chain(RX, &[(addr, RX_BUF, true)]);
    driver.kick(RX);
    assert!(driver.take_used(RX).is_empty());
}

#[test]
fn connect_before_the_driver_is_up_is_delivered_at_activation() {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("vm.vsock");
    let device = Arc::new(Mutex::new(VsockDevice::new(GUEST_CID, &uds).unwrap()));
    let mut client = UnixStream::connect(&uds).unwrap();
    client.write_all(b"CONNECT 1024\n").unwrap();
    device.lock().unwrap().process_host_events();
    let mut driver = VirtioTestDriver::new(device.clone());
    driver.activate(0);
    let addr = driver.alloc(RX_BUF as usize);
    driver.add_chain(RX, &[(addr, RX_BUF, true)]);
    driver.kick(RX);
    let used = driver.take_used(RX);
    assert_eq!(used.len(), 1);
    let bytes = driver.read_mem(addr, HEADER_SIZE);
    assert_eq!(Header::from_bytes(bytes[..].try_into().unwrap()).op, OP_REQUEST);
}

#[test]
fn host_half_close_still_gets_the_reply() {
    let mut h = Harness::new();
    h.add_rx_buffers(8, RX_BUF);
    let (mut client, local) = host_connect(&mut h, 1024);
    client.write_all(b"request").unwrap();
    client.shutdown(std::net::Shutdown::Write).unwrap();
    h.host_events();
    let pkts = h.guest_recv();
    assert_eq!(pkts.len(), 2, "{pkts:?}");
    assert_eq!((pkts[0].0.op, pkts[0].1.as_slice()), (OP_RW, &b"request"[..]));
    assert_eq!((pkts[1].0.op, pkts[1].0.flags), (OP_SHUTDOWN, SHUTDOWN_SEND));
    // The guest answers, then closes its side.
    h.guest_send(guest_hdr(1024, local, OP_RW), b"reply");
    let mut hdr = guest_hdr(1024, local, OP_SHUTDOWN);
    hdr.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    h.guest_send(hdr, &[]);
    let mut reply = Vec::new();
    client.read_to_end(&mut reply).unwrap();
    assert_eq!(reply, b"reply");
    assert_eq!(h.guest_recv()[0].0.op, OP_RST);
    assert_eq!(h.device.lock().unwrap().connection_count(), 0);
}

/// A guest that floods tx while posting no rx buffers (data and connects the host answers
/// with RSTs, connect-reset cycles on a port with a listener) cannot grow what the VMM holds
/// for it: the queue of packets owed to the guest stays bounded, and once rx buffers come the
/// guest gets what is still owed, in order, and the device still works.
#[test]
fn a_tx_flood_without_rx_buffers_keeps_the_reply_queue_bounded() {
    let mut h = Harness::new();
    let _listener = UnixListener::bind(format!("{}_5000", h.uds.display())).unwrap();
    let addr = h.driver.alloc(HEADER_SIZE);
    let floods = 4 * muxer::MAX_QUEUED_RSTS as u32 + 100;
    for i in 0..floods {
        let hdr = match i % 4 {
            // Data and a credit request on connections that do not exist.
            0 => guest_hdr(10_000 + i, 6000, OP_RW),
            1 => guest_hdr(10_000 + i, 6000, OP_CREDIT_REQUEST),
            // A connect to a port nobody listens on, then connect and reset on one that does.
            2 => guest_hdr(20_000 + i, 6001, OP_REQUEST),
            _ => guest_hdr(7, 5000, if i % 8 == 3 { OP_REQUEST } else { OP_RST }),
        };
        h.driver.mem.write_slice(&hdr.to_bytes(), addr).unwrap();
        h.driver.add_chain(TX, &[(addr, HEADER_SIZE as u32, false)]);
        h.driver.kick(TX);
        h.driver.take_used(TX);
    }
    let device = h.device.lock().unwrap();
    let queued = device.muxer.queued_control();
    let live = device.connection_count();
    let dropped = device.metrics().1.rsts_dropped;
    drop(device);
    assert!(queued <= muxer::MAX_QUEUED_RSTS + live, "{queued} packets queued, {live} live");
    assert!(dropped > 0);

    h.add_rx_buffers(64, RX_BUF);
    let mut delivered = 0;
    loop {
        let got = h.guest_recv().len();
        if got == 0 {
            break;
        }
        delivered += got;
        h.add_rx_buffers(got, RX_BUF);
    }
    assert_eq!(delivered, queued);
    // The device still answers.
    h.guest_send(guest_hdr(40_000, 6002, OP_REQUEST), &[]);
    assert_eq!(h.guest_recv()[0].0.op, OP_RST);
}
