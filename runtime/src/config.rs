//! The daemon's configuration: a TOML file where every key is optional, overridden by flags.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Errors while loading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("parsing config file {path}: {source}")]
    Parse { path: PathBuf, source: toml::de::Error },
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// The default config file; a missing default file is not an error.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/podvisor/config.toml";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The CRI unix socket.
    pub listen: PathBuf,
    /// Persistent state: sandbox/container records and the image store.
    pub root: PathBuf,
    /// Runtime state: VM run directories and per-sandbox shared directories.
    pub state: PathBuf,
    /// `tracing` filter, e.g. `info` or `podvisor=debug`.
    pub log_level: String,
    /// `text` (colours only on a terminal) or `json` (one object per line, for log shippers).
    pub log_format: LogFormat,
    /// `auto` (built-in VMM where KVM can boot Linux, else QEMU), `builtin` or `qemu`.
    pub hypervisor: String,
    pub vm: VmSection,
    pub qemu: QemuSection,
    pub builtin: BuiltinSection,
    pub images: ImagesSection,
    pub streaming: StreamingSection,
    pub network: NetworkSection,
    /// RuntimeClass handlers beside the default one (the empty name, from `[vm]` and
    /// `hypervisor`), selected by RunPodSandbox's `runtime_handler`.
    pub runtimes: std::collections::BTreeMap<String, RuntimeSection>,
    /// A handler of the `host` backend that pods asking for a host namespace (network, PID or
    /// IPC in NODE mode) go to when they come with the default handler; empty: they are
    /// refused.
    pub route_host_namespace_pods: String,
    pub host: HostSection,
    pub metrics: MetricsSection,
}

/// Handlers of the `host` backend: pods run on the host by `podvisor-agent`, not in a VM.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HostSection {
    /// The agent binary; empty: `podvisor-agent` next to the daemon, else in
    /// /usr/share/podvisor.
    pub agent: PathBuf,
}

/// One RuntimeClass handler: a VM flavour. Empty or zero fields take the default handler's.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeSection {
    /// `builtin`, `qemu` or `host` (no VM: see [`HostSection`]); empty: the backend the
    /// daemon picked.
    pub hypervisor: String,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The VM of a pod that asks for no resources.
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Added to what a pod asks for (its resources plus overhead): the guest kernel and agent.
    pub memory_overhead_mib: u32,
    pub kernel_args: String,
    /// VM templates for this handler's pods; unset: `[vm] templates`.
    pub templates: Option<bool>,
}

/// The daemon's Prometheus endpoint (`GET /metrics`). Off unless configured, and on loopback by
/// default: pod names and CRI call patterns are not for every host on the network.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsSection {
    pub enabled: bool,
    pub address: String,
    /// 0 picks a free port at start (logged).
    pub port: u16,
}

impl Default for MetricsSection {
    fn default() -> Self {
        // CRI-O's default metrics port.
        Self { enabled: false, address: "127.0.0.1".into(), port: 9090 }
    }
}

/// Pod networking through CNI plugins (see `resource::network`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkSection {
    /// `false`: pods get no network interface (only the guest's loopback) and Status reports
    /// NetworkReady=false; `true`: RunPodSandbox runs the CNI plugins and fails while no usable
    /// configuration exists, as containerd does.
    pub enabled: bool,
    /// The first `.conflist`/`.conf`/`.json` file here (in lexical order) is the pod network.
    pub cni_conf_dir: PathBuf,
    /// Where plugin binaries are looked up, in order.
    pub cni_bin_dirs: Vec<PathBuf>,
}

impl Default for NetworkSection {
    fn default() -> Self {
        Self {
            enabled: true,
            cni_conf_dir: PathBuf::from("/etc/cni/net.d"),
            cni_bin_dirs: vec![PathBuf::from("/opt/cni/bin"), PathBuf::from("/usr/lib/cni")],
        }
    }
}

/// How the daemon's log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Where the streaming server (Exec, Attach) listens. The URLs it hands out carry single-use
/// tokens; kubelet proxies clients to it, so loopback is the default.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StreamingSection {
    pub address: String,
    /// 0 picks a free port at start.
    pub port: u16,
}

impl Default for StreamingSection {
    fn default() -> Self {
        Self { address: "127.0.0.1".into(), port: 0 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VmSection {
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Guest kernel; empty = `vmlinux` next to the podvisor binary, else /usr/share/podvisor.
    pub kernel: PathBuf,
    /// Guest initramfs; empty = `initramfs.cpio` next to the binary, else /usr/share/podvisor.
    pub initrd: PathBuf,
    /// Extra guest kernel command line arguments.
    pub kernel_args: String,
    /// How long RunPodSandbox waits for the agent to answer after the VM started.
    pub boot_timeout_seconds: u64,
    /// Added to what a pod asks for (its resources plus overhead) when it asks for any: the
    /// guest kernel, agent and page cache.
    pub memory_overhead_mib: u32,
    /// The guest console log's cap (it lives on the state directory's tmpfs): past it, only
    /// its newest half is kept.
    pub console_log_max_kib: u32,
    /// Guest device paths a CRI `Device` may name (e.g. `/dev/fuse`, `/dev/net/tun`): the
    /// container gets the guest's own node of that path. A VM has none of the host's devices.
    pub allowed_devices: Vec<String>,
    /// Start pods from VM templates (snapshot/restore) where the backend and the VM's devices
    /// allow it (the built-in VMM); cold boot otherwise, and wherever a template fails (README,
    /// "VM templates").
    pub templates: bool,
    /// How many VM templates are kept on disk (each holds a memory file of its VM's size);
    /// installing one more removes the least recently used. 0: templates are off.
    pub max_templates: u32,
}

impl VmSection {
    pub fn console_log_max_bytes(&self) -> u64 {
        u64::from(self.console_log_max_kib) * 1024
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QemuSection {
    pub binary: PathBuf,
    /// `auto`, `kvm` or `tcg`.
    pub accel: String,
    pub vhost_device_vsock: PathBuf,
    pub virtiofsd: PathBuf,
    /// Run QEMU, vhost-device-vsock and the console copier each as the VM's own uid (from
    /// `builtin.jail_first_id`/`jail_ids`, shared with the built-in VMM), confined (needs the
    /// daemon to run as root).
    pub jail: bool,
    /// Whether QEMU may run VMs under TCG (what `accel = "auto"` picks without usable KVM):
    /// QEMU does not treat TCG as a security boundary. `false` refuses to start the backend.
    pub allow_tcg: bool,
}

/// The built-in VMM's confinement.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BuiltinSection {
    /// Run each VMM unprivileged in its own mount namespace (needs the daemon to run as root).
    pub jail: bool,
    /// Each VM's VMM gets its own uid (= gid) from `jail_first_id .. jail_first_id + jail_ids`,
    /// so one VMM cannot signal or ptrace another.
    pub jail_first_id: u32,
    pub jail_ids: u32,
    /// `trap`, `kill`, `log` or `off`: what a syscall outside a VMM thread's allowlist does.
    pub seccomp: podvisor_vmm::config::SeccompMode,
    /// Who serves the shares' virtio-fs rings: `inproc` (the VMM's own device, files served by
    /// a sandboxed `podvisor fs-serve`; VMs can be snapshotted and restored) or `vhost-user`
    /// (virtiofsd maps guest memory itself; VMs with shares cannot be restored).
    pub fs: BuiltinFs,
}

/// `builtin.fs`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BuiltinFs {
    #[default]
    Inproc,
    VhostUser,
}

impl Default for BuiltinSection {
    fn default() -> Self {
        Self {
            jail: true,
            jail_first_id: 100_000,
            jail_ids: 65_536,
            seccomp: podvisor_vmm::config::SeccompMode::Trap,
            fs: BuiltinFs::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImagesSection {
    /// Registries (host or host:port) reached over plain HTTP; localhost always is.
    pub insecure_registries: Vec<String>,
    /// A docker `config.json` with registry credentials.
    pub docker_config: Option<PathBuf>,
    /// A pull whose registry sends nothing this long is aborted; 0 waits forever.
    pub pull_progress_timeout_seconds: u64,
    /// Images (tags or digests) never removed and reported pinned to kubelet's image GC.
    pub pinned: Vec<String>,
    /// Largest image pulled (its compressed layers and config, as its manifest declares).
    pub max_image_gib: u32,
    /// Largest image unpacked (its uncompressed layers added up).
    pub max_unpacked_gib: u32,
    /// Mirrors per registry host, keyed as image names spell the host (`docker.io`,
    /// `registry.k8s.io`, `host:5000`).
    pub registries: std::collections::BTreeMap<String, RegistrySection>,
}

/// `[images.registries."<host>"]`: where pulls of that registry's images go.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct RegistrySection {
    /// Tried in order before the upstream.
    pub mirrors: Vec<MirrorSection>,
    /// Try the upstream once every mirror failed.
    pub fallback_to_upstream: bool,
    // The upstream's own TLS settings, as a mirror's (any of them means HTTPS). Fields, not a
    // flattened struct: serde's flatten does not work with deny_unknown_fields.
    /// PEM CA certificates trusted for the upstream besides the system's.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate presented to the upstream (mutual TLS); needs `client_key`.
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `client_cert`.
    pub client_key: Option<PathBuf>,
    /// Accept any certificate from the upstream.
    pub skip_verify: bool,
}

impl Default for RegistrySection {
    fn default() -> Self {
        Self {
            mirrors: Vec::new(),
            fallback_to_upstream: true,
            ca_file: None,
            client_cert: None,
            client_key: None,
            skip_verify: false,
        }
    }
}

impl RegistrySection {
    fn tls_files(&self) -> podvisor_image::TlsFiles<'_> {
        podvisor_image::TlsFiles {
            ca_file: self.ca_file.as_deref(),
            client_cert: self.client_cert.as_deref(),
            client_key: self.client_key.as_deref(),
            skip_verify: self.skip_verify,
        }
    }
}

/// One mirror endpoint.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct MirrorSection {
    /// `http(s)://host[:port][/repository-prefix]`.
    pub url: String,
    /// PEM CA certificates trusted for this mirror besides the system's.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate presented to the mirror (mutual TLS); needs `client_key`.
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `client_cert`.
    pub client_key: Option<PathBuf>,
    /// Accept any certificate from this mirror.
    pub skip_verify: bool,
}

impl MirrorSection {
    fn tls_files(&self) -> podvisor_image::TlsFiles<'_> {
        podvisor_image::TlsFiles {
            ca_file: self.ca_file.as_deref(),
            client_cert: self.client_cert.as_deref(),
            client_key: self.client_key.as_deref(),
            skip_verify: self.skip_verify,
        }
    }
}

impl Default for ImagesSection {
    fn default() -> Self {
        Self {
            insecure_registries: Vec::new(),
            docker_config: None,
            // containerd's image_pull_progress_timeout is 5 min; a node behind a slow link
            // sees some bytes every few seconds, so a minute of silence is a dead registry.
            pull_progress_timeout_seconds: 60,
            pinned: Vec::new(),
            max_image_gib: 32,
            max_unpacked_gib: 64,
            registries: std::collections::BTreeMap::new(),
        }
    }
}

impl ImagesSection {
    /// `registries` checked and as the store takes them (CA files read): a bad URL, an
    /// unreadable CA or a key that is no registry host fails the daemon's start.
    pub fn registries(
        &self,
    ) -> Result<std::collections::BTreeMap<String, podvisor_image::RegistryHosts>, ConfigError>
    {
        let mut registries = std::collections::BTreeMap::new();
        for (host, section) in &self.registries {
            let bad =
                |why: String| ConfigError::Invalid(format!("images.registries.{host:?}: {why}"));
            let names_a_registry = podvisor_image::parse_reference(&format!("{host}/x"))
                .is_ok_and(|r| r.registry() == host);
            if !names_a_registry {
                return Err(bad(
                    "not a registry host as image names spell it (docker.io, registry.k8s.io, \
                     host:5000)"
                        .into(),
                ));
            }
            if section.mirrors.is_empty() && !section.fallback_to_upstream {
                return Err(bad(
                    "no mirrors and no fallback_to_upstream: nothing to pull from".into()
                ));
            }
            let mut mirrors = Vec::new();
            for mirror in &section.mirrors {
                let checked = podvisor_image::Mirror::new(&mirror.url, &mirror.tls_files())
                    .map_err(|e| bad(e.to_string()))?;
                mirrors.push(checked);
            }
            let upstream_tls = podvisor_image::EndpointTls::load(
                &format!("registry {host}"),
                &section.tls_files(),
            )
            .map_err(|e| bad(e.to_string()))?;
            registries.insert(
                host.clone(),
                podvisor_image::RegistryHosts {
                    mirrors,
                    fallback_to_upstream: section.fallback_to_upstream,
                    upstream_tls,
                },
            );
        }
        Ok(registries)
    }

    /// `pull_progress_timeout_seconds` as the store takes it.
    pub fn pull_progress_timeout(&self) -> Option<std::time::Duration> {
        (self.pull_progress_timeout_seconds > 0)
            .then(|| std::time::Duration::from_secs(self.pull_progress_timeout_seconds))
    }
}

impl Config {
    /// Where the backends put VM run directories.
    pub fn vms_dir(&self) -> PathBuf {
        self.state.join("vms")
    }

    /// Where pods' network namespaces are bind-mounted (their paths are in the records).
    pub fn netns_dir(&self) -> PathBuf {
        self.state.join("netns")
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: PathBuf::from("/run/podvisor/podvisor.sock"),
            root: PathBuf::from("/var/lib/podvisor"),
            state: PathBuf::from("/run/podvisor"),
            log_level: "info".into(),
            log_format: LogFormat::Text,
            hypervisor: "auto".into(),
            vm: VmSection::default(),
            qemu: QemuSection::default(),
            builtin: BuiltinSection::default(),
            images: ImagesSection::default(),
            streaming: StreamingSection::default(),
            network: NetworkSection::default(),
            runtimes: Default::default(),
            route_host_namespace_pods: String::new(),
            host: HostSection::default(),
            metrics: MetricsSection::default(),
        }
    }
}

impl Default for VmSection {
    fn default() -> Self {
        Self {
            vcpus: 1,
            memory_mib: 256,
            kernel: PathBuf::new(),
            initrd: PathBuf::new(),
            kernel_args: String::new(),
            boot_timeout_seconds: 120,
            memory_overhead_mib: 64,
            console_log_max_kib: 1024,
            allowed_devices: Vec::new(),
            templates: true,
            max_templates: 4,
        }
    }
}

impl Default for QemuSection {
    fn default() -> Self {
        Self {
            binary: PathBuf::from("qemu-system-x86_64"),
            accel: "auto".into(),
            vhost_device_vsock: PathBuf::from("vhost-device-vsock"),
            virtiofsd: PathBuf::from("virtiofsd"),
            jail: true,
            allow_tcg: true,
        }
    }
}

impl Config {
    /// Loads `path`; when `path` is the default and does not exist, returns the defaults.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    && path == Path::new(DEFAULT_CONFIG_PATH) =>
            {
                return Ok(Self::default())
            }
            Err(source) => return Err(ConfigError::Read { path: path.to_path_buf(), source }),
        };
        Self::parse(&text).map_err(|source| ConfigError::Parse { path: path.to_path_buf(), source })
    }

    pub fn parse(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.streaming.address.parse::<std::net::IpAddr>().is_err() {
            return Err(ConfigError::Invalid(format!(
                "streaming.address must be an IP address, not {:?}",
                self.streaming.address
            )));
        }
        if self.metrics.address.parse::<std::net::IpAddr>().is_err() {
            return Err(ConfigError::Invalid(format!(
                "metrics.address must be an IP address, not {:?}",
                self.metrics.address
            )));
        }
        if !matches!(self.hypervisor.as_str(), "auto" | "builtin" | "qemu") {
            return Err(ConfigError::Invalid(format!(
                "hypervisor must be auto, builtin or qemu, not {:?}",
                self.hypervisor
            )));
        }
        if !matches!(self.qemu.accel.as_str(), "auto" | "kvm" | "tcg") {
            return Err(ConfigError::Invalid(format!(
                "qemu.accel must be auto, kvm or tcg, not {:?}",
                self.qemu.accel
            )));
        }
        if self.vm.vcpus == 0 || self.vm.vcpus > 64 {
            return Err(ConfigError::Invalid("vm.vcpus must be 1..=64".into()));
        }
        if self.vm.memory_mib < 64 {
            return Err(ConfigError::Invalid("vm.memory_mib must be at least 64".into()));
        }
        if self.vm.console_log_max_kib < 16 {
            // Less would not hold the end of a failed boot.
            return Err(ConfigError::Invalid("vm.console_log_max_kib must be at least 16".into()));
        }
        if self.images.max_image_gib == 0 || self.images.max_unpacked_gib == 0 {
            return Err(ConfigError::Invalid(
                "images.max_image_gib and images.max_unpacked_gib must be at least 1".into(),
            ));
        }
        self.images.registries()?;
        if let Some(bad) = self.vm.allowed_devices.iter().find(|d| !d.starts_with("/dev/")) {
            return Err(ConfigError::Invalid(format!(
                "vm.allowed_devices: {bad:?} is not a path under /dev/"
            )));
        }
        for (name, rt) in &self.runtimes {
            self.validate_runtime(name, rt)?;
        }
        let route = &self.route_host_namespace_pods;
        if !route.is_empty() && self.runtimes.get(route).is_none_or(|rt| rt.hypervisor != "host") {
            return Err(ConfigError::Invalid(format!(
                "route_host_namespace_pods: {route:?} is not a [runtimes.<name>] handler with \
                 hypervisor = \"host\""
            )));
        }
        if (self.builtin.jail || self.qemu.jail)
            && (self.builtin.jail_first_id == 0
                || self.builtin.jail_ids == 0
                || self.builtin.jail_first_id.checked_add(self.builtin.jail_ids).is_none())
        {
            return Err(ConfigError::Invalid(
                "builtin.jail_first_id must be above 0 and jail_first_id + jail_ids must fit in \
                 a u32 (and jail_ids be at least 1)"
                    .into(),
            ));
        }
        Ok(())
    }

    fn validate_runtime(&self, name: &str, rt: &RuntimeSection) -> Result<(), ConfigError> {
        let bad = |why: &str| Err(ConfigError::Invalid(format!("runtimes.{name}: {why}")));
        let valid_name = !name.is_empty()
            && name.len() <= 63
            && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !valid_name {
            return bad("a handler name is 1-63 lowercase letters, digits or '-' (a DNS label)");
        }
        if !matches!(rt.hypervisor.as_str(), "" | "builtin" | "qemu" | "host") {
            return bad("hypervisor must be builtin, qemu or host (or empty)");
        }
        if rt.vcpus > 64 {
            return bad("vcpus must be at most 64");
        }
        if rt.memory_mib != 0 && rt.memory_mib < 64 {
            return bad("memory_mib must be at least 64");
        }
        Ok(())
    }

    /// The guest kernel: the configured path, else next to the binary, else /usr/share/podvisor.
    pub fn kernel_path(&self) -> PathBuf {
        guest_artefact(&self.vm.kernel, "vmlinux")
    }

    pub fn initrd_path(&self) -> PathBuf {
        guest_artefact(&self.vm.initrd, "initramfs.cpio")
    }

    /// The agent the host backend runs: as configured, else beside the binary, else in
    /// /usr/share/podvisor (where the guest's kernel and initramfs are looked for too).
    pub fn host_agent_path(&self) -> PathBuf {
        guest_artefact(&self.host.agent, "podvisor-agent")
    }
}

fn guest_artefact(configured: &Path, name: &str) -> PathBuf {
    if !configured.as_os_str().is_empty() {
        return configured.to_path_buf();
    }
    if let Some(dir) =
        std::env::current_exe().ok().and_then(|exe| exe.parent().map(Path::to_path_buf))
    {
        let beside = dir.join(name);
        if beside.exists() {
            return beside;
        }
    }
    Path::new("/usr/share/podvisor").join(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_namespace_pods_route_only_to_a_host_handler() {
        let ok = "route_host_namespace_pods = \"host\"\n[host]\nagent = \"/a\"\n\
                  [runtimes.host]\nhypervisor = \"host\"\n";
        let c = Config::parse(ok).unwrap();
        c.validate().unwrap();
        assert_eq!(c.host_agent_path(), PathBuf::from("/a"));
        for bad in [
            "route_host_namespace_pods = \"nope\"\n",
            "route_host_namespace_pods = \"big\"\n[runtimes.big]\nvcpus = 2\n",
        ] {
            let err = Config::parse(bad).unwrap().validate().unwrap_err();
            assert!(err.to_string().contains("route_host_namespace_pods"), "{err}");
        }
    }

    #[test]
    fn runtime_handlers_parse_and_are_validated() {
        let c = Config::parse(
            "[runtimes.big]\nvcpus = 2\nmemory_mib = 1024\n[runtimes.tiny]\nhypervisor = \"qemu\"\n",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.runtimes["big"].vcpus, 2);
        assert_eq!(c.runtimes["tiny"].memory_mib, 0);
        for bad in [
            "[runtimes.Big]\n",
            "[runtimes.a]\nhypervisor = \"kvmtool\"\n",
            "[runtimes.a]\nmemory_mib = 8\n",
            "[runtimes.a]\nvcpus = 65\n",
        ] {
            assert!(Config::parse(bad).unwrap().validate().is_err(), "{bad}");
        }
        assert!(Config::parse("[runtimes.a]\nswap = 1\n").is_err());
    }

    #[test]
    fn log_format_is_text_or_json() {
        assert_eq!(Config::parse("").unwrap().log_format, LogFormat::Text);
        assert_eq!(Config::parse("log_format = \"json\"").unwrap().log_format, LogFormat::Json);
        assert!(Config::parse("log_format = \"xml\"").is_err());
    }

    #[test]
    fn empty_file_gives_defaults() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.listen, PathBuf::from("/run/podvisor/podvisor.sock"));
        assert_eq!(c.vm.memory_mib, 256);
        assert_eq!(c.vm.console_log_max_bytes(), 1 << 20);
        assert!(c.vm.templates, "pods start from VM templates by default");
        assert_eq!(c.vm.max_templates, 4);
        c.validate().unwrap();
        let off = Config::parse("[vm]\ntemplates = false\nmax_templates = 0\n").unwrap();
        assert!(!off.vm.templates);
        assert_eq!(off.vm.max_templates, 0);
    }

    #[test]
    fn keys_override_defaults() {
        let c = Config::parse("hypervisor = \"qemu\"\n[vm]\nmemory_mib = 128\n[images]\ninsecure_registries = [\"reg:5000\"]\n").unwrap();
        assert_eq!(c.hypervisor, "qemu");
        assert_eq!(c.vm.memory_mib, 128);
        assert_eq!(c.vm.vcpus, 1);
        assert_eq!(c.images.insecure_registries, vec!["reg:5000".to_string()]);
        assert_eq!(c.images.pull_progress_timeout(), Some(std::time::Duration::from_secs(60)));
        let c = Config::parse(
            "[images]\npull_progress_timeout_seconds = 0\npinned = [\"registry.k8s.io/pause:3.9\"]\n",
        )
        .unwrap();
        assert_eq!(c.images.pull_progress_timeout(), None);
        assert_eq!(c.images.pinned, vec!["registry.k8s.io/pause:3.9".to_string()]);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        assert!(Config::parse("hypervisr = \"qemu\"").is_err());
        let c = Config::parse("hypervisor = \"xen\"").unwrap();
        assert!(c.validate().is_err());
        assert!(Config::parse("[builtin]\nseccomp = \"maybe\"").is_err());
        assert!(Config::parse("[vm]\nconsole_log_max_kib = 8").unwrap().validate().is_err());
        assert!(Config::parse("[images]\nmax_image_gib = 0").unwrap().validate().is_err());
        for bad in ["jail_first_id = 0", "jail_ids = 0", "jail_first_id = 4294967295"] {
            let c = Config::parse(&format!("[builtin]\n{bad}")).unwrap();
            assert!(c.validate().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_builtin_vmm_is_jailed_by_default() {
        let c = Config::parse("").unwrap();
        assert!(c.builtin.jail);
        assert_eq!((c.builtin.jail_first_id, c.builtin.jail_ids), (100_000, 65_536));
        assert_eq!(Config::default().builtin.fs, BuiltinFs::Inproc);
        let c = Config::parse("[builtin]\nfs = \"vhost-user\"").unwrap();
        assert_eq!(c.builtin.fs, BuiltinFs::VhostUser);
        assert!(Config::parse("[builtin]\nfs = \"fuse\"").is_err());
        let c = Config::parse("[builtin]\njail = false\nseccomp = \"log\"").unwrap();
        assert!(!c.builtin.jail);
        assert_eq!(c.builtin.seccomp, podvisor_vmm::config::SeccompMode::Log);
    }

    #[test]
    fn metrics_are_off_and_on_loopback_unless_configured() {
        let c = Config::parse("").unwrap();
        assert!(!c.metrics.enabled);
        assert_eq!((c.metrics.address.as_str(), c.metrics.port), ("127.0.0.1", 9090));
        let c = Config::parse("[metrics]\nenabled = true\naddress = \"::1\"\nport = 0").unwrap();
        assert!(c.metrics.enabled);
        assert_eq!((c.metrics.address.as_str(), c.metrics.port), ("::1", 0));
        c.validate().unwrap();
        let c = Config::parse("[metrics]\naddress = \"localhost\"").unwrap();
        assert!(c.validate().is_err());
        assert!(Config::parse("[metrics]\npath = \"/m\"").is_err());
    }

    #[test]
    fn registry_mirrors_parse_and_bad_ones_fail_at_start() {
        let config = Config::parse(
            r#"
            [images.registries."registry.k8s.io"]
            mirrors = [{ url = "https://mirror.local:5443/proxy", skip_verify = true },
                       { url = "http://10.0.0.1:5000" }]
            [images.registries."docker.io"]
            mirrors = [{ url = "https://hub-mirror.local" }]
            fallback_to_upstream = false
            "#,
        )
        .unwrap();
        config.validate().unwrap();
        let registries = config.images.registries().unwrap();
        let k8s = &registries["registry.k8s.io"];
        assert!(k8s.fallback_to_upstream);
        assert_eq!(k8s.mirrors.len(), 2);
        assert_eq!(k8s.mirrors[0].host, "mirror.local:5443");
        assert_eq!(k8s.mirrors[0].prefix.as_deref(), Some("proxy"));
        assert!(k8s.mirrors[0].tls.skip_verify && k8s.mirrors[1].plain_http);
        assert!(!registries["docker.io"].fallback_to_upstream);

        for (text, complaint) in [
            (r#"mirrors = [{ url = "mirror.local:5000" }]"#, "neither http nor https"),
            (r#"mirrors = [{ url = "https://m", ca_file = "/nonexistent.pem" }]"#, "ca_file"),
            (r#"mirrors = [{ url = "http://m", skip_verify = true }]"#, "need an https"),
            (
                r#"mirrors = [{ url = "https://m", client_cert = "/c.pem" }]"#,
                "mirror https://m: client_cert without client_key",
            ),
            (
                r#"mirrors = [{ url = "https://m", client_key = "/k.pem" }]"#,
                "client_key without client_cert",
            ),
            (
                r#"mirrors = [{ url = "https://m", client_cert = "/c.pem", client_key = "/k.pem" }]"#,
                "read client_cert /c.pem",
            ),
            (
                r#"mirrors = [{ url = "http://m", client_cert = "/c.pem", client_key = "/k.pem" }]"#,
                "need an https",
            ),
            ("client_key = \"/k.pem\"", "registry quay.io: client_key without client_cert"),
            ("ca_file = \"/nonexistent.pem\"", "registry quay.io: read ca_file /nonexistent.pem"),
            ("fallback_to_upstream = false", "nothing to pull from"),
        ] {
            let config =
                Config::parse(&format!("[images.registries.\"quay.io\"]\n{text}")).unwrap();
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains("quay.io") && err.contains(complaint), "{text}: {err}");
        }
        let config = Config::parse(
            "[images.registries.\"https://quay.io\"]\nmirrors = [{ url = \"https://m\" }]",
        )
        .unwrap();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("not a registry host"), "{err}");
        let unknown =
            "[images.registries.\"quay.io\"]\nmirrors = [{ url = \"https://m\", tls = 1 }]";
        assert!(Config::parse(unknown).is_err());
    }

    #[test]
    fn missing_explicit_file_is_an_error() {
        assert!(Config::load(Path::new("/nonexistent/podvisor.toml")).is_err());
    }
}
