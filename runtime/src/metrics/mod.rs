//! The daemon's own metrics for Prometheus, as CRI-O and containerd expose theirs: CRI calls
//! (counted and timed by a tower layer around the CRI server, [`grpc`], so no handler has to),
//! the phases of a pod's start, image pulls, and figures read when scraped (running VMs, bytes
//! pulled). [`server`] serves them on `GET /metrics` in the text exposition format when the
//! config's `[metrics]` enables it.
//!
//! The families live in one process-wide [`Metrics`] ([`global`]) so that a hook in another
//! layer is a line; tests build their own.

pub mod grpc;
pub mod server;

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Errors defining, registering or encoding metrics.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("defining metric {name}: {source}")]
    Define { name: &'static str, source: prometheus::Error },
    #[error("registering metric {name}: {source}")]
    Register { name: &'static str, source: prometheus::Error },
    #[error("encoding the metrics: {0}")]
    Encode(prometheus::Error),
    #[error("listening for metrics scrapes on {address}: {source}")]
    Listen { address: String, source: std::io::Error },
}

/// The phases of a pod's start that `podvisor_pod_start_duration_seconds` tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodStartPhase {
    /// The pod's shares and its CNI network (ADD, the tap), before the VM starts.
    Network,
    /// The VM's processes started (VMM, vsock, virtiofsd).
    VmStart,
    /// From the VM's start until its agent answers.
    AgentReady,
    /// The guest's pod set-up (CreateSandbox, SetupNetwork).
    SandboxSetup,
    /// All of RunPodSandbox.
    PodReady,
    /// From CreateContainer's arrival until StartContainer is done.
    ContainerRunning,
}

impl PodStartPhase {
    pub fn label(self) -> &'static str {
        match self {
            Self::Network => "network",
            Self::VmStart => "vm_start",
            Self::AgentReady => "agent_ready",
            Self::SandboxSetup => "sandbox_setup",
            Self::PodReady => "pod_ready",
            Self::ContainerRunning => "container_running",
        }
    }
}

/// Upper bounds for CRI call latencies: most calls take milliseconds, RunPodSandbox seconds.
const CRI_BUCKETS: &[f64] =
    &[0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];
/// Pod start phases take from milliseconds (network) to many seconds (a boot under TCG).
const POD_START_BUCKETS: &[f64] =
    &[0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0];
const PULL_BUCKETS: &[f64] =
    &[0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0];

/// Reads a family's samples (label values, value) when it is scraped.
type Read = Box<dyn Fn() -> Vec<(Vec<String>, u64)> + Send + Sync>;

/// The daemon's metric families.
pub struct Metrics {
    registry: Registry,
    cri_requests: IntCounterVec,
    cri_duration: HistogramVec,
    pod_start: HistogramVec,
    image_pull_duration: Histogram,
    /// When each container's CreateContainer arrived, until its StartContainer is done (or it
    /// is removed unstarted).
    creating: Mutex<HashMap<String, Instant>>,
}

static GLOBAL: LazyLock<Metrics> = LazyLock::new(|| {
    // The definitions are constants; `definitions_are_valid` checks them.
    Metrics::new().expect("the daemon's metric definitions are valid")
});

/// The process-wide metrics every layer records into.
pub fn global() -> &'static Metrics {
    &GLOBAL
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Metrics {
    pub fn new() -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let cri_requests = define("podvisor_cri_requests_total", |name| {
            IntCounterVec::new(
                Opts::new(name, "CRI calls answered, by method and gRPC code."),
                &["method", "code"],
            )
        })?;
        let cri_duration = define("podvisor_cri_request_duration_seconds", |name| {
            HistogramVec::new(
                HistogramOpts::new(name, "How long CRI calls took to answer, by method.")
                    .buckets(CRI_BUCKETS.to_vec()),
                &["method"],
            )
        })?;
        let pod_start = define("podvisor_pod_start_duration_seconds", |name| {
            HistogramVec::new(
                HistogramOpts::new(
                    name,
                    "How long the phases of a pod's start took: network, vm_start, agent_ready, \
                     sandbox_setup, pod_ready (all of RunPodSandbox), container_running \
                     (CreateContainer to StartContainer done).",
                )
                .buckets(POD_START_BUCKETS.to_vec()),
                &["phase"],
            )
        })?;
        let image_pull_duration = define("podvisor_image_pull_duration_seconds", |name| {
            Histogram::with_opts(
                HistogramOpts::new(name, "How long successful image pulls took, unpack included.")
                    .buckets(PULL_BUCKETS.to_vec()),
            )
        })?;
        let metrics = Self {
            registry,
            cri_requests,
            cri_duration,
            pod_start,
            image_pull_duration,
            creating: Mutex::new(HashMap::new()),
        };
        metrics.register("podvisor_cri_requests_total", metrics.cri_requests.clone())?;
        metrics.register("podvisor_cri_request_duration_seconds", metrics.cri_duration.clone())?;
        metrics.register("podvisor_pod_start_duration_seconds", metrics.pod_start.clone())?;
        metrics.register(
            "podvisor_image_pull_duration_seconds",
            metrics.image_pull_duration.clone(),
        )?;
        Ok(metrics)
    }

    fn register(
        &self,
        name: &'static str,
        collector: impl Collector + 'static,
    ) -> Result<(), MetricsError> {
        self.registry
            .register(Box::new(collector))
            .map_err(|source| MetricsError::Register { name, source })
    }

    /// A CRI call's answer (its headers) is ready.
    pub fn cri_answered(&self, method: &str, took: Duration) {
        self.cri_duration.with_label_values(&[method]).observe(took.as_secs_f64());
    }

    /// A CRI call ended with `code` (a gRPC code's name, as grpc-go spells it).
    pub fn cri_finished(&self, method: &str, code: &str) {
        self.cri_requests.with_label_values(&[method, code]).inc();
    }

    pub fn pod_start_phase(&self, phase: PodStartPhase, took: Duration) {
        self.pod_start.with_label_values(&[phase.label()]).observe(took.as_secs_f64());
    }

    /// Times consecutive phases: each [`PhaseTimer::lap`] records the time since the last.
    pub fn phases(&self) -> PhaseTimer<'_> {
        PhaseTimer { metrics: self, last: Instant::now() }
    }

    /// CreateContainer of `id`, which arrived at `arrived`, succeeded.
    pub fn container_created(&self, id: &str, arrived: Instant) {
        lock(&self.creating).insert(id.to_string(), arrived);
    }

    /// StartContainer of `id` succeeded: its container_running phase ends. A container
    /// created by an earlier daemon has no start to measure.
    pub fn container_started(&self, id: &str) {
        if let Some(arrived) = lock(&self.creating).remove(id) {
            self.pod_start_phase(PodStartPhase::ContainerRunning, arrived.elapsed());
        }
    }

    /// The container is gone, started or not.
    pub fn container_removed(&self, id: &str) {
        lock(&self.creating).remove(id);
    }

    pub fn image_pulled(&self, took: Duration) {
        self.image_pull_duration.observe(took.as_secs_f64());
    }

    /// `podvisor_vms_running{backend}`, read from `read` at every scrape.
    pub fn read_vms_running(
        &self,
        read: impl Fn() -> Vec<(String, u64)> + Send + Sync + 'static,
    ) -> Result<(), MetricsError> {
        let read: Read =
            Box::new(move || read().into_iter().map(|(backend, n)| (vec![backend], n)).collect());
        self.register(VMS_RUNNING, Sampled::new(VMS_RUNNING, vms_running_family, read)?)
    }

    /// `podvisor_image_pull_bytes_total`, read from `read` (a running total) at every scrape.
    pub fn read_image_pull_bytes(
        &self,
        read: impl Fn() -> u64 + Send + Sync + 'static,
    ) -> Result<(), MetricsError> {
        let read: Read = Box::new(move || vec![(Vec::new(), read())]);
        self.register(PULL_BYTES, Sampled::new(PULL_BYTES, pull_bytes_family, read)?)
    }

    /// Every family in the text exposition format.
    pub fn render(&self) -> Result<String, MetricsError> {
        TextEncoder::new().encode_to_string(&self.registry.gather()).map_err(MetricsError::Encode)
    }
}

fn define<T>(
    name: &'static str,
    make: impl FnOnce(&'static str) -> prometheus::Result<T>,
) -> Result<T, MetricsError> {
    make(name).map_err(|source| MetricsError::Define { name, source })
}

/// Times the consecutive phases of one pod start.
pub struct PhaseTimer<'a> {
    metrics: &'a Metrics,
    last: Instant,
}

impl PhaseTimer<'_> {
    /// `phase` ended now: records the time since the previous lap (or the start).
    pub fn lap(&mut self, phase: PodStartPhase) {
        let now = Instant::now();
        self.metrics.pod_start_phase(phase, now - self.last);
        self.last = now;
    }
}

const VMS_RUNNING: &str = "podvisor_vms_running";
const PULL_BYTES: &str = "podvisor_image_pull_bytes_total";

fn vms_running_family() -> prometheus::Result<Family> {
    let opts = Opts::new(VMS_RUNNING, "Pod VMs running, by hypervisor backend.");
    IntGaugeVec::new(opts, &["backend"]).map(Family::Gauge)
}

fn pull_bytes_family() -> prometheus::Result<Family> {
    let opts = Opts::new(PULL_BYTES, "Bytes of image blobs downloaded from registries.");
    IntCounterVec::new(opts, &[]).map(Family::Counter)
}

/// A family read at scrape time.
enum Family {
    Gauge(IntGaugeVec),
    Counter(IntCounterVec),
}

impl Family {
    fn set(&self, labels: &[String], value: u64) {
        let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
        match self {
            Self::Gauge(g) => {
                if let Ok(g) = g.get_metric_with_label_values(&labels) {
                    g.set(i64::try_from(value).unwrap_or(i64::MAX));
                }
            }
            Self::Counter(c) => {
                if let Ok(c) = c.get_metric_with_label_values(&labels) {
                    c.inc_by(value);
                }
            }
        }
    }

    fn desc(&self) -> Vec<&Desc> {
        match self {
            Self::Gauge(g) => g.desc(),
            Self::Counter(c) => c.desc(),
        }
    }

    fn collect(&self) -> Vec<MetricFamily> {
        match self {
            Self::Gauge(g) => g.collect(),
            Self::Counter(c) => c.collect(),
        }
    }
}

/// A family whose values live elsewhere (the sandbox records, the image store's counter) and
/// are read when scraped, so they cannot drift from their source.
struct Sampled {
    /// Describes the family to the registry; it never holds values.
    template: Family,
    make: fn() -> prometheus::Result<Family>,
    read: Read,
}

impl Sampled {
    fn new(
        name: &'static str,
        make: fn() -> prometheus::Result<Family>,
        read: Read,
    ) -> Result<Self, MetricsError> {
        let template = make().map_err(|source| MetricsError::Define { name, source })?;
        Ok(Self { template, make, read })
    }
}

impl Collector for Sampled {
    fn desc(&self) -> Vec<&Desc> {
        self.template.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        // A fresh family per scrape (a clone would share values): concurrent scrapes never
        // see each other's, and what the source no longer lists disappears.
        let Ok(fresh) = (self.make)() else { return Vec::new() };
        for (labels, value) in (self.read)() {
            fresh.set(&labels, value);
        }
        fresh.collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn definitions_are_valid() {
        Metrics::new().unwrap();
        // The global one is the same definitions.
        global().render().unwrap();
    }

    /// The value of the sample `series` (name and labels as exposed) in `text`.
    pub(crate) fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn the_exposition_names_every_family_with_its_samples() {
        let m = Metrics::new().unwrap();
        m.cri_answered("RunPodSandbox", Duration::from_millis(1500));
        m.cri_finished("RunPodSandbox", "OK");
        m.cri_finished("RunPodSandbox", "OK");
        m.cri_finished("ContainerStatus", "NotFound");
        let mut phases = m.phases();
        for phase in [
            PodStartPhase::Network,
            PodStartPhase::VmStart,
            PodStartPhase::AgentReady,
            PodStartPhase::SandboxSetup,
        ] {
            phases.lap(phase);
        }
        m.pod_start_phase(PodStartPhase::PodReady, Duration::from_secs(2));
        m.image_pulled(Duration::from_millis(300));
        m.read_vms_running(|| vec![("qemu".into(), 2), ("builtin".into(), 0)]).unwrap();
        m.read_image_pull_bytes(|| 12345).unwrap();

        let text = m.render().unwrap();
        for help in [
            "# TYPE podvisor_cri_requests_total counter",
            "# TYPE podvisor_cri_request_duration_seconds histogram",
            "# TYPE podvisor_pod_start_duration_seconds histogram",
            "# TYPE podvisor_image_pull_duration_seconds histogram",
            "# TYPE podvisor_image_pull_bytes_total counter",
            "# TYPE podvisor_vms_running gauge",
        ] {
            assert!(text.contains(help), "{help} missing from\n{text}");
        }
        let at = |series: &str| sample(&text, series);
        assert_eq!(
            at(r#"podvisor_cri_requests_total{code="OK",method="RunPodSandbox"}"#),
            Some(2.0)
        );
        assert_eq!(
            at(r#"podvisor_cri_requests_total{code="NotFound",method="ContainerStatus"}"#),
            Some(1.0)
        );
        assert_eq!(
            at(r#"podvisor_cri_request_duration_seconds_bucket{method="RunPodSandbox",le="1"}"#),
            Some(0.0)
        );
        assert_eq!(
            at(r#"podvisor_cri_request_duration_seconds_bucket{method="RunPodSandbox",le="2.5"}"#),
            Some(1.0)
        );
        for phase in ["network", "vm_start", "agent_ready", "sandbox_setup", "pod_ready"] {
            let series = format!(r#"podvisor_pod_start_duration_seconds_count{{phase="{phase}"}}"#);
            assert_eq!(at(&series), Some(1.0), "{series}");
        }
        assert_eq!(at("podvisor_image_pull_duration_seconds_count"), Some(1.0));
        assert_eq!(at("podvisor_image_pull_bytes_total"), Some(12345.0));
        assert_eq!(at(r#"podvisor_vms_running{backend="qemu"}"#), Some(2.0));
        assert_eq!(at(r#"podvisor_vms_running{backend="builtin"}"#), Some(0.0));
    }

    #[test]
    fn scrape_time_families_follow_their_source() {
        let m = Metrics::new().unwrap();
        let vms = std::sync::Arc::new(Mutex::new(vec![("qemu".to_string(), 1u64)]));
        let source = vms.clone();
        m.read_vms_running(move || lock(&source).clone()).unwrap();
        let text = m.render().unwrap();
        assert_eq!(sample(&text, r#"podvisor_vms_running{backend="qemu"}"#), Some(1.0));
        *lock(&vms) = vec![("builtin".to_string(), 3)];
        let text = m.render().unwrap();
        assert_eq!(sample(&text, r#"podvisor_vms_running{backend="qemu"}"#), None);
        assert_eq!(sample(&text, r#"podvisor_vms_running{backend="builtin"}"#), Some(3.0));
        // Registered once: a second reader of the same family is refused, not doubled.
        assert!(m.read_vms_running(Vec::new).is_err());
    }

    #[test]
    fn container_running_spans_create_to_start_and_forgets_removed_containers() {
        let m = Metrics::new().unwrap();
        let arrived = Instant::now() - Duration::from_millis(700);
        m.container_created("a", arrived);
        m.container_created("b", Instant::now());
        m.container_removed("b");
        m.container_started("a");
        m.container_started("b");
        // Started twice (a retried call): measured once.
        m.container_started("a");
        let text = m.render().unwrap();
        let series = r#"podvisor_pod_start_duration_seconds_count{phase="container_running"}"#;
        assert_eq!(sample(&text, series), Some(1.0));
        let sum = r#"podvisor_pod_start_duration_seconds_sum{phase="container_running"}"#;
        assert!(sample(&text, sum).unwrap() >= 0.7);
        assert!(lock(&m.creating).is_empty());
    }

    #[test]
    fn every_phase_has_its_own_label() {
        use PodStartPhase as P;
        let all = [
            P::Network,
            P::VmStart,
            P::AgentReady,
            P::SandboxSetup,
            P::PodReady,
            P::ContainerRunning,
        ];
        let labels: std::collections::HashSet<_> = all.iter().map(|p| p.label()).collect();
        assert_eq!(labels.len(), all.len());
    }
}
