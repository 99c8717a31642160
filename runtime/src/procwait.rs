//! Waiting for a process that is not our child (a VMM started by an earlier daemon) to exit,
//! with a pidfd: the kernel tells us, nothing polls.

use std::os::fd::{FromRawFd, OwnedFd};
use std::time::Duration;

use tokio::io::unix::AsyncFd;

use crate::hypervisor::{process_alive, VmProcess};

/// Returns once `process` has exited (or was never the recorded process).
pub async fn wait_for_exit(process: &VmProcess) {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, process.pid, 0) };
    if fd < 0 {
        // Already gone, or no pidfd support: fall back to a slow check.
        while process_alive(process) {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        return;
    }
    // SAFETY: `fd` was just returned by pidfd_open and is owned by nobody else.
    let owned = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // The pid may have been reused between recording and opening: check identity after open.
    if !process_alive(process) {
        return;
    }
    // SAFETY: the AsyncFd owns the pidfd, so it stays open for as long as it is registered.
    let registered =
        unsafe { AsyncFd::register_with_interest(owned, tokio::io::Interest::READABLE) };
    match registered {
        Ok(async_fd) => {
            let _ = async_fd.readable().await;
        }
        Err(_) => {
            while process_alive(process) {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::process_start_time;

    #[tokio::test]
    async fn notices_exit_of_a_process() {
        let mut child = std::process::Command::new("sleep").arg("0.3").spawn().unwrap();
        let pid = child.id() as i32;
        let p =
            VmProcess { name: "sleep".into(), pid, start_time: process_start_time(pid).unwrap() };
        let reaper = std::thread::spawn(move || child.wait());
        tokio::time::timeout(Duration::from_secs(5), wait_for_exit(&p)).await.unwrap();
        reaper.join().unwrap().unwrap();
    }
}
