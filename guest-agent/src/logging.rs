//! Agent logging. Logs go to a dedicated file descriptor (the guest's /dev/console, or a copy
//! of the host-mode agent's stderr), never to the process's own fd 2: libcontainer's child
//! processes log through their parent's subscriber and inherit its fds, and anything on fd 2
//! there would land in container output.

use std::fs::File;
use std::sync::Mutex;

use tracing_subscriber::EnvFilter;

/// Installs a subscriber that writes to `sink`. Only the first call in a process has effect.
pub fn init(sink: File) {
    let filter = EnvFilter::try_from_env("PODVISOR_AGENT_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,libcontainer=warn,libcgroups=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(Mutex::new(sink))
        .try_init();
    std::panic::set_hook(Box::new(|info| {
        tracing::error!("panic: {info}");
    }));
}
