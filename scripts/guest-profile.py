#!/usr/bin/env python3
"""Reads the builtin VMM's guest profiles (SUPERMACHINE_VMM_PROFILE).

    SUPERMACHINE_VMM_PROFILE=/tmp/prof/p supermachine --engine builtin run ...
    scripts/guest-profile.py VMLINUX /tmp/prof/p.*

The VMM samples each vCPU about once a millisecond: the guest's CR3 (which process), its
instruction pointer and, in the kernel, the kernel addresses found on the stack (a guessed
call chain: the guest kernel is built without frame pointers). This prints, per guest
process (CR3) and in all, what the samples were doing: user code, a system call (named),
a page fault, an interrupt, scheduling; and the kernel functions sampled most. Where the
host emulates guest kernel code, samples are close to a count of instructions run.
"""

import bisect
import collections
import re
import subprocess
import sys

KERNEL = 0xFFFF_8000_0000_0000

# The first (innermost) frame matching one of these names what a sample was doing.
CATEGORIES = [
    ("timer interrupt", r"(__sysvec_apic_timer_interrupt|hrtimer_interrupt|tick_sched_timer)$"),
    ("other interrupt", r"(common_interrupt|__common_interrupt|handle_edge_irq|vm_interrupt|__do_softirq)$"),
    ("page fault", r"(exc_page_fault|do_user_addr_fault|handle_mm_fault)$"),
    ("syscall", r"(__x64_sys_\w+|__do_sys_\w+|__se_sys_\w+|ksys_\w+)$"),
    ("schedule", r"(schedule|__schedule|schedule_idle|do_idle)$"),
]


def symbols(vmlinux):
    out = subprocess.run(["nm", "-n", vmlinux], capture_output=True, text=True, check=True).stdout
    table = [(int(addr, 16), name) for addr, kind, name in
             (line.split()[:3] for line in out.splitlines() if len(line.split()) >= 3)
             if kind in "tTwW"]
    return [a for a, _ in table], [n for _, n in table]


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    addrs, names = symbols(sys.argv[1])

    def name(addr):
        i = bisect.bisect_right(addrs, addr) - 1
        return names[i] if i >= 0 else "?"

    rules = [(label, re.compile(pattern)) for label, pattern in CATEGORIES]

    def category(frames):
        if frames[0] < KERNEL:
            return "user"
        for frame in map(name, frames):
            for label, rule in rules:
                if rule.match(frame):
                    if label == "syscall":
                        return "syscall " + re.sub(r"^(__x64_sys_|__do_sys_|__se_sys_|ksys_)", "", frame)
                    return label
        return "kernel, other"

    by_process = collections.defaultdict(collections.Counter)
    functions = collections.Counter()
    total = 0
    for path in sys.argv[2:]:
        with open(path) as f:
            for line in f:
                words = line.split()
                count, cr3 = int(words[0]), int(words[1], 16)
                frames = [int(w, 16) for w in words[2:]]
                total += count
                by_process[cr3][category(frames)] += count
                if frames[0] >= KERNEL:
                    functions[name(frames[0])] += count
    if not total:
        sys.exit("no samples")
    everything = collections.Counter()
    for counts in by_process.values():
        everything.update(counts)
    print(f"{total} samples in {len(sys.argv) - 2} profile(s)")
    for cr3, counts in sorted(by_process.items(), key=lambda kv: -sum(kv[1].values())):
        share = sum(counts.values())
        if share < total / 100:
            continue
        top = ", ".join(f"{label} {100 * n / share:.0f}%" for label, n in counts.most_common(6))
        print(f"  process cr3={cr3:#x}: {100 * share / total:4.1f}%  ({top})")
    print("all processes:")
    for label, n in everything.most_common(15):
        print(f"  {100 * n / total:5.1f}%  {label}")
    print("kernel functions sampled most:")
    for function, n in functions.most_common(15):
        print(f"  {100 * n / total:5.1f}%  {function}")


if __name__ == "__main__":
    main()
