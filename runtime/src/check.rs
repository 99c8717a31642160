//! `podvisor check`: what this host can do, and which VM backend the daemon will pick.
//!
//! The built-in VMM needs KVM that can run a Linux guest, i.e. hardware virtualization
//! (VMX/SVM); nested PVM (`/sys/module/kvm_pvm`) exposes /dev/kvm but cannot boot Linux. The
//! QEMU backend works everywhere (TCG without KVM) but needs `qemu-system-x86_64`, virtiofsd and
//! vhost-device-vsock. Pod networking needs the CNI plugins.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde::Serialize;

/// Facts about the host, as found by [`HostCapabilities::detect`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostCapabilities {
    /// /dev/kvm opens read-write.
    pub kvm_present: bool,
    pub kvm_api_version: Option<i32>,
    /// `vmx` or `svm` from /proc/cpuinfo.
    pub hardware_virt: Option<String>,
    /// KVM is nested PVM (`/sys/module/kvm_pvm`).
    pub nested_pvm: bool,
    /// The built-in VMM can boot a Linux guest here.
    pub kvm_can_boot_linux: bool,
    /// Why it cannot (empty when it can).
    pub kvm_reason: String,
    /// /dev/vhost-vsock exists (kernel vhost-vsock; not needed by either backend's hybrid vsock).
    pub vhost_vsock_device: bool,
    pub qemu: Option<PathBuf>,
    pub virtiofsd: Option<PathBuf>,
    pub vhost_device_vsock: Option<PathBuf>,
    /// The directory holding the CNI plugins (`bridge` among them).
    pub cni_plugins: Option<PathBuf>,
}

/// Where CNI plugins are usually installed (upstream tarball, Debian package).
const CNI_DIRS: &[&str] = &["/opt/cni/bin", "/usr/lib/cni", "/usr/libexec/cni"];

pub fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Finds `name` in `PATH`, then in `$HOME/.cargo/bin` (where `cargo install` puts helpers).
/// A daemon running as root takes only a binary [`only_root_can_replace`]: `HOME` and `PATH`
/// may lead into a user's directories (`sudo` keeps `HOME`), and whatever is found there would
/// run as root.
pub fn find_binary(name: impl AsRef<Path>) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(Path::new(&home).join(".cargo/bin"));
    }
    let as_root = nix::unistd::geteuid().is_root();
    find_in(&dirs, name.as_ref(), |path| !as_root || only_root_can_replace(path))
}

/// The first executable `name` in `dirs` that `trusted` accepts; the others are logged.
fn find_in(dirs: &[PathBuf], name: &Path, trusted: impl Fn(&Path) -> bool) -> Option<PathBuf> {
    dirs.iter().map(|d| d.join(name)).filter(|p| is_executable(p)).find(|p| {
        let ok = trusted(p);
        if !ok {
            tracing::warn!(
                path = %p.display(),
                "ignoring a binary a user other than root could have put there or replace"
            );
        }
        ok
    })
}

/// Whether only root can have put the file at `path` there or replace it: `path` is absolute,
/// and the file it resolves to and every directory on the way, to it and to `path` itself
/// (which may be a symlink), are owned by root and writable by no group or other user.
pub fn only_root_can_replace(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let root_only =
        |p: &Path| std::fs::metadata(p).is_ok_and(|m| m.uid() == 0 && m.mode() & 0o022 == 0);
    if !path.is_absolute() {
        return false;
    }
    let Ok(target) = std::fs::canonicalize(path) else { return false };
    path.ancestors().skip(1).all(root_only) && target.ancestors().all(root_only)
}

impl HostCapabilities {
    /// Probes this host (cheap: a few file reads and KVM ioctls).
    pub fn detect() -> Self {
        let kvm = podvisor_vmm::host::probe();
        Self {
            kvm_present: kvm.present,
            kvm_api_version: kvm.api_version,
            hardware_virt: kvm.hardware_virt,
            nested_pvm: kvm.nested_pvm,
            kvm_can_boot_linux: kvm.can_boot_linux,
            kvm_reason: kvm.reason,
            vhost_vsock_device: Path::new("/dev/vhost-vsock").exists(),
            qemu: find_binary("qemu-system-x86_64"),
            virtiofsd: find_binary("virtiofsd"),
            vhost_device_vsock: find_binary("vhost-device-vsock"),
            cni_plugins: CNI_DIRS
                .iter()
                .map(PathBuf::from)
                .find(|d| is_executable(&d.join("bridge"))),
        }
    }

    /// Whether the QEMU backend has every binary it needs.
    pub fn qemu_usable(&self) -> bool {
        self.qemu.is_some() && self.virtiofsd.is_some() && self.vhost_device_vsock.is_some()
    }

    /// The backend the daemon picks by default (`builtin` or `qemu`; `None` if neither can
    /// run), and why.
    pub fn default_backend(&self) -> (Option<&'static str>, String) {
        if self.kvm_can_boot_linux {
            return (Some("builtin"), "KVM with hardware virtualization: built-in VMM".into());
        }
        if self.qemu_usable() {
            return (
                Some("qemu"),
                format!("built-in VMM unavailable ({}): QEMU backend", self.kvm_reason),
            );
        }
        (
            None,
            format!(
                "built-in VMM unavailable ({}) and QEMU backend incomplete (needs \
                 qemu-system-x86_64, virtiofsd, vhost-device-vsock)",
                self.kvm_reason
            ),
        )
    }

    /// The human-readable report of `podvisor check`.
    pub fn report(&self) -> String {
        let yes_no = |b: bool| if b { "yes" } else { "no" };
        let found = |p: &Option<PathBuf>| match p {
            Some(p) => format!("yes ({})", p.display()),
            None => "no".into(),
        };
        let mut lines = vec![
            format!(
                "KVM (/dev/kvm):              {}{}",
                yes_no(self.kvm_present),
                self.kvm_api_version.map(|v| format!(" (API {v})")).unwrap_or_default()
            ),
            format!(
                "hardware virtualization:     {}",
                self.hardware_virt.as_deref().unwrap_or("no (no vmx/svm flag)")
            ),
            format!("nested PVM (kvm_pvm):        {}", yes_no(self.nested_pvm)),
            format!(
                "KVM can boot a Linux guest:  {}{}",
                yes_no(self.kvm_can_boot_linux),
                if self.kvm_reason.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", self.kvm_reason)
                }
            ),
            format!("/dev/vhost-vsock:            {}", yes_no(self.vhost_vsock_device)),
            format!("qemu-system-x86_64:          {}", found(&self.qemu)),
            format!("virtiofsd:                   {}", found(&self.virtiofsd)),
            format!("vhost-device-vsock:          {}", found(&self.vhost_device_vsock)),
            format!("CNI plugins:                 {}", found(&self.cni_plugins)),
        ];
        let (backend, why) = self.default_backend();
        lines.push(format!("default VM backend:          {} — {why}", backend.unwrap_or("none")));
        lines.join("\n")
    }
}

/// `podvisor check`: prints the report; exits 0 when some backend can run pods, 1 otherwise.
pub fn run() -> ExitCode {
    let caps = HostCapabilities::detect();
    println!("{}", caps.report());
    match caps.default_backend().0 {
        Some(_) => ExitCode::SUCCESS,
        None => ExitCode::FAILURE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A root daemon skips helpers in directories a user owns or anyone may write, and links
    /// to them, and takes the next one only root could have put there.
    #[test]
    fn a_root_daemon_takes_only_binaries_only_root_can_replace() {
        use std::os::unix::fs::{symlink, PermissionsExt};
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to give files away");
            return;
        }
        // Built in a directory only root can write to, or the test proves nothing.
        let Some(base) = [env!("CARGO_MANIFEST_DIR"), "/run"]
            .into_iter()
            .map(Path::new)
            .find(|d| only_root_can_replace(d))
        else {
            eprintln!("skipped: no directory only root can write to");
            return;
        };
        let dir = tempfile::tempdir_in(base).unwrap();
        let bin = |name: &str| {
            let d = dir.path().join(name);
            std::fs::create_dir(&d).unwrap();
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
            let helper = d.join("helper");
            std::fs::write(&helper, b"#!/bin/sh\n").unwrap();
            std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
            d
        };
        let (user, open, owned_file, good) = (bin("user"), bin("open"), bin("file"), bin("good"));
        nix::unistd::chown(&user, Some(65534.into()), None).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        nix::unistd::chown(&owned_file.join("helper"), Some(65534.into()), None).unwrap();
        let linked = bin("linked");
        std::fs::remove_file(linked.join("helper")).unwrap();
        symlink(user.join("helper"), linked.join("helper")).unwrap();

        assert!(only_root_can_replace(&good.join("helper")));
        for d in [&user, &open, &owned_file, &linked] {
            assert!(!only_root_can_replace(&d.join("helper")), "{}", d.display());
        }
        assert!(!only_root_can_replace(Path::new("bin/helper")));
        let dirs = [user, open, owned_file, linked, good.clone()];
        let found = find_in(&dirs, Path::new("helper"), only_root_can_replace);
        assert_eq!(found, Some(good.join("helper")));
        assert_eq!(find_in(&dirs[..4], Path::new("helper"), only_root_can_replace), None);
        // The helpers this machine has are found as before.
        assert!(only_root_can_replace(Path::new("/bin/sh")));
    }

    fn caps() -> HostCapabilities {
        HostCapabilities {
            kvm_present: true,
            kvm_api_version: Some(12),
            hardware_virt: None,
            nested_pvm: true,
            kvm_can_boot_linux: false,
            kvm_reason: "nested PVM".into(),
            vhost_vsock_device: false,
            qemu: Some("/usr/bin/qemu-system-x86_64".into()),
            virtiofsd: Some("/root/.cargo/bin/virtiofsd".into()),
            vhost_device_vsock: Some("/root/.cargo/bin/vhost-device-vsock".into()),
            cni_plugins: None,
        }
    }

    #[test]
    fn backend_choice_prefers_builtin_then_qemu() {
        let mut c = caps();
        assert_eq!(c.default_backend().0, Some("qemu"));
        assert!(c.default_backend().1.contains("nested PVM"));
        c.virtiofsd = None;
        assert_eq!(c.default_backend().0, None);
        c.kvm_can_boot_linux = true;
        c.kvm_reason.clear();
        assert_eq!(c.default_backend().0, Some("builtin"));
    }

    #[test]
    fn report_names_every_capability_and_the_reason() {
        let report = caps().report();
        for needle in [
            "KVM (/dev/kvm):              yes (API 12)",
            "nested PVM (kvm_pvm):        yes",
            "KVM can boot a Linux guest:  no (nested PVM)",
            "CNI plugins:                 no",
            "default VM backend:          qemu",
        ] {
            assert!(report.contains(needle), "{needle:?} missing from:\n{report}");
        }
    }

    #[test]
    fn detect_on_this_host_explains_a_no() {
        let c = HostCapabilities::detect();
        println!("{}", c.report());
        assert_eq!(c.kvm_can_boot_linux, c.kvm_reason.is_empty());
        if c.nested_pvm {
            assert!(!c.kvm_can_boot_linux);
            assert!(c.kvm_reason.contains("PVM"), "{}", c.kvm_reason);
        }
    }
}
