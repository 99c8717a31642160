//! Counters of the in-process virtio-fs device, read by the core for its metrics.

/// Request counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VirtioFsMetrics {
    /// Requests forwarded to the FUSE server.
    pub requests: u64,
    /// Requests answered with a reply from the server.
    pub replies: u64,
    /// Requests the device answered itself with an error (oversized, no server, bad reply).
    pub error_replies: u64,
    /// Chains returned unprocessed (malformed, no room for even an error reply).
    pub malformed_chains: u64,
    /// Times the connection to the server broke (every later request gets EIO).
    pub server_failures: u64,
    pub request_bytes: u64,
    pub reply_bytes: u64,
}
