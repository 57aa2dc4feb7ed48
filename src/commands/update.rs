//! `update`: new resource limits for a running container.
//!
//! They apply to the VM's host cgroup (what `docker stats` shows and the host enforces). The
//! guest's memory and vCPUs are fixed when the VM boots, so a memory limit below what the VM
//! was given is refused with that reason rather than left to the host OOM killer.

use std::io::Read;

use anyhow::{Context as _, Result};
use container::cgroup;
use container::paths::VmDefaults;
use container::plan::Plan;
use container::{ContainerError, Status};
use liboci_cli::Update;

use super::Context;

pub fn run(args: Update, context: &Context) -> Result<i32> {
    let (dir, state) = context.open(&args.container_id)?;
    if matches!(state.current_status(), Status::Stopped | Status::Creating) {
        return Err(ContainerError::NotRunning.into());
    }
    let resources: serde_json::Value = match &args.resources {
        Some(path) => {
            let mut text = String::new();
            if path.as_os_str() == "-" {
                std::io::stdin()
                    .read_to_string(&mut text)
                    .context("read resources from stdin")?;
            } else {
                text = std::fs::read_to_string(path)
                    .with_context(|| format!("read {}", path.display()))?;
            }
            serde_json::from_str(&text).context("invalid resources JSON")?
        }
        None => serde_json::json!({
            "memory": { "limit": args.memory },
            "cpu": {
                "quota": args.cpu_quota,
                "period": args.cpu_period,
                "shares": args.cpu_share,
                "cpus": args.cpuset_cpus,
                "mems": args.cpuset_mems,
            },
        }),
    };
    let plan = Plan::load(&dir)?;
    let limits = cgroup::limits_from_resources(
        &resources,
        plan.memory_mib,
        VmDefaults::load().vmm_overhead_mib,
    )?;
    match &plan.cgroups_path {
        Some(path) => cgroup::update(path, &limits)?,
        None => log::debug!("container {} has no cgroup; nothing to update", dir.id),
    }
    Ok(0)
}
