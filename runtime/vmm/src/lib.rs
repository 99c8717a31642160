//! Built-in VMM (placeholder).
pub mod devices;
