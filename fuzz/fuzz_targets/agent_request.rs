//! A request body as the host sends it to the guest agent (gRPC length-prefixed messages),
//! through tonic's decoding and every check the agent makes before acting: never a panic, and
//! every refusal a non-OK status.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| podvisor_agent::fuzzing::request(data));
