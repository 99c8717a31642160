//! `podvisor-agent`: PID 1 of every Podvisor sandbox VM. It serves `podvisor.agent.v1.Agent`
//! (gRPC) on vsock port 1024 and runs OCI containers with youki's libcontainer.
//!
//! Modes:
//! - no arguments as PID 1: guest mode (leave the initramfs, mount, serve on vsock);
//! - `--listen unix:PATH [--shared-dir DIR] [--state-dir DIR]`: host mode, for tests;
//! - the same with `--pod-cgroup DIR` (and `--netns`, `--own-ipc`, `--share`,
//!   `--port-forward`): the agent of a `host`-handler pod on the host (see `host_pod`);
//! - `__libcontainer REQUEST`: the internal single-threaded libcontainer helper.
//! - `__pause`: starts the PID 1 of the pod's shared PID namespace (see `pause`).

use podvisor_agent::{helper, host_pod, init, logging, pause, portforward};
use std::ffi::OsString;
use std::fs::{self, File};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use podvisor_proto::agent::agent_server::AgentServer;

use podvisor_agent::container::{Agent, Paths};
use podvisor_agent::reaper::Reaper;
use podvisor_agent::server::AgentService;

/// Host mode: serve the agent protocol on a unix socket (tests, development).
#[derive(Debug, Parser)]
#[command(name = "podvisor-agent", version)]
struct HostArgs {
    /// Where to listen: `unix:/path/to/agent.sock`.
    #[arg(long)]
    listen: String,
    /// The directory rootfs lower dirs are relative to (default: STATE_DIR/shared).
    #[arg(long)]
    shared_dir: Option<PathBuf>,
    /// Where containers, sandbox files and libcontainer state live.
    #[arg(long, default_value = "/run/podvisor-agent")]
    state_dir: PathBuf,
    /// Serve port-forward connections on `unix:/path` (the guest serves them on vsock).
    #[arg(long)]
    port_forward: Option<String>,
    #[command(flatten)]
    host_pod: host_pod::HostPodArgs,
}

#[derive(Debug, thiserror::Error)]
enum MainError {
    #[error("--listen must be unix:PATH, got {0:?}")]
    BadListen(String),
    #[error("creating {0}: {1}")]
    CreateDir(PathBuf, std::io::Error),
    #[error("binding {0}: {1}")]
    Bind(String, std::io::Error),
    #[error("becoming a child subreaper: {0}")]
    Subreaper(nix::Error),
    #[error("starting the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("installing the SIGCHLD handler: {0}")]
    Reaper(std::io::Error),
    #[error("installing a signal handler: {0}")]
    Signal(std::io::Error),
    #[error("serving: {0}")]
    Serve(tonic::transport::Error),
    #[error("duplicating the log descriptor: {0}")]
    LogFd(std::io::Error),
    #[error("host pod: {0}")]
    HostPod(#[from] host_pod::HostPodError),
}

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == helper::HELPER_SUBCOMMAND) {
        return helper::main(&args[2..]);
    }
    if args.get(1).is_some_and(|a| a == pause::PAUSE_SUBCOMMAND) {
        return pause::main(&args[2..]);
    }
    if nix::unistd::getpid().as_raw() == 1 && args.len() == 1 {
        return guest_main();
    }
    match host_main(HostArgs::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("podvisor-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, MainError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(MainError::Runtime)
}

fn create_dir(path: &std::path::Path) -> Result<(), MainError> {
    fs::create_dir_all(path).map_err(|e| MainError::CreateDir(path.to_path_buf(), e))
}

/// The path of a `unix:PATH` argument.
fn unix_path(arg: &str) -> Result<PathBuf, MainError> {
    arg.strip_prefix("unix:").map(PathBuf::from).ok_or_else(|| MainError::BadListen(arg.into()))
}

/// Binds a unix socket (replacing a stale one), still outside any runtime.
fn bind_unix(path: &std::path::Path) -> Result<std::os::unix::net::UnixListener, MainError> {
    let _ = fs::remove_file(path);
    let bind_err = |e| MainError::Bind(path.display().to_string(), e);
    let listener = std::os::unix::net::UnixListener::bind(path).map_err(bind_err)?;
    listener.set_nonblocking(true).map_err(bind_err)?;
    Ok(listener)
}

fn host_main(args: HostArgs) -> Result<(), MainError> {
    let socket_path = unix_path(&args.listen)?;
    // Bound first: a host pod's agent covers /run (where the daemon's sockets are) next.
    let listener = bind_unix(&socket_path)?;
    let port_forward = args.port_forward.as_deref().map(unix_path).transpose()?;
    let port_forward = port_forward.as_deref().map(bind_unix).transpose()?;
    let host_pod = match &args.host_pod.pod_cgroup {
        Some(cgroup) => Some(host_pod::enter(cgroup, &args.host_pod)?),
        None => None,
    };
    // Orphaned container processes must be re-parented to the agent, which reaps them.
    nix::sys::prctl::set_child_subreaper(true).map_err(MainError::Subreaper)?;
    let log = File::from(std::io::stderr().as_fd_owned().map_err(MainError::LogFd)?);
    logging::init(log.try_clone().map_err(MainError::LogFd)?);
    let paths = if host_pod.is_some() {
        // The guest's layout, in the pod's own mount namespace.
        Paths {
            shared_dir: PathBuf::from(podvisor_proto::GUEST_SHARED_DIR),
            run_dir: PathBuf::from(host_pod::RUN_DIR),
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
        }
    } else {
        Paths {
            shared_dir: args.shared_dir.clone().unwrap_or_else(|| args.state_dir.join("shared")),
            run_dir: args.state_dir.clone(),
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
        }
    };
    create_dir(&paths.containers_dir())?;
    create_dir(&paths.shared_dir)?;
    runtime()?.block_on(async move {
        let reaper = Reaper::default();
        reaper.spawn().map_err(MainError::Reaper)?;
        let mut agent = Agent::new(paths, false, reaper, log);
        if let Some(host_pod) = host_pod {
            agent = agent.with_host_pod(host_pod);
        }
        let agent = Arc::new(agent);
        spawn_termination_handler(agent.clone())?;
        let bind_err = |e| MainError::Bind(args.listen.clone(), e);
        let listener = tokio::net::UnixListener::from_std(listener).map_err(bind_err)?;
        if let Some(port_forward) = port_forward {
            let pf_err = |e| MainError::Bind(args.port_forward.clone().unwrap_or_default(), e);
            portforward::spawn_unix(
                tokio::net::UnixListener::from_std(port_forward).map_err(pf_err)?,
            );
        }
        tracing::info!(socket = %socket_path.display(), "podvisor-agent serving (host mode)");
        tonic::transport::Server::builder()
            // As in the guest: a daemon killed mid-stream must not keep an output reader.
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            .add_service(AgentServer::new(AgentService::new(agent)))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
            .await
            .map_err(MainError::Serve)
    })
}

/// Host mode: SIGTERM or SIGINT removes every container, then exits.
fn spawn_termination_handler(agent: Arc<Agent>) -> Result<(), MainError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(MainError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(MainError::Signal)?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("terminating: removing all containers");
        agent.remove_all().await;
        std::process::exit(0);
    });
    Ok(())
}

trait AsFdOwned {
    fn as_fd_owned(&self) -> std::io::Result<std::os::fd::OwnedFd>;
}

impl AsFdOwned for std::io::Stderr {
    fn as_fd_owned(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        std::os::fd::AsFd::as_fd(self).try_clone_to_owned()
    }
}

fn guest_main() -> ExitCode {
    let switch_error = (!init::root_switched()).then(init::switch_root);
    let mut errors = init::mount_kernel_filesystems();
    if let Err(e) = init::raise_open_files_limit() {
        errors.push(e);
    }
    if let Err(e) = init::detach_stdio() {
        errors.push(e);
    }
    let console = match init::open_console() {
        Ok(c) => c,
        Err(e) => {
            errors.push(e);
            match File::options().write(true).open("/dev/null") {
                Ok(f) => f,
                Err(_) => return ExitCode::FAILURE,
            }
        }
    };
    let Ok(log) = console.try_clone() else {
        return ExitCode::FAILURE;
    };
    logging::init(console);
    if let Some(e) = switch_error {
        tracing::error!("staying on the initramfs root (containers will fail to pivot): {e}");
    }
    errors.extend(init::enable_cgroup_controllers(std::path::Path::new("/sys/fs/cgroup")));
    if let Err(e) = init::loopback_up() {
        errors.push(e);
    }
    for e in errors {
        tracing::warn!("init: {e}");
    }
    let paths = Paths {
        run_dir: PathBuf::from("/run/podvisor"),
        shared_dir: PathBuf::from(podvisor_proto::GUEST_SHARED_DIR),
        cgroup_root: PathBuf::from("/sys/fs/cgroup"),
    };
    let result = create_dir(&paths.containers_dir())
        .and_then(|()| create_dir(&paths.shared_dir))
        .and_then(|()| runtime())
        .and_then(|rt| rt.block_on(serve_guest(paths, log)));
    if let Err(e) = result {
        tracing::error!("agent failed: {e}; powering off");
    }
    nix::unistd::sync();
    std::thread::sleep(Duration::from_millis(200));
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    ExitCode::FAILURE
}

/// Tells the host the agent listens, by connecting to host port
/// [`podvisor_proto::AGENT_READY_VSOCK_PORT`]: the host dials the agent only after that, so it
/// never connects while the guest's vsock device is still being set up.
async fn announce_ready() {
    use tokio::io::AsyncWriteExt;
    let host =
        tokio_vsock::VsockAddr::new(libc::VMADDR_CID_HOST, podvisor_proto::AGENT_READY_VSOCK_PORT);
    let mut last_error = None;
    // The host binds its end before the VM starts; retries only cover a transient failure.
    for _ in 0..20 {
        match tokio_vsock::VsockStream::connect(host).await {
            Ok(mut stream) => {
                match stream.write_all(podvisor_proto::AGENT_READY_LINE.as_bytes()).await {
                    Ok(()) => {
                        let _ = stream.shutdown(std::net::Shutdown::Write);
                        return;
                    }
                    Err(e) => last_error = Some(e),
                }
            }
            Err(e) => last_error = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if let Some(e) = last_error {
        tracing::warn!("could not tell the host the agent is ready: {e}");
    }
}

async fn serve_guest(paths: Paths, log: File) -> Result<(), MainError> {
    let reaper = Reaper::default();
    reaper.spawn().map_err(MainError::Reaper)?;
    let agent = Arc::new(Agent::new(paths, true, reaper, log));
    let addr = tokio_vsock::VsockAddr::new(libc::VMADDR_CID_ANY, podvisor_proto::AGENT_VSOCK_PORT);
    let listener = tokio_vsock::VsockListener::bind(addr).map_err(|e| {
        MainError::Bind(format!("vsock port {}", podvisor_proto::AGENT_VSOCK_PORT), e)
    })?;
    tracing::info!(port = podvisor_proto::AGENT_VSOCK_PORT, "podvisor-agent serving on vsock");
    // Without it the pod still runs; only port-forward is lost.
    if let Err(e) = portforward::spawn() {
        tracing::warn!(error = %e, "port-forward is unavailable");
    }
    tokio::spawn(announce_ready());
    tonic::transport::Server::builder()
        // A host connection that died without a goodbye (its daemon was killed) must not keep
        // holding a process's single output reader: keepalive pings find and drop it.
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(AgentServer::new(AgentService::new(agent)))
        .serve_with_incoming(listener.incoming())
        .await
        .map_err(MainError::Serve)
}
