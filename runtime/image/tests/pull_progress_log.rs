//! The pull progress lines, in a process of their own: `tracing` caches a callsite's interest
//! when it first fires, so with other tests pulling on other threads a captured subscriber
//! misses lines at random.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use podvisor_e2e::slow_registry::{LayerDelivery, SlowRegistry};
use podvisor_image::{ImageStore, ImageStoreConfig};

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
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt().with_ansi(false).with_writer(move || writer.clone()).init();
    // 6 pauses of 300 ms: 1.8 s in all, longer than the timeout, but never silent for 1 s.
    let registry = SlowRegistry::start(LayerDelivery::Trickle {
        pieces: 6,
        pause: Duration::from_millis(300),
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = ImageStoreConfig {
        pull_progress_timeout: Some(Duration::from_secs(1)),
        progress_interval: Duration::from_millis(100),
        ..ImageStoreConfig::default()
    };
    let store = ImageStore::open(dir.path(), config).unwrap();
    let record = store.pull(&registry.reference(), None).await.unwrap();
    assert!(store.rootfs_dir(&record.id).unwrap().join("data.bin").is_file());
    let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let progress: Vec<&str> = log.lines().filter(|l| l.contains("pulling image")).collect();
    assert!(progress.len() >= 5, "{log}");
    assert!(progress.iter().all(|l| l.contains(&format!("total={}", record.size))), "{log}");
    let pulled = log.lines().find(|l| l.contains("image pulled")).expect("final line");
    assert!(pulled.contains("bytes_per_second="), "{pulled}");
    assert!(!log.contains('\u{1b}'), "no terminal escapes: {log}");
}
