//! `start`: let the created container's process run.

use std::time::Duration;

use anyhow::{bail, Result};
use container::control::{self, ControlRequest};
use container::hooks;
use container::plan::Plan;
use container::state::ContainerDir;
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
    poststart(&dir)
}

/// Runs the poststart hooks; a failure is reported but the container keeps running, as
/// runc does.
pub fn poststart(dir: &ContainerDir) -> Result<i32> {
    let plan = Plan::load(dir)?;
    if !plan.hooks.poststart.is_empty() {
        let state = dir.load()?.oci_state_as(Status::Running);
        if let Err(e) = hooks::run("poststart", &plan.hooks.poststart, &state) {
            log::warn!("{e}");
        }
    }
    Ok(0)
}
