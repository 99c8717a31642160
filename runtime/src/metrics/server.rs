//! The metrics endpoint: `GET /metrics` on the `[metrics]` address, over HTTP/1.1 (hyper), in
//! the text exposition format. It runs on its own tasks and reads only in-memory figures, so a
//! scrape never waits for (or holds up) a CRI call; a slow or silent client holds one of a
//! few connection slots for a bounded time.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{header, Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use super::{Metrics, MetricsError};
use crate::config::MetricsSection;

/// Connections served at once; more are closed at once (a scraper retries on its interval).
const MAX_CONNECTIONS: usize = 16;
/// How long a client may take to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one connection may last, however slowly it reads.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);
/// The text exposition format's content type.
const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Binds the configured address and serves in the background; returns where it listens.
pub async fn start(
    config: &MetricsSection,
    metrics: &'static Metrics,
) -> Result<SocketAddr, MetricsError> {
    let address = match config.address.parse::<std::net::IpAddr>() {
        Ok(ip) => SocketAddr::new(ip, config.port).to_string(),
        Err(_) => format!("{}:{}", config.address, config.port),
    };
    let listen_err = |source| MetricsError::Listen { address: address.clone(), source };
    let listener = TcpListener::bind(&address).await.map_err(listen_err)?;
    let local = listener.local_addr().map_err(listen_err)?;
    info!(url = %format!("http://{local}/metrics"), "metrics endpoint listening");
    tokio::spawn(accept(listener, metrics));
    Ok(local)
}

async fn accept(listener: TcpListener, metrics: &'static Metrics) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of fds and the like: wait, do not spin.
                warn!(error = %e, "accepting a metrics connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!(%peer, "too many metrics connections; closing this one");
            continue;
        };
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |req| async move {
                Ok::<_, Infallible>(answer(&req, metrics))
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(CONNECTION_TIMEOUT, connection).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(%peer, error = %e, "metrics connection ended"),
                Err(_) => debug!(%peer, "metrics connection cut after {CONNECTION_TIMEOUT:?}"),
            }
        });
    }
}

/// Answers one request: the exposition, or an error status for anything else.
fn answer(req: &Request<Incoming>, metrics: &Metrics) -> Response<Full<Bytes>> {
    if req.uri().path() != "/metrics" {
        return plain(StatusCode::NOT_FOUND, "not found: metrics are at /metrics");
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "GET /metrics only");
        response.headers_mut().insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match metrics.render() {
        Ok(text) => {
            let mut response = Response::new(Full::new(Bytes::from(text)));
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(TEXT_FORMAT));
            response
        }
        Err(e) => {
            warn!(error = %e, "rendering the metrics");
            plain(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string())
        }
    }
}

fn plain(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(format!("{text}\n"))));
    *response.status_mut() = status;
    response
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;

    async fn serve() -> SocketAddr {
        let metrics: &'static Metrics = Box::leak(Box::new(Metrics::new().unwrap()));
        metrics.cri_finished("Version", "OK");
        let config = MetricsSection { enabled: true, address: "127.0.0.1".into(), port: 0 };
        start(&config, metrics).await.unwrap()
    }

    /// One request on its own connection; the whole answer.
    async fn request(at: SocketAddr, head: &str) -> String {
        let mut stream = TcpStream::connect(at).await.unwrap();
        stream
            .write_all(format!("{head}\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        answer
    }

    #[tokio::test]
    async fn get_metrics_answers_the_exposition() {
        let at = serve().await;
        let answer = request(at, "GET /metrics HTTP/1.1").await;
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        assert!(answer.contains(TEXT_FORMAT), "{answer}");
        assert!(answer.contains(r#"podvisor_cri_requests_total{code="OK",method="Version"} 1"#));
    }

    #[tokio::test]
    async fn other_paths_and_methods_are_refused() {
        let at = serve().await;
        let answer = request(at, "GET /metricsx HTTP/1.1").await;
        assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
        let answer = request(at, "POST /metrics HTTP/1.1").await;
        assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
        assert!(answer.to_ascii_lowercase().contains("allow: get, head"), "{answer}");
        let answer = request(at, "NONSENSE").await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    }

    #[tokio::test]
    async fn silent_clients_do_not_hold_up_a_scrape() {
        let at = serve().await;
        // More silent connections than there are slots: the extra ones are closed, and a
        // scrape after the slots free up (or on a free one) is answered.
        let mut silent = Vec::new();
        for _ in 0..MAX_CONNECTIONS - 1 {
            silent.push(TcpStream::connect(at).await.unwrap());
        }
        let answer =
            tokio::time::timeout(Duration::from_secs(5), request(at, "GET /metrics HTTP/1.1"))
                .await
                .expect("a scrape beside silent clients is answered");
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        for _ in 0..4 {
            silent.push(TcpStream::connect(at).await.unwrap());
        }
        // Over the limit: closed without an answer.
        let mut extra = TcpStream::connect(at).await.unwrap();
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(5), extra.read(&mut buf))
            .await
            .expect("a connection over the limit is closed")
            .unwrap_or(0);
        assert_eq!(n, 0);
    }
}
