//! Pod-level set-up: hostname, the hosts/resolv.conf files the host's spec bind-mounts into
//! containers, sysctls and the shared filesystem.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use podvisor_proto::agent::CreateSandboxRequest;

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
    #[error("mounting the shared filesystem: {0}")]
    MountShared(nix::Error),
    #[error("setting the guest clock: {0}")]
    SetClock(nix::Error),
}

fn valid_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

fn valid_dns_entry(entry: &str) -> bool {
    !entry.is_empty() && !entry.contains(|c: char| c.is_whitespace() || c.is_control())
}

/// /proc/sys path of a sysctl, refusing names that could leave /proc/sys.
fn sysctl_path(name: &str) -> Result<PathBuf, SandboxError> {
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

fn hosts_file(hostname: &str) -> String {
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

fn resolv_conf(req: &CreateSandboxRequest) -> String {
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

/// Applies the sandbox settings. `sandbox_dir` receives hostname/hosts/resolv.conf; `guest`
/// says whether the agent owns the machine (hostname, sysctls, /etc, mounts).
pub fn create(
    req: &CreateSandboxRequest,
    sandbox_dir: &Path,
    shared_dir: &Path,
    guest: bool,
) -> Result<(), SandboxError> {
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
        .map(|(k, v)| sysctl_path(k).map(|p| (k, p, v)))
        .collect::<Result<Vec<_>, _>>()?;

    let hosts = hosts_file(&req.hostname);
    let resolv = resolv_conf(req);
    write(sandbox_dir.join("hostname"), &format!("{}\n", req.hostname))?;
    write(sandbox_dir.join("hosts"), &hosts)?;
    write(sandbox_dir.join("resolv.conf"), &resolv)?;
    if !guest {
        return Ok(());
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
        fs::write(&path, value).map_err(|e| SandboxError::Sysctl(name.clone(), e))?;
    }
    if req.mount_shared_fs {
        fs::create_dir_all(shared_dir)
            .map_err(|e| SandboxError::Write(shared_dir.to_path_buf(), e))?;
        match nix::mount::mount(
            Some(podvisor_proto::SHARED_FS_TAG),
            shared_dir,
            Some("virtiofs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        ) {
            Ok(()) | Err(nix::Error::EBUSY) => {}
            Err(e) => return Err(SandboxError::MountShared(e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
