//! Agent logging. Logs go to a dedicated file descriptor (the guest's /dev/console, or a copy
//! of the host-mode agent's stderr), never to the process's own fd 2: libcontainer's child
//! processes log through their parent's subscriber and inherit its fds, and anything on fd 2
//! there would land in container output.
//!
//! Writes never fail and take no lock: a log sink that went away (a closed pipe) must not make
//! tracing report the error on stderr (which panics when stderr is gone too), and a panic hook
//! that logs must not wait for a lock the panicking thread holds.

use std::fs::File;
use std::io::Write;
use std::sync::OnceLock;

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

/// Where panics are reported, outside tracing.
static PANIC_SINK: OnceLock<File> = OnceLock::new();

/// The sink; each event is one `write_all` on the shared file.
struct LogSink(File);

/// Writes to the sink, ignoring errors (there is nowhere to report them).
struct SinkWriter<'a>(&'a File);

impl Write for SinkWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = (&mut &*self.0).write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for LogSink {
    type Writer = SinkWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        SinkWriter(&self.0)
    }
}

/// Installs a subscriber that writes to `sink`. Only the first call in a process has effect.
pub fn init(sink: File) {
    if let Ok(copy) = sink.try_clone() {
        let _ = PANIC_SINK.set(copy);
    }
    let filter = EnvFilter::try_from_env("PODVISOR_AGENT_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,libcontainer=warn,libcgroups=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(LogSink(sink))
        .try_init();
    std::panic::set_hook(Box::new(|info| {
        if let Some(mut sink) = PANIC_SINK.get() {
            let _ = writeln!(sink, "podvisor-agent panic: {info}");
        }
    }));
}
