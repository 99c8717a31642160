//! What this host's KVM can do for the built-in VMM. KVM being present is not enough: a
//! Linux guest needs hardware virtualization (VMX/SVM). Nested PVM (`kvm_pvm`, KVM on a host
//! without VMX/SVM exposed) runs ring-3 guest code natively but emulates ring-0 code and stops
//! on instructions every kernel uses (xrstor, int3, interrupt entry).

use std::path::Path;

use kvm_ioctls::{Cap, Kvm};

/// Result of probing /dev/kvm and the CPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvmProbe {
    /// /dev/kvm opens read-write.
    pub present: bool,
    /// KVM_GET_API_VERSION (12 on every modern kernel).
    pub api_version: Option<i32>,
    /// `vmx` or `svm` from /proc/cpuinfo.
    pub hardware_virt: Option<String>,
    /// /sys/module/kvm_pvm exists.
    pub nested_pvm: bool,
    /// The capabilities the VMM needs, missing ones by name.
    pub missing_caps: Vec<String>,
    /// Whether the built-in VMM can boot a Linux guest here.
    pub can_boot_linux: bool,
    /// Why not (empty when it can).
    pub reason: String,
}

/// The CPU flag that says the host has hardware virtualization, from /proc/cpuinfo text.
pub fn hardware_virt_flag(cpuinfo: &str) -> Option<String> {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .flat_map(|l| l.split_whitespace())
        .find(|f| *f == "vmx" || *f == "svm")
        .map(str::to_string)
}

/// Decides from the facts whether Linux can boot, and why not.
pub fn decide(
    present: bool,
    missing_caps: &[String],
    hardware_virt: Option<&str>,
    nested_pvm: bool,
) -> (bool, String) {
    if !present {
        return (false, "/dev/kvm is missing or not accessible".into());
    }
    if !missing_caps.is_empty() {
        return (false, format!("KVM lacks {}", missing_caps.join(", ")));
    }
    if nested_pvm {
        return (
            false,
            "KVM here is nested PVM (/sys/module/kvm_pvm): ring-0 guest code is emulated and a \
             Linux kernel faults during boot; needs VMX/SVM hardware virtualization"
                .into(),
        );
    }
    if hardware_virt.is_none() {
        return (false, "no hardware virtualization (no vmx/svm flag in /proc/cpuinfo)".into());
    }
    (true, String::new())
}

/// Probes this host.
pub fn probe() -> KvmProbe {
    let hardware_virt =
        std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|c| hardware_virt_flag(&c));
    let nested_pvm = Path::new("/sys/module/kvm_pvm").exists();
    let kvm = Kvm::new().ok();
    let present = kvm.is_some();
    let api_version = kvm.as_ref().map(|k| k.get_api_version());
    let missing_caps: Vec<String> = match &kvm {
        Some(kvm) => [Cap::Irqchip, Cap::Irqfd, Cap::Pit2, Cap::UserMemory, Cap::SetTssAddr]
            .into_iter()
            .filter(|cap| !kvm.check_extension(*cap))
            .map(|cap| format!("{cap:?}"))
            .collect(),
        None => Vec::new(),
    };
    let (can_boot_linux, reason) =
        decide(present, &missing_caps, hardware_virt.as_deref(), nested_pvm);
    KvmProbe {
        present,
        api_version,
        hardware_virt,
        nested_pvm,
        missing_caps,
        can_boot_linux,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_flags_and_decision() {
        let intel = "processor: 0\nflags\t\t: fpu vme vmx sse\n";
        assert_eq!(hardware_virt_flag(intel).as_deref(), Some("vmx"));
        assert_eq!(hardware_virt_flag("flags : fpu sse\n"), None);
        assert_eq!(decide(true, &[], Some("svm"), false), (true, String::new()));
        assert!(decide(true, &[], Some("vmx"), true).1.contains("PVM"));
        assert!(decide(true, &[], None, false).1.contains("vmx/svm"));
        assert!(decide(false, &[], Some("vmx"), false).1.contains("/dev/kvm"));
        assert!(decide(true, &["Irqfd".into()], Some("vmx"), false).1.contains("Irqfd"));
    }

    #[test]
    fn this_host_is_probed_without_panicking() {
        let p = probe();
        assert_eq!(p.can_boot_linux, p.reason.is_empty());
        println!("{p:?}");
    }
}
