//! CRI requests (RunPodSandbox, CreateContainer, UpdateContainerResources) as a CRI client
//! sends them, decoded with prost, through the CRI layer's validation and translation and the
//! OCI spec built from them: never a panic, and a log path never leaves its directory.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| podvisor::cri::fuzzing::request(data));
