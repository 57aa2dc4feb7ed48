//! `features`: what this runtime supports (runtime-spec features.md), plus the engine it
//! picks on this host and why, as annotations.

use anyhow::Result;
use engine::EngineChoice;
use liboci_cli::Features;
use serde_json::json;

use super::Context;

pub fn run(_args: Features, context: &Context) -> Result<i32> {
    let choice: EngineChoice = context.engine.parse()?;
    let (engine, reason) = match engine::select(choice, &context.paths.probe_dir()) {
        Ok(selection) => (selection.engine.name(), selection.reason),
        Err(e) => ("none".to_string(), e.to_string()),
    };
    // Whether this host's hypervisor runs guest kernel code natively; where it does not, the
    // builtin engine needs the kernel variant built for such hosts (`make guest` reads this).
    let builtin_native = match hypervisor::open() {
        Ok(hv) => engine::builtin::speed_verdict(hv.as_ref(), &context.paths.probe_dir())
            .native
            .to_string(),
        Err(_) => "unavailable".to_string(),
    };
    let features = json!({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": "1.2.0",
        "hooks": [],
        "mountOptions": ["ro", "rw", "nosuid", "suid", "nodev", "dev", "noexec", "exec",
            "sync", "async", "dirsync", "noatime", "atime", "nodiratime", "diratime",
            "relatime", "norelatime", "strictatime", "nostrictatime", "bind", "rbind"],
        "linux": {
            "namespaces": ["mount", "network", "uts", "ipc", "pid", "cgroup"],
            "capabilities": CAPABILITIES.to_vec(),
            "cgroup": { "v1": true, "v2": true, "systemd": false, "systemdUser": false },
            "seccomp": { "enabled": false },
            "apparmor": { "enabled": false },
            "selinux": { "enabled": false }
        },
        "annotations": {
            "run.supermachine.engine": engine,
            "run.supermachine.engine.reason": reason,
            "run.supermachine.builtin.native": builtin_native,
            "run.supermachine.isolation": "microvm"
        }
    });
    outln!("{}", serde_json::to_string_pretty(&features)?);
    Ok(0)
}

const CAPABILITIES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];
