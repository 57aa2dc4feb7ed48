#!/usr/bin/env python3
"""Host side of the network benchmark: waits for a container's echo port, measures the
round trip of 1-byte requests on one connection, then the throughput of sending SIZE bytes to
its sink port (until the sink closes). Prints one JSON line.

    scripts/netbench-client.py HOST ECHO_PORT SINK_PORT [SIZE_MIB]
"""
import json
import socket
import statistics
import sys
import time

host, echo_port, sink_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
size = int(sys.argv[4] if len(sys.argv) > 4 else 256) << 20


def echo_connection(deadline):
    while True:
        try:
            s = socket.create_connection((host, echo_port), timeout=2)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.sendall(b"x")
            if s.recv(1) == b"x":
                return s
            s.close()
        except OSError:
            pass
        if time.monotonic() > deadline:
            sys.exit(f"no echo from {host}:{echo_port}")
        time.sleep(0.2)


s = echo_connection(time.monotonic() + 60)
rtts = []
for _ in range(300):
    start = time.perf_counter()
    s.sendall(b"y")
    if s.recv(1) != b"y":
        sys.exit("echo lost")
    rtts.append(time.perf_counter() - start)
s.close()

chunk = b"\0" * (1 << 20)
sink = socket.create_connection((host, sink_port), timeout=120)
start = time.perf_counter()
sent = 0
while sent < size:
    sink.sendall(chunk)
    sent += len(chunk)
sink.shutdown(socket.SHUT_WR)
while sink.recv(65536):
    pass
elapsed = time.perf_counter() - start
sink.close()
print(json.dumps({
    "rtt_us": round(statistics.median(rtts) * 1e6, 1),
    "mib_per_s": round(size / (1 << 20) / elapsed, 1),
    "seconds": round(elapsed, 3),
}))
