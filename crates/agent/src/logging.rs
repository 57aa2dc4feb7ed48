//! Agent diagnostics go to the guest console (PID 1's stderr), which the host keeps as the
//! VM's console log and shows when a guest fails.

use std::sync::atomic::{AtomicBool, Ordering};

static DEBUG: AtomicBool = AtomicBool::new(false);

pub fn set_debug(on: bool) {
    DEBUG.store(on, Ordering::Relaxed);
}

pub fn debug_enabled() -> bool {
    DEBUG.load(Ordering::Relaxed)
}

#[macro_export]
macro_rules! agent_log {
    ($($arg:tt)*) => {
        eprintln!("supermachine-agent: {}", format_args!($($arg)*))
    };
}

#[macro_export]
macro_rules! agent_debug {
    ($($arg:tt)*) => {
        if $crate::logging::debug_enabled() {
            eprintln!("supermachine-agent: {}", format_args!($($arg)*))
        }
    };
}
