//! The QEMU backend (placeholder: implemented in its own change).
