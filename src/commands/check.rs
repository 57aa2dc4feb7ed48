//! `check`: whether this host can run containers in microVMs, and with what; each finding
//! with how to fix it (as `kata-runtime check`). Exits 1 when something a container needs is
//! missing; what only makes it slower or less isolated, or what a front door lacks, is a
//! warning or a note.

use std::path::Path;

use anyhow::Result;
use engine::EngineChoice;

use super::Context;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Ok,
    /// Works, but slower, less isolated or partly.
    Warning,
    /// A container cannot run until it is fixed.
    Missing,
    /// Not needed to run containers; needed for one way of using the runtime.
    Note,
}

struct Finding {
    verdict: Verdict,
    what: &'static str,
    detail: String,
}

fn finding(verdict: Verdict, what: &'static str, detail: impl Into<String>) -> Finding {
    Finding {
        verdict,
        what,
        detail: detail.into(),
    }
}

pub fn run(context: &Context) -> Result<i32> {
    let located = container::Assets::locate();
    let qemu = located.as_ref().ok().and_then(|a| a.qemu.clone());
    let findings = [
        assets(&located),
        firmware(qemu.as_deref()),
        kvm(context),
        selected_engine(context, qemu.as_deref()),
        tool("mkfs.ext4", "e2fsprogs", "containers' image disks"),
        tun(),
        cgroups(),
        systemd(),
        capacity(),
        front_door(
            "docker",
            Path::new("/etc/docker/daemon.json"),
            "supermachine",
            "add {\"runtimes\": {\"supermachine\": {\"path\": \"/usr/local/bin/supermachine\"}}} \
             to /etc/docker/daemon.json, or run dockerd with --add-runtime \
             supermachine=/usr/local/bin/supermachine",
        ),
        shim_on_path(),
    ];
    let mut missing = 0;
    for f in &findings {
        let label = match f.verdict {
            Verdict::Ok => "ok",
            Verdict::Warning => "warning",
            Verdict::Missing => "MISSING",
            Verdict::Note => "note",
        };
        missing += usize::from(f.verdict == Verdict::Missing);
        println!("{label:<8} {:<12} {}", f.what, f.detail);
    }
    if missing > 0 {
        println!("{missing} thing(s) missing: containers cannot run here yet");
        return Ok(1);
    }
    Ok(0)
}

fn assets(located: &Result<container::Assets, container::ContainerError>) -> Finding {
    match located {
        Ok(assets) => finding(
            Verdict::Ok,
            "assets",
            format!(
                "guest kernel and agent in {}{}",
                assets.dir.display(),
                if assets.qemu.is_some() {
                    ", with the QEMU built for supermachine"
                } else {
                    ""
                }
            ),
        ),
        Err(e) => finding(Verdict::Missing, "assets", e.to_string()),
    }
}

/// The firmware the engine would give the assets' QEMU, else QEMU's own.
fn firmware(qemu: Option<&Path>) -> Finding {
    let system = Path::new("/usr/share/qemu").join(engine::qemu::FIRMWARE_NAME);
    match qemu.and_then(engine::qemu::firmware_beside) {
        Some(path) => finding(
            Verdict::Ok,
            "firmware",
            format!("{} (given to QEMU)", path.display()),
        ),
        None if system.is_file() => finding(
            Verdict::Ok,
            "firmware",
            format!("{} (QEMU's own search)", system.display()),
        ),
        None => finding(
            Verdict::Warning,
            "firmware",
            "no qboot.rom for the qemu engine: run `make qemu` (or install qemu-system-data); \
             the builtin engine needs none",
        ),
    }
}

fn kvm(context: &Context) -> Finding {
    match hypervisor::open() {
        Ok(hv) => {
            let speed = engine::builtin::speed_verdict(hv.as_ref(), &context.paths.probe_dir());
            if speed.native {
                finding(
                    Verdict::Ok,
                    "kvm",
                    format!("{}: {}", hv.name(), speed.reason),
                )
            } else {
                finding(
                    Verdict::Warning,
                    "kvm",
                    format!(
                        "{}: {}; the builtin engine boots slowly here, so `auto` picks QEMU \
                         (a host with hardware virtualization exposed does not have this)",
                        hv.name(),
                        speed.reason
                    ),
                )
            }
        }
        Err(e) => finding(
            Verdict::Warning,
            "kvm",
            format!(
                "{e}: containers run under QEMU's software emulation (slower, weaker \
                 isolation); load kvm_intel or kvm_amd and give access to /dev/kvm"
            ),
        ),
    }
}

fn selected_engine(context: &Context, qemu: Option<&Path>) -> Finding {
    let choice: EngineChoice = match context.engine.parse() {
        Ok(choice) => choice,
        Err(e) => return finding(Verdict::Missing, "engine", e.to_string()),
    };
    match engine::select(choice, &context.paths.probe_dir(), qemu) {
        Ok(selection) => {
            let isolation = selection.engine.isolation();
            let verdict = match isolation {
                engine::Isolation::Hypervisor => Verdict::Ok,
                engine::Isolation::Emulation => Verdict::Warning,
            };
            finding(
                verdict,
                "engine",
                format!(
                    "{}, isolated by {isolation} ({})",
                    selection.engine.name(),
                    selection.reason
                ),
            )
        }
        Err(e) => finding(
            Verdict::Missing,
            "engine",
            format!("{e}: install qemu-system-x86 or make /dev/kvm usable"),
        ),
    }
}

fn tool(name: &str, package: &str, what_for: &str) -> Finding {
    let what: &'static str = "tools";
    match engine::probe::which(name) {
        Some(path) => finding(
            Verdict::Ok,
            what,
            format!("{} (for {what_for})", path.display()),
        ),
        None => finding(
            Verdict::Missing,
            what,
            format!("{name} not on PATH, needed for {what_for}: install {package}"),
        ),
    }
}

fn tun() -> Finding {
    if Path::new("/dev/net/tun").exists() {
        finding(
            Verdict::Ok,
            "network",
            "/dev/net/tun (a container's network gets a tap)",
        )
    } else {
        finding(
            Verdict::Warning,
            "network",
            "no /dev/net/tun: containers with a network namespace cannot start; modprobe tun",
        )
    }
}

/// The layout the monitor places VMs in (`container::cgroup`'s view of it).
fn cgroups() -> Finding {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let hierarchies = container::cgroup::hierarchies(&mountinfo);
    let v2_at_root = hierarchies
        .iter()
        .any(|h| h.v2 && h.mount == Path::new("/sys/fs/cgroup"));
    let v1 = hierarchies.iter().any(|h| !h.v2);
    match (v2_at_root, v1) {
        (true, _) => finding(
            Verdict::Ok,
            "cgroups",
            "cgroup v2 at /sys/fs/cgroup (the VMs' host limits)",
        ),
        (false, true) => finding(
            Verdict::Ok,
            "cgroups",
            "cgroup v1 (or hybrid): each VM's host limits are set in the v1 hierarchies",
        ),
        (false, false) => finding(
            Verdict::Warning,
            "cgroups",
            "no cgroup filesystem mounted: a container's cgroupsPath and host limits cannot \
             be applied",
        ),
    }
}

/// The cgroup driver for systemd-style paths: systemd's, over its D-Bus, where it is PID 1.
fn systemd() -> Finding {
    if !container::systemd::is_pid1() {
        return finding(
            Verdict::Note,
            "systemd",
            "not PID 1: every cgroupsPath is placed through cgroupfs",
        );
    }
    match container::systemd::reachable() {
        Ok(()) => finding(
            Verdict::Ok,
            "systemd",
            "PID 1, reached over D-Bus: slice:prefix:name cgroup paths (docker's and \
             containerd's systemd driver) become transient scopes",
        ),
        Err(e) => finding(
            Verdict::Missing,
            "systemd",
            format!(
                "PID 1, but its D-Bus does not answer ({e}): containers with a systemd \
                 cgroupsPath cannot be placed; is dbus running?"
            ),
        ),
    }
}

/// The host's VM budget and what running VMs hold of it (the capacity ledger).
fn capacity() -> Finding {
    let usage = container::capacity::Budget::of_host()
        .and_then(|budget| container::capacity::Ledger::host().usage(budget));
    match usage {
        Ok(usage) => {
            let held = usage.reserved();
            finding(
                Verdict::Ok,
                "capacity",
                format!(
                    "VMs may reserve {} MiB and {} vCPUs (SUPERMACHINE_CAPACITY_MEMORY, \
                     SUPERMACHINE_CAPACITY_VCPUS); {} VM(s) hold {} MiB and {} vCPUs",
                    usage.budget.memory_mib,
                    usage.budget.vcpus,
                    usage.entries.len(),
                    held.memory_mib,
                    held.vcpus
                ),
            )
        }
        Err(e) => finding(Verdict::Missing, "capacity", e.to_string()),
    }
}

/// Whether a front door's configuration names the runtime (a note if not: the runtime
/// works without it, that front door does not).
fn front_door(what: &'static str, config: &Path, needle: &str, fix: &str) -> Finding {
    match std::fs::read_to_string(config) {
        Ok(text) if text.contains(needle) => finding(
            Verdict::Ok,
            what,
            format!("{} names {needle}", config.display()),
        ),
        _ => finding(
            Verdict::Note,
            what,
            format!("{} does not name {needle}: {fix}", config.display()),
        ),
    }
}

fn shim_on_path() -> Finding {
    match engine::probe::which("containerd-shim-supermachine-v2") {
        Some(path) => finding(
            Verdict::Ok,
            "containerd",
            format!("{} (runtime io.containerd.supermachine.v2)", path.display()),
        ),
        None => finding(
            Verdict::Note,
            "containerd",
            "containerd-shim-supermachine-v2 is not on PATH: `make install` puts it in \
             /usr/local/bin for `ctr run --runtime io.containerd.supermachine.v2`",
        ),
    }
}
