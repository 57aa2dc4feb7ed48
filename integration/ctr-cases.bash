# The ctr cases shared by containerd.sh (runc vs runc-shim+supermachine) and shim.sh
# (runc-shim+supermachine vs the native shim). Each takes the runtime as $1.
# shellcheck shell=bash

# rt RUNTIME: the ctr flags that pick it.
rt() {
  case "$1" in
    runc) printf '%s' "--runc-binary $RUNC --runc-root $WORK/runc-root" ;;
    supermachine) printf '%s' "--runc-binary $SM_BIN --runc-root $WORK/sm-root" ;;
    shim) printf '%s' "--runtime io.containerd.supermachine.v2" ;;
  esac
}
# Cases run in subshells: a counter file gives each container its own id.
next_id() {
  local n; n=$(($(cat "$WORK/ids" 2>/dev/null || echo 0) + 1))
  echo "$n" > "$WORK/ids"
  printf 'c%s-%s' "$n" "$1"
}

wait_status() { # ID STATUS
  for _ in $(seq 300); do
    ctr_ tasks ls 2>/dev/null | awk -v id="$1" '$1 == id { print $3 }' | grep -qx "$2" && return 0
    sleep 0.1
  done
  return 1
}

case_output() {
  # shellcheck disable=SC2046
  ctr_ run --rm $(rt "$1") "$IMAGE" "$(next_id "$1")" sh -c 'echo hello; cat /etc/os-release 2>/dev/null | head -1; echo $HOME'
}
case_exit_code() {
  # shellcheck disable=SC2046
  ctr_ run --rm $(rt "$1") "$IMAGE" "$(next_id "$1")" sh -c 'exit 3'
}
case_stdin() {
  # ctr does not pass on stdin's EOF (with runc either): read lines, not to the end.
  # shellcheck disable=SC2046
  printf 'line one\nline two\n' | ctr_ run --rm $(rt "$1") "$IMAGE" "$(next_id "$1")" sh -c 'read a; read b; echo "$b / $a"'
}
case_tty() {
  local id; id=$(next_id "$1")
  # ctr -t needs a terminal on its own stdin: script(1) provides one.
  script -qec "ctr --address $CTRD_SOCK --namespace smtest run --rm -t $(rt "$1") $IMAGE $id sh -c 'tty >/dev/null && echo is-a-tty; echo \$TERM'" /dev/null < /dev/null
}
case_env_cwd() {
  # shellcheck disable=SC2046
  ctr_ run --rm --env FOO=bar --cwd /tmp $(rt "$1") "$IMAGE" "$(next_id "$1")" sh -c 'id; echo $FOO; pwd'
}
case_kill() {
  local id; id=$(next_id "$1")
  # shellcheck disable=SC2046
  ctr_ run $(rt "$1") "$IMAGE" "$id" sh -c 'trap "echo got-term; exit 7" TERM; echo ready; while true; do sleep 1; done' &
  local pid=$!
  wait_status "$id" RUNNING
  sleep 0.5
  ctr_ tasks kill -s SIGTERM "$id"
  local rc=0; wait "$pid" || rc=$?
  ctr_ containers rm "$id" > /dev/null
  return "$rc"
}
case_kill_all() {
  local id; id=$(next_id "$1")
  # shellcheck disable=SC2046
  ctr_ run $(rt "$1") "$IMAGE" "$id" sh -c 'sleep 1000 & sleep 1000' &
  local pid=$!
  wait_status "$id" RUNNING
  ctr_ tasks kill --all -s SIGKILL "$id"
  local rc=0; wait "$pid" || rc=$?
  ctr_ containers rm "$id" > /dev/null
  return "$rc"
}
case_exec_ps_pause() {
  local id; id=$(next_id "$1")
  # shellcheck disable=SC2046
  ctr_ run -d $(rt "$1") "$IMAGE" "$id" sh -c "echo from-init > /tmp/f; $COUNTER_LOOP" > /dev/null
  wait_status "$id" RUNNING
  sleep 0.5
  # stdout and stderr reach ctr through separate FIFOs: their relative order is
  # not defined (for runc either), so stderr is printed after stdout.
  ctr_ tasks exec --exec-id e1 "$id" sh -c 'cat /tmp/f; echo exec-err >&2; exit 4' 2> "$WORK/exec-err-$1"
  echo "exec rc=$?"
  cat "$WORK/exec-err-$1"
  ctr_ tasks exec --exec-id e2 "$id" sh -c 'cat /proc/1/cmdline | tr "\0" " " | cut -c1-20; echo'
  PAUSED_ID=$id
  read_() { ctr_ tasks exec --exec-id "n$RANDOM" "$PAUSED_ID" cat /tmp/n; }
  pause_() { ctr_ tasks pause "$PAUSED_ID" && ctr_ tasks ls | awk -v id="$PAUSED_ID" '$1 == id { print $3 }'; }
  resume_() { ctr_ tasks resume "$PAUSED_ID" && ctr_ tasks ls | awk -v id="$PAUSED_ID" '$1 == id { print $3 }'; }
  local rc=0
  counter_stops_while_paused read_ pause_ resume_ || rc=1
  ctr_ tasks kill -s SIGKILL "$id"
  wait_status "$id" STOPPED
  ctr_ tasks delete "$id" > /dev/null
  ctr_ containers rm "$id"
  return "$rc"
}
case_concurrent_execs() {
  local id; id=$(next_id "$1")
  # shellcheck disable=SC2046
  ctr_ run -d $(rt "$1") "$IMAGE" "$id" sleep 1000 > /dev/null
  wait_status "$id" RUNNING
  for i in 1 2 3; do
    ctr_ tasks exec --exec-id "x$i" "$id" sh -c "sleep 0.$i; echo exec-$i" > "$WORK/exec-$1-$i.out" &
  done
  wait
  cat "$WORK/exec-$1-1.out" "$WORK/exec-$1-2.out" "$WORK/exec-$1-3.out"
  ctr_ tasks kill -s SIGKILL "$id"
  wait_status "$id" STOPPED
  ctr_ tasks delete "$id" > /dev/null
  ctr_ containers rm "$id"
}
case_bind_mount() {
  # A host directory bound read-write and a host file read-only: read, written, refused.
  local d="$WORK/bind-$1"; rm -rf "$d"; mkdir -p "$d/dir"; echo from-host > "$d/dir/in"; echo conf > "$d/file"
  # shellcheck disable=SC2046
  ctr_ run --rm $(rt "$1") \
    --mount "type=bind,src=$d/dir,dst=/data,options=rbind:rw" \
    --mount "type=bind,src=$d/file,dst=/etc/app.conf,options=rbind:ro" \
    "$IMAGE" "$(next_id "$1")" sh -c 'cat /data/in /etc/app.conf; echo out > /data/out; (echo x > /etc/app.conf) 2>/dev/null || echo ro'
  cat "$d/dir/out" "$d/file"
}
case_rootfs_kept() {
  # The container's writes are its snapshot's: a second task of the same container sees them,
  # and containerd's diff of the snapshot holds them (a removal as a whiteout).
  local id; id=$(next_id "$1")
  local script='cat /kept 2>/dev/null || echo none; echo kept > /kept; rm /etc/motd 2>/dev/null && echo removed'
  # shellcheck disable=SC2046
  ctr_ run $(rt "$1") "$IMAGE" "$id" sh -c "$script"
  ctr_ tasks delete "$id" > /dev/null 2>&1 || true
  ctr_ tasks start "$id"
  ctr_ tasks delete "$id" > /dev/null 2>&1 || true
  ctr_ snapshots diff --media-type application/vnd.oci.image.layer.v1.tar "$id" | tar -t | grep -E 'kept|motd' | sort
  ctr_ containers rm "$id"
}
