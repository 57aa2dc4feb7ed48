//! `resume`: continue a paused VM.

use std::time::Duration;

use anyhow::{bail, Result};
use container::control::{self, ControlRequest};
use container::Status;
use liboci_cli::Resume;

use super::Context;

pub fn run(args: Resume, context: &Context) -> Result<i32> {
    let (dir, state) = context.open(&args.container_id)?;
    if state.current_status() != Status::Paused {
        bail!("container not paused");
    }
    control::call(&dir.path, ControlRequest::Resume, Duration::from_secs(30))?;
    Ok(0)
}
