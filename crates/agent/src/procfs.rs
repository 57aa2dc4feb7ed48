//! The guest's processes, read from `/proc` (the container's, after setup: the guest has one
//! pid namespace).

use agent_proto::ProcessInfo;

const PF_KTHREAD: u64 = 0x0020_0000;

/// Every process but the agent and kernel threads. With a pid namespace `/proc` is the
/// container's, where the agent does not appear at all (and `/proc/self` does not resolve).
pub fn list_processes() -> Vec<ProcessInfo> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let agent: Option<i32> = std::fs::read_link("/proc/self")
        .ok()
        .and_then(|p| p.to_str()?.parse().ok());
    let mut list: Vec<ProcessInfo> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| Some(pid) != agent)
        .filter_map(read_process)
        .collect();
    list.sort_by_key(|p| p.pid);
    list
}

fn read_process(pid: i32) -> Option<ProcessInfo> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (comm, fields) = parse_stat(&stat)?;
    // Fields after the command, 0-based from field 3 (state) of proc(5).
    let state = fields.first()?.chars().next()?;
    let ppid = fields.get(1)?.parse().ok()?;
    let flags: u64 = fields.get(6)?.parse().ok()?;
    if flags & PF_KTHREAD != 0 {
        return None;
    }
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let uid = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0);
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let command = if cmdline.is_empty() {
        format!("[{comm}]")
    } else {
        String::from_utf8_lossy(&cmdline)
            .trim_end_matches('\0')
            .replace('\0', " ")
    };
    Some(ProcessInfo {
        pid,
        ppid,
        uid,
        state,
        cpu_ticks: utime + stime,
        command,
    })
}

/// Splits `/proc/PID/stat` into the command (which may hold spaces and parentheses) and the
/// fields after it.
fn parse_stat(stat: &str) -> Option<(String, Vec<&str>)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_string();
    let rest = stat.get(close + 1..)?;
    Some((comm, rest.split_whitespace().collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_spaces_and_parens_in_the_command_parses() {
        let stat = "42 (my (odd) proc) S 1 42 42 0 -1 4194560 1 0 0 0 7 3 0 0 20 0 1 0";
        let (comm, fields) = parse_stat(stat).unwrap();
        assert_eq!(comm, "my (odd) proc");
        assert_eq!(fields[0], "S");
        assert_eq!(fields[1], "1");
        assert_eq!(fields[11], "7");
    }

    #[test]
    fn own_process_is_listed_with_its_parent() {
        let me = std::process::id() as i32;
        let info = read_process(me).unwrap();
        assert_eq!(info.ppid, nix::unistd::getppid().as_raw());
        assert!(!info.command.is_empty());
    }
}
