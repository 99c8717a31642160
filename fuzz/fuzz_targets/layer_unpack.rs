//! A registry-supplied layer blob (tar, possibly gzip/zstd) unpacked into a scratch root:
//! must fail cleanly or stay inside the root, never panic.
#![no_main]
use podvisor_image::unpack::{unpack_layers, Layer};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("tempdir");
    let blob = dir.path().join("layer");
    std::fs::write(&blob, data).expect("blob");
    let root = dir.path().join("root");
    std::fs::create_dir(&root).expect("root");
    // 256 MiB: a decompression bomb stops there instead of filling the disk.
    let _ = unpack_layers(&[Layer { blob, diff_id: None }], &root, 256 << 20);
});
