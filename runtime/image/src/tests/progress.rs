//! Pull progress and the stall timeout, against `podvisor_e2e::slow_registry` (the progress
//! log itself is checked in tests/pull_progress_log.rs, a process of its own).

use std::time::{Duration, Instant};

use podvisor_e2e::slow_registry::{LayerDelivery, SlowRegistry};

use super::tmp_is_empty;
use crate::{Error, ImageStore, ImageStoreConfig};

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
    let registry = SlowRegistry::start(LayerDelivery::StallHalfway).unwrap();
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
