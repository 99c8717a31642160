//! Which accelerator QEMU runs with. `Auto` uses KVM only when KVM can boot a Linux guest,
//! as decided by [`podvisor_vmm::host::probe`] (the same answer `podvisor check` and the
//! built-in VMM use): `/dev/kvm` answering is not enough, e.g. nested PVM (`kvm_pvm`) exposes
//! the KVM API but emulates guest ring 0 and stops on instructions every Linux kernel runs.

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

/// Whether KVM can boot a Linux guest here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KvmProbe {
    pub usable: bool,
    /// Why (or why not), for Status and `podvisor check`.
    pub reason: String,
}

/// Checks whether KVM can run a Linux guest here.
pub fn probe_kvm() -> KvmProbe {
    let probe = podvisor_vmm::host::probe();
    let reason = if probe.can_boot_linux {
        format!("KVM with hardware virtualization ({})", probe.hardware_virt.unwrap_or_default())
    } else {
        probe.reason
    };
    KvmProbe { usable: probe.can_boot_linux, reason }
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

    /// On this project's build machines (nested PVM, no vmx/svm) Auto must pick TCG; on a
    /// host with hardware virtualization it must pick KVM.
    #[test]
    fn auto_matches_the_host() {
        let probe = probe_kvm();
        let (accel, reason) = resolve_accel(Accel::Auto);
        println!("accel {accel:?}: {reason}");
        assert!(!reason.is_empty());
        assert_eq!(accel == ResolvedAccel::Kvm, probe.usable);
        if std::path::Path::new("/sys/module/kvm_pvm").exists() {
            assert_eq!(accel, ResolvedAccel::Tcg);
        }
        assert_eq!(resolve_accel(Accel::Tcg).0, ResolvedAccel::Tcg);
        assert_eq!(resolve_accel(Accel::Kvm).0, ResolvedAccel::Kvm);
    }

    #[test]
    fn accel_config_names() {
        let a: Accel = serde_json::from_str("\"tcg\"").unwrap();
        assert_eq!(a, Accel::Tcg);
        assert!(serde_json::from_str::<Accel>("\"xen\"").is_err());
    }
}
