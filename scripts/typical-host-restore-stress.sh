#!/bin/sh
# Runs inside the typical host in place of typical-host-inside.sh, to chase an intermittent
# failure of restored VMs on the builtin engine (nested KVM):
#   SUPERMACHINE_TYPICAL_HOST_INSIDE=scripts/typical-host-restore-stress.sh \
#   SUPERMACHINE_TYPICAL_HOST_PASSES=kvm scripts/typical-host.sh BIN_DIR ASSETS_DIR
# Three loops of `supermachine run` (each restores the busybox image's snapshot and runs a
# shell) at once, with the agent logging each request to the guest console, until one fails
# or each has run STRESS_RUNS times; a failure prints its error (with the console's last
# lines) and its debug log. Exits non-zero when a run failed.
set -u
runs=${STRESS_RUNS:-100}
cp -a /payload/usr/local/. /usr/local/
workspace=$(cat /payload/workspace)
mkdir -p "$workspace" && cp -a /payload/ws/. /
mkdir -p /tmp/bundle
cp -a "$workspace/target/sm-test/rootfs" /tmp/bundle/rootfs
(cd /tmp/bundle && supermachine spec >/dev/null &&
  jq '.process.args = ["sh", "-c", "echo ok"] | .process.terminal = false' config.json > c.json &&
  mv c.json config.json)
export SUPERMACHINE_ENGINE=builtin SUPERMACHINE_GUEST_DEBUG=1
# Where this host's KVM code is: a stalled guest's vCPU found at one of these addresses
# (as the VMM's description of a stalled VM gives it) is running this host's code, not its
# own.
echo "== this host's KVM module code"
grep -E '^kvm(_amd|_intel)? ' /proc/modules
grep -E ' (__svm_vcpu_run|svm_vcpu_run|vmx_vcpu_run)(\s|$)' /proc/kallsyms

# stress NAME: STRESS_RUNS runs of the bundle as NAME1, NAME2, ... in a state root of its own.
stress() {
  for i in $(seq "$runs"); do
    started=$(date +%s%3N)
    if ! timeout 120 supermachine --debug --log "/tmp/$1$i.log" --root "/tmp/root-$1" \
      run --bundle /tmp/bundle "$1$i" > "/tmp/$1$i.out" 2>&1 < /dev/null; then
      echo "== FAIL: $1, run $i, after $(($(date +%s%3N) - started)) ms"
      cat "/tmp/$1$i.out"
      echo "== its debug log"
      tail -n 100 "/tmp/$1$i.log"
      return 1
    fi
    echo "$1 run $i: $(($(date +%s%3N) - started)) ms"
  done
}

stress a & a=$!
stress b & b=$!
stress c & c=$!
status=0
for pid in $a $b $c; do wait "$pid" || status=1; done
echo "== restore stress: $([ "$status" = 0 ] && echo "no failure in 3 x $runs runs" || echo failed)"
exit "$status"
