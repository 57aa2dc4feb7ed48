#!/bin/sh
# Builds the QEMU the qemu engine runs, from Debian's source package of the installed
# qemu-system-x86 (with Debian's patches), configured for what the engine uses: one target
# (x86_64-softmmu), the devices in config/qemu/devices.mak, kvm and tcg, libseccomp (the
# `-sandbox` filter the engine starts it with) and no other optional library, linked static and not position-independent, plus config/qemu/patches/*.patch. A VM restored
# from a snapshot then costs the host less: no shared library or PIE relocations to write
# into private pages, far fewer QOM types registered, and no loader work at each start.
# Firmware (the microvm machine's qboot) still comes from Debian's qemu-system-data.
#
#   scripts/build-qemu.sh OUT_DIR
#
# The result is cached outside the clone by the digest of its inputs
# (SUPERMACHINE_BUILD_CACHE, default ~/.cache/supermachine) and put in
# OUT_DIR/qemu-system-x86_64, where the runtime looks for it before PATH.
set -eu

out_dir=${1:?usage: build-qemu.sh OUT_DIR}
root=$(cd "$(dirname "$0")/.." && pwd)
cache=${SUPERMACHINE_BUILD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/supermachine}
jobs=$(nproc)

# The source version of the installed binary package: the firmware it installed matches it.
source_version=$(dpkg-query -W -f='${source:Version}' qemu-system-x86 2>/dev/null || true)
if [ -z "$source_version" ]; then
  echo "build-qemu.sh: the Debian package qemu-system-x86 is not installed" >&2
  exit 1
fi
patches=$(ls "$root"/config/qemu/patches/*.patch 2>/dev/null || true)
# shellcheck disable=SC2086
digest=$( { echo "$source_version"; cat "$0" "$root/config/qemu/devices.mak" $patches; } | sha256sum | cut -c1-16)
dest="$cache/qemu/$digest"

if [ ! -x "$dest/qemu-system-x86_64" ]; then
  work="$cache/qemu/.work-$digest-$$"
  rm -rf "$work"
  mkdir -p "$work/lists/partial"
  trap 'rm -rf "$work"' EXIT
  echo "build-qemu.sh: building QEMU from Debian's source of qemu-system-x86 $source_version ($digest; a few minutes, once per machine)" >&2
  # Source packages through apt with a private list of deb-src entries, leaving the host's
  # apt configuration as it is; apt checks the archive's signatures and the files' digests.
  keyring=/usr/share/keyrings/debian-archive-keyring.gpg
  codename=$(. /etc/os-release && echo "$VERSION_CODENAME")
  {
    echo "deb-src [signed-by=$keyring] http://deb.debian.org/debian $codename main"
    echo "deb-src [signed-by=$keyring] http://deb.debian.org/debian $codename-updates main"
    echo "deb-src [signed-by=$keyring] http://deb.debian.org/debian-security $codename-security main"
  } > "$work/sources.list"
  apt_private="-o Dir::Etc::SourceList=$work/sources.list -o Dir::Etc::SourceParts=/dev/null -o Dir::State::Lists=$work/lists -o Debug::NoLocking=1 -o APT::Sandbox::User=root"
  # shellcheck disable=SC2086
  apt-get -q $apt_private update >/dev/null
  # The installed version's source, else (the archive keeps only a suite's newest) the newest.
  # shellcheck disable=SC2086
  if ! (cd "$work" && apt-get -q $apt_private source --download-only "qemu=$source_version" >/dev/null 2>&1); then
    echo "build-qemu.sh: source of qemu $source_version is gone from the archive; building the newest (upgrade qemu-system-x86 to match its firmware)" >&2
    # shellcheck disable=SC2086
    (cd "$work" && apt-get -q $apt_private source --download-only qemu >/dev/null)
  fi
  built_version=$(sed -n 's/^Version: //p' "$work"/qemu_*.dsc)
  # Debian's patches (security fixes among them) are applied as the package applies them.
  dpkg-source --no-check -x "$work"/qemu_*.dsc "$work/src" >/dev/null
  for p in $patches; do
    patch -d "$work/src" -p1 --quiet < "$p"
  done
  cp "$root/config/qemu/devices.mak" "$work/src/configs/devices/x86_64-softmmu/supermachine.mak"
  mkdir -p "$work/build"
  (cd "$work/build" && ../src/configure \
      --target-list=x86_64-softmmu \
      --without-default-features --without-default-devices \
      --with-devices-x86_64=supermachine \
      --enable-kvm --enable-tcg --enable-fdt=system --enable-malloc-trim --enable-seccomp \
      --static --disable-pie \
      --disable-docs --disable-tools --disable-user --disable-install-blobs \
      --disable-debug-info \
      --firmwarepath=/usr/share/qemu:/usr/share/seabios \
      --with-pkgversion="supermachine build of Debian $built_version" \
      > configure.log 2>&1) || { tail -20 "$work/build/configure.log" >&2; exit 1; }
  ninja -C "$work/build" -j"$jobs" qemu-system-x86_64 > "$work/build/ninja.log" 2>&1 \
    || { tail -20 "$work/build/ninja.log" >&2; exit 1; }
  mkdir -p "$dest.partial"
  cp "$work/build/qemu-system-x86_64" "$dest.partial/qemu-system-x86_64"
  strip "$dest.partial/qemu-system-x86_64"
  echo "$built_version" > "$dest.partial/source-version"
  rm -rf "$dest"
  mv "$dest.partial" "$dest"
fi

# The assets hold the binary itself (a hard link, else a copy keeping its time), not a
# symlink into this machine's build cache: they are complete wherever they are copied.
# A second run finds the link already there (mv refuses to move a file onto itself).
mkdir -p "$out_dir"
if [ ! "$out_dir/qemu-system-x86_64" -ef "$dest/qemu-system-x86_64" ]; then
  rm -f "$out_dir/qemu-system-x86_64.tmp"
  ln "$dest/qemu-system-x86_64" "$out_dir/qemu-system-x86_64.tmp" 2>/dev/null \
    || cp -p "$dest/qemu-system-x86_64" "$out_dir/qemu-system-x86_64.tmp"
  mv -f "$out_dir/qemu-system-x86_64.tmp" "$out_dir/qemu-system-x86_64"
fi
echo "$out_dir/qemu-system-x86_64: $dest/qemu-system-x86_64"
