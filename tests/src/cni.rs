//! A private CNI network for tests: Debian's `containernetworking-plugins` (bridge, host-local,
//! portmap) configured in a directory of the test's own, with its own bridge, subnet and IPAM
//! data directory, so what it leaves behind can be counted exactly.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Where Debian installs the plugins.
pub const DEBIAN_CNI_BIN: &str = "/usr/lib/cni";

/// One test network.
pub struct TestNetwork {
    pub conf_dir: PathBuf,
    pub ipam_dir: PathBuf,
    pub name: String,
    pub bridge: String,
    /// e.g. "10.213.7" (a /24).
    pub prefix: String,
}

impl TestNetwork {
    /// Describes a network under `dir`; nothing is written until [`Self::write_config`].
    pub fn new(dir: &Path, name: &str, bridge: &str, prefix: &str) -> Self {
        Self {
            conf_dir: dir.join("cni-conf"),
            ipam_dir: dir.join("cni-ipam"),
            name: name.into(),
            bridge: bridge.into(),
            prefix: prefix.into(),
        }
    }

    /// The daemon's `[network]` table for this network.
    pub fn daemon_config(&self) -> String {
        format!(
            "[network]\nenabled = true\ncni_conf_dir = {:?}\ncni_bin_dirs = [{:?}]\n",
            self.conf_dir, DEBIAN_CNI_BIN
        )
    }

    /// Writes the bridge + host-local + portmap conflist (and a loopback one, which sorts
    /// later and so is not the pod network).
    pub fn write_config(&self) {
        std::fs::create_dir_all(&self.conf_dir).unwrap();
        let conflist = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": self.name,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": self.bridge,
                    "isGateway": true,
                    "ipMasq": true,
                    "hairpinMode": true,
                    "ipam": {
                        "type": "host-local",
                        "dataDir": self.ipam_dir,
                        "ranges": [[{"subnet": format!("{}.0/24", self.prefix)}]],
                        "routes": [{"dst": "0.0.0.0/0"}]
                    }
                },
                {"type": "portmap", "capabilities": {"portMappings": true}, "snat": true}
            ]
        });
        std::fs::write(
            self.conf_dir.join("10-e2e.conflist"),
            serde_json::to_vec_pretty(&conflist).unwrap(),
        )
        .unwrap();
        std::fs::write(
            self.conf_dir.join("99-loopback.conf"),
            r#"{"cniVersion":"1.0.0","name":"lo","type":"loopback"}"#,
        )
        .unwrap();
    }

    /// host-local's allocation files (one per leased address).
    pub fn allocations(&self) -> Vec<String> {
        std::fs::read_dir(self.ipam_dir.join(&self.name))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(&self.prefix))
            .collect()
    }

    /// Host interfaces enslaved to the bridge (the pods' veths).
    pub fn bridge_ports(&self) -> Vec<String> {
        let out = Command::new("ip").args(["-o", "link", "show", "master", &self.bridge]).output();
        out.map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| l.split(": ").nth(1).map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
    }

    /// iptables rules (any table) that mention `needle` (a sandbox id, in the plugins'
    /// comments and chain names).
    pub fn iptables_rules_mentioning(needle: &str) -> Vec<String> {
        let out = Command::new("iptables-save").output().expect("iptables-save");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_string)
            .collect()
    }

    /// Every leftover of pod `id`: allocations are counted for the whole network.
    pub fn leftovers(&self, id: &str) -> Vec<String> {
        let mut left: Vec<String> =
            self.allocations().into_iter().map(|a| format!("host-local lease {a}")).collect();
        left.extend(self.bridge_ports().into_iter().map(|p| format!("bridge port {p}")));
        left.extend(
            Self::iptables_rules_mentioning(id).into_iter().map(|r| format!("iptables: {r}")),
        );
        left
    }
}

impl Drop for TestNetwork {
    /// CNI never deletes the bridge it made.
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.bridge]).status();
    }
}

/// The host's address on its default route (the node IP kubelet would use).
pub fn node_ip() -> Option<String> {
    let out = Command::new("ip").args(["-4", "-o", "route", "get", "1.1.1.1"]).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut words = text.split_whitespace();
    words.by_ref().find(|w| *w == "src")?;
    words.next().map(str::to_string)
}
