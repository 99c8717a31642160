//! Image store (placeholder).
