//! Progress of long work (training steps, generations, evaluation): a bar on a terminal, a
//! plain line at intervals when stderr is a file or a pipe (so `nohup` and batch-scheduler
//! logs show progress while the work runs), and nothing at all unless the program turned it
//! on with [`enable`] — the library itself is silent.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Shortest interval between two progress lines when stderr is not a terminal.
const LINE_INTERVAL: Duration = Duration::from_secs(30);

/// Turns progress reporting on for the rest of the process (the `minillm` binary does).
pub fn enable() {
    ENABLED.store(true, Ordering::SeqCst);
}

/// Prints a one-line note about the work (e.g. "resuming from step N") when progress reporting
/// is on.
pub fn note(message: &str) {
    if ENABLED.load(Ordering::SeqCst) {
        eprintln!("{message}");
    }
}

/// A counter of `len` units of work with a label and a status message.
pub struct Progress {
    label: String,
    len: u64,
    bar: Option<indicatif::ProgressBar>,
    lines: Option<Mutex<Lines>>,
}

struct Lines {
    pos: u64,
    message: String,
    last: Instant,
    printed_pos: Option<u64>,
}

impl Progress {
    /// A counter labelled `label` over `len` units, starting at 0.
    pub fn new(label: &str, len: u64) -> Self {
        let (mut bar, mut lines) = (None, None);
        if ENABLED.load(Ordering::SeqCst) {
            if std::io::stderr().is_terminal() {
                let style = indicatif::ProgressStyle::with_template(
                    "{prefix} {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
                let b = indicatif::ProgressBar::new(len).with_style(style).with_prefix(label.to_string());
                bar = Some(b);
            } else {
                let state = Lines { pos: 0, message: String::new(), last: Instant::now(), printed_pos: None };
                lines = Some(Mutex::new(state));
            }
        }
        Self { label: label.to_string(), len, bar, lines }
    }

    /// Moves the counter to `pos` (e.g. after resuming).
    pub fn set_position(&self, pos: u64) {
        if let Some(b) = &self.bar {
            b.set_position(pos);
        }
        self.update(|l| l.pos = pos);
    }

    /// Advances the counter by `n`.
    pub fn inc(&self, n: u64) {
        if let Some(b) = &self.bar {
            b.inc(n);
        }
        self.update(|l| l.pos += n);
    }

    /// Sets the status message shown beside the counter.
    pub fn set_message(&self, message: String) {
        if let Some(b) = &self.bar {
            b.set_message(message.clone());
        }
        self.update(|l| l.message = message);
    }

    /// Removes the bar (prints a final line in line mode).
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
        if let Some(lines) = &self.lines {
            if let Ok(mut l) = lines.lock() {
                if l.printed_pos != Some(l.pos) {
                    self.print(&mut l);
                }
            }
        }
    }

    fn update(&self, f: impl FnOnce(&mut Lines)) {
        let Some(lines) = &self.lines else { return };
        let Ok(mut l) = lines.lock() else { return };
        f(&mut l);
        if l.printed_pos.is_none() || l.last.elapsed() >= LINE_INTERVAL {
            self.print(&mut l);
        }
    }

    fn print(&self, l: &mut Lines) {
        eprintln!("{}: {}/{} {}", self.label, l.pos, self.len, l.message.trim_end());
        l.last = Instant::now();
        l.printed_pos = Some(l.pos);
    }
}
