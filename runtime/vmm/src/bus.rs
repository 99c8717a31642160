//! Address buses (PIO and MMIO): ranges of guest addresses mapped to [`BusDevice`]s, looked up
//! on every vCPU exit for a port or MMIO access.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::devices::BusDevice;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} is empty or wraps around")]
    BadRange { base: u64, len: u64 },
    #[error("bus range {base:#x}+{len:#x} overlaps the device at {other:#x}")]
    Overlap { base: u64, len: u64, other: u64 },
}

/// A device shared between the bus (vCPU threads) and whoever else drives it.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

struct BusRange {
    len: u64,
    device: SharedDevice,
}

/// Non-overlapping address ranges, each served by one device.
#[derive(Default)]
pub struct Bus {
    ranges: BTreeMap<u64, BusRange>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `[base, base + len)` to `device`.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = base.checked_add(len).filter(|_| len > 0);
        let Some(end) = end else {
            return Err(BusError::BadRange { base, len });
        };
        // The nearest range starting at or before `end - 1` is the only one that can overlap.
        if let Some((&other, range)) = self.ranges.range(..end).next_back() {
            if other + range.len > base {
                return Err(BusError::Overlap { base, len, other });
            }
        }
        self.ranges.insert(base, BusRange { len, device });
        Ok(())
    }

    /// The device at `addr` and the offset of `addr` in its range, if the whole access of
    /// `size` bytes falls inside that range.
    fn resolve(&self, addr: u64, size: usize) -> Option<(&SharedDevice, u64)> {
        let (&base, range) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        let end = offset.checked_add(size as u64)?;
        (end <= range.len).then_some((&range.device, offset))
    }

    /// Dispatches a guest read; false if nothing is mapped there (the caller decides what the
    /// guest sees).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((device, offset)) => {
                lock(device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a guest write; false if nothing is mapped there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((device, offset)) => {
                lock(device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device even if a previous holder panicked: a device's state machine is reset by the
/// guest driver, and the VMM must keep serving the other devices.
fn lock(device: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    device.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Records accesses and answers reads with the low byte of the offset.
    #[derive(Default)]
    pub(crate) struct Recorder {
        pub writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatch_by_range_with_offsets() {
        let mut bus = Bus::new();
        let a = Arc::new(Mutex::new(Recorder::default()));
        let b = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(a.clone(), 0x1000, 0x10).unwrap();
        bus.insert(b.clone(), 0x1010, 0x10).unwrap();
        let mut data = [0u8; 4];
        assert!(bus.read(0x1014, &mut data));
        assert_eq!(data, [4; 4]);
        assert!(bus.write(0x100c, &[1, 2, 3, 4]));
        assert_eq!(a.lock().unwrap().writes, vec![(0xc, vec![1, 2, 3, 4])]);
        // An access straddling two devices, or outside every range, goes nowhere.
        assert!(!bus.write(0x100e, &[0; 4]));
        assert!(!bus.read(0xfff, &mut data));
        assert!(!bus.read(0x1020, &mut data));
        assert!(!bus.read(u64::MAX, &mut data));
    }

    #[test]
    fn overlapping_or_empty_ranges_are_refused() {
        let mut bus = Bus::new();
        let dev = || Arc::new(Mutex::new(Recorder::default())) as SharedDevice;
        bus.insert(dev(), 0x100, 0x10).unwrap();
        assert_eq!(
            bus.insert(dev(), 0x108, 0x10),
            Err(BusError::Overlap { base: 0x108, len: 0x10, other: 0x100 })
        );
        assert!(bus.insert(dev(), 0xf8, 0x10).is_err());
        assert!(bus.insert(dev(), 0xf0, 0x10).is_ok());
        assert!(bus.insert(dev(), 0x200, 0).is_err());
        assert!(bus.insert(dev(), u64::MAX, 2).is_err());
    }
}
