//! e2e harness (placeholder).
