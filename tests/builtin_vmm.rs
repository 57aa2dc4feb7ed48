//! The builtin VMM with the real guest kernel, on this host's KVM.
//!
//! 1. The kernel boots through PVH, finds its IOAPIC in the MP table, drives a virtio-blk
//!    disk over virtio-mmio, mounts it as its root and, finding no init there, panics and
//!    resets: the VMM sees the reset and ends the VM. This needs no guest user mode, so it
//!    runs everywhere KVM does, including hosts whose KVM only emulates guest kernel code
//!    (PVM; slow there: ~2 minutes).
//! 2. A busybox container through `supermachine run` with `SUPERMACHINE_ENGINE=builtin` and a
//!    `qemu-system-x86_64` on PATH that fails, so nothing falls back to QEMU: it prints the
//!    guest's `uname -r`, the guest's console port names and its virtio-fs device, and
//!    returns the process's exit status. It needs guest user mode, which an unmodified
//!    kernel does not get on an emulating host (its `syscall`s are misdelivered): there the
//!    engine boots the kernel variant built for such hosts.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use common::{assets, text, Env};

fn kvm() -> Option<Box<dyn hypervisor::Hypervisor>> {
    match hypervisor::open() {
        Ok(hv) => Some(hv),
        Err(e) => {
            common::missing_kvm(&e);
            None
        }
    }
}

/// Boots `kernel` (under `assets`) with 128 MiB, one vCPU and a root disk that has a marker
/// file and no init, and a virtio-console port (the agent's channel, unused); returns the VM,
/// its console log and the host end of the channel.
fn boot_to_root_disk(
    hv: &dyn hypervisor::Hypervisor,
    verdict: &engine::builtin::SpeedVerdict,
    kernel: std::path::PathBuf,
    work: &std::path::Path,
) -> (vmm::Vmm, std::path::PathBuf, UnixStream) {
    let tree = work.join("tree");
    std::fs::create_dir_all(tree.join("etc")).expect("root tree");
    std::fs::write(tree.join("etc/marker"), "builtin").expect("root tree");
    let disk = work.join("disk.ext4");
    let status = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&tree)
        .arg(&disk)
        .arg("8M")
        .status()
        .expect("mkfs.ext4");
    assert!(status.success());
    let mut cmdline = String::from("console=ttyS0 reboot=t panic=-1 root=/dev/vda ro");
    if !verdict.native {
        cmdline.push(' ');
        cmdline.push_str(engine::builtin::EMULATED_KERNEL_ARGS);
    }
    let console = work.join("console.log");
    let (host, device) = UnixStream::pair().expect("socketpair");
    let vmm = vmm::Vmm::boot(
        hv,
        vmm::VmmConfig {
            vcpus: 1,
            memory_mib: 128,
            kernel,
            initramfs: None,
            cmdline,
            disks: vec![vmm::Disk {
                path: disk,
                read_only: true,
            }],
            nics: vec![],
            agent_channel: Some(device),
            fs_channel: None,
            fs: None,
            console_log: console.clone(),
            hide_cpuid: Vec::new(),
            diagnostics: vmm::Diagnostics::default(),
        },
    )
    .expect("boot");
    (vmm, console, host)
}

#[test]
fn the_guest_kernel_boots_mounts_a_virtio_disk_and_resets_on_the_builtin_vmm() {
    let Some(assets) = assets() else { return };
    let Some(hv) = kvm() else { return };
    let work = tempfile::tempdir().unwrap();
    let verdict = engine::builtin::speed_verdict(hv.as_ref(), work.path());
    eprintln!("host: {}", verdict.reason);

    let (vmm, console, _channel) =
        boot_to_root_disk(hv.as_ref(), &verdict, assets.join("vmlinux"), work.path());
    // What a stalled VM's log would show, taken while this one boots: every vCPU answers
    // (kicked out of the guest, it reads its own state), the IOAPIC and each virtio device.
    let description = vmm.describe();
    assert_eq!(description.hypervisor_fault, None, "{}", description.text);
    let described = description.text;
    assert!(described.contains("vCPU 0: rip 0x"), "{described}");
    assert!(!described.contains("no answer"), "{described}");
    assert!(described.contains("IOAPIC irr"), "{described}");
    assert!(described.contains("virtio 0 type 2 status"), "{described}");
    let exit = vmm.wait(Duration::from_secs(600));
    let log = std::fs::read_to_string(&console).unwrap_or_default();
    let tail: Vec<&str> = log.lines().rev().take(25).collect();
    let tail = tail.into_iter().rev().collect::<Vec<_>>().join("\n");
    assert_eq!(
        exit,
        Some(vmm::VmExit::Shutdown),
        "the VM did not reset by itself; console:\n{tail}"
    );
    let release = std::fs::read_to_string(assets.join("release")).unwrap_or_default();
    assert!(
        log.contains(&format!("Linux version {}", release.trim())),
        "{tail}"
    );
    assert!(
        log.contains("IOAPIC[0]"),
        "no IOAPIC from the MP table:\n{tail}"
    );
    assert!(
        log.contains("virtio_blk virtio0: [vda]"),
        "virtio-blk not probed:\n{tail}"
    );
    assert!(
        log.contains("VFS: Mounted root (ext4 filesystem) readonly"),
        "root not mounted from the virtio disk:\n{tail}"
    );
    assert!(log.contains("No working init found"), "{tail}");
    // Every virtio device the VMM offers (the console's two ports, virtio-fs, …) probes.
    let failed: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("probe of virtio") && l.contains("failed"))
        .collect();
    assert!(failed.is_empty(), "{failed:?}");
    eprintln!(
        "booted to the root mount and reset in {:?}",
        vmm.started.elapsed()
    );
}

/// The same kernel as a bzImage, through the 64-bit boot protocol: where guest kernel code runs
/// natively it boots to the root mount and reset like the vmlinux.
#[test]
fn the_bzimage_enters_through_the_64_bit_boot_protocol() {
    let Some(assets) = assets() else { return };
    let Some(hv) = kvm() else { return };
    let work = tempfile::tempdir().unwrap();
    let verdict = engine::builtin::speed_verdict(hv.as_ref(), work.path());
    let (mut vmm, console, _channel) =
        boot_to_root_disk(hv.as_ref(), &verdict, assets.join("bzImage"), work.path());
    let log = || std::fs::read_to_string(&console).unwrap_or_default();
    if verdict.native {
        let exit = vmm.wait(Duration::from_secs(120));
        assert_eq!(exit, Some(vmm::VmExit::Shutdown), "console:\n{}", log());
        assert!(
            log().contains("VFS: Mounted root (ext4 filesystem)"),
            "{}",
            log()
        );
        return;
    }
    // Emulated, the xz decompressor alone takes over ten minutes (measured here), too long
    // for CI: check that the 64-bit entry runs, with no fault, reset or emulation failure
    // for 20 s (a wrong zero page, page table or GDT ends the VM at once).
    assert_eq!(
        vmm.wait(Duration::from_secs(20)),
        None,
        "console:\n{}",
        log()
    );
    eprintln!(
        "bzImage running its decompressor after {:?}",
        vmm.started.elapsed()
    );
    vmm.stop();
}

#[test]
fn a_container_runs_on_the_builtin_engine_without_qemu_then_restores_from_its_snapshot() {
    // A cache of its own: the first run must boot (and bake), the second restore.
    let Some((env, _cache)) = Env::with_fresh_cache() else {
        return;
    };
    let Some(hv) = kvm() else { return };
    let probe = tempfile::tempdir().unwrap();
    let verdict = engine::builtin::speed_verdict(hv.as_ref(), probe.path());
    if !verdict.native {
        // Guest user mode needs the kernel variant built for such hosts; `make test` builds
        // it there (kernel-variants), so under make/CI its absence is a failure.
        let variant = env.assets.join(engine::builtin::PVM_KERNEL);
        if !variant.exists() {
            common::missing_prerequisite(&format!(
                "{}; {} is not built: run `make kernel-variants`",
                verdict.reason,
                variant.display()
            ));
            return;
        }
        eprintln!(
            "{}: booting {} (minutes here)",
            verdict.reason,
            variant.display()
        );
    }
    // A QEMU that fails, first on PATH: a silent fallback would show.
    let fake = tempfile::tempdir().unwrap();
    let qemu = fake.path().join("qemu-system-x86_64");
    std::fs::write(
        &qemu,
        "#!/bin/sh\necho 'fake qemu: must not run' >&2\nexit 99\n",
    )
    .unwrap();
    std::fs::set_permissions(&qemu, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        fake.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );

    // Also what the guest made of the console's ports and of the virtio-fs device (a
    // device its driver bound, listed under the driver), and a volume served through that
    // device: read from the host, written back.
    let volume = tempfile::tempdir().unwrap();
    std::fs::write(volume.path().join("in"), "from the host\n").unwrap();
    let mut bundle = env.bundle(&[
        "sh",
        "-c",
        "uname -r; cat /proc/sys/kernel/random/boot_id; cat /sys/class/virtio-ports/*/name; \
         ls /sys/bus/virtio/drivers/virtiofs | grep '^virtio'; grep ' /data ' /proc/mounts | cut -d' ' -f3; \
         cat /data/in; echo \"$(cat /proc/sys/kernel/random/boot_id)\" > /data/out; exit 3",
    ]);
    bundle.edit(|c| {
        c["mounts"].as_array_mut().unwrap().push(serde_json::json!({
            "destination": "/data", "type": "bind", "source": volume.path(),
            "options": ["rbind", "rprivate"],
        }))
    });
    let run = |id: &str| {
        let log = env.root().join(format!("{id}.log"));
        let out = common::output_of(
            env.cmd()
                .env("PATH", &path)
                .env("SUPERMACHINE_ENGINE", "builtin")
                .args(["--debug", "--log", log.to_str().unwrap()])
                .args(["run", "--bundle", bundle.path_str(), id]),
        );
        (out, std::fs::read_to_string(&log).unwrap_or_default())
    };
    let release_file = if verdict.native {
        "release"
    } else {
        "release-pvm"
    };
    let release = std::fs::read_to_string(env.assets.join(release_file)).unwrap();

    let (booted, log) = run("c-builtin");
    assert_eq!(
        booted.status.code(),
        Some(3),
        "stderr: {}",
        text(&booted.stderr)
    );
    let booted_out = text(&booted.stdout);
    let lines: Vec<&str> = booted_out.lines().collect();
    assert_eq!(lines.first().copied(), Some(release.trim()));
    assert_eq!(
        lines.get(2..4),
        Some(&["agent.0", "fs.0"][..]),
        "{booted_out}"
    );
    assert!(
        lines.get(4).is_some_and(|l| l.starts_with("virtio")),
        "no device bound to the virtiofs driver: {booted_out}"
    );
    assert_eq!(
        lines.get(5..7),
        Some(&["virtiofs", "from the host"][..]),
        "the volume is not the host's directory over virtio-fs: {booted_out}"
    );
    assert_eq!(
        std::fs::read_to_string(volume.path().join("out")).unwrap(),
        format!("{}\n", lines[1]),
        "the container's write is not on the host"
    );
    assert!(!text(&booted.stderr).contains("fake qemu"));
    assert!(log.contains("baked snapshot"), "{log}");
    // `run` deletes the container once its process exits, as runc's does.
    env.assert_clean("c-builtin");

    // The second container of the image restores the baked VM: same boot, same kernel.
    let (restored, log) = run("c-builtin-2");
    assert_eq!(
        restored.status.code(),
        Some(3),
        "stderr: {}",
        text(&restored.stderr)
    );
    assert!(log.contains("restore phases"), "{log}");
    for phase in [
        "validate state",
        "memory map",
        "irq/clock state",
        "device state",
        "vCPU state",
    ] {
        assert!(
            log.contains(phase),
            "restore phase {phase} not logged: {log}"
        );
    }
    assert_eq!(
        text(&restored.stdout),
        booted_out,
        "not the baked VM's kernel and boot"
    );
    env.assert_clean("c-builtin-2");

    // The VMM runs in the monitor: its vCPU and device threads are under the system call
    // filter, the monitor's own thread is not.
    let builtin = |cmd: &mut std::process::Command| {
        cmd.env("PATH", &path).env("SUPERMACHINE_ENGINE", "builtin");
    };
    let sleeper = env.bundle(&["sleep", "1000"]);
    let mut create = env.cmd();
    builtin(&mut create);
    let out =
        common::output_of(create.args(["create", "--bundle", sleeper.path_str(), "c-filtered"]));
    assert!(out.status.success(), "create: {}", text(&out.stderr));
    let monitor = env.state("c-filtered")["pid"].as_i64().unwrap();
    let threads: Vec<(String, String, i64)> = std::fs::read_dir(format!("/proc/{monitor}/task"))
        .unwrap()
        .flatten()
        .map(|task| {
            let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
            let field = |name: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .unwrap_or_default()
                    .trim()
                    .to_string()
            };
            let tid = task.file_name().to_str().unwrap().parse().unwrap();
            (field("Name:"), field("Seccomp:"), tid)
        })
        .collect();
    let seccomp_of = |wanted: &dyn Fn(&str, i64) -> bool| -> Vec<&str> {
        threads
            .iter()
            .filter(|(name, _, tid)| wanted(name, *tid))
            .map(|(_, mode, _)| mode.as_str())
            .collect()
    };
    assert_eq!(seccomp_of(&|name, _| name == "vcpu0"), ["2"], "{threads:?}");
    let devices = seccomp_of(&|name, _| name.starts_with("virtio-"));
    assert!(
        !devices.is_empty() && devices.iter().all(|m| *m == "2"),
        "{threads:?}"
    );
    assert_eq!(seccomp_of(&|_, tid| tid == monitor), ["0"], "{threads:?}");
    let out = env.run(&["delete", "--force", "c-filtered"]);
    assert!(out.status.success(), "delete: {}", text(&out.stderr));
    env.assert_clean("c-filtered");

    // A call the filter forbids (the first vCPU forks, for this test only) kills the monitor
    // with its VM, and the start says why.
    let mut run = env.cmd();
    builtin(&mut run);
    let out = common::output_of(run.env("SUPERMACHINE_TEST_VMM_FORBIDDEN_CALL", "1").args([
        "run",
        "--bundle",
        sleeper.path_str(),
        "c-sigsys",
    ]));
    assert!(
        !out.status.success(),
        "ran with a thread its filter should have killed"
    );
    assert!(
        text(&out.stderr).contains("killed by its system call filter (SIGSYS)"),
        "{}",
        text(&out.stderr)
    );
    env.assert_clean("c-sigsys");
}
