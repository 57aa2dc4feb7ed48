//! `events`: the container's usage as runc prints it, `{"type":"stats","id":…,"data":…}`,
//! once with `--stats`, else every `--interval` seconds until the container stops. The
//! numbers are the container's cgroup in the guest, not the VM's host cost (which `ps`
//! and the host cgroup show). OOM kills are not streamed here: the monitor's exit status
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
        let event = serde_json::json!({
            "type": "stats",
            "id": dir.id,
            "data": GuestStats::parse(&files).runc_json(),
        });
        outln!("{}", serde_json::to_string(&event)?);
        if args.stats {
            return Ok(0);
        }
        std::thread::sleep(Duration::from_secs(u64::from(args.interval.max(1))));
    }
}
