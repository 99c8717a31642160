//! A hand-written registry that controls how its bytes arrive, for pull progress and the stall
//! timeout (docker-registry cannot be made to stall or trickle).

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use serde_json::json;

use crate::images::{sha256_digest, LayerBuilder};

const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

/// How the registry sends the layer's body.
#[derive(Clone, Copy)]
pub enum LayerDelivery {
    /// Headers and half the body, then silence with the connection open.
    StallHalfway,
    /// The body in `pieces` pieces with `pause` between them.
    Trickle { pieces: usize, pause: Duration },
}

/// One image (`127.0.0.1:<port>/slow:1`) served over plain HTTP/1.1 with keep-alive.
pub struct SlowRegistry {
    /// Where it listens on 127.0.0.1.
    pub port: u16,
    /// The digest of the image's only layer.
    pub layer_digest: String,
}

struct Content {
    manifest: Vec<u8>,
    config: Vec<u8>,
    config_digest: String,
    layer: Vec<u8>,
    layer_digest: String,
    delivery: LayerDelivery,
}

impl SlowRegistry {
    /// Serves the image on a free port from a thread per connection.
    pub fn start(delivery: LayerDelivery) -> Result<Self> {
        // Incompressible-ish, so the body is really 512 KiB on the wire.
        let data: Vec<u8> =
            (0..512 * 1024u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
        let layer = LayerBuilder::new().file("data.bin", &data, 0o644)?.finish()?;
        let layer_digest = sha256_digest(&layer);
        let config = json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["sh"]},
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        })
        .to_string()
        .into_bytes();
        let config_digest = sha256_digest(&config);
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": config.len(),
            },
            "layers": [{
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": layer_digest,
                "size": layer.len(),
            }],
        })
        .to_string()
        .into_bytes();
        let content = Arc::new(Content {
            manifest,
            config,
            config_digest,
            layer,
            layer_digest: layer_digest.clone(),
            delivery,
        });
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let content = content.clone();
                std::thread::spawn(move || serve(stream, &content));
            }
        });
        Ok(Self { port, layer_digest })
    }

    /// `127.0.0.1:<port>/slow:1`.
    pub fn reference(&self) -> String {
        format!("127.0.0.1:{}/slow:1", self.port)
    }
}

/// Answers requests on one connection until the client closes it or the layer stalls.
fn serve(stream: TcpStream, content: &Content) {
    let Ok(clone) = stream.try_clone() else { return };
    let mut reader = BufReader::new(clone);
    let mut stream = stream;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap_or(0) == 0 {
                return;
            }
            if header == "\r\n" {
                break;
            }
        }
        let mut words = request_line.split_whitespace();
        let head = words.next() == Some("HEAD");
        let path = words.next().unwrap_or("");
        let (status, media_type, body): (&str, &str, &[u8]) = if path == "/v2/" {
            ("200 OK", "application/json", b"{}")
        } else if path == "/v2/slow/manifests/1" {
            ("200 OK", MANIFEST_MEDIA_TYPE, &content.manifest)
        } else if path.ends_with(&content.config_digest) {
            ("200 OK", "application/octet-stream", &content.config)
        } else if path.ends_with(&content.layer_digest) {
            if !head {
                send_layer(&mut stream, content);
                return;
            }
            ("200 OK", "application/octet-stream", &content.layer)
        } else {
            (
                "404 Not Found",
                "application/json",
                br#"{"errors":[{"code":"NOT_FOUND","message":"no"}]}"#,
            )
        };
        let headers = format!(
            "HTTP/1.1 {status}\r\nContent-Type: {media_type}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        if stream.write_all(headers.as_bytes()).is_err() {
            return;
        }
        if !head && stream.write_all(body).is_err() {
            return;
        }
    }
}

fn send_layer(stream: &mut TcpStream, content: &Content) {
    let headers = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
        content.layer.len()
    );
    if stream.write_all(headers.as_bytes()).is_err() {
        return;
    }
    match content.delivery {
        LayerDelivery::StallHalfway => {
            let _ = stream.write_all(&content.layer[..content.layer.len() / 2]);
            let _ = stream.flush();
            // Keep the connection open and silent: only the client's timeout ends this.
            std::thread::sleep(Duration::from_secs(120));
        }
        LayerDelivery::Trickle { pieces, pause } => {
            for piece in content.layer.chunks(content.layer.len().div_ceil(pieces)) {
                if stream.write_all(piece).is_err() {
                    return;
                }
                let _ = stream.flush();
                std::thread::sleep(pause);
            }
        }
    }
}
