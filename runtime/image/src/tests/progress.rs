//! Pull progress and the stall timeout, against a hand-written registry that controls how its
//! bytes arrive (docker-registry cannot be made to stall).

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use oci_client::manifest::OCI_IMAGE_MEDIA_TYPE;
use podvisor_e2e::images::LayerBuilder;
use serde_json::json;

use super::tmp_is_empty;
use crate::{sha256_digest, Error, ImageStore, ImageStoreConfig};

/// How the registry sends the layer's body.
#[derive(Clone, Copy)]
enum LayerDelivery {
    /// Headers and half the body, then silence with the connection open.
    StallHalfway,
    /// The body in `pieces` pieces with `pause` between them.
    Trickle { pieces: usize, pause: Duration },
}

/// One image (`127.0.0.1:<port>/slow:1`) served over plain HTTP/1.1 with keep-alive.
struct SlowRegistry {
    port: u16,
    layer_digest: String,
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
    fn start(delivery: LayerDelivery) -> Self {
        // Incompressible-ish, so the body is really 512 KiB on the wire.
        let data: Vec<u8> =
            (0..512 * 1024u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
        let layer = LayerBuilder::new().file("data.bin", &data, 0o644).unwrap().finish().unwrap();
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
            "mediaType": OCI_IMAGE_MEDIA_TYPE,
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
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let content = content.clone();
                std::thread::spawn(move || serve(stream, &content));
            }
        });
        Self { port, layer_digest }
    }

    fn reference(&self) -> String {
        format!("127.0.0.1:{}/slow:1", self.port)
    }
}

/// Answers requests on one connection until the client closes it or the layer stalls.
fn serve(stream: TcpStream, content: &Content) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
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
            ("200 OK", OCI_IMAGE_MEDIA_TYPE, &content.manifest)
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

fn store_with_timeout(dir: &std::path::Path, timeout: Duration) -> ImageStore {
    ImageStore::open(
        dir,
        ImageStoreConfig {
            pull_progress_timeout: Some(timeout),
            progress_interval: Duration::from_millis(100),
            ..ImageStoreConfig::default()
        },
    )
    .unwrap()
}

#[tokio::test]
async fn stalled_blob_download_is_aborted_and_its_partial_file_removed() {
    let registry = SlowRegistry::start(LayerDelivery::StallHalfway);
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_timeout(dir.path(), Duration::from_secs(1));
    let started = Instant::now();
    let err = store.pull(&registry.reference(), None).await.unwrap_err();
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
    match &err {
        Error::PullStalled { what, seconds, host, .. } => {
            assert!(what.contains(&registry.layer_digest), "{err}");
            assert_eq!(*seconds, 1);
            assert_eq!(host, &format!("127.0.0.1:{}", registry.port));
        }
        other => panic!("expected a stalled pull, got {other}"),
    }
    assert!(err.to_string().contains("pull_progress_timeout_seconds"), "{err}");
    // Half the layer did arrive: it is the body that stalled, and its partial file is gone.
    assert!(store.bytes_downloaded() > 100_000, "{}", store.bytes_downloaded());
    assert!(!store.blob_path(&registry.layer_digest).unwrap().exists());
    assert!(tmp_is_empty(&store));
    assert!(store.list().is_empty());
}

/// A `tracing` writer into a shared buffer.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn slow_pull_logs_progress_and_pauses_shorter_than_the_timeout_do_not_abort_it() {
    // 6 pauses of 300 ms: 1.8 s in all, longer than the timeout, but never silent for 1 s.
    let registry = SlowRegistry::start(LayerDelivery::Trickle {
        pieces: 6,
        pause: Duration::from_millis(300),
    });
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_timeout(dir.path(), Duration::from_secs(1));
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber =
        tracing_subscriber::fmt().with_ansi(false).with_writer(move || writer.clone()).finish();
    let record = {
        let _logging = tracing::subscriber::set_default(subscriber);
        store.pull(&registry.reference(), None).await.unwrap()
    };
    assert!(store.rootfs_dir(&record.id).unwrap().join("data.bin").is_file());
    let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let progress: Vec<&str> = log.lines().filter(|l| l.contains("pulling image")).collect();
    assert!(progress.len() >= 5, "{log}");
    assert!(progress.iter().all(|l| l.contains(&format!("total={}", record.size))), "{log}");
    let pulled = log.lines().find(|l| l.contains("image pulled")).expect("final line");
    assert!(pulled.contains("bytes_per_second="), "{pulled}");
}
