#!/bin/sh
# Builds the guest agent as a static binary into OUT_DIR/supermachine-agent (+ .sha256).
#   scripts/build-agent.sh OUT_DIR
set -eu
out_dir=${1:?usage: build-agent.sh OUT_DIR}
root=$(cd "$(dirname "$0")/.." && pwd)
target=$(rustc -vV | sed -n 's/^host: //p')
cd "$root"
# libseccomp (the agent compiles containers' seccomp profiles with it) is linked in whole.
LIBSECCOMP_LINK_TYPE=static LIBSECCOMP_LIB_PATH=$(gcc -print-file-name=libseccomp.a | xargs dirname) \
  RUSTFLAGS="-C target-feature=+crt-static" cargo build --quiet --locked --profile guest -p agent --target "$target"
mkdir -p "$out_dir"
bin="target/$target/guest/supermachine-agent"
if ! cmp -s "$bin" "$out_dir/supermachine-agent" 2>/dev/null; then
  cp "$bin" "$out_dir/supermachine-agent.tmp"
  mv "$out_dir/supermachine-agent.tmp" "$out_dir/supermachine-agent"
fi
sha256sum "$out_dir/supermachine-agent" | cut -d' ' -f1 > "$out_dir/supermachine-agent.sha256"
