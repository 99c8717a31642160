//! Pull + unpack time of a multi-layer image: podvisor-image against `skopeo copy` +
//! `umoci unpack` of the same image from the same local registry; and the import of an OCI
//! archive of it (what `podvisor images import` runs: copy, verify, unpack) against `skopeo
//! copy` of the same archive into an OCI layout (copy and verify, no unpack) and against
//! `skopeo copy` + `umoci unpack`.
//!
//! `cargo bench -p podvisor-image --bench pull_unpack` (env: PODVISOR_BENCH_LAYERS, default 4;
//! PODVISOR_BENCH_LAYER_MIB, default 16; PODVISOR_BENCH_RUNS, default 3). Prints one line per
//! tool with the best and median wall time, and the ratios of the medians, all measured in
//! the same run.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use podvisor_e2e::images::{LayerBuilder, TestImage};
use podvisor_e2e::registry::{missing_tools, TestRegistry};
use podvisor_image::{ImageStore, ImageStoreConfig};

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Deterministic incompressible bytes (xorshift), so gzip cannot hide the transfer.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Busybox plus `layers` layers of `mib` MiB each: half one big file, half 64 KiB files, and
/// 200 small text files per layer.
fn bench_image(layers: usize, mib: usize) -> Result<TestImage> {
    let mut tars = vec![LayerBuilder::new().busybox_root()?.finish()?];
    for layer in 0..layers {
        let dir = format!("data/l{layer}");
        let mut builder = LayerBuilder::new().dir("data", 0o755)?.dir(&dir, 0o755)?;
        let half = mib * 1024 * 1024 / 2;
        builder = builder.file(&format!("{dir}/big.bin"), &noise(layer as u64 + 1, half), 0o644)?;
        for file in 0..half / (64 * 1024) {
            let data = noise((layer * 10_000 + file) as u64 + 7, 64 * 1024);
            builder = builder.file(&format!("{dir}/chunk{file}.bin"), &data, 0o644)?;
        }
        for file in 0..200 {
            builder = builder.file(
                &format!("{dir}/text{file}.txt"),
                format!("layer {layer} file {file}\n").repeat(20).as_bytes(),
                0o644,
            )?;
        }
        tars.push(builder.finish()?);
    }
    Ok(TestImage::new(tars))
}

fn run(command: &mut Command) -> Result<()> {
    let output = command.output().with_context(|| format!("run {command:?}"))?;
    if !output.status.success() {
        bail!("{command:?} failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(())
}

/// `skopeo copy` of `source` (a transport:reference) into an OCI layout under `work`.
fn skopeo_copy(source: &str, work: &Path) -> Result<()> {
    let layout = work.join("layout");
    run(Command::new("skopeo").args([
        "--insecure-policy",
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        source,
        &format!("oci:{}:bench", layout.display()),
    ]))
}

fn skopeo_umoci(source: &str, work: &Path) -> Result<()> {
    skopeo_copy(source, work)?;
    umoci_unpack(work)
}

fn umoci_unpack(work: &Path) -> Result<()> {
    let layout = work.join("layout");
    let bundle = work.join("bundle");
    let mut umoci = Command::new("umoci");
    umoci.arg("unpack");
    if !nix_is_root() {
        umoci.arg("--rootless");
    }
    run(umoci.arg("--image").arg(format!("{}:bench", layout.display())).arg(&bundle))
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn median(times: &mut [Duration]) -> f64 {
    times.sort();
    times.get(times.len() / 2).copied().unwrap_or_default().as_secs_f64()
}

/// "ours / theirs = 0.42" of the medians.
fn ratio(what: &str, ours: &mut [Duration], theirs: &mut [Duration]) -> String {
    format!("{what:<44}: {:.2}", median(ours) / median(theirs).max(1e-9))
}

fn summary(times: &mut [Duration]) -> String {
    times.sort();
    let best = times.first().copied().unwrap_or_default();
    let median = times.get(times.len() / 2).copied().unwrap_or_default();
    format!(
        "best {:>7.3} s   median {:>7.3} s   ({} runs)",
        best.as_secs_f64(),
        median.as_secs_f64(),
        times.len()
    )
}

fn main() -> Result<()> {
    if let Some(reason) = missing_tools() {
        println!("pull_unpack bench skipped: {reason}");
        return Ok(());
    }
    if !Path::new("/usr/bin/umoci").exists() {
        println!("pull_unpack bench skipped: umoci is missing (apt-get install umoci)");
        return Ok(());
    }
    let layers = env_number("PODVISOR_BENCH_LAYERS", 4);
    let mib = env_number("PODVISOR_BENCH_LAYER_MIB", 16);
    let runs = env_number("PODVISOR_BENCH_RUNS", 3).max(1);

    let registry = TestRegistry::start()?;
    let image = bench_image(layers, mib)?;
    let reference = registry.push_image("bench:1", &image)?;
    println!(
        "image {reference}: busybox + {layers} layers x {mib} MiB (gzip), {} layers total",
        layers + 1
    );

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let mut ours = Vec::new();
    let mut ours_unpack = Vec::new();
    let mut theirs = Vec::new();
    for _ in 0..runs {
        let dir = tempfile::tempdir()?;
        let store = ImageStore::open(dir.path(), ImageStoreConfig::default())?;
        let started = Instant::now();
        let record = runtime.block_on(store.pull(&reference, None))?;
        ours.push(started.elapsed());
        // Unpack alone, from the stored blobs.
        let rootfs = store.rootfs_dir(&record.id)?;
        std::fs::remove_dir_all(&rootfs)?;
        let started = Instant::now();
        store.rootfs_dir(&record.id)?;
        ours_unpack.push(started.elapsed());

        let work = tempfile::tempdir()?;
        let started = Instant::now();
        skopeo_umoci(&format!("docker://{reference}"), work.path())?;
        theirs.push(started.elapsed());
    }
    println!("podvisor-image pull+unpack : {}", summary(&mut ours));
    println!("podvisor-image unpack only : {}", summary(&mut ours_unpack));
    println!("skopeo copy + umoci unpack : {}", summary(&mut theirs));
    println!("{}", ratio("pull+unpack / skopeo copy + umoci unpack", &mut ours, &mut theirs));
    import_bench(&reference, runs)
}

/// The same image as an OCI archive (`skopeo copy … oci-archive:`), imported.
fn import_bench(reference: &str, runs: usize) -> Result<()> {
    let archive_dir = tempfile::tempdir()?;
    let archive = archive_dir.path().join("bench.tar");
    run(Command::new("skopeo").args([
        "--insecure-policy",
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        &format!("docker://{reference}"),
        &format!("oci-archive:{}:example.com/bench:1", archive.display()),
    ]))?;
    let source = format!("oci-archive:{}", archive.display());
    let (mut ours, mut copy, mut copy_unpack) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let dir = tempfile::tempdir()?;
        let store = ImageStore::open(dir.path(), ImageStoreConfig::default())?;
        let started = Instant::now();
        store.import(&archive)?;
        ours.push(started.elapsed());
        drop((store, dir));

        let work = tempfile::tempdir()?;
        let started = Instant::now();
        skopeo_copy(&source, work.path())?;
        copy.push(started.elapsed());
        umoci_unpack(work.path())?;
        // From the same start: the copy and the unpack.
        copy_unpack.push(started.elapsed());
    }
    let size = std::fs::metadata(&archive)?.len() >> 20;
    println!("import of a {size} MiB OCI archive (copy, verify, unpack):");
    println!("podvisor-image import      : {}", summary(&mut ours));
    println!("skopeo copy (no unpack)    : {}", summary(&mut copy));
    println!("skopeo copy + umoci unpack : {}", summary(&mut copy_unpack));
    println!("{}", ratio("import / skopeo copy", &mut ours, &mut copy));
    println!("{}", ratio("import / skopeo copy + umoci unpack", &mut ours, &mut copy_unpack));
    Ok(())
}
