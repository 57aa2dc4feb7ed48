//! `events`: the container's usage as runc prints it, `{"type":"stats","id":…,"data":…}`,
//! once with `--stats`, else every `--interval` seconds until the container stops. The
//! numbers are the container's cgroup in the guest; the VM's own host cost (its monitor and
//! VMM processes: resident memory, CPU time) is beside them under `vm`, a key runc does not
//! have. OOM kills are not streamed here: the monitor's exit status
//! (137) and its log say when the OOM killer ended the container.

use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use container::control::{self, ControlReply, ControlRequest};
use container::guest_stats::GuestStats;
use container::monitored::CONTROL_TIMEOUT;
use container::{ContainerError, Status};
use liboci_cli::Events;

use super::Context;

pub fn run(args: Events, context: &Context) -> Result<i32> {
    loop {
        let (dir, state) = context.open(&args.container_id)?;
        let status = state.current_status();
        if matches!(status, Status::Stopped | Status::Creating) {
            if args.stats {
                return Err(ContainerError::NotRunning.into());
            }
            return Ok(0);
        }
        let files = match control::call(&dir.path, ControlRequest::Stats, CONTROL_TIMEOUT)
            .with_context(|| format!("stats of container {}", dir.id))?
        {
            ControlReply::Stats(files) => files,
            other => bail!("unexpected reply {other:?}"),
        };
        let mut data = GuestStats::parse(&files).runc_json();
        if let Some(pid) = state.pid {
            data["vm"] = host_cost(pid);
        }
        let event = serde_json::json!({
            "type": "stats",
            "id": dir.id,
            "data": data,
        });
        outln!("{}", serde_json::to_string(&event)?);
        if args.stats {
            return Ok(0);
        }
        std::thread::sleep(Duration::from_secs(u64::from(args.interval.max(1))));
    }
}

/// What the VM costs the host: its monitor's process tree (the VMM in it, or QEMU below it).
fn host_cost(monitor: i32) -> serde_json::Value {
    let pids = container::proc::tree(monitor);
    let rss: u64 = pids
        .iter()
        .filter_map(|&p| container::proc::resident_bytes(p))
        .sum();
    let cpu: Duration = pids
        .iter()
        .filter_map(|&p| container::proc::cpu_time(p))
        .sum();
    serde_json::json!({
        "pids": pids,
        "host_memory_rss": rss,
        "host_cpu_usage": cpu.as_nanos() as u64,
    })
}
