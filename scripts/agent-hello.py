#!/usr/bin/env python3
"""Says hello to a guest agent on a Unix socket (a VMM's end of the agent channel): reads
its Ready frame, sends Hello, and reads the answer. Exits 0 once the agent answered with its
kernel release, a round trip through the VM's virtio-serial device (the answer needs the
guest's interrupts to work).

    agent-hello.py SOCKET PROTOCOL_VERSION TIMEOUT_SECONDS
"""
import json
import socket
import struct
import sys
import time

KIND_MESSAGE = 1


def main():
    path, version, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    deadline = time.time() + timeout
    while True:
        try:
            channel = socket.socket(socket.AF_UNIX)
            channel.connect(path)
            break
        except OSError:
            if time.time() > deadline:
                sys.exit(f"agent-hello: no socket at {path}")
            time.sleep(0.2)
    channel.settimeout(max(1.0, deadline - time.time()))

    def read_exact(n):
        data = b""
        while len(data) < n:
            try:
                chunk = channel.recv(n - len(data))
            except TimeoutError:
                sys.exit(f"agent-hello: no answer from the agent within {timeout:.0f} s")
            if not chunk:
                sys.exit("agent-hello: the channel closed")
            data += chunk
        return data

    def message():
        length = struct.unpack("<I", read_exact(4))[0]
        body = read_exact(length)
        if body[0] != KIND_MESSAGE:
            sys.exit(f"agent-hello: frame of kind {body[0]}")
        return json.loads(body[1:])

    ready = message()
    if "ready" not in ready:
        sys.exit(f"agent-hello: first message {ready}")
    hello = json.dumps({"id": 1, "request": {"hello": {"version": version}}}).encode()
    channel.sendall(struct.pack("<I", len(hello) + 1) + bytes([KIND_MESSAGE]) + hello)
    answer = message()
    result = answer.get("response", {}).get("result", {})
    release = result.get("Ok", {}).get("hello", {}).get("kernel_release")
    if not release:
        sys.exit(f"agent-hello: the agent answered {answer}")
    print(f"agent-hello: the agent answered hello (kernel {release})")


main()
