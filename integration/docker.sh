#!/bin/bash
# dockerd 20.10 (on its own containerd, both under a temp dir, on its own bridge network)
# with supermachine registered as a runtime (`--add-runtime`), each case compared with runc
# in the same run; then a few cases once more on the builtin engine where /dev/kvm allows.
#   integration/docker.sh /path/to/supermachine
. "$(dirname "$0")/lib.bash"

start_containerd
BUILTIN_ARGS=()
if builtin_engine_usable "builtin engine cases"; then
  BUILTIN_ARGS=(--add-runtime "supermachine-builtin=$(builtin_runtime)")
fi
start_dockerd_bridged 10.213.9.1/24 -- "${BUILTIN_ARGS[@]}"
# The runtimes' state root (`--root`): docker 20.10 runs a runtime added by path through
# containerd's runc shim, whose root is the same for runc and supermachine.
sm_root() { printf '%s/docker-exec/runtime-runc/moby' "$WORK"; }
busybox_image
docker_ load -i "$WORK/busybox.tar" > /dev/null
IMG=smtest/busybox
"$REPO/scripts/busybox-image.sh" "$WORK/sqlite.tar" smtest/sqlite:latest "$(command -v sqlite3)"
docker_ load -i "$WORK/sqlite.tar" > /dev/null
SQLITE_IMG=smtest/sqlite

run_() { local runtime=$1; shift; docker_ run --runtime="$runtime" "$@"; }
wait_log() { # ID TEXT
  for _ in $(seq 300); do
    docker_ logs "$1" 2>&1 | grep -q "$2" && return 0
    sleep 0.1
  done
  return 1
}

case_output() { run_ "$1" --rm "$IMG" sh -c 'echo hello; echo $HOME; id; cat /proc/1/cmdline | tr "\0" " "'; }
case_exit_code() { run_ "$1" --rm "$IMG" sh -c 'exit 3'; }
case_stdin() { printf 'one\ntwo\nthree\n' | run_ "$1" --rm -i "$IMG" sh -c 'wc -l; echo done'; }
case_tty() { run_ "$1" --rm -t "$IMG" sh -c 'tty > /dev/null && echo is-a-tty; echo $TERM'; }
case_env_cwd_user() { run_ "$1" --rm -e FOO=bar -w /tmp -u 1000:1000 "$IMG" sh -c 'echo $FOO; pwd; id'; }
case_hostname() { run_ "$1" --rm --hostname box1 "$IMG" sh -c 'hostname; cat /etc/hostname'; }
case_etc_files() {
  run_ "$1" --rm --hostname box2 --add-host db:10.1.2.3 --dns 192.0.2.53 "$IMG" \
    sh -c 'grep -E "localhost|db" /etc/hosts; cat /etc/resolv.conf; cat /etc/hostname'
}
case_read_only() { run_ "$1" --rm --read-only "$IMG" sh -c 'touch /x 2>&1; echo rc=$?; touch /tmp/y 2>&1; echo rc=$?'; }
case_tmpfs() {
  run_ "$1" --rm --read-only --tmpfs /scratch:size=8m "$IMG" \
    sh -c 'echo ok > /scratch/f && cat /scratch/f; grep " /scratch " /proc/mounts | cut -d" " -f3'
}
case_detach_logs_exec() {
  local id; id=$(run_ "$1" -d "$IMG" sh -c 'echo logged; echo to-stderr >&2; exec sleep 1000')
  wait_log "$id" to-stderr
  docker_ logs "$id" 2>&1 | sort
  # stdout and stderr are separate streams with no defined order between them.
  docker_ exec "$id" sh -c 'echo exec-out; echo exec-err >&2; exit 5' 2> "$WORK/exec-err-$1"
  echo "exec rc=$?"
  cat "$WORK/exec-err-$1"
  docker_ exec -t "$id" sh -c 'tty > /dev/null && echo exec-tty'
  echo exec-stdin | docker_ exec -i "$id" cat
  docker_ exec -u 1000 -w /tmp -e X=1 "$id" sh -c 'id -u; pwd; echo $X'
  docker_ rm -f "$id" > /dev/null
}
case_pause() {
  local id; id=$(run_ "$1" -d "$IMG" sh -c "$COUNTER_LOOP")
  PAUSED_ID=$id
  read_() { docker_ exec "$PAUSED_ID" cat /tmp/n; }
  pause_() { docker_ pause "$PAUSED_ID" > /dev/null && docker_ inspect -f '{{.State.Status}}' "$PAUSED_ID"; }
  unpause_() { docker_ unpause "$PAUSED_ID" > /dev/null && docker_ inspect -f '{{.State.Status}}' "$PAUSED_ID"; }
  local rc=0
  counter_stops_while_paused read_ pause_ unpause_ || rc=1
  docker_ exec "$id" echo alive
  docker_ rm -f "$id" > /dev/null
  return "$rc"
}
case_stop_kills_after_timeout() {
  # PID 1 ignores SIGTERM without a handler: stop waits, then SIGKILL.
  local id; id=$(run_ "$1" -d "$IMG" sleep 1000)
  docker_ stop -t 2 "$id" > /dev/null
  docker_ inspect -f '{{.State.Status}} {{.State.ExitCode}}' "$id"
  docker_ rm "$id" > /dev/null
}
case_stop_graceful() {
  local id; id=$(run_ "$1" -d "$IMG" sh -c 'trap "echo bye; exit 0" TERM; while true; do sleep 0.2; done')
  sleep 1
  docker_ stop -t 20 "$id" > /dev/null
  docker_ inspect -f '{{.State.Status}} {{.State.ExitCode}}' "$id"
  docker_ logs "$id"
  docker_ rm "$id" > /dev/null
}
case_kill_signal() {
  local id; id=$(run_ "$1" -d "$IMG" sh -c 'trap "echo got-usr1" USR1; echo ready; while true; do sleep 0.2; done')
  wait_log "$id" ready
  docker_ kill -s USR1 "$id" > /dev/null
  wait_log "$id" got-usr1
  docker_ kill -s KILL "$id" > /dev/null
  docker_ wait "$id"
  docker_ logs "$id"
  docker_ rm "$id" > /dev/null
}
case_rm_force() {
  local id; id=$(run_ "$1" -d "$IMG" sleep 1000)
  docker_ rm -f "$id" > /dev/null; echo "rm rc=$?"
  docker_ ps -aq --no-trunc | grep -c "$id"
}
# The container's memory limit as it reads it: cgroup v2's file (supermachine's guest, a v2
# host's runc) or cgroup v1's (runc on a v1 host).
CONTAINER_MEMORY_LIMIT='cat /sys/fs/cgroup/memory.max 2>/dev/null || cat /sys/fs/cgroup/memory/memory.limit_in_bytes'
case_update_memory() {
  # Within the VM's memory (a VM without a limit has the default 256 MiB guest).
  local id; id=$(run_ "$1" -d "$IMG" sleep 1000)
  docker_ update --memory 200m --memory-swap 400m "$id" > /dev/null; echo "update rc=$?"
  docker_ inspect -f '{{.HostConfig.Memory}}' "$id"
  docker_ exec "$id" sh -c "$CONTAINER_MEMORY_LIMIT"
  docker_ rm -f "$id" > /dev/null
}
case_memory_limit_in_container() {
  run_ "$1" --rm -m 64m "$IMG" sh -c "$CONTAINER_MEMORY_LIMIT"
}
case_oom_kill() {
  # 96 MiB touched under 48 MiB without swap: the OOM killer ends the container.
  local name=oom-$1 rc=0
  run_ "$1" --name "$name" -m 48m --memory-swap 48m "$IMG" dd if=/dev/zero of=/dev/null bs=96M count=1 2> /dev/null || rc=$?
  echo "rc=$rc"
  docker_ inspect -f 'exit {{.State.ExitCode}}' "$name"
  docker_ rm "$name" > /dev/null
}
case_read_only_etc_files() {
  run_ "$1" --rm --read-only "$IMG" sh -c \
    'cat /etc/resolv.conf; echo "hostname: $(wc -c < /etc/hostname) bytes, the container'"'"'s: $([ "$(cat /etc/hostname)" = "$(hostname)" ] && echo yes || echo no)"'
}
case_init_true() { run_ "$1" --rm --init "$IMG" true; }
case_init_output() {
  run_ "$1" --rm --init "$IMG" sh -c 'echo from-init-child; tr "\0" " " < /proc/1/cmdline; echo; exit 5'
}
# processes_mentioning TEXT: host processes (any name) whose command line holds TEXT.
processes_mentioning() {
  local pid
  for pid in $(ls /proc | grep -E '^[0-9]+$'); do
    grep -qF -- "$1" "/proc/$pid/cmdline" 2> /dev/null || continue
    grep -q '^State:[[:space:]]*Z' "/proc/$pid/status" 2> /dev/null && continue
    echo "$pid: $(tr '\0' ' ' 2> /dev/null < "/proc/$pid/cmdline")"
  done
}
case_failed_start() {
  # The image has no such program: the runtime's start fails, docker reports it (127) and
  # keeps the container, which must then be removable leaving nothing behind.
  local name=failstart-$1 out rc=0 id
  out=$(run_ "$1" --name "$name" "$IMG" no-such-command 2>&1) || rc=$?
  echo "run rc=$rc"
  echo "$out" | grep -o 'executable file not found in $PATH' || echo "$out"
  id=$(docker_ inspect -f '{{.Id}}' "$name")
  docker_ inspect -f '{{.State.Status}}' "$name"
  docker_ rm "$name" > /dev/null; echo "rm rc=$?"
  docker_ ps -aq --no-trunc | grep -c "$id"
  local state_dir; state_dir=$(sm_root)/$id
  [ -e "$state_dir" ] && echo "state dir left: $state_dir"
  local left; left=$(processes_mentioning "$id")
  [ -n "$left" ] && echo "processes left: $left"
  return 0
}
case_update_memory_raise() {
  local id; id=$(run_ "$1" -d --memory 64m "$IMG" sleep 1000)
  local out rc=0
  out=$(docker_ update --memory 128m "$id" 2>&1) || rc=$?
  echo "update rc=$rc"; [ "$rc" = 0 ] || echo "$out"
  docker_ inspect -f '{{.HostConfig.Memory}}' "$id"
  docker_ exec "$id" sh -c "$CONTAINER_MEMORY_LIMIT"
  docker_ rm -f "$id" > /dev/null
}

# docker's default seccomp profile fails process_vm_readv(2) with EPERM (it needs
# CAP_SYS_PTRACE there); unconfined, a process may read its own memory with it. The probe
# (tests/fixtures/seccomp_probe.rs, static) is bound in read-only: the one the VM tests built
# when it is newer than its source (a host without rustc, the typical host, gets it so),
# else built here.
SECCOMP_PROBE=$REPO/target/sm-test/seccomp_probe
if [ ! "$SECCOMP_PROBE" -nt "$REPO/tests/fixtures/seccomp_probe.rs" ]; then
  SECCOMP_PROBE=$WORK/seccomp_probe
  rustc --edition 2021 -O -C target-feature=+crt-static -C strip=symbols -o "$SECCOMP_PROBE" \
    "$REPO/tests/fixtures/seccomp_probe.rs"
fi
case_seccomp_default() { run_ "$1" --rm -v "$SECCOMP_PROBE:/probe:ro" "$IMG" /probe; }
case_seccomp_unconfined() {
  run_ "$1" --rm --security-opt seccomp=unconfined -v "$SECCOMP_PROBE:/probe:ro" "$IMG" /probe
}

compare "docker run: output" case_output
compare "docker run: exit status" case_exit_code
compare "docker run -i: piped stdin" case_stdin
compare "docker run -t: pty" case_tty
compare "docker run -e -w -u" case_env_cwd_user
compare "docker run --hostname" case_hostname
compare "/etc/hosts, resolv.conf, hostname" case_etc_files
compare "docker run --read-only" case_read_only
compare "docker run --tmpfs" case_tmpfs
compare "run -d, logs, exec (-t, -i, -u)" case_detach_logs_exec
compare "docker pause / unpause" case_pause
compare "docker stop: SIGKILL after timeout" case_stop_kills_after_timeout
compare "docker stop: SIGTERM handled" case_stop_graceful
compare "docker kill -s USR1, KILL" case_kill_signal
compare "docker rm -f" case_rm_force
compare "docker update --memory" case_update_memory
compare "docker run -m 64m: the container's limit" case_memory_limit_in_container
compare "OOM kill: exit 137" case_oom_kill
compare "--read-only: resolv.conf, hostname" case_read_only_etc_files
compare "docker run --init true" case_init_true
compare "docker run --init: output, status" case_init_output
compare "failed start: reported, removable" case_failed_start
compare "update --memory 64m -> 128m" case_update_memory_raise
compare "seccomp: docker's default profile" case_seccomp_default
compare "seccomp=unconfined" case_seccomp_unconfined

# Volumes and bind mounts: the host's files, live both ways, as with runc.
case_volume_rw() {
  local d="$WORK/vol-rw-$1"; rm -rf "$d"; mkdir -p "$d/sub"; echo from-host > "$d/sub/in"
  run_ "$1" --rm -v "$d:/data" "$IMG" sh -c \
    'cat /data/sub/in; echo from-container > /data/out; chown 1000:1000 /data/out; ln -s out /data/link; ls -ln /data/out | cut -d" " -f1-5'
  cat "$d/out"; readlink "$d/link"; stat -c '%u:%g' "$d/out"
}
case_volume_ro() {
  local d="$WORK/vol-ro-$1"; rm -rf "$d"; mkdir -p "$d"; echo kept > "$d/f"
  run_ "$1" --rm -v "$d:/data:ro" "$IMG" sh -c \
    'cat /data/f; (echo x > /data/f) 2>/dev/null && echo wrote; touch /data/new 2>/dev/null && echo created; echo end'
  cat "$d/f"; ls "$d"
}
case_mount_bind_readonly() {
  local d="$WORK/mnt-ro-$1"; rm -rf "$d"; mkdir -p "$d"; echo hi > "$d/f"
  run_ "$1" --rm --mount "type=bind,source=$d,target=/m,readonly" "$IMG" sh -c \
    'cat /m/f; rm /m/f 2>/dev/null && echo removed; grep " /m " /proc/mounts | grep -c "[ ,]ro[ ,]"'
  ls "$d"
}
case_named_volume() {
  local v="vol-$1"; docker_ volume rm -f "$v" > /dev/null 2>&1
  run_ "$1" --rm -v "$v:/v" "$IMG" sh -c 'echo first > /v/a; mkdir /v/d; ln /v/a /v/d/hard'
  run_ "$1" --rm -v "$v:/v" "$IMG" sh -c 'cat /v/d/hard; stat -c %h /v/a; ls /v'
  docker_ volume rm "$v" > /dev/null
}
case_nested_binds() {
  local d="$WORK/nest-$1"; rm -rf "$d"; mkdir -p "$d/outer/inner" "$d/other"; echo o > "$d/outer/o"; echo i > "$d/other/i"
  run_ "$1" --rm -v "$d/outer:/x" -v "$d/other:/x/inner" -v "$d/other:/bin/over" "$IMG" sh -c \
    'cat /x/o /x/inner/i /bin/over/i; echo w > /x/inner/w'
  cat "$d/other/w"; ls "$d/outer/inner"
}
case_file_bind() {
  local f="$WORK/file-$1"; printf 'one\n' > "$f"
  run_ "$1" --rm -v "$f:/etc/one.conf" "$IMG" sh -c 'cat /etc/one.conf; echo two >> /etc/one.conf; ls /etc | grep -c "^file-"'
  cat "$f"
}
case_volume_files() {
  local d="$WORK/vol-files-$1"; rm -rf "$d"; mkdir -p "$d"
  run_ "$1" --rm -v "$d:/d" "$IMG" sh -c \
    'truncate -s 5G /d/sparse; printf x | dd of=/d/sparse bs=1 seek=6442450944 conv=notrunc 2>/dev/null; stat -c %s /d/sparse; echo a > /d/a; mv /d/a /d/b; ls /d'
  du -k "$d/sparse" | cut -f1; stat -c %s "$d/sparse"; cat "$d/b"
}
case_sqlite_volume() {
  local v="sqlite-$1"; docker_ volume rm -f "$v" > /dev/null 2>&1
  run_ "$1" --rm -v "$v:/db" "$SQLITE_IMG" sqlite3 /db/t.db \
    'PRAGMA journal_mode=WAL; CREATE TABLE t(x); INSERT INTO t VALUES (41), (1);'
  run_ "$1" --rm -v "$v:/db" "$SQLITE_IMG" sqlite3 /db/t.db 'SELECT sum(x) FROM t; PRAGMA integrity_check;'
  docker_ volume rm "$v" > /dev/null
}

compare "-v DIR: live both ways" case_volume_rw
compare "-v DIR:ro" case_volume_ro
compare "--mount type=bind,readonly" case_mount_bind_readonly
compare "named volume, two containers" case_named_volume
compare "nested binds, bind over the image" case_nested_binds
compare "-v FILE" case_file_bind
compare "sparse file > 4 GiB, rename" case_volume_files
compare "sqlite (WAL, mmap) on a volume" case_sqlite_volume

# The container's own filesystem: its writes are docker's layer, as with runc.
CHANGES='mkdir -p /app/data; echo state > /app/data/state.json; echo more >> /etc/motd; mv /etc/group /etc/group.moved; rm /bin/true; rm -r /home'
case_rootfs_diff_cp_out() {
  local c="diff-$1"
  run_ "$1" --name "$c" "$IMG" sh -c "$CHANGES"
  docker_ diff "$c" | sort
  docker_ cp "$c:/app/data/state.json" - | tar -xO
  docker_ cp "$c:/etc/motd" - | tar -xO | tail -1
  docker_ rm "$c" > /dev/null
}
case_rootfs_cp_in_created() {
  local c="cpin-$1"; echo "copied in before the start" > "$WORK/in-$1"
  docker_ create --runtime="$1" --name "$c" "$IMG" sh -c 'cat /root/in; ls /root' > /dev/null
  docker_ cp "$WORK/in-$1" "$c:/root/in"
  docker_ start -a "$c"
  docker_ rm "$c" > /dev/null
}
# While it runs, both ways through the same paths: into and out of its working directory
# (an image directory), which docker looks up before the start.
case_rootfs_cp_running() {
  local c="cplive-$1"; echo "copied in while running" > "$WORK/live-$1"
  run_ "$1" -d --name "$c" -w /root "$IMG" sh -c \
    'echo out > written; until test -e in; do sleep 0.05; done; cat in; echo seen > seen; sleep 1000' > /dev/null
  until docker_ cp "$c:/root/written" - > /dev/null 2>&1; do sleep 0.1; done
  docker_ cp "$c:/root/written" - | tar -xO
  docker_ cp "$WORK/live-$1" "$c:/root/in"
  until docker_ cp "$c:/root/seen" - > /dev/null 2>&1; do sleep 0.1; done
  docker_ logs "$c"
  docker_ rm -f "$c" > /dev/null
}
case_rootfs_commit_export() {
  local c="commit-$1"
  run_ "$1" --name "$c" "$IMG" sh -c "$CHANGES"
  docker_ commit "$c" "smtest/committed-$1" > /dev/null
  run_ "$1" --rm "smtest/committed-$1" sh -c 'cat /app/data/state.json; ls /etc; test -e /home || echo no-home'
  docker_ export "$c" | tar -t | grep -E '^(app/|etc/group|bin/true$|home/?$)' | sort
  docker_ rm "$c" > /dev/null
  docker_ rmi "smtest/committed-$1" > /dev/null
}
case_rootfs_stop_start_restart() {
  local c="restart-$1"
  run_ "$1" -d --name "$c" "$IMG" sh -c 'echo run >> /runs; wc -l < /runs; exec sleep 1000' > /dev/null
  wait_log "$c" 1
  docker_ stop -t 1 "$c" > /dev/null
  docker_ start "$c" > /dev/null
  wait_log "$c" 2
  docker_ restart -t 1 "$c" > /dev/null
  wait_log "$c" 3
  docker_ logs "$c"
  docker_ rm -f "$c" > /dev/null
}
case_rootfs_read_only() {
  local c="ro-$1"
  run_ "$1" --name "$c" --read-only "$IMG" sh -c 'touch /x 2>/dev/null || echo refused; cat /etc/motd | head -1'
  docker_ diff "$c" | sort
  docker_ rm "$c" > /dev/null
}

compare "rootfs: docker diff, cp out" case_rootfs_diff_cp_out
compare "rootfs: cp into a created container" case_rootfs_cp_in_created
compare "rootfs: cp in and out while running" case_rootfs_cp_running
compare "rootfs: commit, export" case_rootfs_commit_export
compare "rootfs: stop/start, restart keep it" case_rootfs_stop_start_restart
compare "rootfs: --read-only, nothing written" case_rootfs_read_only

# Properties without a runc counterpart to compare against.
top_and_stats() {
  local id; id=$(run_ supermachine -d "$IMG" sleep 1000)
  local top; top=$(docker_ top "$id")
  # top lists the monitor (the runtime's pid for the container) and every process under it
  # (an external VMM, whatever its name), nothing else.
  local monitor listed tree
  monitor=$(monitor_pid "$(sm_root)" "$id") || { echo "no monitor in state"; docker_ rm -f "$id" > /dev/null; return 1; }
  listed=$(echo "$top" | awk 'NR > 1 { print $2 }' | sort -n | tr '\n' ' ')
  tree=$(descendants "$monitor" | sort -n | tr '\n' ' ')
  if [ "$listed" != "$tree" ]; then
    echo "top lists $listed, the monitor's tree is $tree"; echo "$top"
    docker_ rm -f "$id" > /dev/null
    return 1
  fi
  local mem; mem=$(docker_ stats --no-stream --format '{{.MemUsage}}' "$id")
  case "$mem" in 0B*) echo "stats: $mem"; return 1 ;; esac
  docker_ rm -f "$id" > /dev/null
  echo "top: the monitor's tree ($tree); stats: $mem"
}
check "docker top, stats (the VM's host cost)" top_and_stats

host_cgroup_holds_the_vm() {
  # The container's limit is its cgroup's in the guest; the host's holds the whole VM (the
  # limit, the guest kernel's headroom and the VMM), never less than the limit.
  local id; id=$(run_ supermachine -d -m 384m "$IMG" sleep 1000)
  local pid host; pid=$(docker_ inspect -f '{{.State.Pid}}' "$id")
  host=$(cat "$(memory_cgroup_of "$pid")/$MEMORY_LIMIT_FILE")
  docker_ rm -f "$id" > /dev/null
  [ "$host" -gt $((384 << 20)) ] || { echo "host limit $host"; return 1; }
  echo "host limit $((host >> 20)) MiB for a 384 MiB container"
}
check "docker run -m: the host cgroup holds the VM" host_cgroup_holds_the_vm

update_beyond_vm() {
  local id; id=$(run_ supermachine -d "$IMG" sleep 1000)
  local out rc=0 inside
  out=$(docker_ update --memory 1g --memory-swap 2g "$id" 2>&1) || rc=$?
  inside=$(docker_ exec "$id" cat /sys/fs/cgroup/memory.max)
  docker_ rm -f "$id" > /dev/null
  [ "$rc" != 0 ] && echo "$out" | grep -q "cannot raise the memory limit" || { echo "rc=$rc $out"; return 1; }
  [ "$inside" = max ] || { echo "memory.max changed to $inside"; return 1; }
  echo "refused, unchanged: the VM's memory is fixed"
}
check "update beyond the VM's memory: refused" update_beyond_vm

# docker run --cpus 1, then update --cpus 2: the VM booted with the host's CPUs (up to
# max_vcpus), one online; the update brings the second online, and the container counts it.
update_cpus() {
  local id; id=$(run_ supermachine -d --cpus 1 "$IMG" sleep 1000)
  local before after cpu_max rc=0 out
  before=$(docker_ exec "$id" nproc)
  out=$(docker_ update --cpus 2 "$id" 2>&1) || rc=$?
  after=$(docker_ exec "$id" nproc)
  cpu_max=$(docker_ exec "$id" cat /sys/fs/cgroup/cpu.max)
  docker_ rm -f "$id" > /dev/null
  [ "$rc" = 0 ] || { echo "update rc=$rc $out"; return 1; }
  [ "$before/$after/$cpu_max" = "1/2/200000 100000" ] || { echo "nproc $before then $after, cpu.max $cpu_max"; return 1; }
  echo "nproc 1 then 2, cpu.max $cpu_max"
}
if [ "$(nproc)" -ge 2 ]; then
  check "update --cpus 1 -> 2: nproc inside" update_cpus
else
  cannot_run "update --cpus 1 -> 2: nproc inside" "a host of one CPU has no second vCPU to bring online" never
fi

vm_died() {
  local id; id=$(run_ supermachine -d "$IMG" sleep 1000)
  local vm; vm=$(vm_pids "$(sm_root)" "$id") || { echo "no monitor in state"; docker_ rm -f "$id" > /dev/null; return 1; }
  # shellcheck disable=SC2086
  kill -KILL $vm || { docker_ rm -f "$id" > /dev/null; return 1; }
  docker_ wait "$id" > /dev/null
  local state; state=$(docker_ inspect -f '{{.State.Status}} {{.State.ExitCode}}' "$id")
  docker_ rm "$id" > /dev/null
  case "$state" in "exited 0") echo "$state"; return 1 ;; exited*) echo "VM killed: $state" ;; *) echo "$state"; return 1 ;; esac
}
check "a dying VM: exited, non-zero" vm_died

bad_image_cmd() {
  local out rc=0
  out=$(run_ supermachine --rm "$IMG" no-such-command 2>&1) || rc=$?
  [ "$rc" = 127 ] && echo "$out" | grep -q "executable file not found" || { echo "rc=$rc $out"; return 1; }
  echo "rc=127, executable file not found"
}
check "missing command: 127, named" bad_image_cmd

disk_reused() {
  local before after
  before=$(ls "$SUPERMACHINE_CACHE_DIR/images" | grep -c '\.ext4$')
  run_ supermachine --rm "$IMG" true && run_ supermachine --rm "$IMG" true
  after=$(ls "$SUPERMACHINE_CACHE_DIR/images" | grep -c '\.ext4$')
  [ "$before" = "$after" ] || { echo "disk images: $before before, $after after"; return 1; }
  echo "$after disk image(s) before and after"
}
check "same image: disk image reused" disk_reused

no_state_left() {
  local left; left=$(ls -A "$(sm_root)" 2>/dev/null || true)
  [ -z "$left" ] || { echo "left: $left"; return 1; }
  echo none
}
check "no state left in --root" no_state_left

# The builtin engine: one run that boots and bakes a snapshot (minutes where KVM emulates
# guest kernel code), one that restores from it.
builtin_run() { # WORD
  local out start; start=$(date +%s)
  out=$(run_ supermachine-builtin --rm "$IMG" sh -c "echo $1; uname -r" 2>&1) || { echo "$out"; return 1; }
  [ "$(echo "$out" | head -1)" = "$1" ] || { echo "$out"; return 1; }
  echo "$1 in $(($(date +%s) - start)) s, guest $(echo "$out" | tail -1), $(builtin_cache_entries) snapshot(s)"
}
if [ "${#BUILTIN_ARGS[@]}" != 0 ]; then
  check "builtin: docker run boots, bakes" builtin_bakes
  check "builtin: docker run restores" builtin_restores
fi
assert_no_leftovers
print_table
[ "$FAILED" = 0 ]
