//! Image references as CRI clients send them (PullImage, CreateContainer).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = podvisor_image::parse_reference(text);
    }
});
