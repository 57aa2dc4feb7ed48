//! `ps`: with `--format json` (what containerd and docker call), the host pids that make up
//! the container (its monitor and VMM), because the caller looks them up in the host's
//! process table; as a table, the processes inside the VM.

use std::time::Duration;

use anyhow::{bail, Result};
use container::control::{self, ControlReply, ControlRequest};
use container::{ContainerError, Status};
use liboci_cli::Ps;

use super::Context;

pub fn run(args: Ps, context: &Context) -> Result<i32> {
    let (dir, state) = context.open(&args.container_id)?;
    let status = state.current_status();
    match args.format.as_str() {
        "json" => {
            let pids = match (status, state.pid) {
                (Status::Stopped, _) | (_, None) => Vec::new(),
                (_, Some(pid)) => container::proc::tree(pid),
            };
            outln!("{}", serde_json::to_string(&pids)?);
        }
        "table" => {
            if status == Status::Creating {
                return Err(ContainerError::NotRunning.into());
            }
            // As runc: a stopped container has no process, and listing none succeeds.
            let processes = if status == Status::Stopped {
                Vec::new()
            } else {
                match control::call(
                    &dir.path,
                    ControlRequest::Processes,
                    Duration::from_secs(30),
                )? {
                    ControlReply::Processes(list) => list,
                    other => bail!("unexpected reply {other:?}"),
                }
            };
            outln!(
                "{:<8} {:<8} {:<8} {:<5} {:>8}  CMD",
                "PID",
                "PPID",
                "UID",
                "STAT",
                "TIME"
            );
            let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
                .ok()
                .flatten()
                .unwrap_or(100)
                .max(1) as u64;
            for p in processes {
                let secs = p.cpu_ticks / ticks;
                outln!(
                    "{:<8} {:<8} {:<8} {:<5} {:>5}:{:02}  {}",
                    p.pid,
                    p.ppid,
                    p.uid,
                    p.state,
                    secs / 60,
                    secs % 60,
                    p.command
                );
            }
        }
        other => bail!("invalid format option {other:?}"),
    }
    Ok(0)
}
