//! Guest-written descriptor chains against the built-in VMM's virtio-vsock device.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| podvisor_vmm::fuzzing::vsock_chains(data));
