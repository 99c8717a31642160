//! What the agent does as PID 1 before it serves: leave the initramfs root, mount the kernel
//! filesystems, enable cgroup controllers, detach fds 0-2 from the console, bring up loopback.

use std::fs;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use nix::mount::{mount, MsFlags};
use nix::unistd::{chdir, chroot};

/// Set in the environment of the re-executed agent once the root is a tmpfs.
const ROOT_SWITCHED_ENV: &str = "PODVISOR_ROOT_SWITCHED";
/// Where the new root tmpfs is assembled before it is moved onto `/`.
const NEW_ROOT: &str = "/.podvisor-root";
/// Directories the switched root needs before anything is mounted on them.
const ROOT_DIRS: &[&str] = &["proc", "sys", "dev", "run", "tmp", "etc"];

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("creating {0}: {1}")]
    CreateDir(String, io::Error),
    #[error("raising RLIMIT_NOFILE: {0}")]
    RaiseOpenFiles(nix::Error),
    #[error("mounting {0}: {1}")]
    Mount(String, nix::Error),
    #[error("copying the agent to the new root: {0}")]
    CopyAgent(io::Error),
    #[error("entering the new root: {0}")]
    Chdir(nix::Error),
    #[error("moving the new root onto /: {0}")]
    MoveRoot(nix::Error),
    #[error("chroot into the new root: {0}")]
    Chroot(nix::Error),
    #[error("re-executing the agent: {0}")]
    Exec(io::Error),
    #[error("opening {0}: {1}")]
    Open(String, io::Error),
    #[error("redirecting fd {0}: {1}")]
    Dup(i32, nix::Error),
    #[error("enabling cgroup controller {0}: {1}")]
    CgroupController(String, io::Error),
    #[error("socket for interface configuration: {0}")]
    Socket(io::Error),
    #[error("bringing up the loopback interface: {0}")]
    Loopback(io::Error),
}

/// Whether this process already runs on the tmpfs root (second stage).
pub fn root_switched() -> bool {
    std::env::var_os(ROOT_SWITCHED_ENV).is_some()
}

/// The open-files limit every container gets (containerd's default).
pub const CONTAINER_OPEN_FILES: u64 = 1_048_576;

/// Raises the hard open-files limit containers inherit to what their specs ask: a container
/// in a user namespace may lower its limits but not raise them (no CAP_SYS_RESOURCE over the
/// guest's initial namespace).
pub fn raise_open_files_limit() -> Result<(), InitError> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE).map_err(InitError::RaiseOpenFiles)?;
    setrlimit(Resource::RLIMIT_NOFILE, soft, CONTAINER_OPEN_FILES)
        .map_err(InitError::RaiseOpenFiles)
}

/// Moves the root from the initramfs (where `pivot_root` fails with EINVAL, which container
/// creation needs) onto a fresh tmpfs, the way `switch_root` does, and re-executes the agent
/// there. Returns only on failure.
pub fn switch_root() -> InitError {
    match switch_root_inner() {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

fn switch_root_inner() -> Result<std::convert::Infallible, InitError> {
    create_dir(NEW_ROOT)?;
    mount_one("tmpfs", NEW_ROOT, "tmpfs", MsFlags::empty(), Some("mode=0755"))?;
    let new_root = Path::new(NEW_ROOT);
    fs::copy("/init", new_root.join("init")).map_err(InitError::CopyAgent)?;
    for dir in ROOT_DIRS {
        create_dir(&new_root.join(dir).to_string_lossy())?;
    }
    // Frees the initramfs copy of the binary; the running image stays mapped.
    let _ = fs::remove_file("/init");
    chdir(new_root).map_err(InitError::Chdir)?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(InitError::MoveRoot)?;
    chroot(".").map_err(InitError::Chroot)?;
    chdir("/").map_err(InitError::Chdir)?;
    let err = Command::new("/init").env(ROOT_SWITCHED_ENV, "1").exec();
    Err(InitError::Exec(err))
}

fn create_dir(path: &str) -> Result<(), InitError> {
    match fs::create_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) => Err(InitError::CreateDir(path.to_string(), e)),
    }
}

fn mount_one(
    source: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), InitError> {
    match mount(Some(source), target, Some(fstype), flags, data) {
        Ok(()) | Err(nix::Error::EBUSY) => Ok(()),
        Err(e) => Err(InitError::Mount(target.to_string(), e)),
    }
}

/// Mounts the kernel filesystems the agent and libcontainer need. Returns the failures (to
/// be logged once the console is open) rather than stopping at the first.
pub fn mount_kernel_filesystems() -> Vec<InitError> {
    let common = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let mut errors = Vec::new();
    let steps: &[(&str, &str, &str, MsFlags, Option<&str>)] = &[
        ("proc", "/proc", "proc", common, None),
        ("sysfs", "/sys", "sysfs", common, None),
        ("devtmpfs", "/dev", "devtmpfs", MsFlags::MS_NOSUID, Some("mode=0755")),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
        ),
        ("shm", "/dev/shm", "tmpfs", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=1777")),
        ("tmpfs", "/run", "tmpfs", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=0755")),
        ("cgroup2", "/sys/fs/cgroup", "cgroup2", common, None),
    ];
    for (source, target, fstype, flags, data) in steps {
        if let Err(e) = create_dir(target) {
            errors.push(e);
            continue;
        }
        if let Err(e) = mount_one(source, target, fstype, *flags, *data) {
            errors.push(e);
        }
    }
    errors
}

/// Points fds 0, 1 and 2 at /dev/null: the kernel hands PID 1 the console there (or nothing,
/// in which case the agent's first sockets would take those numbers).
pub fn detach_stdio() -> Result<(), InitError> {
    let null = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|e| InitError::Open("/dev/null".into(), e))?;
    for fd in 0..=2 {
        // SAFETY: dup2 onto the standard descriptors; `null` stays valid for the call, and
        // nothing in this process holds fds 0-2 as owned Rust objects.
        let rc = unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), fd) };
        if rc < 0 {
            return Err(InitError::Dup(fd, nix::Error::last()));
        }
    }
    Ok(())
}

/// The log sink: the kernel console.
pub fn open_console() -> Result<fs::File, InitError> {
    fs::OpenOptions::new()
        .write(true)
        .custom_flags_noctty()
        .open("/dev/console")
        .map_err(|e| InitError::Open("/dev/console".into(), e))
}

trait NoCtty {
    fn custom_flags_noctty(&mut self) -> &mut Self;
}

impl NoCtty for fs::OpenOptions {
    fn custom_flags_noctty(&mut self) -> &mut Self {
        std::os::unix::fs::OpenOptionsExt::custom_flags(self, libc::O_NOCTTY)
    }
}

/// Delegates every available controller to child cgroups (libcontainer creates
/// `/podvisor/<container>` below the root).
pub fn enable_cgroup_controllers(cgroup_root: &Path) -> Vec<InitError> {
    let mut errors = Vec::new();
    let controllers = match fs::read_to_string(cgroup_root.join("cgroup.controllers")) {
        Ok(c) => c,
        Err(e) => {
            errors.push(InitError::CgroupController("(list)".into(), e));
            return errors;
        }
    };
    for controller in controllers.split_whitespace() {
        if let Err(e) =
            fs::write(cgroup_root.join("cgroup.subtree_control"), format!("+{controller}"))
        {
            errors.push(InitError::CgroupController(controller.to_string(), e));
        }
    }
    errors
}

/// Brings `lo` up: containers share the VM's network namespace unless their spec says
/// otherwise, and many programs expect a working loopback.
pub fn loopback_up() -> Result<(), InitError> {
    // SAFETY: plain socket(2) call; the result is checked and owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(InitError::Socket(io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let socket = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&socket);
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads into `req`, which lives for the call.
    if unsafe { libc::ioctl(raw, libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(InitError::Loopback(io::Error::last_os_error()));
    }
    // SAFETY: the union member ifru_flags is the one SIOCGIFFLAGS filled in.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: SIOCSIFFLAGS reads `req`, which lives for the call.
    if unsafe { libc::ioctl(raw, libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(InitError::Loopback(io::Error::last_os_error()));
    }
    Ok(())
}
