//! Pod networking: each pod gets a network namespace on the host, the configured CNI plugins
//! attach it to the node's network (ADD at start, DEL at stop, also after a failed ADD or a
//! crash), and the CNI interface is carried into the VM through a tap (see [`tap`]). The guest
//! agent then configures the interface from the CNI result ([`NetworkSetup`]).
//!
//! What DEL needs is persisted before ADD runs ([`NetworkRecord`] in the sandbox record):
//! the namespace path, the network list and the attachment's arguments as ADD saw them, and
//! the result once there is one. A daemon killed at any point can therefore still DEL.

pub mod cni;
pub mod netns;
pub mod tap;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::agent::{GuestInterface, GuestRoute, NetworkSetup};
use crate::config::NetworkSection;
use crate::hypervisor::{NetDevice, TapFd};
use cni::{Attachment, CniError, NetworkList, Plugins};

/// The interface CNI creates in the pod's namespace, and the guest's name for it.
pub const POD_IFNAME: &str = "eth0";
/// The tap next to it.
const TAP_NAME: &str = "tap0";

/// Errors of pod networking.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("the pod network is not ready: {0}")]
    NotReady(CniError),
    #[error("creating the pod's network namespace: {0}")]
    CreateNetns(netns::NetnsError),
    #[error("removing the pod's network namespace: {0}")]
    RemoveNetns(netns::NetnsError),
    #[error("CNI ADD: {0}")]
    Add(CniError),
    #[error("CNI DEL: {0}")]
    Del(CniError),
    #[error("CNI CHECK: {0}")]
    Check(CniError),
    #[error("the CNI result gives the pod no usable address: {0}")]
    BadResult(String),
    #[error("carrying the pod interface into the VM: {0}")]
    Tap(#[from] tap::TapError),
    #[error("entering the pod's namespace for its counters: {0}")]
    Counters(netns::NetnsError),
    #[error("reading the pod's interface counters: {0}")]
    ReadCounters(String),
    #[error("annotation {key}: {reason}")]
    BadAnnotation { key: String, reason: String },
}

pub type Result<T> = std::result::Result<T, NetworkError>;

/// A hostPort mapping (CRI `PortMapping`, in our words).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMapping {
    /// `tcp`, `udp` or `sctp`.
    pub protocol: String,
    pub container_port: u16,
    pub host_port: u16,
    /// Empty: every host address.
    pub host_ip: String,
}

/// What the pod asks of the network.
#[derive(Debug, Clone, Default)]
pub struct NetworkRequest {
    pub sandbox_id: String,
    pub pod_namespace: String,
    pub pod_name: String,
    pub pod_uid: String,
    pub port_mappings: Vec<PortMapping>,
    pub annotations: std::collections::HashMap<String, String>,
}

/// What a pod's network is, persisted with the sandbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetworkRecord {
    pub netns: PathBuf,
    /// The network list as ADD used it: DEL uses the same even if the configuration changed.
    pub network: NetworkList,
    pub container_id: String,
    pub ifname: String,
    pub cni_args: Vec<(String, String)>,
    pub capabilities: BTreeMap<String, Value>,
    /// ADD's result, once ADD succeeded.
    #[serde(default)]
    pub result: Option<Value>,
}

impl NetworkRecord {
    fn attachment(&self) -> Attachment {
        Attachment {
            container_id: self.container_id.clone(),
            netns: self.netns.clone(),
            ifname: self.ifname.clone(),
            args: self.cni_args.clone(),
            capabilities: self.capabilities.clone(),
        }
    }

    /// The pod's addresses, IPv4 first (PodSandboxStatus' ip, then additional_ips).
    pub fn pod_ips(&self) -> Vec<IpAddr> {
        let Some(result) = &self.result else { return Vec::new() };
        let mut ips: Vec<IpAddr> = parse_result(result, &self.netns, &self.ifname)
            .map(|r| r.addresses)
            .unwrap_or_default()
            .iter()
            .map(IpNet::addr)
            .collect();
        ips.sort_by_key(|ip| ip.is_ipv6());
        ips
    }
}

/// A pod attached to the network: the device its VM gets and what the guest configures.
#[derive(Debug)]
pub struct AttachedNetwork {
    pub net_device: NetDevice,
    pub guest: NetworkSetup,
}

/// The node's pod networking.
#[derive(Debug, Clone)]
pub struct PodNetworks {
    config: NetworkSection,
    netns_dir: PathBuf,
}

impl PodNetworks {
    pub fn new(config: NetworkSection, netns_dir: PathBuf) -> Self {
        Self { config, netns_dir }
    }

    /// Whether pods get CNI networking at all.
    pub fn enabled(&self) -> bool {
        self.config.enabled
    }

    fn plugins(&self) -> Plugins {
        Plugins { bin_dirs: self.config.cni_bin_dirs.clone() }
    }

    /// The network pods would join now, with every plugin installed; re-read on each call so
    /// that a configuration written after the daemon started is picked up.
    pub fn ready(&self) -> std::result::Result<NetworkList, CniError> {
        let list = NetworkList::load_first(&self.config.cni_conf_dir)?;
        self.plugins().check_installed(&list)?;
        Ok(list)
    }

    /// What DEL will need, decided before anything is created (persist it, then [`Self::add`]).
    pub fn plan(&self, request: &NetworkRequest) -> Result<NetworkRecord> {
        let network = self.ready().map_err(NetworkError::NotReady)?;
        Ok(NetworkRecord {
            netns: self.netns_dir.join(&request.sandbox_id),
            network,
            container_id: request.sandbox_id.clone(),
            ifname: POD_IFNAME.to_string(),
            cni_args: vec![
                ("K8S_POD_NAMESPACE".into(), request.pod_namespace.clone()),
                ("K8S_POD_NAME".into(), request.pod_name.clone()),
                ("K8S_POD_INFRA_CONTAINER_ID".into(), request.sandbox_id.clone()),
                ("K8S_POD_UID".into(), request.pod_uid.clone()),
            ],
            capabilities: capabilities(request)?,
            result: None,
        })
    }

    /// Creates the namespace and runs ADD; returns the result to persist.
    pub async fn add(&self, record: &NetworkRecord) -> Result<Value> {
        std::fs::create_dir_all(&self.netns_dir).map_err(|source| {
            NetworkError::CreateNetns(netns::NetnsError::CreateFile {
                path: self.netns_dir.clone(),
                source,
            })
        })?;
        let path = record.netns.clone();
        tokio::task::spawn_blocking(move || netns::create(&path))
            .await
            .map_err(|_| NetworkError::CreateNetns(netns::NetnsError::Thread))?
            .map_err(NetworkError::CreateNetns)?;
        let result = self
            .plugins()
            .add(&record.network, &record.attachment())
            .await
            .map_err(NetworkError::Add)?;
        // Refuse a result the guest could not use before the VM is built around it.
        parse_result(&result, &record.netns, &record.ifname)?;
        Ok(result)
    }

    /// Wires the tap for the VM and says what the guest configures. `record` has a result.
    pub async fn attach(&self, record: &NetworkRecord) -> Result<AttachedNetwork> {
        let result = record
            .result
            .as_ref()
            .ok_or_else(|| NetworkError::BadResult("ADD has not run".into()))?;
        let parsed = parse_result(result, &record.netns, &record.ifname)?;
        let (netns_path, ifname) = (record.netns.clone(), record.ifname.clone());
        let link = tokio::task::spawn_blocking(move || tap::attach(&netns_path, &ifname, TAP_NAME))
            .await
            .map_err(|_| NetworkError::Tap(tap::TapError::Netns(netns::NetnsError::Thread)))??;
        let guest = NetworkSetup {
            interfaces: vec![GuestInterface {
                mac: link.mac.clone(),
                name: record.ifname.clone(),
                mtu: link.mtu,
                addresses: parsed.addresses,
            }],
            routes: parsed
                .routes
                .into_iter()
                .map(|(destination, gateway)| GuestRoute {
                    destination,
                    gateway,
                    interface: record.ifname.clone(),
                })
                .collect(),
            // The sandbox layer knows the hostname they name.
            hosts: Vec::new(),
        };
        let net_device = NetDevice {
            id: record.ifname.clone(),
            tap: TAP_NAME.to_string(),
            mac: link.mac,
            tap_fd: Some(TapFd(std::sync::Arc::new(link.tap.into()))),
        };
        Ok(AttachedNetwork { net_device, guest })
    }

    /// CHECK on a running pod's attachment.
    pub async fn check(&self, record: &NetworkRecord) -> Result<()> {
        let Some(result) = &record.result else { return Ok(()) };
        self.plugins()
            .check(&record.network, &record.attachment(), result)
            .await
            .map_err(NetworkError::Check)
    }

    /// Unpins the network namespaces of pods not in `known` (sandbox ids). A pin is made only
    /// after its pod's record names it, so one without a record is what a daemon killed
    /// between removing the record and the pin left: DEL already ran or has nothing to free.
    /// Returns the pins removed.
    pub fn sweep_pins(&self, known: &std::collections::HashSet<String>) -> Vec<PathBuf> {
        let Ok(entries) = std::fs::read_dir(&self.netns_dir) else { return Vec::new() };
        let mut removed = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if known.contains(&name) {
                continue;
            }
            match netns::remove(&entry.path()) {
                Ok(()) => removed.push(entry.path()),
                Err(e) => tracing::warn!(error = %e, "removing a stray network namespace pin"),
            }
        }
        removed
    }

    /// DEL, then the namespace goes. Idempotent; runs also when ADD failed or never finished.
    pub async fn remove(&self, record: &NetworkRecord) -> Result<()> {
        self.plugins()
            .del(&record.network, &record.attachment(), record.result.as_ref())
            .await
            .map_err(NetworkError::Del)?;
        let path = record.netns.clone();
        tokio::task::spawn_blocking(move || netns::remove(&path))
            .await
            .map_err(|_| NetworkError::RemoveNetns(netns::NetnsError::Thread))?
            .map_err(NetworkError::RemoveNetns)
    }
}

/// Traffic counters of the pod's interface (the CNI side, which sees exactly what the guest
/// sends and receives).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InterfaceCounters {
    pub name: String,
    pub rx_bytes: u64,
    pub rx_errors: u64,
    pub tx_bytes: u64,
    pub tx_errors: u64,
}

impl PodNetworks {
    /// The counters of the pod's interface, read inside its namespace.
    pub async fn counters(&self, record: &NetworkRecord) -> Result<InterfaceCounters> {
        let (path, ifname) = (record.netns.clone(), record.ifname.clone());
        let text = tokio::task::spawn_blocking(move || {
            netns::run_in(&path, || std::fs::read_to_string("/proc/thread-self/net/dev"))
        })
        .await
        .map_err(|_| NetworkError::Counters(netns::NetnsError::Thread))?
        .map_err(NetworkError::Counters)?
        .map_err(|source| NetworkError::ReadCounters(source.to_string()))?;
        parse_net_dev(&text, &ifname)
            .ok_or_else(|| NetworkError::ReadCounters(format!("no {ifname} in /proc/net/dev")))
    }
}

/// One interface's line of `/proc/net/dev`: rx bytes, packets, errs, ... (8 fields), then tx.
fn parse_net_dev(text: &str, ifname: &str) -> Option<InterfaceCounters> {
    text.lines().skip(2).find_map(|line| {
        let (name, fields) = line.split_once(':')?;
        if name.trim() != ifname {
            return None;
        }
        let n: Vec<u64> = fields.split_whitespace().filter_map(|f| f.parse().ok()).collect();
        (n.len() >= 16).then(|| InterfaceCounters {
            name: ifname.to_string(),
            rx_bytes: n[0],
            rx_errors: n[2],
            tx_bytes: n[8],
            tx_errors: n[10],
        })
    })
}

/// The runtime capabilities plugins may ask for, from the pod's request.
fn capabilities(request: &NetworkRequest) -> Result<BTreeMap<String, Value>> {
    let mut caps = BTreeMap::new();
    let mappings: Vec<Value> = request
        .port_mappings
        .iter()
        .filter(|m| m.host_port > 0)
        .map(|m| {
            json!({
                "hostPort": m.host_port,
                "containerPort": m.container_port,
                "protocol": m.protocol,
                "hostIP": m.host_ip,
            })
        })
        .collect();
    if !mappings.is_empty() {
        caps.insert("portMappings".into(), Value::Array(mappings));
    }
    let rate = |key: &str| -> Result<Option<u64>> {
        request
            .annotations
            .get(key)
            .map(|v| {
                parse_bandwidth(v)
                    .map_err(|reason| NetworkError::BadAnnotation { key: key.into(), reason })
            })
            .transpose()
    };
    let ingress = rate("kubernetes.io/ingress-bandwidth")?;
    let egress = rate("kubernetes.io/egress-bandwidth")?;
    if ingress.is_some() || egress.is_some() {
        // As containerd: a rate with the largest burst the bandwidth plugin accepts.
        let mut bw = serde_json::Map::new();
        if let Some(rate) = ingress {
            bw.insert("ingressRate".into(), rate.into());
            bw.insert("ingressBurst".into(), u64::from(u32::MAX).into());
        }
        if let Some(rate) = egress {
            bw.insert("egressRate".into(), rate.into());
            bw.insert("egressBurst".into(), u64::from(u32::MAX).into());
        }
        caps.insert("bandwidth".into(), Value::Object(bw));
    }
    Ok(caps)
}

/// A Kubernetes quantity of bits per second ("10M", "1Gi", "500k"), 1 kbit/s to 1 Pbit/s as
/// kubelet's bandwidth shaping allows.
pub fn parse_bandwidth(text: &str) -> std::result::Result<u64, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let number: f64 = number.parse().map_err(|_| format!("{text:?} is not a quantity"))?;
    let scale: f64 = match suffix {
        "" => 1.0,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        _ => return Err(format!("{text:?} has an unknown suffix {suffix:?}")),
    };
    let bits = number * scale;
    if !(1e3..=1e15).contains(&bits) {
        return Err(format!("{text:?} is outside 1k..1P bits per second"));
    }
    Ok(bits as u64)
}

/// The pod's side of a CNI result.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ParsedResult {
    addresses: Vec<IpNet>,
    /// Destination and gateway (`None`: on-link).
    routes: Vec<(IpNet, Option<IpAddr>)>,
}

/// Reads the addresses of interface `ifname` in `netns` and the routes from a CNI result
/// (spec 0.3.x–1.0: `interfaces`, `ips` with an `interface` index, `routes`).
fn parse_result(result: &Value, netns: &Path, ifname: &str) -> Result<ParsedResult> {
    let bad = |why: &str| NetworkError::BadResult(why.to_string());
    let interfaces =
        result.get("interfaces").and_then(Value::as_array).cloned().unwrap_or_default();
    // The index of our interface, if the result lists interfaces at all.
    let ours = interfaces.iter().position(|i| {
        i.get("name").and_then(Value::as_str) == Some(ifname)
            && i.get("sandbox").and_then(Value::as_str).is_some_and(|s| Path::new(s) == netns)
    });
    let mut addresses = Vec::new();
    let mut gateways: Vec<IpAddr> = Vec::new();
    for ip in result.get("ips").and_then(Value::as_array).into_iter().flatten() {
        let index = ip.get("interface").and_then(Value::as_u64).map(|i| i as usize);
        if index.is_some() && ours.is_some() && index != ours {
            continue;
        }
        let address: IpNet = ip
            .get("address")
            .and_then(Value::as_str)
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| bad("an ips entry has no valid address"))?;
        if let Some(gw) = ip.get("gateway").and_then(Value::as_str) {
            gateways.push(gw.parse().map_err(|_| bad("an ips entry has an invalid gateway"))?);
        }
        addresses.push(address);
    }
    if addresses.is_empty() {
        return Err(bad("no IP address for the pod's interface"));
    }
    let mut routes = Vec::new();
    for route in result.get("routes").and_then(Value::as_array).into_iter().flatten() {
        let destination: IpNet = route
            .get("dst")
            .and_then(Value::as_str)
            .and_then(|d| d.parse().ok())
            .ok_or_else(|| bad("a route has no valid dst"))?;
        let gateway = match route.get("gw").and_then(Value::as_str) {
            Some(gw) => Some(gw.parse().map_err(|_| bad("a route has an invalid gw"))?),
            // CNI: without gw the plugin's default gateway (that of the same family) applies.
            None => gateways.iter().copied().find(|g| g.is_ipv4() == destination.addr().is_ipv4()),
        };
        routes.push((destination, gateway));
    }
    Ok(ParsedResult { addresses, routes })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bridge_result() -> Value {
        json!({
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": "cni0", "mac": "aa:bb:cc:00:00:01"},
                {"name": "veth1234", "mac": "aa:bb:cc:00:00:02"},
                {"name": "eth0", "mac": "aa:bb:cc:00:00:03", "sandbox": "/run/podvisor/netns/abc"}
            ],
            "ips": [
                {"interface": 2, "address": "10.88.0.5/16", "gateway": "10.88.0.1"},
                {"interface": 2, "address": "fd00:10::5/64", "gateway": "fd00:10::1"},
                {"interface": 0, "address": "10.88.0.1/16"}
            ],
            "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}, {"dst": "192.168.0.0/16", "gw": "10.88.0.254"}],
            "dns": {}
        })
    }

    #[test]
    fn result_gives_our_interfaces_addresses_and_routes_with_default_gateways() {
        let parsed =
            parse_result(&bridge_result(), Path::new("/run/podvisor/netns/abc"), "eth0").unwrap();
        assert_eq!(
            parsed.addresses,
            vec!["10.88.0.5/16".parse::<IpNet>().unwrap(), "fd00:10::5/64".parse().unwrap()]
        );
        assert_eq!(
            parsed.routes,
            vec![
                ("0.0.0.0/0".parse().unwrap(), Some("10.88.0.1".parse().unwrap())),
                ("::/0".parse().unwrap(), Some("fd00:10::1".parse().unwrap())),
                ("192.168.0.0/16".parse().unwrap(), Some("10.88.0.254".parse().unwrap())),
            ]
        );
    }

    #[test]
    fn results_without_addresses_or_with_garbage_are_refused() {
        let ns = Path::new("/n");
        for bad in [
            json!({}),
            json!({"ips": []}),
            json!({"ips": [{"address": "nonsense"}]}),
            json!({"ips": [{"address": "10.0.0.2/24", "gateway": "x"}]}),
            json!({"ips": [{"address": "10.0.0.2/24"}], "routes": [{"gw": "10.0.0.1"}]}),
        ] {
            assert!(parse_result(&bad, ns, "eth0").is_err(), "{bad}");
        }
        // A plugin that lists no interfaces (0.3-era host-device style) still gives addresses.
        let plain = json!({"ips": [{"address": "10.0.0.2/24"}]});
        assert_eq!(parse_result(&plain, ns, "eth0").unwrap().routes, vec![]);
    }

    #[test]
    fn pod_ips_put_ipv4_first() {
        let list = NetworkList::parse(
            Path::new("/x"),
            r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"bridge"}]}"#,
        )
        .unwrap();
        let mut result = bridge_result();
        result["ips"].as_array_mut().unwrap().reverse();
        let rec = NetworkRecord {
            netns: "/run/podvisor/netns/abc".into(),
            network: list,
            container_id: "abc".into(),
            ifname: "eth0".into(),
            cni_args: vec![],
            capabilities: BTreeMap::new(),
            result: Some(result),
        };
        assert_eq!(
            rec.pod_ips(),
            vec!["10.88.0.5".parse::<IpAddr>().unwrap(), "fd00:10::5".parse().unwrap()]
        );
        let round_trip: NetworkRecord =
            serde_json::from_str(&serde_json::to_string(&rec).unwrap()).unwrap();
        assert_eq!(round_trip, rec);
    }

    #[test]
    fn capabilities_come_from_host_ports_and_bandwidth_annotations() {
        let mut req = NetworkRequest {
            port_mappings: vec![
                PortMapping {
                    protocol: "tcp".into(),
                    container_port: 80,
                    host_port: 8080,
                    host_ip: "".into(),
                },
                PortMapping {
                    protocol: "udp".into(),
                    container_port: 53,
                    host_port: 0,
                    host_ip: "".into(),
                },
            ],
            ..Default::default()
        };
        req.annotations.insert("kubernetes.io/ingress-bandwidth".into(), "10M".into());
        let caps = capabilities(&req).unwrap();
        assert_eq!(
            caps["portMappings"],
            json!([{"hostPort": 8080, "containerPort": 80, "protocol": "tcp", "hostIP": ""}])
        );
        assert_eq!(
            caps["bandwidth"],
            json!({"ingressRate": 10_000_000u64, "ingressBurst": 4294967295u64})
        );
        req.annotations.insert("kubernetes.io/egress-bandwidth".into(), "lots".into());
        assert!(matches!(capabilities(&req), Err(NetworkError::BadAnnotation { .. })));
        assert!(capabilities(&NetworkRequest::default()).unwrap().is_empty());
    }

    #[test]
    fn the_default_network_make_run_installs_parses() {
        let text = include_str!("../../../../etc/10-podvisor.conflist");
        let list = NetworkList::parse(Path::new("10-podvisor.conflist"), text).unwrap();
        assert_eq!(list.plugin_types().collect::<Vec<_>>(), ["bridge", "portmap"]);
    }

    #[test]
    fn net_dev_lines_give_the_interfaces_counters() {
        let text = "Inter-|   Receive                            |  Transmit\n \
            face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    \
            lo:       0       0    0    0    0     0          0         0        0       0    0    0    0     0       0          0\n  \
            eth0:  123456     100    2    0    0     0          0         0    65432      90    1    0    0     0       0          0\n";
        let c = parse_net_dev(text, "eth0").unwrap();
        assert_eq!((c.rx_bytes, c.rx_errors, c.tx_bytes, c.tx_errors), (123456, 2, 65432, 1));
        assert!(parse_net_dev(text, "eth1").is_none());
        assert!(parse_net_dev("garbage", "eth0").is_none());
    }

    #[test]
    fn bandwidth_quantities() {
        assert_eq!(parse_bandwidth("1M"), Ok(1_000_000));
        assert_eq!(parse_bandwidth("1.5G"), Ok(1_500_000_000));
        assert_eq!(parse_bandwidth("2Ki"), Ok(2048));
        assert_eq!(parse_bandwidth("100000"), Ok(100_000));
        for bad in ["", "M", "10X", "1", "2P0", "9E", "-1M"] {
            assert!(parse_bandwidth(bad).is_err(), "{bad}");
        }
    }
}
