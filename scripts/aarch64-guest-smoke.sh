#!/bin/sh
# Boots the arm64 guest that `make guest-aarch64` builds under qemu-system-aarch64's TCG (QEMU's
# virt machine, a PL011 console), its static agent as /init, twice:
# - with QEMU's own device tree and no host channel: passes when the kernel ran on the
#   emulated aarch64 CPU and the agent, as PID 1, mounted what it needs and looked for its
#   channel;
# - with the builtin VMM's device tree (DTB, from `vmm::aarch64::fdt`; QEMU fills in only
#   /memory and /chosen) on two vCPUs with a GICv3, and the agent's channel on a
#   virtio-serial port: passes when the second vCPU came up through PSCI and the agent
#   answered hello through the channel (which needs the tree's GIC, timer and virtio-mmio
#   interrupts to be right).
# A check of the cross-built pieces and of the device tree before a VMM boots them (issue
# 26); the container path on aarch64 is not in it.
#
#   scripts/aarch64-guest-smoke.sh ASSETS_AARCH64 DTB
set -eu
assets=${1:?usage: aarch64-guest-smoke.sh ASSETS_AARCH64 DTB}
dtb=${2:?usage: aarch64-guest-smoke.sh ASSETS_AARCH64 DTB}
here=$(cd "$(dirname "$0")" && pwd)
for need in "$assets/Image" "$assets/supermachine-agent"; do
  [ -f "$need" ] || { echo "aarch64-guest-smoke: $need missing (make guest-aarch64)"; exit 1; }
done
command -v qemu-system-aarch64 >/dev/null || {
  echo "aarch64-guest-smoke: qemu-system-aarch64 missing (Debian's qemu-system-arm)"
  exit 1
}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/root"
cp "$assets/supermachine-agent" "$work/root/init"
(cd "$work/root" && echo init | busybox cpio -o -H newc > "$work/initramfs.cpio" 2>/dev/null)
started=$(date +%s)
timeout 120 qemu-system-aarch64 -M virt -cpu max -smp 1 -m 256 -nographic -no-reboot \
  -kernel "$assets/Image" -initrd "$work/initramfs.cpio" \
  -append "console=ttyAMA0 panic=-1" > "$work/console" 2>&1 &
vm=$!
verdict=""
while kill -0 "$vm" 2>/dev/null && [ $(($(date +%s) - started)) -lt 110 ]; do
  if grep -q 'supermachine-agent: waiting for host channel' "$work/console"; then
    verdict=ok
    break
  fi
  sleep 1
done
kill "$vm" 2>/dev/null || true
wait "$vm" 2>/dev/null || true
grep -a -m1 'Linux version' "$work/console" || true
grep -a -m1 'CPU features\|Booting Linux on physical CPU' "$work/console" || true
grep -a -m1 'supermachine-agent:' "$work/console" || true
if [ "$verdict" = ok ]; then
  echo "aarch64-guest-smoke: the arm64 kernel booted and its agent ran as PID 1 ($(($(date +%s) - started)) s)"
else
  echo "aarch64-guest-smoke: FAILED; the console's last lines:"
  tail -n 30 "$work/console"
  exit 1
fi

version=$(sed -n 's/^pub const PROTOCOL_VERSION: u32 = \([0-9]*\);/\1/p' "$here/../crates/agent-proto/src/lib.rs")
started=$(date +%s)
timeout 120 qemu-system-aarch64 -M virt,gic-version=3 -cpu max -smp 2 -m 256 -nographic \
  -no-reboot -dtb "$dtb" -kernel "$assets/Image" -initrd "$work/initramfs.cpio" \
  -append "console=ttyAMA0 panic=-1" \
  -device virtio-serial-device,max_ports=3 \
  -chardev "socket,id=agent,path=$work/agent.sock,server=on,wait=off" \
  -device virtserialport,chardev=agent,name=agent.0,nr=1 > "$work/console-dtb" 2>&1 &
vm=$!
answered=ok
python3 "$here/agent-hello.py" "$work/agent.sock" "$version" 110 || answered=""
kill "$vm" 2>/dev/null || true
wait "$vm" 2>/dev/null || true
if [ "$answered" = ok ] && grep -q 'CPU1: Booted secondary processor' "$work/console-dtb"; then
  grep -a -m1 'psci: probing for conduit method from DT' "$work/console-dtb" || true
  grep -a -m1 'GICv3: CPU1: found redistributor' "$work/console-dtb" || true
  echo "aarch64-guest-smoke: with the builtin VMM's device tree, both vCPUs came up and the agent answered ($(($(date +%s) - started)) s)"
else
  echo "aarch64-guest-smoke: FAILED with the builtin VMM's device tree; the console's last lines:"
  tail -n 30 "$work/console-dtb"
  exit 1
fi
