//! SIGTERM and SIGINT stop the VM cleanly (like a `stop` on the control socket): they are
//! blocked in every VMM thread and read from a signalfd by the event loop. The daemon's
//! `terminate_processes` sends SIGTERM first, so this is its graceful path.

use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use vmm_sys_util::epoll::EventSet;

use crate::vstate::{ExitReason, VmExit};

/// The signalfd subscriber.
pub struct StopSignals {
    fd: SignalFd,
    exit: Arc<VmExit>,
}

impl StopSignals {
    /// Blocks SIGTERM and SIGINT in the calling thread (threads it creates later inherit the
    /// mask) and opens a signalfd for them. Call before starting the vCPUs.
    pub fn new(exit: Arc<VmExit>) -> nix::Result<Self> {
        let mut mask = SigSet::empty();
        mask.add(Signal::SIGTERM);
        mask.add(Signal::SIGINT);
        nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&mask), None)?;
        let fd = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)?;
        Ok(Self { fd, exit })
    }
}

impl MutEventSubscriber for StopSignals {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        while let Ok(Some(info)) = self.fd.read_signal() {
            tracing::info!(signal = info.ssi_signo, "stop signal received");
            self.exit.request(ExitReason::HostStop);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.fd, EventSet::IN)) {
            self.exit.request(ExitReason::Error(format!("watching the stop signals: {e}")));
        }
    }
}
