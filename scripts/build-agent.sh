#!/bin/sh
# Builds the guest agent as a static binary into OUT_DIR/supermachine-agent (+ .sha256).
#   scripts/build-agent.sh OUT_DIR [aarch64]
# With `aarch64` it is cross-built for an arm64 guest by Debian's Rust (rustc-web,
# cargo-web, libstd-rust-web-dev:arm64; the rustup toolchain here has only the host's
# standard library), linked by gcc-aarch64-linux-gnu against libseccomp-dev:arm64.
set -eu
out_dir=${1:?usage: build-agent.sh OUT_DIR [aarch64]}
arch=${2:-}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
case "$arch" in
  "")
    cargo=cargo
    target=$(rustc -vV | sed -n 's/^host: //p')
    seccomp_dir=$(gcc -print-file-name=libseccomp.a | xargs dirname)
    ;;
  aarch64)
    target=aarch64-unknown-linux-gnu
    cargo=/usr/bin/cargo
    export RUSTC=/usr/bin/rustc
    export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
    export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
    seccomp_dir=/usr/lib/aarch64-linux-gnu
    for need in "$cargo" "$RUSTC" aarch64-linux-gnu-gcc "$seccomp_dir/libseccomp.a" \
      /usr/lib/rustlib/$target; do
      [ -e "$need" ] || command -v "$need" >/dev/null || {
        echo "build-agent.sh: $need missing (scripts/install-deps.sh aarch64)" >&2
        exit 1
      }
    done
    ;;
  *) echo "build-agent.sh: unknown architecture '$arch' (aarch64, or none for this host's)" >&2; exit 2 ;;
esac
# libseccomp (the agent compiles containers' seccomp profiles with it) is linked in whole.
LIBSECCOMP_LINK_TYPE=static LIBSECCOMP_LIB_PATH=$seccomp_dir \
  RUSTFLAGS="-C target-feature=+crt-static" "$cargo" build --quiet --locked --profile guest -p agent --target "$target"
mkdir -p "$out_dir"
bin="target/$target/guest/supermachine-agent"
if ! cmp -s "$bin" "$out_dir/supermachine-agent" 2>/dev/null; then
  cp "$bin" "$out_dir/supermachine-agent.tmp"
  mv "$out_dir/supermachine-agent.tmp" "$out_dir/supermachine-agent"
fi
sha256sum "$out_dir/supermachine-agent" | cut -d' ' -f1 > "$out_dir/supermachine-agent.sha256"
