//! `make bench`'s VM-template figures (`podvisor_e2e::template_bench`): cold boot vs template
//! restore to a running container, per-pod PSS/USS with and without templates, and idle pods
//! per fixed memory, measured in one run on the built-in VMM.
//!
//! Where KVM boots Linux, against a daemon on this host. Where it cannot (this project's
//! nested-PVM build machines), inside the nested end-to-end test's L1 VM (QEMU/TCG with
//! emulated SVM, `podvisor_e2e::nested`): the ratios and memory figures are the same
//! measurement, but the absolute times are those of emulation, orders of magnitude above
//! hardware's.
//!
//! Needs `podvisor-nested-client` built next to this binary (`make bench` builds both).

use std::time::Duration;

use anyhow::{bail, Context, Result};
use k8s_cri::v1 as cri;
use podvisor_e2e::daemon::{kvm_can_boot_linux, TestDaemon};
use podvisor_e2e::nested::{can_nest, run_l1, tail, Mode, Unavailable};
use podvisor_e2e::registry::TestRegistry;
use podvisor_e2e::template_bench::{self, COLD_HANDLER};

/// The whole L1 run: a warm-up pod, the template build, then six pods, all under emulation.
const L1_TIMEOUT: Duration = Duration::from_secs(60 * 60);

fn main() -> Result<()> {
    match kvm_can_boot_linux() {
        Ok(()) => on_this_host(),
        Err(reason) => {
            println!("KVM cannot boot Linux here ({reason}): measuring inside a nested L1 VM");
            in_nested_l1()
        }
    }
}

/// The figures from a daemon on this host with the built-in VMM.
fn on_this_host() -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let registry = TestRegistry::start()?;
        let image = registry.push_busybox("busybox:template-bench")?;
        let metrics = free_loopback_port()?;
        let daemon = TestDaemon::start_with_vm(
            &format!(
                "hypervisor = \"builtin\"\n[metrics]\nenabled = true\nport = {}\n\
                 [runtimes.{COLD_HANDLER}]\ntemplates = false\n",
                metrics.port()
            ),
            "templates = true",
        )
        .await?;
        let mut images = daemon.images().await?;
        let spec = cri::ImageSpec { image: image.clone(), ..Default::default() };
        images
            .pull_image(cri::PullImageRequest { image: Some(spec), ..Default::default() })
            .await?;
        let channel = podvisor_e2e::daemon::cri_channel(&daemon.socket()).await?;
        let log_dir = daemon.dir.path().join("logs");
        let figures = template_bench::run(channel, &image, &log_dir, Some(metrics)).await?;
        println!("VM templates, built-in VMM on this host's KVM:");
        for line in figures.report() {
            println!("  {line}");
        }
        Ok(())
    })
}

/// A loopback address with a port free a moment ago, for the daemon's metrics endpoint.
fn free_loopback_port() -> Result<std::net::SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// The figures from inside L1, relayed from its console.
fn in_nested_l1() -> Result<()> {
    let client = std::env::current_exe()?
        .parent()
        .context("this binary's directory")?
        .join("podvisor-nested-client");
    if !client.is_file() {
        bail!("{} is missing: build it (cargo build -p podvisor-e2e --bins)", client.display());
    }
    let run = match can_nest()
        .and_then(|virtiofsd| run_l1(Mode::Bench, &client, &virtiofsd, &[], L1_TIMEOUT))
    {
        Ok(run) => run,
        Err(Unavailable::Skip(why) | Unavailable::Missing(why)) => {
            println!("VM templates: skipped: {why}");
            return Ok(());
        }
    };
    if run.result() != "NESTED-RESULT ok" {
        bail!("{}\n--- L1 console (tail):\n{}", run.result(), tail(&run.console, 120));
    }
    println!(
        "VM templates, built-in VMM in a nested L1 VM (QEMU/TCG, emulated SVM; times are \
         emulation's), L1 ran {:.0} s:",
        run.ran_for.as_secs_f64()
    );
    for line in run.report_lines() {
        if let Some(figure) = line.strip_prefix("NESTED-BENCH ") {
            println!("  {figure}");
        }
    }
    Ok(())
}
