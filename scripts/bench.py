#!/usr/bin/env python3
"""supermachine benchmarks, each against runc measured in the same run.

    scripts/bench.py SUPERMACHINE [--runs N]

Prints, for create+start+exit of `true` (the `run` verb of each runtime): the median and
p95 over N runs for runc and supermachine, and their ratio; then the median boot phases of
the supermachine runs (from its --debug log): VMM started, kernel entry, agent ready,
container created, process exited, all in ms from the monitor's start.
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def busybox_bundle(base, args):
    bundle = os.path.join(base, "bundle")
    rootfs = os.path.join(bundle, "rootfs")
    subprocess.run([os.path.join(ROOT, "scripts/busybox-rootfs.sh"), rootfs], check=True)
    return bundle


def write_config(bundle, args, runtime):
    """A config both runtimes accept: runc's own `spec`, not a terminal, running `args`."""
    config_path = os.path.join(bundle, "config.json")
    if os.path.exists(config_path):
        os.remove(config_path)
    subprocess.run([runtime, "spec", "--bundle", bundle], check=True)
    with open(config_path) as f:
        config = json.load(f)
    config["process"]["terminal"] = False
    config["process"]["args"] = args
    config["root"]["readonly"] = True
    with open(config_path, "w") as f:
        json.dump(config, f)


def timed(cmd, env=None):
    start = time.monotonic()
    result = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = (time.monotonic() - start) * 1000
    if result.returncode != 0:
        sys.exit(f"bench: {' '.join(cmd)} failed: {result.stderr.decode()}")
    return elapsed


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("supermachine")
    parser.add_argument("--runs", type=int, default=int(os.environ.get("BENCH_RUNS", "10")))
    opts = parser.parse_args()
    runc = shutil.which("runc")
    if runc is None:
        sys.exit("bench: runc is not installed (Debian package runc)")

    base = tempfile.mkdtemp(prefix="sm-bench-")
    try:
        bundle = busybox_bundle(base, ["true"])
        write_config(bundle, ["true"], runc)
        env = dict(os.environ)
        env.setdefault("SUPERMACHINE_ASSETS_DIR", os.path.join(ROOT, "build/share/supermachine"))
        env.setdefault("SUPERMACHINE_CACHE_DIR", os.path.join(ROOT, "build/cache"))
        sm_root = os.path.join(base, "sm-state")
        runc_root = os.path.join(base, "runc-state")
        log = os.path.join(base, "sm.log")

        def sm_run(i):
            return timed([opts.supermachine, "--root", sm_root, "--debug", "--log", log,
                          "--log-format", "json", "run", "--bundle", bundle, f"bench-{i}"], env)

        def runc_run(i):
            return timed([runc, "--root", runc_root, "run", "--bundle", bundle, f"bench-{i}"])

        # Warm-up: builds the disk image and the engine probe verdict once, outside the timing.
        sm_run("warm")
        runc_run("warm")
        open(log, "w").close()
        sm_times, runc_times = [], []
        for i in range(opts.runs):
            runc_times.append(runc_run(i))
            sm_times.append(sm_run(i))

        phases = {"vmm": [], "kernel": [], "agent": [], "created": [], "exited": []}
        with open(log) as f:
            for line in f:
                msg = json.loads(line).get("msg", "")
                m = re.search(r"boot phases: vmm=([\d.]+)ms kernel=([\d.]+)ms agent=([\d.]+)ms created=([\d.]+)ms", msg)
                if m:
                    for key, value in zip(["vmm", "kernel", "agent", "created"], m.groups()):
                        phases[key].append(float(value))
                m = re.search(r"exited with -?\d+ at ([\d.]+)ms", msg)
                if m:
                    phases["exited"].append(float(m.group(1)))

        print(f"\ncreate+start+exit of `true`, {opts.runs} runs each (ms)")
        print(f"{'runtime':<14}{'median':>10}{'p95':>10}{'ratio':>10}")
        runc_median = statistics.median(runc_times)
        for name, times in [("runc", runc_times), ("supermachine", sm_times)]:
            median = statistics.median(times)
            print(f"{name:<14}{median:>10.1f}{percentile(times, 95):>10.1f}{median / runc_median:>9.1f}x")

        print("\nsupermachine boot phases, median ms from the monitor's start")
        labels = [("vmm", "VMM started"), ("kernel", "kernel entry"), ("agent", "agent ready"),
                  ("created", "container created"), ("exited", "process exited")]
        for key, label in labels:
            values = phases[key]
            shown = f"{statistics.median(values):.1f}" if values else "n/a"
            print(f"  {label:<20}{shown:>10}")
    finally:
        subprocess.run(["sh", "-c", f"{runc} --root {base}/runc-state list -q 2>/dev/null | xargs -r -n1 {runc} --root {base}/runc-state delete -f"])
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
