//! Host process identity: a pid plus its start time, so that a recycled pid is never
//! mistaken for the monitor that once had it.

use std::time::{Duration, Instant};

/// The start time (clock ticks after boot) of `pid`, field 22 of `/proc/PID/stat`.
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_comm = stat.get(stat.rfind(')')? + 1..)?;
    // Field 3 (state) is the first after the command; start time is field 22.
    let field = after_comm.split_whitespace().nth(22 - 3)?;
    field.parse().ok()
}

/// Whether `pid` is alive, not a zombie, and is the process that started at `started`.
pub fn is_alive(pid: i32, started: Option<u64>) -> bool {
    if pid <= 0 {
        return false;
    }
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let zombie = stat
        .rfind(')')
        .and_then(|i| stat.get(i + 1..))
        .and_then(|s| s.split_whitespace().next())
        .is_some_and(|state| state == "Z" || state == "X");
    if zombie {
        return false;
    }
    match started {
        Some(expected) => start_time(pid) == Some(expected),
        None => true,
    }
}

/// Waits until `pid` is gone (or a zombie); false on timeout.
pub fn wait_gone(pid: i32, started: Option<u64>, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while is_alive(pid, started) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_alive_with_its_start_time_and_not_with_another() {
        let me = std::process::id() as i32;
        let started = start_time(me).unwrap();
        assert!(is_alive(me, Some(started)));
        assert!(!is_alive(me, Some(started + 1)));
        assert!(!is_alive(-1, None));
    }

    #[test]
    fn exited_child_is_not_alive() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        child.wait().unwrap();
        assert!(wait_gone(pid, None, Duration::from_secs(1)));
    }
}
