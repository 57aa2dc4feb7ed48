#!/usr/bin/env python3
"""Builtin VMM vs QEMU: a cold boot of the guest kernel to its root mount and reset, by phase,
and the VMM's resident memory beyond the guest's own pages, measured in one run.

    scripts/bench-builtin.py ASSETS_DIR

Both boot the same vmlinux with the same disk (an ext4 with no init, so the kernel panics and
resets right after mounting it) and kernel arguments; QEMU uses the accelerator its probe
chose (`supermachine features`). Phases: VMM start-up (builtin: until its vCPU runs; QEMU:
until its first console byte is possible, reported as process start to first byte), first
console byte, root mounted, reset.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def kib(pid, field):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def qemu_boot(kernel, disk, args, accel):
    with tempfile.TemporaryDirectory() as tmp:
        console = os.path.join(tmp, "console.log")
        cmd = [
            # The machine options of the qemu engine (crates/engine/src/qemu.rs).
            "qemu-system-x86_64", "-M", "microvm,acpi=off,x-option-roms=off,memory-backend=mem",
            "-accel", accel, "-cpu", "max" if accel == "tcg" else "host", "-m", "128",
            "-smp", "1", "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
            "-object", "memory-backend-memfd,id=mem,size=128M,share=on",
            "-kernel", kernel, "-append", f"console=ttyS0 reboot=t panic=-1 root=/dev/vda ro {args}",
            "-serial", f"file:{console}",
            "-drive", f"id=disk,file={disk},format=raw,if=none,readonly=on",
            "-device", "virtio-blk-device,drive=disk",
        ]
        start = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        first = mounted = None
        peak = 0
        while proc.poll() is None and time.monotonic() - start < 300:
            text = open(console, errors="replace").read() if os.path.exists(console) else ""
            now = (time.monotonic() - start) * 1e3
            if first is None and text:
                first = now
            if mounted is None and "VFS: Mounted root" in text:
                mounted = now
            peak = max(peak, kib(proc.pid, "VmRSS:") - kib(proc.pid, "RssShmem:"))
            time.sleep(0.005)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        total = (time.monotonic() - start) * 1e3
        return {
            "vmm_start_ms": None,
            "first_console_byte_ms": first,
            "root_mounted_ms": mounted,
            "reset_ms": total,
            "vmm_rss_beyond_guest_kib": peak,
        }


def runc_run_ms(rootfs):
    """`runc run` of `true` on the same root filesystem: the reference the ratios are against."""
    with tempfile.TemporaryDirectory() as tmp:
        bundle = os.path.join(tmp, "bundle")
        os.makedirs(bundle)
        subprocess.run(["runc", "spec"], cwd=bundle, check=True)
        config = json.load(open(os.path.join(bundle, "config.json")))
        config["root"]["path"] = rootfs  # runc refuses a symlinked rootfs
        config["process"]["args"] = ["true"]
        config["process"]["terminal"] = False
        json.dump(config, open(os.path.join(bundle, "config.json"), "w"))
        start = time.monotonic()
        subprocess.run(["runc", "--root", os.path.join(tmp, "state"), "run", "--bundle", bundle,
                        "bench-runc"], check=True, stdin=subprocess.DEVNULL)
        return (time.monotonic() - start) * 1e3


def container_phases(engine, rootfs):
    """`supermachine run` of `true` on ENGINE, booting cold: the monitor's boot phases (ms)."""
    sm = os.path.join(ROOT, "build/bin/supermachine")
    with tempfile.TemporaryDirectory() as tmp:
        bundle = os.path.join(tmp, "bundle")
        os.makedirs(bundle)
        os.symlink(rootfs, os.path.join(bundle, "rootfs"))
        subprocess.run([sm, "spec"], cwd=bundle, check=True)
        config = json.load(open(os.path.join(bundle, "config.json")))
        config["process"]["args"] = ["true"]
        config["process"]["terminal"] = False
        # No network namespace: the same device set on both engines.
        config["linux"]["namespaces"] = [n for n in config["linux"]["namespaces"]
                                         if n["type"] != "network"]
        json.dump(config, open(os.path.join(bundle, "config.json"), "w"))
        log = os.path.join(tmp, "log.json")
        env = dict(os.environ, SUPERMACHINE_ENGINE=engine)
        start = time.monotonic()
        subprocess.run([sm, "--root", os.path.join(tmp, "state"), "--debug", "--log", log,
                        "--log-format", "json", "--snapshots", "off", "run", "--bundle", bundle,
                        f"bench-{engine}"], env=env, check=True, stdin=subprocess.DEVNULL)
        total = (time.monotonic() - start) * 1e3
        phases = {"run_ms": total}
        for line in open(log):
            msg = json.loads(line).get("msg", "")
            m = re.search(r"boot phases: vmm=([\d.]+)ms kernel=([\d.]+)ms agent=([\d.]+)ms", msg)
            if m:
                phases.update(zip(["vmm_ms", "kernel_ms", "agent_ms"], map(float, m.groups())))
        return phases


def main():
    assets = sys.argv[1]
    kernel = os.path.join(assets, "vmlinux")
    features = json.loads(subprocess.run(
        [os.path.join(ROOT, "build/bin/supermachine"), "features"],
        capture_output=True, text=True, check=True).stdout)["annotations"]
    native = features.get("run.supermachine.builtin.native") == "true"
    reason = features.get("run.supermachine.engine.reason", "")
    accel = "kvm" if "accel kvm" in reason else "tcg"
    extra = ""
    if not native:
        # Same arguments the builtin engine adds on such hosts (crates/engine/src/builtin.rs).
        src = open(os.path.join(ROOT, "crates/engine/src/builtin.rs")).read()
        start = src.index("EMULATED_KERNEL_ARGS: &str =")
        extra = src[start:].split('"')[1]
    subprocess.run(["cargo", "build", "-q", "--release", "-p", "vmm", "--example", "bench"],
                   cwd=ROOT, check=True)
    with tempfile.TemporaryDirectory() as tmp:
        tree = os.path.join(tmp, "tree")
        os.makedirs(os.path.join(tree, "etc"))
        disk = os.path.join(tmp, "disk.ext4")
        subprocess.run(["mkfs.ext4", "-q", "-F", "-d", tree, disk, "8M"], check=True)
        out = subprocess.run(
            [os.path.join(ROOT, "target/release/examples/bench"), kernel, disk] + extra.split(),
            capture_output=True, text=True, check=True).stdout
        builtin = json.loads(out.strip().splitlines()[-1])
        # QEMU gets the kernel arguments the qemu engine would give (none extra): the ones
        # for emulating KVM hosts are the builtin engine's.
        qemu = qemu_boot(kernel, disk, "", accel)

    print(f"\nguest kernel cold boot to root mount and reset: builtin VMM vs qemu ({accel})")
    print(f"host: builtin {'runs guest kernel code natively' if native else 'on a KVM that emulates guest kernel code'}")
    rows = [
        ("VMM start-up (ms)", "vmm_start_ms"),
        ("first console byte (ms)", "first_console_byte_ms"),
        ("root mounted (ms)", "root_mounted_ms"),
        ("reset, VM gone (ms)", "reset_ms"),
        ("VMM RSS beyond guest (KiB)", "vmm_rss_beyond_guest_kib"),
    ]
    fmt = lambda v: "-" if v is None else f"{v:.1f}"
    print(f"{'':30}{'builtin':>12}{'qemu':>12}{'builtin/qemu':>14}")
    for label, key in rows:
        b, q = builtin.get(key), qemu.get(key)
        ratio = f"{b / q:.2f}x" if b and q else "-"
        print(f"{label:30}{fmt(b):>12}{fmt(q):>12}{ratio:>14}")
    print("target: VMM RSS beyond guest <= 5120 KiB (Firecracker's figure)")

    rootfs = os.path.join(ROOT, "target/sm-test/rootfs")
    if not os.path.exists(os.path.join(rootfs, "bin/busybox")):
        subprocess.run([os.path.join(ROOT, "scripts/busybox-rootfs.sh"), rootfs], check=True)
    engines = {e: container_phases(e, rootfs) for e in ("builtin", "qemu")}
    print("\n`supermachine run` of `true`, cold boot (no snapshot), ms from the monitor's start")
    print(f"{'':30}{'builtin':>12}{'qemu':>12}{'builtin/qemu':>14}")
    for label, key in [("VMM started", "vmm_ms"), ("kernel entry", "kernel_ms"),
                       ("agent ready", "agent_ms"), ("whole run (wall)", "run_ms")]:
        b, q = engines["builtin"].get(key), engines["qemu"].get(key)
        ratio = f"{b / q:.2f}x" if b and q else "-"
        print(f"{label:30}{fmt(b):>12}{fmt(q):>12}{ratio:>14}")
    runc = runc_run_ms(rootfs)
    print(f"runc run of `true` (wall): {runc:.1f} ms; builtin {engines['builtin']['run_ms'] / runc:.1f}x, "
          f"qemu {engines['qemu']['run_ms'] / runc:.1f}x runc")


if __name__ == "__main__":
    main()
