//! Run state shared by the vCPU threads and the VMM's event loop: why the VM exits, and the
//! run/pause/stop protocol with the vCPUs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use vmm_sys_util::eventfd::EventFd;

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "detail", rename_all = "snake_case")]
pub enum ExitReason {
    /// The guest asked for a reset through the i8042 (Linux `reboot`, `reboot=k`).
    GuestReset,
    /// The guest shut down (KVM_EXIT_SHUTDOWN: triple fault, or a PSCI/system-event shutdown).
    GuestShutdown,
    /// The host asked the VMM to stop (control socket or signal).
    HostStop,
    /// The VM failed: the guest did something KVM or the VMM cannot handle.
    Error(String),
}

impl ExitReason {
    /// The process exit code for this reason.
    pub fn exit_code(&self) -> u8 {
        match self {
            ExitReason::GuestReset | ExitReason::GuestShutdown | ExitReason::HostStop => 0,
            ExitReason::Error(_) => 1,
        }
    }
}

/// The VM's exit request: the first reason wins; the eventfd wakes the event loop.
pub struct VmExit {
    evt: EventFd,
    reason: Mutex<Option<ExitReason>>,
}

impl VmExit {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self { evt: EventFd::new(libc::EFD_NONBLOCK)?, reason: Mutex::new(None) })
    }

    /// Records `reason` (unless one is recorded already) and wakes the event loop.
    pub fn request(&self, reason: ExitReason) {
        let mut current = lock(&self.reason);
        if current.is_none() {
            *current = Some(reason);
        }
        // The loop also polls the reason, so a failed wake-up only delays the exit.
        let _ = self.evt.write(1);
    }

    pub fn reason(&self) -> Option<ExitReason> {
        lock(&self.reason).clone()
    }

    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

/// What the vCPUs are asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Running,
    Paused,
    Stopping,
}

struct ControlState {
    state: RunState,
    /// vCPUs that acknowledged the current pause (they sit in `wait_while_paused`).
    paused: usize,
    /// vCPU threads that returned.
    finished: usize,
}

/// The run state and its acknowledgements, shared by the vCPU threads and the event loop.
pub struct VcpuControl {
    inner: Mutex<ControlState>,
    changed: Condvar,
    /// Wall-clock time (ns since the epoch) of the first vCPU exit, 0 until then: with a guest
    /// whose first instruction does I/O, "VMM start to first guest instruction".
    first_exit_ns: AtomicU64,
}

impl Default for VcpuControl {
    fn default() -> Self {
        Self {
            inner: Mutex::new(ControlState { state: RunState::Running, paused: 0, finished: 0 }),
            changed: Condvar::new(),
            first_exit_ns: AtomicU64::new(0),
        }
    }
}

impl VcpuControl {
    pub fn state(&self) -> RunState {
        lock(&self.inner).state
    }

    pub fn set_state(&self, state: RunState) {
        let mut inner = lock(&self.inner);
        inner.state = state;
        self.changed.notify_all();
    }

    /// Called by a vCPU thread that saw `Paused`: acknowledges, then blocks until the state
    /// changes. Returns the new state.
    pub fn wait_while_paused(&self) -> RunState {
        let mut inner = lock(&self.inner);
        inner.paused += 1;
        self.changed.notify_all();
        while inner.state == RunState::Paused {
            inner = self.changed.wait(inner).unwrap_or_else(|p| p.into_inner());
        }
        inner.paused -= 1;
        self.changed.notify_all();
        inner.state
    }

    /// Called by a vCPU thread as it returns.
    pub fn mark_finished(&self) {
        let mut inner = lock(&self.inner);
        inner.finished += 1;
        self.changed.notify_all();
    }

    /// Waits up to `timeout` until `vcpus` vCPUs are paused or finished.
    pub fn wait_quiesced(&self, vcpus: usize, timeout: Duration) -> bool {
        let inner = lock(&self.inner);
        let (inner, _) = self
            .changed
            .wait_timeout_while(inner, timeout, |s| s.paused + s.finished < vcpus)
            .unwrap_or_else(|p| p.into_inner());
        inner.paused + inner.finished >= vcpus
    }

    /// Waits up to `timeout` until `vcpus` vCPU threads have returned.
    pub fn wait_finished(&self, vcpus: usize, timeout: Duration) -> bool {
        let inner = lock(&self.inner);
        let (inner, _) = self
            .changed
            .wait_timeout_while(inner, timeout, |s| s.finished < vcpus)
            .unwrap_or_else(|p| p.into_inner());
        inner.finished >= vcpus
    }

    /// Records the first vCPU exit's time (only the first call counts).
    pub fn note_exit(&self) {
        if self.first_exit_ns.load(Ordering::Relaxed) == 0 {
            let now = now_ns();
            let _ =
                self.first_exit_ns.compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
        }
    }

    pub fn first_exit_ns(&self) -> Option<u64> {
        Some(self.first_exit_ns.load(Ordering::Relaxed)).filter(|&ns| ns != 0)
    }
}

/// Nanoseconds since the Unix epoch.
pub fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn first_exit_reason_wins() {
        let exit = VmExit::new().unwrap();
        exit.request(ExitReason::GuestReset);
        exit.request(ExitReason::Error("late".into()));
        assert_eq!(exit.reason(), Some(ExitReason::GuestReset));
        assert_eq!(exit.eventfd().read().unwrap(), 2);
        assert_eq!(ExitReason::Error(String::new()).exit_code(), 1);
        assert_eq!(ExitReason::HostStop.exit_code(), 0);
    }

    #[test]
    fn pause_is_acknowledged_and_resume_releases() {
        let control = Arc::new(VcpuControl::default());
        control.set_state(RunState::Paused);
        let c = control.clone();
        let vcpu = std::thread::spawn(move || {
            let state = c.wait_while_paused();
            c.mark_finished();
            state
        });
        assert!(control.wait_quiesced(1, Duration::from_secs(5)));
        control.set_state(RunState::Running);
        assert_eq!(vcpu.join().unwrap(), RunState::Running);
        assert!(control.wait_finished(1, Duration::from_secs(5)));
        assert!(!control.wait_finished(2, Duration::from_millis(10)));
    }
}
