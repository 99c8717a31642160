//! The pod's network inside the guest (SetupNetwork): the CNI result's interfaces (found by
//! MAC), their addresses and MTU, routes, over rtnetlink; and the pod's lines in the hosts file.
//!
//! The whole request is checked before anything changes. Applying it again changes nothing:
//! links that already carry their name are not taken down, and addresses or routes that exist
//! (EEXIST) count as added.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::fs::{self, OpenOptions};
use std::io::{self, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use futures::TryStreamExt;
use ipnet::IpNet;
use podvisor_proto::agent::SetupNetworkRequest;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::packet_route::route::RouteScope;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

pub const MAX_INTERFACES: usize = 16;
pub const MAX_ADDRESSES: usize = 64;
pub const MAX_ROUTES: usize = 256;
pub const MAX_HOSTS: usize = 64;
pub const MAX_NAMES_PER_HOST: usize = 64;
/// IFNAMSIZ less the NUL.
const MAX_IFNAME_BYTES: usize = 15;
/// The smallest MTU IPv4 allows; the device's own bounds are the kernel's to check.
const MIN_MTU: u32 = 68;
const MAX_MTU: u32 = 65535;
/// The longest name a hosts line may carry (a DNS name).
const MAX_HOSTS_NAME_BYTES: usize = 253;

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("too many {what}: {count}, at most {max}")]
    TooMany { what: &'static str, count: usize, max: usize },
    #[error("invalid MAC {0:?}: use 6 hex octets separated by ':' of a unicast, non-zero address")]
    BadMac(String),
    #[error("invalid interface name {0:?}: use 1-{MAX_IFNAME_BYTES} bytes of [A-Za-z0-9_.-]")]
    BadInterfaceName(String),
    #[error("MAC {0} is listed twice")]
    DuplicateMac(String),
    #[error("interface name {0:?} is listed twice")]
    DuplicateName(String),
    #[error("invalid MTU {1} for {0}: use 0 (keep) or {MIN_MTU}-{MAX_MTU}")]
    BadMtu(String, u32),
    #[error("invalid address {address:?} for {interface}: use IP/prefix of a unicast address")]
    BadAddress { interface: String, address: String },
    #[error("invalid route destination {0:?}: use a network in CIDR notation (no host bits)")]
    BadDestination(String),
    #[error(
        "invalid gateway {gateway:?} for route {destination}: use empty or a unicast address of \
         the destination's family"
    )]
    BadGateway { destination: String, gateway: String },
    #[error("route {destination} leaves by {interface:?}, which the request does not list")]
    UnknownRouteInterface { destination: String, interface: String },
    #[error("invalid hosts entry address {0:?}")]
    BadHostIp(String),
    #[error("invalid host name {0:?}")]
    BadHostName(String),
    #[error("hosts entry {0} has no names")]
    NoHostNames(String),
    #[error("opening a netlink socket: {0}")]
    Connect(io::Error),
    #[error("listing network links: {0}")]
    ListLinks(io::Error),
    #[error("the guest has no loopback interface")]
    NoLoopback,
    #[error("bringing up the loopback interface: {0}")]
    LoopbackUp(io::Error),
    #[error("no network device has MAC {0}")]
    LinkNotFound(String),
    #[error("several network devices have MAC {0}: {1:?}")]
    AmbiguousMac(String, Vec<String>),
    #[error(
        "cannot name the device with MAC {mac} {name:?}: device {name:?} is not in the request"
    )]
    NameTaken { name: String, mac: String },
    #[error("taking {0} down: {1}")]
    SetDown(String, io::Error),
    #[error("renaming {from} to {to}: {source}")]
    Rename { from: String, to: String, source: io::Error },
    #[error("setting the MTU of {0} to {1}: {2}")]
    SetMtu(String, u32, io::Error),
    #[error("bringing {0} up: {1}")]
    SetUp(String, io::Error),
    #[error("adding address {address} to {interface}: {source}")]
    AddAddress { address: IpNet, interface: String, source: io::Error },
    #[error("adding route {destination} via {gateway} dev {interface}: {source}")]
    AddRoute { destination: IpNet, gateway: String, interface: String, source: io::Error },
    #[error("writing {0}: {1}")]
    WriteHosts(PathBuf, io::Error),
    #[error("changing the MAC of {0} to {1}: {2}")]
    SetMac(String, String, io::Error),
}

impl NetworkError {
    /// Whether the request itself is at fault: a malformed field, or a value the kernel
    /// refuses (an MTU beyond the device's range, a gateway no earlier route reaches).
    pub fn is_bad_request(&self) -> bool {
        match self {
            NetworkError::TooMany { .. }
            | NetworkError::BadMac(_)
            | NetworkError::BadInterfaceName(_)
            | NetworkError::DuplicateMac(_)
            | NetworkError::DuplicateName(_)
            | NetworkError::BadMtu(..)
            | NetworkError::BadAddress { .. }
            | NetworkError::BadDestination(_)
            | NetworkError::BadGateway { .. }
            | NetworkError::UnknownRouteInterface { .. }
            | NetworkError::BadHostIp(_)
            | NetworkError::BadHostName(_)
            | NetworkError::NoHostNames(_) => true,
            NetworkError::SetMtu(_, _, e) => e.raw_os_error() == Some(libc::EINVAL),
            NetworkError::AddRoute { source, .. } => {
                source.raw_os_error() == Some(libc::ENETUNREACH)
            }
            _ => false,
        }
    }

    /// Whether the VM's devices do not match the request (retrying cannot help).
    pub fn is_precondition(&self) -> bool {
        matches!(
            self,
            NetworkError::LinkNotFound(_)
                | NetworkError::AmbiguousMac(..)
                | NetworkError::NameTaken { .. }
        )
    }
}

pub type Mac = [u8; 6];

fn mac_string(mac: &Mac) -> String {
    let octets: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
    octets.join(":")
}

/// "02:42:0a:58:00:05" (either case); all-zero and multicast addresses name no device.
fn parse_mac(text: &str) -> Result<Mac, NetworkError> {
    let bad = || NetworkError::BadMac(text.to_string());
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for octet in &mut mac {
        let part = parts.next().ok_or_else(bad)?;
        if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        *octet = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() || mac == [0; 6] || mac[0] & 1 == 1 {
        return Err(bad());
    }
    Ok(mac)
}

fn valid_ifname(name: &str) -> bool {
    (1..=MAX_IFNAME_BYTES).contains(&name.len())
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// A name for a hosts line: a DNS name of at most 253 bytes whose labels each pass the
/// pod-hostname check (hostAliases may be longer than a hostname).
fn valid_hosts_name(name: &str) -> bool {
    name.len() <= MAX_HOSTS_NAME_BYTES && name.split('.').all(crate::sandbox::valid_hostname)
}

fn unicast(ip: IpAddr) -> bool {
    !ip.is_unspecified() && !ip.is_multicast()
}

/// One interface of a checked request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    mac: Mac,
    name: String,
    mtu: u32,
    addresses: Vec<IpNet>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    destination: IpNet,
    gateway: Option<IpAddr>,
    /// Index into [`Plan::interfaces`].
    interface: usize,
}

/// One hosts line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostLine {
    ip: IpAddr,
    names: Vec<String>,
}

/// A checked SetupNetwork request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    interfaces: Vec<Interface>,
    routes: Vec<Route>,
    pub hosts: Vec<HostLine>,
}

fn at_most(what: &'static str, count: usize, max: usize) -> Result<(), NetworkError> {
    if count > max {
        return Err(NetworkError::TooMany { what, count, max });
    }
    Ok(())
}

impl Plan {
    /// Checks the whole request; nothing is applied unless all of it is valid.
    pub fn from_request(req: &SetupNetworkRequest) -> Result<Plan, NetworkError> {
        at_most("interfaces", req.interfaces.len(), MAX_INTERFACES)?;
        at_most("routes", req.routes.len(), MAX_ROUTES)?;
        at_most("hosts entries", req.hosts.len(), MAX_HOSTS)?;
        let mut interfaces: Vec<Interface> = Vec::with_capacity(req.interfaces.len());
        for iface in &req.interfaces {
            let mac = parse_mac(&iface.mac)?;
            if !valid_ifname(&iface.name) {
                return Err(NetworkError::BadInterfaceName(iface.name.clone()));
            }
            if interfaces.iter().any(|i| i.mac == mac) {
                return Err(NetworkError::DuplicateMac(mac_string(&mac)));
            }
            if interfaces.iter().any(|i| i.name == iface.name) {
                return Err(NetworkError::DuplicateName(iface.name.clone()));
            }
            if iface.mtu != 0 && !(MIN_MTU..=MAX_MTU).contains(&iface.mtu) {
                return Err(NetworkError::BadMtu(iface.name.clone(), iface.mtu));
            }
            at_most("addresses on one interface", iface.addresses.len(), MAX_ADDRESSES)?;
            let addresses = iface
                .addresses
                .iter()
                .map(|a| match a.parse::<IpNet>() {
                    Ok(net) if unicast(net.addr()) => Ok(net),
                    _ => Err(NetworkError::BadAddress {
                        interface: iface.name.clone(),
                        address: a.clone(),
                    }),
                })
                .collect::<Result<Vec<_>, _>>()?;
            interfaces.push(Interface { mac, name: iface.name.clone(), mtu: iface.mtu, addresses });
        }
        let routes = req
            .routes
            .iter()
            .map(|r| {
                let destination = match r.destination.parse::<IpNet>() {
                    // The kernel refuses a destination with host bits set.
                    Ok(net) if net.trunc() == net => net,
                    _ => return Err(NetworkError::BadDestination(r.destination.clone())),
                };
                let gateway = if r.gateway.is_empty() {
                    None
                } else {
                    match r.gateway.parse::<IpAddr>() {
                        Ok(gw) if unicast(gw) && gw.is_ipv4() == destination.addr().is_ipv4() => {
                            Some(gw)
                        }
                        _ => {
                            return Err(NetworkError::BadGateway {
                                destination: r.destination.clone(),
                                gateway: r.gateway.clone(),
                            })
                        }
                    }
                };
                let interface =
                    interfaces.iter().position(|i| i.name == r.interface).ok_or_else(|| {
                        NetworkError::UnknownRouteInterface {
                            destination: r.destination.clone(),
                            interface: r.interface.clone(),
                        }
                    })?;
                Ok(Route { destination, gateway, interface })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let hosts = req
            .hosts
            .iter()
            .map(|h| {
                let ip =
                    h.ip.parse::<IpAddr>().map_err(|_| NetworkError::BadHostIp(h.ip.clone()))?;
                if h.names.is_empty() {
                    return Err(NetworkError::NoHostNames(h.ip.clone()));
                }
                at_most("names in one hosts entry", h.names.len(), MAX_NAMES_PER_HOST)?;
                if let Some(bad) = h.names.iter().find(|n| !valid_hosts_name(n)) {
                    return Err(NetworkError::BadHostName(bad.clone()));
                }
                Ok(HostLine { ip, names: h.names.clone() })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Plan { interfaces, routes, hosts })
    }
}

/// What the hosts file is rebuilt from: the hostname of CreateSandbox and the lines of
/// SetupNetwork, whichever came last.
#[derive(Debug, Default)]
pub struct PodHosts {
    pub hostname: String,
    pub lines: Vec<HostLine>,
}

/// The pod's own hosts lines, `<ip>\t<names>`, in request order.
pub fn host_lines(lines: &[HostLine]) -> String {
    let mut out = String::new();
    for line in lines {
        let _ = writeln!(out, "{}\t{}", line.ip, line.names.join(" "));
    }
    out
}

/// Rewrites `path` in place: containers bind-mount the sandbox's hosts file itself, so its
/// inode must stay. The new text is written over the old before the file is cut to length,
/// so a reader never finds it empty.
pub fn write_in_place(path: &Path, contents: &str) -> Result<(), NetworkError> {
    let err = |e| NetworkError::WriteHosts(path.to_path_buf(), e);
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(err)?;
    }
    let mut file =
        OpenOptions::new().write(true).create(true).truncate(false).open(path).map_err(err)?;
    file.write_all(contents.as_bytes()).map_err(err)?;
    file.set_len(contents.len() as u64).map_err(err)
}

/// rtnetlink's error as the errno the kernel answered, when it did.
fn io_error(e: rtnetlink::Error) -> io::Error {
    match e {
        rtnetlink::Error::NetlinkError(msg) => msg.to_io(),
        other => io::Error::other(other),
    }
}

/// EEXIST is success for an add: the request was applied before.
fn added(result: Result<(), rtnetlink::Error>) -> Result<(), io::Error> {
    match result.map_err(io_error) {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        other => other,
    }
}

/// A link as the kernel lists it.
#[derive(Debug)]
struct Link {
    index: u32,
    name: String,
    mac: Vec<u8>,
    up: bool,
}

impl Link {
    fn from_message(msg: LinkMessage) -> Link {
        let mut link = Link {
            index: msg.header.index,
            name: String::new(),
            mac: Vec::new(),
            up: msg.header.flags.contains(LinkFlags::Up),
        };
        for attr in msg.attributes {
            match attr {
                LinkAttribute::IfName(name) => link.name = name,
                LinkAttribute::Address(mac) => link.mac = mac,
                _ => {}
            }
        }
        link
    }
}

async fn links(handle: &Handle) -> Result<Vec<Link>, NetworkError> {
    let messages: Vec<LinkMessage> = handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(|e| NetworkError::ListLinks(io_error(e)))?;
    Ok(messages.into_iter().map(Link::from_message).collect())
}

/// The netlink connection's task, ended with the request (also when the RPC is dropped).
struct Connection(tokio::task::JoinHandle<()>);

impl Drop for Connection {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A requested interface and the device it names.
struct Resolved<'a> {
    iface: &'a Interface,
    index: u32,
    name: String,
    up: bool,
}

/// Finds each interface's device, and checks every rename can happen, before any change.
fn resolve<'a>(plan: &'a Plan, links: &[Link]) -> Result<Vec<Resolved<'a>>, NetworkError> {
    let resolved = plan
        .interfaces
        .iter()
        .map(|iface| {
            let matches: Vec<&Link> = links.iter().filter(|l| l.mac == iface.mac).collect();
            let link = match matches.as_slice() {
                [] => return Err(NetworkError::LinkNotFound(mac_string(&iface.mac))),
                [one] => *one,
                // A device renamed by an earlier request is the one meant.
                many => many.iter().find(|l| l.name == iface.name).copied().ok_or_else(|| {
                    NetworkError::AmbiguousMac(
                        mac_string(&iface.mac),
                        many.iter().map(|l| l.name.clone()).collect(),
                    )
                })?,
            };
            Ok(Resolved { iface, index: link.index, name: link.name.clone(), up: link.up })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let ours: HashSet<u32> = resolved.iter().map(|r| r.index).collect();
    for r in &resolved {
        let taken_by_other = links
            .iter()
            .any(|l| l.name == r.iface.name && l.index != r.index && !ours.contains(&l.index));
        if taken_by_other {
            return Err(NetworkError::NameTaken {
                name: r.iface.name.clone(),
                mac: mac_string(&r.iface.mac),
            });
        }
    }
    Ok(resolved)
}

async fn set_link(handle: &Handle, msg: LinkMessage) -> Result<(), io::Error> {
    handle.link().set(msg).execute().await.map_err(io_error)
}

async fn rename(handle: &Handle, r: &mut Resolved<'_>, to: String) -> Result<(), NetworkError> {
    set_link(handle, LinkUnspec::new_with_index(r.index).name(to.clone()).build())
        .await
        .map_err(|source| NetworkError::Rename { from: r.name.clone(), to: to.clone(), source })?;
    r.name = to;
    Ok(())
}

async fn add_address(handle: &Handle, index: u32, address: IpNet) -> Result<(), io::Error> {
    let mut req = handle.address().add(index, address.addr(), address.prefix_len());
    if address.addr().is_ipv6() {
        // The CNI IPAM made the address unique; duplicate address detection would only leave
        // it tentative (unbindable) for the first second of the pod's life.
        req.message_mut().attributes.push(AddressAttribute::Flags(AddressFlags::Nodad));
    }
    added(req.execute().await)
}

async fn add_route(handle: &Handle, route: &Route, index: u32) -> Result<(), io::Error> {
    let msg = match (route.destination, route.gateway) {
        (IpNet::V4(dst), gateway) => {
            let mut b = RouteMessageBuilder::<Ipv4Addr>::new().output_interface(index);
            if dst.prefix_len() > 0 {
                b = b.destination_prefix(dst.addr(), dst.prefix_len());
            }
            match gateway {
                Some(IpAddr::V4(gw)) => b.gateway(gw),
                // On-link, as `ip route add` scopes a gatewayless IPv4 route.
                _ => b.scope(RouteScope::Link),
            }
            .build()
        }
        (IpNet::V6(dst), gateway) => {
            let mut b = RouteMessageBuilder::<Ipv6Addr>::new().output_interface(index);
            if dst.prefix_len() > 0 {
                b = b.destination_prefix(dst.addr(), dst.prefix_len());
            }
            if let Some(IpAddr::V6(gw)) = gateway {
                b = b.gateway(gw);
            }
            b.build()
        }
    };
    added(handle.route().add(msg).execute().await)
}

/// Checked MAC changes of a CreateSandbox request (see [`change_macs`]).
pub fn mac_changes(
    changes: &[podvisor_proto::agent::MacChange],
) -> Result<Vec<(Mac, Mac)>, NetworkError> {
    at_most("MAC changes", changes.len(), MAX_INTERFACES)?;
    changes.iter().map(|c| Ok((parse_mac(&c.from)?, parse_mac(&c.to)?))).collect()
}

/// Gives the device with each change's first MAC the second: a VM restored from a template
/// carries the template's MACs until then, and SetupNetwork finds devices by MAC. A device
/// already carrying its new MAC (a repeated request) is left alone.
pub async fn change_macs(changes: &[(Mac, Mac)]) -> Result<(), NetworkError> {
    if changes.is_empty() {
        return Ok(());
    }
    let (connection, handle, _) = rtnetlink::new_connection().map_err(NetworkError::Connect)?;
    let _connection = Connection(tokio::spawn(connection));
    let links = links(&handle).await?;
    for (from, to) in changes {
        if links.iter().any(|l| l.mac == to) {
            continue;
        }
        let link = links
            .iter()
            .find(|l| l.mac == from)
            .ok_or_else(|| NetworkError::LinkNotFound(mac_string(from)))?;
        let failed = |e| NetworkError::SetMac(link.name.clone(), mac_string(to), e);
        if link.up {
            set_link(&handle, LinkUnspec::new_with_index(link.index).down().build())
                .await
                .map_err(|e| NetworkError::SetDown(link.name.clone(), e))?;
        }
        set_link(&handle, LinkUnspec::new_with_index(link.index).address(to.to_vec()).build())
            .await
            .map_err(failed)?;
    }
    Ok(())
}

/// Configures the guest's links: loopback up, then each interface renamed, sized, up and
/// addressed, then the routes in order.
pub async fn apply(plan: &Plan) -> Result<(), NetworkError> {
    let (connection, handle, _) = rtnetlink::new_connection().map_err(NetworkError::Connect)?;
    let _connection = Connection(tokio::spawn(connection));
    let links = links(&handle).await?;

    let lo = links.iter().find(|l| l.name == "lo").ok_or(NetworkError::NoLoopback)?;
    if !lo.up {
        set_link(&handle, LinkUnspec::new_with_index(lo.index).up().build())
            .await
            .map_err(NetworkError::LoopbackUp)?;
    }

    let mut resolved = resolve(plan, &links)?;
    let names: HashSet<&str> = links.iter().map(|l| l.name.as_str()).collect();
    let renamed: Vec<usize> =
        (0..resolved.len()).filter(|&i| resolved[i].name != resolved[i].iface.name).collect();
    // A link that keeps its name stays up: taking it down would drop its IPv6 addresses and
    // routes under running containers on a repeated request.
    for &i in &renamed {
        let r = &mut resolved[i];
        if r.up {
            set_link(&handle, LinkUnspec::new_with_index(r.index).down().build())
                .await
                .map_err(|e| NetworkError::SetDown(r.name.clone(), e))?;
            r.up = false;
        }
    }
    // Names swapped between devices (eth0 <-> eth1) go through names nobody holds first.
    if renamed.iter().any(|&i| names.contains(resolved[i].iface.name.as_str())) {
        for &i in &renamed {
            let temporary = format!("pvtmp{}", resolved[i].index);
            rename(&handle, &mut resolved[i], temporary).await?;
        }
    }
    for &i in &renamed {
        let name = resolved[i].iface.name.clone();
        rename(&handle, &mut resolved[i], name).await?;
    }
    for r in &resolved {
        if r.iface.mtu != 0 {
            set_link(&handle, LinkUnspec::new_with_index(r.index).mtu(r.iface.mtu).build())
                .await
                .map_err(|e| NetworkError::SetMtu(r.name.clone(), r.iface.mtu, e))?;
        }
        set_link(&handle, LinkUnspec::new_with_index(r.index).up().build())
            .await
            .map_err(|e| NetworkError::SetUp(r.name.clone(), e))?;
        for &address in &r.iface.addresses {
            add_address(&handle, r.index, address).await.map_err(|source| {
                NetworkError::AddAddress { address, interface: r.name.clone(), source }
            })?;
        }
    }
    for route in &plan.routes {
        let r = &resolved[route.interface];
        add_route(&handle, route, r.index).await.map_err(|source| NetworkError::AddRoute {
            destination: route.destination,
            gateway: route.gateway.map_or_else(|| "(on-link)".to_string(), |g| g.to_string()),
            interface: r.name.clone(),
            source,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use podvisor_proto::agent::{HostEntry, NetInterface, NetRoute};

    fn iface(mac: &str, name: &str, addresses: &[&str]) -> NetInterface {
        NetInterface {
            mac: mac.into(),
            name: name.into(),
            mtu: 0,
            addresses: addresses.iter().map(|a| a.to_string()).collect(),
        }
    }

    fn route(destination: &str, gateway: &str, interface: &str) -> NetRoute {
        NetRoute {
            destination: destination.into(),
            gateway: gateway.into(),
            interface: interface.into(),
        }
    }

    fn host(ip: &str, names: &[&str]) -> HostEntry {
        HostEntry { ip: ip.into(), names: names.iter().map(|n| n.to_string()).collect() }
    }

    fn good() -> SetupNetworkRequest {
        SetupNetworkRequest {
            interfaces: vec![NetInterface {
                mtu: 1450,
                ..iface("02:42:0A:58:00:05", "eth0", &["10.88.0.5/16", "fd00:10::5/64"])
            }],
            routes: vec![
                route("0.0.0.0/0", "10.88.0.1", "eth0"),
                route("10.96.0.0/12", "", "eth0"),
                route("::/0", "fd00:10::1", "eth0"),
            ],
            hosts: vec![host("10.88.0.5", &["my-pod"])],
        }
    }

    #[test]
    fn a_cni_result_is_accepted() {
        let plan = Plan::from_request(&good()).unwrap();
        assert_eq!(plan.interfaces[0].mac, [0x02, 0x42, 0x0a, 0x58, 0x00, 0x05]);
        assert_eq!(plan.interfaces[0].mtu, 1450);
        assert_eq!(plan.interfaces[0].addresses[1], "fd00:10::5/64".parse::<IpNet>().unwrap());
        assert_eq!(plan.routes[0].gateway, Some(IpAddr::from([10, 88, 0, 1])));
        assert_eq!(plan.routes[1].gateway, None);
        assert_eq!(plan.routes[2].interface, 0);
        assert!(Plan::from_request(&SetupNetworkRequest::default()).unwrap().interfaces.is_empty());
    }

    #[test]
    fn mac_changes_are_checked() {
        use podvisor_proto::agent::MacChange;
        let change = |from: &str, to: &str| MacChange { from: from.into(), to: to.into() };
        let good = mac_changes(&[change("02:00:00:00:00:01", "02:42:0a:58:00:05")]).unwrap();
        assert_eq!(good, vec![([2, 0, 0, 0, 0, 1], [2, 0x42, 0x0a, 0x58, 0, 5])]);
        let err = mac_changes(&[change("02:00:00:00:00:01", "ff:ff:ff:ff:ff:ff")]).unwrap_err();
        assert!(err.is_bad_request(), "{err}");
        let many = vec![change("02:00:00:00:00:01", "02:00:00:00:00:02"); MAX_INTERFACES + 1];
        assert!(mac_changes(&many).unwrap_err().is_bad_request());
    }

    #[test]
    fn macs_are_six_hex_octets_of_a_unicast_address() {
        assert_eq!(parse_mac("02:42:0a:58:00:05").unwrap(), [2, 0x42, 0x0a, 0x58, 0, 5]);
        assert_eq!(parse_mac("AA:BB:CC:DD:EE:FE").unwrap(), [0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xfe]);
        for bad in [
            "",
            "02:42:0a:58:00",
            "02:42:0a:58:00:05:06",
            "02:42:0a:58:00:5",
            "02:42:0a:58:00:005",
            "02-42-0a-58-00-05",
            "02:42:0a:58:00:0g",
            "02:42:0a:58:00:+5",
            "02:42:0a:58:00:05:",
            "00:00:00:00:00:00",
            "01:00:5e:00:00:01",
            "ff:ff:ff:ff:ff:ff",
            "é2:42:0a:58:00:05",
        ] {
            assert!(matches!(parse_mac(bad), Err(NetworkError::BadMac(_))), "{bad:?}");
        }
    }

    fn refused(req: SetupNetworkRequest) -> NetworkError {
        let err = Plan::from_request(&req).unwrap_err();
        assert!(err.is_bad_request(), "{err}");
        err
    }

    #[test]
    fn bad_interfaces_are_refused() {
        for name in ["", "a".repeat(16).as_str(), "eth 0", "eth/0", "eth:0", ".", "..", "éth0"] {
            let req = SetupNetworkRequest {
                interfaces: vec![iface("02:00:00:00:00:01", name, &[])],
                ..Default::default()
            };
            assert!(matches!(refused(req), NetworkError::BadInterfaceName(_)), "{name:?}");
        }
        let ok = SetupNetworkRequest {
            interfaces: vec![iface("02:00:00:00:00:01", &"a-b_c.d".repeat(2)[..14], &[])],
            ..Default::default()
        };
        assert!(Plan::from_request(&ok).is_ok());
        for address in [
            "10.88.0.5",
            "10.88.0.5/33",
            "fd00::5/129",
            "0.0.0.0/0",
            "224.0.0.1/4",
            "ff02::1/16",
            "x/8",
            "",
        ] {
            let req = SetupNetworkRequest {
                interfaces: vec![iface("02:00:00:00:00:01", "eth0", &[address])],
                ..Default::default()
            };
            assert!(matches!(refused(req), NetworkError::BadAddress { .. }), "{address:?}");
        }
        for mtu in [1, 67, 65536, u32::MAX] {
            let mut req = good();
            req.interfaces[0].mtu = mtu;
            assert!(matches!(refused(req), NetworkError::BadMtu(..)), "{mtu}");
        }
        let mut req = good();
        req.interfaces.push(iface("02:42:0a:58:00:05", "eth1", &[]));
        assert!(matches!(refused(req), NetworkError::DuplicateMac(_)));
        let mut req = good();
        req.interfaces.push(iface("02:42:0a:58:00:06", "eth0", &[]));
        assert!(matches!(refused(req), NetworkError::DuplicateName(_)));
    }

    #[test]
    fn bad_routes_are_refused() {
        for destination in ["10.96.0.1/12", "10.96.0.0", "::1/0", "10.96.0.0/40", "default", ""] {
            let mut req = good();
            req.routes.push(route(destination, "", "eth0"));
            assert!(matches!(refused(req), NetworkError::BadDestination(_)), "{destination:?}");
        }
        for (destination, gateway) in [
            ("0.0.0.0/0", "fd00:10::1"),
            ("::/0", "10.88.0.1"),
            ("0.0.0.0/0", "0.0.0.0"),
            ("0.0.0.0/0", "224.0.0.1"),
            ("0.0.0.0/0", "10.88.0.1/16"),
            ("0.0.0.0/0", " 10.88.0.1"),
        ] {
            let mut req = good();
            req.routes.push(route(destination, gateway, "eth0"));
            assert!(matches!(refused(req), NetworkError::BadGateway { .. }), "{gateway:?}");
        }
        for interface in ["eth1", "", "lo"] {
            let mut req = good();
            req.routes.push(route("10.0.0.0/8", "", interface));
            assert!(
                matches!(refused(req), NetworkError::UnknownRouteInterface { .. }),
                "{interface:?}"
            );
        }
    }

    #[test]
    fn bad_hosts_entries_are_refused() {
        for ip in ["", "my-pod", "10.88.0.5/16", "10.88.0.256"] {
            let mut req = good();
            req.hosts.push(host(ip, &["a"]));
            assert!(matches!(refused(req), NetworkError::BadHostIp(_)), "{ip:?}");
        }
        let long = ["a".repeat(63).as_str(); 4].join(".");
        for name in ["", "two words", "tab\tname", "new\nline", "#comment", "a..b", &long] {
            let mut req = good();
            req.hosts.push(host("10.0.0.1", &["ok", name]));
            assert!(matches!(refused(req), NetworkError::BadHostName(_)), "{name:?}");
        }
        let mut req = good();
        req.hosts.push(host("10.0.0.1", &[]));
        assert!(matches!(refused(req), NetworkError::NoHostNames(_)));
        // Names longer than a hostname are fine as long as each label is.
        let fqdn = ["a".repeat(60).as_str(); 4].join(".");
        let mut req = good();
        req.hosts.push(host("10.0.0.1", &[&fqdn, "svc.ns.svc.cluster.local"]));
        assert!(Plan::from_request(&req).is_ok());
    }

    #[test]
    fn sizes_are_bounded() {
        let mut req = SetupNetworkRequest::default();
        for i in 0..=MAX_INTERFACES {
            req.interfaces.push(iface(&format!("02:00:00:00:00:{i:02x}"), &format!("eth{i}"), &[]));
        }
        assert!(matches!(refused(req), NetworkError::TooMany { what: "interfaces", .. }));
        let mut req = good();
        req.interfaces[0].addresses =
            (0..=MAX_ADDRESSES).map(|i| format!("10.0.0.{i}/8")).collect();
        assert!(matches!(refused(req), NetworkError::TooMany { .. }));
        let mut req = good();
        req.routes = (0..=MAX_ROUTES).map(|_| route("10.0.0.0/8", "", "eth0")).collect();
        assert!(matches!(refused(req), NetworkError::TooMany { what: "routes", .. }));
        let mut req = good();
        req.hosts = (0..=MAX_HOSTS).map(|_| host("10.0.0.1", &["a"])).collect();
        assert!(matches!(refused(req), NetworkError::TooMany { .. }));
        let mut req = good();
        let names: Vec<String> = (0..=MAX_NAMES_PER_HOST).map(|i| format!("n{i}")).collect();
        req.hosts = vec![HostEntry { ip: "10.0.0.1".into(), names }];
        assert!(matches!(refused(req), NetworkError::TooMany { .. }));
    }

    #[test]
    fn hosts_lines_are_tab_separated_in_order() {
        let mut req = good();
        req.hosts.push(host("FD00:10:0::5", &["my-pod", "my-pod.ns"]));
        let plan = Plan::from_request(&req).unwrap();
        assert_eq!(host_lines(&plan.hosts), "10.88.0.5\tmy-pod\nfd00:10::5\tmy-pod my-pod.ns\n");
        assert_eq!(host_lines(&[]), "");
    }

    #[test]
    fn hosts_file_is_rewritten_in_place() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sandbox/hosts");
        write_in_place(&path, "a long first version\nwith two lines\n").unwrap();
        let inode = fs::metadata(&path).unwrap().ino();
        write_in_place(&path, "short\n").unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "short\n");
        assert_eq!(fs::metadata(&path).unwrap().ino(), inode);
        write_in_place(&path, "short\nand longer again\n").unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "short\nand longer again\n");
    }

    /// The netlink part for real, in a network namespace of the test's own thread.
    #[test]
    fn links_addresses_and_routes_in_a_fresh_network_namespace() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipping: not root");
            return;
        }
        std::thread::spawn(|| {
            // Moves this thread only: the test process's other threads keep the host's network,
            // and the namespace (with its veth pair) goes when the thread ends.
            if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET) {
                eprintln!("skipping: unshare(CLONE_NEWNET): {e}");
                return;
            }
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(netns_checks());
        })
        .join()
        .unwrap();
    }

    fn named<'a>(links: &'a [Link], name: &str) -> &'a Link {
        links.iter().find(|l| l.name == name).unwrap_or_else(|| panic!("no {name}: {links:?}"))
    }

    fn mac_of(link: &Link) -> String {
        mac_string(&link.mac.clone().try_into().unwrap())
    }

    /// Routes of the main table as "dst/len via gw dev index".
    async fn routes(handle: &Handle) -> Vec<String> {
        use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
        let mut out = Vec::new();
        let v4 = RouteMessageBuilder::<Ipv4Addr>::new().build();
        let v6 = RouteMessageBuilder::<Ipv6Addr>::new().build();
        for query in [v4, v6] {
            let messages: Vec<RouteMessage> =
                handle.route().get(query).execute().try_collect().await.unwrap();
            for m in messages {
                let (mut dst, mut gw, mut dev) = (String::from("default"), None, 0);
                for attr in &m.attributes {
                    match attr {
                        RouteAttribute::Destination(RouteAddress::Inet(a)) => dst = a.to_string(),
                        RouteAttribute::Destination(RouteAddress::Inet6(a)) => dst = a.to_string(),
                        RouteAttribute::Gateway(RouteAddress::Inet(a)) => gw = Some(a.to_string()),
                        RouteAttribute::Gateway(RouteAddress::Inet6(a)) => gw = Some(a.to_string()),
                        RouteAttribute::Oif(i) => dev = *i,
                        _ => {}
                    }
                }
                let len = m.header.destination_prefix_length;
                let via = gw.map(|g| format!(" via {g}")).unwrap_or_default();
                out.push(format!("{dst}/{len}{via} dev {dev}"));
            }
        }
        out
    }

    /// Addresses as "address/len dev index", each with whether it still waits for DAD.
    async fn addresses(handle: &Handle) -> Vec<(String, bool)> {
        use rtnetlink::packet_route::address::AddressMessage;
        let messages: Vec<AddressMessage> =
            handle.address().get().execute().try_collect().await.unwrap();
        let mut out = Vec::new();
        for m in messages {
            let mut address = None;
            let mut tentative = false;
            for attr in &m.attributes {
                match attr {
                    AddressAttribute::Address(a) => address = Some(*a),
                    AddressAttribute::Flags(f) => tentative = f.contains(AddressFlags::Tentative),
                    _ => {}
                }
            }
            if let Some(a) = address {
                out.push((
                    format!("{a}/{} dev {}", m.header.prefix_len, m.header.index),
                    tentative,
                ));
            }
        }
        out
    }

    async fn netns_checks() {
        let (connection, handle, _) = rtnetlink::new_connection().unwrap();
        let _connection = Connection(tokio::spawn(connection));
        handle.link().add(rtnetlink::LinkVeth::new("v0", "v1").build()).execute().await.unwrap();
        let before = links(&handle).await.unwrap();
        let (mac0, mac1) = (mac_of(named(&before, "v0")), mac_of(named(&before, "v1")));
        let req = SetupNetworkRequest {
            interfaces: vec![
                NetInterface {
                    mtu: 1400,
                    ..iface(&mac0, "eth0", &["10.88.0.5/16", "fd00:10::5/64"])
                },
                iface(&mac1, "eth1", &["192.168.5.2/24"]),
            ],
            routes: vec![
                route("0.0.0.0/0", "10.88.0.1", "eth0"),
                route("10.200.0.0/16", "", "eth1"),
                route("::/0", "fd00:10::1", "eth0"),
                route("fd00:20::/64", "", "eth1"),
            ],
            hosts: vec![],
        };
        let plan = Plan::from_request(&req).unwrap();
        apply(&plan).await.unwrap();
        // Again: nothing changes, nothing fails.
        apply(&plan).await.unwrap();

        let after = links(&handle).await.unwrap();
        assert!(named(&after, "lo").up);
        let (eth0, eth1) = (named(&after, "eth0"), named(&after, "eth1"));
        assert_eq!((mac_of(eth0), mac_of(eth1)), (mac0.clone(), mac1.clone()));
        assert!(eth0.up && eth1.up);
        assert!(!after.iter().any(|l| l.name == "v0" || l.name == "v1"));
        let messages: Vec<LinkMessage> =
            handle.link().get().match_index(eth0.index).execute().try_collect().await.unwrap();
        assert!(messages[0].attributes.contains(&LinkAttribute::Mtu(1400)));

        let addrs = addresses(&handle).await;
        for want in [
            format!("10.88.0.5/16 dev {}", eth0.index),
            format!("fd00:10::5/64 dev {}", eth0.index),
            format!("192.168.5.2/24 dev {}", eth1.index),
        ] {
            // Not tentative: the pod's IPv6 address can be bound at once.
            assert!(addrs.contains(&(want.clone(), false)), "{want} not in {addrs:?}");
        }
        let routes = routes(&handle).await;
        for want in [
            format!("default/0 via 10.88.0.1 dev {}", eth0.index),
            format!("10.200.0.0/16 dev {}", eth1.index),
            format!("default/0 via fd00:10::1 dev {}", eth0.index),
            format!("fd00:20::/64 dev {}", eth1.index),
        ] {
            assert!(routes.contains(&want), "{want} not in {routes:?}");
        }

        // Swapped names go through temporary ones.
        let swap = SetupNetworkRequest {
            interfaces: vec![iface(&mac0, "eth1", &[]), iface(&mac1, "eth0", &[])],
            ..Default::default()
        };
        apply(&Plan::from_request(&swap).unwrap()).await.unwrap();
        let swapped = links(&handle).await.unwrap();
        assert_eq!(mac_of(named(&swapped, "eth1")), mac0);
        assert_eq!(mac_of(named(&swapped, "eth0")), mac1);

        let missing = SetupNetworkRequest {
            interfaces: vec![iface("02:00:00:00:00:99", "eth9", &[])],
            ..Default::default()
        };
        let err = apply(&Plan::from_request(&missing).unwrap()).await.unwrap_err();
        assert!(matches!(err, NetworkError::LinkNotFound(_)) && err.is_precondition(), "{err}");
        let taken =
            SetupNetworkRequest { interfaces: vec![iface(&mac0, "lo", &[])], ..Default::default() };
        let err = apply(&Plan::from_request(&taken).unwrap()).await.unwrap_err();
        assert!(matches!(err, NetworkError::NameTaken { .. }) && err.is_precondition(), "{err}");
        assert_eq!(mac_of(named(&links(&handle).await.unwrap(), "eth1")), mac0, "renamed anyway");
        let unreachable = SetupNetworkRequest {
            interfaces: vec![iface(&mac0, "eth1", &[])],
            routes: vec![route("10.0.0.0/8", "172.31.0.1", "eth1")],
            ..Default::default()
        };
        let err = apply(&Plan::from_request(&unreachable).unwrap()).await.unwrap_err();
        assert!(matches!(err, NetworkError::AddRoute { .. }) && err.is_bad_request(), "{err}");
    }
}
