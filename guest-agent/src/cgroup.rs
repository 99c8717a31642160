//! The guest's cgroup v2 files: statistics of a container's (or the pod's) cgroup, its OOM
//! count, and live resource updates (UpdateContainer), written straight to the cgroup files.
//! Nothing here runs libcontainer, so it is safe on tokio worker threads.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use oci_spec::runtime::LinuxResources;

/// The cgroup v1 shares range; values outside it are clamped, as the kernel did on v1.
const MIN_SHARES: u64 = 2;
const MAX_SHARES: u64 = 262_144;
const MAX_WEIGHT: u64 = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("invalid LinuxResources JSON: {0}")]
    BadResources(serde_json::Error),
    #[error("invalid memory limit {0}: use -1 (unlimited), 0 (unchanged) or a byte count")]
    MemoryValue(i64),
    #[error("invalid memory+swap limit {0}: use -1 (unlimited), 0 (unchanged) or a byte count")]
    SwapValue(i64),
    #[error("a memory+swap limit needs a memory limit in the same update")]
    SwapWithoutLimit,
    #[error("the memory+swap limit {swap} is below the memory limit {limit}")]
    SwapBelowLimit { swap: i64, limit: i64 },
    #[error("invalid unified cgroup file name {0:?}: use a plain file name such as memory.high")]
    BadUnifiedKey(String),
    #[error("reading {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("writing {value:?} to {path}: {source}")]
    Write { path: PathBuf, value: String, source: std::io::Error },
}

impl CgroupError {
    /// Whether the request itself is at fault (a value or file the kernel does not accept),
    /// rather than the agent or the VM.
    pub fn is_bad_request(&self) -> bool {
        match self {
            CgroupError::Read(_, e) | CgroupError::Write { source: e, .. } => matches!(
                e.raw_os_error(),
                Some(libc::EINVAL | libc::ERANGE | libc::ENOENT | libc::EOPNOTSUPP)
            ),
            _ => true,
        }
    }
}

/// Figures of one cgroup; zero for whatever file is missing or unreadable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub cpu_usage_nanos: u64,
    pub memory_usage_bytes: u64,
    /// memory.current minus inactive_file, as the kubelet and cAdvisor compute it.
    pub memory_working_set_bytes: u64,
    pub pids: u64,
    /// memory.stat `anon`.
    pub memory_rss_bytes: u64,
    pub page_faults: u64,
    pub major_page_faults: u64,
}

/// The value of `key` in a flat-keyed cgroup file ("key value" lines), 0 if absent.
fn keyed(text: &str, key: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
}

fn read(dir: &Path, name: &str) -> String {
    fs::read_to_string(dir.join(name)).unwrap_or_default()
}

/// Reads the statistics of the cgroup at `dir`; never fails (missing files count as 0).
pub fn stats(dir: &Path) -> Stats {
    let single = |name: &str| -> u64 { read(dir, name).trim().parse().unwrap_or(0) };
    let memory_stat = read(dir, "memory.stat");
    let memory_usage_bytes = single("memory.current");
    Stats {
        cpu_usage_nanos: keyed(&read(dir, "cpu.stat"), "usage_usec").saturating_mul(1000),
        memory_usage_bytes,
        memory_working_set_bytes: memory_usage_bytes
            .saturating_sub(keyed(&memory_stat, "inactive_file")),
        pids: single("pids.current"),
        memory_rss_bytes: keyed(&memory_stat, "anon"),
        page_faults: keyed(&memory_stat, "pgfault"),
        major_page_faults: keyed(&memory_stat, "pgmajfault"),
    }
}

/// How many processes of the cgroup at `dir` the OOM killer ended (memory.events `oom_kill`);
/// 0 when the file is missing (no memory controller, or the cgroup is gone).
pub fn oom_kills(dir: &Path) -> u64 {
    keyed(&read(dir, "memory.events"), "oom_kill")
}

/// The VM's memory from a /proc/meminfo text: (MemTotal, MemAvailable) in bytes, 0 if absent.
pub fn meminfo(text: &str) -> (u64, u64) {
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(':')))
            .and_then(|rest| {
                let mut words = rest.split_whitespace();
                let value: u64 = words.next()?.parse().ok()?;
                // The kernel prints every size field in kB (KiB).
                match words.next() {
                    Some("kB") => value.checked_mul(1024),
                    None => Some(value),
                    Some(_) => None,
                }
            })
            .unwrap_or(0)
    };
    (field("MemTotal"), field("MemAvailable"))
}

/// cgroup v1 CPU shares to a cgroup v2 cpu.weight, with the mapping libcontainer applies at
/// create (runc >= 1.3.2, crun >= 1.23: 2 -> 1, 1024 -> 100, 262144 -> 10000), so an update
/// that repeats the shares keeps the weight. 0 means "not set".
pub fn shares_to_weight(shares: u64) -> Option<u64> {
    if shares == 0 {
        return None;
    }
    if shares <= MIN_SHARES {
        return Some(1);
    }
    if shares >= MAX_SHARES {
        return Some(MAX_WEIGHT);
    }
    let log = (shares as f64).log2();
    let exponent = (log * log + 125.0 * log) / 612.0 - 7.0 / 34.0;
    // In range by the bounds above; the cast saturates anyway.
    Some((10f64.powf(exponent).ceil() as u64).clamp(1, MAX_WEIGHT))
}

/// What to write to cpu.max.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CpuMax {
    /// The whole value: "QUOTA" (the kernel keeps the period) or "QUOTA PERIOD".
    Value(String),
    /// A new period only: the current quota stays (read back at apply time).
    Period(u64),
}

/// cpu.max from an OCI quota and period (µs): a quota <= 0 is unlimited ("max"); a period of
/// 0 is treated as absent (the kernel refuses it).
pub fn cpu_max(quota: Option<i64>, period: Option<u64>) -> Option<CpuMax> {
    let period = period.filter(|p| *p > 0);
    let quota = quota.map(|q| if q > 0 { q.to_string() } else { "max".to_string() });
    match (quota, period) {
        (None, None) => None,
        (Some(q), None) => Some(CpuMax::Value(q)),
        (Some(q), Some(p)) => Some(CpuMax::Value(format!("{q} {p}"))),
        (None, Some(p)) => Some(CpuMax::Period(p)),
    }
}

/// cpu.max keeping the quota of the `current` cpu.max text, with a new period.
fn cpu_max_with_period(current: &str, period: u64) -> String {
    let quota = current.split_whitespace().next().unwrap_or("max");
    format!("{quota} {period}")
}

/// An OCI byte limit as a cgroup v2 value: 0 -> unset, -1 -> "max".
fn limit_value(value: i64) -> Option<String> {
    match value {
        0 => None,
        -1 => Some("max".to_string()),
        v => Some(v.to_string()),
    }
}

/// memory.max and memory.swap.max from an OCI memory limit and memory+swap limit, as runc
/// converts them (cgroup v2 limits swap alone: swap.max = swap - limit).
pub fn memory_values(
    limit: Option<i64>,
    swap: Option<i64>,
) -> Result<(Option<String>, Option<String>), CgroupError> {
    let (limit, swap) = (limit.unwrap_or(0), swap.unwrap_or(0));
    if limit < -1 {
        return Err(CgroupError::MemoryValue(limit));
    }
    if swap < -1 {
        return Err(CgroupError::SwapValue(swap));
    }
    let swap_max = match (limit, swap) {
        // An unlimited memory limit without a swap limit means "both unlimited" (runc).
        (-1, 0) | (_, -1) => Some("max".to_string()),
        (_, 0) => None,
        (0 | -1, _) => return Err(CgroupError::SwapWithoutLimit),
        (limit, swap) if swap < limit => return Err(CgroupError::SwapBelowLimit { swap, limit }),
        // Equal limits mean "no swap": write 0, never leave it unset.
        (limit, swap) => Some((swap - limit).to_string()),
    };
    Ok((limit_value(limit), swap_max))
}

/// Whether `key` may name a file of the container's cgroup: a plain file name, nothing that
/// could leave the directory.
pub fn valid_unified_key(key: &str) -> bool {
    !key.is_empty() && !key.starts_with('.') && !key.contains(['/', '\0']) && !key.contains("..")
}

/// The writes one UpdateContainer makes, all checked before any is made.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Update {
    pub cpuset_cpus: Option<String>,
    pub cpuset_mems: Option<String>,
    pub cpu_weight: Option<u64>,
    pub cpu_max: Option<CpuMax>,
    pub memory_swap_max: Option<String>,
    pub memory_max: Option<String>,
    /// Sorted by name, so the writes happen in a stable order.
    pub unified: Vec<(String, String)>,
}

impl Update {
    /// Parses and checks a LinuxResources JSON; only cpu (shares, quota, period, cpus, mems),
    /// memory (limit, swap) and unified are taken.
    pub fn from_json(json: &[u8]) -> Result<(Update, LinuxResources), CgroupError> {
        let resources: LinuxResources =
            serde_json::from_slice(json).map_err(CgroupError::BadResources)?;
        Ok((Update::new(&resources)?, resources))
    }

    pub fn new(resources: &LinuxResources) -> Result<Update, CgroupError> {
        let mut update = Update::default();
        if let Some(cpu) = resources.cpu() {
            // An empty cpuset means "inherit" to the kernel; runc skips it, so do we.
            update.cpuset_cpus = cpu.cpus().clone().filter(|c| !c.is_empty());
            update.cpuset_mems = cpu.mems().clone().filter(|m| !m.is_empty());
            update.cpu_weight = cpu.shares().and_then(shares_to_weight);
            update.cpu_max = cpu_max(cpu.quota(), cpu.period());
        }
        if let Some(memory) = resources.memory() {
            (update.memory_max, update.memory_swap_max) =
                memory_values(memory.limit(), memory.swap())?;
        }
        if let Some(unified) = resources.unified() {
            if let Some(bad) = unified.keys().find(|k| !valid_unified_key(k)) {
                return Err(CgroupError::BadUnifiedKey(bad.clone()));
            }
            let mut entries: Vec<(String, String)> =
                unified.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            entries.sort();
            update.unified = entries;
        }
        Ok(update)
    }

    /// Writes the update to the cgroup at `dir`. The first write the kernel refuses stops it
    /// (earlier writes stay, as with runc).
    pub fn apply(&self, dir: &Path) -> Result<(), CgroupError> {
        if let Some(cpus) = &self.cpuset_cpus {
            write(dir, "cpuset.cpus", cpus)?;
        }
        if let Some(mems) = &self.cpuset_mems {
            write(dir, "cpuset.mems", mems)?;
        }
        if let Some(weight) = self.cpu_weight {
            write(dir, "cpu.weight", &weight.to_string())?;
        }
        match &self.cpu_max {
            None => {}
            Some(CpuMax::Value(value)) => write(dir, "cpu.max", value)?,
            Some(CpuMax::Period(period)) => {
                let path = dir.join("cpu.max");
                let current =
                    fs::read_to_string(&path).map_err(|e| CgroupError::Read(path.clone(), e))?;
                write(dir, "cpu.max", &cpu_max_with_period(&current, *period))?;
            }
        }
        if let Some(swap) = &self.memory_swap_max {
            match write(dir, "memory.swap.max", swap) {
                // A kernel without swap accounting has no such file: "no limit" and "no swap"
                // hold anyway (runc ignores this too).
                Err(CgroupError::Write { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound
                        && (swap == "max" || swap == "0") => {}
                other => other?,
            }
        }
        if let Some(max) = &self.memory_max {
            write(dir, "memory.max", max)?;
        }
        for (name, value) in &self.unified {
            write(dir, name, value)?;
        }
        Ok(())
    }
}

/// Writes `value` to the existing cgroup file `dir/name` (never creates one: an unknown name
/// is an error, not a stray file).
fn write(dir: &Path, name: &str, value: &str) -> Result<(), CgroupError> {
    let path = dir.join(name);
    // O_TRUNC as runc does: cgroupfs ignores it, a plain file (tests) needs it.
    let result = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&path)
        .and_then(|mut file| file.write_all(value.as_bytes()));
    result.map_err(|source| CgroupError::Write { path, value: value.to_string(), source })
}

/// Folds the fields an update applied into the resources the container was created with, so
/// its remembered spec says what its cgroup holds.
pub fn merge_resources(current: &mut LinuxResources, update: &LinuxResources) {
    if let Some(new) = update.cpu() {
        let mut cpu = current.cpu().clone().unwrap_or_default();
        if let Some(shares) = new.shares().filter(|s| *s > 0) {
            cpu.set_shares(Some(shares));
        }
        if let Some(quota) = new.quota() {
            cpu.set_quota(Some(quota));
        }
        if let Some(period) = new.period().filter(|p| *p > 0) {
            cpu.set_period(Some(period));
        }
        if let Some(cpus) = new.cpus().clone().filter(|c| !c.is_empty()) {
            cpu.set_cpus(Some(cpus));
        }
        if let Some(mems) = new.mems().clone().filter(|m| !m.is_empty()) {
            cpu.set_mems(Some(mems));
        }
        current.set_cpu(Some(cpu));
    }
    if let Some(new) = update.memory() {
        let mut memory = current.memory().unwrap_or_default();
        if let Some(limit) = new.limit().filter(|l| *l != 0) {
            memory.set_limit(Some(limit));
        }
        if let Some(swap) = new.swap().filter(|s| *s != 0) {
            memory.set_swap(Some(swap));
        }
        current.set_memory(Some(memory));
    }
    if let Some(new) = update.unified() {
        let mut unified = current.unified().clone().unwrap_or_default();
        unified.extend(new.iter().map(|(k, v)| (k.clone(), v.clone())));
        current.set_unified(Some(unified));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_map_to_weights_as_libcontainer_does_at_create() {
        assert_eq!(shares_to_weight(0), None);
        assert_eq!(shares_to_weight(1), Some(1));
        assert_eq!(shares_to_weight(2), Some(1));
        assert_eq!(shares_to_weight(1024), Some(100));
        assert_eq!(shares_to_weight(262_144), Some(10_000));
        assert_eq!(shares_to_weight(u64::MAX), Some(10_000));
    }

    #[test]
    fn cpu_max_is_formatted_like_runc() {
        let value = |s: &str| Some(CpuMax::Value(s.to_string()));
        assert_eq!(cpu_max(None, None), None);
        assert_eq!(cpu_max(Some(50_000), Some(100_000)), value("50000 100000"));
        assert_eq!(cpu_max(Some(50_000), None), value("50000"));
        assert_eq!(cpu_max(Some(-1), Some(100_000)), value("max 100000"));
        assert_eq!(cpu_max(Some(0), None), value("max"));
        assert_eq!(cpu_max(Some(20_000), Some(0)), value("20000"));
        assert_eq!(cpu_max(None, Some(50_000)), Some(CpuMax::Period(50_000)));
        assert_eq!(cpu_max(None, Some(0)), None);
        assert_eq!(cpu_max_with_period("25000 100000\n", 50_000), "25000 50000");
        assert_eq!(cpu_max_with_period("max 100000\n", 10_000), "max 10000");
        assert_eq!(cpu_max_with_period("", 10_000), "max 10000");
    }

    #[test]
    fn swap_is_converted_like_runc() {
        let s = |v: &str| Some(v.to_string());
        let mib = 1 << 20;
        assert_eq!(memory_values(None, None).unwrap(), (None, None));
        assert_eq!(memory_values(Some(32 * mib), None).unwrap(), (s("33554432"), None));
        assert_eq!(memory_values(Some(mib), Some(3 * mib)).unwrap(), (s("1048576"), s("2097152")));
        assert_eq!(memory_values(Some(mib), Some(mib)).unwrap(), (s("1048576"), s("0")));
        assert_eq!(memory_values(Some(mib), Some(-1)).unwrap(), (s("1048576"), s("max")));
        assert_eq!(memory_values(Some(-1), None).unwrap(), (s("max"), s("max")));
        assert_eq!(memory_values(Some(-1), Some(-1)).unwrap(), (s("max"), s("max")));
        assert!(matches!(memory_values(Some(-2), None), Err(CgroupError::MemoryValue(-2))));
        assert!(matches!(memory_values(Some(mib), Some(-5)), Err(CgroupError::SwapValue(-5))));
        assert!(matches!(memory_values(None, Some(mib)), Err(CgroupError::SwapWithoutLimit)));
        assert!(matches!(memory_values(Some(-1), Some(mib)), Err(CgroupError::SwapWithoutLimit)));
        assert!(matches!(
            memory_values(Some(2 * mib), Some(mib)),
            Err(CgroupError::SwapBelowLimit { .. })
        ));
    }

    #[test]
    fn unified_keys_stay_in_the_cgroup() {
        for good in ["memory.high", "cpu.max.burst", "io.weight", "pids.max"] {
            assert!(valid_unified_key(good), "{good}");
        }
        for bad in ["", ".", "..", "../x", "a/b", "/etc/passwd", "memory..high", ".hidden", "a\0b"]
        {
            assert!(!valid_unified_key(bad), "{bad:?}");
        }
        let json = br#"{"unified": {"memory.high": "1", "../../cgroup.procs": "1"}}"#;
        assert!(matches!(Update::from_json(json), Err(CgroupError::BadUnifiedKey(_))));
    }

    #[test]
    fn meminfo_is_read_in_bytes() {
        let text = "MemTotal:         245212 kB\nMemFree:          200000 kB\n\
                    MemAvailable:     210000 kB\nBuffers:               0 kB\n";
        assert_eq!(meminfo(text), (245_212 * 1024, 210_000 * 1024));
        assert_eq!(meminfo("MemTotalX: 5 kB\n"), (0, 0));
        assert_eq!(meminfo("MemTotal: lots kB\nMemAvailable: 1 MB\n"), (0, 0));
        assert_eq!(meminfo(""), (0, 0));
    }

    #[test]
    fn stats_come_from_the_cgroup_files() {
        let dir = tempfile::tempdir().unwrap();
        let put = |name: &str, text: &str| fs::write(dir.path().join(name), text).unwrap();
        assert_eq!(stats(dir.path()), Stats::default());
        put("cpu.stat", "usage_usec 1500\nuser_usec 1000\n");
        put("memory.current", "10000\n");
        put("memory.stat", "anon 4096\nfile 5000\ninactive_file 3000\npgfault 42\npgmajfault 2\n");
        put("pids.current", "3\n");
        put("memory.events", "low 0\nhigh 0\nmax 7\noom 1\noom_kill 1\n");
        assert_eq!(
            stats(dir.path()),
            Stats {
                cpu_usage_nanos: 1_500_000,
                memory_usage_bytes: 10_000,
                memory_working_set_bytes: 7_000,
                pids: 3,
                memory_rss_bytes: 4096,
                page_faults: 42,
                major_page_faults: 2,
            }
        );
        assert_eq!(oom_kills(dir.path()), 1);
        assert_eq!(oom_kills(&dir.path().join("gone")), 0);
    }

    #[test]
    fn an_update_writes_existing_files_only() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["cpu.weight", "cpu.max", "memory.max", "memory.high"] {
            fs::write(dir.path().join(name), "").unwrap();
        }
        fs::write(dir.path().join("cpu.max"), "max 100000\n").unwrap();
        let json = br#"{"cpu": {"shares": 1024, "period": 50000},
                        "memory": {"limit": 33554432},
                        "unified": {"memory.high": "30000000"},
                        "pids": {"limit": 5}}"#;
        let (update, _) = Update::from_json(json).unwrap();
        update.apply(dir.path()).unwrap();
        let get = |name: &str| fs::read_to_string(dir.path().join(name)).unwrap();
        assert_eq!(get("cpu.weight"), "100");
        assert_eq!(get("cpu.max"), "max 50000");
        assert_eq!(get("memory.max"), "33554432");
        assert_eq!(get("memory.high"), "30000000");
        // Untouched fields leave their files alone; a file that does not exist is not made.
        let (update, _) = Update::from_json(br#"{"unified": {"memory.low": "1"}}"#).unwrap();
        let err = update.apply(dir.path()).unwrap_err();
        assert!(err.to_string().contains("memory.low"), "{err}");
        assert!(err.is_bad_request());
        assert!(!dir.path().join("memory.low").exists());
        assert!(matches!(Update::from_json(b"{not json"), Err(CgroupError::BadResources(_))));
        assert!(Update::from_json(b"").is_err());
    }

    #[test]
    fn merged_resources_keep_what_the_update_left_out() {
        let mut current: LinuxResources = serde_json::from_str(
            r#"{"cpu": {"shares": 512, "quota": 20000, "period": 100000},
                "memory": {"limit": 1000, "swap": 2000}, "unified": {"a.b": "1"}}"#,
        )
        .unwrap();
        let update: LinuxResources = serde_json::from_str(
            r#"{"cpu": {"quota": 50000, "cpus": "0"}, "memory": {"limit": 3000},
                "unified": {"c.d": "2"}}"#,
        )
        .unwrap();
        merge_resources(&mut current, &update);
        let cpu = current.cpu().clone().unwrap();
        assert_eq!(
            (cpu.shares(), cpu.quota(), cpu.period()),
            (Some(512), Some(50_000), Some(100_000))
        );
        assert_eq!(cpu.cpus().as_deref(), Some("0"));
        let memory = current.memory().unwrap();
        assert_eq!((memory.limit(), memory.swap()), (Some(3000), Some(2000)));
        assert_eq!(current.unified().as_ref().map(|u| u.len()), Some(2));
    }
}
