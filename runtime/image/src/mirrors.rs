//! Registry mirrors: per registry host, the endpoints a pull tries before (or instead of) the
//! upstream, as containerd's `hosts.toml` and CRI-O's `registries.conf` configure them.

use std::path::{Path, PathBuf};

/// A mirror URL or an endpoint's TLS material that cannot be used; reported at start-up.
/// `endpoint` reads "mirror https://m:5000" or "registry quay.io".
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
    /// A TLS file (`ca_file`, `client_cert`, `client_key`) cannot be read.
    #[error("{endpoint}: read {key} {path}: {source}")]
    ReadTlsFile {
        /// The mirror or registry.
        endpoint: String,
        /// The configuration key naming the file.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A TLS file holds no PEM block of the kind its key wants.
    #[error("{endpoint}: {key} {path} holds no usable PEM {wanted}: {message}")]
    BadTlsFile {
        /// The mirror or registry.
        endpoint: String,
        /// The configuration key naming the file.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// "certificate" or "private key".
        wanted: &'static str,
        /// The TLS library's message.
        message: String,
    },
    /// The client certificate and key do not make an identity the TLS library takes.
    #[error("{endpoint}: client_cert {cert} and client_key {key}: {message}")]
    BadClientIdentity {
        /// The mirror or registry.
        endpoint: String,
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// The TLS library's message.
        message: String,
    },
    /// Only one of `client_cert` and `client_key`: a client identity needs both.
    #[error("{endpoint}: {given} without {missing}: a client certificate needs both")]
    HalfClientIdentity {
        /// The mirror or registry.
        endpoint: String,
        /// The key given.
        given: &'static str,
        /// The key missing.
        missing: &'static str,
    },
    /// TLS settings on a plain HTTP mirror, which has no TLS to configure.
    #[error("mirror {0}: ca_file, client_cert, client_key and skip_verify need an https:// url")]
    TlsOnPlainHttp(String),
}

/// The TLS settings of an endpoint as configured: file paths, not yet read.
#[derive(Clone, Copy, Debug, Default)]
pub struct TlsFiles<'a> {
    /// PEM CA certificates trusted besides the system's.
    pub ca_file: Option<&'a Path>,
    /// PEM certificate (chain) presented to the endpoint.
    pub client_cert: Option<&'a Path>,
    /// PEM private key of `client_cert` (PKCS#8, PKCS#1 or SEC1).
    pub client_key: Option<&'a Path>,
    /// Accept any server certificate (containerd's `skip_verify`).
    pub skip_verify: bool,
}

impl TlsFiles<'_> {
    fn is_empty(&self) -> bool {
        self.ca_file.is_none()
            && self.client_cert.is_none()
            && self.client_key.is_none()
            && !self.skip_verify
    }
}

/// The TLS settings of one endpoint (a mirror or a registry host itself), read and checked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointTls {
    /// CA certificates (a PEM bundle) trusted for this endpoint, on top of the system's.
    pub ca_bundle: Option<Vec<u8>>,
    /// The certificate presented when the endpoint asks for one (mutual TLS).
    pub client_identity: Option<ClientIdentity>,
    /// Accept any server certificate.
    pub skip_verify: bool,
}

/// A client certificate with its private key, read from PEM files.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    /// Where the certificate came from (for logs).
    pub cert_file: PathBuf,
    /// Where the key came from (for logs).
    pub key_file: PathBuf,
    /// Certificate then key, as `reqwest::Identity::from_pem` takes them.
    pem: Vec<u8>,
}

impl std::fmt::Debug for ClientIdentity {
    // The key is a secret: never in a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientIdentity")
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .finish_non_exhaustive()
    }
}

impl ClientIdentity {
    pub(crate) fn to_reqwest(&self) -> reqwest::Result<reqwest::Identity> {
        reqwest::Identity::from_pem(&self.pem)
    }
}

impl EndpointTls {
    /// Reads and checks the files of `files`; `endpoint` names the endpoint in errors.
    pub fn load(endpoint: &str, files: &TlsFiles<'_>) -> Result<Self, MirrorError> {
        let ca_bundle = match files.ca_file {
            Some(path) => Some(read_ca(endpoint, path)?),
            None => None,
        };
        let client_identity = match (files.client_cert, files.client_key) {
            (Some(cert), Some(key)) => Some(read_identity(endpoint, cert, key)?),
            (None, None) => None,
            (Some(_), None) => return Err(half(endpoint, "client_cert", "client_key")),
            (None, Some(_)) => return Err(half(endpoint, "client_key", "client_cert")),
        };
        Ok(Self { ca_bundle, client_identity, skip_verify: files.skip_verify })
    }

    /// Whether anything is configured (an endpoint with TLS settings speaks HTTPS).
    pub fn is_configured(&self) -> bool {
        self.ca_bundle.is_some() || self.client_identity.is_some() || self.skip_verify
    }
}

fn half(endpoint: &str, given: &'static str, missing: &'static str) -> MirrorError {
    MirrorError::HalfClientIdentity { endpoint: endpoint.to_owned(), given, missing }
}

fn read_tls_file(endpoint: &str, key: &'static str, path: &Path) -> Result<Vec<u8>, MirrorError> {
    std::fs::read(path).map_err(|source| MirrorError::ReadTlsFile {
        endpoint: endpoint.to_owned(),
        key,
        path: path.to_owned(),
        source,
    })
}

fn bad_file(
    endpoint: &str,
    key: &'static str,
    path: &Path,
    wanted: &'static str,
    message: String,
) -> MirrorError {
    MirrorError::BadTlsFile {
        endpoint: endpoint.to_owned(),
        key,
        path: path.to_owned(),
        wanted,
        message,
    }
}

/// A PEM file holding one certificate at least, as the TLS library parses it.
fn read_certificates(
    endpoint: &str,
    key: &'static str,
    path: &Path,
) -> Result<Vec<u8>, MirrorError> {
    let pem = read_tls_file(endpoint, key, path)?;
    let bad = |message: String| bad_file(endpoint, key, path, "certificate", message);
    match reqwest::Certificate::from_pem_bundle(&pem) {
        Ok(certificates) if certificates.is_empty() => Err(bad("no certificate in it".into())),
        Ok(_) => Ok(pem),
        Err(e) => Err(bad(e.to_string())),
    }
}

fn read_ca(endpoint: &str, path: &Path) -> Result<Vec<u8>, MirrorError> {
    read_certificates(endpoint, "ca_file", path)
}

/// The certificate and key files as one identity, each checked on its own first so the error
/// names the file at fault.
fn read_identity(endpoint: &str, cert: &Path, key: &Path) -> Result<ClientIdentity, MirrorError> {
    let mut pem = read_certificates(endpoint, "client_cert", cert)?;
    let key_pem = read_tls_file(endpoint, "client_key", key)?;
    let has_key = String::from_utf8_lossy(&key_pem)
        .lines()
        .any(|line| line.starts_with("-----BEGIN ") && line.ends_with("PRIVATE KEY-----"));
    if !has_key {
        return Err(bad_file(endpoint, "client_key", key, "private key", "no key in it".into()));
    }
    if !pem.ends_with(b"\n") {
        pem.push(b'\n');
    }
    pem.extend_from_slice(&key_pem);
    let identity = ClientIdentity { cert_file: cert.to_owned(), key_file: key.to_owned(), pem };
    // Building a client is what parses the key and pairs it with the certificate.
    identity.to_reqwest().and_then(|id| reqwest::Client::builder().identity(id).build()).map_err(
        |e| MirrorError::BadClientIdentity {
            endpoint: endpoint.to_owned(),
            cert: cert.to_owned(),
            key: key.to_owned(),
            // Its sources carry the TLS library's reason.
            message: crate::pull::error_chain(&e),
        },
    )?;
    Ok(identity)
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
    /// CA, client certificate and skip-verify for this mirror.
    pub tls: EndpointTls,
}

impl Mirror {
    /// Checks `url` (`http(s)://host[:port][/prefix]`) and reads its TLS files.
    pub fn new(url: &str, tls: &TlsFiles<'_>) -> Result<Self, MirrorError> {
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
        if plain_http && !tls.is_empty() {
            return Err(MirrorError::TlsOnPlainHttp(url.to_owned()));
        }
        let tls = EndpointTls::load(&format!("mirror {url}"), tls)?;
        Ok(Self { url: url.to_owned(), plain_http, host, prefix, tls })
    }

    /// The repository pulled from this mirror for `repository` upstream.
    pub fn repository(&self, repository: &str) -> String {
        match &self.prefix {
            Some(prefix) => format!("{prefix}/{repository}"),
            None => repository.to_owned(),
        }
    }
}

/// The mirrors of one registry host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistryHosts {
    /// Tried in order.
    pub mirrors: Vec<Mirror>,
    /// Whether the upstream is tried after every mirror failed (containerd and CRI-O do).
    pub fallback_to_upstream: bool,
    /// The upstream's own TLS settings (containerd's `hosts.toml` allows them for the server
    /// too); any of them makes the upstream be contacted over HTTPS.
    pub upstream_tls: EndpointTls,
}

impl Default for RegistryHosts {
    fn default() -> Self {
        Self {
            mirrors: Vec::new(),
            fallback_to_upstream: true,
            upstream_tls: EndpointTls::default(),
        }
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
        let m = Mirror::new("https://mirror.local:5443/proxy/k8s/", &TlsFiles::default()).unwrap();
        assert!(!m.plain_http);
        assert_eq!(m.host, "mirror.local:5443");
        assert_eq!(m.prefix.as_deref(), Some("proxy/k8s"));
        assert_eq!(m.repository("pause"), "proxy/k8s/pause");
        let m = Mirror::new("http://10.0.0.1:5000", &TlsFiles::default()).unwrap();
        assert!(m.plain_http);
        assert_eq!((m.host.as_str(), m.prefix.as_deref()), ("10.0.0.1:5000", None));
        assert_eq!(m.repository("library/busybox"), "library/busybox");
        let m = Mirror::new("https://[::1]:5000", &skip_verify()).unwrap();
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
            let err = Mirror::new(url, &TlsFiles::default()).unwrap_err().to_string();
            assert!(err.contains(reason), "{url}: {err}");
            assert!(err.contains(url), "{url}: {err}");
        }
    }

    fn skip_verify() -> TlsFiles<'static> {
        TlsFiles { skip_verify: true, ..TlsFiles::default() }
    }

    #[test]
    fn tls_settings_need_https_and_a_readable_pem() {
        let dir = tempfile::tempdir().unwrap();
        let err = Mirror::new("http://m:5000", &skip_verify()).unwrap_err();
        assert!(matches!(err, MirrorError::TlsOnPlainHttp(_)), "{err}");
        let missing = dir.path().join("missing.pem");
        let files = TlsFiles { ca_file: Some(&missing), ..TlsFiles::default() };
        let err = Mirror::new("https://m", &files).unwrap_err();
        assert!(matches!(err, MirrorError::ReadTlsFile { key: "ca_file", .. }), "{err}");
        assert!(err.to_string().starts_with("mirror https://m: read ca_file"), "{err}");
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let files = TlsFiles { ca_file: Some(&junk), ..TlsFiles::default() };
        let err = Mirror::new("https://m", &files).unwrap_err();
        assert!(matches!(err, MirrorError::BadTlsFile { key: "ca_file", .. }), "{err}");
    }
    #[test]
    fn client_certificates_need_both_files_each_of_its_kind() {
        // The certificates come from the openssl CLI.
        if !podvisor_e2e::registry::token_auth_tests_can_run() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let a = podvisor_e2e::registry::make_client_certificate(dir.path(), "a").unwrap();
        let b = podvisor_e2e::registry::make_client_certificate(dir.path(), "b").unwrap();
        let files = |cert: &'static str, key: &'static str| {
            let pick = |which: &str| match which {
                "a.cert" => Some(a.cert.clone()),
                "a.key" => Some(a.key.clone()),
                "b.key" => Some(b.key.clone()),
                "junk" => Some(dir.path().join("junk.key")),
                _ => None,
            };
            (pick(cert), pick(key))
        };
        std::fs::write(
            dir.path().join("junk.key"),
            "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let load = |cert: &'static str, key: &'static str| {
            let (cert, key) = files(cert, key);
            let tls = TlsFiles {
                ca_file: Some(&a.ca),
                client_cert: cert.as_deref(),
                client_key: key.as_deref(),
                skip_verify: false,
            };
            Mirror::new("https://m:5000", &tls)
        };

        let mirror = load("a.cert", "a.key").unwrap();
        let identity = mirror.tls.client_identity.as_ref().expect("an identity");
        assert_eq!((&identity.cert_file, &identity.key_file), (&a.cert, &a.key));
        assert!(!format!("{mirror:?}").contains("PRIVATE"), "the key stays out of logs");
        identity.to_reqwest().unwrap();

        let err = load("a.cert", "none").unwrap_err().to_string();
        assert!(err.contains("mirror https://m:5000: client_cert without client_key"), "{err}");
        let err = load("none", "a.key").unwrap_err().to_string();
        assert!(err.contains("client_key without client_cert"), "{err}");
        let err = load("a.key", "a.key").unwrap_err();
        assert!(matches!(err, MirrorError::BadTlsFile { key: "client_cert", .. }), "{err}");
        let err = load("a.cert", "a.cert").unwrap_err();
        assert!(matches!(err, MirrorError::BadTlsFile { key: "client_key", .. }), "{err}");
        assert!(err.to_string().contains("client_key"), "{err}");
        let err = load("a.cert", "junk").unwrap_err();
        assert!(matches!(err, MirrorError::BadClientIdentity { .. }), "{err}");
        let err = load("a.cert", "b.key").unwrap_err();
        assert!(matches!(err, MirrorError::BadClientIdentity { .. }), "{err}");
    }

    #[test]
    fn mirrors_come_first_and_the_upstream_last_unless_disabled() {
        let mirror = |url| Mirror::new(url, &TlsFiles::default()).unwrap();
        let mut registries = std::collections::BTreeMap::new();
        registries.insert(
            "registry.k8s.io".to_owned(),
            RegistryHosts {
                mirrors: vec![mirror("https://a"), mirror("http://b:5000")],
                fallback_to_upstream: true,
                upstream_tls: EndpointTls::default(),
            },
        );
        registries.insert(
            "quay.io".to_owned(),
            RegistryHosts {
                mirrors: vec![mirror("https://c")],
                fallback_to_upstream: false,
                upstream_tls: EndpointTls::default(),
            },
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
