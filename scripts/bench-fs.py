#!/usr/bin/env python3
"""Shared filesystems: a container's bound host directory, measured in one run on one host,
with ratios to runc.

    scripts/bench-fs.py SUPERMACHINE [--mib 256] [--files 5000] [--tree 20000]
                        [--timeout SECONDS] [--keep] [--ref-assets DIR]

The workloads are tests/fixtures/fsbench.rs (built here, static), run on a host directory
bound into the guest or container: a sequential write of MIB MiB (fsync'd), a sequential read
of it, create + stat + delete of FILES small files, and a walk (lstat of every entry) of a
TREE-entry tree the host made in the directory beforehand (as `git status` walks a checkout).
Every configuration gets its own directory with the same tree.

Configurations:
  runc                     `runc run` of a bundle from `runc spec` (busybox rootfs, fsbench
                           bound read-only, the directory bound read-write).
  supermachine qemu        the same bundle, `supermachine run` on the qemu engine, restored
                           from the snapshot a warm-up run baked: the share is served by the
                           runtime's FUSE server, relayed by the guest agent over virtio-serial.
  supermachine builtin     the same on the builtin engine, run only where `supermachine
                           features` says that engine runs guest kernel code natively.
  qemu + virtiofsd         reference, as Kata runs it: Debian's QEMU with vhost-user-fs and
                           guest RAM in a shared memfd, virtiofsd (crates.io, built into the
                           cache once) serving the directory; the project's guest kernel with
                           an initramfs of busybox + fsbench.
  qemu 9p                  reference: Debian's QEMU's own virtio-9p server, same guest;
                           needs 9p in the guest kernel.

The qemu-engine rows use the accelerator the engine's probe picked on this host. Reference rows
that cannot run (no network to build virtiofsd, no 9p in the kernel) print why and do not fail
the bench; the runc and supermachine rows do. `--ref-assets DIR` boots the reference rows'
guest from DIR/vmlinux (and reads DIR/config) instead of the project's kernel, e.g. a build
of it with 9p added.
"""

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time

from benchlib import raise_nofile, runc_version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKLOADS = ["seq-write", "seq-read", "small-files", "tree-walk"]
# Same shape as the runtime's default VM (config/vm-defaults.json).
VM_VCPUS = 1
VM_MEMORY_MIB = 256
CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "supermachine")


class NotRun(Exception):
    """A reference configuration that cannot run here; the message says why."""


def log(msg):
    print(f"bench-fs: {msg}", file=sys.stderr, flush=True)


def build_fsbench(out):
    subprocess.run(["rustc", "--edition", "2021", "-O", "-C", "target-feature=+crt-static",
                    os.path.join(ROOT, "tests/fixtures/fsbench.rs"), "-o", out], check=True)
    return out


def make_tree(dir, entries):
    """`entries` entries under dir/tree: directories of up to 100 entries each (the directory
    itself and its small files), like a source checkout."""
    tree = os.path.join(dir, "tree")
    os.makedirs(tree)
    made = 0
    d = 0
    while made < entries:
        sub = os.path.join(tree, f"d{d:04}")
        os.mkdir(sub)
        made += 1
        for i in range(min(99, entries - made)):
            with open(os.path.join(sub, f"f{i:02}.c"), "w") as f:
                f.write(f"int f{d}_{i};\n")
            made += 1
        d += 1


def parse(output, opts, what):
    """Seconds by workload from fsbench's `NAME SECONDS` lines; checks that it walked the whole
    tree (the guest saw every host entry)."""
    seconds = {}
    walked = None
    for line in output.splitlines():
        m = re.match(r"^\s*(seq-write|seq-read|small-files|tree-walk) (\d+(?:\.\d+)?)\s*$", line)
        if m:
            seconds[m.group(1)] = float(m.group(2))
        m = re.match(r"^\s*walked (\d+) entries\s*$", line)
        if m:
            walked = int(m.group(1))
    missing = [w for w in WORKLOADS if w not in seconds]
    if missing:
        raise RuntimeError(f"{what}: fsbench printed no {', '.join(missing)}; output:\n{output[-3000:]}")
    if walked != opts.tree:
        raise RuntimeError(f"{what}: walked {walked} entries of the host's {opts.tree}")
    return seconds


def write_bundle(bundle, fsbench, data, args):
    """A bundle from `runc spec`: busybox rootfs, fsbench bound read-only at /fsbench, the data
    directory read-write at /data (mount targets made in the rootfs, as both runtimes want)."""
    rootfs = os.path.join(bundle, "rootfs")
    if not os.path.isdir(rootfs):
        subprocess.run([os.path.join(ROOT, "scripts/busybox-rootfs.sh"), rootfs], check=True)
        os.makedirs(os.path.join(rootfs, "data"), exist_ok=True)
        open(os.path.join(rootfs, "fsbench"), "w").close()
    config_path = os.path.join(bundle, "config.json")
    if os.path.exists(config_path):
        os.remove(config_path)
    subprocess.run(["runc", "spec", "--bundle", bundle], check=True)
    with open(config_path) as f:
        config = json.load(f)
    config["process"]["terminal"] = False
    config["process"]["args"] = ["/fsbench", *args]
    config["root"]["readonly"] = True
    config["mounts"] += [
        {"destination": "/fsbench", "type": "bind", "source": fsbench, "options": ["rbind", "rprivate", "ro"]},
        {"destination": "/data", "type": "bind", "source": data, "options": ["rbind", "rprivate"]},
    ]
    with open(config_path, "w") as f:
        json.dump(config, f)


def run(cmd, what, timeout, env=None):
    start = time.monotonic()
    try:
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{what}: no exit in {timeout} s")
    if result.returncode != 0:
        raise RuntimeError(f"{what}: {' '.join(cmd)} exited {result.returncode}: {result.stderr[-3000:]}")
    return result.stdout + result.stderr, time.monotonic() - start


def fresh_dir(base, name, opts):
    data = os.path.join(base, f"data-{name}")
    os.makedirs(data)
    make_tree(data, opts.tree)
    return data


def fsbench_args(opts):
    return ["/data", str(opts.mib), str(opts.files)]


def runc_row(base, fsbench, opts):
    bundle = os.path.join(base, "bundle-runc")
    write_bundle(bundle, fsbench, fresh_dir(base, "runc", opts), fsbench_args(opts))
    output, _ = run(["runc", "--root", os.path.join(base, "runc-state"), "run", "--bundle", bundle, "fsbench-runc"],
                    "runc", opts.timeout)
    return parse(output, opts, "runc")


def supermachine_row(base, fsbench, opts, engine):
    """The measured run restores the snapshot the warm-up run (small sizes, no tree) baked."""
    env = dict(os.environ, SUPERMACHINE_ENGINE=engine)
    env.setdefault("SUPERMACHINE_ASSETS_DIR", os.path.join(ROOT, "build/share/supermachine"))
    env["SUPERMACHINE_CACHE_DIR"] = os.path.join(base, f"cache-{engine}")
    root = os.path.join(base, f"sm-state-{engine}")
    bundle = os.path.join(base, f"bundle-{engine}")
    warm = os.path.join(base, f"warm-{engine}")
    os.makedirs(warm)
    write_bundle(bundle, fsbench, warm, ["/data", "1", "10"])
    run([opts.supermachine, "--root", root, "run", "--bundle", bundle, f"fsbench-warm-{engine}"],
        f"supermachine {engine} warm-up", opts.timeout, env)
    write_bundle(bundle, fsbench, fresh_dir(base, engine, opts), fsbench_args(opts))
    log_path = os.path.join(base, f"sm-{engine}.log")
    try:
        output, _ = run([opts.supermachine, "--root", root, "--debug", "--log", log_path, "--log-format", "json",
                         "run", "--bundle", bundle, f"fsbench-{engine}"], f"supermachine {engine}", opts.timeout, env)
    except RuntimeError as e:
        if "Too many open files" in str(e):
            raise RuntimeError(f"{e}\nThe runtime's share server keeps an open file per host inode the guest "
                               f"holds; this host's RLIMIT_NOFILE ({resource.getrlimit(resource.RLIMIT_NOFILE)[1]}) "
                               f"is not above the tree's {opts.tree} entries (--tree smaller, or a higher limit)")
        raise
    with open(log_path) as f:
        if "restore phases" not in f.read():
            raise RuntimeError(f"supermachine {engine}: the measured run did not restore a snapshot (see {log_path})")
    return parse(output, opts, f"supermachine {engine}")


def features(opts):
    env = dict(os.environ)
    env.setdefault("SUPERMACHINE_ASSETS_DIR", os.path.join(ROOT, "build/share/supermachine"))
    result = subprocess.run([opts.supermachine, "features"], env=env, capture_output=True, text=True, check=True)
    return json.loads(result.stdout)["annotations"]


def cpio_newc(entries):
    """An uncompressed newc cpio archive (the guest kernel has no initramfs decompressors) of
    (name, mode, data) entries."""
    out = bytearray()
    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        name_bytes = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name_bytes), 0]
        out += b"070701" + "".join(f"{v:08x}" for v in fields).encode() + name_bytes
        out += b"\0" * (-len(out) % 4)
        out += data
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


def make_initramfs(path, fsbench, mount_cmd, opts):
    """busybox + fsbench + an /init that mounts the shared directory on /data, runs fsbench on
    it and powers off (-no-reboot turns the reboot into QEMU's exit)."""
    busybox = shutil.which("busybox") or "/bin/busybox"
    init = f"""#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
if {mount_cmd} /data; then
  /fsbench {' '.join(fsbench_args(opts))}
  echo "bench-init: fsbench exited $?"
else
  echo "bench-init: mount failed"
fi
/bin/busybox sync
/bin/busybox reboot -f
"""
    with open(busybox, "rb") as f:
        busybox_bytes = f.read()
    with open(fsbench, "rb") as f:
        fsbench_bytes = f.read()
    entries = [("bin", 0o40755, b""), ("bin/busybox", 0o100755, busybox_bytes), ("proc", 0o40755, b""),
               ("data", 0o40755, b""), ("fsbench", 0o100755, fsbench_bytes), ("init", 0o100755, init.encode())]
    with open(path, "wb") as f:
        f.write(cpio_newc(entries))


def qemu_boot(base, name, kernel, initramfs, accel, devices, opts):
    """Boots Debian's QEMU (microvm, like the engine's) with `devices`, returns the console."""
    console = os.path.join(base, f"{name}-console.log")
    qemu = "/usr/bin/qemu-system-x86_64"
    if not os.access(qemu, os.X_OK):
        raise NotRun(f"{qemu} is missing (Debian package qemu-system-x86)")
    cmd = [qemu, "-M", "microvm,acpi=off,x-option-roms=off,memory-backend=mem", "-nodefaults", "-no-user-config",
           "-display", "none", "-no-reboot", "-accel", accel, "-cpu", "max" if accel == "tcg" else "host",
           "-smp", str(VM_VCPUS), "-m", f"{VM_MEMORY_MIB}M",
           "-object", f"memory-backend-memfd,id=mem,size={VM_MEMORY_MIB}M,share=on",
           "-kernel", kernel, "-initrd", initramfs,
           "-append", "console=ttyS0 reboot=t panic=-1 quiet rdinit=/init",
           "-serial", f"file:{console}", *devices]
    start = time.monotonic()
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=opts.timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{name}: the VM did not power off in {opts.timeout} s")
    elapsed = time.monotonic() - start
    with open(console, errors="replace") as f:
        output = f.read()
    if result.returncode != 0:
        raise RuntimeError(f"{name}: QEMU exited {result.returncode}: {result.stderr[-2000:]}\n{output[-2000:]}")
    seconds = parse(output, opts, name)
    # The guest's clock measured these; a guest whose clock ran fast would look faster than
    # the whole VM's life did on the host's.
    if sum(seconds.values()) > elapsed:
        raise RuntimeError(f"{name}: the guest's clock says {sum(seconds.values()):.1f} s of workloads in a VM "
                           f"that lived {elapsed:.1f} s")
    return seconds


def guest_kernel(assets):
    for name in ["vmlinux", "bzImage"]:
        path = os.path.join(assets, name)
        if os.path.exists(path):
            return path
    raise NotRun(f"no guest kernel in {assets} (make guest)")


def kernel_has(assets, options):
    """Which of `options` the guest kernel's build config lacks."""
    try:
        with open(os.path.join(assets, "config")) as f:
            config = set(line.strip() for line in f)
    except OSError as e:
        raise NotRun(f"cannot read the guest kernel's config: {e}")
    return [o for o in options if f"{o}=y" not in config]


def ensure_virtiofsd():
    """virtiofsd from crates.io, built into the cache once (it needs Debian's libseccomp-dev
    and libcap-ng-dev)."""
    root = os.path.join(CACHE, "virtiofsd")
    binary = os.path.join(root, "bin", "virtiofsd")
    if os.access(binary, os.X_OK):
        return binary
    missing = [p for p in ["libseccomp-dev", "libcap-ng-dev"]
               if "install ok installed" not in subprocess.run(["dpkg-query", "-W", "-f=${Status}", p],
                                                               capture_output=True, text=True).stdout]
    if missing:
        if os.geteuid() != 0:
            raise NotRun(f"building virtiofsd needs {' '.join(missing)} (not root: cannot install them)")
        log(f"installing {' '.join(missing)} for virtiofsd")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        if subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode != 0:
            raise NotRun(f"apt-get install {' '.join(missing)} failed")
    log(f"building virtiofsd from crates.io into {root} (once per machine)")
    result = subprocess.run(["cargo", "install", "--locked", "virtiofsd", "--root", root], capture_output=True, text=True)
    if result.returncode != 0 or not os.access(binary, os.X_OK):
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        raise NotRun(f"cargo install virtiofsd failed: {lines[-1] if lines else result.returncode}")
    return binary


def virtiofsd_row(base, fsbench, opts, assets, accel):
    kernel = guest_kernel(assets)
    lacking = kernel_has(assets, ["CONFIG_VIRTIO_FS"])
    if lacking:
        raise NotRun(f"guest kernel lacks {', '.join(lacking)}")
    virtiofsd = ensure_virtiofsd()
    data = fresh_dir(base, "virtiofsd", opts)
    socket = os.path.join(base, "virtiofsd.sock")
    initramfs = os.path.join(base, "virtiofs.cpio")
    make_initramfs(initramfs, fsbench, "/bin/busybox mount -t virtiofs bench", opts)
    # Kata's defaults: metadata and data cached in the guest while nothing else changes them
    # (cache=auto), one thread serving the queue.
    daemon_log = open(os.path.join(base, "virtiofsd.log"), "w")
    daemon = subprocess.Popen([virtiofsd, "--socket-path", socket, "--shared-dir", data, "--cache", "auto",
                               "--thread-pool-size", "1", "--announce-submounts"],
                              stdout=daemon_log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(socket):
            if daemon.poll() is not None or time.monotonic() > deadline:
                daemon_log.flush()
                with open(daemon_log.name) as f:
                    raise RuntimeError(f"virtiofsd did not start: {f.read()[-2000:]}")
            time.sleep(0.05)
        return qemu_boot(base, "qemu+virtiofsd", kernel, initramfs, accel,
                         ["-chardev", f"socket,id=vfs,path={socket}",
                          "-device", "vhost-user-fs-device,chardev=vfs,tag=bench"], opts)
    finally:
        if daemon.poll() is None:
            daemon.terminate()
            try:
                daemon.wait(timeout=10)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        daemon_log.close()


def ninep_row(base, fsbench, opts, assets, accel):
    kernel = guest_kernel(assets)
    lacking = kernel_has(assets, ["CONFIG_NET_9P", "CONFIG_NET_9P_VIRTIO", "CONFIG_9P_FS"])
    if lacking:
        raise NotRun(f"the guest kernel has no 9p ({', '.join(lacking)} not set; config/guest-kernel.config)")
    data = fresh_dir(base, "9p", opts)
    initramfs = os.path.join(base, "9p.cpio")
    make_initramfs(initramfs, fsbench,
                   "/bin/busybox mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 bench", opts)
    return qemu_boot(base, "qemu 9p", kernel, initramfs, accel,
                     ["-fsdev", f"local,id=fs9,path={data},security_model=passthrough",
                      "-device", "virtio-9p-device,fsdev=fs9,mount_tag=bench"], opts)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("supermachine")
    parser.add_argument("--mib", type=int, default=256, help="sequential write/read size (MiB)")
    parser.add_argument("--files", type=int, default=5000, help="small files created, stat'd, deleted")
    parser.add_argument("--tree", type=int, default=20000, help="entries of the tree walked")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds a configuration may take")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, consoles)")
    parser.add_argument("--ref-assets", help="directory of the reference rows' guest kernel (vmlinux, config)")
    opts = parser.parse_args()
    if shutil.which("runc") is None:
        sys.exit("bench-fs: runc is not installed (Debian package runc)")
    assets = os.environ.get("SUPERMACHINE_ASSETS_DIR", os.path.join(ROOT, "build/share/supermachine"))
    started = time.monotonic()
    nofile = raise_nofile()
    # On disk, not a tmpfs /tmp: the host side of every share is a real filesystem.
    base = tempfile.mkdtemp(prefix="sm-bench-fs-", dir="/var/tmp")
    rows = []  # (label, description, seconds by workload | "not run: …")
    try:
        fsbench = build_fsbench(os.path.join(base, "fsbench"))
        annotations = features(opts)
        reason = annotations.get("run.supermachine.engine.reason", "")
        # The reference VMs use the accelerator the qemu engine's probe picked.
        engine = annotations.get("run.supermachine.engine", "")
        accel = engine.split("-", 1)[1] if engine.startswith("qemu-") else "tcg"

        log("runc")
        rows.append(("runc", f"runc {runc_version()}: `runc run`, bind mount, host kernel", runc_row(base, fsbench, opts)))
        log("supermachine, qemu engine")
        rows.append(("supermachine qemu", "supermachine run, qemu engine, restored snapshot: FUSE in the guest, "
                     "requests relayed by the agent over virtio-serial to the runtime's FUSE server",
                     supermachine_row(base, fsbench, opts, "qemu")))
        native = annotations.get("run.supermachine.builtin.native", "unavailable")
        builtin_what = ("supermachine run, builtin engine, restored snapshot: in-process virtio-fs device, "
                        "the same FUSE server")
        if native == "true":
            log("supermachine, builtin engine")
            rows.append(("supermachine builtin", builtin_what, supermachine_row(base, fsbench, opts, "builtin")))
        else:
            why = ("this host's KVM emulates guest kernel code (PVM): not comparable" if native == "false"
                   else "no usable /dev/kvm")
            rows.append(("supermachine builtin", builtin_what, f"not run: {why}"))
        kernel_name = (f"guest kernel from {opts.ref_assets}" if opts.ref_assets
                       else "the project's guest kernel")
        for label, description, row in [
            ("qemu+virtiofsd", f"reference, as Kata runs it: Debian QEMU {qemu_version()} (-accel {accel}) "
             "vhost-user-fs-device, guest RAM in a shared memfd, virtiofsd --cache auto --thread-pool-size 1; "
             f"{kernel_name}, busybox initramfs", virtiofsd_row),
            ("qemu 9p", f"reference: Debian QEMU {qemu_version()} (-accel {accel}) virtio-9p-device, "
             "security_model=passthrough, 9p2000.L msize=512000; same guest", ninep_row),
        ]:
            log(label)
            try:
                rows.append((label, description, row(base, fsbench, opts, opts.ref_assets or assets, accel)))
            except (NotRun, RuntimeError, OSError, subprocess.SubprocessError) as e:
                rows.append((label, description, f"not run: {e}"))

        print(f"\nshared filesystem: fsbench in the container/guest on a bound host directory, "
              f"{VM_VCPUS} vCPU {VM_MEMORY_MIB} MiB VMs, RLIMIT_NOFILE {nofile}; qemu engine: {engine}")
        heads = [f"write {opts.mib} MiB", f"read {opts.mib} MiB", f"{opts.files} files", f"walk {opts.tree}"]
        print(f"{'seconds (x runc)':<22}" + "".join(f"{h:>20}" for h in heads))
        runc_seconds = rows[0][2]
        for label, _, seconds in rows:
            if isinstance(seconds, str):
                print(f"{label:<22}  {seconds.splitlines()[0][:200]}")
                continue
            cells = []
            for w in WORKLOADS:
                ratio = seconds[w] / runc_seconds[w] if runc_seconds[w] > 0 else float("inf")
                cells.append(f"{seconds[w]:.3f}" + ("" if label == "runc" else f" ({ratio:.1f}x)"))
            print(f"{label:<22}" + "".join(f"{c:>20}" for c in cells))
        print()
        for label, description, _ in rows:
            print(f"  {label}: {description}")
        print(f"  workloads: write = sequential 1 MiB writes + fsync; read = the same file read back "
              f"(1 MiB reads); files = create, stat, delete each; walk = lstat of every entry of a tree "
              f"the host made (directories of 100 entries)")
        print(f"\nbench-fs: {time.monotonic() - started:.0f} s")
    except RuntimeError as e:
        sys.exit(f"bench-fs: {e}")
    finally:
        for engine in ["qemu", "builtin"]:
            root = os.path.join(base, f"sm-state-{engine}")
            if os.path.isdir(root):
                for cid in os.listdir(root):
                    subprocess.run([opts.supermachine, "--root", root, "delete", "--force", cid],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        runc_root = os.path.join(base, "runc-state")
        if os.path.isdir(runc_root):
            subprocess.run(["runc", "--root", runc_root, "delete", "--force", "fsbench-runc"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if opts.keep:
            log(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)






def qemu_version():
    try:
        out = subprocess.run(["/usr/bin/qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout
    except OSError:
        return "(missing)"
    m = re.search(r"version (\S+)", out)
    return m.group(1) if m else "?"


if __name__ == "__main__":
    main()
