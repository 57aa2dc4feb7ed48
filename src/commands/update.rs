//! `update`: new resource limits for a running container.
//!
//! They apply to the VM's host cgroup (what `docker stats` shows and the host enforces). The
//! guest's memory and vCPUs are fixed when the VM boots, so a memory limit below what the VM
//! was given is refused with that reason rather than left to the host OOM killer.

use std::io::Read;

use anyhow::{bail, Context as _, Result};
use container::cgroup::{self, HostLimits};
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
    let limits = requested_limits(&resources, plan.memory_mib, &VmDefaults::load())?;
    match &plan.cgroups_path {
        Some(path) => cgroup::update(path, &limits)?,
        None => log::debug!("container {} has no cgroup; nothing to update", dir.id),
    }
    Ok(0)
}

fn requested_limits(
    resources: &serde_json::Value,
    guest_mib: u32,
    defaults: &VmDefaults,
) -> Result<HostLimits> {
    let int = |pointer: &str| {
        resources
            .pointer(pointer)
            .and_then(|v| v.as_i64())
            .filter(|&v| v > 0)
    };
    let text = |pointer: &str| {
        resources
            .pointer(pointer)
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty())
            .map(String::from)
    };
    let memory_bytes = int("/memory/limit");
    if let Some(bytes) = memory_bytes {
        let needed = i64::from(guest_mib + defaults.vmm_overhead_mib) << 20;
        if bytes < needed {
            bail!(
                "cannot lower the memory limit to {} MiB: the VM was created with {guest_mib} MiB \
                 of guest memory, and with its VMM needs {} MiB; recreate the container to shrink it",
                bytes >> 20,
                needed >> 20
            );
        }
    }
    Ok(HostLimits {
        memory_bytes,
        cpu_quota: int("/cpu/quota"),
        cpu_period: int("/cpu/period").map(|p| p as u64),
        cpu_shares: int("/cpu/shares").map(|s| s as u64),
        cpuset_cpus: text("/cpu/cpus"),
        cpuset_mems: text("/cpu/mems"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_below_the_vm_is_refused_and_above_accepted() {
        let defaults = VmDefaults::load();
        let small = serde_json::json!({ "memory": { "limit": 64 << 20 } });
        let err = requested_limits(&small, 256, &defaults)
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot lower the memory limit"), "{err}");
        let big = serde_json::json!({ "memory": { "limit": 1i64 << 30 }, "cpu": { "quota": 50000, "period": 100000 } });
        let limits = requested_limits(&big, 256, &defaults).unwrap();
        assert_eq!(limits.memory_bytes, Some(1 << 30));
        assert_eq!(limits.cpu_quota, Some(50000));
    }
}
