//! SIGINT (Ctrl-C) and SIGTERM (what `kill`, schedulers and `docker stop` send): the first one
//! raises the stop flag the trainer polls between steps (the step in progress finishes and a
//! checkpoint is written); a second one exits at once.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use signal_hook::consts::{SIGINT, SIGTERM};

/// Raised by the first interrupt.
pub static STOP: AtomicBool = AtomicBool::new(false);

/// The signal that raised [`STOP`] (0 when none did).
static SIGNAL: AtomicI32 = AtomicI32::new(0);

/// Installs the handler (once per process), on a thread of its own.
pub fn install() {
    let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM]) else {
        tracing::warn!("could not install the SIGINT/SIGTERM handler; an interrupt will stop without a checkpoint");
        return;
    };
    std::thread::spawn(move || {
        for signal in signals.forever() {
            if STOP.swap(true, Ordering::SeqCst) {
                std::process::exit(status(signal));
            }
            SIGNAL.store(signal, Ordering::SeqCst);
            let name = if signal == SIGTERM { "terminated" } else { "interrupted" };
            eprintln!("\n{name}: finishing this step and writing a checkpoint (send it again to abort)");
        }
    });
}

/// The conventional exit status after the signal that stopped the run: 128 + its number
/// (130 for SIGINT, 143 for SIGTERM).
pub fn interrupted_status() -> i32 {
    match SIGNAL.load(Ordering::SeqCst) {
        0 => status(SIGINT),
        s => status(s),
    }
}

fn status(signal: i32) -> i32 {
    128 + signal
}
