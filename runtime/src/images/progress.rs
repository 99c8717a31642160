//! What `podvisor images import|export` shows while it works: a progress bar when stderr is a
//! terminal, plain lines otherwise (a log file or a CI job gets no escape codes).

use std::io::{IsTerminal, Write};
use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressStyle};

use super::control::Progress;

/// Where progress goes.
pub enum Display {
    Bar(Bar),
    Lines(Mutex<Lines<Box<dyn Write + Send>>>),
}

impl Display {
    /// A bar on a terminal, else plain lines, on stderr.
    pub fn for_stderr() -> Self {
        if std::io::stderr().is_terminal() {
            Self::Bar(Bar::new())
        } else {
            Self::Lines(Mutex::new(Lines::new(Box::new(std::io::stderr()))))
        }
    }

    pub fn show(&self, progress: &Progress) {
        match self {
            Self::Bar(bar) => bar.show(progress),
            Self::Lines(lines) => lines.lock().unwrap_or_else(|p| p.into_inner()).show(progress),
        }
    }

    /// Clears the bar (the result lines follow).
    pub fn finish(&self) {
        if let Self::Bar(bar) = self {
            bar.bar.finish_and_clear();
        }
    }
}

/// The `(item, step)` a progress report is about.
fn key(progress: &Progress) -> (String, String) {
    (progress.item.clone(), progress.step.clone())
}

/// indicatif's bar, restyled at each step: bytes when the step has a size, a spinner when not.
pub struct Bar {
    bar: ProgressBar,
    step: Mutex<Option<(String, String)>>,
}

impl Bar {
    fn new() -> Self {
        Self { bar: ProgressBar::new(0), step: Mutex::new(None) }
    }

    fn show(&self, progress: &Progress) {
        let mut step = self.step.lock().unwrap_or_else(|p| p.into_inner());
        if step.as_ref() != Some(&key(progress)) {
            *step = Some(key(progress));
            let template = if progress.total > 0 {
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}"
            } else {
                "{spinner} {msg} {elapsed}"
            };
            if let Ok(style) = ProgressStyle::with_template(template) {
                self.bar.set_style(style.progress_chars("=> "));
            }
            self.bar.reset();
            self.bar.set_message(format!("{}: {}", progress.item, progress.step));
            self.bar.set_length(progress.total);
            if progress.total == 0 {
                self.bar.enable_steady_tick(std::time::Duration::from_millis(120));
            } else {
                self.bar.disable_steady_tick();
            }
        }
        self.bar.set_position(progress.done);
    }
}

/// Plain lines: one when a step starts, then at each quarter of it, then when it ends.
pub struct Lines<W: Write> {
    out: W,
    step: Option<(String, String)>,
    /// The last quarter printed (0..=4) of the current step.
    quarter: u64,
}

impl<W: Write> Lines<W> {
    pub fn new(out: W) -> Self {
        Self { out, step: None, quarter: 0 }
    }

    pub fn show(&mut self, progress: &Progress) {
        let new_step = self.step.as_ref() != Some(&key(progress));
        let quarter =
            (progress.done.saturating_mul(4)).checked_div(progress.total).unwrap_or(0).min(4);
        if !new_step && quarter <= self.quarter {
            return;
        }
        if new_step {
            self.step = Some(key(progress));
        }
        self.quarter = quarter;
        let line = if progress.total == 0 {
            format!("{}: {}", progress.item, progress.step)
        } else {
            format!(
                "{}: {} {} of {} ({}%)",
                progress.item,
                progress.step,
                mib(progress.done),
                mib(progress.total),
                progress.done.saturating_mul(100) / progress.total
            )
        };
        // Progress is best effort: a closed stderr must not fail the import.
        let _ = writeln!(self.out, "{line}");
    }

    #[cfg(test)]
    fn into_inner(self) -> W {
        self.out
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(item: &str, step: &str, done: u64, total: u64) -> Progress {
        Progress { item: item.into(), step: step.into(), done, total }
    }

    #[test]
    fn plain_lines_mark_each_step_and_its_quarters_without_escape_codes() {
        let mut lines = Lines::new(Vec::new());
        let mib = 1 << 20;
        for report in [
            progress("/a.tar", "extract", 0, 8 * mib),
            progress("/a.tar", "extract", mib, 8 * mib),
            progress("/a.tar", "extract", 2 * mib, 8 * mib),
            progress("/a.tar", "extract", 3 * mib, 8 * mib),
            progress("/a.tar", "extract", 8 * mib, 8 * mib),
            progress("/a.tar", "copy", 0, 4 * mib),
            progress("/a.tar", "copy", 4 * mib, 4 * mib),
            progress("/a.tar", "unpack", 0, 0),
            progress("/a.tar", "unpack", 0, 0),
            progress("/b.tar", "unpack", 0, 0),
        ] {
            lines.show(&report);
        }
        let text = String::from_utf8(lines.into_inner()).unwrap();
        assert_eq!(
            text,
            "/a.tar: extract 0.0 MiB of 8.0 MiB (0%)\n\
             /a.tar: extract 2.0 MiB of 8.0 MiB (25%)\n\
             /a.tar: extract 8.0 MiB of 8.0 MiB (100%)\n\
             /a.tar: copy 0.0 MiB of 4.0 MiB (0%)\n\
             /a.tar: copy 4.0 MiB of 4.0 MiB (100%)\n\
             /a.tar: unpack\n\
             /b.tar: unpack\n"
        );
        assert!(!text.contains('\x1b'));
    }
}
