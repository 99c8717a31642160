//! ListMetricDescriptors and ListPodSandboxMetrics: a pod's and its containers' figures (from
//! the guest's cgroups, [`crate::sandbox::stats`]) under the names cAdvisor gives them, which
//! kubelet serves on `/metrics/cadvisor` when it takes them from the runtime. Label keys are
//! CRI-O's (cAdvisor's `id`, `image`, `namespace`, `pod`, `container`, plus a metric's own);
//! the pod-level series have an empty `container`, as cAdvisor's pod cgroups do.
//!
//! CRI metric values are integers, so CPU time is in whole seconds (as CRI-O reports it).

use k8s_cri::v1 as cri;

use crate::sandbox::stats::{ContainerUsage, PodUsage};
use crate::sandbox::{ContainerRecord, SandboxRecord};

/// The keys every metric starts with, in this order.
const BASE_LABELS: [&str; 5] = ["id", "image", "namespace", "pod", "container"];

const NANOS_PER_SECOND: u64 = 1_000_000_000;

/// A metric kubelet may ask for: its name, help and extra label keys, as cAdvisor has them.
#[derive(Debug)]
struct Descriptor {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
    kind: cri::MetricType,
}

const CPU_USAGE: Descriptor = Descriptor {
    name: "container_cpu_usage_seconds_total",
    help: "Cumulative cpu time consumed in seconds.",
    labels: &["cpu"],
    kind: cri::MetricType::Counter,
};
const MEMORY_WORKING_SET: Descriptor = Descriptor {
    name: "container_memory_working_set_bytes",
    help: "Current working set in bytes.",
    labels: &[],
    kind: cri::MetricType::Gauge,
};
const MEMORY_USAGE: Descriptor = Descriptor {
    name: "container_memory_usage_bytes",
    help: "Current memory usage in bytes, including all memory regardless of when it was \
           accessed",
    labels: &[],
    kind: cri::MetricType::Gauge,
};
const MEMORY_RSS: Descriptor = Descriptor {
    name: "container_memory_rss",
    help: "Size of RSS in bytes.",
    labels: &[],
    kind: cri::MetricType::Gauge,
};
const MEMORY_FAILURES: Descriptor = Descriptor {
    name: "container_memory_failures_total",
    help: "Cumulative count of memory allocation failures.",
    labels: &["failure_type", "scope"],
    kind: cri::MetricType::Counter,
};
const SPEC_MEMORY_LIMIT: Descriptor = Descriptor {
    name: "container_spec_memory_limit_bytes",
    help: "Memory limit for the container.",
    labels: &[],
    kind: cri::MetricType::Gauge,
};
const THREADS: Descriptor = Descriptor {
    name: "container_threads",
    help: "Number of threads running inside the container",
    labels: &[],
    kind: cri::MetricType::Gauge,
};
const FS_USAGE: Descriptor = Descriptor {
    name: "container_fs_usage_bytes",
    help: "Number of bytes that are consumed by the container on this filesystem.",
    labels: &[],
    kind: cri::MetricType::Gauge,
};
const START_TIME: Descriptor = Descriptor {
    name: "container_start_time_seconds",
    help: "Start time of the container since unix epoch in seconds.",
    labels: &[],
    kind: cri::MetricType::Gauge,
};
const LAST_SEEN: Descriptor = Descriptor {
    name: "container_last_seen",
    help: "Last time a container was seen by the exporter",
    labels: &[],
    kind: cri::MetricType::Gauge,
};

const NETWORK_RX_BYTES: Descriptor = Descriptor {
    name: "container_network_receive_bytes_total",
    help: "Cumulative count of bytes received",
    labels: &["interface"],
    kind: cri::MetricType::Counter,
};
const NETWORK_RX_ERRORS: Descriptor = Descriptor {
    name: "container_network_receive_errors_total",
    help: "Cumulative count of errors encountered while receiving",
    labels: &["interface"],
    kind: cri::MetricType::Counter,
};
const NETWORK_TX_BYTES: Descriptor = Descriptor {
    name: "container_network_transmit_bytes_total",
    help: "Cumulative count of bytes transmitted",
    labels: &["interface"],
    kind: cri::MetricType::Counter,
};
const NETWORK_TX_ERRORS: Descriptor = Descriptor {
    name: "container_network_transmit_errors_total",
    help: "Cumulative count of errors encountered while transmitting",
    labels: &["interface"],
    kind: cri::MetricType::Counter,
};

/// Every metric ListPodSandboxMetrics may answer (network ones at pod level, as cAdvisor's
/// pause-container series).
const DESCRIPTORS: [&Descriptor; 14] = [
    &CPU_USAGE,
    &MEMORY_WORKING_SET,
    &MEMORY_USAGE,
    &MEMORY_RSS,
    &MEMORY_FAILURES,
    &SPEC_MEMORY_LIMIT,
    &THREADS,
    &FS_USAGE,
    &START_TIME,
    &LAST_SEEN,
    &NETWORK_RX_BYTES,
    &NETWORK_RX_ERRORS,
    &NETWORK_TX_BYTES,
    &NETWORK_TX_ERRORS,
];

/// ListMetricDescriptors' answer.
pub fn descriptors() -> Vec<cri::MetricDescriptor> {
    DESCRIPTORS
        .iter()
        .map(|d| cri::MetricDescriptor {
            name: d.name.into(),
            help: d.help.into(),
            label_keys: BASE_LABELS.iter().chain(d.labels).map(|k| k.to_string()).collect(),
        })
        .collect()
}

/// One value of a metric, with the values of its own labels (after the base ones).
struct Sample {
    descriptor: &'static Descriptor,
    labels: Vec<&'static str>,
    value: u64,
}

fn sample(descriptor: &'static Descriptor, value: u64) -> Sample {
    Sample { descriptor, labels: Vec::new(), value }
}

/// The pod's metrics and its running containers', gathered at `now` (host nanoseconds).
pub fn pod_sandbox_metrics(usage: &PodUsage, now: i64) -> cri::PodSandboxMetrics {
    let pod = &usage.sandbox;
    let s = &usage.stats;
    let mut samples = vec![
        Sample { descriptor: &CPU_USAGE, labels: vec!["total"], value: seconds(s.cpu_usage_nanos) },
        sample(&MEMORY_WORKING_SET, s.memory_working_set_bytes),
        sample(&MEMORY_USAGE, s.memory_usage_bytes),
        sample(&THREADS, s.pids),
        sample(&START_TIME, unix_seconds(pod.created_at)),
        sample(&LAST_SEEN, unix_seconds(now)),
    ];
    // The pod's limit is its VM.
    if s.memory_total_bytes > 0 {
        samples.push(sample(&SPEC_MEMORY_LIMIT, s.memory_total_bytes));
    }
    if let Some(n) = &usage.network {
        // The only interface: CNI names it eth0, and `labels` borrows 'static strings.
        let iface = if n.name == crate::resource::network::POD_IFNAME {
            crate::resource::network::POD_IFNAME
        } else {
            "other"
        };
        for (descriptor, value) in [
            (&NETWORK_RX_BYTES, n.rx_bytes),
            (&NETWORK_RX_ERRORS, n.rx_errors),
            (&NETWORK_TX_BYTES, n.tx_bytes),
            (&NETWORK_TX_ERRORS, n.tx_errors),
        ] {
            samples.push(Sample { descriptor, labels: vec![iface], value });
        }
    }
    let base = [pod.id.as_str(), "", &pod.metadata.namespace, &pod.metadata.name, ""];
    cri::PodSandboxMetrics {
        pod_sandbox_id: pod.id.clone(),
        metrics: metrics(&base, samples, now),
        container_metrics: usage
            .containers
            .iter()
            .map(|(c, u)| container_metrics(pod, c, u, now))
            .collect(),
    }
}

fn container_metrics(
    pod: &SandboxRecord,
    c: &ContainerRecord,
    u: &ContainerUsage,
    now: i64,
) -> cri::ContainerMetrics {
    let s = &u.stats;
    let mut samples = vec![
        Sample { descriptor: &CPU_USAGE, labels: vec!["total"], value: seconds(s.cpu_usage_nanos) },
        sample(&MEMORY_WORKING_SET, s.memory_working_set_bytes),
        sample(&MEMORY_USAGE, s.memory_usage_bytes),
        sample(&MEMORY_RSS, s.memory_rss_bytes),
        Sample {
            descriptor: &MEMORY_FAILURES,
            labels: vec!["pgfault", "container"],
            value: s.page_faults,
        },
        Sample {
            descriptor: &MEMORY_FAILURES,
            labels: vec!["pgmajfault", "container"],
            value: s.major_page_faults,
        },
        sample(&THREADS, s.pids),
        sample(&FS_USAGE, s.writable_layer_bytes),
        sample(&START_TIME, unix_seconds(c.started_at)),
        sample(&LAST_SEEN, unix_seconds(now)),
    ];
    let limit = c.resources.as_ref().map(|r| r.memory_limit_bytes).unwrap_or(0);
    if let Ok(limit) = u64::try_from(limit) {
        if limit > 0 {
            samples.push(sample(&SPEC_MEMORY_LIMIT, limit));
        }
    }
    let base =
        [c.id.as_str(), &c.image, &pod.metadata.namespace, &pod.metadata.name, &c.metadata.name];
    cri::ContainerMetrics { container_id: c.id.clone(), metrics: metrics(&base, samples, now) }
}

fn metrics(base: &[&str; 5], samples: Vec<Sample>, now: i64) -> Vec<cri::Metric> {
    samples
        .into_iter()
        .map(|s| cri::Metric {
            name: s.descriptor.name.into(),
            // kubelet stamps the series with it (0 would be 1970).
            timestamp: now,
            metric_type: s.descriptor.kind as i32,
            label_values: base.iter().chain(&s.labels).map(|v| v.to_string()).collect(),
            value: Some(cri::UInt64Value { value: s.value }),
        })
        .collect()
}

fn seconds(nanos: u64) -> u64 {
    nanos / NANOS_PER_SECOND
}

fn unix_seconds(nanos: i64) -> u64 {
    u64::try_from(nanos).map(seconds).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::agent::{ContainerStats, SandboxStats};
    use crate::sandbox::{
        ContainerMetadata, ContainerState, DnsSettings, NamespaceModes, PodMetadata, Resources,
        SandboxState, SCHEMA_VERSION,
    };

    fn pod() -> SandboxRecord {
        SandboxRecord {
            schema_version: SCHEMA_VERSION,
            id: "pod1".into(),
            metadata: PodMetadata {
                name: "web".into(),
                uid: "u".into(),
                namespace: "prod".into(),
                attempt: 0,
            },
            labels: HashMap::new(),
            annotations: HashMap::new(),
            log_directory: String::new(),
            hostname: "web".into(),
            runtime_handler: String::new(),
            dns: DnsSettings::default(),
            namespaces: NamespaceModes::default(),
            share_layout: crate::resource::ShareLayout::Split,
            created_at: 1_700_000_000_500_000_000,
            state: SandboxState::Ready,
            vm: None,
            network: None,
            vm_size: None,
            creating: false,
            user_namespace: None,
            start: None,
        }
    }

    fn container(limit: i64) -> ContainerRecord {
        ContainerRecord {
            schema_version: SCHEMA_VERSION,
            id: "ctr1".into(),
            sandbox_id: "pod1".into(),
            metadata: ContainerMetadata { name: "app".into(), attempt: 0 },
            image: "registry/app:1".into(),
            image_id: "sha256:x".into(),
            image_ref: "sha256:x".into(),
            labels: HashMap::new(),
            annotations: HashMap::new(),
            log_path: None,
            log_path_relative: String::new(),
            tty: false,
            stdin: false,
            stdin_once: false,
            mounts: Vec::new(),
            oci_process_json: String::new(),
            created_at: 1_700_000_001_000_000_000,
            started_at: 1_700_000_002_000_000_000,
            finished_at: 0,
            exit_code: 0,
            reason: String::new(),
            message: String::new(),
            pid: 7,
            stop_signal: 0,
            resources: Some(Resources { memory_limit_bytes: limit, ..Default::default() }),
            not_applicable: Vec::new(),
            state: ContainerState::Running,
        }
    }

    fn usage(limit: i64) -> PodUsage {
        PodUsage {
            sandbox: pod(),
            stats: SandboxStats {
                cpu_usage_nanos: 3_900_000_000,
                memory_working_set_bytes: 40 << 20,
                memory_usage_bytes: 50 << 20,
                pids: 4,
                memory_total_bytes: 256 << 20,
                memory_available_bytes: 200 << 20,
                timestamp_unix_nanos: 1,
            },
            nano_cores: Some(5),
            containers: vec![(
                container(limit),
                ContainerUsage {
                    stats: ContainerStats {
                        cpu_usage_nanos: 2_500_000_000,
                        memory_working_set_bytes: 30 << 20,
                        memory_usage_bytes: 35 << 20,
                        memory_rss_bytes: 25 << 20,
                        page_faults: 900,
                        major_page_faults: 3,
                        pids: 2,
                        writable_layer_bytes: 24 << 20,
                        writable_layer_inodes: 5,
                        timestamp_unix_nanos: 1,
                    },
                    nano_cores: None,
                },
            )],
            network: Some(crate::resource::network::InterfaceCounters {
                name: "eth0".into(),
                rx_bytes: 1000,
                rx_errors: 0,
                tx_bytes: 2000,
                tx_errors: 1,
            }),
        }
    }

    const NOW: i64 = 1_700_000_100_250_000_000;

    /// The value of the metric `name` whose own labels (after the base ones) are `labels`.
    fn value(metrics: &[cri::Metric], name: &str, labels: &[&str]) -> Option<u64> {
        metrics
            .iter()
            .find(|m| m.name == name && m.label_values[BASE_LABELS.len()..] == *labels)
            .map(|m| m.value.unwrap().value)
    }

    #[test]
    fn descriptors_carry_cadvisor_names_and_label_keys() {
        let descriptors = descriptors();
        let names: Vec<&str> = descriptors.iter().map(|d| d.name.as_str()).collect();
        for name in [
            "container_cpu_usage_seconds_total",
            "container_memory_working_set_bytes",
            "container_memory_usage_bytes",
            "container_memory_rss",
            "container_spec_memory_limit_bytes",
            "container_threads",
            "container_fs_usage_bytes",
            "container_last_seen",
        ] {
            assert!(names.contains(&name), "{name} missing");
        }
        let cpu = descriptors.iter().find(|d| d.name == "container_cpu_usage_seconds_total");
        assert_eq!(
            cpu.unwrap().label_keys,
            ["id", "image", "namespace", "pod", "container", "cpu"]
        );
        assert!(descriptors.iter().all(|d| !d.help.is_empty()));
        let unique: std::collections::HashSet<_> = names.iter().collect();
        assert_eq!(unique.len(), names.len());
    }

    #[test]
    fn every_metric_has_a_descriptor_and_one_value_per_label_key() {
        let descriptors = descriptors();
        let pod = pod_sandbox_metrics(&usage(64 << 20), NOW);
        let all = pod.metrics.iter().chain(pod.container_metrics.iter().flat_map(|c| &c.metrics));
        for m in all {
            let d = descriptors.iter().find(|d| d.name == m.name).expect(&m.name);
            assert_eq!(m.label_values.len(), d.label_keys.len(), "{}", m.name);
            assert_eq!(m.timestamp, NOW);
        }
    }

    #[test]
    fn pod_figures_become_pod_level_series() {
        let pod = pod_sandbox_metrics(&usage(0), NOW);
        assert_eq!(pod.pod_sandbox_id, "pod1");
        let m = &pod.metrics;
        // Whole seconds: 3.9 s of CPU is 3.
        assert_eq!(value(m, "container_cpu_usage_seconds_total", &["total"]), Some(3));
        assert_eq!(value(m, "container_memory_working_set_bytes", &[]), Some(40 << 20));
        assert_eq!(value(m, "container_memory_usage_bytes", &[]), Some(50 << 20));
        assert_eq!(value(m, "container_spec_memory_limit_bytes", &[]), Some(256 << 20));
        assert_eq!(value(m, "container_threads", &[]), Some(4));
        assert_eq!(value(m, "container_network_receive_bytes_total", &["eth0"]), Some(1000));
        assert_eq!(value(m, "container_network_transmit_errors_total", &["eth0"]), Some(1));
        assert_eq!(value(m, "container_start_time_seconds", &[]), Some(1_700_000_000));
        assert_eq!(value(m, "container_last_seen", &[]), Some(1_700_000_100));
        assert_eq!(m[0].label_values[..5], ["pod1", "", "prod", "web", ""]);
        let cpu = m.iter().find(|m| m.name == "container_cpu_usage_seconds_total").unwrap();
        assert_eq!(cpu.metric_type, cri::MetricType::Counter as i32);
        assert_eq!(m[1].metric_type, cri::MetricType::Gauge as i32);
    }

    #[test]
    fn container_figures_carry_the_containers_names() {
        let pod = pod_sandbox_metrics(&usage(64 << 20), NOW);
        let [c] = pod.container_metrics.as_slice() else { panic!("one container") };
        assert_eq!(c.container_id, "ctr1");
        let m = &c.metrics;
        assert_eq!(m[0].label_values[..5], ["ctr1", "registry/app:1", "prod", "web", "app"]);
        assert_eq!(value(m, "container_cpu_usage_seconds_total", &["total"]), Some(2));
        assert_eq!(value(m, "container_memory_working_set_bytes", &[]), Some(30 << 20));
        assert_eq!(value(m, "container_memory_rss", &[]), Some(25 << 20));
        assert_eq!(
            value(m, "container_memory_failures_total", &["pgfault", "container"]),
            Some(900)
        );
        assert_eq!(
            value(m, "container_memory_failures_total", &["pgmajfault", "container"]),
            Some(3)
        );
        assert_eq!(value(m, "container_fs_usage_bytes", &[]), Some(24 << 20));
        assert_eq!(value(m, "container_spec_memory_limit_bytes", &[]), Some(64 << 20));
        assert_eq!(value(m, "container_start_time_seconds", &[]), Some(1_700_000_002));
        // Without a limit there is no limit series (cAdvisor would say 0, meaning none).
        let unlimited = pod_sandbox_metrics(&usage(0), NOW);
        let m = &unlimited.container_metrics[0].metrics;
        assert_eq!(value(m, "container_spec_memory_limit_bytes", &[]), None);
    }
}
