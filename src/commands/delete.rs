//! `delete [--force] ID`: end the VM (if any) and remove everything the container left.

use std::time::Duration;

use anyhow::{bail, Result};
use container::control::{self, ControlRequest};
use container::hooks;
use container::plan::Plan;
use container::state::ContainerDir;
use container::{proc, ContainerError, ContainerState, Status};
use liboci_cli::Delete;

use super::Context;

pub fn run(args: Delete, context: &Context) -> Result<i32> {
    let (dir, state) = match context.open(&args.container_id) {
        Ok(found) => found,
        // As runc: forcing the delete of a container that is not there succeeds, after
        // removing whatever an aborted create left under its id.
        Err(e) if args.force && is_not_found(&e) => {
            if let Ok(dir) = context.store.create_dir_path(&args.container_id) {
                let _ = std::fs::remove_dir_all(dir);
            }
            return Ok(0);
        }
        Err(e) => return Err(e),
    };
    let status = state.current_status();
    if matches!(status, Status::Running | Status::Paused) && !args.force {
        bail!(
            "cannot delete container {} that is not stopped: {status}",
            args.container_id
        );
    }
    destroy(&dir, &state)?;
    Ok(0)
}

fn is_not_found(e: &anyhow::Error) -> bool {
    matches!(
        e.downcast_ref::<ContainerError>(),
        Some(ContainerError::NotFound(_))
    )
}

/// Stops the monitor (and with it the VM) if it still runs, then removes the state.
pub fn destroy(dir: &ContainerDir, state: &ContainerState) -> Result<()> {
    if let Some(pid) = state
        .pid
        .filter(|&pid| proc::is_alive(pid, state.pid_start_time))
    {
        // A monitor still creating has no control socket yet: it is killed at once.
        let creating = state.status == Status::Creating;
        if !creating {
            if let Err(e) = control::call(&dir.path, ControlRequest::Stop, Duration::from_secs(5)) {
                log::debug!("asking monitor {pid} to stop: {e}");
            }
        }
        if creating || !proc::wait_gone(pid, state.pid_start_time, Duration::from_secs(10)) {
            // Its VM dies with it (PR_SET_PDEATHSIG).
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            proc::wait_gone(pid, state.pid_start_time, Duration::from_secs(5));
        }
    }
    if let Ok(plan) = Plan::load(dir) {
        if !plan.hooks.poststop.is_empty() {
            let stopped = state.oci_state_as(Status::Stopped);
            if let Err(e) = hooks::run("poststop", &plan.hooks.poststop, &stopped) {
                log::warn!("{e}");
            }
        }
    }
    dir.discard()?;
    Ok(())
}
