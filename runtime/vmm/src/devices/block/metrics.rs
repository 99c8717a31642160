//! Counters of the block device, read by the core for its metrics.

/// Request counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BlockMetrics {
    pub read_requests: u64,
    pub write_requests: u64,
    pub flush_requests: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub io_errors: u64,
    pub unsupported: u64,
    pub malformed_chains: u64,
}
