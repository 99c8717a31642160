//! The resource layer: what a pod's VM is given, built before it boots (virtio-mmio has no
//! hotplug, so every device must be there at start) and filled while it runs.
//!
//! Shared filesystems: each pod has two virtio-fs shares (see [`share`] for how a share keeps
//! the guest to exactly what it was given):
//! - the **image share** (tag [`SHARED_FS_TAG`]): the unpacked, immutable image trees its
//!   containers use, served read-only with `--cache=always`;
//! - the **volume share** (tag [`VOLUME_FS_TAG`]): the host paths its containers mount, served
//!   writable with `--cache=auto` so host-side updates (configMaps) reach the guest; a
//!   read-only volume is a read-only bind inside it.
//!
//! Pods started before the split (record schema 0) keep their single read-only share, which
//! holds their volumes under `volumes/`: [`ShareLayout::Single`].
//!
//! Network devices and drives have their seams here ([`PodResources::net_devices`],
//! [`PodResources::block_devices`]); the networking and volumes work fills them.

pub mod network;
pub mod share;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::agent::{GuestShare, GUEST_SHARED_DIR, GUEST_VOLUME_DIR, SHARED_FS_TAG, VOLUME_FS_TAG};
use crate::hypervisor::{BlockDevice, IdTranslations, NetDevice, SharedDir};
use share::SandboxShare;
pub use share::{Access, BindMode, ShareError};

/// How a pod's shares are laid out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShareLayout {
    /// One read-only share holding `images/` and `volumes/` (pods of record schema 0).
    Single,
    /// A read-only image share and a writable volume share.
    #[default]
    Split,
}

/// A volume bound into a pod's share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundVolume {
    /// Where the guest sees it.
    pub guest_path: PathBuf,
    /// Where it is bound, relative to its share.
    pub share_rel: String,
}

/// The resources of one pod.
#[derive(Debug, Clone)]
pub struct PodResources {
    layout: ShareLayout,
    images: SandboxShare,
    volumes: SandboxShare,
}

impl PodResources {
    /// The resources of the pod whose runtime state lives in `sandbox_state_dir`.
    pub fn new(sandbox_state_dir: &Path, layout: ShareLayout) -> Self {
        Self {
            layout,
            images: SandboxShare::new(&sandbox_state_dir.join("share")),
            volumes: SandboxShare::new(&sandbox_state_dir.join("volumes")),
        }
    }

    /// Sets up the shares' directories and mounts. Idempotent.
    pub fn create(&self) -> Result<(), ShareError> {
        self.images.create()?;
        if self.layout == ShareLayout::Split {
            self.volumes.create()?;
        }
        Ok(())
    }

    /// The virtio-fs devices the VM gets; `ids` translates the owners of both shares' files
    /// (a pod with a user namespace).
    pub fn shared_dirs(&self, ids: &IdTranslations) -> Vec<SharedDir> {
        match self.layout {
            ShareLayout::Single => vec![SharedDir {
                tag: SHARED_FS_TAG.into(),
                host_path: self.images.shared_dir(),
                read_only: true,
                cache: "auto".into(),
                ids: ids.clone(),
            }],
            ShareLayout::Split => vec![
                SharedDir {
                    tag: SHARED_FS_TAG.into(),
                    host_path: self.images.shared_dir(),
                    read_only: true,
                    cache: "always".into(),
                    ids: ids.clone(),
                },
                SharedDir {
                    tag: VOLUME_FS_TAG.into(),
                    host_path: self.volumes.shared_dir(),
                    read_only: false,
                    cache: "auto".into(),
                    ids: ids.clone(),
                },
            ],
        }
    }

    /// Where the guest mounts the shares.
    pub fn guest_shares(&self) -> Vec<GuestShare> {
        let image = GuestShare {
            tag: SHARED_FS_TAG.into(),
            guest_path: GUEST_SHARED_DIR.into(),
            read_only: true,
        };
        match self.layout {
            ShareLayout::Single => vec![image],
            ShareLayout::Split => vec![
                image,
                GuestShare {
                    tag: VOLUME_FS_TAG.into(),
                    guest_path: GUEST_VOLUME_DIR.into(),
                    read_only: false,
                },
            ],
        }
    }

    /// The VM's network devices (none until CNI networking).
    pub fn net_devices(&self) -> Vec<NetDevice> {
        Vec::new()
    }

    /// The VM's drives (none until block volumes).
    pub fn block_devices(&self) -> Vec<BlockDevice> {
        Vec::new()
    }

    /// Makes an image tree visible to the guest; returns it as a root filesystem lower
    /// directory (relative to the image share).
    pub fn bind_image(&self, image_id: &str, rootfs: &Path) -> Result<String, ShareError> {
        let hex = image_id.trim_start_matches("sha256:");
        let mut rel = format!("images/{hex}");
        if self.images.holds_other_than(&rel, rootfs) {
            // The image was removed and pulled again while the pod ran: the guest may cache
            // the old path (virtio-fs `cache=always`), so the new tree gets a path of its own.
            use std::os::unix::fs::MetadataExt;
            let ino = std::fs::metadata(rootfs).map(|m| m.ino()).unwrap_or_default();
            rel = format!("images/{hex}.{ino}");
        }
        self.images.bind(rootfs, &rel, true)?;
        Ok(rel)
    }

    /// Makes volume `index` of container `container_id` visible to the guest; returns its
    /// guest path. Read-only volumes are read-only binds.
    pub fn bind_volume(
        &self,
        container_id: &str,
        index: usize,
        host_path: &Path,
        mode: BindMode,
    ) -> Result<BoundVolume, ShareError> {
        let name = if mode.receive_host_mounts {
            // One guest directory per host path and mode for the whole pod, so the mounts a
            // container propagates (rshared) reach the pod's other containers of that volume.
            // It stays bound until the pod's share goes.
            pod_volume_name(host_path, mode)
        } else {
            format!("{container_id}/{index}")
        };
        let (share, rel, guest_root) = match self.layout {
            ShareLayout::Single => (&self.images, format!("volumes/{name}"), GUEST_SHARED_DIR),
            ShareLayout::Split => (&self.volumes, name, GUEST_VOLUME_DIR),
        };
        let bound = share.bind_with(host_path, &rel, mode)?;
        Ok(BoundVolume { guest_path: Path::new(guest_root).join(bound), share_rel: rel })
    }

    /// Takes a container's volumes away from the guest.
    pub fn release_volumes(&self, container_id: &str) -> Result<(), ShareError> {
        match self.layout {
            ShareLayout::Single => self.images.unbind(&format!("volumes/{container_id}")),
            ShareLayout::Split => self.volumes.unbind(container_id),
        }
    }

    /// Unmounts and removes everything. Safe to call again.
    pub fn destroy(&self) -> Result<(), ShareError> {
        self.images.destroy()?;
        self.volumes.destroy()
    }

    /// Unmounts everything below a pod's state directory, whatever its layout, and removes
    /// it: what a daemon killed during RemovePodSandbox left of a pod no record names.
    pub fn sweep(sandbox_state_dir: &Path) -> Result<(), ShareError> {
        SandboxShare::new(sandbox_state_dir).destroy()
    }
}

/// `pod/<hash>`: the share name of a propagating volume, the same for every container of the
/// pod that mounts `host_path` in `mode`.
fn pod_volume_name(host_path: &Path, mode: BindMode) -> String {
    use std::hash::{Hash, Hasher};
    // DefaultHasher::new() has fixed keys: the name is stable across daemon restarts.
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    host_path.hash(&mut hasher);
    (mode.access as u8).hash(&mut hasher);
    format!("pod/{:016x}", hasher.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_layout_serves_images_read_only_cached_and_volumes_writable() {
        let dir = tempfile::tempdir().unwrap();
        let res = PodResources::new(dir.path(), ShareLayout::Split);
        let dirs = res.shared_dirs(&IdTranslations::default());
        assert_eq!(dirs.len(), 2);
        assert!(dirs[0].read_only && dirs[0].cache == "always" && dirs[0].tag == SHARED_FS_TAG);
        assert!(!dirs[1].read_only && dirs[1].cache == "auto" && dirs[1].tag == VOLUME_FS_TAG);
        let guest = res.guest_shares();
        assert_eq!(guest[1].guest_path, GUEST_VOLUME_DIR);
        assert!(!guest[1].read_only);
    }

    #[test]
    fn single_layout_keeps_the_pre_split_share() {
        let dir = tempfile::tempdir().unwrap();
        let res = PodResources::new(dir.path(), ShareLayout::Single);
        let dirs = res.shared_dirs(&IdTranslations::default());
        assert_eq!(dirs.len(), 1);
        assert!(dirs[0].read_only && dirs[0].cache == "auto");
        assert_eq!(res.guest_shares().len(), 1);
        assert!(dirs[0].host_path.ends_with("share/shared"));
    }
}
