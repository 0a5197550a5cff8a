//! SIGINT (Ctrl-C): the first one raises the stop flag the trainer polls between steps (the
//! step in progress finishes and a checkpoint is written); a second one exits at once.

use std::sync::atomic::{AtomicBool, Ordering};

/// Raised by the first interrupt.
pub static STOP: AtomicBool = AtomicBool::new(false);

/// The conventional exit status after SIGINT.
pub const INTERRUPTED_STATUS: i32 = 130;

/// Installs the handler (once per process).
pub fn install() {
    let _ = ctrlc::set_handler(|| {
        if STOP.swap(true, Ordering::SeqCst) {
            std::process::exit(INTERRUPTED_STATUS);
        }
        eprintln!("\ninterrupted: finishing this step and writing a checkpoint (Ctrl-C again to abort)");
    });
}
