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
time_runs() { # RUNTIME
  local i start
  docker_ run --rm --runtime="$1" smtest/busybox true # warm-up
  for i in $(seq "$RUNS"); do
    start=$(ms)
    docker_ run --rm --runtime="$1" smtest/busybox true
    echo $(($(ms) - start))
  done
}
median() { sort -n | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }

runc_median=$(time_runs runc | median)
sm_median=$(time_runs supermachine | median)
printf '\ndocker run --rm of true, %s runs each (ms)\n' "$RUNS"
printf '%-14s%10s%10s\n' runtime median ratio
printf '%-14s%10s%9sx\n' runc "$runc_median" 1.0
printf '%-14s%10s%9sx\n' supermachine "$sm_median" "$(awk -v a="$sm_median" -v b="$runc_median" 'BEGIN { printf "%.1f", a / b }')"
