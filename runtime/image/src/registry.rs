//! One registry endpoint over HTTP, with our own `reqwest` client: the `/v2/` challenge, a
//! bearer token from the realm it names (or basic auth), and authorized GETs for manifests and
//! blobs. Ours rather than oci-client's because oci-client cannot present a client certificate
//! (mutual TLS) and reads manifests whole; one client for every endpoint keeps one pull path.
//!
//! The pull turns a [`RegistryError`] into the store's error for the endpoint and image
//! (`pull::Target::error`).

use std::time::Duration;

use oci_client::errors::OciEnvelope;
use oci_client::secrets::RegistryAuth;
use reqwest::StatusCode;
use serde::Deserialize;
use tracing::debug;

use crate::mirrors::EndpointTls;

/// A failed exchange with a registry endpoint.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RegistryError {
    /// Sending a request or reading its answer failed (connection, TLS, a body cut short).
    #[error("{0}")]
    Transport(#[from] reqwest::Error),
    /// The token endpoint a Bearer challenge named refused the token.
    #[error("token endpoint {realm} answered {status}: {body}")]
    TokenRefused {
        /// The realm.
        realm: String,
        /// Its status.
        status: StatusCode,
        /// Its body, as text.
        body: String,
    },
    /// The token endpoint answered 200 with no token in it.
    #[error("token endpoint {realm} sent no usable token: {reason}")]
    BadToken {
        /// The realm.
        realm: String,
        /// What is wrong with the answer.
        reason: String,
    },
    /// A non-success answer to a request; `envelope` is its distribution-spec error body.
    #[error("{url} answered {status}{}", describe_body(.envelope.as_ref(), .body))]
    Status {
        /// The request's URL.
        url: String,
        /// The status.
        status: StatusCode,
        /// The `{"errors": [...]}` body, when it is one.
        envelope: Option<OciEnvelope>,
        /// The body as text otherwise (bounded).
        body: String,
    },
}

fn describe_body(envelope: Option<&OciEnvelope>, body: &str) -> String {
    match envelope {
        Some(envelope) => format!(": {envelope}"),
        None if body.trim().is_empty() => String::new(),
        None => format!(": {}", body.trim()),
    }
}

type Result<T> = std::result::Result<T, RegistryError>;

/// Sent with every request: registries log it, some rate-limit by it.
const USER_AGENT: &str = concat!("podvisor/", env!("CARGO_PKG_VERSION"));

/// What an authorized request carries, once negotiated with the endpoint.
#[derive(Clone, PartialEq, Eq)]
enum Authorization {
    Anonymous,
    Basic(String, String),
    Bearer(String),
}

/// A token endpoint's answer (the distribution spec names it `token`, OAuth2 `access_token`).
#[derive(Deserialize)]
struct TokenResponse {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
}

/// A `Bearer realm=…,service=…` challenge.
#[derive(Debug, PartialEq, Eq)]
struct BearerChallenge {
    realm: String,
    service: Option<String>,
}

/// The Bearer challenge of a `WWW-Authenticate` value, if it has one.
fn bearer_challenge(header: &str) -> Option<BearerChallenge> {
    let challenges = http_auth::parse_challenges(header).ok()?;
    let bearer = challenges.iter().find(|c| c.scheme.eq_ignore_ascii_case("bearer"))?;
    let param = |name: &str| {
        bearer
            .params
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.to_unescaped())
    };
    Some(BearerChallenge { realm: param("realm")?, service: param("service") })
}

/// The `WWW-Authenticate` value of an answer, if any.
fn challenge_of(response: &reqwest::Response) -> Option<String> {
    response
        .headers()
        .get(reqwest::header::WWW_AUTHENTICATE)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned)
}

/// A registry endpoint (`scheme://host`) for one repository, with the credentials for that
/// host. Negotiates authorization on first use (from the `/v2/` challenge) and again, once per
/// request, when a request gets 401 (from that answer's challenge: an expired token during a
/// long pull, or a registry whose `/v2/` is open but the repository is not).
pub(crate) struct RegistryHttp {
    http: reqwest::Client,
    scheme: &'static str,
    host: String,
    repository: String,
    credentials: RegistryAuth,
    authorization: tokio::sync::Mutex<Option<Authorization>>,
}

impl RegistryHttp {
    /// A client for `host` with its TLS settings. Redirects (blob storage elsewhere) are
    /// followed; reqwest drops the `Authorization` header when one leaves the host.
    pub(crate) fn new(
        host: &str,
        plain_http: bool,
        repository: &str,
        tls: &EndpointTls,
        connect_timeout: Duration,
        credentials: RegistryAuth,
    ) -> reqwest::Result<Self> {
        let mut builder = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .connect_timeout(connect_timeout)
            // No read timeout: the pull's progress timeout covers silence, with a clearer error.
            .danger_accept_invalid_certs(tls.skip_verify);
        if let Some(bundle) = &tls.ca_bundle {
            builder = builder.tls_certs_merge(reqwest::Certificate::from_pem_bundle(bundle)?);
        }
        if let Some(identity) = &tls.client_identity {
            builder = builder.identity(identity.to_reqwest()?);
        }
        Ok(Self {
            http: builder.build()?,
            scheme: if plain_http { "http" } else { "https" },
            host: host.to_owned(),
            repository: repository.to_owned(),
            credentials,
            authorization: tokio::sync::Mutex::new(None),
        })
    }

    /// `scheme://host/v2/<repository>/<kind>/<name>`.
    pub(crate) fn url(&self, kind: &str, name: &str) -> String {
        format!("{}://{}/v2/{}/{kind}/{name}", self.scheme, self.host, self.repository)
    }

    /// GET `url` with `accept`, authorized; a 401 renegotiates once and retries. Any status is
    /// returned: the caller decides what it means ([`status_error`]).
    pub(crate) async fn get(&self, url: &str, accept: &str) -> Result<reqwest::Response> {
        let authorization = self.authorization().await?;
        let response = self.send(url, accept, &authorization).await?;
        if response.status() != StatusCode::UNAUTHORIZED {
            return Ok(response);
        }
        debug!(url, "401: negotiating authorization again");
        let challenge = challenge_of(&response);
        let authorization = self.renegotiate(&authorization, challenge).await?;
        self.send(url, accept, &authorization).await
    }

    async fn send(
        &self,
        url: &str,
        accept: &str,
        authorization: &Authorization,
    ) -> Result<reqwest::Response> {
        let request = self.http.get(url).header(reqwest::header::ACCEPT, accept);
        let request = match authorization {
            Authorization::Anonymous => request,
            Authorization::Basic(user, password) => request.basic_auth(user, Some(password)),
            Authorization::Bearer(token) => request.bearer_auth(token),
        };
        Ok(request.send().await?)
    }

    /// The negotiated authorization, negotiated from the `/v2/` challenge the first time.
    async fn authorization(&self) -> Result<Authorization> {
        let mut cached = self.authorization.lock().await;
        if let Some(authorization) = cached.as_ref() {
            return Ok(authorization.clone());
        }
        let authorization = match &self.credentials {
            // Sent as is: no need to ask.
            RegistryAuth::Bearer(token) => Authorization::Bearer(token.clone()),
            _ => {
                let ping = format!("{}://{}/v2/", self.scheme, self.host);
                let challenge = challenge_of(&self.http.get(&ping).send().await?);
                self.negotiate(challenge).await?
            }
        };
        *cached = Some(authorization.clone());
        Ok(authorization)
    }

    /// A new authorization after `failed` got a 401 with `challenge`; when another request
    /// renewed it meanwhile (parallel blob downloads), that one.
    async fn renegotiate(
        &self,
        failed: &Authorization,
        challenge: Option<String>,
    ) -> Result<Authorization> {
        let mut cached = self.authorization.lock().await;
        if let Some(renewed) = cached.as_ref().filter(|current| *current != failed) {
            return Ok(renewed.clone());
        }
        let authorization = self.negotiate(challenge).await?;
        *cached = Some(authorization.clone());
        Ok(authorization)
    }

    /// What the distribution spec's auth flow yields for `challenge` (a `WWW-Authenticate`
    /// value): a token the caller holds as is; on a Bearer challenge a pull token for the
    /// repository from its realm (with basic credentials when we have them); on another
    /// challenge basic auth; nothing without a challenge.
    async fn negotiate(&self, challenge: Option<String>) -> Result<Authorization> {
        let (user, password) = match &self.credentials {
            RegistryAuth::Bearer(token) => return Ok(Authorization::Bearer(token.clone())),
            RegistryAuth::Basic(user, password) => (Some(user), Some(password)),
            RegistryAuth::Anonymous => (None, None),
        };
        let Some(challenge) = challenge else {
            return Ok(Authorization::Anonymous);
        };
        let Some(bearer) = bearer_challenge(&challenge) else {
            return Ok(match (user, password) {
                (Some(user), Some(password)) => {
                    Authorization::Basic(user.clone(), password.clone())
                }
                _ => Authorization::Anonymous,
            });
        };
        let scope = format!("repository:{}:pull", self.repository);
        let mut query = vec![("scope", scope.as_str())];
        if let Some(service) = &bearer.service {
            query.push(("service", service));
        }
        debug!(realm = %bearer.realm, service = ?bearer.service, scope, "fetching a token");
        let mut request = self.http.get(&bearer.realm).query(&query);
        if let (Some(user), Some(password)) = (user, password) {
            request = request.basic_auth(user, Some(password));
        }
        let response = request.send().await?;
        let status = response.status();
        let body = read_small(response).await?;
        if status != StatusCode::OK {
            let body = String::from_utf8_lossy(&body).trim().to_owned();
            return Err(RegistryError::TokenRefused { realm: bearer.realm, status, body });
        }
        let bad = |reason: String| RegistryError::BadToken { realm: bearer.realm.clone(), reason };
        let token: TokenResponse = serde_json::from_slice(&body).map_err(|e| bad(e.to_string()))?;
        token
            .token
            .or(token.access_token)
            .filter(|t| !t.is_empty())
            .map(Authorization::Bearer)
            .ok_or_else(|| bad("neither token nor access_token in it".into()))
    }
}

/// Longest token answer or error body read (a JWT is a few KiB).
const SMALL_BODY_LIMIT: usize = 64 * 1024;

/// A body read up to [`SMALL_BODY_LIMIT`] (the rest is dropped with the connection).
pub(crate) async fn read_small(mut response: reqwest::Response) -> Result<Vec<u8>> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = SMALL_BODY_LIMIT - body.len();
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() == SMALL_BODY_LIMIT {
            break;
        }
    }
    Ok(body)
}

/// A registry's non-success answer (`body` read within a limit).
pub(crate) fn status_error(status: StatusCode, body: &[u8], url: &str) -> RegistryError {
    let envelope = serde_json::from_slice::<OciEnvelope>(body).ok();
    let body =
        if envelope.is_some() { String::new() } else { String::from_utf8_lossy(body).into_owned() };
    RegistryError::Status { url: url.to_owned(), status, envelope, body }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_challenges_give_realm_and_service() {
        assert_eq!(
            bearer_challenge(
                r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a:pull""#
            ),
            Some(BearerChallenge {
                realm: "https://auth.example/token".into(),
                service: Some("registry.example".into())
            })
        );
        assert_eq!(
            bearer_challenge(r#"Basic realm="x", Bearer realm="https://t""#),
            Some(BearerChallenge { realm: "https://t".into(), service: None })
        );
        assert_eq!(bearer_challenge(r#"Basic realm="registry""#), None);
        assert_eq!(bearer_challenge("Bearer service=\"no realm\""), None);
        assert_eq!(bearer_challenge("\"garbage"), None);
    }

    /// A registry whose `/v2/` is open but whose repository wants a token: the 401's own
    /// challenge is followed, with the repository's pull scope, once.
    #[tokio::test]
    async fn a_401_is_answered_from_its_own_challenge() {
        use std::io::{BufRead, BufReader, Write};
        use std::sync::atomic::{AtomicUsize, Ordering};

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let tokens = std::sync::Arc::new(AtomicUsize::new(0));
        let counted = tokens.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let mut head = Vec::new();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    head.push(line.trim_end().to_owned());
                }
                let path = head.first().and_then(|l| l.split(' ').nth(1)).unwrap_or("");
                let authorized =
                    head.iter().any(|l| l.eq_ignore_ascii_case("authorization: Bearer t1"));
                let (status, extra, body) = if path == "/v2/" {
                    ("200 OK", String::new(), "{}")
                } else if path == "/token?scope=repository%3Ateam%2Frepo%3Apull&service=svc" {
                    counted.fetch_add(1, Ordering::SeqCst);
                    ("200 OK", String::new(), r#"{"token":"t1"}"#)
                } else if path == "/v2/team/repo/manifests/x" && authorized {
                    ("200 OK", String::new(), "manifest")
                } else if path == "/v2/team/repo/manifests/x" {
                    let challenge = format!(
                        "WWW-Authenticate: Bearer realm=\"http://127.0.0.1:{port}/token\",\
                         service=\"svc\"\r\n"
                    );
                    ("401 Unauthorized", challenge, "")
                } else {
                    ("404 Not Found", String::new(), "")
                };
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        let http = RegistryHttp::new(
            &format!("127.0.0.1:{port}"),
            true,
            "team/repo",
            &EndpointTls::default(),
            Duration::from_secs(5),
            RegistryAuth::Anonymous,
        )
        .unwrap();
        let url = http.url("manifests", "x");
        for _ in 0..2 {
            let response = http.get(&url, "*/*").await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            assert_eq!(response.text().await.unwrap(), "manifest");
        }
        assert_eq!(tokens.load(Ordering::SeqCst), 1, "the token is kept");
        let missing = http.url("manifests", "nothing");
        let response = http.get(&missing, "*/*").await.unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
    }
}
