#!/bin/bash
# `docker run --rm IMAGE true`: runc vs supermachine through a private dockerd, one run.
#   scripts/bench-docker.sh /path/to/supermachine [RUNS]
RUNS=${2:-${BENCH_RUNS:-10}}
. "$(dirname "$0")/../integration/lib.bash" "$1"

start_containerd
start_dockerd
busybox_image
docker_ load -i "$WORK/busybox.tar" > /dev/null

ms() { date +%s%3N; }
# run_once RUNTIME WHAT: one `docker run --rm … true`; a failed run ends the benchmark (a
# failure timed as a run would pass for a fast one).
run_once() {
  local out
  out=$(docker_ run --rm --runtime="$1" smtest/busybox true 2>&1) || {
    log "docker run --runtime=$1 failed ($2): $out"
    return 1
  }
}
time_runs() { # RUNTIME
  local i start
  run_once "$1" warm-up || return 1
  for i in $(seq "$RUNS"); do
    start=$(ms)
    run_once "$1" "run $i" || return 1
    echo $(($(ms) - start))
  done
}
median() { sort -n | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }

# pipefail (lib.bash): a failed run fails the assignment, and set -e the script.
runc_median=$(time_runs runc | median)
sm_median=$(time_runs supermachine | median)
printf '\ndocker run --rm of true, %s runs each (ms)\n' "$RUNS"
printf '%-14s%10s%10s\n' runtime median ratio
printf '%-14s%10s%9sx\n' runc "$runc_median" 1.0
printf '%-14s%10s%9sx\n' supermachine "$sm_median" "$(awk -v a="$sm_median" -v b="$runc_median" 'BEGIN { printf "%.1f", a / b }')"
