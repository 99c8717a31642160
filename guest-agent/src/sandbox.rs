//! Pod-level set-up: hostname, the hosts/resolv.conf files the host's spec bind-mounts into
//! containers, sysctls and the virtio-fs shares.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use nix::mount::MsFlags;
use podvisor_proto::agent::CreateSandboxRequest;

/// virtio-fs shares are mounted strictly below this guest directory (the agent's run dir).
const SHARE_ROOT: &str = "/run/podvisor";
/// The longest virtio-fs tag: the size of the tag field in the device's config space.
const MAX_TAG_BYTES: usize = 36;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("invalid hostname {0:?}")]
    BadHostname(String),
    #[error("invalid sysctl name {0:?}")]
    BadSysctl(String),
    #[error("invalid DNS entry {0:?}")]
    BadDnsEntry(String),
    #[error("writing {0}: {1}")]
    Write(PathBuf, std::io::Error),
    #[error("setting the hostname: {0}")]
    SetHostname(nix::Error),
    #[error("setting sysctl {0}: {1}")]
    Sysctl(String, std::io::Error),
    #[error("invalid virtio-fs tag {0:?}: use 1-{MAX_TAG_BYTES} bytes, no NUL")]
    BadShareTag(String),
    #[error(
        "invalid share path {0:?}: it must be absolute, below {SHARE_ROOT}/, without '..', and \
         outside the agent's own directories"
    )]
    BadSharePath(String),
    #[error("creating the mount point {0}: {1}")]
    CreateMountPoint(PathBuf, std::io::Error),
    #[error("mounting virtio-fs tag {0:?} at {1}: {2}")]
    MountShare(String, PathBuf, nix::Error),
    #[error("making the share at {0} a shared mount: {1}")]
    ShareMountShared(PathBuf, nix::Error),
    #[error("setting the guest clock: {0}")]
    SetClock(nix::Error),
    #[error("{0} bytes of entropy: at most {MAX_ENTROPY_BYTES}")]
    TooMuchEntropy(usize),
    #[error("reseeding the guest RNG: {0}")]
    Reseed(std::io::Error),
}

/// The most host entropy CreateSandbox may carry (the kernel's input pool is 256 bits; more
/// does no harm but there is no reason to take it).
const MAX_ENTROPY_BYTES: usize = 512;

/// `_IOW('R', 0x03, int[2])` and `_IO('R', 0x07)` from <linux/random.h>.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Mixes `entropy` into the kernel's input pool, credited, then reseeds the CRNG from it, so
/// what the guest draws from now on differs from every other VM restored from one template.
fn reseed(entropy: &[u8]) -> Result<(), SandboxError> {
    use std::os::fd::AsRawFd;
    let random =
        fs::OpenOptions::new().write(true).open("/dev/urandom").map_err(SandboxError::Reseed)?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }, the buffer
    // padded to whole u32s.
    let words = entropy.len().div_ceil(4);
    let mut info = vec![0u32; 2 + words];
    info[0] = u32::try_from(entropy.len() * 8).unwrap_or(u32::MAX);
    info[1] = u32::try_from(entropy.len()).unwrap_or(u32::MAX);
    for (i, chunk) in entropy.chunks(4).enumerate() {
        let mut word = [0u8; 4];
        word[..chunk.len()].copy_from_slice(chunk);
        info[2 + i] = u32::from_ne_bytes(word);
    }
    // SAFETY: `info` is a live rand_pool_info whose buf_size bytes follow its header; the
    // kernel only reads it. The fd is open for the call's duration.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) } < 0 {
        return Err(SandboxError::Reseed(std::io::Error::last_os_error()));
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG as _) } < 0 {
        return Err(SandboxError::Reseed(std::io::Error::last_os_error()));
    }
    Ok(())
}

pub(crate) fn valid_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

fn valid_dns_entry(entry: &str) -> bool {
    !entry.is_empty() && !entry.contains(|c: char| c.is_whitespace() || c.is_control())
}

/// /proc/sys path of a sysctl, refusing names that could leave /proc/sys.
pub(crate) fn sysctl_path(name: &str) -> Result<PathBuf, SandboxError> {
    let ok = !name.is_empty()
        && name.split(['.', '/']).all(|part| !part.is_empty() && part != ".." && part != ".")
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'/' | b'_' | b'-'));
    if !ok {
        return Err(SandboxError::BadSysctl(name.to_string()));
    }
    Ok(Path::new("/proc/sys").join(name.replace('.', "/")))
}

/// One virtio-fs share to mount, checked.
#[derive(Debug, PartialEq, Eq)]
struct Share {
    tag: String,
    path: PathBuf,
    read_only: bool,
}

fn share_tag(tag: &str) -> Result<String, SandboxError> {
    if tag.is_empty() || tag.len() > MAX_TAG_BYTES || tag.contains('\0') {
        return Err(SandboxError::BadShareTag(tag.to_string()));
    }
    Ok(tag.to_string())
}

/// A share's guest path, refusing anything that is not strictly below [`SHARE_ROOT`] or that
/// would cover the agent's own directories.
fn share_path(path: &str) -> Result<PathBuf, SandboxError> {
    let root = Path::new(SHARE_ROOT);
    let candidate = Path::new(path);
    let ok = candidate.is_absolute()
        && !path.contains('\0')
        && !candidate.components().any(|c| c == std::path::Component::ParentDir)
        && candidate.starts_with(root)
        && candidate != root
        && !crate::container::AGENT_DIRS.iter().any(|dir| candidate.starts_with(root.join(dir)));
    if !ok {
        return Err(SandboxError::BadSharePath(path.to_string()));
    }
    // Components drop `.` and doubled slashes.
    Ok(candidate.components().collect())
}

/// The shares to mount, in order: the request's list, or with an empty list and
/// `mount_shared_fs` the single image share of older hosts at `shared_dir`.
fn shares(req: &CreateSandboxRequest, shared_dir: &Path) -> Result<Vec<Share>, SandboxError> {
    if req.shared_fs.is_empty() {
        if !req.mount_shared_fs {
            return Ok(Vec::new());
        }
        // Mounted as before shares were listed, without MS_RDONLY: older hosts bind writable
        // volumes into this share too, and keep its read-only parts read-only themselves.
        return Ok(vec![Share {
            tag: podvisor_proto::SHARED_FS_TAG.to_string(),
            path: shared_dir.to_path_buf(),
            read_only: false,
        }]);
    }
    req.shared_fs
        .iter()
        .map(|share| {
            Ok(Share {
                tag: share_tag(&share.tag)?,
                path: share_path(&share.guest_path)?,
                read_only: share.read_only,
            })
        })
        .collect()
}

fn mount_share(share: &Share) -> Result<(), SandboxError> {
    fs::create_dir_all(&share.path)
        .map_err(|e| SandboxError::CreateMountPoint(share.path.clone(), e))?;
    let flags = if share.read_only { MsFlags::MS_RDONLY } else { MsFlags::empty() };
    match nix::mount::mount(
        Some(share.tag.as_str()),
        &share.path,
        Some("virtiofs"),
        flags,
        None::<&str>,
    ) {
        // EBUSY: already mounted there (CreateSandbox retried).
        Ok(()) | Err(nix::Error::EBUSY) => {}
        Err(e) => return Err(SandboxError::MountShare(share.tag.clone(), share.path.clone(), e)),
    }
    // Shared, so a container's mounts under an rshared volume reach the pod's other
    // containers of that volume (their binds are peers or slaves of this mount).
    nix::mount::mount(None::<&str>, &share.path, None::<&str>, MsFlags::MS_SHARED, None::<&str>)
        .map_err(|e| SandboxError::ShareMountShared(share.path.clone(), e))
}

pub(crate) fn hosts_file(hostname: &str) -> String {
    let mut hosts = String::from(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n\
         fe00::0\tip6-localnet\nfe00::0\tip6-mcastprefix\nfe00::1\tip6-allnodes\n\
         fe00::2\tip6-allrouters\n",
    );
    if !hostname.is_empty() {
        let _ = writeln!(hosts, "127.0.1.1\t{hostname}");
    }
    hosts
}

pub(crate) fn resolv_conf(req: &CreateSandboxRequest) -> String {
    let mut out = String::new();
    for server in &req.dns_servers {
        let _ = writeln!(out, "nameserver {server}");
    }
    if !req.dns_searches.is_empty() {
        let _ = writeln!(out, "search {}", req.dns_searches.join(" "));
    }
    if !req.dns_options.is_empty() {
        let _ = writeln!(out, "options {}", req.dns_options.join(" "));
    }
    out
}

fn write(path: PathBuf, contents: &str) -> Result<(), SandboxError> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(|e| SandboxError::Write(parent.to_path_buf(), e))?;
    }
    fs::write(&path, contents).map_err(|e| SandboxError::Write(path, e))
}

/// What [`create`] applies, checked before anything is touched.
pub struct Checked {
    sysctls: Vec<(String, PathBuf, String)>,
    shares: Vec<Share>,
}

/// Validates a CreateSandbox request without touching anything (hostname, DNS entries,
/// sysctl names, shares).
pub fn check(req: &CreateSandboxRequest, shared_dir: &Path) -> Result<Checked, SandboxError> {
    if !req.hostname.is_empty() && !valid_hostname(&req.hostname) {
        return Err(SandboxError::BadHostname(req.hostname.clone()));
    }
    for entry in req.dns_servers.iter().chain(&req.dns_searches).chain(&req.dns_options) {
        if !valid_dns_entry(entry) {
            return Err(SandboxError::BadDnsEntry(entry.clone()));
        }
    }
    let sysctls = req
        .sysctls
        .iter()
        .map(|(k, v)| sysctl_path(k).map(|p| (k.clone(), p, v.clone())))
        .collect::<Result<Vec<_>, _>>()?;
    let shares = shares(req, shared_dir)?;
    Ok(Checked { sysctls, shares })
}

/// Applies the sandbox settings. `sandbox_dir` receives hostname/hosts/resolv.conf; `guest`
/// says whether the agent owns the machine (hostname, sysctls, /etc, mounts). `pod_hosts`
/// ends the hosts file: the lines of an earlier SetupNetwork, kept across a repeated create.
pub fn create(
    req: &CreateSandboxRequest,
    sandbox_dir: &Path,
    shared_dir: &Path,
    guest: bool,
    pod_hosts: &str,
) -> Result<(), SandboxError> {
    let Checked { sysctls, shares } = check(req, shared_dir)?;
    let hosts = hosts_file(&req.hostname) + pod_hosts;
    let resolv = resolv_conf(req);
    write(sandbox_dir.join("hostname"), &format!("{}\n", req.hostname))?;
    write(sandbox_dir.join("hosts"), &hosts)?;
    write(sandbox_dir.join("resolv.conf"), &resolv)?;
    if req.entropy.len() > MAX_ENTROPY_BYTES {
        return Err(SandboxError::TooMuchEntropy(req.entropy.len()));
    }
    if !guest {
        return Ok(());
    }
    // First: nothing below should draw randomness the template's other VMs drew too.
    if !req.entropy.is_empty() {
        reseed(&req.entropy)?;
    }
    if req.host_time_unix_nanos > 0 {
        let nanos = req.host_time_unix_nanos;
        let now = nix::sys::time::TimeSpec::new(nanos / 1_000_000_000, nanos % 1_000_000_000);
        nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, now)
            .map_err(SandboxError::SetClock)?;
    }
    if !req.hostname.is_empty() {
        nix::unistd::sethostname(&req.hostname).map_err(SandboxError::SetHostname)?;
        write(PathBuf::from("/etc/hostname"), &format!("{}\n", req.hostname))?;
    }
    write(PathBuf::from("/etc/hosts"), &hosts)?;
    write(PathBuf::from("/etc/resolv.conf"), &resolv)?;
    for (name, path, value) in sysctls {
        fs::write(&path, value).map_err(|e| SandboxError::Sysctl(name, e))?;
    }
    for share in &shares {
        mount_share(share)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use podvisor_proto::agent::SharedFs;

    /// The reseed ioctls take host entropy (as root, as the agent runs in the guest); too much
    /// is refused before anything changes.
    #[test]
    fn host_entropy_reseeds_the_rng() {
        if nix::unistd::geteuid().is_root() {
            reseed(&[0x5a; 61]).unwrap();
        }
        let req = CreateSandboxRequest { entropy: vec![0; 513], ..Default::default() };
        let dir = tempfile::tempdir().unwrap();
        let err = create(&req, dir.path(), dir.path(), false, "").unwrap_err();
        assert!(matches!(err, SandboxError::TooMuchEntropy(513)), "{err}");
    }

    #[test]
    fn sysctl_names_stay_under_proc_sys() {
        assert_eq!(
            sysctl_path("net.ipv4.ip_forward").ok(),
            Some(PathBuf::from("/proc/sys/net/ipv4/ip_forward"))
        );
        for bad in ["", "..", "net/../../etc", "a..b", "a b"] {
            assert!(sysctl_path(bad).is_err(), "{bad}");
        }
    }

    fn share(tag: &str, guest_path: &str, read_only: bool) -> SharedFs {
        SharedFs { tag: tag.into(), guest_path: guest_path.into(), read_only }
    }

    #[test]
    fn listed_shares_are_checked_and_kept_in_order() {
        let shared = Path::new(podvisor_proto::GUEST_SHARED_DIR);
        let req = CreateSandboxRequest {
            mount_shared_fs: true,
            shared_fs: vec![
                share(podvisor_proto::SHARED_FS_TAG, podvisor_proto::GUEST_SHARED_DIR, true),
                share(podvisor_proto::VOLUME_FS_TAG, podvisor_proto::GUEST_VOLUME_DIR, false),
                share(&"t".repeat(36), "/run/podvisor/volumes/./deep//er", false),
            ],
            ..Default::default()
        };
        let got = shares(&req, shared).unwrap();
        let summary: Vec<(&str, &Path, bool)> =
            got.iter().map(|s| (s.tag.as_str(), s.path.as_path(), s.read_only)).collect();
        assert_eq!(
            summary,
            [
                (podvisor_proto::SHARED_FS_TAG, shared, true),
                (podvisor_proto::VOLUME_FS_TAG, Path::new(podvisor_proto::GUEST_VOLUME_DIR), false),
                (&"t".repeat(36)[..], Path::new("/run/podvisor/volumes/deep/er"), false),
            ]
        );
    }

    #[test]
    fn bad_shares_are_refused() {
        for path in [
            "",
            "run/podvisor/x",
            "/run/podvisor",
            "/run/podvisor/",
            "/run/podvisor/../etc",
            "/run/podvisor/x/../../../etc",
            "/run/podvisorx/a",
            "/mnt",
            "/run/podvisor/containers",
            "/run/podvisor/containers/c1/rootfs",
            "/run/podvisor/libcontainer",
            "/run/podvisor/sandbox",
            "/run/podvisor/a\0b",
        ] {
            let req = CreateSandboxRequest {
                shared_fs: vec![share("tag", path, false)],
                ..Default::default()
            };
            assert!(
                matches!(shares(&req, Path::new("/x")), Err(SandboxError::BadSharePath(_))),
                "{path:?}"
            );
        }
        for tag in ["", &"t".repeat(37), "a\0b"] {
            let req = CreateSandboxRequest {
                shared_fs: vec![share(tag, podvisor_proto::GUEST_VOLUME_DIR, false)],
                ..Default::default()
            };
            assert!(
                matches!(shares(&req, Path::new("/x")), Err(SandboxError::BadShareTag(_))),
                "{tag:?}"
            );
        }
        // One bad share refuses the whole request, before anything is mounted.
        let req = CreateSandboxRequest {
            shared_fs: vec![
                share("good", podvisor_proto::GUEST_VOLUME_DIR, false),
                share("bad", "/etc", false),
            ],
            ..Default::default()
        };
        assert!(shares(&req, Path::new("/x")).is_err());
    }

    #[test]
    fn without_a_list_the_old_single_share_is_mounted_if_asked() {
        let shared = Path::new("/agent/shared");
        let old = CreateSandboxRequest { mount_shared_fs: true, ..Default::default() };
        assert_eq!(
            shares(&old, shared).unwrap(),
            [Share {
                tag: podvisor_proto::SHARED_FS_TAG.into(),
                path: shared.to_path_buf(),
                read_only: false
            }]
        );
        assert!(shares(&CreateSandboxRequest::default(), shared).unwrap().is_empty());
    }

    #[test]
    fn resolv_conf_lists_servers_searches_options() {
        let req = CreateSandboxRequest {
            dns_servers: vec!["10.0.0.10".into()],
            dns_searches: vec!["svc.cluster.local".into(), "cluster.local".into()],
            dns_options: vec!["ndots:5".into()],
            ..Default::default()
        };
        assert_eq!(
            resolv_conf(&req),
            "nameserver 10.0.0.10\nsearch svc.cluster.local cluster.local\noptions ndots:5\n"
        );
    }
}
