"""A UDP relay that delays, reorders and duplicates datagrams (both ways).

The fault injector of tests/drpc/test_drpc_faults.py where the kernel has
no netem: clients send to the relay's port, the relay forwards to the
target from one socket per client (so the server sees one peer per client)
and forwards the answers back, each datagram:

* duplicated with probability ``--duplicate`` (the copy travels on its own),
* held ``--delay`` ms plus a uniform random ``--jitter`` ms (jitter larger
  than the gap between datagrams reorders them),
* held ``--reorder-hold`` ms more with probability ``--reorder``, so later
  datagrams overtake it.

Prints ``PORT`` on its first line, runs until its stdin closes, then
prints one JSON line of counters (forwarded, duplicated, reordered).
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import select
import socket
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("target", help="host:port to forward to")
    ap.add_argument("--duplicate", type=float, default=0.0)
    ap.add_argument("--reorder", type=float, default=0.0)
    ap.add_argument("--reorder-hold", type=float, default=3.0)
    ap.add_argument("--delay", type=float, default=0.0)
    ap.add_argument("--jitter", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    host, port = args.target.rsplit(":", 1)
    target = (host, int(port))
    rnd = random.Random(args.seed)

    front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    front.bind(("127.0.0.1", 0))
    front.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    front.setblocking(False)
    upstream: dict[tuple[str, int], socket.socket] = {}     # client -> its socket
    owner: dict[int, tuple[str, int]] = {}                  # socket fd -> client
    held: list[tuple[float, int, socket.socket, bytes, tuple[str, int] | None]] = []
    seq = 0
    counts = {"forwarded": 0, "duplicated": 0, "reordered": 0}
    print(front.getsockname()[1], flush=True)

    def schedule(sock: socket.socket, data: bytes, addr: tuple[str, int] | None) -> None:
        nonlocal seq
        copies = 2 if rnd.random() < args.duplicate else 1
        counts["duplicated"] += copies - 1
        for _ in range(copies):
            hold = args.delay + rnd.random() * args.jitter
            if rnd.random() < args.reorder:
                hold += args.reorder_hold
                counts["reordered"] += 1
            seq += 1
            heapq.heappush(held, (time.monotonic() + hold / 1000, seq, sock, data, addr))

    stdin = sys.stdin.fileno()
    while True:
        now = time.monotonic()
        while held and held[0][0] <= now:
            _, _, sock, data, addr = heapq.heappop(held)
            try:
                if addr is None:
                    sock.send(data)
                else:
                    sock.sendto(data, addr)
                counts["forwarded"] += 1
            except OSError:
                pass
        timeout = max(0.0, held[0][0] - now) if held else None
        socks = [front, *upstream.values()]
        ready, _, _ = select.select([stdin, *socks], [], [], timeout)
        if stdin in ready:
            if not sys.stdin.readline():
                break
        for s in ready:
            if s is stdin:
                continue
            for _ in range(256):
                try:
                    data, addr = s.recvfrom(65536)
                except (BlockingIOError, ConnectionRefusedError):
                    break
                if s is front:
                    up = upstream.get(addr)
                    if up is None:
                        up = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                        up.connect(target)
                        up.setblocking(False)
                        upstream[addr] = up
                        owner[up.fileno()] = addr
                    schedule(up, data, None)
                else:
                    schedule(front, data, owner[s.fileno()])
    print(json.dumps(counts), flush=True)


if __name__ == "__main__":
    main()
