#!/bin/bash
# Network through docker's bridge and a published port, runc vs supermachine in one run:
# throughput of a SIZE MiB transfer host -> container, and the round trip of a 1-byte request
# (docker-proxy, the bridge and, for supermachine, tc redirect + tap + virtio-net).
#   scripts/bench-network.sh /path/to/supermachine [SIZE_MIB]
SIZE=${2:-256}
. "$(dirname "$0")/../integration/lib.bash" "$1"

start_containerd
start_dockerd_bridged 10.213.9.1/24
busybox_image
docker_ load -i "$WORK/busybox.tar" > /dev/null

# An echo server on 5001 (readiness and round trips) and a sink on 5000 that reads until EOF.
SERVER='printf "#!/bin/sh\nexec cat > /dev/null\n" > /sink && chmod +x /sink &&
  (nc -ll -p 5001 -e /bin/cat &) && exec nc -ll -p 5000 -e /sink'
measure() { # RUNTIME PORT_BASE
  docker_ run -d --rm --runtime="$1" --name "bench-$1" -p "127.0.0.1:$2:5000" \
    -p "127.0.0.1:$(($2 + 1)):5001" smtest/busybox sh -c "$SERVER" > /dev/null
  "$REPO/scripts/netbench-client.py" 127.0.0.1 "$(($2 + 1))" "$2" "$SIZE"
  docker_ rm -f "bench-$1" > /dev/null
}
field() { python3 -c 'import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$1" "$2"; }

runc=$(measure runc 18090)
sm=$(measure supermachine 18092)
printf '\nnetwork through a published port (docker bridge), %s MiB host -> container\n' "$SIZE"
printf '%-14s%14s%10s%16s\n' runtime 'MiB/s' ratio 'rtt median µs'
printf '%-14s%14s%9sx%16s\n' runc "$(field "$runc" mib_per_s)" 1.0 "$(field "$runc" rtt_us)"
printf '%-14s%14s%9sx%16s\n' supermachine "$(field "$sm" mib_per_s)" \
  "$(awk -v a="$(field "$sm" mib_per_s)" -v b="$(field "$runc" mib_per_s)" 'BEGIN { printf "%.2f", a / b }')" \
  "$(field "$sm" rtt_us)"
printf 'added round-trip latency: %s µs\n' \
  "$(awk -v a="$(field "$sm" rtt_us)" -v b="$(field "$runc" rtt_us)" 'BEGIN { printf "%.1f", a - b }')"
