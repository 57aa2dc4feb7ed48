#!/bin/sh
# Builds the guest kernel (vmlinux with its PVH entry, and the same kernel as a bzImage) from
# Debian's linux-source-6.1 with the project's config fragment and patches, caches it by the
# digest of its inputs, and links it into OUT_DIR.
#
#   scripts/build-kernel.sh VARIANT OUT_DIR
#
# VARIANT is `default` (config/guest-kernel.config and config/patches/common/*.patch) or
# `pvm` (the same plus config/guest-kernel-pvm.config and config/patches/pvm/*.patch).
# The cache lives outside the clone (SUPERMACHINE_BUILD_CACHE, default ~/.cache/supermachine)
# so that later clones on the same machine reuse the build.
set -eu

variant=${1:?usage: build-kernel.sh default|pvm OUT_DIR}
out_dir=${2:?usage: build-kernel.sh default|pvm OUT_DIR}
root=$(cd "$(dirname "$0")/.." && pwd)
source_tar=/usr/src/linux-source-6.1.tar.xz
cache=${SUPERMACHINE_BUILD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/supermachine}
jobs=$(nproc)

fragments="$root/config/guest-kernel.config"
patches=$(ls "$root"/config/patches/common/*.patch 2>/dev/null || true)
case "$variant" in
  default) ;;
  pvm)
    fragments="$fragments $root/config/guest-kernel-pvm.config"
    patches="$patches $(ls "$root"/config/patches/pvm/*.patch 2>/dev/null || true)"
    ;;
  *) echo "build-kernel.sh: unknown variant '$variant'" >&2; exit 2 ;;
esac

if [ ! -f "$source_tar" ]; then
  echo "build-kernel.sh: $source_tar is missing; install the Debian package linux-source-6.1" >&2
  exit 1
fi

# The digest covers every input that changes the output.
source_version=$(dpkg-query -W -f='${Version}' linux-source-6.1 2>/dev/null || stat -c %s "$source_tar")
digest=$( { echo "$source_version"; cat "$0" $fragments $patches; } | sha256sum | cut -c1-16)
dest="$cache/kernel/$variant-$digest"

if [ ! -f "$dest/vmlinux" ]; then
  work="$cache/kernel/.work-$variant-$digest-$$"
  rm -rf "$work"
  mkdir -p "$work"
  trap 'rm -rf "$work"' EXIT
  echo "build-kernel.sh: building $variant kernel $digest (a few minutes, once per machine)" >&2
  tar -C "$work" -xf "$source_tar"
  src="$work/linux-source-6.1"
  for p in $patches; do
    patch -d "$src" -p1 --quiet < "$p"
  done
  make -C "$src" -s ARCH=x86_64 tinyconfig
  # shellcheck disable=SC2086
  (cd "$src" && ./scripts/kconfig/merge_config.sh -m -O . .config $fragments >/dev/null)
  make -C "$src" -s ARCH=x86_64 olddefconfig
  missing=$(cat $fragments | sed -n 's/^\(CONFIG_[A-Z0-9_]*\)=y$/\1/p' | while read -r opt; do
    grep -qx "$opt=y" "$src/.config" || echo "$opt"
  done)
  if [ -n "$missing" ]; then
    echo "build-kernel.sh: options lost by olddefconfig (missing dependencies):" $missing >&2
    exit 1
  fi
  make -C "$src" -s ARCH=x86_64 -j"$jobs" vmlinux bzImage
  mkdir -p "$dest.partial"
  cp "$src/vmlinux" "$dest.partial/vmlinux"
  cp "$src/arch/x86/boot/bzImage" "$dest.partial/bzImage"
  cp "$src/.config" "$dest.partial/config"
  strings "$src/vmlinux" | sed -n 's/^Linux version \([^ ]*\).*/\1/p' | head -1 > "$dest.partial/release"
  sha256sum "$dest.partial/vmlinux" | cut -d' ' -f1 > "$dest.partial/vmlinux.sha256"
  rm -rf "$dest"
  mv "$dest.partial" "$dest"
fi

# The default kernel is vmlinux, release, …; a variant's files carry its name: vmlinux-pvm.
suffix=""
[ "$variant" = default ] || suffix="-$variant"
mkdir -p "$out_dir"
for f in vmlinux vmlinux.sha256 bzImage config release; do
  name=$(echo "$f" | sed "s/^\([a-zA-Z]*\)/\1$suffix/")
  ln -sf "$dest/$f" "$out_dir/$name.tmp" && mv -f "$out_dir/$name.tmp" "$out_dir/$name"
done
echo "$out_dir/vmlinux$suffix -> $dest/vmlinux"
