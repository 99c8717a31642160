//! The container's seccomp filter as libcontainer needs it.
//!
//! The OCI spec (and runc) read SCMP_CMP_MASKED_EQ as `(arg & value) == valueTwo`;
//! libcontainer 0.7 passes `valueTwo` to libseccomp as the mask and `value` as the datum, the
//! other way round (and libseccomp masks the datum too). The host writes OCI semantics; this
//! swaps the two so the filter means what the profile says: moby's `clone` rule (mask = the
//! namespace flags, 0) would otherwise become `flags & 0 == 0` and let every clone through,
//! namespaces included.

use oci_spec::runtime::{
    LinuxSeccomp, LinuxSeccompArg, LinuxSeccompArgBuilder, LinuxSeccompOperator,
};

/// `seccomp` with every masked comparison in libcontainer's order.
pub fn for_libcontainer(mut seccomp: LinuxSeccomp) -> LinuxSeccomp {
    let Some(mut syscalls) = seccomp.syscalls().clone() else { return seccomp };
    for syscall in syscalls.iter_mut() {
        if let Some(mut args) = syscall.args().clone() {
            args.iter_mut().for_each(swap_masked);
            syscall.set_args(Some(args));
        }
    }
    seccomp.set_syscalls(Some(syscalls));
    seccomp
}

fn swap_masked(arg: &mut LinuxSeccompArg) {
    if arg.op() != LinuxSeccompOperator::ScmpCmpMaskedEq {
        return;
    }
    let swapped = LinuxSeccompArgBuilder::default()
        .index(arg.index())
        .op(arg.op())
        .value(arg.value_two().unwrap_or(0))
        .value_two(arg.value())
        .build();
    // The builder has no required fields: it cannot fail.
    if let Ok(swapped) = swapped {
        *arg = swapped;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_comparisons_are_swapped_and_others_kept() {
        let seccomp: LinuxSeccomp = serde_json::from_value(serde_json::json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "syscalls": [
                {"names": ["clone"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 0, "value": 2114060288u64, "op": "SCMP_CMP_MASKED_EQ"}]},
                {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 0, "value": 8, "op": "SCMP_CMP_EQ"}]},
                {"names": ["read"], "action": "SCMP_ACT_ALLOW"}
            ]
        }))
        .unwrap();
        let swapped = for_libcontainer(seccomp.clone());
        let rules = swapped.syscalls().clone().unwrap();
        let clone = rules[0].args().clone().unwrap()[0];
        assert_eq!((clone.value(), clone.value_two()), (0, Some(2_114_060_288)));
        assert_eq!(rules[1], seccomp.syscalls().clone().unwrap()[1]);
        assert_eq!(rules[2].args(), &None);
    }
}
