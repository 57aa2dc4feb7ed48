//! `start`: let the created container's process run.

use std::time::Duration;

use anyhow::{bail, Result};
use container::control::{self, ControlRequest};
use container::Status;
use liboci_cli::Start;

use super::Context;

pub fn run(args: Start, context: &Context) -> Result<i32> {
    let (dir, state) = context.open(&args.container_id)?;
    match state.current_status() {
        Status::Created => {}
        Status::Running | Status::Paused => bail!("cannot start an already running container"),
        Status::Stopped => bail!("cannot start a container that has stopped"),
        Status::Creating => bail!("cannot start a container that is still being created"),
    }
    control::call(&dir.path, ControlRequest::Start, Duration::from_secs(30))?;
    Ok(0)
}
