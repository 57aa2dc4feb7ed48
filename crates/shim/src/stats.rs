//! `stats`: the container's usage as its cgroup in the guest counts it (the agent reads the
//! cgroup v2 files, [`container::guest_stats`] parses them), as containerd's cgroup v2
//! metrics: the guest's cgroup is a v2 one whatever the host runs, so `ctr task metrics`
//! and cAdvisor-style readers get the container's numbers, not the VM's host cost.

use container::guest_stats::GuestStats;
use containerd_shim::protos::cgroups_v2::metrics as v2;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::MessageFull;

fn pack<M: MessageFull>(message: &M) -> Result<Any, String> {
    Ok(Any {
        type_url: M::descriptor().full_name().to_string(),
        value: message.write_to_bytes().map_err(|e| e.to_string())?,
        ..Default::default()
    })
}

/// The guest cgroup's figures as containerd's `io.containerd.cgroups.v2.Metrics`; a limit
/// of `max` is `u64::MAX`, as containerd's cgroups library reads it.
pub fn metrics(stats: &GuestStats) -> v2::Metrics {
    let stat = |key: &str| stats.memory_stat.get(key).copied().unwrap_or(0);
    let mut memory = v2::MemoryStat::new();
    memory.usage = stats.memory_usage;
    memory.usage_limit = stats.memory_limit.unwrap_or(u64::MAX);
    memory.swap_usage = stats.swap_usage;
    memory.anon = stat("anon");
    memory.file = stat("file");
    memory.kernel_stack = stat("kernel_stack");
    memory.slab = stat("slab");
    memory.sock = stat("sock");
    memory.shmem = stat("shmem");
    memory.file_mapped = stat("file_mapped");
    memory.file_dirty = stat("file_dirty");
    memory.file_writeback = stat("file_writeback");
    memory.anon_thp = stat("anon_thp");
    memory.inactive_anon = stat("inactive_anon");
    memory.active_anon = stat("active_anon");
    memory.inactive_file = stat("inactive_file");
    memory.active_file = stat("active_file");
    memory.unevictable = stat("unevictable");
    memory.slab_reclaimable = stat("slab_reclaimable");
    memory.slab_unreclaimable = stat("slab_unreclaimable");
    memory.pgfault = stat("pgfault");
    memory.pgmajfault = stat("pgmajfault");
    memory.workingset_refault = stat("workingset_refault_anon") + stat("workingset_refault_file");
    memory.workingset_activate =
        stat("workingset_activate_anon") + stat("workingset_activate_file");
    memory.workingset_nodereclaim = stat("workingset_nodereclaim");
    memory.pgrefill = stat("pgrefill");
    memory.pgscan = stat("pgscan");
    memory.pgsteal = stat("pgsteal");
    memory.pgactivate = stat("pgactivate");
    memory.pgdeactivate = stat("pgdeactivate");
    memory.pglazyfree = stat("pglazyfree");
    memory.pglazyfreed = stat("pglazyfreed");
    memory.thp_fault_alloc = stat("thp_fault_alloc");
    memory.thp_collapse_alloc = stat("thp_collapse_alloc");
    let cpu_stat = |key: &str| stats.cpu_stat.get(key).copied().unwrap_or(0);
    let mut cpu = v2::CPUStat::new();
    cpu.usage_usec = cpu_stat("usage_usec");
    cpu.user_usec = cpu_stat("user_usec");
    cpu.system_usec = cpu_stat("system_usec");
    cpu.nr_periods = cpu_stat("nr_periods");
    cpu.nr_throttled = cpu_stat("nr_throttled");
    cpu.throttled_usec = cpu_stat("throttled_usec");
    cpu.nr_bursts = cpu_stat("nr_bursts");
    cpu.burst_usec = cpu_stat("burst_usec");
    let mut pids = v2::PidsStat::new();
    pids.current = stats.pids_current;
    pids.limit = stats.pids_limit.unwrap_or(u64::MAX);
    let mut io = v2::IOStat::new();
    io.usage = stats
        .io
        .iter()
        .map(|d| v2::IOEntry {
            major: d.major,
            minor: d.minor,
            rbytes: d.read_bytes,
            wbytes: d.write_bytes,
            rios: d.read_ios,
            wios: d.write_ios,
            ..Default::default()
        })
        .collect();
    let event = |key: &str| stats.memory_events.get(key).copied().unwrap_or(0);
    let mut events = v2::MemoryEvents::new();
    events.low = event("low");
    events.high = event("high");
    events.max = event("max");
    events.oom = event("oom");
    events.oom_kill = event("oom_kill");
    events.oom_group_kill = event("oom_group_kill");
    let mut metrics = v2::Metrics::new();
    metrics.memory = Some(memory).into();
    metrics.cpu = Some(cpu).into();
    metrics.pids = Some(pids).into();
    metrics.io = Some(io).into();
    metrics.memory_events = Some(events).into();
    metrics
}

/// [`metrics`], packed for the Stats reply.
pub fn packed(stats: &GuestStats) -> Result<Any, String> {
    pack(&metrics(stats))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn guest_cgroup_files_become_containerd_v2_metrics() {
        let files: BTreeMap<String, String> = [
            ("memory.current", "5242880\n"),
            ("memory.max", "67108864\n"),
            ("memory.stat", "anon 4194304\nfile 1048576\n"),
            ("memory.events", "max 3\noom 1\noom_kill 1\n"),
            (
                "cpu.stat",
                "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n",
            ),
            ("pids.current", "2\n"),
            ("pids.max", "max\n"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let m = metrics(&GuestStats::parse(&files));
        assert_eq!(
            (
                m.memory.usage,
                m.memory.usage_limit,
                m.memory.anon,
                m.memory.file
            ),
            (5 << 20, 64 << 20, 4 << 20, 1 << 20)
        );
        assert_eq!((m.cpu.usage_usec, m.cpu.system_usec), (1500, 500));
        assert_eq!((m.pids.current, m.pids.limit), (2, u64::MAX));
        assert_eq!(m.memory_events.oom_kill, 1);
        let any = packed(&GuestStats::parse(&files)).unwrap();
        assert_eq!(any.type_url, "io.containerd.cgroups.v2.Metrics");
    }
}
