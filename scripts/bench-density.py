#!/usr/bin/env python3
"""Density: the host memory of N idle containers, and what is left of a 200 MiB allocation
each of them made and freed, with runc beside them, measured in one run on one host.

    scripts/bench-density.py SUPERMACHINE [--containers 4] [--mib 200] [--settle 15]
                             [--engine auto|qemu|builtin] [--timeout SECONDS]

Every container runs tests/fixtures/alloc_free.rs (built here, static) on the busybox
rootfs, driven over its stdin: it idles, allocates MIB MiB and writes every page, frees it,
idles again. Rows:
  runc                              `runc run`.
  supermachine                      the runtime, its VMs restored from one snapshot (a
                                    warm-up container bakes it): freed guest memory goes back
                                    to the host (virtio-balloon free page reporting).
  supermachine, freed memory kept   the same with SUPERMACHINE_KEEP_FREED_MEMORY=1 (QEMU's
                                    balloon offers no reporting; the builtin VMM keeps what
                                    is reported): what the VMs hold without it.

Reported per container, in MiB: the resident memory (RSS) and proportional share (PSS) of
the container's host processes (runc: the container's processes; supermachine: its monitor
and VMM, QEMU or the builtin VMM in-process) idle, holding the allocation, and SETTLE seconds
after freeing it (PSS divides what the VMs of one snapshot share between them). The ratio is
the RSS after the free, times runc's. (The host's MemAvailable moves by more than a
container's memory with its page cache here, so it is not reported.)
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from benchlib import memory_of, tree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Room for the allocation beside the guest kernel and agent (the VM gets the limit and its
# headroom); runc gets the same limit.
LIMIT_HEADROOM_MIB = 128
IDLE_SETTLE_SECONDS = 5


def log(msg):
    print(f"bench-density: {msg}", file=sys.stderr, flush=True)


def make_bundle(base, runc, opts):
    bundle = os.path.join(base, "bundle")
    rootfs = os.path.join(bundle, "rootfs")
    subprocess.run([os.path.join(ROOT, "scripts/busybox-rootfs.sh"), rootfs], check=True)
    subprocess.run(["rustc", "--edition", "2021", "-O", "-C", "target-feature=+crt-static",
                    os.path.join(ROOT, "tests/fixtures/alloc_free.rs"), "-o",
                    os.path.join(rootfs, "alloc_free")], check=True)
    subprocess.run([runc, "spec", "--bundle", bundle], check=True)
    path = os.path.join(bundle, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["process"]["terminal"] = False
    config["process"]["args"] = ["/alloc_free"]
    config["root"]["readonly"] = True
    limit = (opts.mib + LIMIT_HEADROOM_MIB) << 20
    config["linux"]["resources"] = {"memory": {"limit": limit}}
    with open(path, "w") as f:
        json.dump(config, f)
    return bundle


class Container:
    """One `run` of the bundle, talked to over its stdin and stdout."""

    def __init__(self, cmd, cid, out_dir, env):
        self.cid = cid
        self.out_path = os.path.join(out_dir, f"{cid}.out")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=open(self.out_path, "w"),
                                     stderr=subprocess.STDOUT, env=env)

    def say(self, line):
        self.proc.stdin.write(f"{line}\n".encode())
        self.proc.stdin.flush()

    def wait_for(self, answer, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(self.out_path) as f:
                out = f.read()
            if answer in out.splitlines():
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.cid} ended ({self.proc.returncode}) before {answer!r}: {out}")
            time.sleep(0.1)
        raise RuntimeError(f"{self.cid}: no {answer!r} within {timeout} s")

    def exit(self, timeout):
        try:
            self.say("exit")
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def host_pids(runtime, root, cid, env):
    """The container's host processes: what `state` names (runc: the container's process;
    supermachine: its monitor) and everything below it."""
    out = subprocess.run([runtime, "--root", root, "state", cid], env=env, capture_output=True, text=True)
    try:
        return tree(int(json.loads(out.stdout)["pid"]))
    except (ValueError, KeyError, TypeError):
        return []


def measure_row(name, runtime, bundle, base, opts, env, warm_up):
    work = tempfile.mkdtemp(prefix="row-", dir=base)
    root = os.path.join(work, "state")
    out_dir = work
    if warm_up:
        log(f"{name}: warm-up (bakes the snapshot)")
        warm = Container([runtime, "--root", root, "run", "--bundle", bundle, "warm"], "warm", out_dir, env)
        warm.wait_for("ready", opts.timeout)
        warm.exit(opts.timeout)
    containers = []
    try:
        log(f"{name}: starting {opts.containers} containers")
        for i in range(opts.containers):
            cid = f"dense-{i}"
            containers.append(Container([runtime, "--root", root, "run", "--bundle", bundle, cid], cid,
                                        out_dir, env))
        for c in containers:
            c.wait_for("ready", opts.timeout)
        time.sleep(IDLE_SETTLE_SECONDS)
        pids = {c.cid: host_pids(runtime, root, c.cid, env) for c in containers}

        def per_container():
            rss, pss = memory_of([p for ps in pids.values() for p in ps])
            return rss / 1024 / len(containers), pss / 1024 / len(containers)

        row = {"idle": per_container()}
        log(f"{name}: each allocates {opts.mib} MiB")
        for c in containers:
            c.say(f"alloc {opts.mib}")
        for c in containers:
            c.wait_for("allocated", opts.timeout)
        row["holding"] = per_container()
        for c in containers:
            c.say("free")
        for c in containers:
            c.wait_for("freed", opts.timeout)
        log(f"{name}: freed; settling {opts.settle} s")
        time.sleep(opts.settle)
        row["after"] = per_container()
        return row
    finally:
        for c in containers:
            c.exit(opts.timeout)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("supermachine")
    parser.add_argument("--containers", type=int, default=4)
    parser.add_argument("--mib", type=int, default=200)
    parser.add_argument("--settle", type=int, default=15)
    parser.add_argument("--engine", default="auto")
    parser.add_argument("--timeout", type=int, default=600)
    opts = parser.parse_args()
    runc = shutil.which("runc")
    if runc is None:
        sys.exit("bench-density: runc is not installed (Debian package runc)")
    base = tempfile.mkdtemp(prefix="sm-bench-density-")
    try:
        bundle = make_bundle(base, runc, opts)
        env = dict(os.environ, SUPERMACHINE_ENGINE=opts.engine)
        env.setdefault("SUPERMACHINE_ASSETS_DIR", os.path.join(ROOT, "build/share/supermachine"))
        env.pop("SUPERMACHINE_KEEP_FREED_MEMORY", None)
        kept = dict(env, SUPERMACHINE_KEEP_FREED_MEMORY="1")
        # A cache of each row's own: its warm-up bakes, its containers restore.
        env["SUPERMACHINE_CACHE_DIR"] = os.path.join(base, "cache-reporting")
        kept["SUPERMACHINE_CACHE_DIR"] = os.path.join(base, "cache-kept")
        rows = [
            ("runc", measure_row("runc", runc, bundle, base, opts, os.environ, False)),
            ("supermachine", measure_row("supermachine", opts.supermachine, bundle, base, opts, env, True)),
            ("supermachine, freed memory kept",
             measure_row("supermachine, freed kept", opts.supermachine, bundle, base, opts, kept, True)),
        ]
        features = subprocess.run([opts.supermachine, "features"], env=env, capture_output=True, text=True)
        try:
            reason = json.loads(features.stdout)["annotations"].get("run.supermachine.engine.reason", "")
        except ValueError:
            reason = "?"
        print(f"\nengine: {reason}")
        print(f"{opts.containers} containers, each allocating {opts.mib} MiB and freeing it "
              f"(per container, MiB; after: {opts.settle} s after the free)")
        header = (f"{'':<34}{'idle RSS':>9}{'PSS':>7}{'holding RSS':>13}{'after RSS':>11}{'PSS':>7}"
                  f"{'after RSS vs runc':>19}")
        print(header)
        runc_after = rows[0][1]["after"][0]
        for name, row in rows:
            ratio = row["after"][0] / runc_after if runc_after > 0 else float("nan")
            print(f"{name:<34}{row['idle'][0]:>9.0f}{row['idle'][1]:>7.0f}{row['holding'][0]:>13.0f}"
                  f"{row['after'][0]:>11.0f}{row['after'][1]:>7.0f}{ratio:>18.1f}x")
        reporting, kept_row = rows[1][1], rows[2][1]
        print(f"\nfree page reporting gives back {kept_row['after'][0] - reporting['after'][0]:.0f} MiB "
              f"of each VM's {opts.mib} MiB (RSS after the free: {reporting['after'][0]:.0f} MiB with it, "
              f"{kept_row['after'][0]:.0f} MiB without)")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
