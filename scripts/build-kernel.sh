#!/bin/sh
# Builds the guest kernel from Debian's linux-source-6.1 with the project's config fragments
# and patches, caches it by the digest of its inputs, and links it into OUT_DIR.
#
#   scripts/build-kernel.sh VARIANT OUT_DIR
#
# VARIANT is `default` (x86_64: vmlinux with its PVH entry, and the same kernel as a
# bzImage; config/guest-kernel.config and guest-kernel-x86_64.config,
# config/patches/common/*.patch), `pvm` (the same plus config/guest-kernel-pvm.config and
# config/patches/pvm/*.patch; its files carry the variant's name: vmlinux-pvm) or `arm64`
# (cross-built with aarch64-linux-gnu-gcc: the `Image` a VMM boots, and vmlinux;
# guest-kernel.config and guest-kernel-arm64.config, the common patches; OUT_DIR is then an
# aarch64 assets directory).
# The cache lives outside the clone (SUPERMACHINE_BUILD_CACHE, default ~/.cache/supermachine)
# so that later clones on the same machine reuse the build.
set -eu

variant=${1:?usage: build-kernel.sh default|pvm|arm64 OUT_DIR}
out_dir=${2:?usage: build-kernel.sh default|pvm|arm64 OUT_DIR}
root=$(cd "$(dirname "$0")/.." && pwd)
source_tar=/usr/src/linux-source-6.1.tar.xz
cache=${SUPERMACHINE_BUILD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/supermachine}
jobs=$(nproc)

fragments="$root/config/guest-kernel.config"
patches=$(ls "$root"/config/patches/common/*.patch 2>/dev/null || true)
arch=x86_64
cross=""
case "$variant" in
  default) fragments="$fragments $root/config/guest-kernel-x86_64.config" ;;
  pvm)
    fragments="$fragments $root/config/guest-kernel-x86_64.config $root/config/guest-kernel-pvm.config"
    patches="$patches $(ls "$root"/config/patches/pvm/*.patch 2>/dev/null || true)"
    ;;
  arm64)
    fragments="$fragments $root/config/guest-kernel-arm64.config"
    arch=arm64
    cross=aarch64-linux-gnu-
    command -v "${cross}gcc" >/dev/null || {
      echo "build-kernel.sh: ${cross}gcc missing (Debian's gcc-aarch64-linux-gnu)" >&2
      exit 1
    }
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
  kmake() { make -C "$src" -s ARCH="$arch" CROSS_COMPILE="$cross" "$@"; }
  kmake tinyconfig
  # shellcheck disable=SC2086
  (cd "$src" && ARCH="$arch" ./scripts/kconfig/merge_config.sh -m -O . .config $fragments >/dev/null)
  kmake olddefconfig
  missing=$(cat $fragments | sed -n 's/^\(CONFIG_[A-Z0-9_]*\)=y$/\1/p' | while read -r opt; do
    grep -qx "$opt=y" "$src/.config" || echo "$opt"
  done)
  if [ -n "$missing" ]; then
    echo "build-kernel.sh: options lost by olddefconfig (missing dependencies):" $missing >&2
    exit 1
  fi
  if [ "$arch" = arm64 ]; then
    kmake -j"$jobs" vmlinux Image
    boot_file=arch/arm64/boot/Image
  else
    kmake -j"$jobs" vmlinux bzImage
    boot_file=arch/x86/boot/bzImage
  fi
  rm -rf "$dest.partial"
  mkdir -p "$dest.partial"
  cp "$src/$boot_file" "$dest.partial/"
  cp "$src/vmlinux" "$dest.partial/vmlinux"
  cp "$src/.config" "$dest.partial/config"
  strings "$src/vmlinux" | sed -n 's/^Linux version \([^ ]*\).*/\1/p' | head -1 > "$dest.partial/release"
  sha256sum "$dest.partial/vmlinux" | cut -d' ' -f1 > "$dest.partial/vmlinux.sha256"
  rm -rf "$dest"
  mv "$dest.partial" "$dest"
fi

# The default kernel is vmlinux, release, …; the pvm variant's files carry its name
# (vmlinux-pvm); arm64's go unnamed into an assets directory of their own.
suffix=""
[ "$variant" = pvm ] && suffix="-$variant"
boot_image=bzImage
[ "$arch" = arm64 ] && boot_image=Image
mkdir -p "$out_dir"
for f in vmlinux vmlinux.sha256 $boot_image config release; do
  name=$(echo "$f" | sed "s/^\([a-zA-Z]*\)/\1$suffix/")
  ln -sf "$dest/$f" "$out_dir/$name.tmp" && mv -f "$out_dir/$name.tmp" "$out_dir/$name"
done
echo "$out_dir/vmlinux$suffix -> $dest/vmlinux"
