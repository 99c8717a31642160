//! vCPU threads: KVM_RUN in a loop, dispatching port and MMIO exits to the buses, turning
//! every other exit into a VM exit reason. A vCPU is kicked out of KVM_RUN with a real-time
//! signal whose handler does nothing (the ioctl returns EINTR).

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use kvm_ioctls::{VcpuExit, VcpuFd};
use seccompiler::BpfProgram;
use vmm_sys_util::signal::{register_signal_handler, Killable};

use crate::bus::Bus;
use crate::vstate::{ExitReason, RunState, VcpuControl, VmExit};

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("registering the vCPU kick signal handler: {0}")]
    SignalHandler(vmm_sys_util::errno::Error),
    #[error("spawning vCPU thread {id}: {source}")]
    Spawn { id: u8, source: std::io::Error },
}

/// KVM_SYSTEM_EVENT_* types.
const SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const SYSTEM_EVENT_RESET: u32 = 2;

/// The signal that kicks a vCPU out of KVM_RUN.
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn noop_signal_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) kick handler; idempotent.
pub fn register_kick_handler() -> Result<(), VcpuError> {
    register_signal_handler(kick_signal(), noop_signal_handler).map_err(VcpuError::SignalHandler)
}

/// Holds the vCPU threads until the VMM thread has installed its own seccomp filter; then lets
/// them run the guest, or tells them to return (start-up failed).
#[derive(Default)]
pub struct StartGate {
    go: Mutex<Option<bool>>,
    opened: Condvar,
}

impl StartGate {
    /// Releases the waiting threads: `run` says whether they run the guest.
    pub fn open(&self, run: bool) {
        *self.go.lock().unwrap_or_else(|p| p.into_inner()) = Some(run);
        self.opened.notify_all();
    }

    /// Blocks until [`StartGate::open`]; returns whether to run.
    pub fn wait(&self) -> bool {
        let mut go = self.go.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(run) = *go {
                return run;
            }
            go = self.opened.wait(go).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// What the run loop does after an exit.
#[derive(Debug, PartialEq, Eq)]
enum Emulation {
    Continue,
    Exit(ExitReason),
}

/// One vCPU with what it needs to run.
pub struct Vcpu {
    pub id: u8,
    /// Shared with the snapshot code, which reads the state while this thread is paused.
    pub fd: Arc<Mutex<VcpuFd>>,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub exit: Arc<VmExit>,
    pub control: Arc<VcpuControl>,
}

impl Vcpu {
    /// Starts the vCPU thread: it installs `filter` (if any), waits for `gate` to open, then
    /// runs the guest until the VM exits.
    pub fn start(
        self,
        filter: Option<BpfProgram>,
        gate: Arc<StartGate>,
    ) -> Result<JoinHandle<()>, VcpuError> {
        let id = self.id;
        std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                let installed = match filter {
                    Some(f) => seccompiler::apply_filter(&f)
                        .map_err(|e| format!("installing the vCPU{id} seccomp filter: {e}")),
                    None => Ok(()),
                };
                let run = gate.wait();
                let control = self.control.clone();
                match installed {
                    Ok(()) if run => self.run(),
                    Ok(()) => {}
                    Err(e) => self.exit.request(ExitReason::Error(e)),
                }
                control.mark_finished();
            })
            .map_err(|source| VcpuError::Spawn { id, source })
    }

    fn lock_fd(&self) -> MutexGuard<'_, VcpuFd> {
        self.fd.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn run(self) {
        loop {
            match self.control.state() {
                RunState::Stopping => return,
                RunState::Paused => {
                    if let Emulation::Exit(reason) = self.finish_pending_io() {
                        self.exit.request(reason);
                        return;
                    }
                    if self.control.wait_while_paused() == RunState::Stopping {
                        return;
                    }
                    continue;
                }
                RunState::Running => {}
            }
            let mut fd = self.lock_fd();
            let outcome = match fd.run() {
                Ok(exit) => {
                    if self.id == 0 {
                        self.control.note_exit();
                    }
                    handle_exit(exit, &self.pio, &self.mmio, self.id)
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    Emulation::Continue
                }
                Err(e) => {
                    Emulation::Exit(ExitReason::Error(format!("vCPU{} KVM_RUN: {e}", self.id)))
                }
            };
            drop(fd);
            if let Emulation::Exit(reason) = outcome {
                self.exit.request(reason);
                return;
            }
        }
    }

    /// Lets KVM finish the instruction of the last exit before the vCPU pauses: after a port
    /// or MMIO read, the data the VMM produced only reaches the guest's register on the next
    /// KVM_RUN. With `immediate_exit` set, KVM_RUN completes that and returns EINTR at once
    /// without running guest code (the KVM API's recipe before saving vCPU state).
    fn finish_pending_io(&self) -> Emulation {
        let mut fd = self.lock_fd();
        fd.set_kvm_immediate_exit(1);
        let outcome = match fd.run() {
            Ok(exit) => handle_exit(exit, &self.pio, &self.mmio, self.id),
            Err(_) => Emulation::Continue,
        };
        fd.set_kvm_immediate_exit(0);
        outcome
    }
}

/// Handles one exit; pure dispatch so that odd guest behaviour becomes an exit reason, never a
/// panic.
fn handle_exit(exit: VcpuExit<'_>, pio: &Bus, mmio: &Bus, id: u8) -> Emulation {
    match exit {
        VcpuExit::IoOut(port, data) => {
            pio.write(u64::from(port), data);
            Emulation::Continue
        }
        VcpuExit::IoIn(port, data) => {
            // Nothing at this port: an ISA bus floats high.
            if !pio.read(u64::from(port), data) {
                data.fill(0xff);
            }
            Emulation::Continue
        }
        VcpuExit::MmioRead(addr, data) => {
            if !mmio.read(addr, data) {
                data.fill(0);
            }
            Emulation::Continue
        }
        VcpuExit::MmioWrite(addr, data) => {
            mmio.write(addr, data);
            Emulation::Continue
        }
        VcpuExit::Intr | VcpuExit::IrqWindowOpen => Emulation::Continue,
        // HLT only exits without an in-kernel LAPIC; treat it as the guest being done.
        VcpuExit::Hlt | VcpuExit::Shutdown => Emulation::Exit(ExitReason::GuestShutdown),
        VcpuExit::SystemEvent(kind, _) => match kind {
            SYSTEM_EVENT_SHUTDOWN => Emulation::Exit(ExitReason::GuestShutdown),
            SYSTEM_EVENT_RESET => Emulation::Exit(ExitReason::GuestReset),
            other => Emulation::Exit(ExitReason::Error(format!(
                "vCPU{id}: guest system event {other} (crash)"
            ))),
        },
        VcpuExit::FailEntry(reason, cpu) => Emulation::Exit(ExitReason::Error(format!(
            "vCPU{id}: KVM could not enter the guest (hardware reason {reason:#x}, cpu {cpu})"
        ))),
        VcpuExit::InternalError => Emulation::Exit(ExitReason::Error(format!(
            "vCPU{id}: KVM internal error (an instruction KVM could not emulate)"
        ))),
        other => {
            Emulation::Exit(ExitReason::Error(format!("vCPU{id}: unexpected KVM exit {other:?}")))
        }
    }
}

/// Kicks every running vCPU thread out of KVM_RUN so it re-reads the run state.
pub fn kick_all(threads: &[JoinHandle<()>]) {
    for thread in threads.iter().filter(|t| !t.is_finished()) {
        // A thread that exits between the check and the signal is fine: ESRCH is ignored.
        let _ = thread.kill(kick_signal());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::tests::Recorder;
    use std::sync::Mutex;

    #[test]
    fn io_dispatch_and_floating_reads() {
        let mut pio = Bus::new();
        let dev = Arc::new(Mutex::new(Recorder::default()));
        pio.insert(dev.clone(), 0x3f8, 8).unwrap();
        let mmio = Bus::new();
        assert_eq!(handle_exit(VcpuExit::IoOut(0x3f9, &[7]), &pio, &mmio, 0), Emulation::Continue);
        assert_eq!(dev.lock().unwrap().writes, vec![(1, vec![7])]);
        let mut data = [0u8; 2];
        handle_exit(VcpuExit::IoIn(0x80, &mut data), &pio, &mmio, 0);
        assert_eq!(data, [0xff, 0xff]);
        let mut data = [9u8; 4];
        handle_exit(VcpuExit::MmioRead(0xd000_0000, &mut data), &pio, &mmio, 0);
        assert_eq!(data, [0; 4]);
    }

    #[test]
    fn terminal_exits_become_reasons() {
        let (pio, mmio) = (Bus::new(), Bus::new());
        let shutdown = handle_exit(VcpuExit::Shutdown, &pio, &mmio, 0);
        assert_eq!(shutdown, Emulation::Exit(ExitReason::GuestShutdown));
        let reset = handle_exit(VcpuExit::SystemEvent(SYSTEM_EVENT_RESET, &[]), &pio, &mmio, 0);
        assert_eq!(reset, Emulation::Exit(ExitReason::GuestReset));
        assert!(matches!(
            handle_exit(VcpuExit::InternalError, &pio, &mmio, 1),
            Emulation::Exit(ExitReason::Error(e)) if e.contains("vCPU1")
        ));
        assert!(matches!(
            handle_exit(VcpuExit::Unknown, &pio, &mmio, 0),
            Emulation::Exit(ExitReason::Error(_))
        ));
    }
}
