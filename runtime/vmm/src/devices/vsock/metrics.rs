//! Counters of the vsock device, read by the core for its metrics.

/// Counters of malformed or rejected guest traffic.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VsockMetrics {
    pub tx_packets: u64,
    pub rx_packets: u64,
    pub malformed_chains: u64,
    pub rejected_packets: u64,
}
