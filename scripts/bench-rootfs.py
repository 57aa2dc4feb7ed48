#!/usr/bin/env python3
"""The container's root filesystem: reads of the image, writes, and the guest memory they
cost, measured in one run on one host, with ratios to runc, before and after the change that
sent a container's rootfs writes to the bundle's root on the host (4a45595).

    scripts/bench-rootfs.py SUPERMACHINE [--tree 20000] [--mib 50] [--write-mib 200]
                            [--before-rev 6cf6ebc] [--timeout SECONDS] [--keep]

The image is built once: a host directory (the "lower layer") with the busybox rootfs, a tree
of TREE entries under /usr/share/tree (directories of 100 small files, like a source
checkout), MIB MiB of 1 MiB random files under /data, and the workload program
(tests/fixtures/rootfsbench.rs, built here, static) at /rootfsbench. Each configuration's
bundle root is an overlay mount of that directory with empty upper and work directories of its
own, as docker and containerd mount a container's root, except where it says "plain
directory" (a copy of it, as a `runc spec` bundle has it).

Workloads, one container process in this order: walk the tree (lstat of every entry); read
every file under /data; write WRITE_MIB MiB to /written in 1 MiB writes and fsync it; read
/proc/meminfo; then hold a few seconds while the host measures the VM's QEMU process.

Configurations (all supermachine rows: qemu engine, the measured run restores the snapshot
a warm-up run of the same bundle baked, and a cache directory of the row's own):
  runc                          `runc run` of the overlay-root bundle.
  supermachine before           the runtime and guest agent of --before-rev (the parent of
                                4a45595 by default), built once into
                                ~/.cache/supermachine/bench-before-REV (a detached git
                                worktree; the current assets' kernel and QEMU linked beside
                                its agent): the guest root is an overlay of a disk image of the
                                whole bundle root, its upper layer a tmpfs in guest memory.
  supermachine                  this runtime, overlay-root bundle: the guest overlay's lower
                                layer is a disk image of the host overlay's lower layers, its
                                upper layer the host overlay's upper directory through the
                                share (FUSE in the guest, relayed by the agent over
                                virtio-serial to the runtime's FUSE server).
  supermachine, plain dir       this runtime, plain-directory root: the whole root is the share.

Reported: seconds of the walk and the read, the write in MB/s (ratios are times runc's time);
guest memory in use after the write (MemTotal - MemAvailable) and its Shmem (where a tmpfs
keeps what was written), both meaningless for runc (the host's /proc/meminfo); the RSS of the
VM's QEMU process on the host (every guest page the guest has touched, its page cache
included); and whether the written file is in the bundle's root on the host afterwards. A write that fails (a tmpfs upper layer fills up half the guest's memory)
shows how far it got. If the before revision cannot be built, its row says why and the bench
goes on.
"""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from benchlib import children, memory_of, raise_nofile, runc_version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "supermachine")
DEFAULT_BEFORE_REV = "6cf6ebc"
# Same shape as the runtime's default VM (config/vm-defaults.json).
VM_VCPUS = 1
VM_MEMORY_MIB = 256
# Seconds the container holds after its measurements, for the host's.
HOLD_SECONDS = 3
BIG_FILE_MIB = 1


class NotRun(Exception):
    """A configuration that cannot run here; the message says why."""


def log(msg):
    print(f"bench-rootfs: {msg}", file=sys.stderr, flush=True)


def build_fixture(out):
    subprocess.run(["rustc", "--edition", "2021", "-O", "-C", "target-feature=+crt-static",
                    os.path.join(ROOT, "tests/fixtures/rootfsbench.rs"), "-o", out], check=True)
    return out


def make_lower(lower, fixture, opts):
    """The image: busybox, the tree, the data files and the workload program."""
    subprocess.run([os.path.join(ROOT, "scripts/busybox-rootfs.sh"), lower], check=True)
    tree = os.path.join(lower, "usr/share/tree")
    os.makedirs(tree)
    # The walk counts what is under the tree: directories of 100 entries (itself and 99 files).
    made = d = 0
    while made < opts.tree:
        sub = os.path.join(tree, f"d{d:04}")
        os.mkdir(sub)
        made += 1
        for i in range(min(99, opts.tree - made)):
            with open(os.path.join(sub, f"f{i:02}.c"), "w") as f:
                f.write(f"int f{d}_{i};\n")
            made += 1
        d += 1
    data = os.path.join(lower, "data")
    os.makedirs(data)
    for i in range(opts.mib // BIG_FILE_MIB):
        with open(os.path.join(data, f"blob{i:03}"), "wb") as f:
            f.write(os.urandom(BIG_FILE_MIB << 20))
    shutil.copy(fixture, os.path.join(lower, "rootfsbench"))


def mount_overlay(lower, layer, target):
    """`target` as docker mounts a container's root: the image's layers under an upper and a
    work directory of the container's own."""
    upper, work = os.path.join(layer, "upper"), os.path.join(layer, "work")
    for d in [upper, work, target]:
        os.makedirs(d)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lower},upperdir={upper},workdir={work}",
                    target], check=True)
    return upper


def write_config(bundle, args):
    config_path = os.path.join(bundle, "config.json")
    if os.path.exists(config_path):
        os.remove(config_path)
    subprocess.run(["runc", "spec", "--bundle", bundle], check=True)
    with open(config_path) as f:
        config = json.load(f)
    config["process"]["terminal"] = False
    config["process"]["args"] = args
    config["root"]["readonly"] = False
    with open(config_path, "w") as f:
        json.dump(config, f)


def workload_args(opts):
    return ["/rootfsbench", "/usr/share/tree", "/data", "/written", str(opts.write_mib), str(HOLD_SECONDS)]


class Bench:
    """The work directory and everything made in it, undone by `cleanup`."""

    def __init__(self, opts):
        self.opts = opts
        # On disk, not a tmpfs /tmp: the host side of every root is a real filesystem.
        self.base = tempfile.mkdtemp(prefix="sm-bench-rootfs-", dir="/var/tmp")
        self.state_roots = []  # (supermachine binary, state root, env)
        self.processes = []

    def path(self, *names):
        return os.path.join(self.base, *names)

    def bundle(self, name, lower, plain):
        """A bundle whose root is an overlay of `lower` (or a copy of it); returns the bundle and
        the host directory the container's writes are expected in."""
        bundle = self.path(f"bundle-{name}")
        os.makedirs(bundle)
        rootfs = os.path.join(bundle, "rootfs")
        if plain:
            subprocess.run(["cp", "-a", lower, rootfs], check=True)
            return bundle, rootfs
        return bundle, mount_overlay(lower, self.path(f"layer-{name}"), rootfs)

    def measure(self, cmd, what, env, vmm_of):
        """Runs the workload's container to its end; its lines, and the VMM's memory measured
        when it said `ready` (`vmm_of` finds the VMM's pids, or is None)."""
        process = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.processes.append(process)
        lines = []
        ready = threading.Event()

        def read():
            for line in process.stdout:
                lines.append(line.rstrip("\n"))
                if line.strip() == "ready":
                    ready.set()
            ready.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        vmm = None
        if not ready.wait(self.opts.timeout):
            raise RuntimeError(f"{what}: no `ready` in {self.opts.timeout} s; output:\n" + "\n".join(lines[-30:]))
        if vmm_of is not None and process.poll() is None:
            vmm = memory_of(vmm_of())
        try:
            process.wait(self.opts.timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{what}: no exit in {self.opts.timeout} s")
        reader.join(10)
        output = "\n".join(lines)
        if process.returncode != 0:
            raise RuntimeError(f"{what}: {' '.join(cmd)} exited {process.returncode}: {output[-3000:]}")
        return output, vmm

    def runc_row(self, lower):
        bundle, upper = self.bundle("runc", lower, plain=False)
        write_config(bundle, workload_args(self.opts))
        state = self.path("runc-state")
        output, _ = self.measure(["runc", "--root", state, "run", "--bundle", bundle, "rootfsbench-runc"], "runc",
                                 None, None)
        return parse(output, self.opts, "runc", upper, guest=False)

    def supermachine_row(self, name, supermachine, assets, lower, plain):
        """The measured run restores the snapshot the warm-up run (the same bundle, a process
        that exits at once) baked."""
        env = dict(os.environ, SUPERMACHINE_ENGINE="qemu", SUPERMACHINE_ASSETS_DIR=assets,
                   SUPERMACHINE_CACHE_DIR=self.path(f"cache-{name}"))
        state = self.path(f"sm-state-{name}")
        self.state_roots.append((supermachine, state, env))
        bundle, written_dir = self.bundle(name, lower, plain)
        write_config(bundle, ["/rootfsbench", "noop"])
        result = subprocess.run([supermachine, "--root", state, "run", "--bundle", bundle, f"rootfs-warm-{name}"],
                                env=env, capture_output=True, text=True, timeout=self.opts.timeout)
        if result.returncode != 0:
            raise RuntimeError(f"supermachine {name} warm-up exited {result.returncode}: {result.stderr[-3000:]}")
        write_config(bundle, workload_args(self.opts))
        log_path = self.path(f"sm-{name}.log")
        cid = f"rootfs-{name}"
        output, vmm = self.measure([supermachine, "--root", state, "--debug", "--log", log_path, "--log-format", "json",
                                    "run", "--bundle", bundle, cid], f"supermachine {name}", env,
                                   lambda: vmm_pids(supermachine, state, cid, env))
        with open(log_path) as f:
            if "restore phases" not in f.read():
                raise RuntimeError(f"supermachine {name}: the measured run did not restore a snapshot (see {log_path})")
        row = parse(output, self.opts, f"supermachine {name}", written_dir, guest=True)
        row["vmm"] = vmm
        return row

    def cleanup(self):
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        for supermachine, root, env in self.state_roots:
            if os.path.isdir(root):
                for cid in os.listdir(root):
                    subprocess.run([supermachine, "--root", root, "delete", "--force", cid], env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        runc_state = self.path("runc-state")
        if os.path.isdir(runc_state):
            subprocess.run(["runc", "--root", runc_state, "delete", "--force", "rootfsbench-runc"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        unmount_under(self.base)
        if self.opts.keep:
            log(f"kept {self.base}")
        elif not mounts_under(self.base):
            shutil.rmtree(self.base, ignore_errors=True)
        else:
            log(f"{self.base} still has mounts: {', '.join(mounts_under(self.base))}; not removed")


def mounts_under(base):
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    # mountinfo escapes blanks as octal; the work directory has none.
    return [p for p in points if p == base or p.startswith(base + "/")]


def unmount_under(base):
    """Every mount under `base`, the deepest first; the runtime may have mounted a root overlay
    anew over the one this script made."""
    for _ in range(20):
        points = sorted(set(mounts_under(base)), key=len, reverse=True)
        if not points:
            return
        for point in points:
            if subprocess.run(["umount", point], stderr=subprocess.DEVNULL).returncode != 0:
                subprocess.run(["umount", "-l", point], stderr=subprocess.DEVNULL)


def parse(output, opts, what, written_dir, guest):
    """The workload's measurements; checks that it walked the whole tree and read every byte."""
    values = {}
    for line in output.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] in ("tree-walk", "read-files", "seq-write"):
            values[fields[0]] = float(fields[1])
        elif len(fields) == 3 and fields[0] == "walked":
            values["walked"] = int(fields[1])
        elif len(fields) == 2 and fields[0] == "read-bytes":
            values["read-bytes"] = int(fields[1])
        elif len(fields) >= 3 and fields[0] == "write-failed":
            values["write-failed"] = (int(fields[1]), float(fields[2]), " ".join(fields[3:]))
        elif len(fields) == 3 and fields[0] == "meminfo":
            values[fields[1]] = int(fields[2])
    missing = [k for k in ["tree-walk", "read-files", "MemTotal", "MemAvailable", "Shmem"] if k not in values]
    if "seq-write" not in values and "write-failed" not in values:
        missing.append("seq-write")
    if missing:
        raise RuntimeError(f"{what}: the workload printed no {', '.join(missing)}; output:\n{output[-3000:]}")
    if values.get("walked") != opts.tree:
        raise RuntimeError(f"{what}: walked {values.get('walked')} entries of the image's {opts.tree}")
    expected = (opts.mib // BIG_FILE_MIB) * (BIG_FILE_MIB << 20)
    if values.get("read-bytes") != expected:
        raise RuntimeError(f"{what}: read {values.get('read-bytes')} bytes of the image's {expected}")
    written = os.path.join(written_dir, "written")
    values["on host"] = os.path.isfile(written) and os.path.getsize(written) == opts.write_mib << 20
    values["guest"] = guest
    return values






def is_qemu(pid):
    try:
        return os.path.basename(os.readlink(f"/proc/{pid}/exe")).startswith("qemu-system")
    except OSError:
        return False


def vmm_pids(supermachine, state_root, cid, env):
    """The container's QEMU process: a descendant of the monitor `state` names."""
    result = subprocess.run([supermachine, "--root", state_root, "state", cid], env=env, capture_output=True,
                            text=True)
    try:
        monitor = int(json.loads(result.stdout)["pid"])
    except (ValueError, KeyError, TypeError):
        return []
    found, queue = [], [monitor]
    while queue:
        pid = queue.pop()
        if is_qemu(pid):
            found.append(pid)
        queue.extend(children(pid))
    return found


def git(*args, cwd=ROOT):
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)


def before_build(rev, assets):
    """The supermachine binary and an assets directory of revision `rev`: its runtime and guest
    agent, built once into the cache (a detached git worktree); the kernel and QEMU are the
    current assets'."""
    resolved = git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    if resolved.returncode != 0:
        raise NotRun(f"{rev} is not a commit of {ROOT}")
    commit = resolved.stdout.strip()
    short = git("rev-parse", "--short=7", commit).stdout.strip() or commit[:7]
    tree = os.path.join(CACHE, f"bench-before-{short}")
    before_assets = os.path.join(tree, "assets")
    binary = os.path.join(tree, "target/release/supermachine")
    marker = os.path.join(before_assets, ".bench-built")
    if not os.path.exists(os.path.join(tree, ".git")):
        if os.path.exists(tree):
            raise NotRun(f"{tree} exists and is not a git worktree")
        log(f"checking out {short} into {tree}")
        added = git("worktree", "add", "--detach", tree, commit)
        if added.returncode != 0:
            raise NotRun(f"git worktree add {tree} {short}: {added.stderr.strip()}")
    if git("rev-parse", "HEAD", cwd=tree).stdout.strip() != commit:
        raise NotRun(f"{tree} is not at {commit}")
    built = False
    try:
        with open(marker) as f:
            built = f.read().strip() == commit and os.access(binary, os.X_OK)
    except OSError:
        pass
    if not built:
        log(f"building {short}'s runtime and guest agent in {tree} (once; minutes)")
        # Its own target directory: build-agent.sh looks for the agent there.
        env = dict(os.environ, CARGO_TARGET_DIR=os.path.join(tree, "target"))
        for what, cmd in [("cargo build", ["cargo", "build", "--release", "--locked", "--bin", "supermachine"]),
                          ("build-agent.sh", ["scripts/build-agent.sh", before_assets])]:
            result = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
            if result.returncode != 0:
                lines = [line for line in result.stderr.splitlines() if line.strip()]
                raise NotRun(f"{what} of {short} failed: {lines[-1] if lines else result.returncode}")
        with open(marker, "w") as f:
            f.write(commit + "\n")
    # The kernel and QEMU of now, linked anew each run; only the agent is the revision's.
    for name in os.listdir(assets):
        if name.startswith("supermachine-agent"):
            continue
        link = os.path.join(before_assets, name)
        if os.path.lexists(link):
            os.remove(link)
        os.symlink(os.path.realpath(os.path.join(assets, name)), link)
    return binary, before_assets, short






def interrupted(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


def print_table(rows, opts):
    runc = rows[0][2]
    heads = [f"walk {opts.tree}", f"read {opts.mib} MiB", f"write {opts.write_mib} MiB", "guest used",
             "guest Shmem", "VMM RSS", "on host"]
    widths = [17, 17, 19, 11, 12, 9, 8]
    print(f"{'':<30}" + "".join(f"{h:>{w}}" for h, w in zip(heads, widths)))
    print(f"{'':<30}" + "".join(f"{h:>{w}}" for h, w in zip(["s", "s", "MB/s", "MiB", "MiB", "MiB", ""], widths)))
    for label, _, row in rows:
        if isinstance(row, str):
            print(f"{label:<30}  {row.splitlines()[0][:200]}")
            continue

        def times(key):
            cell = f"{row[key]:.3f}"
            if label != "runc" and runc.get(key):
                cell += f" ({row[key] / runc[key]:.1f}x)"
            return cell

        if "seq-write" in row:
            write = f"{opts.write_mib * 1.048576 / row['seq-write']:.1f}"
            if label != "runc" and runc.get("seq-write"):
                write += f" ({row['seq-write'] / runc['seq-write']:.1f}x)"
        else:
            # How fast it went until the layer was full, without a ratio: not the same work.
            mib, seconds, _ = row["write-failed"]
            write = (f"{mib * 1.048576 / seconds:.1f}" if seconds > 0 else "?") + f", full at {mib}"
        if row["guest"]:
            used = f"{(row['MemTotal'] - row['MemAvailable']) / 1024:.0f}"
            shmem = f"{row['Shmem'] / 1024:.0f}"
        else:
            used = shmem = "-"
        vmm = f"{row['vmm'][0] / 1024:.0f}" if row.get("vmm") and row["vmm"][0] else "-"
        cells = [times("tree-walk"), times("read-files"), write, used, shmem, vmm, "yes" if row["on host"] else "no"]
        print(f"{label:<30}" + "".join(f"{c:>{w}}" for c, w in zip(cells, widths)))
    print()
    for label, description, row in rows:
        print(f"  {label}: {description}")
        if isinstance(row, dict) and "write-failed" in row:
            mib, seconds, error = row["write-failed"]
            print(f"    the write failed after {mib} MiB ({seconds:.3f} s): {error}")
    print(f"  (Nx) = N times runc's time. walk = lstat of every entry of /usr/share/tree; read = every file "
          f"of /data ({BIG_FILE_MIB} MiB each) read whole; write = /written in 1 MiB writes + fsync; guest used = "
          f"MemTotal - MemAvailable after the write (the page cache is available, a tmpfs is not); VMM RSS = the "
          f"QEMU process, measured then: every guest page ever touched, page cache included; on host = "
          f"/written is in the bundle's root on the host afterwards")
    measured = {label: row for label, _, row in rows if isinstance(row, dict)}
    before = next((row for label, row in measured.items() if label.startswith("supermachine before")), None)
    after = measured.get("supermachine")
    if before and after:
        print(f"  image reads, supermachine / supermachine before: walk {after['tree-walk'] / before['tree-walk']:.2f}x, "
              f"read {after['read-files'] / before['read-files']:.2f}x the time")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("supermachine")
    parser.add_argument("--tree", type=int, default=20000, help="entries of the image's tree walked")
    parser.add_argument("--mib", type=int, default=50, help="MiB of image files read")
    parser.add_argument("--write-mib", type=int, default=200, help="MiB written to the root")
    parser.add_argument("--before-rev", default=DEFAULT_BEFORE_REV,
                        help="the revision of the 'before' rows (default: the parent of 4a45595)")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds a configuration may take")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, bundles)")
    opts = parser.parse_args()
    if shutil.which("runc") is None:
        sys.exit("bench-rootfs: runc is not installed (Debian package runc)")
    if os.geteuid() != 0:
        sys.exit("bench-rootfs: overlay mounts and runc need root")
    assets = os.path.abspath(os.environ.get("SUPERMACHINE_ASSETS_DIR", os.path.join(ROOT, "build/share/supermachine")))
    started = time.monotonic()
    nofile = raise_nofile()
    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)
    bench = Bench(opts)
    rows = []  # (label, description, measurements | "not run: …")
    try:
        lower = bench.path("lower")
        log(f"image: busybox + {opts.tree}-entry tree + {opts.mib} MiB of files in {lower}")
        make_lower(lower, build_fixture(bench.path("rootfsbench")), opts)
        try:
            before = before_build(opts.before_rev, assets)
        except (NotRun, OSError, subprocess.SubprocessError) as e:
            log(f"no 'before' rows: {e}")
            before = str(e)

        log("runc")
        rows.append(("runc", f"runc {runc_version()}: `runc run`, the host overlay as the root",
                     bench.runc_row(lower)))
        if isinstance(before, tuple):
            binary, before_assets, short = before
            log(f"supermachine before ({short})")
            try:
                row = bench.supermachine_row("before", binary, before_assets, lower, plain=False)
            except RuntimeError as e:
                # The revision before is a reference, not what this bench tests.
                log(f"supermachine before: {e}")
                row = f"failed: {e}"
            rows.append((f"supermachine before ({short})", "overlay root; the guest root is the whole bundle root "
                         "as a disk image under a tmpfs upper layer in guest memory", row))
        else:
            rows.append(("supermachine before", "the --before-rev runtime", f"not run: {before}"))
        log("supermachine")
        rows.append(("supermachine", "overlay root; the guest overlay: the image's layers as a disk image, the host "
                     "overlay's upper directory through the share as its upper layer",
                     bench.supermachine_row("after", opts.supermachine, assets, lower, plain=False)))
        log("supermachine, plain directory root")
        rows.append(("supermachine, plain dir", "plain-directory root (a copy of the image): the whole root is "
                     "the share", bench.supermachine_row("plain", opts.supermachine, assets, lower, plain=True)))

        print(f"\nroot filesystem: one container process in the image's root, {VM_VCPUS} vCPU {VM_MEMORY_MIB} MiB VMs "
              f"on the qemu engine, restored snapshots; RLIMIT_NOFILE {nofile}")
        print_table(rows, opts)
        print(f"\nbench-rootfs: {time.monotonic() - started:.0f} s")
    except (RuntimeError, subprocess.SubprocessError) as e:
        sys.exit(f"bench-rootfs: {e}")
    except KeyboardInterrupt:
        sys.exit("bench-rootfs: interrupted")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        bench.cleanup()


if __name__ == "__main__":
    main()
