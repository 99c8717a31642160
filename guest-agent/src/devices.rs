//! The guest's device nodes, for privileged containers: they get every device of the VM
//! (the host's /dev is not in the VM, so they can never get the host's).

use std::fs::Metadata;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use oci_spec::runtime::{
    LinuxDevice, LinuxDeviceBuilder, LinuxDeviceCgroupBuilder, LinuxDeviceType,
};

/// Entries of /dev the container's runtime sets up itself (mounts, the console, ptmx).
const SET_UP_BY_THE_RUNTIME: &[&str] = &["pts", "shm", "mqueue", "console", "ptmx"];
/// How deep under /dev devices are looked for (/dev/input/event0 is one level down).
const MAX_DEPTH: usize = 3;
/// More nodes than any micro-VM has: a bound on the walk.
const MAX_DEVICES: usize = 4096;

/// Every character and block device under `dev`, as OCI devices at the same paths.
pub fn guest_devices(dev: &Path) -> Vec<LinuxDevice> {
    let mut found = Vec::new();
    collect(dev, Path::new("/dev"), 0, &mut found);
    found
}

fn collect(dir: &Path, container_dir: &Path, depth: usize, found: &mut Vec<LinuxDevice>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        if found.len() >= MAX_DEVICES {
            return;
        }
        let name = entry.file_name();
        if depth == 0 && SET_UP_BY_THE_RUNTIME.iter().any(|s| name == *s) {
            continue;
        }
        // symlink_metadata: links (/dev/fd, /dev/stdin) are not devices and are not followed.
        let Ok(metadata) = entry.path().symlink_metadata() else { continue };
        let container_path = container_dir.join(&name);
        if metadata.is_dir() && depth + 1 < MAX_DEPTH {
            collect(&entry.path(), &container_path, depth + 1, found);
        } else if let Some(device) = device_of(container_path, &metadata) {
            found.push(device);
        }
    }
}

/// The guest's device node at `guest_path` (under /dev, not a symlink), as an OCI device at
/// `container_path`.
pub fn named_device(guest_path: &Path, container_path: &Path) -> Option<LinuxDevice> {
    let under_dev = guest_path.starts_with("/dev/")
        && guest_path.components().all(|c| !matches!(c, std::path::Component::ParentDir));
    if !under_dev {
        return None;
    }
    let metadata = guest_path.symlink_metadata().ok()?;
    device_of(container_path.to_path_buf(), &metadata)
}

fn device_of(path: PathBuf, metadata: &Metadata) -> Option<LinuxDevice> {
    let typ = if metadata.file_type().is_char_device() {
        LinuxDeviceType::C
    } else if metadata.file_type().is_block_device() {
        LinuxDeviceType::B
    } else {
        return None;
    };
    let rdev = metadata.rdev();
    LinuxDeviceBuilder::default()
        .path(path)
        .typ(typ)
        .major(i64::from(libc::major(rdev)))
        .minor(i64::from(libc::minor(rdev)))
        .file_mode(metadata.mode() & 0o7777)
        .uid(metadata.uid())
        .gid(metadata.gid())
        .build()
        .ok()
}

/// Adds device cgroup rules for the container: all devices for a privileged one (whatever
/// the spec's resources say: it has all of the VM), else an allow rule per named device with
/// its CRI permissions (a subset of "rwm", checked by the daemon).
pub fn allow_in_cgroup(
    linux: &mut oci_spec::runtime::Linux,
    named: &[(LinuxDevice, String)],
    privileged: bool,
) {
    let mut resources = linux.resources().clone().unwrap_or_default();
    let mut rules = resources.devices().clone().unwrap_or_default();
    let rule = |typ, major, minor, access: &str| {
        LinuxDeviceCgroupBuilder::default()
            .allow(true)
            .typ(typ)
            .major(major)
            .minor(minor)
            .access(access)
            .build()
            .ok()
    };
    if privileged {
        rules.extend(LinuxDeviceCgroupBuilder::default().allow(true).access("rwm").build().ok());
    }
    for (node, permissions) in named {
        rules.extend(rule(node.typ(), node.major(), node.minor(), permissions));
    }
    resources.set_devices(Some(rules));
    linux.set_resources(Some(resources));
}

/// Adds `devices` to the spec's, keeping the spec's own at the same path.
pub fn add_devices(linux: &mut oci_spec::runtime::Linux, devices: Vec<LinuxDevice>) {
    let mut all = linux.devices().clone().unwrap_or_default();
    for device in devices {
        if !all.iter().any(|d| d.path() == device.path()) {
            all.push(device);
        }
    }
    linux.set_devices(Some(all));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_devices_are_device_nodes_under_dev_only() {
        let null = named_device(Path::new("/dev/null"), Path::new("/dev/mine")).unwrap();
        assert_eq!(
            (null.path().as_path(), null.major(), null.minor()),
            (Path::new("/dev/mine"), 1, 3)
        );
        for not_a_device in ["/etc/passwd", "/dev/../dev/null", "/dev", "/dev/no-such-device"] {
            assert!(named_device(Path::new(not_a_device), Path::new("/dev/x")).is_none());
        }
    }

    /// The host's /dev stands in for the guest's: its null device is found at /dev/null,
    /// what the runtime sets up itself and symlinks are not.
    #[test]
    fn devices_are_found_by_type_and_skipped_by_name() {
        let devices = guest_devices(Path::new("/dev"));
        let null = devices.iter().find(|d| d.path() == Path::new("/dev/null")).unwrap();
        assert_eq!((null.typ(), null.major(), null.minor()), (LinuxDeviceType::C, 1, 3));
        for skipped in ["/dev/console", "/dev/ptmx", "/dev/stdin", "/dev/fd"] {
            assert!(!devices.iter().any(|d| d.path() == Path::new(skipped)), "{skipped}");
        }
        assert!(!devices.iter().any(|d| d.path().starts_with("/dev/pts")));
        assert!(guest_devices(Path::new("/nonexistent")).is_empty());
    }

    #[test]
    fn the_specs_own_devices_win() {
        let mut linux = oci_spec::runtime::Linux::default();
        let own = LinuxDeviceBuilder::default()
            .path("/dev/null")
            .typ(LinuxDeviceType::C)
            .major(1)
            .minor(3)
            .file_mode(0o600u32)
            .build()
            .unwrap();
        linux.set_devices(Some(vec![own.clone()]));
        add_devices(&mut linux, guest_devices(Path::new("/dev")));
        let devices = linux.devices().clone().unwrap();
        let nulls: Vec<_> = devices.iter().filter(|d| d.path() == Path::new("/dev/null")).collect();
        assert_eq!(nulls, vec![&own]);
        assert!(devices.len() > 1);
    }
}
