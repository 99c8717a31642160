//! Opening a tap device with a virtio-net header.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

/// `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// `_IOW('T', 208, unsigned int)`.
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
/// `_IOW('T', 216, int)`.
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// Size of `struct virtio_net_hdr_v1` (VIRTIO_F_VERSION_1 always uses it).
pub const VNET_HDR_SIZE: usize = 12;

/// Failures opening a tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The interface name does not fit `IFNAMSIZ`.
    #[error("tap name {0:?} is empty or longer than 15 bytes")]
    InvalidName(String),
    /// Opening /dev/net/tun.
    #[error("open /dev/net/tun: {0}")]
    OpenTun(std::io::Error),
    /// TUNSETIFF.
    #[error("TUNSETIFF {0}: {1}")]
    SetIff(String, std::io::Error),
    /// TUNSETVNETHDRSZ.
    #[error("TUNSETVNETHDRSZ: {0}")]
    SetVnetHdrSize(std::io::Error),
    /// TUNSETOFFLOAD.
    #[error("TUNSETOFFLOAD: {0}")]
    SetOffload(std::io::Error),
    /// The inherited tap fd is not open (or is a standard stream).
    #[error("inherited tap fd {0} is not an open descriptor")]
    BadFd(i32),
    /// fcntl(F_SETFL, O_NONBLOCK).
    #[error("making the tap non-blocking: {0}")]
    SetNonblocking(std::io::Error),
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Opens (creating it if allowed) tap `name`, non-blocking, with a 12-byte vnet header
/// and no offloads (none are offered to the guest).
pub fn open_tap(name: &str) -> Result<File, TapError> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.as_bytes().contains(&0) {
        return Err(TapError::InvalidName(name.into()));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(TapError::OpenTun)?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: `file` is an open tun fd and `req` is a valid, initialised `struct ifreq`
    // (name + flags, padded to its full size) that outlives the call.
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
    if ret < 0 {
        return Err(TapError::SetIff(name.into(), std::io::Error::last_os_error()));
    }
    configure(&file)?;
    Ok(file)
}

/// Sets the 12-byte vnet header and no offloads on an open tap (one this process opened, or
/// one it was handed: the daemon opens pods' taps inside their network namespaces).
pub fn configure(file: &File) -> Result<(), TapError> {
    let hdr_size = VNET_HDR_SIZE as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which is valid.
    let ret =
        unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ, &hdr_size as *const libc::c_int) };
    if ret < 0 {
        return Err(TapError::SetVnetHdrSize(std::io::Error::last_os_error()));
    }
    // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETOFFLOAD, 0 as libc::c_uint) };
    if ret < 0 {
        return Err(TapError::SetOffload(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Makes `file` non-blocking (an inherited tap may not be).
pub fn set_nonblocking(file: &File) -> Result<(), TapError> {
    // SAFETY: F_GETFL/F_SETFL on an open fd read and set status flags; no memory is passed.
    let ok = unsafe {
        let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
        flags >= 0 && libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) >= 0
    };
    if ok {
        Ok(())
    } else {
        Err(TapError::SetNonblocking(std::io::Error::last_os_error()))
    }
}
