#!/bin/sh
# Installs the Debian packages supermachine needs to build and to run, if any is missing.
# Usage: scripts/install-deps.sh [build|test|aarch64]
set -eu

# The guest kernel's build needs flex … libssl-dev; QEMU's (scripts/build-qemu.sh) dpkg-dev …
# zlib1g-dev, and qemu-system-x86 for its firmware and as the fallback engine binary; the
# guest agent links libseccomp-dev's static library (it compiles containers' seccomp profiles).
need="qemu-system-x86 e2fsprogs linux-source-6.1 flex bison bc libelf-dev libssl-dev patch \
  dpkg-dev xz-utils meson ninja-build pkg-config libglib2.0-dev libpixman-1-dev libfdt-dev zlib1g-dev \
  busybox-static iproute2 libseccomp-dev"
case "${1:-build}" in
  # debootstrap builds the typical host's image (scripts/typical-host.sh); the integration
  # scripts read the runtime's JSON with jq.
  test) need="$need containerd runc docker.io iptables sqlite3 debootstrap jq" ;;
  # The arm64 guest (make guest-aarch64): the kernel cross-built by gcc, the agent by Debian's
  # Rust with arm64's standard library and libseccomp (the dpkg architecture arm64 is added);
  # qemu-system-arm boots it (make smoke-aarch64).
  aarch64)
    need="$need gcc-aarch64-linux-gnu libc6-dev-arm64-cross rustc-web cargo-web \
      libstd-rust-web-dev:arm64 libseccomp-dev:arm64 qemu-system-arm"
    if ! dpkg --print-foreign-architectures | grep -qx arm64; then
      [ "$(id -u)" = 0 ] || { echo "install-deps: run as root to add the arm64 architecture" >&2; exit 1; }
      dpkg --add-architecture arm64
    fi
    ;;
esac

missing=""
for pkg in $need; do
  status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
  case "$status" in
    *"install ok installed"*) ;;
    *) missing="$missing $pkg" ;;
  esac
done
[ -z "$missing" ] && exit 0

if [ "$(id -u)" != 0 ]; then
  echo "install-deps: missing Debian packages:$missing (run as root, or install them)" >&2
  exit 1
fi
echo "install-deps: installing$missing" >&2
export DEBIAN_FRONTEND=noninteractive
# dpkg must not start daemons (containerd, docker) here: the tests start their own.
policy=/usr/sbin/policy-rc.d
created_policy=""
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && created_policy=1
fi
apt-get update -q >/dev/null || apt-get update
# shellcheck disable=SC2086
apt-get install -y -q --no-install-recommends $missing >/dev/null
[ -n "$created_policy" ] && rm -f "$policy"
exit 0
