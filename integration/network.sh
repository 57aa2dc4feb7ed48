#!/bin/bash
# Container networking through docker's bridge, with its own dockerd (iptables, NAT and port
# publishing on, its own subnets): a published port, name resolution between containers on a
# user network (docker's embedded DNS, relayed into the VM), supermachine <-> runc traffic,
# and --network none.
#   integration/network.sh /path/to/supermachine
. "$(dirname "$0")/lib.bash"

BIP=10.213.7.1/24
USER_SUBNET=10.213.8.0/24
PORT=18080

start_containerd
start_dockerd_bridged "$BIP" "$USER_SUBNET"
cleanup_network() {
  local rc=$?
  # Under set -e, and also run from the EXIT trap before lib.bash's cleanup: nothing here
  # may fail the script (the network is gone after the first call).
  { docker_ ps -aq | xargs -r "$DOCKER_CLI" -H "unix://$DOCKER_SOCK" rm -f; } > /dev/null 2>&1 || true
  docker_ network rm smnet > /dev/null 2>&1 || true
  return "$rc"
}
# Containers and the user network go while dockerd still runs (it removes their rules).
trap 'cleanup_network; cleanup' EXIT INT TERM
busybox_image
docker_ load -i "$WORK/busybox.tar" > /dev/null
IMG=smtest/busybox
docker_ network create --subnet "$USER_SUBNET" smnet > /dev/null

run_() { local runtime=$1; shift; docker_ run --runtime="$runtime" "$@"; }
serve() { # RUNTIME NAME [docker args...]: an httpd serving "hello from NAME"
  local runtime=$1 name=$2; shift 2
  run_ "$runtime" -d --name "$name" "$@" "$IMG" \
    sh -c "mkdir -p /www && echo hello from $name > /www/index.html && exec httpd -f -p 80 -h /www"
}
wait_http() { # URL: its page, retried for 30 s; each try gives up after 5 s of silence.
  local deadline=$((SECONDS + 30))
  while [ "$SECONDS" -lt "$deadline" ]; do
    wget -q -T 5 --tries=1 -O - "$1" 2> /dev/null && return 0
    sleep 0.2
  done
  echo "no page from $1 within 30 s"
  return 1
}

case_published_port() {
  serve "$1" "pub-$1" -p "127.0.0.1:$PORT:80" > /dev/null
  wait_http "http://127.0.0.1:$PORT/" | sed "s/pub-$1/pub-RUNTIME/"
  local rc=${PIPESTATUS[0]}
  docker_ rm -f "pub-$1" > /dev/null
  return "$rc"
}
case_interfaces() {
  run_ "$1" --rm "$IMG" sh -c 'ls /sys/class/net | sort | tr "\n" " "; echo; ip -4 -o addr show eth0 | wc -l; ip route | grep -c "^default"'
}
case_network_none() { run_ "$1" --rm --network none "$IMG" sh -c 'ls /sys/class/net | tr "\n" " "'; }
case_names_on_user_network() {
  serve "$1" "web-$1" --network smnet > /dev/null
  # The server answers by name; busybox's nc resolves through docker's embedded DNS.
  run_ "$1" --rm --network smnet "$IMG" sh -c \
    "for i in 1 2 3 4 5 6 7 8 9 10; do out=\$(printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 3 web-$1 80 2>/dev/null | tail -1); [ -n \"\$out\" ] && echo \"\$out\" && exit 0; sleep 1; done; exit 1" \
    | sed "s/web-$1/web-RUNTIME/"
  local rc=${PIPESTATUS[0]}
  docker_ rm -f "web-$1" > /dev/null
  return "$rc"
}

compare "docker run -p: host fetches a page" case_published_port
compare "interfaces, address, default route" case_interfaces
compare "docker run --network none: only lo" case_network_none
compare "user network: reach a container by name" case_names_on_user_network

mixed() { # FROM TO: a FROM-runtime client fetches from a TO-runtime server by name
  serve "$2" "mixed-$2" --network smnet > /dev/null
  local out
  out=$(run_ "$1" --rm --network smnet "$IMG" sh -c \
    "for i in 1 2 3 4 5 6 7 8 9 10; do out=\$(printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 3 mixed-$2 80 2>/dev/null | tail -1); [ -n \"\$out\" ] && echo \"\$out\" && exit 0; sleep 1; done; exit 1")
  local rc=$?
  docker_ rm -f "mixed-$2" > /dev/null
  [ "$rc" = 0 ] && [ "$out" = "hello from mixed-$2" ] || { echo "rc=$rc: $out"; return 1; }
  echo "$1 -> $2: $out"
}
check "supermachine -> runc" mixed supermachine runc
check "runc -> supermachine" mixed runc supermachine

no_taps_or_filters_left() {
  local left; left=$(ip -o link show | grep -c smtap || true)
  [ "$left" = 0 ] || { ip -o link show | grep smtap; return 1; }
  echo "no tap left"
}
cleanup_network
check "no tap left on the host" no_taps_or_filters_left
assert_no_leftovers
print_table
[ "$FAILED" = 0 ]
