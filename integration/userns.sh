#!/bin/bash
# docker's user namespace remapping (`dockerd --userns-remap=default`): dockerd makes its
# `dockremap` user and subordinate id ranges, owns the image's files by the remapped ids
# and gives the runtime a user namespace with those mappings. Each case compared with runc
# in the same run.
#   integration/userns.sh /path/to/supermachine
. "$(dirname "$0")/lib.bash"

start_containerd
# The remapped root must be able to reach its part of dockerd's data root.
chmod o+x "$WORK"
start_dockerd --userns-remap=default
busybox_image
docker_ load -i "$WORK/busybox.tar" > /dev/null
IMG=smtest/busybox

run_() { local runtime=$1; shift; docker_ run --runtime="$runtime" "$@"; }

# The maps docker asked for, root inside, and the image's files owned by root inside.
case_maps() {
  run_ "$1" --rm "$IMG" sh -c 'cat /proc/self/uid_map /proc/self/gid_map | tr -s " "; id; stat -c "%u:%g %n" / /bin/busybox'
}
# Root inside is no root outside: unmapped ids show as the overflow id, and a device node,
# which docker's capabilities let a container's root make, is refused in the namespace.
# (Only stdout: its order against stderr is not defined.)
case_unmapped() {
  run_ "$1" --rm "$IMG" sh -c 'cat /proc/sys/kernel/overflowuid; mknod /tmp/null c 1 3 2> /dev/null; echo mknod=$?'
}
# A process of an unprivileged user in the namespace.
case_user() { run_ "$1" --rm -u 1000:1000 "$IMG" sh -c 'id; cat /proc/self/uid_map | tr -s " "'; }
# docker exec joins the container's namespace.
case_exec() {
  local id; id=$(run_ "$1" -d "$IMG" sleep 1000)
  docker_ exec "$id" sh -c 'cat /proc/self/uid_map | tr -s " "; id -u'
  docker_ rm -f "$id" > /dev/null
}
# The container's writes are owned by its root, i.e. the remapped id, as `docker cp` and
# `docker diff` see them.
case_writes() {
  local id; id=$(run_ "$1" -d "$IMG" sh -c 'echo data > /made; exec sleep 1000')
  for _ in $(seq 100); do docker_ exec "$id" test -e /made 2> /dev/null && break; sleep 0.1; done
  docker_ cp "$id:/made" "$WORK/made-$1" && cat "$WORK/made-$1"
  docker_ diff "$id" | grep made
  docker_ rm -f "$id" > /dev/null
}

compare "userns: maps, ids, image owner" case_maps
compare "userns: unmapped stays out of reach" case_unmapped
compare "userns: -u 1000" case_user
compare "userns: exec joins" case_exec
compare "userns: writes, docker cp/diff" case_writes
assert_no_leftovers
print_table
[ "$FAILED" = 0 ]
