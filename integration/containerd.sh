#!/bin/bash
# containerd 1.6 (its own instance under a temp dir) running containers through the runc
# shim with supermachine as the runc binary (`ctr run --runc-binary`), each case compared
# with runc in the same run.
#   integration/containerd.sh /path/to/supermachine
. "$(dirname "$0")/lib.bash"

start_containerd
busybox_image
ctr_ images import "$WORK/busybox.tar" > /dev/null

. "$(dirname "$0")/ctr-cases.bash"

compare "ctr run: output" case_output
compare "ctr run: exit status" case_exit_code
compare "ctr run: stdin" case_stdin
compare "ctr run -t: terminal" case_tty
compare "ctr run: env, cwd" case_env_cwd
compare "ctr task kill SIGTERM" case_kill
compare "ctr task kill --all SIGKILL" case_kill_all
compare "ctr task exec, pause, resume" case_exec_ps_pause
compare "ctr task exec: three at once" case_concurrent_execs
compare "ctr run --mount type=bind" case_bind_mount
compare "ctr: the rootfs keeps writes" case_rootfs_kept

# Properties without a runc counterpart to compare against.
metrics_and_ps() {
  local id=metrics-sm
  # shellcheck disable=SC2046
  ctr_ run -d $(rt supermachine) --memory-limit 536870912 "$IMAGE" "$id" sleep 1000 > /dev/null
  wait_status "$id" RUNNING
  local pid; pid=$(ctr_ tasks ls | awk -v id="$id" '$1 == id { print $2 }')
  # The task's pid is the monitor; ps lists it and its VMM.
  ctr_ tasks ps "$id" | grep -qw "$pid" || { echo "ps does not list $pid"; return 1; }
  # Metrics through the runc shim are the VM's host cgroup: its memory in use, and a limit
  # that holds the whole VM (the container's 512 MiB, the guest kernel's headroom, the VMM).
  local metrics; metrics=$(ctr_ tasks metrics "$id")
  echo "$metrics" | awk -v k="$METRIC_MEMORY_LIMIT" '$1 == k { exit !($2 > 536870912) }' || { echo "$metrics"; return 1; }
  echo "$metrics" | awk -v k="$METRIC_MEMORY_USAGE" '$1 == k { exit !($2 > 1048576) }' || { echo "$metrics"; return 1; }
  grep -qx "$pid" "$(memory_cgroup "smtest/$id")/cgroup.procs" || { echo "monitor not in its memory cgroup"; return 1; }
  ctr_ tasks kill -s SIGKILL "$id"
  wait_status "$id" STOPPED
  ctr_ tasks delete "$id" > /dev/null
  ctr_ containers rm "$id"
  [ ! -e "$(memory_cgroup "smtest/$id")" ] || { echo "cgroup left behind"; return 1; }
  echo "metrics: the VM's host cgroup (limit above 512 MiB, usage > 1 MiB); cgroup removed"
}
check "ctr task metrics, ps (VM cgroup)" metrics_and_ps

vm_died() {
  local id=vm-dies
  # shellcheck disable=SC2046
  ctr_ run $(rt supermachine) "$IMAGE" "$id" sleep 1000 &
  local pid=$!
  wait_status "$id" RUNNING
  # Kill the VM under the container: it must be reported stopped with a non-zero status.
  # On an early return the run is killed: it holds this case's output pipe open.
  local vm; vm=$(vm_pids "$WORK/sm-root/smtest" "$id") || { echo "no monitor in state"; kill "$pid"; return 1; }
  # shellcheck disable=SC2086
  kill -KILL $vm || { kill "$pid"; return 1; }
  local rc=0; wait "$pid" || rc=$?
  ctr_ containers rm "$id"
  [ "$rc" != 0 ] || { echo "exit status 0 after the VM died"; return 1; }
  echo "VM killed: task exited with $rc"
}
check "a dying VM stops the task" vm_died

no_state_left() {
  local left; left=$(ls -A "$WORK/sm-root/smtest" 2>/dev/null || true)
  [ -z "$left" ] || { echo "left: $left"; return 1; }
  echo none
}
check "no state left in --root" no_state_left

# The builtin engine through the runc shim: one run that boots and bakes a snapshot
# (minutes where KVM emulates guest kernel code), one that restores from it.
builtin_run() { # WORD
  local out start; start=$(date +%s)
  out=$(ctr_ run --rm --runc-binary "$(builtin_runtime)" --runc-root "$WORK/sm-builtin-root" \
    "$IMAGE" "builtin-$1" sh -c "echo $1; uname -r" 2>&1 | clean_output) || { echo "$out"; return 1; }
  [ "$(echo "$out" | head -1)" = "$1" ] || { echo "$out"; return 1; }
  echo "$1 in $(($(date +%s) - start)) s, guest $(echo "$out" | tail -1), $(builtin_cache_entries) snapshot(s)"
}
if { selected "builtin: ctr run boots, bakes" || selected "builtin: ctr run restores"; } &&
  builtin_engine_usable "builtin engine cases"; then
  check "builtin: ctr run boots, bakes" builtin_bakes
  check "builtin: ctr run restores" builtin_restores
fi
assert_no_leftovers
print_table
[ "$FAILED" = 0 ]
