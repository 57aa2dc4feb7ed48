//! `features`: what this runtime supports (runtime-spec features.md), plus the engine it
//! picks on this host and why, as annotations.

use anyhow::Result;
use engine::EngineChoice;
use liboci_cli::Features;
use serde_json::json;

use super::Context;

pub fn run(_args: Features, context: &Context) -> Result<i32> {
    let choice: EngineChoice = context.engine.parse()?;
    let qemu = container::Assets::locate()
        .ok()
        .and_then(|assets| assets.qemu);
    let (engine, reason, isolation, confinement) =
        match engine::select(choice, &context.paths.probe_dir(), qemu.as_deref()) {
            Ok(selection) => (
                selection.engine.name(),
                selection.reason,
                isolation_text(selection.engine.isolation()),
                selection.engine.vmm_confinement(),
            ),
            Err(e) => (
                "none".to_string(),
                e.to_string(),
                "none".to_string(),
                "none".to_string(),
            ),
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
            "namespaces": ["mount", "network", "uts", "ipc", "pid", "cgroup", "user"],
            "capabilities": agent_proto::CAPABILITY_NAMES.to_vec(),
            "cgroup": { "v1": true, "v2": true, "systemd": true, "systemdUser": false },
            "seccomp": {
                "enabled": true,
                "actions": ["SCMP_ACT_ALLOW", "SCMP_ACT_ERRNO", "SCMP_ACT_KILL",
                    "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_KILL_THREAD", "SCMP_ACT_LOG",
                    "SCMP_ACT_TRACE", "SCMP_ACT_TRAP"],
                "operators": ["SCMP_CMP_EQ", "SCMP_CMP_GE", "SCMP_CMP_GT", "SCMP_CMP_LE",
                    "SCMP_CMP_LT", "SCMP_CMP_MASKED_EQ", "SCMP_CMP_NE"],
                "archs": ["SCMP_ARCH_X86", "SCMP_ARCH_X86_64", "SCMP_ARCH_X32",
                    "SCMP_ARCH_ARM", "SCMP_ARCH_AARCH64"],
                "supportedFlags": ["SECCOMP_FILTER_FLAG_TSYNC", "SECCOMP_FILTER_FLAG_LOG",
                    "SECCOMP_FILTER_FLAG_SPEC_ALLOW"]
            },
            "apparmor": { "enabled": false },
            "selinux": { "enabled": false }
        },
        "annotations": {
            "run.supermachine.engine": engine,
            "run.supermachine.engine.reason": reason,
            "run.supermachine.builtin.native": builtin_native,
            "run.supermachine.isolation": isolation,
            "run.supermachine.vmm.confinement": confinement
        }
    });
    outln!("{}", serde_json::to_string_pretty(&features)?);
    Ok(0)
}

/// The isolation annotation: a microVM, and what makes its boundary.
fn isolation_text(isolation: engine::Isolation) -> String {
    match isolation {
        engine::Isolation::Hypervisor => {
            "microvm under a hypervisor (KVM or Hypervisor.framework)".into()
        }
        engine::Isolation::Emulation => format!(
            "microvm under software emulation (QEMU TCG): weaker than a hypervisor; \
             {}=1 refuses to run containers here",
            engine::REQUIRE_HARDWARE_ISOLATION
        ),
    }
}
