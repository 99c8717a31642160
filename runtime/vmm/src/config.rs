//! The VMM's configuration: one JSON file given with `--config`, written by the daemon's
//! built-in backend (`runtime/src/hypervisor/builtin.rs`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::arch::mptable;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading the VMM config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("parsing the VMM config {path}: {source}")]
    Parse { path: PathBuf, source: serde_json::Error },
    #[error("vcpus must be 1..={max}, got {got}")]
    Vcpus { got: u8, max: u8 },
    #[error("memory_mib must be {min}..={max}, got {got}")]
    Memory { got: u32, min: u32, max: u32 },
    #[error("{0} virtio devices configured, at most {max} fit", max = crate::layout::MMIO_DEVICES_MAX)]
    TooManyDevices(usize),
    #[error("duplicate device id {0:?}")]
    DuplicateId(String),
    #[error("tap fd {0} is a standard stream or given twice")]
    BadTapFd(i32),
}

/// Smallest VM: the boot structures, a kernel and an initramfs need a few MiB.
pub const MIN_MEMORY_MIB: u32 = 16;
/// Largest VM (64 GiB).
pub const MAX_MEMORY_MIB: u32 = 64 * 1024;

/// What happens when a VMM thread makes a syscall outside its seccomp allowlist.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SeccompMode {
    /// Kill the process after printing the syscall number to stderr (SIGSYS handler).
    #[default]
    Trap,
    /// Kill the process at once.
    Kill,
    /// Let the syscall through and have the kernel log it (audit): for finding missing rules.
    Log,
    /// No filters (tests running the VMM inside the test process).
    Off,
}

/// virtio-vsock with the hybrid unix-socket muxer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VsockConfig {
    pub guest_cid: u32,
    /// Host side: connect + `CONNECT <port>\n`; guest-initiated connections go to
    /// `<uds>_<port>`.
    pub uds: PathBuf,
}

/// virtio-blk on a raw file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DriveConfig {
    pub id: String,
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
}

/// virtio-net on a host tap interface.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NetConfig {
    pub id: String,
    /// The tap's name: opened by the VMM when `tap_fd` is not given.
    pub tap: String,
    pub mac: String,
    /// An open tap inherited from the process that started the VMM (the daemon opens pods'
    /// taps in their network namespaces, so the VMM needs neither CAP_NET_ADMIN nor the netns).
    #[serde(default)]
    pub tap_fd: Option<i32>,
}

/// virtio-fs: a share served by the process listening on `socket`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FsConfig {
    pub tag: String,
    pub socket: PathBuf,
    #[serde(default)]
    pub kind: FsKind,
}

/// Who serves a virtio-fs device's rings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FsKind {
    /// virtiofsd over vhost-user: it maps guest memory itself, so the VM cannot be restored
    /// from a snapshot (its memory is then a private mapping).
    #[default]
    VhostUser,
    /// The VMM's own device, FUSE requests forwarded to a `podvisor fs-serve` on `socket`.
    Inproc,
}

/// One VM.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmmConfig {
    pub vcpus: u8,
    pub memory_mib: u32,
    /// Uncompressed ELF kernel (vmlinux).
    pub kernel: PathBuf,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Appended to the VMM's own kernel arguments.
    #[serde(default)]
    pub cmdline: String,
    /// The serial console is appended here.
    pub console_log: PathBuf,
    /// The console log's cap: past it, only its newest half is kept (see [`crate::console`]).
    #[serde(default = "default_console_log_max_bytes")]
    pub console_log_max_bytes: u64,
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    #[serde(default)]
    pub drives: Vec<DriveConfig>,
    #[serde(default)]
    pub nets: Vec<NetConfig>,
    #[serde(default)]
    pub fs: Vec<FsConfig>,
    #[serde(default)]
    pub seccomp: SeccompMode,
}

fn default_console_log_max_bytes() -> u64 {
    crate::console::DEFAULT_MAX_BYTES
}

impl VmmConfig {
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        let config: VmmConfig = serde_json::from_str(&text)
            .map_err(|source| ConfigError::Parse { path: path.to_path_buf(), source })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the limits the boot code relies on.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vcpus == 0 || self.vcpus > mptable::MAX_VCPUS {
            return Err(ConfigError::Vcpus { got: self.vcpus, max: mptable::MAX_VCPUS });
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(ConfigError::Memory {
                got: self.memory_mib,
                min: MIN_MEMORY_MIB,
                max: MAX_MEMORY_MIB,
            });
        }
        let devices =
            usize::from(self.vsock.is_some()) + self.drives.len() + self.nets.len() + self.fs.len();
        if devices as u64 > crate::layout::MMIO_DEVICES_MAX {
            return Err(ConfigError::TooManyDevices(devices));
        }
        let mut ids = std::collections::HashSet::new();
        let all_ids = self
            .drives
            .iter()
            .map(|d| &d.id)
            .chain(self.nets.iter().map(|n| &n.id))
            .chain(self.fs.iter().map(|f| &f.tag));
        for id in all_ids {
            if !ids.insert(id) {
                return Err(ConfigError::DuplicateId(id.clone()));
            }
        }
        let mut fds = std::collections::HashSet::new();
        for fd in self.nets.iter().filter_map(|n| n.tap_fd) {
            if fd < 3 || !fds.insert(fd) {
                return Err(ConfigError::BadTapFd(fd));
            }
        }
        Ok(())
    }

    pub fn memory_bytes(&self) -> u64 {
        u64::from(self.memory_mib) << 20
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal() -> VmmConfig {
        serde_json::from_str(
            r#"{"vcpus":1,"memory_mib":128,"kernel":"/k","console_log":"/tmp/c.log"}"#,
        )
        .unwrap()
    }

    #[test]
    fn minimal_config_parses_with_defaults() {
        let c = minimal();
        assert_eq!(c.seccomp, SeccompMode::Trap);
        assert_eq!(c.console_log_max_bytes, crate::console::DEFAULT_MAX_BYTES);
        assert!(c.initrd.is_none() && c.vsock.is_none() && c.drives.is_empty());
        c.validate().unwrap();
        assert_eq!(c.memory_bytes(), 128 << 20);
    }

    #[test]
    fn limits_are_enforced() {
        let mut c = minimal();
        c.vcpus = 0;
        assert!(matches!(c.validate(), Err(ConfigError::Vcpus { .. })));
        c.vcpus = 33;
        assert!(c.validate().is_err());
        c.vcpus = 1;
        c.memory_mib = 1;
        assert!(matches!(c.validate(), Err(ConfigError::Memory { .. })));
        c.memory_mib = 128;
        let drive = DriveConfig { id: "a".into(), path: "/x".into(), read_only: false };
        c.drives = vec![drive.clone(), drive];
        assert!(matches!(c.validate(), Err(ConfigError::DuplicateId(_))));
        c.drives.clear();
        let net = |id: &str, fd| NetConfig {
            id: id.into(),
            tap: "t".into(),
            mac: "m".into(),
            tap_fd: fd,
        };
        c.nets = vec![net("a", Some(7)), net("b", Some(7))];
        assert!(matches!(c.validate(), Err(ConfigError::BadTapFd(7))));
        c.nets = vec![net("a", Some(1))];
        assert!(matches!(c.validate(), Err(ConfigError::BadTapFd(1))));
        c.nets = vec![net("a", Some(7)), net("b", None)];
        c.validate().unwrap();
        assert!(serde_json::from_str::<VmmConfig>(r#"{"vcpus":1}"#).is_err());
    }
}
