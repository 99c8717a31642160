//! An image archive (OCI layout or docker archive tar: index.json / manifest.json, manifests,
//! configs, layers) imported into a scratch store: must fail cleanly, never panic.
#![no_main]
use podvisor_image::{ImageStore, ImageStoreConfig};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("tempdir");
    let archive = dir.path().join("image.tar");
    std::fs::write(&archive, data).expect("archive");
    let store =
        ImageStore::open(&dir.path().join("store"), ImageStoreConfig::default()).expect("store");
    let _ = store.import(&archive);
});
