//! End-to-end test support shared by Podvisor's tests: a real OCI registry with images the
//! tests build themselves ([`registry`], [`images`]), optionally behind token auth
//! ([`token_server`]), and remotecommand and port-forward clients for the streaming URLs, over
//! SPDY ([`streaming`]) and WebSocket ([`streaming_ws`]),
//! a private CNI network ([`cni`]), the nested L1 VM where KVM cannot boot Linux ([`nested`])
//! and the VM-template figures of `make bench` ([`template_bench`]).

pub mod cni;
pub mod daemon;
pub mod images;
pub mod nested;
pub mod registry;
pub mod slow_registry;
pub mod streaming;
pub mod streaming_ws;
pub mod template_bench;
pub mod token_server;
