#!/usr/bin/env python3
"""supermachine benchmarks, each against runc measured in the same run.

    scripts/bench.py SUPERMACHINE [--runs N] [--engine auto|qemu|builtin] [--cold-runs N]

Prints, for create+start+exit of `true` (each runtime's `run` verb): median and p95 over N
runs of runc, supermachine booting cold (--snapshots off) and supermachine restoring from
a snapshot (on QEMU also with its VMM unjailed, SUPERMACHINE_VMM_JAIL=off), with ratios; the cold boot phases; the restore phases (p50, p95); and the host
memory of 1 and of 10 restored VMs of one image. `--cold-runs` bounds the cold boots
separately (on a host whose KVM emulates guest kernel code, a builtin cold boot takes a
minute or more).
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

from benchlib import memory_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def log_messages(path):
    with open(path) as f:
        for line in f:
            try:
                yield json.loads(line).get("msg", "")
            except ValueError:
                continue




def private_by_kind(pids, memory_file):
    """Private (unshared) KiB summed over pids, by what the pages are: what each extra VM
    costs the host, and why."""
    kinds = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps") as f:
                lines = f.readlines()
        except OSError:
            continue
        kind = None
        for line in lines:
            fields = line.split()
            if re.match(r"^[0-9a-f]+-[0-9a-f]+$", fields[0]):
                path = fields[5] if len(fields) > 5 else ""
                if path.endswith(memory_file):
                    kind = "guest RAM (copy-on-write of the snapshot)"
                elif path == "" and "x" in fields[1]:
                    kind = "JIT code (TCG translation cache)"
                elif path in ("", "[heap]"):
                    kind = "heap and anonymous"
                elif path.startswith("/"):
                    kind = "binaries and libraries (relocations, data)"
                else:
                    kind = "stacks and other"
            elif fields[0] in ("Private_Clean:", "Private_Dirty:"):
                kinds[kind] = kinds.get(kind, 0) + int(fields[1])
    return kinds


def restore_phases(log):
    """Each restore phase's times (ms) in a debug log, with the total to "container created"
    and the host-side part (from opening the snapshot to the vCPUs running again: every phase
    before the guest's agent is involved)."""
    restore = {}
    for msg in log_messages(log):
        m = re.search(r"restore phases: (.*); created=([\d.]+)ms", msg)
        if m:
            for part in m.group(1).split(", "):
                name, value = part.rsplit("=", 1)
                restore.setdefault(name, []).append(float(value.rstrip("ms")))
            restore.setdefault("total to container created", []).append(float(m.group(2)))
    names = list(restore)
    host = names[:names.index("agent reconnect")] if "agent reconnect" in names else []
    restore["host-side restore (open .. vCPUs run)"] = [sum(v) for v in zip(*[restore[name] for name in host])]
    return restore


def vm_pids(state_root):
    """Monitor and VMM pids of every container under a state root: the monitors (named by
    their command lines) and their children (QEMU)."""
    monitors, parents = [], {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{entry}/stat") as f:
                parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if state_root in cmdline and "monitor" in cmdline:
            monitors.append(int(entry))
    return monitors + [pid for pid, parent in parents.items() if parent in monitors]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("supermachine")
    parser.add_argument("--runs", type=int, default=int(os.environ.get("BENCH_RUNS", "10")))
    parser.add_argument("--cold-runs", type=int, default=None)
    parser.add_argument("--engine", default="auto")
    opts = parser.parse_args()
    cold_runs = opts.runs if opts.cold_runs is None else opts.cold_runs
    runc = shutil.which("runc")
    if runc is None:
        sys.exit("bench: runc is not installed (Debian package runc)")

    base = tempfile.mkdtemp(prefix="sm-bench-")
    sm_root = os.path.join(base, "sm-state")
    try:
        bundle = os.path.join(base, "bundle")
        subprocess.run([os.path.join(ROOT, "scripts/busybox-rootfs.sh"), os.path.join(bundle, "rootfs")], check=True)
        write_config(bundle, ["true"], runc)
        env = dict(os.environ, SUPERMACHINE_ENGINE=opts.engine)
        env.setdefault("SUPERMACHINE_ASSETS_DIR", os.path.join(ROOT, "build/share/supermachine"))
        # A cache of its own: the first run bakes, the rest restore.
        env["SUPERMACHINE_CACHE_DIR"] = os.path.join(base, "cache")
        runc_root = os.path.join(base, "runc-state")
        cold_log = os.path.join(base, "cold.log")
        warm_log = os.path.join(base, "warm.log")

        def sm_run(i, log, *flags, env=env):
            return timed([opts.supermachine, "--root", sm_root, "--debug", "--log", log, "--log-format", "json",
                          *flags, "run", "--bundle", bundle, f"bench-{i}"], env)

        def runc_run(i):
            return timed([runc, "--root", runc_root, "run", "--bundle", bundle, f"bench-{i}"])

        engine = subprocess.run([opts.supermachine, "features"], env=env, capture_output=True,
                                text=True, check=True)
        annotations = json.loads(engine.stdout)["annotations"]
        # QEMU runs jailed (namespaces, own root, no capabilities, its seccomp filter): its
        # restores are timed without the jail too, interleaved, to show what the jail costs.
        jailed = annotations.get("run.supermachine.engine", "").startswith("qemu")
        unjailed_env = dict(env, SUPERMACHINE_VMM_JAIL="off")
        unjailed_log = os.path.join(base, "unjailed.log")

        # Warm-up: the disk image, the engine probe and the snapshot, outside the timing.
        sm_run("warm", os.devnull)
        runc_run("warm")
        runc_times, cold_times, warm_times, unjailed_times = [], [], [], []
        for i in range(opts.runs):
            runc_times.append(runc_run(i))
            if i < cold_runs:
                cold_times.append(sm_run(f"cold-{i}", cold_log, "--snapshots", "off"))
            warm_times.append(sm_run(f"warm-{i}", warm_log))
            if jailed:
                unjailed_times.append(sm_run(f"unjailed-{i}", unjailed_log, env=unjailed_env))

        print(f"\nengine: {annotations.get('run.supermachine.engine.reason', '')}")
        print(f"VMM: {annotations.get('run.supermachine.vmm.confinement', '')}")
        print(f"create+start+exit of `true`, {opts.runs} runs each, {cold_runs} cold (ms)")
        print(f"{'runtime':<36}{'median':>10}{'p95':>10}{'vs runc':>10}{'vs cold':>10}")
        runc_median = statistics.median(runc_times)
        cold_median = statistics.median(cold_times)
        rows = [("runc", runc_times), ("supermachine, cold boot", cold_times),
                ("supermachine, restore", warm_times)]
        if jailed:
            rows.append(("supermachine, restore, VMM unjailed", unjailed_times))
        for name, times in rows:
            median = statistics.median(times)
            print(f"{name:<36}{median:>10.1f}{percentile(times, 95):>10.1f}"
                  f"{median / runc_median:>9.1f}x{cold_median / median:>9.1f}x")

        boot = {"vmm": [], "kernel": [], "agent": [], "created": [], "exited": []}
        for msg in log_messages(cold_log):
            m = re.search(r"boot phases: vmm=([\d.]+)ms kernel=([\d.]+)ms agent=([\d.]+)ms bake=[\d.]+ms created=([\d.]+)ms", msg)
            if m:
                for key, value in zip(["vmm", "kernel", "agent", "created"], m.groups()):
                    boot[key].append(float(value))
            m = re.search(r"exited with -?\d+ at ([\d.]+)ms", msg)
            if m:
                boot["exited"].append(float(m.group(1)))
        print("\ncold boot phases, median ms from the monitor's start")
        for key, label in [("vmm", "VMM started"), ("kernel", "kernel entry"), ("agent", "agent ready"),
                           ("created", "container created"), ("exited", "process exited")]:
            values = boot[key]
            print(f"  {label:<36}{statistics.median(values) if values else float('nan'):>10.1f}")

        restore = restore_phases(warm_log)
        unjailed = restore_phases(unjailed_log) if jailed else {}
        print("\nrestore phases (ms)" + (", and with the VMM unjailed" if jailed else ""))
        print(f"  {'phase':<40}{'p50':>8}{'p95':>8}" + (f"{'unjailed p50':>14}{'p95':>8}" if jailed else ""))
        for name, values in restore.items():
            line = f"  {name:<40}{statistics.median(values):>8.2f}{percentile(values, 95):>8.2f}"
            if unjailed.get(name):
                line += f"{statistics.median(unjailed[name]):>14.2f}{percentile(unjailed[name], 95):>8.2f}"
            print(line)

        # Host memory of restored VMs idling in `sleep`.
        write_config(bundle, ["sleep", "1000"], runc)
        mem_root = os.path.join(base, "mem-state")

        def start_detached(i):
            subprocess.run([opts.supermachine, "--root", mem_root, "run", "--detach", "--bundle", bundle, f"mem-{i}"],
                           env=env, check=True, stdout=subprocess.DEVNULL)
        # The sleeping bundle is another image key only if its rootfs differs: it does not, so
        # these restore from the same snapshot. Measured twice: 1 s after the last start, and
        # once settled (the runtime trims an idle VM's translated code under QEMU/TCG about a
        # second after it goes idle; see crates/container/src/reclaim.rs).
        just_started, settled = 1, 5
        start_detached(0)
        time.sleep(just_started)
        one = {"just started": memory_of(vm_pids(mem_root))}
        time.sleep(settled - just_started)
        one["settled"] = memory_of(vm_pids(mem_root))
        for i in range(1, 10):
            start_detached(i)
        time.sleep(just_started)
        ten = {"just started": memory_of(vm_pids(mem_root))}
        kinds = {"just started": private_by_kind(vm_pids(mem_root), "/memory")}
        time.sleep(settled - just_started)
        ten["settled"] = memory_of(vm_pids(mem_root))
        kinds["settled"] = private_by_kind(vm_pids(mem_root), "/memory")
        print("\nhost memory of restored VMs of one image idling in `sleep` (monitor + VMM), MiB")
        print(f"  {'':<34}{'1 VM RSS':>10}{'PSS':>8}{'10 VMs RSS':>12}{'PSS':>8}{'per extra VM (PSS)':>20}")
        for when, label in [("just started", f"{just_started} s after the last start"),
                            ("settled", f"{settled} s after (settled)")]:
            (rss1, pss1), (rss10, pss10) = one[when], ten[when]
            print(f"  {label:<34}{rss1 / 1024:>10.1f}{pss1 / 1024:>8.1f}{rss10 / 1024:>12.1f}"
                  f"{pss10 / 1024:>8.1f}{(pss10 - pss1) / 9 / 1024:>20.1f}")
        print("  private memory per VM, by kind (MiB)")
        print(f"    {'':<46}{'just started':>14}{'settled':>10}")
        for kind in sorted(kinds["just started"], key=lambda k: -kinds["just started"][k]):
            print(f"    {kind:<46}{kinds['just started'][kind] / 10 / 1024:>14.1f}"
                  f"{kinds['settled'].get(kind, 0) / 10 / 1024:>10.1f}")
    finally:
        for root in ["mem-state", "sm-state"]:
            path = os.path.join(base, root)
            if os.path.isdir(path):
                for cid in os.listdir(path):
                    subprocess.run([opts.supermachine, "--root", path, "delete", "--force", cid],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.run(["sh", "-c", f"{runc} --root {base}/runc-state list -q 2>/dev/null | xargs -r -n1 {runc} --root {base}/runc-state delete -f"])
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
