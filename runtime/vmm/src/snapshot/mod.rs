//! Snapshot and restore of a whole VM, the foundation of VM templates.
//!
//! A snapshot is a directory with two files:
//! - `memory.bin`: guest RAM, regions back to back, all-zero pages left as holes. A restored
//!   VM maps it `MAP_PRIVATE` ([`crate::memory::map_snapshot_private`]): every VM restored
//!   from one snapshot shares its page cache, and a page a VM writes becomes its own copy.
//! - `vm.state`: everything else ([`SnapshotState`]) in the checked [`format`] (magic,
//!   version, length, CRC-32). It is written last, so a snapshot without a valid state file
//!   is incomplete and refused.
//!
//! The traits follow Cloud Hypervisor's `vm-migration` ([`Pausable`]) and Firecracker's
//! per-device `persist.rs` ([`Snapshottable`]: the state a device keeps across a restore).

pub mod format;
pub mod kvm_state;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use kvm_ioctls::{VcpuFd, VmFd};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use vm_memory::GuestMemoryBackend;

use crate::devices::{MmioTransport, TransportState};
use crate::legacy::{SerialDevice, SerialSnapshot};
use crate::memory::{self, GuestMemory};
use kvm_state::{KvmStateError, VcpuState, VmState};

/// Guest memory file inside a snapshot directory.
pub const MEMORY_FILE: &str = "memory.bin";
/// State file inside a snapshot directory.
pub const STATE_FILE: &str = "vm.state";

/// Something that can stop running and run again without losing state.
pub trait Pausable {
    type Error;
    fn pause(&self) -> Result<(), Self::Error>;
    fn resume(&self) -> Result<(), Self::Error>;
}

/// State that is saved into a snapshot and put back into a freshly built instance (which
/// brings its own host resources: eventfds, files, sockets).
pub trait Snapshottable {
    type State: Serialize + DeserializeOwned;
    type Error;
    fn save_state(&self) -> Result<Self::State, Self::Error>;
    fn restore_state(&mut self, state: &Self::State) -> Result<(), Self::Error>;
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("the VM must be paused to be snapshotted (it is {0})")]
    NotPaused(&'static str),
    #[error("the VM has not started; there is nothing to snapshot")]
    NotStarted,
    #[error("creating the snapshot directory {path}: {source}")]
    CreateDir { path: PathBuf, source: std::io::Error },
    #[error("the snapshot directory {0} already holds a snapshot; snapshots are not overwritten")]
    Exists(PathBuf),
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    #[error(transparent)]
    Kvm(#[from] KvmStateError),
    #[error(transparent)]
    Format(#[from] format::FormatError),
    #[error("serial device: {0}")]
    Serial(#[from] crate::legacy::LegacyError),
    #[error("virtio device {index}: {source}")]
    Virtio { index: usize, source: crate::devices::virtio::TransportError },
    #[error("the snapshot was taken with {snapshot}, this VM is configured with {config}")]
    Mismatch { snapshot: String, config: String },
    #[error(
        "the memory file {path} is corrupt: CRC-32 {found:#010x}, the snapshot says \
         {expected:#010x}"
    )]
    MemoryChecksum { path: PathBuf, expected: u32, found: u32 },
    #[error(
        "virtio-fs over vhost-user cannot be restored: the backend would map the snapshot file \
         shared, not the VM's private copy-on-write memory"
    )]
    VhostUserFs,
}

/// Everything of a VM but its memory.
#[derive(Serialize, Deserialize)]
pub struct SnapshotState {
    pub memory_bytes: u64,
    /// CRC-32 of the memory file ([`verify_memory`]).
    pub memory_crc32: u32,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub serial: SerialSnapshot,
    /// Virtio devices in bus order; a restore needs the same device types in the same order.
    pub virtio: Vec<TransportState>,
    /// MSRs KVM listed but could not read on the snapshot's host (left at their reset value).
    pub skipped_msrs: Vec<u32>,
}

impl SnapshotState {
    /// Checks that a VM built from `vcpus`, `memory_bytes` and devices of `virtio_types` can
    /// take this state.
    pub fn check_matches(
        &self,
        vcpus: usize,
        memory_bytes: u64,
        virtio_types: &[u32],
    ) -> Result<(), SnapshotError> {
        let saved_types: Vec<u32> = self.virtio.iter().map(|t| t.device_type).collect();
        let describe = |vcpus: usize, bytes: u64, types: &[u32]| {
            format!("{vcpus} vCPUs, {} MiB, virtio device types {types:?}", bytes >> 20)
        };
        if self.vcpus.len() != vcpus
            || self.memory_bytes != memory_bytes
            || saved_types != virtio_types
        {
            return Err(SnapshotError::Mismatch {
                snapshot: describe(self.vcpus.len(), self.memory_bytes, &saved_types),
                config: describe(vcpus, memory_bytes, virtio_types),
            });
        }
        Ok(())
    }
}

/// What a snapshot wrote (for the control socket's answer and logs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotSummary {
    pub memory_bytes: u64,
    /// Disk blocks the memory file takes (its holes take none).
    pub memory_file_allocated_bytes: u64,
    pub skipped_msrs: Vec<u32>,
}

/// The parts of a running VM a snapshot reads; registered with the run control when the
/// vCPUs start.
pub struct SnapshotSource {
    pub vm: Arc<VmFd>,
    pub vcpus: Vec<Arc<Mutex<VcpuFd>>>,
    pub msr_indices: Vec<u32>,
    pub mem: GuestMemory,
    pub serial: Arc<Mutex<SerialDevice>>,
    pub virtio: Vec<Arc<Mutex<MmioTransport>>>,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SnapshotSource {
    /// Writes the snapshot of the (paused) VM into `dir`, which must not hold one yet.
    pub fn write(&self, dir: &Path) -> Result<SnapshotSummary, SnapshotError> {
        let state_path = dir.join(STATE_FILE);
        if state_path.exists() {
            return Err(SnapshotError::Exists(dir.to_path_buf()));
        }
        std::fs::create_dir_all(dir)
            .map_err(|source| SnapshotError::CreateDir { path: dir.to_path_buf(), source })?;
        let memory_path = dir.join(MEMORY_FILE);
        let saved = memory::save_to_file(&self.mem, &memory_path)?;
        let state = SnapshotState { memory_crc32: saved.crc32, ..self.collect()? };
        format::write_file(&state, &state_path)?;
        use std::os::unix::fs::MetadataExt;
        let allocated = std::fs::metadata(&memory_path).map(|m| m.blocks() * 512).unwrap_or(0);
        Ok(SnapshotSummary {
            memory_bytes: saved.len,
            memory_file_allocated_bytes: allocated,
            skipped_msrs: state.skipped_msrs,
        })
    }

    fn collect(&self) -> Result<SnapshotState, SnapshotError> {
        let mut vcpus = Vec::new();
        let mut skipped_msrs = Vec::new();
        for (id, fd) in self.vcpus.iter().enumerate() {
            let (state, skipped) = kvm_state::save_vcpu(&lock(fd), id as u8, &self.msr_indices)?;
            vcpus.push(state);
            skipped_msrs = skipped;
        }
        let virtio = self
            .virtio
            .iter()
            .enumerate()
            .map(|(index, t)| {
                lock(t).save_state().map_err(|source| SnapshotError::Virtio { index, source })
            })
            .collect::<Result<_, _>>()?;
        Ok(SnapshotState {
            memory_bytes: self.mem.iter().map(vm_memory::GuestMemoryRegion::len).sum(),
            memory_crc32: 0,
            vm: kvm_state::save_vm(&self.vm)?,
            vcpus,
            serial: lock(&self.serial).save_state()?,
            virtio,
            skipped_msrs,
        })
    }
}

/// Reads and checks the state file of the snapshot in `dir`.
pub fn read_state(dir: &Path) -> Result<SnapshotState, SnapshotError> {
    Ok(format::read_file(&dir.join(STATE_FILE))?)
}

/// Reads the memory file of the snapshot in `dir` through and checks it against `state`
/// (length and CRC-32). A restore only checks the length (reading all of guest RAM would
/// cost more than the restore itself); this is the full check for when a template is
/// adopted (built, or found on disk after a daemon restart).
pub fn verify_memory(dir: &Path, state: &SnapshotState) -> Result<(), SnapshotError> {
    let path = dir.join(MEMORY_FILE);
    let (len, crc) = memory::file_crc32(&path)?;
    if len != state.memory_bytes {
        return Err(memory::MemoryError::SnapshotSize {
            path,
            expected: state.memory_bytes,
            found: len,
        }
        .into());
    }
    if crc != state.memory_crc32 {
        return Err(SnapshotError::MemoryChecksum {
            path,
            expected: state.memory_crc32,
            found: crc,
        });
    }
    Ok(())
}
