//! `update`: new resource limits for a running container.
//!
//! They apply inside the VM, to the container's cgroup in the guest (what the container sees
//! and the guest kernel enforces, converted as for `create`), its online vCPUs and memory,
//! and to the VM's host cgroup (what the host accounts); see [`lifecycle::update`].

use std::io::Read;

use anyhow::{Context as _, Result};
use container::lifecycle;
use liboci_cli::Update;

use super::Context;

pub fn run(args: Update, context: &Context) -> Result<i32> {
    let container = context.container(&args.container_id)?;
    let resources = match &args.resources {
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
        None => resources_from_flags(&args),
    };
    lifecycle::update(&container, &resources)?;
    Ok(0)
}

/// runc's flags as the `linux.resources` they stand for (absent flags are left out).
fn resources_from_flags(args: &Update) -> serde_json::Value {
    let mut memory = serde_json::Map::new();
    let put = |map: &mut serde_json::Map<String, serde_json::Value>,
               key: &str,
               value: Option<serde_json::Value>| {
        if let Some(value) = value {
            map.insert(key.to_string(), value);
        }
    };
    let number = |v: Option<u64>| v.map(serde_json::Value::from);
    put(&mut memory, "limit", number(args.memory));
    put(&mut memory, "reservation", number(args.memory_reservation));
    put(
        &mut memory,
        "swap",
        args.memory_swap.map(serde_json::Value::from),
    );
    let mut cpu = serde_json::Map::new();
    put(&mut cpu, "quota", number(args.cpu_quota));
    put(&mut cpu, "period", number(args.cpu_period));
    put(&mut cpu, "shares", number(args.cpu_share));
    put(&mut cpu, "realtimePeriod", number(args.cpu_rt_period));
    put(&mut cpu, "realtimeRuntime", number(args.cpu_rt_runtime));
    put(&mut cpu, "cpus", args.cpuset_cpus.clone().map(Into::into));
    put(&mut cpu, "mems", args.cpuset_mems.clone().map(Into::into));
    let mut resources = serde_json::Map::new();
    if !memory.is_empty() {
        resources.insert("memory".into(), memory.into());
    }
    if !cpu.is_empty() {
        resources.insert("cpu".into(), cpu.into());
    }
    if let Some(limit) = args.pids_limit {
        resources.insert("pids".into(), serde_json::json!({ "limit": limit }));
    }
    if let Some(weight) = args.blkio_weight {
        resources.insert("blockIO".into(), serde_json::json!({ "weight": weight }));
    }
    resources.into()
}
