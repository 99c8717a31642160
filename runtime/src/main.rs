//! `podvisor`: the daemon (CRI server), the host check, and the built-in VMM process.

mod agent;
mod check;
mod config;
mod cri;
mod hypervisor;
mod images;
mod metrics;
mod procwait;
mod resource;
mod sandbox;
mod store;
mod streaming;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::net::UnixListener;
use tracing::{info, warn};

use crate::config::{Config, DEFAULT_CONFIG_PATH};
use crate::hypervisor::builtin::{BuiltinConfig, BuiltinHypervisor, JailIds};
use crate::hypervisor::host::{HostBackend, HostConfig};
use crate::hypervisor::qemu::{Accel, QemuConfig, QemuHypervisor};
use crate::hypervisor::{Hypervisor, HypervisorError, Registry};

#[derive(Parser)]
#[command(name = "podvisor", version, about = "A Kubernetes CRI runtime whose pods are micro-VMs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve CRI runtime.v1 (RuntimeService + ImageService) on a unix socket.
    Daemon(DaemonArgs),
    /// Import images from archives into the store, or export one (through the running
    /// daemon, or on the store directly when none runs).
    Images(ImagesArgs),
    /// Report what this host can do (KVM, QEMU, virtiofsd, vsock, CNI) and which backend runs.
    Check,
    /// Run one VM with the built-in VMM (started by the daemon, one process per sandbox).
    Vmm {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Serve one shared directory to a built-in VMM's in-process virtio-fs device (started by
    /// the daemon as root, sandboxed, one per share of a VM).
    FsServe {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Copy a QEMU VM's serial console from a pipe into its capped log (started by the
    /// daemon, one process per QEMU VM).
    #[command(hide = true)]
    ConsoleLog(ConsoleLogArgs),
    /// Run a VM helper (QEMU, vhost-device-vsock) confined: as its pod's uid, without
    /// capabilities, in a mount namespace showing only the given paths (started by the daemon).
    #[command(hide = true)]
    JailExec(JailExecArgs),
}

#[derive(clap::Args)]
struct JailExecArgs {
    /// `<uid>:<gid>` to run as (not root).
    #[arg(long)]
    ids: String,
    /// An empty directory for the jail's root.
    #[arg(long)]
    root: PathBuf,
    /// A host path visible inside the jail (repeatable).
    #[arg(long)]
    bind: Vec<PathBuf>,
    /// The program and its arguments.
    #[arg(required = true, last = true)]
    command: Vec<std::ffi::OsString>,
}

#[derive(clap::Args)]
struct ConsoleLogArgs {
    /// The VM's run directory.
    #[arg(long)]
    run_dir: PathBuf,
    /// The pipe QEMU writes the console to (inherited).
    #[arg(long)]
    input_fd: i32,
    /// The console log.
    #[arg(long)]
    output: PathBuf,
    /// Past this size only the log's newest half is kept.
    #[arg(long)]
    max_bytes: u64,
    /// Once the pipe and the log are open, run as `<uid>:<gid>` in an empty jail.
    #[arg(long)]
    jail: Option<String>,
    /// The jail's root (an empty directory), with `--jail`.
    #[arg(long)]
    jail_root: Option<PathBuf>,
}

#[derive(clap::Args)]
struct DaemonArgs {
    /// TOML config file (every key optional).
    #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// The CRI socket (overrides `listen`).
    #[arg(long)]
    listen: Option<PathBuf>,
    /// Persistent state directory (overrides `root`).
    #[arg(long)]
    root: Option<PathBuf>,
    /// Runtime state directory (overrides `state`).
    #[arg(long)]
    state: Option<PathBuf>,
}

#[derive(clap::Args)]
struct ImagesArgs {
    #[command(flatten)]
    daemon: DaemonArgs,
    #[command(subcommand)]
    command: ImagesCommand,
}

#[derive(Subcommand)]
enum ImagesCommand {
    /// Import every image of each FILE: an OCI image layout (directory or tar) or a docker
    /// archive (`docker save`, `skopeo copy … docker-archive:`), verified by digest.
    Import {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Write image REF as an OCI image layout tar to FILE.
    Export { reference: String, file: PathBuf },
}

/// `podvisor images …`: prints one line per image handled.
fn images_command(args: ImagesArgs) -> anyhow::Result<()> {
    let config = load_config(&args.daemon)?;
    let request = match args.command {
        ImagesCommand::Import { files } => images::control::Request::Import(files),
        ImagesCommand::Export { reference, file } => {
            images::control::Request::Export { reference, file }
        }
    };
    let store_config = images::store_config(&config)?;
    // On stderr, so stdout keeps only the result lines scripts read.
    let display = images::progress::Display::for_stderr();
    let result =
        images::control::request(&config.root, &config.state, store_config, request, &|p| {
            display.show(p)
        });
    display.finish();
    for done in result? {
        println!("{} {}", done.id, done.tags.join(" "));
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check => check::run(),
        Command::Images(args) => match images_command(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("podvisor images: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Vmm { args } => podvisor_vmm::main_with_args(args),
        Command::FsServe { args } => podvisor_fs_server::main_with_args(args),
        Command::ConsoleLog(args) => {
            let jail = match console_jail(args.jail.as_deref(), args.jail_root.clone()) {
                Ok(jail) => jail,
                Err(e) => {
                    eprintln!("podvisor console-log: {e:#}");
                    return ExitCode::FAILURE;
                }
            };
            let args = hypervisor::qemu::console::HelperArgs {
                run_dir: args.run_dir,
                input_fd: args.input_fd,
                output: args.output,
                max_bytes: args.max_bytes,
                jail,
            };
            match hypervisor::qemu::console::run(&args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("podvisor console-log: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::JailExec(args) => match jail_exec(args) {
            Ok(never) => match never {},
            Err(e) => {
                eprintln!("podvisor jail-exec: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Daemon(args) => {
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("podvisor: starting the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(daemon(args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("podvisor: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// The console copier's `--jail U:G --jail-root R`: an empty jail (it needs only its fds).
fn console_jail(
    ids: Option<&str>,
    root: Option<PathBuf>,
) -> anyhow::Result<Option<hypervisor::confine::HelperJail>> {
    let Some(ids) = ids else { return Ok(None) };
    let (uid, gid) = podvisor_vmm::jail::parse_ids(ids)?;
    let root = root.context("--jail needs --jail-root")?;
    Ok(Some(hypervisor::confine::HelperJail { uid, gid, root, binds: Vec::new() }))
}

/// `podvisor jail-exec`: becomes the given program, jailed.
fn jail_exec(args: JailExecArgs) -> anyhow::Result<std::convert::Infallible> {
    let (uid, gid) = podvisor_vmm::jail::parse_ids(&args.ids)?;
    let (program, rest) = args.command.split_first().context("no program to run")?;
    let jail = hypervisor::confine::HelperJail { uid, gid, root: args.root, binds: args.bind };
    Ok(hypervisor::confine::exec_jailed(&jail, std::path::Path::new(program), rest)?)
}

fn load_config(args: &DaemonArgs) -> anyhow::Result<Config> {
    let mut config = Config::load(&args.config)?;
    if let Some(p) = &args.listen {
        config.listen = p.clone();
    }
    if let Some(p) = &args.root {
        config.root = p.clone();
    }
    if let Some(p) = &args.state {
        config.state = p.clone();
    }
    config.validate()?;
    Ok(config)
}

/// Picks the backend new pods run on: the configured one, or with `auto` the built-in VMM
/// where KVM can boot a Linux guest and QEMU otherwise. Returns the registry (which can also
/// build the other backend, for pods a previous daemon started on it) with the reason, for
/// the log and Status, and a warning when the default backend's VMs are no security boundary
/// (QEMU under TCG).
fn select_hypervisor(config: &Arc<Config>) -> anyhow::Result<(Registry, String, Option<String>)> {
    let caps = check::HostCapabilities::detect();
    let (name, reason) = match config.hypervisor.as_str() {
        "builtin" => ("builtin", "configured: hypervisor = \"builtin\"".to_string()),
        "qemu" => ("qemu", "configured: hypervisor = \"qemu\"".to_string()),
        _ => match caps.default_backend() {
            (Some(name), reason) => (name, reason),
            (None, reason) => anyhow::bail!("no hypervisor backend can run on this host: {reason}"),
        },
    };
    let (default, reason, warning) = if name == "builtin" {
        (builtin_backend(config)?, reason, None)
    } else {
        let qemu = qemu_backend(config)?;
        let (resolved, why) = qemu.accel();
        let reason = format!("{reason}; accel {} ({why})", resolved.as_str());
        let warning = (resolved == hypervisor::qemu::ResolvedAccel::Tcg).then(|| {
            "QEMU runs VMs under TCG, which QEMU does not treat as a security boundary: a guest \
             that escapes TCG's emulation runs as its VM's confined uid on the host; set \
             qemu.allow_tcg = false to refuse TCG"
                .to_string()
        });
        (Arc::new(qemu) as Arc<dyn Hypervisor>, reason, warning)
    };
    info!(backend = name, reason = %reason, "hypervisor selected");
    if let Some(warning) = &warning {
        warn!("{warning}");
    }
    let other = if name == "builtin" { "qemu" } else { "builtin" };
    let factory_config = config.clone();
    let registry = Registry::new(default).with_factory(other, move || match other {
        "qemu" => Ok(Arc::new(
            qemu_backend(&factory_config)
                .map_err(|e| HypervisorError::InvalidConfig(format!("{e:#}")))?,
        ) as Arc<dyn Hypervisor>),
        _ => builtin_backend(&factory_config)
            .map_err(|e| HypervisorError::InvalidConfig(format!("{e:#}"))),
    });
    let host_config = config.clone();
    let registry = registry.with_factory(hypervisor::host::NAME, move || {
        Ok(Arc::new(HostBackend::new(HostConfig {
            agent_binary: host_config.host_agent_path(),
            run_root: host_config.vms_dir(),
            startup_timeout: std::time::Duration::from_secs(20),
        })?) as Arc<dyn Hypervisor>)
    });
    Ok((registry, reason, warning))
}

fn builtin_backend(config: &Config) -> anyhow::Result<Arc<dyn Hypervisor>> {
    let jail = config
        .builtin
        .jail
        .then_some(JailIds { first: config.builtin.jail_first_id, count: config.builtin.jail_ids });
    if jail.is_some() && !nix::unistd::geteuid().is_root() {
        anyhow::bail!(
            "the built-in VMM's jail needs the daemon to run as root \
             (or set builtin.jail = false in the config)"
        );
    }
    Ok(Arc::new(BuiltinHypervisor::new(BuiltinConfig {
        virtiofsd_binary: config.qemu.virtiofsd.clone(),
        jail,
        seccomp: config.builtin.seccomp,
        fs: match config.builtin.fs {
            config::BuiltinFs::Inproc => podvisor_vmm::config::FsKind::Inproc,
            config::BuiltinFs::VhostUser => podvisor_vmm::config::FsKind::VhostUser,
        },
        run_root: config.vms_dir(),
        ..BuiltinConfig::default()
    })?))
}

fn qemu_backend(config: &Config) -> anyhow::Result<QemuHypervisor> {
    let accel = match config.qemu.accel.as_str() {
        "kvm" => Accel::Kvm,
        "tcg" => Accel::Tcg,
        _ => Accel::Auto,
    };
    let jail = config
        .qemu
        .jail
        .then_some(JailIds { first: config.builtin.jail_first_id, count: config.builtin.jail_ids });
    if jail.is_some() && !nix::unistd::geteuid().is_root() {
        anyhow::bail!(
            "confining QEMU needs the daemon to run as root (or set qemu.jail = false in the config)"
        );
    }
    Ok(QemuHypervisor::new(QemuConfig {
        jail,
        allow_tcg: config.qemu.allow_tcg,
        qemu_binary: config.qemu.binary.clone(),
        vhost_vsock_binary: config.qemu.vhost_device_vsock.clone(),
        virtiofsd_binary: config.qemu.virtiofsd.clone(),
        accel,
        run_root: config.vms_dir(),
        ..QemuConfig::default()
    })?)
}

/// Connects the metrics read at scrape time to their sources and, when `[metrics]` enables
/// it, serves them.
async fn serve_metrics(
    config: &Config,
    manager: &Arc<sandbox::SandboxManager>,
    images: &images::Images,
) -> anyhow::Result<()> {
    let metrics = metrics::global();
    let vms = Arc::downgrade(manager);
    metrics.read_vms_running(move || vms.upgrade().map(|m| m.running_vms()).unwrap_or_default())?;
    metrics.read_image_pull_bytes(images.bytes_downloaded())?;
    if config.metrics.enabled {
        metrics::server::start(&config.metrics, metrics).await?;
    }
    Ok(())
}

/// The daemon's log on stderr: colour codes only for a terminal (journald and files get plain
/// text), or JSON lines.
fn init_logging(config: &Config) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match config.log_format {
        config::LogFormat::Text => builder.init(),
        config::LogFormat::Json => builder.json().init(),
    }
}

async fn daemon(args: DaemonArgs) -> anyhow::Result<()> {
    let config = load_config(&args)?;
    init_logging(&config);
    // Root-only: records hold env vars, the state dir pods' volumes and logs.
    for dir in [&config.root, &config.state] {
        store::create_private_dir(dir)?;
    }
    let config = Arc::new(config);
    for (what, path) in [("kernel", config.kernel_path()), ("initrd", config.initrd_path())] {
        if !path.exists() {
            warn!(path = %path.display(), "guest {what} not found: pods cannot start (run `make kernel guest`, or set vm.{what})");
        }
    }
    let (hypervisors, backend_reason, isolation_warning) = select_hypervisor(&config)?;
    // Held for the daemon's life: `podvisor images` then goes through images.sock.
    let root = config.root.clone();
    let _store_lock = tokio::task::spawn_blocking(move || images::control::lock_for_daemon(&root))
        .await
        .context("image store lock task")??;
    let image_store = images::open_store(&config)?;
    let manager = sandbox::SandboxManager::new(
        config.clone(),
        Arc::new(hypervisors),
        Arc::new(agent::GrpcDialer),
        image_store.resolver(),
    );
    manager.recover().await.context("recovering sandboxes")?;
    serve_metrics(&config, &manager, &image_store).await?;
    image_store.serve_control(&config)?;

    if let Some(dir) = config.listen.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::remove_file(&config.listen) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e)
                .with_context(|| format!("removing stale socket {}", config.listen.display()))
        }
        _ => {}
    }
    let listener = UnixListener::bind(&config.listen)
        .with_context(|| format!("listening on {}", config.listen.display()))?;
    info!(socket = %config.listen.display(), root = %config.root.display(), state = %config.state.display(), "podvisor serving CRI runtime.v1");

    let streaming = streaming::StreamingServer::start(&config.streaming, manager.clone()).await?;
    let runtime_service = cri::runtime::RuntimeServiceImpl::new(
        manager.clone(),
        streaming,
        backend_reason,
        isolation_warning,
    );
    let image_service = image_store.cri_service(Arc::new(manager.clone()));
    let shutdown = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
        // Pods keep running: their VMs are separate processes and the state is on disk.
        info!("shutting down; pod VMs keep running");
    };
    cri::serve(listener, runtime_service, image_service, manager, shutdown)
        .await
        .context("serving CRI")?;
    let _ = std::fs::remove_file(&config.listen);
    let _ = std::fs::remove_file(images::control::socket_path(&config.state));
    Ok(())
}
