//! A real OCI distribution registry for tests: Debian's `docker-registry` (distribution v2.8)
//! listening on 127.0.0.1 with a free port and a temporary storage directory, optionally behind
//! htpasswd basic auth or token (bearer) auth with a [`TokenServer`], stopped when dropped.
//! Test images are built with [`crate::images`] and pushed with `skopeo copy` (through the token
//! flow, with push access, on a token-auth registry).
//!
//! ```no_run
//! use podvisor_e2e::registry::TestRegistry;
//! let reg = TestRegistry::start()?;
//! let image = reg.push_busybox("busybox:1")?; // "127.0.0.1:<port>/busybox:1"
//! # Ok::<(), anyhow::Error>(())
//! ```

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::images::{
    sha256_digest, Compression, LayerBuilder, OciLayout, TestImage, MEDIA_TYPE_INDEX,
    MEDIA_TYPE_MANIFEST,
};
use crate::token_server::TokenServer;

/// OpenSSL extensions of the test CAs, of a registry's certificate (rustls wants a CA marked
/// as one and the registry's IP address in the subject alternative names) and of a client's.
const TLS_EXTENSIONS: &str = "[req]\ndistinguished_name = dn\n[dn]\n\
[ca]\nbasicConstraints = critical,CA:TRUE\nkeyUsage = critical,keyCertSign,cRLSign\n\
subjectKeyIdentifier = hash\n\
[server]\nbasicConstraints = CA:FALSE\nkeyUsage = critical,digitalSignature,keyEncipherment\n\
extendedKeyUsage = serverAuth\nsubjectAltName = IP:127.0.0.1,DNS:localhost\n\
subjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid\n\
[client]\nbasicConstraints = CA:FALSE\nkeyUsage = critical,digitalSignature\n\
extendedKeyUsage = clientAuth\n\
subjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid\n";

/// A PEM certificate, its key and the CA that signed it, made with `openssl`.
#[derive(Clone, Debug)]
pub struct TestCertificate {
    /// The certificate.
    pub cert: PathBuf,
    /// Its private key (PKCS#8).
    pub key: PathBuf,
    /// The CA certificate that signed it.
    pub ca: PathBuf,
}

fn path_text(p: &Path) -> Result<String> {
    p.to_str().map(str::to_owned).context("temporary path is not UTF-8")
}

/// Makes a CA `<name>-ca.pem` under `dir` and a certificate `<name>.pem` it signs with the
/// `extensions` section of [`TLS_EXTENSIONS`] ("server", "client").
fn make_certificate(
    dir: &Path,
    name: &str,
    extensions: &str,
    subject: &str,
) -> Result<TestCertificate> {
    let path = |file: String| dir.join(file);
    let cnf = path(format!("{name}-tls.cnf"));
    std::fs::write(&cnf, TLS_EXTENSIONS)?;
    let cnf = path_text(&cnf)?;
    let (ca, ca_key) = (path(format!("{name}-ca.pem")), path(format!("{name}-ca.key")));
    let (cert, key, csr) =
        (path(format!("{name}.pem")), path(format!("{name}.key")), path(format!("{name}.csr")));
    let (ca_text, ca_key_text) = (path_text(&ca)?, path_text(&ca_key)?);
    let (cert_text, key_text, csr_text) = (path_text(&cert)?, path_text(&key)?, path_text(&csr)?);
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let ca_subject = format!("/CN=podvisor test {name} CA");
    let mut args = vec!["req", "-x509", "-config", &cnf, "-extensions", "ca", "-days", "2"];
    args.extend(ec);
    args.extend(["-keyout", &ca_key_text, "-out", &ca_text, "-subj", &ca_subject]);
    crate::token_server::run_openssl(&args)?;
    let mut args = vec!["req", "-new", "-config", &cnf];
    args.extend(ec);
    args.extend(["-keyout", &key_text, "-out", &csr_text, "-subj", subject]);
    crate::token_server::run_openssl(&args)?;
    crate::token_server::run_openssl(&[
        "x509",
        "-req",
        "-in",
        &csr_text,
        "-CA",
        &ca_text,
        "-CAkey",
        &ca_key_text,
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        &cnf,
        "-extensions",
        extensions,
        "-out",
        &cert_text,
    ])?;
    Ok(TestCertificate { cert, key, ca })
}

/// Makes a CA and a certificate it signs for 127.0.0.1 under `dir`.
fn make_server_certificate(dir: &Path) -> Result<TestCertificate> {
    make_certificate(dir, "server", "server", "/CN=127.0.0.1")
}

/// Makes a CA of its own and a client certificate (`clientAuth`) it signs, files named after
/// `name` under `dir`.
pub fn make_client_certificate(dir: &Path, name: &str) -> Result<TestCertificate> {
    make_certificate(dir, name, "client", &format!("/CN=podvisor test client {name}"))
}

/// How a test registry speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transport {
    PlainHttp,
    /// HTTPS with a certificate from a CA of its own.
    Https,
    /// HTTPS requiring a client certificate from a CA of its own (`http.tls.clientcas`).
    MutualTls,
}

/// The registry binary of Debian's `docker-registry` package.
pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";
/// skopeo pushes the test images.
pub const SKOPEO_BIN: &str = "/usr/bin/skopeo";

/// Why registry tests cannot run here (a missing tool), or None.
pub fn missing_tools() -> Option<String> {
    for tool in [REGISTRY_BIN, SKOPEO_BIN, crate::images::BUSYBOX] {
        if !Path::new(tool).exists() {
            return Some(format!(
                "{tool} is missing (apt-get install docker-registry skopeo busybox-static)"
            ));
        }
    }
    None
}

/// True when the test should run. Prints the skip reason otherwise; panics instead of
/// skipping when `PODVISOR_REQUIRE_E2E=1`.
pub fn registry_tests_can_run() -> bool {
    match missing_tools() {
        None => true,
        Some(reason) => {
            if std::env::var("PODVISOR_REQUIRE_E2E").as_deref() == Ok("1") {
                panic!("PODVISOR_REQUIRE_E2E=1 but {reason}");
            }
            eprintln!("skipping: {reason}");
            false
        }
    }
}

/// The registry's `auth.token.service`: the audience of its tokens.
pub const TOKEN_SERVICE: &str = "podvisor-test-registry";
/// The registry's `auth.token.issuer`.
pub const TOKEN_ISSUER: &str = "podvisor-test-issuer";

/// How a [`TestRegistry`] authenticates clients.
#[derive(Clone, Copy)]
enum AuthMode {
    Anonymous,
    Basic,
    Token,
}

/// Like [`registry_tests_can_run`], for token-auth registries: also needs the `openssl` CLI.
pub fn token_auth_tests_can_run() -> bool {
    if !registry_tests_can_run() {
        return false;
    }
    let openssl = crate::token_server::OPENSSL_BIN;
    let found = Command::new(openssl)
        .arg("version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if found {
        return true;
    }
    let reason = format!("{openssl} is missing (apt-get install openssl)");
    if std::env::var("PODVISOR_REQUIRE_E2E").as_deref() == Ok("1") {
        panic!("PODVISOR_REQUIRE_E2E=1 but {reason}");
    }
    eprintln!("skipping: {reason}");
    false
}

/// A running `docker-registry`.
pub struct TestRegistry {
    child: Child,
    port: u16,
    credentials: Option<(String, String)>,
    // Token auth only: hands out the JWTs the registry accepts.
    token_server: Option<TokenServer>,
    // HTTPS only: the CA that signed its certificate.
    ca_file: Option<PathBuf>,
    // Mutual TLS only: the client certificate it accepts, and the same with its CA as the
    // directory skopeo takes (`*.cert`, `*.key`, `*.crt`).
    client_certificate: Option<TestCertificate>,
    skopeo_cert_dir: Option<PathBuf>,
    // Keeps the storage, config and log alive until the registry is stopped.
    dir: tempfile::TempDir,
}

impl TestRegistry {
    /// Starts an anonymous registry.
    pub fn start() -> Result<Self> {
        Self::start_inner(AuthMode::Anonymous, None, Transport::PlainHttp)
    }

    /// Starts an anonymous registry serving HTTPS only, with a certificate for 127.0.0.1 and
    /// localhost signed by a CA made for it with `openssl` ([`Self::ca_file`]).
    pub fn start_with_tls() -> Result<Self> {
        Self::start_inner(AuthMode::Anonymous, None, Transport::Https)
    }

    /// Like [`Self::start_with_tls`], and it refuses clients without a certificate signed by
    /// a client CA made for it ([`Self::client_certificate`]).
    pub fn start_with_client_certificates() -> Result<Self> {
        Self::start_inner(AuthMode::Anonymous, None, Transport::MutualTls)
    }

    /// The PEM CA certificate of a registry started with [`Self::start_with_tls`] or
    /// [`Self::start_with_client_certificates`].
    pub fn ca_file(&self) -> Option<&Path> {
        self.ca_file.as_deref()
    }

    /// The client certificate a registry started with
    /// [`Self::start_with_client_certificates`] accepts.
    pub fn client_certificate(&self) -> Option<&TestCertificate> {
        self.client_certificate.as_ref()
    }

    /// Starts a registry that requires HTTP basic auth with these credentials (bcrypt htpasswd).
    pub fn start_with_basic_auth(username: &str, password: &str) -> Result<Self> {
        let credentials = Some((username.to_owned(), password.to_owned()));
        Self::start_inner(AuthMode::Basic, credentials, Transport::PlainHttp)
    }

    /// Starts a registry with token auth: it answers 401 with `WWW-Authenticate: Bearer
    /// realm="http://127.0.0.1:<port>/token",service="podvisor-test-registry",…` and accepts
    /// the RS256 JWTs of its own [`TokenServer`] (certificate in `x5c`, trusted through
    /// `rootcertbundle`). The token server gives pull/push to these basic credentials, 401 to
    /// wrong ones and a token granting nothing to anonymous clients.
    pub fn start_with_token_auth(username: &str, password: &str) -> Result<Self> {
        let credentials = Some((username.to_owned(), password.to_owned()));
        Self::start_inner(AuthMode::Token, credentials, Transport::PlainHttp)
    }

    fn start_inner(
        mode: AuthMode,
        credentials: Option<(String, String)>,
        tls: Transport,
    ) -> Result<Self> {
        // A port picked by the kernel can be taken by someone else before the registry binds
        // it: retry a few times.
        let mut last_error = None;
        for _ in 0..3 {
            match Self::try_start(mode, credentials.clone(), tls) {
                Ok(registry) => return Ok(registry),
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("registry did not start")))
    }

    fn try_start(
        mode: AuthMode,
        credentials: Option<(String, String)>,
        tls: Transport,
    ) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("podvisor-registry-").tempdir()?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let storage = dir.path().join("storage");
        std::fs::create_dir_all(&storage)?;
        let mut token_server = None;
        let auth = match (&mode, &credentials) {
            (AuthMode::Basic, Some((username, password))) => {
                // Cost 4 (the minimum) keeps every request's bcrypt check cheap.
                let hash = bcrypt::hash(password, 4).context("bcrypt")?;
                let htpasswd = dir.path().join("htpasswd");
                std::fs::write(&htpasswd, format!("{username}:{hash}\n"))?;
                format!(
                    "auth:\n  htpasswd:\n    realm: podvisor-test\n    path: {}\n",
                    htpasswd.display()
                )
            }
            (AuthMode::Token, Some((username, password))) => {
                let server = TokenServer::start(
                    dir.path(),
                    TOKEN_ISSUER,
                    TOKEN_SERVICE,
                    username,
                    password,
                )?;
                let auth = format!(
                    "auth:\n  token:\n    realm: {}\n    service: {TOKEN_SERVICE}\n    \
                     issuer: {TOKEN_ISSUER}\n    rootcertbundle: {}\n",
                    server.realm(),
                    server.cert_path().display()
                );
                token_server = Some(server);
                auth
            }
            (AuthMode::Anonymous, _) => String::new(),
            (_, None) => bail!("basic or token auth without credentials"),
        };
        let (mut tls_config, mut ca_file) = (String::new(), None);
        if tls != Transport::PlainHttp {
            let server = make_server_certificate(dir.path())?;
            tls_config = format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                server.cert.display(),
                server.key.display()
            );
            ca_file = Some(server.ca);
        }
        let (mut client_certificate, mut skopeo_cert_dir) = (None, None);
        if tls == Transport::MutualTls {
            let client = make_client_certificate(dir.path(), "client")?;
            tls_config.push_str(&format!("    clientcas:\n      - {}\n", client.ca.display()));
            let cert_dir = dir.path().join("skopeo-certs");
            std::fs::create_dir_all(&cert_dir)?;
            std::fs::copy(&client.cert, cert_dir.join("client.cert"))?;
            std::fs::copy(&client.key, cert_dir.join("client.key"))?;
            if let Some(ca) = &ca_file {
                std::fs::copy(ca, cert_dir.join("ca.crt"))?;
            }
            client_certificate = Some(client);
            skopeo_cert_dir = Some(cert_dir);
        }
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             http:\n  addr: 127.0.0.1:{port}\n{tls_config}{auth}",
            storage.display()
        );
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config)?;
        let log = std::fs::File::create(dir.path().join("registry.log"))?;
        let child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawn {REGISTRY_BIN}"))?;
        let mut registry = Self {
            child,
            port,
            credentials,
            token_server,
            ca_file,
            client_certificate,
            skopeo_cert_dir,
            dir,
        };
        registry.wait_ready()?;
        Ok(registry)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "docker-registry exited ({status}): {}",
                    std::fs::read_to_string(self.dir.path().join("registry.log"))
                        .unwrap_or_default()
                );
            }
            if let Ok(status) = self.http_status("/v2/") {
                // An HTTPS registry answers plain HTTP with 400 once it listens.
                let https_up = self.ca_file.is_some() && status == 400;
                if status == 200 || status == 401 || https_up {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("docker-registry on port {} not ready after 15 s", self.port)
    }

    /// Status code of an anonymous GET on this registry.
    pub fn http_status(&self, path: &str) -> Result<u16> {
        self.http_status_with(path, None)
    }

    /// Status code of a GET on this registry with this `Authorization` header value
    /// (`Bearer <jwt>`, `Basic …`), or none. Accepts OCI and Docker schema 2 manifests (the
    /// registry answers 404 for an OCI manifest to a client that does not accept it).
    pub fn http_status_with(&self, path: &str, authorization: Option<&str>) -> Result<u16> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let authorization =
            authorization.map(|value| format!("Authorization: {value}\r\n")).unwrap_or_default();
        write!(
            stream,
            "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{}\r\nAccept: {MEDIA_TYPE_MANIFEST}, \
             {MEDIA_TYPE_INDEX}, application/vnd.docker.distribution.manifest.v2+json\r\n\
             {authorization}\r\n",
            self.port
        )?;
        let mut response = [0u8; 64];
        let read = stream.read(&mut response)?;
        let head = String::from_utf8_lossy(&response[..read]);
        head.split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .context("bad HTTP response")
    }

    /// `127.0.0.1:<port>`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The `WWW-Authenticate` header of an anonymous GET on `/v2/`, if any.
    pub fn auth_challenge(&self) -> Result<Option<String>> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(stream, "GET /v2/ HTTP/1.0\r\nHost: 127.0.0.1:{}\r\n\r\n", self.port)?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response)?;
        let response = String::from_utf8_lossy(&response);
        let head = response.split("\r\n\r\n").next().unwrap_or("");
        Ok(head.split("\r\n").find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("www-authenticate").then(|| value.trim().to_owned())
        }))
    }

    /// The token server of a registry started with [`Self::start_with_token_auth`].
    pub fn token_server(&self) -> Option<&TokenServer> {
        self.token_server.as_ref()
    }

    /// Asks the token server for a token for `scope` (e.g. `repository:busybox:pull`) with
    /// basic `credentials` or anonymously: status and JSON body.
    pub fn request_token(
        &self,
        scope: &str,
        credentials: Option<(&str, &str)>,
    ) -> Result<(u16, String)> {
        self.token_server.as_ref().context("not a token-auth registry")?.request(scope, credentials)
    }

    /// A JWT for `scope` from the token server: with the registry's credentials, or an
    /// anonymous one (which grants nothing) when `anonymous`.
    pub fn bearer_token(&self, scope: &str, anonymous: bool) -> Result<String> {
        let credentials = if anonymous { None } else { self.credentials() };
        let (status, body) = self.request_token(scope, credentials)?;
        if status != 200 {
            bail!("token server answered {status}: {body}");
        }
        let body: serde_json::Value = serde_json::from_str(&body).context("token response")?;
        body["token"].as_str().map(str::to_owned).context("no token in the token response")
    }

    /// The credentials (basic auth, or what the token server wants), if the registry requires
    /// them.
    pub fn credentials(&self) -> Option<(&str, &str)> {
        self.credentials.as_ref().map(|(user, password)| (user.as_str(), password.as_str()))
    }

    /// The registry's storage root (`docker/registry/v2/…` beneath it).
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// Where the registry keeps a blob's bytes: tests tamper with it to make the registry serve
    /// corrupt content.
    pub fn blob_data_path(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.storage_dir()
            .join("docker/registry/v2/blobs/sha256")
            .join(hex.get(..2).unwrap_or(""))
            .join(hex)
            .join("data")
    }

    /// `127.0.0.1:<port>/<name>`, with `:latest` added when `name` has no tag.
    pub fn reference(&self, name: &str) -> String {
        let has_tag = name.rsplit_once('/').map_or(name, |(_, last)| last).contains(':');
        if has_tag || name.contains('@') {
            format!("{}/{name}", self.host())
        } else {
            format!("{}/{name}:latest", self.host())
        }
    }

    fn skopeo(&self) -> Command {
        let mut command = Command::new(SKOPEO_BIN);
        command.arg("--insecure-policy");
        command
    }

    /// Pushes `tag` of an OCI layout to `name` (all platforms of an index); returns the
    /// reference.
    pub fn push_layout(&self, layout: &Path, tag: &str, name: &str) -> Result<String> {
        self.push_layout_as(layout, tag, name, None)
    }

    /// Like [`Self::push_layout`], converting the manifest on the way when `format` is given
    /// (skopeo's `--format`: "v2s2" for Docker schema 2 media types, "oci").
    pub fn push_layout_as(
        &self,
        layout: &Path,
        tag: &str,
        name: &str,
        format: Option<&str>,
    ) -> Result<String> {
        let reference = self.reference(name);
        let mut command = self.skopeo();
        command.args(["copy", "--all", "--quiet", "--dest-tls-verify=false"]);
        if let Some(dir) = &self.skopeo_cert_dir {
            command.arg(format!("--dest-cert-dir={}", dir.display()));
        }
        match format {
            Some(format) => command.arg(format!("--format={format}")),
            None => command.arg("--preserve-digests"),
        };
        if let Some((user, password)) = self.credentials() {
            command.arg(format!("--dest-creds={user}:{password}"));
        }
        command.arg(format!("oci:{}:{tag}", layout.display())).arg(format!("docker://{reference}"));
        let output = command.output().context("run skopeo copy")?;
        if !output.status.success() {
            bail!("skopeo copy to {reference} failed: {}", String::from_utf8_lossy(&output.stderr));
        }
        Ok(reference)
    }

    /// Builds `image` into a temporary OCI layout and pushes it as `name`.
    pub fn push_image(&self, name: &str, image: &TestImage) -> Result<String> {
        let dir = tempfile::tempdir()?;
        let mut layout = OciLayout::create(dir.path())?;
        let manifest = layout.write_image(image)?;
        layout.tag("t", MEDIA_TYPE_MANIFEST, &manifest.digest, manifest.size)?;
        self.push_layout(dir.path(), "t", name)
    }

    /// A busybox image (`/bin/busybox` + applet symlinks, Cmd `sh`), gzip layer.
    pub fn push_busybox(&self, name: &str) -> Result<String> {
        self.push_image(name, &TestImage::busybox()?)
    }

    /// Busybox with Docker schema 2 media types (manifest, config and gzip layer).
    pub fn push_busybox_docker(&self, name: &str) -> Result<String> {
        let dir = tempfile::tempdir()?;
        let mut layout = OciLayout::create(dir.path())?;
        let manifest = layout.write_image(&TestImage::busybox()?)?;
        layout.tag("t", MEDIA_TYPE_MANIFEST, &manifest.digest, manifest.size)?;
        self.push_layout_as(dir.path(), "t", name, Some("v2s2"))
    }

    /// Busybox with zstd-compressed layers.
    pub fn push_busybox_zstd(&self, name: &str) -> Result<String> {
        let mut image = TestImage::busybox()?;
        image.compression = Compression::Zstd;
        self.push_image(name, &image)
    }

    /// Three layers. Lower: busybox root plus `/etc/removed.txt`, `/data/old/{a,b}.txt`,
    /// `/data/keep.txt`. Middle: whites out `/etc/removed.txt`, makes `/data/old` opaque and
    /// adds `/data/old/new.txt`. Upper: a hard link `/data/hardlink` -> `/data/keep.txt`, a
    /// symlink `/data/link` -> `keep.txt` and `/data/owned.txt` owned by 1234:1234 mode 0600.
    ///
    /// After unpacking: `etc/removed.txt`, `data/old/a.txt`, `data/old/b.txt` are gone;
    /// `data/old/new.txt` holds "new\n"; `data/keep.txt` holds "keep\n".
    pub fn push_multilayer(&self, name: &str) -> Result<String> {
        self.push_image(name, &multilayer_image()?)
    }

    /// An index with linux/amd64 (busybox) and linux/arm64 entries. The arm64 image has a
    /// `/arch` file saying "arm64"; the amd64 one "amd64".
    pub fn push_multiarch(&self, name: &str) -> Result<String> {
        let dir = tempfile::tempdir()?;
        let mut layout = OciLayout::create(dir.path())?;
        let amd64 = TestImage::new(vec![
            LayerBuilder::new().busybox_root()?.finish()?,
            LayerBuilder::new().file("arch", b"amd64\n", 0o644)?.finish()?,
        ]);
        let mut arm64 =
            TestImage::new(vec![LayerBuilder::new().file("arch", b"arm64\n", 0o644)?.finish()?]);
        arm64.architecture = "arm64".to_owned();
        let amd64 = layout.write_image(&amd64)?;
        let arm64 = layout.write_image(&arm64)?;
        let (digest, size) = layout.write_index(&[(arm64, "arm64"), (amd64, "amd64")])?;
        layout.tag("t", MEDIA_TYPE_INDEX, &digest, size)?;
        self.push_layout(dir.path(), "t", name)
    }

    /// An index with only a linux/arm64 entry (no amd64 manifest).
    pub fn push_arm64_only(&self, name: &str) -> Result<String> {
        let dir = tempfile::tempdir()?;
        let mut layout = OciLayout::create(dir.path())?;
        let mut arm64 =
            TestImage::new(vec![LayerBuilder::new().file("arch", b"arm64\n", 0o644)?.finish()?]);
        arm64.architecture = "arm64".to_owned();
        let arm64 = layout.write_image(&arm64)?;
        let (digest, size) = layout.write_index(&[(arm64, "arm64")])?;
        layout.tag("t", MEDIA_TYPE_INDEX, &digest, size)?;
        self.push_layout(dir.path(), "t", name)
    }

    /// Busybox whose config User is `user` (e.g. "1234:1234", or "app" which exists in its
    /// /etc/passwd as uid 1000, gid 1000, home /home/app owned by it).
    pub fn push_with_user(&self, name: &str, user: &str) -> Result<String> {
        let image = TestImage::new(vec![
            LayerBuilder::new().busybox_root()?.finish()?,
            LayerBuilder::new()
                .file(
                    "etc/passwd",
                    b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n\
                      nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
                    0o644,
                )?
                .file("etc/group", b"root:x:0:\napp:x:1000:\nnogroup:x:65534:\n", 0o644)?
                .finish()?,
        ])
        .with_config("User", json!(user));
        self.push_image(name, &image)
    }

    /// The raw manifest (or index) `reference` names, as the registry serves it.
    pub fn raw_manifest(&self, reference: &str) -> Result<Vec<u8>> {
        let mut command = self.skopeo();
        command.args(["inspect", "--raw", "--tls-verify=false"]);
        if let Some(dir) = &self.skopeo_cert_dir {
            command.arg(format!("--cert-dir={}", dir.display()));
        }
        if let Some((user, password)) = self.credentials() {
            command.arg(format!("--creds={user}:{password}"));
        }
        command.arg(format!("docker://{reference}"));
        let output = command.output().context("run skopeo inspect")?;
        if !output.status.success() {
            bail!("skopeo inspect {reference} failed: {}", String::from_utf8_lossy(&output.stderr));
        }
        Ok(output.stdout)
    }

    /// Puts `body` as the manifest `name:tag` (anonymous registries only), bypassing skopeo,
    /// which would fix what tests break on purpose; returns the reference. The blobs it names
    /// must be in the repository already.
    pub fn put_manifest(
        &self,
        name: &str,
        tag: &str,
        media_type: &str,
        body: &[u8],
    ) -> Result<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            stream,
            "PUT /v2/{name}/manifests/{tag} HTTP/1.0\r\nHost: 127.0.0.1:{}\r\n\
             Content-Type: {media_type}\r\nContent-Length: {}\r\n\r\n",
            self.port,
            body.len()
        )?;
        stream.write_all(body)?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response)?;
        let response = String::from_utf8_lossy(&response);
        if !response.starts_with("HTTP/1.0 201") && !response.starts_with("HTTP/1.1 201") {
            bail!("the registry refused the manifest: {response}");
        }
        Ok(self.reference(&format!("{name}:{tag}")))
    }

    /// `sha256:…` of the manifest (or index) `reference` names.
    pub fn manifest_digest(&self, reference: &str) -> Result<String> {
        Ok(sha256_digest(&self.raw_manifest(reference)?))
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        // Best effort: the child is ours; a failed kill means it already exited.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The image [`TestRegistry::push_multilayer`] pushes.
pub fn multilayer_image() -> Result<TestImage> {
    let lower = LayerBuilder::new()
        .busybox_root()?
        .file("etc/removed.txt", b"removed\n", 0o644)?
        .dir("data", 0o755)?
        .dir("data/old", 0o755)?
        .file("data/old/a.txt", b"a\n", 0o644)?
        .file("data/old/b.txt", b"b\n", 0o644)?
        .file("data/keep.txt", b"keep\n", 0o644)?
        .finish()?;
    let middle = LayerBuilder::new()
        .whiteout("etc/removed.txt")?
        .dir("data/old", 0o755)?
        .opaque("data/old")?
        .file("data/old/new.txt", b"new\n", 0o644)?
        .finish()?;
    let upper = LayerBuilder::new()
        .hardlink("data/hardlink", "data/keep.txt")?
        .symlink("data/link", "keep.txt")?
        .file_owned("data/owned.txt", b"owned\n", 0o600, 1234, 1234)?
        .finish()?;
    Ok(TestImage::new(vec![lower, middle, upper]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pushes_every_test_image() -> Result<()> {
        if !registry_tests_can_run() {
            return Ok(());
        }
        let reg = TestRegistry::start()?;
        let busybox = reg.push_busybox("busybox:1")?;
        assert_eq!(busybox, format!("{}/busybox:1", reg.host()));
        reg.push_busybox_zstd("zstd")?;
        reg.push_multilayer("multi:1")?;
        reg.push_with_user("user:uid", "1234:1234")?;
        let index = reg.push_multiarch("multiarch:1")?;
        let raw: serde_json::Value = serde_json::from_slice(&reg.raw_manifest(&index)?)?;
        assert_eq!(raw["manifests"].as_array().map(Vec::len), Some(2));
        let zstd: serde_json::Value =
            serde_json::from_slice(&reg.raw_manifest(&reg.reference("zstd"))?)?;
        assert_eq!(zstd["layers"][0]["mediaType"], "application/vnd.oci.image.layer.v1.tar+zstd");
        let layer = zstd["layers"][0]["digest"].as_str().context("digest")?;
        assert!(reg.blob_data_path(layer).exists());
        Ok(())
    }

    #[test]
    fn basic_auth_registry_refuses_anonymous() -> Result<()> {
        if !registry_tests_can_run() {
            return Ok(());
        }
        let reg = TestRegistry::start_with_basic_auth("alice", "s3cret")?;
        assert_eq!(reg.http_status("/v2/")?, 401);
        reg.push_busybox("private:1")?;
        reg.manifest_digest(&reg.reference("private:1"))?;
        Ok(())
    }

    #[test]
    fn token_auth_registry_refuses_anonymous_and_serves_with_credentials() -> Result<()> {
        if !token_auth_tests_can_run() {
            return Ok(());
        }
        let reg = TestRegistry::start_with_token_auth("alice", "s3cret")?;
        let challenge = reg.auth_challenge()?.context("no WWW-Authenticate")?;
        let realm = reg.token_server().context("token server")?.realm();
        assert!(challenge.starts_with(&format!("Bearer realm=\"{realm}\"")), "{challenge}");
        assert!(challenge.contains(&format!("service=\"{TOKEN_SERVICE}\"")), "{challenge}");

        // skopeo pushes through the token flow (pull,push scope with --dest-creds) and reads
        // back with --creds.
        let reference = reg.push_busybox("private:1")?;
        reg.manifest_digest(&reference)?;
        let manifest = "/v2/private/manifests/1";
        assert_eq!(reg.http_status(manifest)?, 401);

        // Anonymous skopeo is refused.
        let output = reg
            .skopeo()
            .args(["inspect", "--raw", "--tls-verify=false", "--no-creds"])
            .arg(format!("docker://{reference}"))
            .output()?;
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("unauthorized") || stderr.contains("denied"), "{stderr}");

        // By hand: wrong credentials get no token; an anonymous token grants nothing; the
        // right credentials' token reads the manifest, but only in the repository it names.
        let scope = "repository:private:pull";
        assert_eq!(reg.request_token(scope, Some(("alice", "wrong")))?.0, 401);
        assert_eq!(reg.request_token(scope, Some(("mallory", "s3cret")))?.0, 401);
        let anonymous = reg.bearer_token(scope, true)?;
        assert_eq!(reg.http_status_with(manifest, Some(&format!("Bearer {anonymous}")))?, 401);
        let token = reg.bearer_token(scope, false)?;
        assert_eq!(reg.http_status_with(manifest, Some(&format!("Bearer {token}")))?, 200);
        let other = reg.bearer_token("repository:other:pull", false)?;
        assert_eq!(reg.http_status_with(manifest, Some(&format!("Bearer {other}")))?, 401);
        Ok(())
    }
}
