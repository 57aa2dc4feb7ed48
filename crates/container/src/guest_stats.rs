//! The container's usage as its cgroup in the guest counts it: the agent sends the cgroup v2
//! files as they are ([`agent_proto::Reply::Stats`]); this parses them once for both front
//! doors, which render them as runc's `events --stats` JSON or containerd's metrics.

use std::collections::BTreeMap;

use serde_json::{json, Value};

/// One block device's IO counters (`io.stat`), as the guest numbers its disks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IoDevice {
    pub major: u64,
    pub minor: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub read_ios: u64,
    pub write_ios: u64,
}

/// The parsed files; a value the guest did not give is 0 (limits: `None` for `max`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestStats {
    pub memory_usage: u64,
    pub memory_limit: Option<u64>,
    pub swap_usage: u64,
    /// `memory.stat`, every key.
    pub memory_stat: BTreeMap<String, u64>,
    /// `memory.events`, every key (`low`, `high`, `max`, `oom`, `oom_kill`).
    pub memory_events: BTreeMap<String, u64>,
    /// `cpu.stat`, every key (`usage_usec`, `user_usec`, `system_usec`, `nr_periods`, …).
    pub cpu_stat: BTreeMap<String, u64>,
    pub pids_current: u64,
    pub pids_limit: Option<u64>,
    pub io: Vec<IoDevice>,
}

impl GuestStats {
    pub fn parse(files: &BTreeMap<String, String>) -> Self {
        let file = |name: &str| files.get(name).map(String::as_str).unwrap_or("");
        let single = |name: &str| file(name).trim().parse::<u64>().unwrap_or(0);
        let limit = |name: &str| match file(name).trim() {
            "" | "max" => None,
            value => value.parse::<u64>().ok(),
        };
        GuestStats {
            memory_usage: single("memory.current"),
            memory_limit: limit("memory.max"),
            swap_usage: single("memory.swap.current"),
            memory_stat: flat_keyed(file("memory.stat")),
            memory_events: flat_keyed(file("memory.events")),
            cpu_stat: flat_keyed(file("cpu.stat")),
            pids_current: single("pids.current"),
            pids_limit: limit("pids.max"),
            io: io_stat(file("io.stat")),
        }
    }

    fn cpu_nanos(&self, key: &str) -> u64 {
        self.cpu_stat.get(key).copied().unwrap_or(0) * 1000
    }

    /// The stats as runc's `events --stats` prints them (`data` of a `stats` event), filled
    /// as runc fills them from a cgroup v2: nanoseconds of CPU, `cache` from the file
    /// pages, swap usage counting memory as cgroup v1's memsw did, `failcnt` from the
    /// times the limit was hit.
    pub fn runc_json(&self) -> Value {
        // runc's "no limit" value: the page-aligned largest i64.
        const UNLIMITED: u64 = 9_223_372_036_854_771_712;
        let memory_limit = self.memory_limit.unwrap_or(UNLIMITED);
        let failcnt = self.memory_events.get("max").copied().unwrap_or(0);
        let entry = |d: &IoDevice, op: &str, value: u64| json!({"major": d.major, "minor": d.minor, "op": op, "value": value});
        let bytes: Vec<Value> = self
            .io
            .iter()
            .flat_map(|d| {
                [
                    entry(d, "Read", d.read_bytes),
                    entry(d, "Write", d.write_bytes),
                ]
            })
            .collect();
        let ios: Vec<Value> = self
            .io
            .iter()
            .flat_map(|d| [entry(d, "Read", d.read_ios), entry(d, "Write", d.write_ios)])
            .collect();
        let mut blkio = serde_json::Map::new();
        if !bytes.is_empty() {
            blkio.insert("ioServiceBytesRecursive".into(), Value::Array(bytes));
            blkio.insert("ioServicedRecursive".into(), Value::Array(ios));
        }
        json!({
            "cpu": {
                "usage": {
                    "total": self.cpu_nanos("usage_usec"),
                    "kernel": self.cpu_nanos("system_usec"),
                    "user": self.cpu_nanos("user_usec"),
                },
                "throttling": {
                    "periods": self.cpu_stat.get("nr_periods").copied().unwrap_or(0),
                    "throttledPeriods": self.cpu_stat.get("nr_throttled").copied().unwrap_or(0),
                    "throttledTime": self.cpu_nanos("throttled_usec"),
                },
            },
            "memory": {
                "cache": self.memory_stat.get("file").copied().unwrap_or(0),
                "usage": {
                    "limit": memory_limit,
                    "usage": self.memory_usage,
                    "failcnt": failcnt,
                },
                "swap": {
                    "limit": UNLIMITED,
                    "usage": self.memory_usage + self.swap_usage,
                    "failcnt": 0,
                },
                "kernel": {"limit": 0, "failcnt": 0},
                "kernelTCP": {"limit": 0, "failcnt": 0},
                "raw": self.memory_stat,
            },
            "pids": {
                "current": self.pids_current,
                "limit": self.pids_limit.unwrap_or(0),
            },
            "blkio": blkio,
            "hugetlb": {},
            "intel_rdt": {},
            "network_interfaces": null,
        })
    }
}

/// `key value` lines (`memory.stat`, `cpu.stat`, `memory.events`).
fn flat_keyed(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|line| {
            let (key, value) = line.split_once(' ')?;
            Some((key.to_string(), value.trim().parse().ok()?))
        })
        .collect()
}

/// `MAJ:MIN rbytes=… wbytes=… rios=… wios=… …` lines.
fn io_stat(text: &str) -> Vec<IoDevice> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (major, minor) = fields.next()?.split_once(':')?;
            let mut device = IoDevice {
                major: major.parse().ok()?,
                minor: minor.parse().ok()?,
                ..IoDevice::default()
            };
            for field in fields {
                let Some((key, value)) = field.split_once('=') else {
                    continue;
                };
                let value = value.parse().unwrap_or(0);
                match key {
                    "rbytes" => device.read_bytes = value,
                    "wbytes" => device.write_bytes = value,
                    "rios" => device.read_ios = value,
                    "wios" => device.write_ios = value,
                    _ => {}
                }
            }
            Some(device)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files() -> BTreeMap<String, String> {
        [
            ("memory.current", "5242880\n"),
            ("memory.max", "67108864\n"),
            ("memory.swap.current", "0\n"),
            ("memory.stat", "anon 4194304\nfile 1048576\nkernel 262144\n"),
            (
                "memory.events",
                "low 0\nhigh 0\nmax 7\noom 1\noom_kill 1\noom_group_kill 0\n",
            ),
            (
                "cpu.stat",
                "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 4\nnr_throttled 2\nthrottled_usec 30\n",
            ),
            ("pids.current", "3\n"),
            ("pids.max", "max\n"),
            ("io.stat", "254:0 rbytes=4096 wbytes=8192 rios=1 wios=2 dbytes=0 dios=0\n"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    #[test]
    fn cgroup_v2_files_parse_into_usage_and_limits() {
        let stats = GuestStats::parse(&files());
        assert_eq!(stats.memory_usage, 5 << 20);
        assert_eq!(stats.memory_limit, Some(64 << 20));
        assert_eq!(stats.pids_limit, None, "max is no limit");
        assert_eq!(stats.memory_events.get("oom_kill"), Some(&1));
        assert_eq!(
            stats.io,
            vec![IoDevice {
                major: 254,
                minor: 0,
                read_bytes: 4096,
                write_bytes: 8192,
                read_ios: 1,
                write_ios: 2
            }]
        );
    }

    #[test]
    fn runc_json_has_runcs_keys_and_units() {
        let json = GuestStats::parse(&files()).runc_json();
        assert_eq!(json["memory"]["usage"]["usage"], 5 << 20);
        assert_eq!(json["memory"]["usage"]["limit"], 64 << 20);
        assert_eq!(json["memory"]["usage"]["failcnt"], 7);
        assert_eq!(json["memory"]["cache"], 1 << 20);
        assert_eq!(json["memory"]["raw"]["anon"], 4 << 20);
        assert_eq!(json["cpu"]["usage"]["total"], 1_500_000, "nanoseconds");
        assert_eq!(json["cpu"]["usage"]["kernel"], 500_000);
        assert_eq!(json["cpu"]["throttling"]["throttledPeriods"], 2);
        assert_eq!(json["pids"]["current"], 3);
        assert_eq!(json["pids"]["limit"], 0);
        assert_eq!(json["blkio"]["ioServiceBytesRecursive"][1]["op"], "Write");
        assert_eq!(json["blkio"]["ioServiceBytesRecursive"][1]["value"], 8192);
    }

    #[test]
    fn missing_files_leave_zeroes_and_no_limits() {
        let stats = GuestStats::parse(&BTreeMap::new());
        assert_eq!(stats, GuestStats::default());
    }
}
