//! Guest vsock packets through the built-in VMM's muxer.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| podvisor_vmm::fuzzing::vsock_packets(data));
