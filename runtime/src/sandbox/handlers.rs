//! RuntimeClass handlers and VM sizing. A handler is a VM flavour (backend, kernel, initramfs,
//! default size, memory overhead); the empty name is the default one, from `[vm]`. A pod's VM
//! is sized from what it asks for — its resources plus its overhead, as kubelet sums them for
//! the sandbox — plus the handler's memory overhead, or the handler's default size when it asks
//! for nothing.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::types::{NamespaceMode, PodSpec};
use crate::config::Config;
use crate::hypervisor::host;

/// Smallest VM a pod that asks for little memory gets: the guest kernel and agent need room.
pub const MIN_VM_MIB: u32 = 128;
/// Most vCPUs a pod's VM gets.
pub const MAX_VCPUS: u32 = 64;
/// Largest VM a pod may ask for (64 GiB, the built-in VMM's limit).
pub const MAX_VM_MIB: u32 = 64 * 1024;

/// A handler resolved against the default one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handler {
    pub name: String,
    /// `None`: the backend the daemon picked.
    pub backend: Option<String>,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub memory_overhead_mib: u32,
    pub kernel_args: String,
    /// Start its pods from VM templates where possible.
    pub templates: bool,
}

/// The VM a pod runs in (persisted: limits are checked against it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSize {
    pub vcpus: u32,
    pub memory_mib: u32,
}

/// What a pod asks of its VM: the sum of its containers' limits and its overhead.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PodDemand {
    /// CPU in thousandths of a CPU (quota / period); 0 = not asked.
    pub cpu_millis: u64,
    /// 0 = not asked.
    pub memory_bytes: u64,
}

impl Handler {
    /// Handler `name` (empty = the default), or `None` if the config has no such handler.
    pub fn resolve(config: &Config, name: &str) -> Option<Self> {
        let default = Self {
            name: String::new(),
            backend: None,
            kernel: config.kernel_path(),
            initrd: config.initrd_path(),
            vcpus: config.vm.vcpus,
            memory_mib: config.vm.memory_mib,
            memory_overhead_mib: config.vm.memory_overhead_mib,
            kernel_args: config.vm.kernel_args.clone(),
            templates: config.vm.templates,
        };
        if name.is_empty() {
            return Some(default);
        }
        let rt = config.runtimes.get(name)?;
        let or = |v: u32, d: u32| if v == 0 { d } else { v };
        Some(Self {
            name: name.to_string(),
            backend: (!rt.hypervisor.is_empty()).then(|| rt.hypervisor.clone()),
            kernel: if rt.kernel.as_os_str().is_empty() {
                default.kernel
            } else {
                rt.kernel.clone()
            },
            initrd: if rt.initrd.as_os_str().is_empty() {
                default.initrd
            } else {
                rt.initrd.clone()
            },
            vcpus: or(rt.vcpus, default.vcpus),
            memory_mib: or(rt.memory_mib, default.memory_mib),
            memory_overhead_mib: or(rt.memory_overhead_mib, default.memory_overhead_mib),
            kernel_args: if rt.kernel_args.is_empty() {
                default.kernel_args
            } else {
                rt.kernel_args.clone()
            },
            templates: rt.templates.unwrap_or(default.templates),
        })
    }

    /// Whether its pods run on the host itself (the `host` backend), not in a VM.
    pub fn on_host(&self) -> bool {
        self.backend.as_deref() == Some(host::NAME)
    }

    /// The handler `pod` runs on: the one it names, except that a pod asking for a host
    /// namespace with the default handler goes to `route_host_namespace_pods` if configured.
    pub fn routed_name(config: &Config, pod: &PodSpec) -> String {
        let route = &config.route_host_namespace_pods;
        if pod.runtime_handler.is_empty() && !route.is_empty() && host_namespace(pod).is_some() {
            return route.clone();
        }
        pod.runtime_handler.clone()
    }

    /// The first host namespace `pod` asks for that this handler cannot give (a VM has none of
    /// the host's), by its CRI field name.
    pub fn refused_namespace(&self, pod: &PodSpec) -> Option<&'static str> {
        if self.on_host() {
            None
        } else {
            host_namespace(pod)
        }
    }

    /// Every handler's name, the default (empty) first.
    pub fn names(config: &Config) -> Vec<String> {
        std::iter::once(String::new()).chain(config.runtimes.keys().cloned()).collect()
    }

    /// The VM for `pod`: what it asks for, else this handler's default size.
    pub fn vm_size(&self, pod: &PodSpec) -> VmSize {
        let demand = pod.demand;
        let vcpus = if demand.cpu_millis > 0 {
            u32::try_from(demand.cpu_millis.div_ceil(1000)).unwrap_or(MAX_VCPUS).clamp(1, MAX_VCPUS)
        } else {
            self.vcpus
        };
        let memory_mib = if demand.memory_bytes > 0 {
            let asked = u32::try_from(demand.memory_bytes.div_ceil(1 << 20)).unwrap_or(u32::MAX);
            asked.saturating_add(self.memory_overhead_mib).max(MIN_VM_MIB)
        } else {
            self.memory_mib
        };
        VmSize { vcpus, memory_mib }
    }
}

/// The first namespace (network, PID, IPC) `pod` wants to share with the host.
fn host_namespace(pod: &PodSpec) -> Option<&'static str> {
    let ns = pod.namespaces;
    [("network", ns.network), ("pid", ns.pid), ("ipc", ns.ipc)]
        .into_iter()
        .find(|(_, mode)| *mode == NamespaceMode::Node)
        .map(|(field, _)| field)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::parse(
            "[vm]\nvcpus = 1\nmemory_mib = 256\nmemory_overhead_mib = 64\n\
             [runtimes.big]\nvcpus = 4\nmemory_mib = 2048\nkernel_args = \"quiet\"\n\
             [runtimes.qemu-small]\nhypervisor = \"qemu\"\nmemory_mib = 128\n",
        )
        .unwrap()
    }

    #[test]
    fn handlers_inherit_what_they_leave_empty() {
        let c = config();
        assert_eq!(Handler::names(&c), ["", "big", "qemu-small"]);
        let big = Handler::resolve(&c, "big").unwrap();
        assert_eq!((big.vcpus, big.memory_mib, big.memory_overhead_mib), (4, 2048, 64));
        assert_eq!(big.kernel_args, "quiet");
        assert_eq!(big.backend, None);
        let small = Handler::resolve(&c, "qemu-small").unwrap();
        assert_eq!((small.vcpus, small.memory_mib), (1, 128));
        assert_eq!(small.backend.as_deref(), Some("qemu"));
        assert_eq!(small.kernel, Handler::resolve(&c, "").unwrap().kernel);
        assert!(Handler::resolve(&c, "nope").is_none());
    }

    #[test]
    fn host_namespace_pods_are_routed_to_the_host_handler_if_configured() {
        let mut c = config();
        c.runtimes.insert(
            "host".into(),
            crate::config::RuntimeSection { hypervisor: "host".into(), ..Default::default() },
        );
        let mut pod = PodSpec::default();
        pod.namespaces.pid = NamespaceMode::Node;
        assert_eq!(Handler::routed_name(&c, &pod), "");
        let vm = Handler::resolve(&c, "").unwrap();
        assert_eq!(vm.refused_namespace(&pod), Some("pid"));
        c.route_host_namespace_pods = "host".into();
        assert_eq!(Handler::routed_name(&c, &pod), "host");
        let host = Handler::resolve(&c, "host").unwrap();
        assert!(host.on_host() && !vm.on_host());
        assert_eq!(host.refused_namespace(&pod), None);
        // A pod that names its handler keeps it; one without host namespaces is not routed.
        pod.runtime_handler = "big".into();
        assert_eq!(Handler::routed_name(&c, &pod), "big");
        assert_eq!(Handler::routed_name(&c, &PodSpec::default()), "");
    }

    #[test]
    fn a_pod_gets_what_it_asks_for_plus_overhead_else_the_default() {
        let c = config();
        let default = Handler::resolve(&c, "").unwrap();
        let mut pod = PodSpec::default();
        assert_eq!(default.vm_size(&pod), VmSize { vcpus: 1, memory_mib: 256 });
        pod.demand = PodDemand { cpu_millis: 1500, memory_bytes: 512 << 20 };
        assert_eq!(default.vm_size(&pod), VmSize { vcpus: 2, memory_mib: 576 });
        pod.demand = PodDemand { cpu_millis: 100, memory_bytes: 16 << 20 };
        assert_eq!(default.vm_size(&pod), VmSize { vcpus: 1, memory_mib: MIN_VM_MIB });
        pod.demand = PodDemand { cpu_millis: u64::MAX, memory_bytes: u64::MAX };
        let huge = default.vm_size(&pod);
        assert_eq!(huge.vcpus, MAX_VCPUS);
        assert_eq!(huge.memory_mib, u32::MAX);
    }
}
