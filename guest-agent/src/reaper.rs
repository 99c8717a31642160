//! Child reaping. The agent is PID 1 in the guest (or a child subreaper on the host), so every
//! orphaned process ends up as its child: one reaper collects every exit status with
//! `waitpid(-1)` and hands it to whoever registered interest in that pid.
//!
//! A process can be reaped before its pid is registered (a libcontainer helper that exits at
//! once, or an exec'd process that exits before the helper reports its pid). Such statuses are
//! kept as "unclaimed" with the time they were reaped; a registration made with the instant the
//! process was started claims them. Pid reuse within that window would need a full pid
//! wrap-around in milliseconds, which we accept.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

/// How long an exit status nobody registered for is kept.
const UNCLAIMED_TTL: Duration = Duration::from_secs(300);

/// How a process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExitStatus {
    /// The exit code, or 128 + signal.
    pub code: i32,
    /// The signal that killed the process, 0 if it exited.
    pub signal: i32,
    /// When the reaper collected it.
    pub exited_at: SystemTime,
}

impl ExitStatus {
    fn from_wait_status(status: WaitStatus) -> Option<(Pid, ExitStatus)> {
        let now = SystemTime::now();
        match status {
            WaitStatus::Exited(pid, code) => {
                Some((pid, ExitStatus { code, signal: 0, exited_at: now }))
            }
            WaitStatus::Signaled(pid, sig, _) => Some((
                pid,
                ExitStatus { code: 128 + sig as i32, signal: sig as i32, exited_at: now },
            )),
            _ => None,
        }
    }

    /// The exit time in nanoseconds since the Unix epoch.
    pub fn exited_at_unix_nanos(&self) -> i64 {
        self.exited_at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
            .unwrap_or(0)
    }
}

/// A registration's view of one process's exit.
pub type ExitWatch = watch::Receiver<Option<ExitStatus>>;

#[derive(Default)]
struct ReaperState {
    watched: HashMap<i32, watch::Sender<Option<ExitStatus>>>,
    unclaimed: HashMap<i32, (ExitStatus, Instant)>,
}

/// Collects exit statuses of all children.
#[derive(Clone, Default)]
pub struct Reaper {
    state: Arc<Mutex<ReaperState>>,
}

impl Reaper {
    fn lock(&self) -> MutexGuard<'_, ReaperState> {
        // A panic while holding this lock leaves plain maps behind: still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Watches the exit of `pid`, a process started at or after `started`.
    pub fn register(&self, pid: i32, started: Instant) -> ExitWatch {
        let mut state = self.lock();
        let initial = match state.unclaimed.remove(&pid) {
            Some((status, reaped)) if reaped >= started => Some(status),
            _ => None,
        };
        let (tx, rx) = watch::channel(initial);
        if initial.is_none() {
            state.watched.insert(pid, tx);
        }
        rx
    }

    /// Reaps every child that has exited, without blocking.
    pub fn reap_all(&self) {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => return,
                Ok(status) => {
                    if let Some((pid, exit)) = ExitStatus::from_wait_status(status) {
                        self.record(pid.as_raw(), exit);
                    }
                }
                Err(Errno::EINTR) => continue,
                Err(_) => return, // ECHILD: no children at all
            }
        }
    }

    fn record(&self, pid: i32, exit: ExitStatus) {
        let mut state = self.lock();
        if let Some(tx) = state.watched.remove(&pid) {
            tx.send_replace(Some(exit));
            return;
        }
        tracing::debug!(pid, code = exit.code, "reaped an unregistered process");
        let now = Instant::now();
        state.unclaimed.retain(|_, (_, reaped)| now.duration_since(*reaped) < UNCLAIMED_TTL);
        state.unclaimed.insert(pid, (exit, now));
    }

    /// Reaps on every SIGCHLD, for the life of the runtime.
    pub fn spawn(&self) -> std::io::Result<()> {
        let mut sigchld = signal(SignalKind::child())?;
        let reaper = self.clone();
        reaper.reap_all();
        tokio::spawn(async move {
            loop {
                // SIGCHLD coalesces; the periodic pass is a safety net, not the mechanism.
                let _ = tokio::time::timeout(Duration::from_secs(1), sigchld.recv()).await;
                reaper.reap_all();
            }
        });
        Ok(())
    }
}

/// Waits for a watched exit.
pub async fn wait_exit(mut watch: ExitWatch) -> Option<ExitStatus> {
    watch.wait_for(|s| s.is_some()).await.ok().and_then(|s| *s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: i32) -> ExitStatus {
        ExitStatus { code, signal: 0, exited_at: SystemTime::now() }
    }

    #[test]
    fn status_reaped_before_registration_is_claimed() {
        let reaper = Reaper::default();
        let started = Instant::now();
        reaper.record(4242, status(3));
        let watch = reaper.register(4242, started);
        assert_eq!(watch.borrow().map(|s| s.code), Some(3));
    }

    #[test]
    fn stale_status_is_not_claimed_by_a_newer_process() {
        let reaper = Reaper::default();
        reaper.record(4243, status(3));
        let watch = reaper.register(4243, Instant::now() + Duration::from_millis(1));
        assert!(watch.borrow().is_none());
        reaper.record(4243, status(7));
        assert_eq!(watch.borrow().map(|s| s.code), Some(7));
    }
}
