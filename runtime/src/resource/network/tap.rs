//! Carrying the CNI interface into the VM (Kata's tc-redirect model): a tap next to the CNI
//! interface in the pod's namespace, and a tc ingress filter on each that redirects every frame
//! to the other's egress. The guest's virtio-net takes the CNI interface's MAC and MTU, so for
//! the bridge and its neighbours the guest *is* that interface.

use std::fs::File;
use std::path::Path;

use futures::TryStreamExt;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::{Handle, LinkUnspec};

use super::netns::{self, NetnsError};

/// ETH_P_ALL, network byte order as tc wants it.
const ETH_P_ALL_BE: u16 = 0x0003u16.to_be();
/// The ingress qdisc's handle, `ffff:`.
const INGRESS_PARENT: u32 = 0xffff_0000;

/// Errors wiring the tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("starting a netlink runtime: {0}")]
    Runtime(std::io::Error),
    #[error("opening a netlink socket in the pod's namespace: {0}")]
    Netlink(std::io::Error),
    #[error("the pod's namespace has no interface {0}")]
    NoInterface(String),
    #[error("interface {0} has no MAC address")]
    NoMac(String),
    #[error("looking up interface {name}: {source}")]
    GetLink { name: String, source: rtnetlink::Error },
    #[error("creating tap {name}: {source}")]
    OpenTap { name: String, source: podvisor_vmm::devices::net::TapError },
    #[error("setting tap {name} up: {source}")]
    SetLink { name: String, source: rtnetlink::Error },
    #[error("adding the ingress qdisc to {name}: {source}")]
    AddQdisc { name: String, source: rtnetlink::Error },
    #[error("redirecting {from} to {to}: {source}")]
    AddFilter { from: String, to: String, source: rtnetlink::Error },
}

/// The CNI interface as the guest takes it over, and the open tap behind it.
#[derive(Debug)]
pub struct PodLink {
    /// The CNI interface's MAC: the guest's.
    pub mac: String,
    pub mtu: u32,
    pub tap: File,
}

/// In the namespace at `netns`: creates tap `tap_name`, redirects between it and `ifname`
/// both ways, and returns the tap open (with a vnet header). Safe to repeat after a failure:
/// an existing qdisc is reused.
pub fn attach(netns_path: &Path, ifname: &str, tap_name: &str) -> Result<PodLink, TapError> {
    let ifname = ifname.to_string();
    let tap_name = tap_name.to_string();
    netns::run_in(netns_path, move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(TapError::Runtime)?;
        runtime.block_on(attach_here(&ifname, &tap_name))
    })?
}

async fn attach_here(ifname: &str, tap_name: &str) -> Result<PodLink, TapError> {
    let (connection, handle, _) = rtnetlink::new_connection().map_err(TapError::Netlink)?;
    let connection = tokio::spawn(connection);
    let result = wire(&handle, ifname, tap_name).await;
    connection.abort();
    result
}

async fn wire(handle: &Handle, ifname: &str, tap_name: &str) -> Result<PodLink, TapError> {
    let cni = link_by_name(handle, ifname).await?;
    let mac = link_mac(&cni).ok_or_else(|| TapError::NoMac(ifname.to_string()))?;
    let mtu = link_mtu(&cni).unwrap_or(1500);
    let tap = podvisor_vmm::devices::net::tap::open_tap(tap_name)
        .map_err(|source| TapError::OpenTap { name: tap_name.to_string(), source })?;
    let tap_link = link_by_name(handle, tap_name).await?;
    let (cni_index, tap_index) = (cni.header.index, tap_link.header.index);
    handle
        .link()
        .set(LinkUnspec::new_with_index(tap_index).mtu(mtu).up().build())
        .execute()
        .await
        .map_err(|source| TapError::SetLink { name: tap_name.to_string(), source })?;
    for (name, index) in [(ifname, cni_index), (tap_name, tap_index)] {
        add_ingress_qdisc(handle, name, index).await?;
    }
    redirect(handle, (ifname, cni_index), (tap_name, tap_index)).await?;
    redirect(handle, (tap_name, tap_index), (ifname, cni_index)).await?;
    Ok(PodLink { mac: format_mac(&mac), mtu, tap })
}

async fn link_by_name(handle: &Handle, name: &str) -> Result<LinkMessage, TapError> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(link)) => Ok(link),
        Ok(None) => Err(TapError::NoInterface(name.to_string())),
        // The kernel answers ENODEV for a name it does not know.
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => {
            Err(TapError::NoInterface(name.to_string()))
        }
        Err(source) => Err(TapError::GetLink { name: name.to_string(), source }),
    }
}

fn link_mac(link: &LinkMessage) -> Option<Vec<u8>> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(mac) if mac.len() == 6 => Some(mac.clone()),
        _ => None,
    })
}

fn link_mtu(link: &LinkMessage) -> Option<u32> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(mtu) => Some(*mtu),
        _ => None,
    })
}

fn format_mac(mac: &[u8]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

fn is_exists(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -libc::EEXIST)
}

async fn add_ingress_qdisc(handle: &Handle, name: &str, index: u32) -> Result<(), TapError> {
    let index = i32::try_from(index).unwrap_or(i32::MAX);
    match handle.qdisc().add(index).ingress().execute().await {
        Ok(()) => Ok(()),
        Err(e) if is_exists(&e) => Ok(()),
        Err(source) => Err(TapError::AddQdisc { name: name.to_string(), source }),
    }
}

async fn redirect(handle: &Handle, from: (&str, u32), to: (&str, u32)) -> Result<(), TapError> {
    let err =
        |source| TapError::AddFilter { from: from.0.to_string(), to: to.0.to_string(), source };
    let index = i32::try_from(from.1).unwrap_or(i32::MAX);
    handle
        .traffic_filter(index)
        .add()
        .parent(INGRESS_PARENT)
        .protocol(ETH_P_ALL_BE)
        .redirect(to.1)
        .map_err(err)?
        .execute()
        .await
        .map_err(err)
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::process::Command;

    use super::*;

    #[test]
    fn mac_is_printed_lowercase_with_colons() {
        assert_eq!(format_mac(&[0x02, 0x42, 0xAC, 0, 0x0a, 0xff]), "02:42:ac:00:0a:ff");
    }

    /// In a fresh namespace with a veth pair standing in for the CNI interface: a frame the
    /// "guest" writes to the tap leaves by the veth, and one sent into the veth reaches the tap.
    #[test]
    fn frames_cross_between_the_tap_and_the_cni_interface() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let ns = dir.path().join("ns");
        netns::create(&ns).unwrap();
        let ip = |args: &str| {
            let ns = ns.clone();
            let args: Vec<String> = args.split(' ').map(str::to_string).collect();
            netns::run_in(&ns, move || Command::new("ip").args(&args).status().unwrap()).unwrap()
        };
        assert!(ip("link add eth0 mtu 1400 type veth peer name peer0").success());
        assert!(ip("link set eth0 up").success());
        assert!(ip("link set peer0 up").success());
        let link = attach(&ns, "eth0", "tap0").unwrap();
        assert_eq!(link.mtu, 1400);
        assert_eq!(link.mac.len(), 17);
        let missing = attach(&ns, "nope0", "tap1").unwrap_err();
        assert!(matches!(missing, TapError::NoInterface(_)), "{missing}");

        // An AF_PACKET socket on peer0 sees what the tap sends.
        let frame: Vec<u8> =
            [[0xffu8; 6].as_slice(), &[2, 0, 0, 0, 0, 9], &[0x88, 0xb5], b"podvisor-tap-test"]
                .concat();
        let seen = netns::run_in(&ns, {
            let frame = frame.clone();
            let mut tap = link.tap.try_clone().unwrap();
            move || {
                let sock = packet_socket("peer0");
                let mut with_header = vec![0u8; podvisor_vmm::devices::net::VNET_HDR_SIZE];
                with_header.extend_from_slice(&frame);
                tap.write_all(&with_header).unwrap();
                recv_matching(sock, b"podvisor-tap-test")
            }
        })
        .unwrap();
        assert!(seen, "the tap's frame did not leave through the CNI interface");
        let reached = netns::run_in(&ns, {
            let mut tap = link.tap.try_clone().unwrap();
            move || {
                let sock = packet_socket("peer0");
                let out: Vec<u8> =
                    [[0xffu8; 6].as_slice(), &[2, 0, 0, 0, 0, 8], &[0x88, 0xb5], b"to-the-guest"]
                        .concat();
                // SAFETY: `sock` is a bound packet socket; `out` is a valid buffer of its length.
                let sent = unsafe { libc::send(sock, out.as_ptr().cast(), out.len(), 0) };
                assert_eq!(sent as usize, out.len());
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
                let mut buf = [0u8; 2048];
                while std::time::Instant::now() < deadline {
                    match tap.read(&mut buf) {
                        Ok(n) if buf[..n].windows(12).any(|w| w == b"to-the-guest") => return true,
                        Ok(_) => {}
                        Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
                    }
                }
                false
            }
        })
        .unwrap();
        assert!(reached, "a frame into the CNI interface did not reach the tap");
        netns::remove(&ns).unwrap();
    }

    fn packet_socket(ifname: &str) -> i32 {
        let name = std::ffi::CString::new(ifname).unwrap();
        // SAFETY: plain socket/if_nametoindex/bind calls with valid, initialised arguments.
        unsafe {
            let sock = libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK,
                i32::from(ETH_P_ALL_BE),
            );
            assert!(sock >= 0);
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = ETH_P_ALL_BE;
            addr.sll_ifindex = libc::if_nametoindex(name.as_ptr()) as i32;
            let len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            assert_eq!(libc::bind(sock, (&addr as *const libc::sockaddr_ll).cast(), len), 0);
            sock
        }
    }

    fn recv_matching(sock: i32, needle: &[u8]) -> bool {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let mut buf = [0u8; 2048];
        while std::time::Instant::now() < deadline {
            // SAFETY: `buf` is a valid writable buffer of its length.
            let n = unsafe { libc::recv(sock, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n > 0 && buf[..n as usize].windows(needle.len()).any(|w| w == needle) {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        false
    }
}
