//! Statistics of containers and pods from the guest's cgroups, with CPU usage rates:
//! `usage_nano_cores` needs two readings, so the last sample of every pod and container is
//! kept and each new one is compared with it (as cAdvisor and CRI-O do).

use crate::resource::network::InterfaceCounters;
use std::collections::HashMap;
use std::sync::Mutex;

use super::*;
use crate::agent::SandboxStats;

/// The last (timestamp, cumulative CPU nanoseconds) of each pod and container.
#[derive(Default)]
pub struct CpuSamples {
    last: Mutex<HashMap<String, (i64, u64)>>,
}

impl CpuSamples {
    /// Records a sample for `key`; returns the usage rate since the previous one, in
    /// nanoseconds of CPU per second (nano cores), when there is an earlier sample.
    pub fn rate(&self, key: &str, at: i64, usage: u64) -> Option<u64> {
        let mut last = lock(&self.last);
        let previous = last.get(key).copied();
        if previous.is_some_and(|(t0, _)| at <= t0) {
            // Not newer (two calls in the same instant): keep the older sample.
            return None;
        }
        last.insert(key.to_string(), (at, usage));
        let (t0, u0) = previous?;
        let elapsed = u128::try_from(at - t0).ok()?;
        let used = u128::from(usage.checked_sub(u0)?);
        u64::try_from(used * 1_000_000_000 / elapsed).ok()
    }

    pub fn forget(&self, key: &str) {
        lock(&self.last).remove(key);
    }
}

/// The sample key of a pod (containers use their ids).
pub fn pod_key(sandbox_id: &str) -> String {
    format!("pod/{sandbox_id}")
}

/// A container's figures and its CPU rate.
#[derive(Debug, Clone)]
pub struct ContainerUsage {
    pub stats: ContainerStats,
    pub nano_cores: Option<u64>,
}

/// A pod's figures, its CPU rate, and those of its running containers.
#[derive(Debug, Clone)]
pub struct PodUsage {
    pub sandbox: SandboxRecord,
    pub stats: SandboxStats,
    pub nano_cores: Option<u64>,
    pub containers: Vec<(ContainerRecord, ContainerUsage)>,
    /// The pod interface's traffic, when the pod has one.
    pub network: Option<InterfaceCounters>,
}

impl SandboxManager {
    /// Container statistics from the guest's cgroups.
    pub async fn container_stats(&self, id: &str) -> Result<ContainerUsage> {
        let rec = self.container(id)?;
        let stats = self.agent(&rec.sandbox_id)?.container_stats(&rec.id).await?;
        let nano_cores =
            self.cpu_samples.rate(&rec.id, stats.timestamp_unix_nanos, stats.cpu_usage_nanos);
        Ok(ContainerUsage { stats, nano_cores })
    }

    /// Pod statistics: the pod's cgroup in the guest, and each running container's.
    pub async fn pod_stats(&self, id: &str) -> Result<PodUsage> {
        let sandbox = self.sandbox(id)?;
        if sandbox.state != SandboxState::Ready {
            return Err(SandboxError::SandboxNotReady(sandbox.id));
        }
        let stats = self.agent(&sandbox.id)?.sandbox_stats().await?;
        let nano_cores = self.cpu_samples.rate(
            &pod_key(&sandbox.id),
            stats.timestamp_unix_nanos,
            stats.cpu_usage_nanos,
        );
        let running: Vec<ContainerRecord> = self
            .containers_of(&sandbox.id)
            .into_iter()
            .filter(|c| c.state == ContainerState::Running)
            .collect();
        let usages =
            futures::future::join_all(running.iter().map(|c| self.container_stats(&c.id))).await;
        let containers = running
            .into_iter()
            .zip(usages)
            .filter_map(|(c, usage)| usage.ok().map(|u| (c, u)))
            .collect();
        let network = match &sandbox.network {
            Some(n) => match self.networks.counters(n).await {
                Ok(counters) => Some(counters),
                Err(e) => {
                    tracing::debug!(sandbox = %sandbox.id, error = %e, "no network figures");
                    None
                }
            },
            None => None,
        };
        Ok(PodUsage { sandbox, stats, nano_cores, containers, network })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_rates_come_from_successive_samples() {
        let samples = CpuSamples::default();
        assert_eq!(samples.rate("c", 1_000_000_000, 0), None);
        // Half a core over two seconds.
        assert_eq!(samples.rate("c", 3_000_000_000, 1_000_000_000), Some(500_000_000));
        // Not newer: no rate, the sample stays.
        assert_eq!(samples.rate("c", 3_000_000_000, 2_000_000_000), None);
        // A counter that went back (a restarted container) gives no rate, then a fresh one.
        assert_eq!(samples.rate("c", 4_000_000_000, 10), None);
        assert_eq!(samples.rate("c", 5_000_000_000, 1_000_000_010), Some(1_000_000_000));
        samples.forget("c");
        assert_eq!(samples.rate("c", 6_000_000_000, 5), None);
    }
}
