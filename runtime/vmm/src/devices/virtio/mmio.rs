//! virtio-mmio transport, version 2 (virtio 1.2, 4.2.2).

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{ActivateContext, GuestMemory, Interrupt, VirtioDevice};
use crate::devices::BusDevice;
use crate::snapshot::Snapshottable;

/// "virt" in little endian.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// Modern virtio-mmio.
pub const MMIO_VERSION: u32 = 2;
/// Vendor id reported to the guest ("PDVR").
pub const VENDOR_ID: u32 = 0x5244_5650;
/// Size of one device's MMIO window.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;

const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_AVAIL_LOW: u64 = 0x090;
const REG_QUEUE_AVAIL_HIGH: u64 = 0x094;
const REG_QUEUE_USED_LOW: u64 = 0x0a0;
const REG_QUEUE_USED_HIGH: u64 = 0x0a4;
const REG_SHM_LEN_LOW: u64 = 0x0b0;
const REG_SHM_LEN_HIGH: u64 = 0x0b4;
const REG_SHM_BASE_LOW: u64 = 0x0b8;
const REG_SHM_BASE_HIGH: u64 = 0x0bc;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const REG_CONFIG: u64 = 0x100;

const STATUS_ACKNOWLEDGE: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
const STATUS_DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
const STATUS_FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
const STATUS_DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
const STATUS_FAILED: u32 = VIRTIO_CONFIG_S_FAILED;
const STATUS_NEEDS_RESET: u32 = VIRTIO_CONFIG_S_NEEDS_RESET;

/// One virtio device as the guest sees it on the MMIO bus.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemory,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    status: u32,
    activated: bool,
}

impl MmioTransport {
    /// Puts `device` behind a transport; `irq_evt` is the eventfd the core registered with
    /// KVM irqfd for this device's interrupt line.
    pub fn new(mem: GuestMemory, irq_evt: EventFd, device: Arc<Mutex<dyn VirtioDevice>>) -> Self {
        let mut transport = MmioTransport {
            device,
            mem,
            interrupt: Arc::new(Interrupt::new(irq_evt)),
            queues: Vec::new(),
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            status: 0,
            activated: false,
        };
        transport.queues = transport.fresh_queues();
        transport
    }

    /// The interrupt line (shared with the device).
    pub fn interrupt(&self) -> Arc<Interrupt> {
        self.interrupt.clone()
    }

    /// The device behind this transport.
    pub fn device(&self) -> Arc<Mutex<dyn VirtioDevice>> {
        self.device.clone()
    }

    /// Current device status as the driver reads it.
    pub fn status(&self) -> u32 {
        let mut status = self.status;
        if self.interrupt.needs_reset() {
            status |= STATUS_NEEDS_RESET;
        }
        status
    }

    fn lock_device(&self) -> std::sync::MutexGuard<'_, dyn VirtioDevice + 'static> {
        // A device thread that panicked while holding the lock leaves consistent-enough
        // state for register access; don't take the vCPU down with it.
        self.device.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn fresh_queues(&self) -> Vec<Queue> {
        self.lock_device()
            .queue_max_sizes()
            .iter()
            .filter_map(|&max| match Queue::new(max) {
                Ok(queue) => Some(queue),
                Err(err) => {
                    tracing::error!("virtio-mmio: invalid queue size {max}: {err}");
                    None
                }
            })
            .collect()
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue registers may only change while the driver sets the device up.
    fn queue_config_allowed(&self) -> bool {
        self.status & STATUS_FEATURES_OK != 0
            && self.status & (STATUS_DRIVER_OK | STATUS_FAILED) == 0
    }

    fn update_queue<F: FnOnce(&mut Queue)>(&mut self, f: F) {
        if !self.queue_config_allowed() {
            tracing::warn!("virtio-mmio: queue register write in status {:#x}", self.status);
            return;
        }
        if let Some(queue) = self.selected_queue() {
            // A ready queue is live: its addresses cannot change under it.
            if !queue.ready() {
                f(queue);
            }
        }
    }

    fn reset(&mut self) {
        if self.activated {
            self.lock_device().reset();
            self.activated = false;
        }
        self.status = 0;
        self.acked_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt.reset();
        self.queues = self.fresh_queues();
    }

    fn set_status(&mut self, new: u32) {
        if new == 0 {
            self.reset();
            return;
        }
        if new & STATUS_FAILED != 0 {
            self.status |= STATUS_FAILED;
            return;
        }
        // The driver may only add bits, one step at a time, in the order of 3.1.1.
        if new & self.status != self.status {
            tracing::warn!("virtio-mmio: status {:#x} -> {new:#x} clears bits", self.status);
            return;
        }
        let added = new & !self.status;
        let allowed = match added {
            STATUS_ACKNOWLEDGE => self.status == 0,
            STATUS_DRIVER => self.status == STATUS_ACKNOWLEDGE,
            STATUS_FEATURES_OK => self.status == STATUS_ACKNOWLEDGE | STATUS_DRIVER,
            STATUS_DRIVER_OK => {
                self.status == STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK
            }
            _ => false,
        };
        if !allowed {
            tracing::warn!("virtio-mmio: invalid status transition {:#x} -> {new:#x}", self.status);
            return;
        }
        if added == STATUS_FEATURES_OK {
            let offered = self.lock_device().avail_features();
            // Refusing FEATURES_OK (leaving the bit clear) is how the device says no.
            if self.acked_features & !offered != 0
                || self.acked_features & super::FEATURE_VERSION_1 == 0
            {
                tracing::warn!(
                    "virtio-mmio: driver features {:#x} not acceptable (offered {offered:#x})",
                    self.acked_features
                );
                return;
            }
        }
        self.status = new;
        if added == STATUS_DRIVER_OK {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let expected = self.queues.len();
        let ready = self.queues.iter().all(|q| q.ready() && q.is_valid(&self.mem));
        if !ready {
            tracing::warn!("virtio-mmio: DRIVER_OK with queues not ready or invalid");
            self.interrupt.signal_needs_reset();
            return;
        }
        let queues = std::mem::take(&mut self.queues);
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            queues,
            acked_features: self.acked_features,
            interrupt: self.interrupt.clone(),
        };
        let mut device = self.lock_device();
        match device.activate(ctx) {
            Ok(()) => {
                drop(device);
                self.activated = true;
            }
            Err(err) => {
                drop(device);
                tracing::error!("virtio-mmio: activating device (queues {expected}): {err}");
                self.interrupt.signal_needs_reset();
            }
        }
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC => MMIO_MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.lock_device().device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => {
                let features = self.lock_device().avail_features();
                match self.device_features_sel {
                    0 => features as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                }
            }
            REG_QUEUE_NUM_MAX => {
                self.queues.get(self.queue_sel as usize).map_or(0, |q| u32::from(q.max_size()))
            }
            REG_QUEUE_READY => {
                self.queues.get(self.queue_sel as usize).map_or(0, |q| u32::from(q.ready()))
            }
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status(),
            REG_CONFIG_GENERATION => self.interrupt.config_generation(),
            // No shared memory regions (no virtio-fs DAX window): a length of -1 tells the
            // driver the selected region does not exist.
            REG_SHM_LEN_LOW | REG_SHM_LEN_HIGH | REG_SHM_BASE_LOW | REG_SHM_BASE_HIGH => u32::MAX,
            _ => {
                tracing::debug!("virtio-mmio: read of unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            REG_DRIVER_FEATURES => {
                if self.status != STATUS_ACKNOWLEDGE | STATUS_DRIVER {
                    tracing::warn!("virtio-mmio: features written in status {:#x}", self.status);
                    return;
                }
                match self.driver_features_sel {
                    0 => {
                        self.acked_features =
                            (self.acked_features & !0xffff_ffff) | u64::from(value)
                    }
                    1 => {
                        self.acked_features =
                            (self.acked_features & 0xffff_ffff) | (u64::from(value) << 32)
                    }
                    _ => {}
                }
            }
            REG_QUEUE_SEL => self.queue_sel = value,
            REG_QUEUE_NUM => self.update_queue(|q| q.set_size(value as u16)),
            REG_QUEUE_READY => {
                if !self.queue_config_allowed() {
                    return;
                }
                if let Some(queue) = self.selected_queue() {
                    queue.set_ready(value == 1);
                }
            }
            REG_QUEUE_NOTIFY => {
                if self.activated && self.status & STATUS_DRIVER_OK != 0 {
                    self.lock_device().queue_notify(value);
                }
            }
            REG_INTERRUPT_ACK => self.interrupt.ack(value),
            REG_STATUS => self.set_status(value),
            REG_QUEUE_DESC_LOW => {
                self.update_queue(|q| q.set_desc_table_address(Some(value), None))
            }
            REG_QUEUE_DESC_HIGH => {
                self.update_queue(|q| q.set_desc_table_address(None, Some(value)))
            }
            REG_QUEUE_AVAIL_LOW => {
                self.update_queue(|q| q.set_avail_ring_address(Some(value), None))
            }
            REG_QUEUE_AVAIL_HIGH => {
                self.update_queue(|q| q.set_avail_ring_address(None, Some(value)))
            }
            REG_QUEUE_USED_LOW => self.update_queue(|q| q.set_used_ring_address(Some(value), None)),
            REG_QUEUE_USED_HIGH => {
                self.update_queue(|q| q.set_used_ring_address(None, Some(value)))
            }
            _ => tracing::debug!("virtio-mmio: write of unknown register {offset:#x}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("device type {found} in the snapshot, {expected} in this VM")]
    DeviceType { expected: u32, found: u32 },
    #[error("the active device cannot report its queues (its rings live in another process)")]
    QueuesUnknown,
    #[error("the snapshot has {found} queues, the device has {expected}")]
    QueueCount { expected: usize, found: usize },
    #[error("queue {index} in the snapshot is invalid: {source}")]
    Queue { index: usize, source: virtio_queue::Error },
    #[error("the restored queues do not fit guest memory")]
    QueuesInvalid,
    #[error("re-activating the device: {0}")]
    Activate(#[from] super::ActivateError),
}

/// One queue's registers and ring positions (virtio-queue's `QueueState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl From<QueueState> for QueueSnapshot {
    fn from(q: QueueState) -> Self {
        Self {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl From<QueueSnapshot> for QueueState {
    fn from(q: QueueSnapshot) -> Self {
        Self {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// What Firecracker's `MmioTransportState` keeps: the transport registers, the interrupt
/// line, and each queue. The device itself is rebuilt from the new VM's configuration (its
/// tap, socket or file); an active device is re-activated on the restored queues.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    pub device_type: u32,
    pub status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub acked_features: u64,
    pub queue_sel: u32,
    pub interrupt_status: u32,
    pub config_generation: u32,
    pub needs_reset: bool,
    pub activated: bool,
    pub queues: Vec<QueueSnapshot>,
}

impl Snapshottable for MmioTransport {
    type State = TransportState;
    type Error = TransportError;

    fn save_state(&self) -> Result<TransportState, TransportError> {
        let device = self.lock_device();
        let queues: Vec<QueueSnapshot> = if self.activated {
            device
                .queue_states()
                .ok_or(TransportError::QueuesUnknown)?
                .into_iter()
                .map(Into::into)
                .collect()
        } else {
            self.queues.iter().map(|q| q.state().into()).collect()
        };
        Ok(TransportState {
            device_type: device.device_type(),
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.acked_features,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt.status(),
            config_generation: self.interrupt.config_generation(),
            needs_reset: self.interrupt.needs_reset(),
            activated: self.activated,
            queues,
        })
    }

    fn restore_state(&mut self, state: &TransportState) -> Result<(), TransportError> {
        let (device_type, max_sizes) = {
            let device = self.lock_device();
            (device.device_type(), device.queue_max_sizes().to_vec())
        };
        if state.device_type != device_type {
            return Err(TransportError::DeviceType {
                expected: device_type,
                found: state.device_type,
            });
        }
        if state.queues.len() != max_sizes.len() {
            return Err(TransportError::QueueCount {
                expected: max_sizes.len(),
                found: state.queues.len(),
            });
        }
        let mut queues = Vec::with_capacity(state.queues.len());
        for (index, (saved, &max)) in state.queues.iter().zip(&max_sizes).enumerate() {
            // The device decides its queue sizes; a snapshot cannot enlarge them.
            let saved = QueueSnapshot { max_size: max, ..*saved };
            let queue = Queue::try_from(QueueState::from(saved))
                .map_err(|source| TransportError::Queue { index, source })?;
            queues.push(queue);
        }
        self.status = state.status;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.acked_features = state.acked_features;
        self.queue_sel = state.queue_sel;
        self.interrupt.restore(state.interrupt_status, state.config_generation);
        if state.needs_reset {
            self.interrupt.signal_needs_reset();
        }
        self.queues = queues;
        if state.activated {
            if !self.queues.iter().all(|q| q.ready() && q.is_valid(&self.mem)) {
                return Err(TransportError::QueuesInvalid);
            }
            let ctx = ActivateContext {
                mem: self.mem.clone(),
                queues: std::mem::take(&mut self.queues),
                acked_features: self.acked_features,
                interrupt: self.interrupt.clone(),
            };
            let mut device = self.lock_device();
            device.activate(ctx)?;
            device.restored();
            drop(device);
            self.activated = true;
        }
        Ok(())
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= REG_CONFIG {
            self.lock_device().read_config(offset - REG_CONFIG, data);
            return;
        }
        // Registers below the config space are 32-bit and must be accessed as such.
        if data.len() != 4 || !offset.is_multiple_of(4) {
            tracing::warn!("virtio-mmio: {}-byte read at {offset:#x}", data.len());
            data.fill(0);
            return;
        }
        let value = self.read_register(offset);
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= REG_CONFIG {
            if self.status & STATUS_DRIVER != 0 && self.status & STATUS_FAILED == 0 {
                self.lock_device().write_config(offset - REG_CONFIG, data);
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            tracing::warn!("virtio-mmio: {}-byte write at {offset:#x}", data.len());
            return;
        };
        if !offset.is_multiple_of(4) {
            return;
        }
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::{DummyDevice, VirtioTestDriver};

    #[test]
    fn identity_registers() {
        let mut driver = VirtioTestDriver::new(Arc::new(Mutex::new(DummyDevice::new(2))));
        assert_eq!(driver.read_reg(REG_MAGIC), MMIO_MAGIC_VALUE);
        assert_eq!(driver.read_reg(REG_VERSION), 2);
        assert_eq!(driver.read_reg(REG_DEVICE_ID), 0xff);
        assert_eq!(driver.read_reg(REG_VENDOR_ID), VENDOR_ID);
        assert_eq!(driver.read_reg(REG_SHM_LEN_LOW), u32::MAX);
        assert_eq!(driver.read_reg(REG_SHM_LEN_HIGH), u32::MAX);
        // Narrow or unaligned register accesses read as zero and are ignored on write.
        let mut t = driver.transport.lock().unwrap();
        let mut narrow = [0xffu8; 2];
        t.read(REG_MAGIC, &mut narrow);
        assert_eq!(narrow, [0, 0]);
        let mut unaligned = [0xffu8; 4];
        t.read(REG_MAGIC + 1, &mut unaligned);
        assert_eq!(unaligned, [0; 4]);
        t.write(REG_STATUS, &[1]);
        t.write(REG_STATUS + 2, &[1, 0, 0, 0]);
        drop(t);
        assert_eq!(driver.read_reg(REG_STATUS), 0);
    }

    #[test]
    fn status_machine_and_activation() {
        let dummy = Arc::new(Mutex::new(DummyDevice::new(2)));
        let mut driver = VirtioTestDriver::new(dummy.clone());
        // Skipping a step is ignored.
        driver.write_reg(REG_STATUS, STATUS_DRIVER_OK);
        assert_eq!(driver.read_reg(REG_STATUS), 0);
        driver.write_reg(REG_STATUS, STATUS_ACKNOWLEDGE);
        driver.write_reg(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        // Features the device never offered make FEATURES_OK fail.
        driver.write_reg(REG_DRIVER_FEATURES_SEL, 0);
        driver.write_reg(REG_DRIVER_FEATURES, 1 << 3);
        driver.write_reg(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
        assert_eq!(driver.read_reg(REG_STATUS) & STATUS_FEATURES_OK, 0);
        driver.write_reg(REG_DRIVER_FEATURES, 0);
        driver.write_reg(REG_DRIVER_FEATURES_SEL, 1);
        driver.write_reg(REG_DRIVER_FEATURES, 1); // VERSION_1
        driver.write_reg(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
        assert_ne!(driver.read_reg(REG_STATUS) & STATUS_FEATURES_OK, 0);
        driver.setup_queues();
        driver.write_reg(
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        assert!(dummy.lock().unwrap().activated);
        // Queue addresses are frozen once live.
        driver.write_reg(REG_QUEUE_SEL, 0);
        driver.write_reg(REG_QUEUE_NUM, 2);
        driver.write_reg(REG_QUEUE_NOTIFY, 1);
        assert_eq!(dummy.lock().unwrap().notified, vec![1]);
        // Reset.
        driver.write_reg(REG_STATUS, 0);
        assert!(!dummy.lock().unwrap().activated);
        assert_eq!(driver.read_reg(REG_STATUS), 0);
        assert_eq!(driver.read_reg(REG_QUEUE_READY), 0);
    }

    #[test]
    fn transport_state_restores_into_a_new_transport_and_reactivates() {
        let dummy = Arc::new(Mutex::new(DummyDevice::new(2)));
        let mut driver = VirtioTestDriver::new(dummy.clone());
        driver.negotiate(0);
        driver.setup_queues();
        driver.write_reg(
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        driver.write_reg(REG_QUEUE_SEL, 1);
        let state = driver.transport.lock().unwrap().save_state().unwrap();
        assert!(state.activated);
        assert_eq!(state.queues.len(), 2);
        assert!(state.queues.iter().all(|q| q.ready));

        let restored = Arc::new(Mutex::new(DummyDevice::new(2)));
        let mut again = VirtioTestDriver::with_memory(driver.mem.clone(), restored.clone());
        again.transport.lock().unwrap().restore_state(&state).unwrap();
        assert!(restored.lock().unwrap().activated, "an active device is re-activated");
        assert_eq!(again.transport.lock().unwrap().save_state().unwrap(), state);
        assert_eq!(again.read_reg(REG_STATUS), state.status);
        again.write_reg(REG_QUEUE_NOTIFY, 1);
        assert_eq!(restored.lock().unwrap().notified, vec![1]);

        // A snapshot of another device type, or with other queues, is refused.
        let other = Arc::new(Mutex::new(DummyDevice::new(3)));
        let third = VirtioTestDriver::with_memory(driver.mem.clone(), other);
        let err = third.transport.lock().unwrap().restore_state(&state).unwrap_err();
        assert!(matches!(err, TransportError::QueueCount { expected: 3, found: 2 }), "{err}");
        let wrong_type = TransportState { device_type: 1, ..state };
        let err = again.transport.lock().unwrap().restore_state(&wrong_type).unwrap_err();
        assert!(matches!(err, TransportError::DeviceType { .. }), "{err}");
    }

    #[test]
    fn driver_ok_with_unready_queue_needs_reset() {
        let dummy = Arc::new(Mutex::new(DummyDevice::new(2)));
        let mut driver = VirtioTestDriver::new(dummy.clone());
        driver.negotiate(0);
        // No queue set up.
        driver.write_reg(
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        assert!(!dummy.lock().unwrap().activated);
        assert_ne!(driver.read_reg(REG_STATUS) & STATUS_NEEDS_RESET, 0);
        assert_ne!(driver.read_reg(REG_INTERRUPT_STATUS) & super::super::INTERRUPT_CONFIG, 0);
        driver.write_reg(REG_INTERRUPT_ACK, super::super::INTERRUPT_CONFIG);
        assert_eq!(driver.read_reg(REG_INTERRUPT_STATUS), 0);
    }

    #[test]
    fn config_space_and_generation() {
        let dummy = Arc::new(Mutex::new(DummyDevice::new(1)));
        let mut driver = VirtioTestDriver::new(dummy);
        let mut buf = [0u8; 8];
        driver.transport.lock().unwrap().read(REG_CONFIG, &mut buf);
        assert_eq!(buf, [1, 2, 3, 4, 0, 0, 0, 0]);
        let gen = driver.read_reg(REG_CONFIG_GENERATION);
        driver.transport.lock().unwrap().interrupt().signal_config_change();
        assert_eq!(driver.read_reg(REG_CONFIG_GENERATION), gen + 1);
        driver.write_reg(REG_STATUS, STATUS_ACKNOWLEDGE);
        driver.write_reg(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        driver.transport.lock().unwrap().write(REG_CONFIG + 1, &[9]);
        driver.transport.lock().unwrap().read(REG_CONFIG, &mut buf[..4]);
        assert_eq!(&buf[..4], &[1, 9, 3, 4]);
    }
}
