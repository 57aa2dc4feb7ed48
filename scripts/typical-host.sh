#!/bin/bash
# `make test-typical-host`: the runtime on the kind of host most users have, booted as a VM
# here: Debian 12 with systemd as PID 1, cgroup v2 only, docker.io (its systemd cgroup
# driver) and containerd from Debian, and the project installed as `make install` installs
# it, on no QEMU package. QEMU's TCG with `-cpu max` emulates AMD SVM, so that host has a
# working /dev/kvm whose guests run their kernel code the ordinary way (not emulated by
# instruction as on a PVM host). It runs scripts/typical-host-inside.sh twice: with KVM, where
# `--engine auto` should pick the builtin VMM and the builtin engine's VM test suites run too,
# then with KVM hidden (the kvm modules blacklisted), on the QEMU/TCG path.
#
#   scripts/typical-host.sh BIN_DIR ASSETS_DIR
#
# To chase a problem there: SUPERMACHINE_TYPICAL_HOST_INSIDE names another script to run
# inside (scripts/typical-host-restore-stress.sh: restores on the builtin engine, three at a
# time, until one fails), SUPERMACHINE_TYPICAL_HOST_PASSES the passes to boot (`kvm`, `tcg`;
# default both), SUPERMACHINE_TYPICAL_HOST_SILENCE the seconds of console silence after which
# the typical host counts as stopped (default 400), SUPERMACHINE_TYPICAL_HOST_MEMORY its RAM in
# MiB (default 4096), SUPERMACHINE_TYPICAL_HOST_CPU its QEMU CPU model (default `max,la57=off`:
# the one crash of its own kernel seen in restore stress runs had it in 5-level paging, which
# users' hosts seldom use; the stalled restores happen either way).
#
# The host's image (debootstrap, about 2 minutes) is built once and cached outside the clone
# by a digest of its recipe (SUPERMACHINE_BUILD_CACHE, default ~/.cache/supermachine). What
# the VM prints comes back on its serial console, to target/typical-host/*.log; a step that
# fails there fails this script.
set -euo pipefail
bin=${1:?usage: typical-host.sh BIN_DIR ASSETS_DIR}
assets=${2:?usage: typical-host.sh BIN_DIR ASSETS_DIR}
root=$(cd "$(dirname "$0")/.." && pwd)
cache=${SUPERMACHINE_BUILD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/supermachine}
out=$root/target/typical-host
mkdir -p "$out"

qemu=/usr/bin/qemu-system-x86_64 # Debian's (qemu-system-x86), a full PC for the host VM
for tool in debootstrap mkfs.ext4 "$qemu"; do
  command -v "$tool" >/dev/null || { echo "typical-host: $tool missing (scripts/install-deps.sh test)"; exit 1; }
done

# --- image recipe: a change below this line makes a new image
packages=systemd,systemd-sysv,dbus,udev,kmod,linux-image-amd64,initramfs-tools,e2fsprogs,iproute2,procps,docker.io,containerd,apparmor,ca-certificates,cgroupfs-mount,git,needrestart,xz-utils,jq,busybox-static,sqlite3
build_image() {
  local dir=$1 tree=$1/tree
  debootstrap --variant=minbase --include="$packages" bookworm "$tree" http://deb.debian.org/debian
  echo typical-host > "$tree/etc/hostname"
  echo '/dev/vda / ext4 rw,errors=remount-ro 0 1' > "$tree/etc/fstab"
  mkdir -p "$tree/etc/docker" "$tree/payload"
  # docker as a user would configure it for this runtime (`supermachine check` says this).
  cat > "$tree/etc/docker/daemon.json" <<'JSON'
{ "runtimes": { "supermachine": { "path": "/usr/local/bin/supermachine" } } }
JSON
  # The test: the payload disk's script, its output on the console, then power off.
  cat > "$tree/etc/systemd/system/typical-host-test.service" <<'UNIT'
[Unit]
Description=supermachine on a typical host
After=docker.service containerd.service multi-user.target
Wants=docker.service containerd.service
[Service]
Type=oneshot
StandardOutput=tty
StandardError=tty
TTYPath=/dev/ttyS0
ExecStart=/bin/sh -c 'mount -o ro /dev/vdb /payload && /payload/inside.sh; echo "typical-host: exit $?"'
ExecStopPost=/bin/systemctl --no-block poweroff
[Install]
WantedBy=multi-user.target
UNIT
  ln -sf /etc/systemd/system/typical-host-test.service \
    "$tree/etc/systemd/system/multi-user.target.wants/typical-host-test.service"
  # Nothing else on the console, and no timers that start work during the test.
  for unit in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer; do
    rm -f "$tree/etc/systemd/system/timers.target.wants/$unit"
  done
  cp -L "$tree/vmlinuz" "$dir/vmlinuz"
  cp -L "$tree/initrd.img" "$dir/initrd.img"
  rm -rf "$tree/var/cache/apt/archives"/*.deb
  mkfs.ext4 -q -F -L root -d "$tree" "$dir/root.img" 4G
  rm -rf "$tree"
}
# --- end of image recipe
digest=$(sed -n '/^# --- image recipe/,/^# --- end of image recipe/p' "$0" | sha256sum | cut -c1-16)
image=$cache/typical-host/$digest
if [ ! -f "$image/root.img" ]; then
  echo "== typical-host: building the host image ($image)"
  started=$(date +%s)
  rm -rf "$image.work"
  mkdir -p "$image.work"
  build_image "$image.work"
  mv "$image.work" "$image"
  echo "== typical-host: image built in $(($(date +%s) - started)) s"
fi

# The builtin engine's VM test suites (tests/builtin-suites.txt), built here (the debug
# profile `make vm-test` builds) with the fixture programs and busybox root they use, which the
# VM cannot build. They run in the VM at this clone's path, the path compiled into them.
# listed FILE: FILE's lines but comments and blank ones.
listed() { grep -v '^\s*\(#\|$\)' "$1"; }
suites=$(listed "$root/tests/builtin-suites.txt" | cut -d' ' -f1 | sort -u)
(cd "$root" && SUPERMACHINE_ASSETS_DIR=$assets cargo test --locked -q --test fixtures >/dev/null)
executables=$(cd "$root" && cargo test --locked --no-run --message-format=json \
  $(printf -- '--test %s ' $suites) 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["kind"] == ["test"] and m.get("executable"):
        print(m["target"]["name"], m["executable"])')

# The payload: the project as `make install` lays it out (real files, no symlinks into a
# build cache), a busybox image, the test script, and the suites above.
payload=$(mktemp -d)
trap 'rm -rf "$payload"' EXIT
mkdir -p "$payload/usr/local/bin" "$payload/usr/local/share/supermachine"
cp -L "$bin/supermachine" "$bin/containerd-shim-supermachine-v2" "$payload/usr/local/bin/"
for asset in vmlinux release supermachine-agent qemu-system-x86_64 qboot.rom; do
  cp -L "$assets/$asset" "$payload/usr/local/share/supermachine/"
done
"$root/scripts/busybox-image.sh" "$payload/busybox.tar" >/dev/null
cp "${SUPERMACHINE_TYPICAL_HOST_INSIDE:-$root/scripts/typical-host-inside.sh}" "$payload/inside.sh"
listed "$root/tests/builtin-suites.txt" > "$payload/builtin-suites.txt"
echo "$root" > "$payload/workspace"
ws=$payload/ws$root
mkdir -p "$payload/tests" "$ws/target/debug" "$ws/target/sm-test"
echo "$executables" | while read -r name path; do cp "$path" "$payload/tests/$name"; done
cp "$root/target/debug/supermachine" "$ws/target/debug/"
cp -a "$root/target/sm-test/rootfs" "$ws/target/sm-test/"
for fixture in "$root"/tests/fixtures/*.rs; do
  cp -a "$root/target/sm-test/$(basename "$fixture" .rs)" "$ws/target/sm-test/"
done
mkdir -p "$ws/tests" "$ws/scripts"
cp -a "$root/tests/fixtures" "$ws/tests/"
# The integration suites (integration/typical-host-suites.txt), with the scripts they call.
cp -a "$root/integration" "$ws/"
cp "$root"/scripts/busybox-*.sh "$ws/scripts/"
listed "$root/integration/typical-host-suites.txt" > "$payload/integration-suites.txt"
mkfs.ext4 -q -F -L payload -d "$payload" "$out/payload.img" 3G

# A console silent this long means the typical host stopped: its test script prints a line
# every two minutes while the host's userspace lives (a hang of ours meets a suite's timeout).
SILENCE_LIMIT=${SUPERMACHINE_TYPICAL_HOST_SILENCE:-400}
MEMORY=${SUPERMACHINE_TYPICAL_HOST_MEMORY:-4096}
CPU=${SUPERMACHINE_TYPICAL_HOST_CPU:-max,la57=off}

# One boot: the VM's console to a log (and this output), its verdict from the test's line.
# Returns 0 when the tests passed, 1 when they failed, 2 when the typical host's own kernel
# died (a panic) or stopped (a silent console) before a verdict.
boot() {
  local name=$1 extra=$2 log=$out/$1.log
  echo "== typical-host ($name): booting"
  local started=$(date +%s)
  : > "$log"
  timeout 3000 "$qemu" -M q35 -accel tcg,thread=multi -cpu "$CPU" -smp 2 -m "$MEMORY" \
    -kernel "$image/vmlinuz" -initrd "$image/initrd.img" \
    -append "root=/dev/vda rw console=ttyS0 quiet systemd.show_status=0 panic=5 $extra" \
    -drive "file=$image/root.img,if=virtio,format=raw,snapshot=on" \
    -drive "file=$out/payload.img,if=virtio,format=raw,readonly=on" \
    -nic none -nographic -no-reboot </dev/null > >(tee -a "$log") 2>&1 &
  local vm=$! size=-1 quiet_since=$(date +%s) silent=""
  while kill -0 "$vm" 2>/dev/null; do
    sleep 10
    local now; now=$(stat -c %s "$log")
    if [ "$now" != "$size" ]; then
      size=$now quiet_since=$(date +%s)
    elif [ $(($(date +%s) - quiet_since)) -ge "$SILENCE_LIMIT" ]; then
      silent=yes
      pkill -P "$vm" 2>/dev/null; kill "$vm" 2>/dev/null
      break
    fi
  done
  wait "$vm" 2>/dev/null || true
  sleep 1 # tee's last lines
  echo "== typical-host ($name): $(($(date +%s) - started)) s"
  local verdict
  verdict=$(grep -ao 'typical-host: exit [0-9]*' "$log" | tail -n1 || true)
  if [ "$verdict" = "typical-host: exit 0" ]; then
    return 0
  fi
  if [ -z "$verdict" ] && { [ -n "$silent" ] || grep -aq 'Kernel panic' "$log"; }; then
    echo "typical-host ($name): its kernel $([ -n "$silent" ] && echo "stopped (no console output for ${SILENCE_LIMIT} s)" || echo panicked) before a verdict; see $log"
    return 2
  fi
  echo "typical-host ($name): FAILED (${verdict:-no verdict on the console}); see $log"
  return 1
}

# A pass whose typical host died is booted once more: its kernel runs nested KVM on QEMU's
# emulated SVM, which loses state now and then (README, "typical host"), which users'
# hardware does not. A pass whose tests failed is not.
pass() {
  local rc=0
  boot "$@" || rc=$?
  if [ "$rc" = 2 ]; then
    mv "$out/$1.log" "$out/$1-died.log"
    echo "== typical-host ($1): the emulated machine failed, not a test (its console: $out/$1-died.log): booting the pass again"
    rc=0
    boot "$@" || rc=$?
  fi
  [ "$rc" = 0 ]
}

status=0
for pass in ${SUPERMACHINE_TYPICAL_HOST_PASSES:-kvm tcg}; do
  case $pass in
    kvm) pass kvm "" || status=1 ;;
    tcg) pass tcg "modprobe.blacklist=kvm_amd,kvm_intel,kvm" || status=1 ;;
    *) echo "typical-host: unknown pass $pass"; status=1 ;;
  esac
done
[ "$status" = 0 ] && echo "== typical-host: every pass passed"
exit "$status"
