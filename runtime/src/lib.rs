//! The Podvisor daemon's modules (CRI server, sandbox layer, agent boundary, hypervisor
//! backends); `main.rs` is the `podvisor` binary's entry. A library so fuzz targets can reach
//! the CRI layer.

pub mod agent;
pub mod check;
pub mod config;
pub mod cri;
pub mod hypervisor;
pub mod images;
pub mod metrics;
pub mod procwait;
pub mod resource;
pub mod sandbox;
pub mod store;
pub mod streaming;
