//! Built-in VMM (placeholder).
