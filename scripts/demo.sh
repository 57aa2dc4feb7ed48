#!/bin/sh
# Runs a busybox container in a microVM with the given supermachine binary.
set -eu
supermachine=${1:?usage: demo.sh SUPERMACHINE}
root=$(cd "$(dirname "$0")/.." && pwd)
export SUPERMACHINE_ASSETS_DIR="${SUPERMACHINE_ASSETS_DIR:-$root/build/share/supermachine}"
export SUPERMACHINE_CACHE_DIR="${SUPERMACHINE_CACHE_DIR:-$root/build/cache}"
bundle="$root/build/demo/bundle"
state="$root/build/demo/state"
rm -rf "$bundle"
mkdir -p "$bundle" "$state"
"$root/scripts/busybox-rootfs.sh" "$bundle/rootfs"
cat > "$bundle/config.json" <<'JSON'
{
  "ociVersion": "1.0.2",
  "process": {
    "terminal": false,
    "user": { "uid": 0, "gid": 0 },
    "args": ["sh", "-c", "echo \"guest kernel: $(uname -r) on $(hostname)\"; cat /etc/motd"],
    "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
    "cwd": "/"
  },
  "root": { "path": "rootfs" },
  "hostname": "demo-vm",
  "mounts": [
    { "destination": "/proc", "type": "proc", "source": "proc" },
    { "destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755"] },
    { "destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"] }
  ]
}
JSON
echo "host kernel:  $(uname -r)"
"$supermachine" --root "$state" run --bundle "$bundle" "demo-$$"
