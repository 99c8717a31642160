//! Whether KVM can run a Linux guest on this host.
//!
//! `/dev/kvm` answering is not enough: a nested PVM host (`kvm_pvm`) exposes the KVM API but
//! emulates guest ring 0 and stops on instructions every Linux kernel runs. Hardware
//! virtualization shows as the `vmx` (Intel) or `svm` (AMD) CPU flag.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::args::ResolvedAccel;

/// The accelerator asked for in the configuration.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM when [`probe_kvm`] says it can boot Linux, else TCG.
    #[default]
    Auto,
    Kvm,
    Tcg,
}

/// The answer of [`probe_kvm`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KvmProbe {
    /// KVM can boot a Linux guest.
    pub usable: bool,
    /// Why (or why not), for Status and `podvisor check`.
    pub reason: String,
}

const KVM_API_VERSION: i32 = 12;

nix::ioctl_none_bad!(kvm_get_api_version, nix::request_code_none!(0xAE, 0x00));

/// Checks whether KVM can run a Linux guest here.
pub fn probe_kvm() -> KvmProbe {
    probe_kvm_at(Path::new("/dev/kvm"), Path::new("/sys/module"), Path::new("/proc/cpuinfo"))
}

fn probe_kvm_at(dev_kvm: &Path, sys_module: &Path, cpuinfo: &Path) -> KvmProbe {
    let no = |reason: String| KvmProbe { usable: false, reason };
    let kvm = match OpenOptions::new().read(true).write(true).open(dev_kvm) {
        Ok(f) => f,
        Err(e) => return no(format!("cannot open {}: {e}", dev_kvm.display())),
    };
    // SAFETY: KVM_GET_API_VERSION takes no argument and only returns an int; the fd is a valid
    // open file for the duration of the call (a non-KVM file just fails with ENOTTY).
    let version = unsafe { kvm_get_api_version(kvm.as_raw_fd()) };
    match version {
        Ok(KVM_API_VERSION) => {}
        Ok(v) => {
            return no(format!(
                "{} has KVM API version {v}, not {KVM_API_VERSION}",
                dev_kvm.display()
            ))
        }
        Err(e) => return no(format!("KVM_GET_API_VERSION on {}: {e}", dev_kvm.display())),
    }
    if sys_module.join("kvm_pvm").exists() {
        return no(
            "KVM is nested PVM (kvm_pvm): it emulates guest ring 0 and cannot boot Linux".into()
        );
    }
    let flags = match std::fs::read_to_string(cpuinfo) {
        Ok(s) => s,
        Err(e) => return no(format!("reading {}: {e}", cpuinfo.display())),
    };
    let has_hw_virt = flags
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if !has_hw_virt {
        return no("the CPU shows no hardware virtualization (no vmx/svm flag)".into());
    }
    KvmProbe { usable: true, reason: "KVM with hardware virtualization".into() }
}

/// The accelerator to start QEMU with, and why.
pub fn resolve_accel(accel: Accel) -> (ResolvedAccel, String) {
    match accel {
        Accel::Kvm => (ResolvedAccel::Kvm, "configured: kvm".into()),
        Accel::Tcg => (ResolvedAccel::Tcg, "configured: tcg".into()),
        Accel::Auto => {
            let probe = probe_kvm();
            if probe.usable {
                (ResolvedAccel::Kvm, probe.reason)
            } else {
                (ResolvedAccel::Tcg, format!("TCG because {}", probe.reason))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_device_is_unusable() {
        let tmp = tempfile::tempdir().unwrap();
        let probe = probe_kvm_at(&tmp.path().join("kvm"), tmp.path(), &tmp.path().join("cpuinfo"));
        assert!(!probe.usable);
        assert!(probe.reason.contains("cannot open"), "{}", probe.reason);
    }

    #[test]
    fn not_a_kvm_device_is_unusable() {
        let tmp = tempfile::tempdir().unwrap();
        let fake = tmp.path().join("kvm");
        std::fs::write(&fake, b"").unwrap();
        let probe = probe_kvm_at(&fake, tmp.path(), &tmp.path().join("cpuinfo"));
        assert!(!probe.usable);
        assert!(probe.reason.contains("KVM_GET_API_VERSION"), "{}", probe.reason);
    }

    /// On this project's build machines (nested PVM, no vmx/svm) Auto must pick TCG; on a
    /// host with hardware virtualization it must pick KVM.
    #[test]
    fn auto_matches_the_host() {
        let probe = probe_kvm();
        let (accel, reason) = resolve_accel(Accel::Auto);
        println!("accel {accel:?}: {reason}");
        assert_eq!(accel == ResolvedAccel::Kvm, probe.usable);
        if Path::new("/sys/module/kvm_pvm").exists() {
            assert_eq!(accel, ResolvedAccel::Tcg);
        }
    }

    #[test]
    fn accel_config_names() {
        let a: Accel = serde_json::from_str("\"tcg\"").unwrap();
        assert_eq!(a, Accel::Tcg);
        assert!(serde_json::from_str::<Accel>("\"xen\"").is_err());
    }
}
