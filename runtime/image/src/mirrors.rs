//! Registry mirrors: per registry host, the endpoints a pull tries before (or instead of) the
//! upstream, as containerd's `hosts.toml` and CRI-O's `registries.conf` configure them.

use std::path::{Path, PathBuf};

/// A mirror URL or its TLS material that cannot be used; reported at start-up.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    /// The URL does not parse, or is not `http(s)://host[:port][/prefix]`.
    #[error("mirror url {url:?}: {reason}")]
    BadUrl {
        /// As configured.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The CA file cannot be read.
    #[error("mirror {url}: read ca_file {path}: {source}")]
    ReadCaFile {
        /// The mirror.
        url: String,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The CA file holds no PEM certificate the TLS library accepts.
    #[error("mirror {url}: ca_file {path} holds no usable PEM certificate: {message}")]
    BadCaFile {
        /// The mirror.
        url: String,
        /// The file.
        path: PathBuf,
        /// The TLS library's message.
        message: String,
    },
    /// A CA file or skip_verify on a plain HTTP mirror, which has no TLS to configure.
    #[error("mirror {0}: ca_file and skip_verify need an https:// url")]
    TlsOnPlainHttp(String),
}

/// One mirror endpoint, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mirror {
    /// The URL as configured (for logs and errors).
    pub url: String,
    /// `http://`: no TLS.
    pub plain_http: bool,
    /// `host[:port]` contacted.
    pub host: String,
    /// A repository prefix on the mirror (`proxy/docker` makes `library/busybox` be pulled as
    /// `proxy/docker/library/busybox`, as CRI-O's `location = "host/proxy/docker"` or a Harbor
    /// proxy-cache project), or None.
    pub prefix: Option<String>,
    /// CA certificates (one PEM block each) trusted for this mirror, on top of the system's.
    pub ca_certificates: Vec<Vec<u8>>,
    /// Accept any certificate (containerd's `skip_verify`).
    pub skip_verify: bool,
}

impl Mirror {
    /// Checks `url` (`http(s)://host[:port][/prefix]`) and reads `ca_file`.
    pub fn new(url: &str, ca_file: Option<&Path>, skip_verify: bool) -> Result<Self, MirrorError> {
        let bad = |reason: &str| MirrorError::BadUrl { url: url.to_owned(), reason: reason.into() };
        let parsed = url::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
        let plain_http = match parsed.scheme() {
            "https" => false,
            "http" => true,
            other => return Err(bad(&format!("scheme {other:?} is neither http nor https"))),
        };
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(bad("credentials belong in the docker config, not the url"));
        }
        if parsed.query().is_some() || parsed.fragment().is_some() {
            return Err(bad("a query or fragment means nothing to a registry"));
        }
        let host = match (parsed.host_str(), parsed.port()) {
            (Some(host), Some(port)) => format!("{host}:{port}"),
            (Some(host), None) => host.to_owned(),
            (None, _) => return Err(bad("no host")),
        };
        let prefix = parsed.path().trim_matches('/');
        let prefix = (!prefix.is_empty()).then(|| prefix.to_owned());
        if let Some(prefix) = &prefix {
            // What a repository path may be (the distribution spec's path components).
            let valid = format!("{host}/{prefix}/x").parse::<oci_client::Reference>().is_ok()
                && !prefix.split('/').any(str::is_empty);
            if !valid {
                return Err(bad(&format!("{prefix:?} is not a repository prefix")));
            }
        }
        if plain_http && (ca_file.is_some() || skip_verify) {
            return Err(MirrorError::TlsOnPlainHttp(url.to_owned()));
        }
        let ca_certificates = match ca_file {
            Some(path) => read_ca(url, path)?,
            None => Vec::new(),
        };
        Ok(Self { url: url.to_owned(), plain_http, host, prefix, ca_certificates, skip_verify })
    }

    /// The repository pulled from this mirror for `repository` upstream.
    pub fn repository(&self, repository: &str) -> String {
        match &self.prefix {
            Some(prefix) => format!("{prefix}/{repository}"),
            None => repository.to_owned(),
        }
    }
}

/// The certificates of a PEM file, one PEM block each (oci-client takes one per entry).
fn read_ca(url: &str, path: &Path) -> Result<Vec<Vec<u8>>, MirrorError> {
    let pem = std::fs::read(path).map_err(|source| MirrorError::ReadCaFile {
        url: url.to_owned(),
        path: path.to_owned(),
        source,
    })?;
    let bad = |message: String| MirrorError::BadCaFile {
        url: url.to_owned(),
        path: path.to_owned(),
        message,
    };
    reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| bad(e.to_string()))?;
    let text = String::from_utf8_lossy(&pem);
    const END: &str = "-----END CERTIFICATE-----";
    let blocks: Vec<Vec<u8>> = text
        .split_inclusive(END)
        .filter_map(|chunk| chunk.find("-----BEGIN CERTIFICATE-----").map(|at| &chunk[at..]))
        .filter(|block| block.ends_with(END))
        .map(|block| format!("{block}\n").into_bytes())
        .collect();
    if blocks.is_empty() {
        return Err(bad("no certificate in it".to_owned()));
    }
    Ok(blocks)
}

/// The mirrors of one registry host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistryHosts {
    /// Tried in order.
    pub mirrors: Vec<Mirror>,
    /// Whether the upstream is tried after every mirror failed (containerd and CRI-O do).
    pub fallback_to_upstream: bool,
}

impl Default for RegistryHosts {
    fn default() -> Self {
        Self { mirrors: Vec::new(), fallback_to_upstream: true }
    }
}

/// Where one attempt of a pull goes.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Endpoint<'a> {
    Mirror(&'a Mirror),
    /// The registry the image names.
    Upstream,
}

impl Endpoint<'_> {
    /// For errors: "mirror https://m:5000/p" or "upstream registry.k8s.io".
    pub(crate) fn describe(&self, upstream: &str) -> String {
        match self {
            Self::Mirror(mirror) => format!("mirror {}", mirror.url),
            Self::Upstream => format!("upstream {upstream}"),
        }
    }
}

/// The endpoints for `registry` (as the reference names it: `docker.io`, `host:port`): its
/// mirrors in order, then the upstream unless `fallback_to_upstream` is off.
pub(crate) fn endpoints<'a>(
    registries: &'a std::collections::BTreeMap<String, RegistryHosts>,
    registry: &str,
) -> Vec<Endpoint<'a>> {
    let Some(hosts) = registries.get(registry) else {
        return vec![Endpoint::Upstream];
    };
    let mut endpoints: Vec<Endpoint<'a>> = hosts.mirrors.iter().map(Endpoint::Mirror).collect();
    if hosts.fallback_to_upstream || endpoints.is_empty() {
        endpoints.push(Endpoint::Upstream);
    }
    endpoints
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_give_scheme_host_and_prefix() {
        let m = Mirror::new("https://mirror.local:5443/proxy/k8s/", None, false).unwrap();
        assert!(!m.plain_http);
        assert_eq!(m.host, "mirror.local:5443");
        assert_eq!(m.prefix.as_deref(), Some("proxy/k8s"));
        assert_eq!(m.repository("pause"), "proxy/k8s/pause");
        let m = Mirror::new("http://10.0.0.1:5000", None, false).unwrap();
        assert!(m.plain_http);
        assert_eq!((m.host.as_str(), m.prefix.as_deref()), ("10.0.0.1:5000", None));
        assert_eq!(m.repository("library/busybox"), "library/busybox");
        let m = Mirror::new("https://[::1]:5000", None, true).unwrap();
        assert_eq!(m.host, "[::1]:5000");
    }

    #[test]
    fn bad_urls_are_refused_with_the_reason() {
        for (url, reason) in [
            ("mirror.local:5000", "neither http nor https"),
            ("ftp://mirror.local", "neither http nor https"),
            ("https://", "empty host"),
            ("https://user:pw@mirror.local", "credentials"),
            ("https://mirror.local/?x=1", "query"),
            ("https://mirror.local/Upper/Case", "not a repository prefix"),
            ("https://mirror.local/a//b", "not a repository prefix"),
            ("not a url", "relative URL"),
        ] {
            let err = Mirror::new(url, None, false).unwrap_err().to_string();
            assert!(err.contains(reason), "{url}: {err}");
            assert!(err.contains(url), "{url}: {err}");
        }
    }

    #[test]
    fn tls_settings_need_https_and_a_readable_pem() {
        let dir = tempfile::tempdir().unwrap();
        let err = Mirror::new("http://m:5000", None, true).unwrap_err();
        assert!(matches!(err, MirrorError::TlsOnPlainHttp(_)), "{err}");
        let missing = dir.path().join("missing.pem");
        let err = Mirror::new("https://m", Some(&missing), false).unwrap_err();
        assert!(matches!(err, MirrorError::ReadCaFile { .. }), "{err}");
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let err = Mirror::new("https://m", Some(&junk), false).unwrap_err();
        assert!(matches!(err, MirrorError::BadCaFile { .. }), "{err}");
    }

    #[test]
    fn mirrors_come_first_and_the_upstream_last_unless_disabled() {
        let mirror = |url| Mirror::new(url, None, false).unwrap();
        let mut registries = std::collections::BTreeMap::new();
        registries.insert(
            "registry.k8s.io".to_owned(),
            RegistryHosts {
                mirrors: vec![mirror("https://a"), mirror("http://b:5000")],
                fallback_to_upstream: true,
            },
        );
        registries.insert(
            "quay.io".to_owned(),
            RegistryHosts { mirrors: vec![mirror("https://c")], fallback_to_upstream: false },
        );
        let described = |registry: &str| {
            endpoints(&registries, registry)
                .iter()
                .map(|e| e.describe(registry))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            described("registry.k8s.io"),
            ["mirror https://a", "mirror http://b:5000", "upstream registry.k8s.io"]
        );
        assert_eq!(described("quay.io"), ["mirror https://c"]);
        assert_eq!(described("docker.io"), ["upstream docker.io"]);
    }
}
