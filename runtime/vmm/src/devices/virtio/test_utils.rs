//! A simulated virtio driver for device tests: it lays split queues out in a
//! `GuestMemoryMmap`, drives the device through the virtio-mmio registers like a guest
//! kernel would, and reads back the used rings.

use std::sync::{Arc, Mutex};

use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::mmio::MmioTransport;
use super::{read_config_bytes, ActivateContext, ActivateError, GuestMemory, VirtioDevice};
use crate::devices::BusDevice;

pub const MEM_SIZE: usize = 32 << 20;
const QUEUE_AREA: u64 = 0x10_0000;
const QUEUE_STRIDE: u64 = 0x10_0000;
const DATA_AREA: u64 = 0x100_0000;

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;

/// Guest memory backed by a memfd, as the core builds it (vhost-user needs the fd).
pub fn memfd_guest_memory() -> GuestMemory {
    let name = std::ffi::CString::new("podvisor-test-guest").unwrap();
    // SAFETY: `name` is a valid NUL-terminated string; the returned fd is checked.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just created and is owned by nobody else.
    let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    file.set_len(MEM_SIZE as u64).unwrap();
    GuestMemory::from_ranges_with_files(&[(
        GuestAddress(0),
        MEM_SIZE,
        Some(vm_memory::FileOffset::new(file, 0)),
    )])
    .expect("memfd guest memory")
}

pub fn guest_memory() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("test guest memory")
}

/// One split queue as the simulated driver sees it.
pub struct DriverQueue {
    pub size: u16,
    pub desc: GuestAddress,
    pub avail: GuestAddress,
    pub used: GuestAddress,
    pub next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

pub struct VirtioTestDriver {
    pub mem: GuestMemory,
    pub transport: Arc<Mutex<MmioTransport>>,
    pub _irq: EventFd,
    pub queues: Vec<DriverQueue>,
    next_data: u64,
}

impl VirtioTestDriver {
    pub fn new(device: Arc<Mutex<dyn VirtioDevice>>) -> Self {
        Self::with_memory(guest_memory(), device)
    }

    pub fn with_memory(mem: GuestMemory, device: Arc<Mutex<dyn VirtioDevice>>) -> Self {
        let irq = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let transport = MmioTransport::new(mem.clone(), irq.try_clone().expect("dup"), device);
        VirtioTestDriver {
            mem,
            transport: Arc::new(Mutex::new(transport)),
            _irq: irq,
            queues: Vec::new(),
            next_data: DATA_AREA,
        }
    }

    pub fn read_reg(&mut self, offset: u64) -> u32 {
        let mut buf = [0u8; 4];
        self.transport.lock().unwrap().read(offset, &mut buf);
        u32::from_le_bytes(buf)
    }

    pub fn write_reg(&mut self, offset: u64, value: u32) {
        self.transport.lock().unwrap().write(offset, &value.to_le_bytes());
    }

    pub fn read_config(&mut self, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.transport.lock().unwrap().read(0x100 + offset, &mut buf);
        buf
    }

    /// ACKNOWLEDGE, DRIVER, features (VERSION_1 | `features`), FEATURES_OK.
    pub fn negotiate(&mut self, features: u64) {
        let features = features | super::FEATURE_VERSION_1;
        self.write_reg(0x70, 1);
        self.write_reg(0x70, 1 | 2);
        self.write_reg(0x24, 0);
        self.write_reg(0x20, features as u32);
        self.write_reg(0x24, 1);
        self.write_reg(0x20, (features >> 32) as u32);
        self.write_reg(0x70, 1 | 2 | 8);
        assert_ne!(self.read_reg(0x70) & 8, 0, "FEATURES_OK refused");
    }

    /// Lays out and enables every queue the device offers, with their maximum size.
    pub fn setup_queues(&mut self) {
        self.queues.clear();
        for index in 0u32.. {
            self.write_reg(0x30, index);
            let max = self.read_reg(0x34) as u16;
            if max == 0 {
                break;
            }
            let base = QUEUE_AREA + u64::from(index) * QUEUE_STRIDE;
            // Fresh, zeroed rings, as a driver allocates them at every initialisation.
            self.mem.write_slice(&vec![0u8; QUEUE_STRIDE as usize], GuestAddress(base)).unwrap();
            let queue = DriverQueue {
                size: max,
                desc: GuestAddress(base),
                avail: GuestAddress(base + 0x4_0000),
                used: GuestAddress(base + 0x8_0000),
                next_desc: 0,
                avail_idx: 0,
                used_seen: 0,
            };
            self.write_reg(0x38, u32::from(max));
            self.write_reg(0x80, queue.desc.0 as u32);
            self.write_reg(0x84, (queue.desc.0 >> 32) as u32);
            self.write_reg(0x90, queue.avail.0 as u32);
            self.write_reg(0x94, 0);
            self.write_reg(0xa0, queue.used.0 as u32);
            self.write_reg(0xa4, 0);
            self.write_reg(0x44, 1);
            self.queues.push(queue);
        }
    }

    /// Full bring-up: negotiate, queues, DRIVER_OK.
    pub fn activate(&mut self, features: u64) {
        self.negotiate(features);
        self.setup_queues();
        self.write_reg(0x70, 1 | 2 | 8 | 4);
        assert_eq!(self.read_reg(0x70) & 0x40, 0, "device needs reset after DRIVER_OK");
    }

    /// Reserves `len` bytes of guest memory for buffers.
    pub fn alloc(&mut self, len: usize) -> GuestAddress {
        let addr = self.next_data;
        self.next_data = (self.next_data + len as u64 + 15) & !15;
        assert!(self.next_data < MEM_SIZE as u64, "test data area exhausted");
        GuestAddress(addr)
    }

    /// Allocates a buffer filled with `data`.
    pub fn buffer_with(&mut self, data: &[u8]) -> GuestAddress {
        let addr = self.alloc(data.len());
        self.mem.write_slice(data, addr).unwrap();
        addr
    }

    /// Writes raw descriptors `(addr, len, flags, next)` at consecutive table slots and
    /// publishes the first as a chain head, without kicking. Returns the head index.
    pub fn add_raw_chain(&mut self, queue: usize, descs: &[(u64, u32, u16, u16)]) -> u16 {
        let q = &mut self.queues[queue];
        let head = q.next_desc;
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            let slot = (head as usize + i) % q.size as usize;
            let base = q.desc.unchecked_add(slot as u64 * 16);
            self.mem.write_obj(addr, base).unwrap();
            self.mem.write_obj(len, base.unchecked_add(8)).unwrap();
            self.mem.write_obj(flags, base.unchecked_add(12)).unwrap();
            self.mem.write_obj(next, base.unchecked_add(14)).unwrap();
        }
        q.next_desc = ((head as usize + descs.len()) % q.size as usize) as u16;
        let ring_slot = u64::from(q.avail_idx % q.size);
        self.mem.write_obj(head, q.avail.unchecked_add(4 + ring_slot * 2)).unwrap();
        q.avail_idx = q.avail_idx.wrapping_add(1);
        self.mem.write_obj(q.avail_idx, q.avail.unchecked_add(2)).unwrap();
        head
    }

    /// Publishes a well-formed chain of `(addr, len, device_writable)` buffers.
    pub fn add_chain(&mut self, queue: usize, buffers: &[(GuestAddress, u32, bool)]) -> u16 {
        let size = self.queues[queue].size;
        let head = self.queues[queue].next_desc;
        let descs: Vec<_> = buffers
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, write))| {
                let last = i + 1 == buffers.len();
                let mut flags = if write { F_WRITE } else { 0 };
                if !last {
                    flags |= F_NEXT;
                }
                let next = ((head as usize + i + 1) % size as usize) as u16;
                (addr.0, len, flags, if last { 0 } else { next })
            })
            .collect();
        self.add_raw_chain(queue, &descs)
    }

    pub fn kick(&mut self, queue: usize) {
        self.write_reg(0x50, queue as u32);
    }

    /// Used entries `(id, len)` published since the last call.
    pub fn take_used(&mut self, queue: usize) -> Vec<(u32, u32)> {
        let q = &mut self.queues[queue];
        let idx: u16 = self.mem.read_obj(q.used.unchecked_add(2)).unwrap();
        let mut out = Vec::new();
        while q.used_seen != idx {
            let slot = u64::from(q.used_seen % q.size);
            let entry = q.used.unchecked_add(4 + slot * 8);
            let id: u32 = self.mem.read_obj(entry).unwrap();
            let len: u32 = self.mem.read_obj(entry.unchecked_add(4)).unwrap();
            out.push((id, len));
            q.used_seen = q.used_seen.wrapping_add(1);
        }
        out
    }

    pub fn read_mem(&self, addr: GuestAddress, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.mem.read_slice(&mut buf, addr).unwrap();
        buf
    }

    pub fn interrupt_status(&mut self) -> u32 {
        self.read_reg(0x60)
    }

    pub fn needs_reset(&mut self) -> bool {
        self.read_reg(0x70) & 0x40 != 0
    }
}

/// A device that records what the transport did to it.
pub struct DummyDevice {
    pub queue_sizes: Vec<u16>,
    pub activated: bool,
    pub notified: Vec<u32>,
    pub config: Vec<u8>,
    /// The queues it was activated with (what a snapshot reports).
    pub active_queues: Vec<virtio_queue::QueueState>,
}

impl DummyDevice {
    pub fn new(queues: usize) -> Self {
        DummyDevice {
            queue_sizes: vec![16; queues],
            activated: false,
            notified: Vec::new(),
            config: vec![1, 2, 3, 4],
            active_queues: Vec::new(),
        }
    }
}

impl VirtioDevice for DummyDevice {
    fn device_type(&self) -> u32 {
        0xff
    }
    fn avail_features(&self) -> u64 {
        super::FEATURE_VERSION_1
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            if let Some(slot) = self.config.get_mut(offset as usize + i) {
                *slot = *b;
            }
        }
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if ctx.queues.len() != self.queue_sizes.len() {
            return Err(ActivateError::QueueCount {
                expected: self.queue_sizes.len(),
                got: ctx.queues.len(),
            });
        }
        self.activated = true;
        self.active_queues = ctx.queues.iter().map(virtio_queue::Queue::state).collect();
        Ok(())
    }
    fn queue_notify(&mut self, queue_index: u32) {
        self.notified.push(queue_index);
    }
    fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
        self.activated.then(|| self.active_queues.clone())
    }
    fn reset(&mut self) {
        self.activated = false;
    }
}
