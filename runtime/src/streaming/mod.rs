//! The streaming server: what the URLs that Exec, Attach and PortForward return lead to. An
//! HTTP/1.1 server on the `[streaming]` address upgrades `/exec/<token>`, `/attach/<token>`
//! and `/portforward/<token>` to SPDY/3.1 ([`podvisor_spdy`]) or to a WebSocket
//! ([`websocket`]), whichever the client asks for, and serves Kubernetes' remotecommand
//! ([`remotecommand`]) or port-forward ([`portforward`]) protocol on it, as kubelet's CRI
//! streaming library does; tokens are single-use ([`tokens`]). The process side is the
//! sandbox layer's exec session or the container's I/O hub.

pub mod portforward;
pub mod remotecommand;
pub mod tokens;
pub mod websocket;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;
use tracing::{debug, info, warn};

use crate::config::StreamingSection;
use crate::sandbox::SandboxManager;
use tokens::Tokens;
pub use tokens::{StreamRequest, TokenError};

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
pub enum StreamingError {
    #[error("listening for streaming connections on {address}: {source}")]
    Listen { address: String, source: std::io::Error },
}

pub struct StreamingServer {
    base_url: String,
    tokens: Tokens,
}

impl StreamingServer {
    /// Binds the configured address and serves in the background.
    pub async fn start(
        config: &StreamingSection,
        manager: Arc<SandboxManager>,
    ) -> Result<Arc<Self>, StreamingError> {
        let address = format!("{}:{}", config.address, config.port);
        let listen_err = |source| StreamingError::Listen { address: address.clone(), source };
        let listener = TcpListener::bind(&address).await.map_err(listen_err)?;
        let local = listener.local_addr().map_err(listen_err)?;
        let server = Arc::new(Self { base_url: base_url(local), tokens: Tokens::default() });
        info!(url = %server.base_url, "streaming server listening");
        let this = server.clone();
        tokio::spawn(async move { this.accept(listener, manager).await });
        Ok(server)
    }

    /// The URL a client uses for `request`.
    pub fn url_for(&self, request: StreamRequest) -> Result<String, TokenError> {
        let kind = request.kind();
        let token = self.tokens.issue(request)?;
        Ok(format!("{}/{kind}/{token}", self.base_url))
    }

    async fn accept(self: Arc<Self>, listener: TcpListener, manager: Arc<SandboxManager>) {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of fds and the like: wait, do not spin.
                    warn!(error = %e, "accepting a streaming connection");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let this = self.clone();
            let manager = manager.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let this = this.clone();
                    let manager = manager.clone();
                    async move { Ok::<_, Infallible>(this.handle(req, manager)) }
                });
                let served = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
                    .await;
                if let Err(e) = served {
                    debug!(%peer, error = %e, "streaming connection ended");
                }
            });
        }
    }

    /// Answers one request: a 101 with the session spawned, or an error status.
    fn handle(
        &self,
        req: Request<Incoming>,
        manager: Arc<SandboxManager>,
    ) -> Response<Full<Bytes>> {
        let path: Vec<&str> = req.uri().path().trim_matches('/').split('/').collect();
        let [kind, token] = path.as_slice() else {
            return plain(StatusCode::NOT_FOUND, "no such streaming endpoint");
        };
        let Some(request) = self.tokens.redeem(token).filter(|r| r.kind() == *kind) else {
            return plain(StatusCode::NOT_FOUND, "unknown or expired streaming token");
        };
        if websocket::is_upgrade(req.headers()) {
            upgrade_websocket(req, request, manager)
        } else {
            upgrade_spdy(req, request, manager)
        }
    }
}

/// The two transports a streaming URL takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// `Upgrade: SPDY/3.1`, the protocol in `X-Stream-Protocol-Version`.
    Spdy,
    /// `Upgrade: websocket`, the protocol in `Sec-WebSocket-Protocol`.
    WebSocket,
}

/// The 403 for a client that offers none of `ours`.
fn no_common_protocol(ours: &[&str]) -> Response<Full<Bytes>> {
    let mut response = plain(
        StatusCode::FORBIDDEN,
        &format!("no common stream protocol: we speak {}", ours.join(", ")),
    );
    if let Ok(ours) = ours.join(", ").parse() {
        response.headers_mut().insert("x-accepted-stream-protocol-versions", ours);
    }
    response
}

fn upgrade_spdy(
    req: Request<Incoming>,
    request: StreamRequest,
    manager: Arc<SandboxManager>,
) -> Response<Full<Bytes>> {
    let upgrade = header_values(&req, hyper::header::UPGRADE);
    if !upgrade.iter().any(|u| u.eq_ignore_ascii_case("SPDY/3.1")) {
        return plain(
            StatusCode::BAD_REQUEST,
            "this endpoint takes SPDY/3.1 or WebSocket upgrades only",
        );
    }
    let offered = header_values(&req, "x-stream-protocol-version");
    if offered.is_empty() {
        return plain(StatusCode::BAD_REQUEST, "X-Stream-Protocol-Version is required");
    }
    let ours = request.protocols(Transport::Spdy);
    let Some(protocol) = negotiate(offered.iter().map(String::as_str), ours) else {
        return no_common_protocol(ours);
    };
    let upgraded = hyper::upgrade::on(req);
    tokio::spawn(async move {
        match upgraded.await {
            Ok(io) => {
                let (session, incoming) = podvisor_spdy::Session::server(TokioIo::new(io));
                match request {
                    StreamRequest::PortForward { sandbox_id } => {
                        portforward::serve(session, incoming, sandbox_id, manager).await
                    }
                    request => {
                        remotecommand::spdy::serve(session, incoming, protocol, request, manager)
                            .await
                    }
                }
            }
            Err(e) => debug!(error = %e, "the streaming upgrade failed"),
        }
    });
    let mut response = switching_protocols("SPDY/3.1");
    response.headers_mut().insert("x-stream-protocol-version", HeaderValue::from_static(protocol));
    response
}

fn upgrade_websocket(
    req: Request<Incoming>,
    request: StreamRequest,
    manager: Arc<SandboxManager>,
) -> Response<Full<Bytes>> {
    let accept = match websocket::accept_key(req.headers()) {
        Ok(accept) => accept,
        Err(e) => return plain(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    let offered = header_values(&req, hyper::header::SEC_WEBSOCKET_PROTOCOL);
    let ours = request.protocols(Transport::WebSocket);
    let Some(protocol) = negotiate(offered.iter().map(String::as_str), ours) else {
        return no_common_protocol(ours);
    };
    let session = match request {
        StreamRequest::PortForward { sandbox_id }
            if protocol == portforward::channels::PROTOCOL =>
        {
            match portforward::channels::ports_from_query(req.uri().query()) {
                Ok(ports) => WebSocketSession::PortForwardChannels { sandbox_id, ports },
                Err(e) => return plain(StatusCode::BAD_REQUEST, &e.to_string()),
            }
        }
        StreamRequest::PortForward { sandbox_id } => {
            WebSocketSession::PortForwardSpdy { sandbox_id }
        }
        request => WebSocketSession::RemoteCommand { protocol, request },
    };
    let upgraded = hyper::upgrade::on(req);
    tokio::spawn(async move {
        match upgraded.await {
            Ok(io) => {
                let ws = WebSocketStream::from_raw_socket(
                    TokioIo::new(io),
                    Role::Server,
                    Some(websocket::config()),
                )
                .await;
                session.serve(ws, manager).await
            }
            Err(e) => debug!(error = %e, "the streaming upgrade failed"),
        }
    });
    let mut response = switching_protocols("websocket");
    let headers = response.headers_mut();
    headers.insert(hyper::header::SEC_WEBSOCKET_ACCEPT, accept);
    headers.insert(hyper::header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(protocol));
    response
}

/// What a WebSocket upgrade serves, as the request and the protocol decide.
enum WebSocketSession {
    RemoteCommand {
        protocol: &'static str,
        request: StreamRequest,
    },
    /// `SPDY/3.1+portforward.k8s.io`: the SPDY session on the messages' bytes.
    PortForwardSpdy {
        sandbox_id: String,
    },
    /// `v4.channel.k8s.io` with the ports in the query.
    PortForwardChannels {
        sandbox_id: String,
        ports: Vec<u16>,
    },
}

impl WebSocketSession {
    async fn serve<S>(self, ws: WebSocketStream<S>, manager: Arc<SandboxManager>)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        match self {
            Self::RemoteCommand { protocol, request } => {
                remotecommand::websocket::serve(ws, protocol, request, manager).await
            }
            Self::PortForwardSpdy { sandbox_id } => {
                let (session, incoming) =
                    podvisor_spdy::Session::server(websocket::WebSocketIo::new(ws));
                portforward::serve(session, incoming, sandbox_id, manager).await
            }
            Self::PortForwardChannels { sandbox_id, ports } => {
                portforward::channels::serve(ws, ports, sandbox_id, manager).await
            }
        }
    }
}

/// A 101 to `upgrade`.
fn switching_protocols(upgrade: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(hyper::header::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(hyper::header::UPGRADE, HeaderValue::from_static(upgrade));
    response
}

/// The first protocol in the client's list (several headers, or comma-separated) that is one
/// of `ours`: the client's order decides.
fn negotiate<'a>(
    offered: impl IntoIterator<Item = &'a str>,
    ours: &[&'static str],
) -> Option<&'static str> {
    offered
        .into_iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .find_map(|p| ours.iter().find(|ours| **ours == p).copied())
}

/// Every value of a header, as text.
fn header_values(req: &Request<Incoming>, name: impl hyper::header::AsHeaderName) -> Vec<String> {
    req.headers().get_all(name).iter().filter_map(|v| v.to_str().ok().map(String::from)).collect()
}

fn plain(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(format!("{text}\n"))));
    *response.status_mut() = status;
    response
}

/// `http://host:port`, with an IPv6 host in brackets; an unspecified address (0.0.0.0) is
/// handed out as loopback, which is where kubelet connects from.
fn base_url(local: SocketAddr) -> String {
    let ip = match local.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => std::net::Ipv4Addr::LOCALHOST.into(),
        ip if ip.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    format!("http://{}", SocketAddr::new(ip, local.port()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clients_order_decides_among_the_protocols_we_speak() {
        let exec = &remotecommand::spdy::PROTOCOLS;
        assert_eq!(
            negotiate(["v5.channel.k8s.io", "v4.channel.k8s.io"], exec),
            Some("v5.channel.k8s.io")
        );
        assert_eq!(
            negotiate(["v9.channel.k8s.io, v3.channel.k8s.io"], exec),
            Some("v3.channel.k8s.io")
        );
        assert_eq!(negotiate(["channel.k8s.io"], exec), Some("channel.k8s.io"));
        assert_eq!(negotiate(["portforward.k8s.io"], exec), None);
        assert_eq!(negotiate([], exec), None);
        let forward = &portforward::PROTOCOLS;
        assert_eq!(negotiate(["portforward.k8s.io"], forward), Some("portforward.k8s.io"));
        assert_eq!(negotiate(["v4.channel.k8s.io"], forward), None);
        let ws_exec = &remotecommand::websocket::PROTOCOLS;
        assert_eq!(negotiate(["v5.channel.k8s.io"], ws_exec), Some("v5.channel.k8s.io"));
        assert_eq!(
            negotiate(["base64.channel.k8s.io, v4.base64.channel.k8s.io"], ws_exec),
            Some("v4.base64.channel.k8s.io")
        );
        let ws_forward = &portforward::WEBSOCKET_PROTOCOLS;
        assert_eq!(
            negotiate(["SPDY/3.1+portforward.k8s.io"], ws_forward),
            Some("SPDY/3.1+portforward.k8s.io")
        );
    }

    #[test]
    fn urls_are_absolute_and_loopback_for_an_unspecified_address() {
        assert_eq!(base_url("127.0.0.1:8080".parse().unwrap()), "http://127.0.0.1:8080");
        assert_eq!(base_url("0.0.0.0:9".parse().unwrap()), "http://127.0.0.1:9");
        assert_eq!(base_url("[::1]:9".parse().unwrap()), "http://[::1]:9");
    }
}
