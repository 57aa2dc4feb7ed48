//! `stats`: the VM's host cost, read from the shim's cgroup (the container's, which the shim
//! and its VMM joined), in containerd's cgroup metrics types.

use containerd_shim::protos::cgroups::metrics as v1;
use containerd_shim::protos::cgroups_v2::metrics as v2;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::MessageFull;

fn read_u64(path: &std::path::Path) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn pack<M: MessageFull>(message: &M) -> Result<Any, String> {
    Ok(Any {
        type_url: M::descriptor().full_name().to_string(),
        value: message.write_to_bytes().map_err(|e| e.to_string())?,
        ..Default::default()
    })
}

/// Metrics of the cgroup `pid` is in.
pub fn metrics(pid: u32) -> Result<Any, String> {
    let unified = std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    if unified {
        metrics_v2(pid)
    } else {
        metrics_v1(pid)
    }
}

fn metrics_v1(pid: u32) -> Result<Any, String> {
    let mut metrics = v1::Metrics::new();
    for (hierarchy, dir) in container::cgroup::directories_of(pid) {
        if hierarchy.v2 {
            continue;
        }
        if hierarchy.has("memory") {
            let mut memory = v1::MemoryStat::new();
            let mut usage = v1::MemoryEntry::new();
            usage.usage = read_u64(&dir.join("memory.usage_in_bytes"));
            usage.limit = read_u64(&dir.join("memory.limit_in_bytes"));
            usage.max = read_u64(&dir.join("memory.max_usage_in_bytes"));
            usage.failcnt = read_u64(&dir.join("memory.failcnt"));
            memory.usage = Some(usage).into();
            let stat = std::fs::read_to_string(dir.join("memory.stat")).unwrap_or_default();
            for (key, value) in key_values(&stat) {
                match key {
                    "cache" => memory.cache = value,
                    "rss" => memory.rss = value,
                    "mapped_file" => memory.mapped_file = value,
                    "total_cache" => memory.total_cache = value,
                    "total_rss" => memory.total_rss = value,
                    "total_inactive_file" => memory.total_inactive_file = value,
                    "hierarchical_memory_limit" => memory.hierarchical_memory_limit = value,
                    _ => {}
                }
            }
            metrics.memory = Some(memory).into();
        }
        if hierarchy.has("cpuacct") {
            let mut usage = v1::CPUUsage::new();
            usage.total = read_u64(&dir.join("cpuacct.usage"));
            usage.per_cpu = std::fs::read_to_string(dir.join("cpuacct.usage_percpu"))
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect();
            let mut cpu = v1::CPUStat::new();
            cpu.usage = Some(usage).into();
            metrics.cpu = Some(cpu).into();
        }
        if hierarchy.has("pids") {
            let mut pids = v1::PidsStat::new();
            pids.current = read_u64(&dir.join("pids.current"));
            pids.limit = read_u64(&dir.join("pids.max"));
            metrics.pids = Some(pids).into();
        }
    }
    pack(&metrics)
}

/// The `key value` lines of a cgroup stat file whose value is a number.
fn key_values(stat: &str) -> impl Iterator<Item = (&str, u64)> {
    stat.lines().filter_map(|line| {
        let mut parts = line.split_whitespace();
        Some((parts.next()?, parts.next()?.parse().ok()?))
    })
}

fn metrics_v2(pid: u32) -> Result<Any, String> {
    // A pure cgroup v2 host: the few figures containerd shows.
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).map_err(|e| e.to_string())?;
    let relative = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or("no cgroup v2 entry")?
        .trim_start_matches('/');
    let dir = std::path::Path::new("/sys/fs/cgroup").join(relative);
    let mut metrics = v2::Metrics::new();
    let mut memory = v2::MemoryStat::new();
    memory.usage = read_u64(&dir.join("memory.current"));
    memory.usage_limit = read_u64(&dir.join("memory.max"));
    metrics.memory = Some(memory).into();
    let mut cpu = v2::CPUStat::new();
    if let Ok(stat) = std::fs::read_to_string(dir.join("cpu.stat")) {
        for (key, value) in key_values(&stat) {
            match key {
                "usage_usec" => cpu.usage_usec = value,
                "user_usec" => cpu.user_usec = value,
                "system_usec" => cpu.system_usec = value,
                _ => {}
            }
        }
    }
    metrics.cpu = Some(cpu).into();
    let mut pids = v2::PidsStat::new();
    pids.current = read_u64(&dir.join("pids.current"));
    metrics.pids = Some(pids).into();
    pack(&metrics)
}
