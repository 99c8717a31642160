//! A minimal registry token server (the "token" auth of the distribution spec) for tests: a
//! thread answering `GET /token?service=…&scope=repository:<name>:pull[,push]` on 127.0.0.1
//! with an RS256 JWT signed by an RSA key whose self-signed certificate the registry trusts
//! (`auth.token.rootcertbundle`). The certificate rides in the JWT header's `x5c`.
//!
//! Requests with the right `Authorization: Basic` credentials get the actions they ask for;
//! anonymous requests get a token granting nothing (so the registry refuses them); wrong
//! credentials get 401. Keys, certificates and signatures come from the `openssl` CLI.

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use serde_json::json;

/// The `openssl` CLI makes the key and certificate and signs the tokens.
pub const OPENSSL_BIN: &str = "openssl";
/// How long an issued token is valid.
pub const TOKEN_LIFETIME_SECS: u64 = 300;
/// The largest request head the server reads.
const MAX_HEAD: usize = 16 * 1024;

/// Who signs the tokens and whom they are for.
struct Issuer {
    key: PathBuf,
    /// Standard base64 of the certificate's DER, for the JWT header's `x5c`.
    x5c: String,
    issuer: String,
    service: String,
    username: String,
    /// `Basic <base64(username:password)>`: the Authorization header a client must send.
    expected_authorization: String,
    tokens_issued: AtomicU64,
}

/// A running token server; stopped when dropped.
pub struct TokenServer {
    port: u16,
    cert: PathBuf,
    issuer: Arc<Issuer>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TokenServer {
    /// Generates an RSA-2048 key (`key.pem`) and a self-signed certificate (`cert.pem`) in
    /// `dir`, and starts serving tokens for `service` issued by `issuer` on 127.0.0.1.
    pub fn start(
        dir: &Path,
        issuer: &str,
        service: &str,
        username: &str,
        password: &str,
    ) -> Result<Self> {
        let key = dir.join("token-key.pem");
        let cert = dir.join("token-cert.pem");
        let der = dir.join("token-cert.der");
        let subject = format!("/CN={issuer}");
        run_openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-sha256",
            "-days",
            "2",
            "-subj",
            &subject,
            "-keyout",
            path_str(&key)?,
            "-out",
            path_str(&cert)?,
        ])?;
        run_openssl(&[
            "x509",
            "-in",
            path_str(&cert)?,
            "-outform",
            "DER",
            "-out",
            path_str(&der)?,
        ])?;
        let der = std::fs::read(&der).context("read the certificate's DER")?;
        let issuer = Arc::new(Issuer {
            key,
            x5c: STANDARD.encode(&der),
            issuer: issuer.to_owned(),
            service: service.to_owned(),
            username: username.to_owned(),
            expected_authorization: basic_authorization(username, password),
            tokens_issued: AtomicU64::new(0),
        });
        let listener = TcpListener::bind("127.0.0.1:0").context("bind the token server")?;
        let port = listener.local_addr()?.port();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (issuer, stop) = (issuer.clone(), stop.clone());
            std::thread::Builder::new()
                .name("token-server".to_owned())
                .spawn(move || serve(&listener, &issuer, &stop))
                .context("spawn the token server")?
        };
        Ok(Self { port, cert, issuer, stop, thread: Some(thread) })
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:<port>/token`, the registry's `auth.token.realm`.
    pub fn realm(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.port)
    }

    /// The PEM certificate whose key signs the tokens (the registry's `rootcertbundle`).
    pub fn cert_path(&self) -> &Path {
        &self.cert
    }

    /// How many tokens it has handed out (anonymous ones included).
    pub fn tokens_issued(&self) -> u64 {
        self.issuer.tokens_issued.load(Ordering::Relaxed)
    }

    /// GET `/token?service=<service>&scope=<scope>` with basic `credentials` (or none):
    /// the status and the body.
    pub fn request(&self, scope: &str, credentials: Option<(&str, &str)>) -> Result<(u16, String)> {
        let path = format!(
            "/token?service={}&scope={}",
            percent_encode(&self.issuer.service),
            percent_encode(scope)
        );
        let authorization = credentials.map(|(user, password)| basic_authorization(user, password));
        http_get(self.port, &path, authorization.as_deref())
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop up so that it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str().with_context(|| format!("{} is not UTF-8", path.display()))
}

pub(crate) fn run_openssl(args: &[&str]) -> Result<()> {
    let output = Command::new(OPENSSL_BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {OPENSSL_BIN} {}", args.first().unwrap_or(&"")))?;
    if !output.status.success() {
        bail!("{OPENSSL_BIN} {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(())
}

fn serve(listener: &TcpListener, issuer: &Arc<Issuer>, stop: &AtomicBool) {
    for stream in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = stream else { continue };
        let issuer = issuer.clone();
        // One thread per connection: a slow client does not hold the others up.
        let _ = std::thread::Builder::new()
            .name("token-conn".to_owned())
            .spawn(move || handle(stream, &issuer));
    }
}

/// A response: status, extra headers, JSON body.
struct Response {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: String,
}

impl Response {
    fn error(status: u16, code: &str, message: &str) -> Self {
        let body = json!({"errors": [{"code": code, "message": message}]}).to_string();
        Self { status, headers: Vec::new(), body }
    }
}

fn handle(mut stream: TcpStream, issuer: &Issuer) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
    let response = match read_head(&mut stream) {
        Some(head) => respond(&head, issuer),
        None => Response::error(400, "BAD_REQUEST", "malformed or incomplete request"),
    };
    let reason = match response.status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Internal Server Error",
    };
    let mut out = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n",
        response.status,
        response.body.len()
    );
    for (name, value) in &response.headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str("\r\n");
    out.push_str(&response.body);
    let _ = stream.write_all(out.as_bytes());
    let _ = stream.flush();
    let _ = stream.shutdown(Shutdown::Both);
}

/// The request head (up to the blank line), or None when it is not there in time or too big.
fn read_head(stream: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            head.truncate(end);
            return String::from_utf8(head).ok();
        }
        if head.len() > MAX_HEAD {
            return None;
        }
        let read = stream.read(&mut buf).ok()?;
        if read == 0 {
            return None;
        }
        head.extend_from_slice(buf.get(..read)?);
    }
}

/// One granted (or requested) access: `repository:<name>:<actions>`.
struct Access {
    kind: String,
    name: String,
    actions: Vec<String>,
}

/// `type:name:actions`, e.g. `repository:busybox:pull,push`.
fn parse_scope(scope: &str) -> Option<Access> {
    let (kind, rest) = scope.split_once(':')?;
    let (name, actions) = rest.rsplit_once(':')?;
    if kind.is_empty() || name.is_empty() {
        return None;
    }
    let actions = actions.split(',').filter(|a| !a.is_empty()).map(str::to_owned).collect();
    Some(Access { kind: kind.to_owned(), name: name.to_owned(), actions })
}

fn respond(head: &str, issuer: &Issuer) -> Response {
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next().unwrap_or("").split_whitespace();
    let (Some(method), Some(target), Some(_version), None) =
        (request_line.next(), request_line.next(), request_line.next(), request_line.next())
    else {
        return Response::error(400, "BAD_REQUEST", "malformed request line");
    };
    let mut authorization = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Response::error(400, "BAD_REQUEST", "malformed header");
        };
        if name.trim().eq_ignore_ascii_case("authorization") {
            authorization = Some(value.trim().to_owned());
        }
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if path != "/token" {
        return Response::error(404, "NOT_FOUND", "only /token is served");
    }
    if method != "GET" {
        return Response::error(405, "UNSUPPORTED", "only GET is supported");
    }
    let mut service = None;
    let mut scopes = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let Some(value) = percent_decode(value) else {
            return Response::error(400, "BAD_REQUEST", "bad percent-encoding in the query");
        };
        match key {
            "service" => service = Some(value),
            // Several scopes come as several parameters or space-separated in one.
            "scope" => scopes.extend(value.split(' ').filter(|s| !s.is_empty()).map(str::to_owned)),
            _ => {}
        }
    }
    if service.as_deref().is_some_and(|s| s != issuer.service) {
        return Response::error(400, "BAD_REQUEST", "unknown service");
    }
    let mut requested = Vec::new();
    for scope in &scopes {
        let Some(access) = parse_scope(scope) else {
            return Response::error(400, "BAD_REQUEST", &format!("malformed scope {scope:?}"));
        };
        requested.push(access);
    }
    let subject = match authorization {
        None => None,
        Some(given) if given == issuer.expected_authorization => Some(issuer.username.as_str()),
        Some(_) => {
            let mut response = Response::error(401, "UNAUTHORIZED", "wrong credentials");
            response
                .headers
                .push(("WWW-Authenticate", "Basic realm=\"podvisor-test-token\"".to_owned()));
            return response;
        }
    };
    // Anonymous requests get a token, but one that grants nothing.
    let granted: Vec<Access> = match subject {
        None => Vec::new(),
        Some(_) => requested
            .into_iter()
            .filter(|a| a.kind == "repository")
            .map(|a| Access {
                actions: a.actions.into_iter().filter(|x| x == "pull" || x == "push").collect(),
                ..a
            })
            .collect(),
    };
    match issue(issuer, subject.unwrap_or(""), &granted) {
        Ok((token, issued_at)) => {
            issuer.tokens_issued.fetch_add(1, Ordering::Relaxed);
            let body = json!({
                "token": token,
                "access_token": token,
                "expires_in": TOKEN_LIFETIME_SECS,
                "issued_at": rfc3339(issued_at),
            });
            Response { status: 200, headers: Vec::new(), body: body.to_string() }
        }
        Err(error) => Response::error(500, "INTERNAL", &format!("{error:#}")),
    }
}

/// A signed JWT for `subject` granting `access`, and when it was issued (Unix seconds).
fn issue(issuer: &Issuer, subject: &str, access: &[Access]) -> Result<(String, u64)> {
    static SERIAL: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?;
    let secs = now.as_secs();
    let header = json!({"typ": "JWT", "alg": "RS256", "x5c": [issuer.x5c]});
    let access: Vec<_> = access
        .iter()
        .map(|a| json!({"type": a.kind, "name": a.name, "actions": a.actions}))
        .collect();
    let claims = json!({
        "iss": issuer.issuer,
        "sub": subject,
        // distribution v2.8 reads `aud` as a single string.
        "aud": issuer.service,
        "exp": secs + TOKEN_LIFETIME_SECS,
        "nbf": secs.saturating_sub(10),
        "iat": secs,
        "jti": format!("{}-{}", now.as_nanos(), SERIAL.fetch_add(1, Ordering::Relaxed)),
        "access": access,
    });
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let signature = sign(&issuer.key, signing_input.as_bytes())?;
    Ok((format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(&signature)), secs))
}

/// RS256: `openssl dgst -sha256 -sign` is a PKCS#1 v1.5 signature of the SHA-256 digest.
fn sign(key: &Path, data: &[u8]) -> Result<Vec<u8>> {
    let mut child = Command::new(OPENSSL_BIN)
        .args(["dgst", "-sha256", "-sign"])
        .arg(key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("run openssl dgst")?;
    child.stdin.take().context("openssl stdin")?.write_all(data)?;
    let output = child.wait_with_output()?;
    if !output.status.success() || output.stdout.is_empty() {
        bail!("openssl dgst -sign failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(output.stdout)
}

/// `Basic <base64(user:password)>`.
pub fn basic_authorization(username: &str, password: &str) -> String {
    format!("Basic {}", STANDARD.encode(format!("{username}:{password}")))
}

/// Percent-encodes everything but unreserved characters.
fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for byte in s.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// `application/x-www-form-urlencoded` value decoding; None when malformed.
fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut rest = s.as_bytes();
    while let Some((&byte, tail)) = rest.split_first() {
        match byte {
            b'%' => {
                let hex = tail.get(..2)?;
                if !hex.iter().all(u8::is_ascii_hexdigit) {
                    return None;
                }
                out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
                rest = tail.get(2..)?;
            }
            b'+' => {
                out.push(b' ');
                rest = tail;
            }
            other => {
                out.push(other);
                rest = tail;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// `YYYY-MM-DDTHH:MM:SSZ` for Unix seconds.
fn rfc3339(secs: u64) -> String {
    // Howard Hinnant's civil_from_days.
    let days = (secs / 86_400) as i64 + 719_468;
    let era = days.div_euclid(146_097);
    let doe = days.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let rem = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// A GET on 127.0.0.1:`port` with an optional Authorization header: status and body.
pub fn http_get(port: u16, path: &str, authorization: Option<&str>) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut request = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n");
    if let Some(authorization) = authorization {
        request.push_str(&format!("Authorization: {authorization}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes())?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("bad HTTP response: {head:?}"))?;
    Ok((status, body.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings() {
        assert_eq!(STANDARD.encode(b""), "");
        assert_eq!(STANDARD.encode(b"f"), "Zg==");
        assert_eq!(STANDARD.encode(b"fo"), "Zm8=");
        assert_eq!(STANDARD.encode(b"foo"), "Zm9v");
        assert_eq!(URL_SAFE_NO_PAD.encode(b"foob"), "Zm9vYg");
        assert_eq!(URL_SAFE_NO_PAD.encode([0xfb, 0xff]), "-_8");
        assert_eq!(basic_authorization("alice", "s3cret"), "Basic YWxpY2U6czNjcmV0");
        assert_eq!(
            percent_decode("repository%3Aa%2Fb%3Apull%2Cpush").unwrap(),
            "repository:a/b:pull,push"
        );
        assert_eq!(percent_decode(&percent_encode("a b:c/d")).unwrap(), "a b:c/d");
        assert!(percent_decode("%").is_none());
        assert!(percent_decode("%zz").is_none());
        assert!(percent_decode("%c3").is_none());
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_827_696), "2000-02-29T12:34:56Z");
        assert_eq!(rfc3339(1_798_761_599), "2026-12-31T23:59:59Z");
        let scope = parse_scope("repository:a/b:pull,push").unwrap();
        assert_eq!((scope.kind.as_str(), scope.name.as_str()), ("repository", "a/b"));
        assert_eq!(scope.actions, ["pull", "push"]);
        assert!(parse_scope("repository").is_none());
        assert!(parse_scope(":a:pull").is_none());
    }

    #[test]
    fn malformed_requests_get_400_not_a_panic() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let server = TokenServer::start(dir.path(), "iss", "svc", "alice", "s3cret")?;
        for raw in [
            &b"\r\n\r\n"[..],
            b"GET\r\n\r\n",
            b"GET /token?scope=%zz HTTP/1.1\r\n\r\n",
            b"GET /token?scope=nonsense HTTP/1.1\r\n\r\n",
            b"GET /token HTTP/1.1\r\nno colon here\r\n\r\n",
            b"GET /token?service=other HTTP/1.1\r\n\r\n",
            b"\xff\xfe HTTP/1.1\r\n\r\n",
            b"GET /tok", // incomplete, then EOF
        ] {
            let mut stream = TcpStream::connect(("127.0.0.1", server.port()))?;
            stream.write_all(raw)?;
            stream.shutdown(Shutdown::Write)?;
            let mut response = String::new();
            stream.read_to_string(&mut response)?;
            assert!(response.starts_with("HTTP/1.1 400 "), "{raw:?}: {response}");
        }
        let (status, _) = server.request("repository:x:pull", Some(("alice", "wrong")))?;
        assert_eq!(status, 401);
        assert_eq!(server.tokens_issued(), 0);

        let (status, body) = server.request("repository:x:pull,push", Some(("alice", "s3cret")))?;
        assert_eq!(status, 200, "{body}");
        let body: serde_json::Value = serde_json::from_str(&body)?;
        let token = body["token"].as_str().context("token")?;
        assert_eq!(body["access_token"].as_str(), Some(token));
        assert_eq!(body["expires_in"], TOKEN_LIFETIME_SECS);
        let claims = token.split('.').nth(1).context("claims")?;
        assert!(!claims.contains('='), "{token}");
        let (status, _) = server.request("repository:x:pull", None)?;
        assert_eq!(status, 200);
        assert_eq!(server.tokens_issued(), 2);
        Ok(())
    }
}
