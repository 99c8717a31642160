//! The daemon's connections into a VM's run directory. That directory belongs to the VM's
//! uid (its parent is root's, so the VM cannot move or replace the directory itself), so a
//! compromised helper of that uid (QEMU, vhost-device-vsock, the built-in VMM) can replace
//! any socket in it, e.g. with a symlink to another pod's socket or the daemon's own, and a
//! `connect` by path follows it. Every stream the daemon opens there must therefore end at a
//! listener of the directory's owner, or of a process that runs as that owner now (the
//! built-in VMM jails itself after binding): the kernel records the listener's pid and uid at
//! `listen` (SO_PEERCRED), which no symlink can forge, and only this VM's processes run as its
//! uid (each VM gets its own).

use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};

/// A socket in a run directory whose listener is not the directory's owner.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("reading the owner of {path}: {source}")]
    DirOwner { path: PathBuf, source: std::io::Error },
    #[error("reading the peer credentials of {path}: {source}")]
    PeerCredentials { path: PathBuf, source: nix::Error },
    #[error(
        "{path} leads to a listener of uid {peer_uid}, not of its VM (uid {owner_uid}): \
         refused (a replaced socket or a symlink)"
    )]
    Foreign { path: PathBuf, peer_uid: u32, owner_uid: u32 },
}

/// Fails unless `stream`, connected through `path`, ends at a listener running as the owner
/// of `path`'s directory.
pub fn check(path: &Path, stream: &impl AsFd) -> Result<(), PeerError> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    let owner_uid = std::fs::symlink_metadata(dir)
        .map_err(|source| PeerError::DirOwner { path: dir.to_path_buf(), source })?
        .uid();
    let peer = getsockopt(stream, PeerCredentials)
        .map_err(|source| PeerError::PeerCredentials { path: path.to_path_buf(), source })?;
    // The built-in VMM binds its sockets as root, then jails itself (setresuid to the VM's
    // uid): its listener's credentials say root, the process is the VM's now.
    if peer.uid() == owner_uid || process_uids(peer.pid()) == Some([owner_uid; 3]) {
        return Ok(());
    }
    Err(PeerError::Foreign { path: path.to_path_buf(), peer_uid: peer.uid(), owner_uid })
}

/// The real, effective and saved uid of process `pid` now.
fn process_uids(pid: i32) -> Option<[u32; 3]> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    let mut ids = line.split_whitespace().map(|n| n.parse::<u32>().ok());
    Some([ids.next()??, ids.next()??, ids.next()??])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::{UnixListener, UnixStream};

    #[test]
    fn process_uids_are_read_from_proc() {
        let uid = nix::unistd::Uid::current().as_raw();
        assert_eq!(process_uids(std::process::id() as i32), Some([uid; 3]));
        assert_eq!(process_uids(-1), None);
    }

    #[test]
    fn a_listener_of_the_directory_owner_passes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsock.sock");
        let _listener = UnixListener::bind(&path).unwrap();
        let stream = UnixStream::connect(&path).unwrap();
        check(&path, &stream).unwrap();
    }

    /// The run directory of a VM (uid `vm_uid`) whose `vsock.sock` a helper replaced with a
    /// symlink to a socket of another uid (here: the test's own, as another pod's would be).
    #[test]
    fn a_symlink_to_another_uids_socket_is_refused() {
        if !nix::unistd::Uid::effective().is_root() {
            println!("SKIP: chown needs root");
            return;
        }
        let other = tempfile::tempdir().unwrap();
        let target = other.path().join("vsock.sock");
        let _listener = UnixListener::bind(&target).unwrap();
        let vms = tempfile::tempdir().unwrap();
        let run_dir = vms.path().join("vm");
        std::fs::create_dir(&run_dir).unwrap();
        let vm_uid = 64_999;
        nix::unistd::chown(&run_dir, Some(vm_uid.into()), Some(vm_uid.into())).unwrap();
        let path = run_dir.join("vsock.sock");
        std::os::unix::fs::symlink(&target, &path).unwrap();
        let stream = UnixStream::connect(&path).unwrap();
        match check(&path, &stream) {
            Err(PeerError::Foreign { peer_uid: 0, owner_uid, .. }) => assert_eq!(owner_uid, vm_uid),
            other => panic!("{other:?}"),
        }
    }
}
