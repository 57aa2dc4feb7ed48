# Shared by the integration scripts: private containerd/dockerd instances under a temp dir,
# a busybox image, runc-vs-supermachine comparisons printed as a table, and cleanup on exit.
# shellcheck shell=bash

set -euo pipefail

SM_BIN=${1:?usage: $0 /path/to/supermachine}
SM_BIN=$(readlink -f "$SM_BIN")
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RUNC=$(command -v runc)
export SUPERMACHINE_ASSETS_DIR=${SUPERMACHINE_ASSETS_DIR:-$REPO/build/share/supermachine}
export SUPERMACHINE_CACHE_DIR=${SUPERMACHINE_CACHE_DIR:-$REPO/build/cache}
# Debian's docker 20.10 client (a newer client may be first on PATH without an engine).
DOCKER_CLI=/usr/bin/docker

WORK=$(mktemp -d /tmp/sm-it-XXXXXX)
CTRD_SOCK=$WORK/containerd/containerd.sock
DOCKER_SOCK=$WORK/docker.sock
IMAGE=docker.io/smtest/busybox:latest
FAILED=0
SCRIPT_NAME=integration/$(basename "$0")
# Cases that cannot run here are listed in this file (`make test` prints it at its end).
SKIP_LOG=${SUPERMACHINE_SKIP_LOG:-$REPO/target/skipped-tests.log}
PIDS_TO_STOP=()

log() { printf '%s\n' "$*" >&2; }

ctr_() { ctr --address "$CTRD_SOCK" --namespace smtest "$@"; }
docker_() { "$DOCKER_CLI" -H "unix://$DOCKER_SOCK" "$@"; }

start_containerd() {
  mkdir -p "$WORK/containerd"
  cat > "$WORK/containerd/config.toml" <<TOML
version = 2
root = "$WORK/containerd/root"
state = "$WORK/containerd/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$CTRD_SOCK"
[ttrpc]
  address = "$CTRD_SOCK.ttrpc"
[debug]
  level = "warn"
TOML
  containerd --config "$WORK/containerd/config.toml" > "$WORK/containerd.log" 2>&1 &
  PIDS_TO_STOP+=($!)
  for _ in $(seq 100); do
    ctr --address "$CTRD_SOCK" version > /dev/null 2>&1 && return 0
    sleep 0.1
  done
  log "containerd did not start:"; cat "$WORK/containerd.log" >&2; return 1
}

# start_dockerd [ARGS...]: dockerd on our containerd, with no network of its own.
start_dockerd() {
  run_dockerd --iptables=false --ip-masq=false --bridge=none --userland-proxy=false "$@"
}

# start_dockerd_bridged BIP/24 [SUBNET/24...] [-- DOCKERD-ARGS...]: dockerd with its bridge,
# iptables NAT and port publishing, docker0 on BIP; SUBNETs are for networks the script
# creates. Bridges and rules a killed dockerd left on these subnets are removed before and
# after (a stale bridge keeps its address and a stale MASQUERADE rule rewrites bridged
# traffic).
BRIDGED_SUBNETS=()
start_dockerd_bridged() {
  local bip=$1
  shift
  BRIDGED_SUBNETS=("${bip%.*/*}.0/24")
  while [ $# -gt 0 ] && [ "$1" != -- ]; do BRIDGED_SUBNETS+=("$1"); shift; done
  [ $# -gt 0 ] && shift
  purge_stale_network
  AFTER_CLEANUP+=(purge_stale_network)
  run_dockerd --bip "$bip" "$@"
}

purge_stale_network() {
  local bridges table br subnet patterns=()
  for subnet in "${BRIDGED_SUBNETS[@]}"; do
    patterns+=(-e "$subnet")
    bridges+=" $(ip -o -4 addr show | awk -v gw="${subnet%.0/24}.1/" 'index($4, gw) == 1 { print $2 }')"
  done
  for br in $bridges; do patterns+=(-e "$br"); done
  for table in nat filter; do
    iptables -t "$table" -S 2> /dev/null | grep '^-A' | grep -F "${patterns[@]}" |
      sed 's/^-A/-D/' | while read -r rule; do eval "iptables -t $table $rule"; done || true
  done
  for br in $bridges; do ip link del "$br" 2> /dev/null; done
  return 0
}

run_dockerd() {
  mkdir -p "$WORK/docker" "$WORK/docker-exec"
  dockerd --containerd "$CTRD_SOCK" --data-root "$WORK/docker" --exec-root "$WORK/docker-exec" \
    -H "unix://$DOCKER_SOCK" --pidfile "$WORK/docker.pid" \
    --add-runtime "supermachine=$SM_BIN" "$@" > "$WORK/dockerd.log" 2>&1 &
  PIDS_TO_STOP+=($!)
  for _ in $(seq 200); do
    docker_ version > /dev/null 2>&1 && return 0
    sleep 0.1
  done
  log "dockerd did not start:"; tail -20 "$WORK/dockerd.log" >&2; return 1
}

busybox_image() {
  "$REPO/scripts/busybox-image.sh" "$WORK/busybox.tar" smtest/busybox:latest
}

cleanup() {
  local rc=$?
  set +e
  if [ -S "$DOCKER_SOCK" ]; then
    docker_ ps -aq 2>/dev/null | xargs -r "$DOCKER_CLI" -H "unix://$DOCKER_SOCK" rm -f > /dev/null 2>&1
  fi
  if [ -S "$CTRD_SOCK" ]; then
    for t in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks kill -s KILL "$t" > /dev/null 2>&1; ctr_ tasks delete -f "$t" > /dev/null 2>&1; done
    for c in $(ctr_ containers ls -q 2>/dev/null); do ctr_ containers rm "$c" > /dev/null 2>&1; done
  fi
  for ((i = ${#PIDS_TO_STOP[@]} - 1; i >= 0; i--)); do
    kill "${PIDS_TO_STOP[$i]}" 2>/dev/null
    wait "${PIDS_TO_STOP[$i]}" 2>/dev/null
  done
  # Leftover shims (and their containers) of our containerd.
  pkill -f -- "-address $CTRD_SOCK" 2>/dev/null
  # Monitors and VMs a failed case left (assert_no_leftovers reported them): whatever still
  # refers to this work dir was started by this script.
  for pid in $(processes_under_work); do kill -KILL "$pid" 2>/dev/null; done
  grep -o " $WORK[^ ]*" /proc/mounts | sort -r | while read -r m; do umount -l "$m" 2>/dev/null; done
  for hook in "${AFTER_CLEANUP[@]}"; do "$hook"; done
  rm -rf "$WORK"
  exit "$rc"
}
# Commands a script adds to run after the daemons have stopped.
AFTER_CLEANUP=()
trap cleanup EXIT INT TERM

# --- comparison table -----------------------------------------------------------------

TABLE=()
# What failed cases printed, repeated after the table: a log's tail then says why.
FAILURES=()
# The two runtimes each case runs under (the first is the reference).
COMPARED=(runc supermachine)

# short RESULT: one line of output and the exit code, for the table.
short() { printf '%s' "$1" | tr '\r\n' '  ' | sed 's/  */ /g; s/ $//' | cut -c1-22; }

# record CASE RUNC_OUT RUNC_RC SM_OUT SM_RC
record() {
  local name=$1 runc_out=$2 runc_rc=$3 sm_out=$4 sm_rc=$5 verdict=pass
  if [ "$runc_out" != "$sm_out" ] || [ "$runc_rc" != "$sm_rc" ]; then
    verdict=FAIL
    FAILED=$((FAILED + 1))
    log "--- $name differs"
    log "${COMPARED[0]} (rc=$runc_rc):"; log "$runc_out"
    log "${COMPARED[1]} (rc=$sm_rc):"; log "$sm_out"
    FAILURES+=("--- $name: ${COMPARED[1]} (rc=$sm_rc), ${COMPARED[0]} (rc=$runc_rc):
$(printf '%s' "$sm_out" | tail -n 15)")
  fi
  TABLE+=("$(printf '%-36s | %-30s | %-30s | %s' "$name" "$(short "$runc_out") rc=$runc_rc" "$(short "$sm_out") rc=$sm_rc" "$verdict")")
}

# Carriage returns (terminals) and ctr's own timestamped warnings are not the container's.
clean_output() { tr -d '\r' | grep -v '^time=".*level=warning msg="task ' || true; }

# SUPERMACHINE_CASES=REGEX runs only the cases whose names match (while working on one);
# the others are not run and not listed. CI runs them all, except where a caller names a
# subset on purpose with SUPERMACHINE_CASE_SUBSET=REGEX (the typical host's pass with KVM
# hidden, where each container is TCG inside TCG); the suite then says so first.
selected() {
  if [ -n "${SUPERMACHINE_CASE_SUBSET:-}" ]; then
    [[ $1 =~ $SUPERMACHINE_CASE_SUBSET ]]
    return
  fi
  [ "${CI:-}" = true ] || [ -z "${SUPERMACHINE_CASES:-}" ] || [[ $1 =~ $SUPERMACHINE_CASES ]]
}
if [ -n "${SUPERMACHINE_CASE_SUBSET:-}" ]; then
  echo "only the cases matching '$SUPERMACHINE_CASE_SUBSET' run (SUPERMACHINE_CASE_SUBSET)"
fi

# started CASE: says a case began (a case that hangs is then named before any table), with
# the time since the suite began.
SUITE_STARTED=$(date +%s)
started() { log "[$(($(date +%s) - SUITE_STARTED)) s] $1"; }

# compare CASE FUNCTION: FUNCTION RUNTIME prints output, its status is the result; it is
# called with each of COMPARED.
compare() {
  local name=$1 fn=$2 runc_out sm_out runc_rc sm_rc
  selected "$name" || return 0
  started "$name"
  set +e
  runc_out=$("$fn" "${COMPARED[0]}" 2>&1 | clean_output); runc_rc=${PIPESTATUS[0]}
  sm_out=$("$fn" "${COMPARED[1]}" 2>&1 | clean_output); sm_rc=${PIPESTATUS[0]}
  set -e
  record "$name" "$runc_out" "$runc_rc" "$sm_out" "$sm_rc"
}

# check CASE COMMAND...: a supermachine-only property (no runc counterpart to compare).
check() {
  local name=$1; shift
  local out rc
  selected "$name" || return 0
  started "$name"
  set +e
  out=$("$@" 2>&1 | clean_output); rc=${PIPESTATUS[0]}
  set -e
  if [ "$rc" = 0 ]; then
    TABLE+=("$(printf '%-36s | %-30s | %-30s | %s' "$name" "-" "$(short "$out")" pass)")
  else
    FAILED=$((FAILED + 1))
    log "--- $name failed (rc=$rc):"; log "$out"
    FAILURES+=("--- $name (rc=$rc):
$(printf '%s' "$out" | tail -n 15)")
    TABLE+=("$(printf '%-36s | %-30s | %-30s | %s' "$name" "-" "$(short "$out") rc=$rc" FAIL)")
  fi
}

print_table() {
  printf '\n%-36s | %-30s | %-30s | %s\n' "case" "${COMPARED[0]}" "${COMPARED[1]}" "result"
  printf '%s\n' "-------------------------------------+--------------------------------+--------------------------------+-------"
  printf '%s\n' "${TABLE[@]}"
  if [ "${#FAILURES[@]}" != 0 ]; then
    printf '\n'; printf '%s\n' "${FAILURES[@]}"
  fi
  # A VM the hypervisor under its VMM failed ended with that said in a runtime's log (the
  # monitor's, the shim's, containerd's or dockerd's): said here too, for whoever reruns a
  # suite over it (scripts/typical-host-inside.sh).
  if [ "$FAILED" != 0 ]; then
    grep -rIhos "the hypervisor under this VMM failed the guest[^\"]*" "$WORK" 2>/dev/null | sort -u | head -3
  fi
  printf '\n%d case(s) failed\n' "$FAILED"
}

# --- cases that cannot run here ---------------------------------------------------------

# cannot_run CASE REASON [in-ci|never]: CASE's prerequisite is missing. A failure under
# CI=true (unless `never`: a host property CI need not have), elsewhere a skip appended to
# SKIP_LOG.
cannot_run() {
  local name=$1 reason=$2 fails=${3:-in-ci}
  if [ "${CI:-}" = true ] && [ "$fails" = in-ci ]; then
    FAILED=$((FAILED + 1))
    log "--- $name cannot run: $reason"
    TABLE+=("$(printf '%-36s | %-30s | %-30s | %s' "$name" "-" "$(short "$reason")" FAIL)")
    return 0
  fi
  mkdir -p "$(dirname "$SKIP_LOG")"
  printf 'SKIPPED %s: %s: %s\n' "$SCRIPT_NAME" "$name" "$reason" | tee -a "$SKIP_LOG" >&2
  TABLE+=("$(printf '%-36s | %-30s | %-30s | %s' "$name" "-" "$(short "$reason")" skipped)")
}

# builtin_engine_usable CASE: whether the builtin engine can run here; records CASE as
# skipped (a failure under CI=true where /dev/kvm exists but cannot be used) when not.
builtin_engine_usable() {
  if [ -w /dev/kvm ]; then return 0; fi
  if [ -e /dev/kvm ]; then
    cannot_run "$1" "/dev/kvm is not writable"
  else
    # A host without KVM has no builtin engine, CI or not.
    cannot_run "$1" "no /dev/kvm" never
  fi
  return 1
}

# builtin_runtime: a runtime binary that is supermachine on the builtin engine, with a cache
# of its own (its first container bakes the snapshot, the next ones restore). For
# `--add-runtime` and `--runc-binary`, which take no environment.
builtin_runtime() {
  local wrapper=$WORK/supermachine-builtin
  if [ ! -x "$wrapper" ]; then
    mkdir -p "$WORK/builtin-cache"
    printf '#!/bin/sh\nSUPERMACHINE_ENGINE=builtin SUPERMACHINE_CACHE_DIR=%s exec %s "$@"\n' \
      "$WORK/builtin-cache" "$SM_BIN" > "$wrapper"
    chmod +x "$wrapper"
  fi
  printf '%s' "$wrapper"
}

builtin_cache_entries() {
  SUPERMACHINE_CACHE_DIR=$WORK/builtin-cache "$SM_BIN" cache ls --format json | jq length
}

# builtin_bakes, builtin_restores: the first container on the builtin engine bakes its image's
# snapshot, the next restores it. The calling script defines `builtin_run WORD`, which runs a
# container printing WORD and the guest kernel's release through its front door.
builtin_bakes() {
  [ "$(builtin_cache_entries)" = 0 ] || { echo "the builtin cache is not empty"; return 1; }
  builtin_run baked || return 1
  [ "$(builtin_cache_entries)" -ge 1 ] || { echo "no snapshot baked"; return 1; }
}
builtin_restores() {
  local before; before=$(builtin_cache_entries)
  [ "$before" -ge 1 ] || { echo "nothing to restore from"; return 1; }
  builtin_run restored || return 1
  [ "$(builtin_cache_entries)" = "$before" ] || { echo "baked again instead of restoring"; return 1; }
}

# --- processes and cgroups, whatever the engine and the cgroup version -------------------

# descendants PID: PID and every process under it.
descendants() {
  local pid=$1 child
  echo "$pid"
  for child in $(ps -o pid= --ppid "$pid" 2> /dev/null); do descendants "$child"; done
}

# monitor_pid ROOT ID: the container's monitor, from `supermachine state`.
monitor_pid() {
  "$SM_BIN" --root "$1" state "$2" 2> /dev/null | jq -e -r '.pid | select(. > 0)'
}

# vm_pids ROOT ID: the processes that are the container's VM: the monitor's children (an
# external VMM), or the monitor itself where the VMM runs inside it (builtin engine).
vm_pids() {
  local monitor children
  monitor=$(monitor_pid "$1" "$2") || return 1
  children=$(descendants "$monitor" | grep -vx "$monitor" || true)
  if [ -n "$children" ]; then echo "$children"; else echo "$monitor"; fi
}

if [ "$(stat -fc %T /sys/fs/cgroup)" = cgroup2fs ]; then
  CGROUP_V2=1
  MEMORY_CGROUPS=/sys/fs/cgroup
  MEMORY_LIMIT_FILE=memory.max
  # `ctr tasks metrics` names of cgroup v2's memory statistics.
  METRIC_MEMORY_LIMIT=memory.usage_limit
  METRIC_MEMORY_USAGE=memory.usage
else
  CGROUP_V2=0
  MEMORY_CGROUPS=/sys/fs/cgroup/memory
  MEMORY_LIMIT_FILE=memory.limit_in_bytes
  METRIC_MEMORY_LIMIT=memory.limit_in_bytes
  METRIC_MEMORY_USAGE=memory.usage_in_bytes
fi

# memory_cgroup PATH: the directory of the memory cgroup PATH (e.g. smtest/ID).
memory_cgroup() { printf '%s/%s' "$MEMORY_CGROUPS" "$1"; }

# memory_cgroup_of PID: the directory of PID's memory cgroup.
memory_cgroup_of() {
  local path
  if [ "$CGROUP_V2" = 1 ]; then
    path=$(awk -F: '$1 == "0" { print $3 }' "/proc/$1/cgroup")
  else
    path=$(awk -F: '$2 ~ /(^|,)memory(,|$)/ { print $3 }' "/proc/$1/cgroup")
  fi
  printf '%s%s' "$MEMORY_CGROUPS" "$path"
}

# --- pause ------------------------------------------------------------------------------

# The loop a pause case's container runs: a counter in /tmp/n, a tick every 50 ms.
COUNTER_LOOP='i=0; while true; do i=$((i+1)); echo $i > /tmp/n.new; mv /tmp/n.new /tmp/n; sleep 0.05; done'

# counter_stops_while_paused READ PAUSE RESUME: with READ (a command printing the counter of
# a container running COUNTER_LOOP), PAUSE and RESUME, proves that the container's processes
# did not run while paused: the counter's rate is measured over 2 s running (wall clock
# around two reads), and over a window of a read, PAUSE, a pause, RESUME and a read it must
# miss at least half the pause's ticks at that rate; it goes on after resume. The reads, the
# pause and the resume take time during which the counter runs (seconds each on a slow
# nested host, where a rate is good to a few tens of percent): the pause is 2 s or three
# reads long, whichever is longer, so that what it misses stands out of that noise.
counter_stops_while_paused() {
  local read=$1 pause=$2 resume=$3 b0 b1 c0 c1 c2 t0 t1 t2 t3 paused_ms
  read_counter() {
    local v
    for _ in $(seq 50); do
      v=$($read 2> /dev/null) && [ -n "$v" ] && { echo "$v"; return 0; }
      sleep 0.1
    done
    echo "counter unreadable" >&2
    return 1
  }
  ms() { date +%s%3N; }
  t0=$(ms)
  b0=$(read_counter) || return 1
  sleep 2
  b1=$(read_counter) || return 1
  t1=$(ms)
  # Two reads took what the running window had beyond its 2 s.
  paused_ms=$(( (t1 - t0 - 2000) * 3 / 2 ))
  [ "$paused_ms" -ge 2000 ] || paused_ms=2000
  t2=$(ms)
  c0=$(read_counter) || return 1
  $pause || { echo "pause failed"; return 1; }
  sleep "$((paused_ms / 1000)).$(printf '%03d' $((paused_ms % 1000)))"
  $resume || { echo "resume failed"; return 1; }
  c1=$(read_counter) || return 1
  t3=$(ms)
  sleep 1
  c2=$(read_counter) || return 1
  if [ $((b1 - b0)) -lt 10 ]; then
    echo "counter too slow to tell: $((b1 - b0)) ticks in 2 s running"; return 1
  fi
  # Ticks the paused window would have had at the running rate, less those it had, in
  # ms of running: at least half of its pause.
  local missed_ms=$(( (t3 - t2) - (c1 - c0) * (t1 - t0) / (b1 - b0) ))
  if [ "$missed_ms" -lt $((paused_ms / 2)) ]; then
    echo "ran while paused: +$((c1 - c0)) in $((t3 - t2)) ms with $paused_ms ms paused, +$((b1 - b0)) in $((t1 - t0)) ms running"
    return 1
  fi
  [ "$c2" -gt "$c1" ] || { echo "counter stuck at $c1 after resume"; return 1; }
  echo "counter stopped while paused, went on after resume"
}

# No VM, monitor or state may outlive the tests: no process but the daemons this script
# started may refer to its work dir (state roots, consoles, sockets are all under it),
# whatever its name or engine.
# processes_under_work [-v]: pids (with -v, and command lines) of live processes other than
# the daemons this script started whose command line refers to its work dir.
processes_under_work() {
  local pid cmdline own
  own=" ${PIDS_TO_STOP[*]} $$ $BASHPID "
  for pid in $(ls /proc | grep -E '^[0-9]+$'); do
    case "$own" in *" $pid "*) continue ;; esac
    cmdline=$(tr '\0' ' ' 2> /dev/null < "/proc/$pid/cmdline") || continue
    case "$cmdline" in *"$WORK"*) ;; *) continue ;; esac
    # Zombies are gone already (their parent has yet to reap them).
    grep -q '^State:[[:space:]]*Z' "/proc/$pid/status" 2> /dev/null && continue
    if [ "${1:-}" = -v ]; then echo "$pid: $cmdline"; else echo "$pid"; fi
  done
}

assert_no_leftovers() {
  local left
  left=$(processes_under_work -v)
  if [ -n "$left" ]; then
    FAILED=$((FAILED + 1)); log "--- leftover processes:"; log "$left"
    TABLE+=("$(printf '%-36s | %-30s | %-30s | %s' "no leftover VM or monitor" "-" "$(short "$left")" FAIL)")
  else
    TABLE+=("$(printf '%-36s | %-30s | %-30s | %s' "no leftover VM or monitor" "-" "none" pass)")
  fi
}
