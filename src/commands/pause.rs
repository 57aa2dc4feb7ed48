//! `pause`: stop the VM's vCPUs.

use std::time::Duration;

use anyhow::{bail, Result};
use container::control::{self, ControlRequest};
use container::Status;
use liboci_cli::Pause;

use super::Context;

pub fn run(args: Pause, context: &Context) -> Result<i32> {
    let (dir, state) = context.open(&args.container_id)?;
    match state.current_status() {
        Status::Running => {}
        Status::Paused => bail!("container is already paused"),
        other => bail!("container not running (status {other})"),
    }
    control::call(&dir.path, ControlRequest::Pause, Duration::from_secs(30))?;
    Ok(0)
}
