//! End-to-end test support shared by Podvisor's tests: a real OCI registry with images the
//! tests build themselves ([`registry`], [`images`]).

pub mod daemon;
pub mod images;
pub mod registry;
