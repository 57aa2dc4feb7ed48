//! `kill ID [SIGNAL]`: signal the container's process (or, with `--all`, all of them).

use std::time::Duration;

use anyhow::{bail, Result};
use container::control::{self, ControlRequest};
use container::{signal, ContainerError, Status};

use super::Context;

pub fn run(args: crate::KillArgs, context: &Context) -> Result<i32> {
    let signal = signal::parse(if args.signal.is_empty() {
        "SIGTERM"
    } else {
        &args.signal
    })?;
    let (dir, state) = context.open(&args.container_id)?;
    let request = match state.current_status() {
        Status::Stopped | Status::Creating => return Err(ContainerError::NotRunning.into()),
        // A paused VM cannot deliver a signal; SIGKILL ends it from outside instead.
        Status::Paused if signal == libc::SIGKILL => ControlRequest::Stop,
        Status::Paused => bail!("container is paused; resume it first or send SIGKILL"),
        Status::Created | Status::Running => ControlRequest::Signal {
            signal,
            all: args.all,
        },
    };
    control::call(&dir.path, request, Duration::from_secs(30))?;
    Ok(0)
}
