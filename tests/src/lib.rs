//! End-to-end test support shared by Podvisor's tests: a real OCI registry with images the
//! tests build themselves ([`registry`], [`images`]), optionally behind token auth
//! ([`token_server`]), and a remotecommand client for the streaming URLs ([`streaming`]), and a private CNI network
//! ([`cni`]).

pub mod cni;
pub mod daemon;
pub mod images;
pub mod registry;
pub mod streaming;
pub mod token_server;
