//! `update`: resource changes of a running container.
//!
//! The VM's memory and vCPUs are fixed when it boots; an update that asks to change them is
//! refused with that reason rather than silently ignored.

use std::io::Read;

use anyhow::{bail, Context as _, Result};
use container::{ContainerError, Status};
use liboci_cli::Update;

use super::Context;

pub fn run(args: Update, context: &Context) -> Result<i32> {
    let (_, state) = context.open(&args.container_id)?;
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
            "cpu": { "quota": args.cpu_quota, "period": args.cpu_period, "cpus": args.cpuset_cpus },
        }),
    };
    let memory = resources
        .pointer("/memory/limit")
        .and_then(|v| v.as_i64())
        .filter(|&m| m > 0);
    let quota = resources
        .pointer("/cpu/quota")
        .and_then(|v| v.as_i64())
        .filter(|&q| q > 0);
    let cpus = resources
        .pointer("/cpu/cpus")
        .and_then(|v| v.as_str())
        .filter(|c| !c.is_empty());
    if memory.is_some() || quota.is_some() || cpus.is_some() {
        bail!(
            "cannot update memory or cpu limits of a running supermachine container: the VM's \
             memory and vCPUs are fixed when it is created"
        );
    }
    Ok(0)
}
