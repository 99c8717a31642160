//! Legacy port-I/O devices from `vm-superio`: the COM1 serial console (appended to the sandbox
//! console log) and the i8042 controller, whose CPU-reset command is the guest's way to stop.

use std::io::Write;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{I8042Device, Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::BusDevice;
use crate::snapshot::Snapshottable;
use crate::vstate::{ExitReason, VmExit};

#[derive(Debug, thiserror::Error)]
pub enum LegacyError {
    #[error("cloning the serial interrupt eventfd: {0}")]
    CloneIrq(std::io::Error),
    #[error("the saved serial receive FIFO holds {0} bytes, more than the UART's 64")]
    FifoTooLong(usize),
    #[error("restoring the serial state: {0}")]
    SerialState(String),
}

/// The UART's receive FIFO size (vm-superio's FIFO_SIZE).
const SERIAL_FIFO: usize = 64;

/// The serial port's registers and receive FIFO, as vm-superio's `SerialState`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl From<SerialState> for SerialSnapshot {
    fn from(s: SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialSnapshot> for SerialState {
    fn from(s: &SerialSnapshot) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// Raises an interrupt line through an eventfd registered with KVM as an irqfd.
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// The serial console's output: a log file. Writes are best-effort: a full disk must not stop
/// the guest.
pub struct ConsoleOutput(pub Box<dyn Write + Send>);

impl Write for ConsoleOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // Report success whatever happens: vm-superio drops the byte on error anyway, and a
        // console that cannot be logged is not the guest's problem.
        let _ = self.0.write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = self.0.flush();
        Ok(())
    }
}

/// COM1 as a [`BusDevice`] on the PIO bus.
pub struct SerialDevice {
    serial: Serial<EventFdTrigger, vm_superio::serial::NoEvents, ConsoleOutput>,
}

impl SerialDevice {
    pub fn new(interrupt: EventFd, out: Box<dyn Write + Send>) -> Self {
        Self { serial: Serial::new(EventFdTrigger(interrupt), ConsoleOutput(out)) }
    }
}

impl Snapshottable for SerialDevice {
    type State = SerialSnapshot;
    type Error = LegacyError;

    fn save_state(&self) -> Result<SerialSnapshot, LegacyError> {
        Ok(self.serial.state().into())
    }

    /// Keeps this device's interrupt line and console output; takes the registers and FIFO.
    fn restore_state(&mut self, state: &SerialSnapshot) -> Result<(), LegacyError> {
        if state.in_buffer.len() > SERIAL_FIFO {
            return Err(LegacyError::FifoTooLong(state.in_buffer.len()));
        }
        let irq = self.serial.interrupt_evt().0.try_clone().map_err(LegacyError::CloneIrq)?;
        let placeholder_irq = irq.try_clone().map_err(LegacyError::CloneIrq)?;
        let placeholder =
            Serial::new(EventFdTrigger(placeholder_irq), ConsoleOutput(Box::new(std::io::sink())));
        let out = std::mem::replace(&mut self.serial, placeholder).into_writer();
        // from_state only fails raising the interrupt a restored register asks for; the
        // registers are restored either way, and the guest driver polls LSR.
        self.serial = Serial::from_state(&state.into(), EventFdTrigger(irq), NoEvents, out)
            .map_err(|e| LegacyError::SerialState(e.to_string()))?;
        Ok(())
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // The UART has byte registers: wider accesses read the register and zero the rest.
        data.fill(0);
        if let (Some(first), Ok(offset)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.serial.read(offset);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(&value), Ok(offset)) = (data.first(), u8::try_from(offset)) {
            // An interrupt that cannot be raised (eventfd counter overflow) only delays the
            // guest driver, which polls LSR anyway.
            let _ = self.serial.write(offset, value);
        }
    }
}

/// Turns the i8042's reset request into a clean VM exit.
pub struct ResetTrigger(pub Arc<VmExit>);

impl Trigger for ResetTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.request(ExitReason::GuestReset);
        Ok(())
    }
}

/// The i8042 (ports 0x60-0x64) as a [`BusDevice`]. It has no state to snapshot: vm-superio's
/// i8042 only turns the reset command into an exit and reads back constants.
pub struct I8042 {
    device: I8042Device<ResetTrigger>,
}

impl I8042 {
    pub fn new(exit: Arc<VmExit>) -> Self {
        Self { device: I8042Device::new(ResetTrigger(exit)) }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(first), Ok(offset)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.device.read(offset);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(&value), Ok(offset)) = (data.first(), u8::try_from(offset)) {
            let _ = self.device.write(offset, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn serial_writes_reach_the_log_and_odd_accesses_are_harmless() {
        let sink = Sink::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut serial = SerialDevice::new(irq, Box::new(sink.clone()));
        serial.write(0, b"h");
        serial.write(0, b"i!");
        serial.write(0, &[]);
        serial.write(0x1_0000, b"x");
        let mut lsr = [0u8; 4];
        serial.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "transmit holding register empty");
        assert_eq!(&lsr[1..], &[0, 0, 0]);
        serial.read(0, &mut []);
        assert_eq!(sink.0.lock().unwrap().as_slice(), b"hi");
    }

    #[test]
    fn serial_state_survives_a_restore_into_another_device() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut saved = SerialDevice::new(irq, Box::new(std::io::sink()));
        saved.write(3, &[0x80]); // LCR: DLAB, to reach the divisor
        saved.write(0, &[0x0c]); // divisor low: 9600 baud
        saved.write(3, &[0x03]); // LCR: 8N1
        saved.write(7, &[0x5a]); // scratch
        let state = saved.save_state().unwrap();

        let sink = Sink::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut restored = SerialDevice::new(irq, Box::new(sink.clone()));
        restored.restore_state(&state).unwrap();
        assert_eq!(restored.save_state().unwrap(), state);
        let mut scratch = [0u8];
        restored.read(7, &mut scratch);
        assert_eq!(scratch, [0x5a]);
        restored.write(0, b"k");
        assert_eq!(sink.0.lock().unwrap().as_slice(), b"k", "the new console keeps the output");

        let overfull = SerialSnapshot { in_buffer: vec![0; 65], ..state };
        assert!(matches!(restored.restore_state(&overfull), Err(LegacyError::FifoTooLong(65))));
    }

    #[test]
    fn i8042_reset_requests_a_clean_exit() {
        let exit = Arc::new(VmExit::new().unwrap());
        let mut kbd = I8042::new(exit.clone());
        kbd.write(0, &[0xfe]); // data port: ignored
        assert_eq!(exit.reason(), None);
        kbd.write(4, &[0xfe]);
        assert_eq!(exit.reason(), Some(ExitReason::GuestReset));
    }
}
