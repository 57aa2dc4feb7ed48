//! Host processes: their identity (a pid plus its start time, so that a recycled pid is
//! never mistaken for the monitor that once had it), their descendants, and what they cost.

use std::time::{Duration, Instant};

/// Numeric fields of `/proc/PID/stat`, by their 1-based numbers in proc(5).
fn stat_fields<const N: usize>(pid: i32, numbers: [usize; N]) -> Option<[u64; N]> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command (field 2) may hold spaces and parentheses: fields resume after its last
    // `)`, with field 3 (state).
    let fields: Vec<&str> = stat
        .get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .collect();
    let mut values = [0; N];
    for (value, number) in values.iter_mut().zip(numbers) {
        *value = fields.get(number.checked_sub(3)?)?.parse().ok()?;
    }
    Some(values)
}

/// The start time (clock ticks after boot) of `pid`, field 22 of `/proc/PID/stat`.
pub fn start_time(pid: i32) -> Option<u64> {
    stat_fields(pid, [22]).map(|[ticks]| ticks)
}

/// The CPU time `pid` has used so far, user and system (fields 14 and 15).
pub fn cpu_time(pid: i32) -> Option<Duration> {
    let [user, system] = stat_fields(pid, [14, 15])?;
    // SAFETY: sysconf only reads a system constant.
    let ticks_per_second = match unsafe { libc::sysconf(libc::_SC_CLK_TCK) } {
        hz if hz > 0 => hz as u64,
        _ => 100,
    };
    Some(Duration::from_millis(
        (user + system) * 1000 / ticks_per_second,
    ))
}

/// The parent of `pid` (field 4).
fn parent(pid: i32) -> Option<i32> {
    stat_fields(pid, [4]).map(|[ppid]| ppid as i32)
}

/// Every process and its parent, from one pass over `/proc`, in pid order.
fn parents() -> Vec<(i32, i32)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut parents: Vec<(i32, i32)> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| Some((pid, parent(pid)?)))
        .collect();
    parents.sort();
    parents
}

/// `pid` and every process below it (one pass over `/proc`).
pub fn tree(pid: i32) -> Vec<i32> {
    let parents = parents();
    let mut pids = vec![pid];
    let mut next = 0;
    while let Some(&parent) = pids.get(next) {
        pids.extend(
            parents
                .iter()
                .filter_map(|&(child, p)| (p == parent).then_some(child)),
        );
        next += 1;
    }
    pids
}

/// The resident memory of `pid` in bytes (`VmRSS`); `None` once it is gone.
pub fn resident_bytes(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
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
    fn a_child_is_in_its_parents_tree_with_its_memory() {
        let mut child = std::process::Command::new("sleep")
            .arg("10")
            .spawn()
            .unwrap();
        let me = std::process::id() as i32;
        let pid = child.id() as i32;
        let tree = tree(me);
        assert_eq!(tree[0], me);
        assert!(tree.contains(&pid));
        assert!(resident_bytes(pid).is_some_and(|bytes| bytes > 0));
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(resident_bytes(pid), None);
    }

    #[test]
    fn own_process_is_alive_with_its_start_time_and_not_with_another() {
        let me = std::process::id() as i32;
        let started = start_time(me).unwrap();
        assert!(is_alive(me, Some(started)));
        assert!(!is_alive(me, Some(started + 1)));
        assert!(!is_alive(-1, None));
    }

    #[test]
    fn cpu_time_grows_with_work_and_is_none_for_no_process() {
        let me = std::process::id() as i32;
        let before = cpu_time(me).unwrap();
        let spin = Instant::now();
        let mut x = 0u64;
        while spin.elapsed() < Duration::from_millis(100) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        assert!(cpu_time(me).unwrap() > before);
        assert_eq!(cpu_time(-1), None);
    }

    #[test]
    fn exited_child_is_not_alive() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        child.wait().unwrap();
        assert!(wait_gone(pid, None, Duration::from_secs(1)));
    }
}
