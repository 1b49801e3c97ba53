"""A drpc server and clients in one process, for fault-injection tests.

Run by tests/drpc/test_drpc_faults.py: inside a network namespace whose
iptables drop a share of the UDP packets, or with the clients pointed at a
relay (``udp_relay.py``) that delays, reorders and duplicates them. Also
handy by hand to measure goodput under loss.

The handler is not idempotent: it counts how often each request ran and
answers with the count and the request reversed. Prints one JSON object:
calls answered, wrong or failed answers, requests that ran other than once,
the clients' and the server's counters, elapsed time and goodput.
"""

from __future__ import annotations

import argparse
import json
import random
import struct
import sys
import time
from collections import Counter
from typing import Any

import evpl
from evpl.drpc import Client, Server

APPLY = 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--backend", default="udp")
    ap.add_argument("--sessions", type=int, default=4)
    ap.add_argument("--calls", type=int, default=200, help="calls per session")
    ap.add_argument("--sizes", default="32,5000,20000",
                    help="request sizes to cycle through (bytes); responses are the same size")
    ap.add_argument("--relay", action="store_true",
                    help="print the server's port, then read from stdin the host:port the "
                         "clients send to (a relay in front of the server)")
    ap.add_argument("--peer-timeout", type=float, default=5.0)
    ap.add_argument("--cc", type=int, default=1)
    ap.add_argument("--limit", type=float, default=120.0, help="give up after this (s)")
    ap.add_argument("--max-datagram", type=int, default=1472)
    ap.add_argument("--window", type=int, default=8, help="calls in flight per session")
    args = ap.parse_args()

    loop = evpl.Loop()
    runs: Counter[int] = Counter()

    def apply(req: Any) -> bytes:
        (n,) = struct.unpack_from(">I", req.body)
        runs[n] += 1
        return struct.pack(">I", runs[n]) + bytes(req.body)[::-1]

    server = Server(loop, args.backend, ("127.0.0.1", 0), gso=False,
                    max_datagram=args.max_datagram)
    server.register(APPLY, apply)
    target = server.address
    if args.relay:
        print(target[1], flush=True)
        host, port = sys.stdin.readline().strip().rsplit(":", 1)
        target = (host, int(port))
    clients = [Client(loop, args.backend, target, peer_timeout=args.peer_timeout,
                      cc=bool(args.cc), gso=False, max_datagram=args.max_datagram,
                      window=args.window) for _ in range(args.sessions)]
    sizes = [int(s) for s in args.sizes.split(",")]
    rnd = random.Random(5)
    expected: dict[int, bytes] = {}
    answers: dict[int, tuple[Any, BaseException | None]] = {}
    n = 0
    for c in clients:
        for k in range(args.calls):
            size = max(4, sizes[k % len(sizes)])
            payload = struct.pack(">I", n) + rnd.randbytes(size - 4)
            expected[n] = payload
            c.call(APPLY, payload,
                   lambda r, e, n=n: answers.__setitem__(n, (bytes(r) if r is not None else None,
                                                             e)))
            n += 1
    t0 = time.monotonic()
    try:
        loop.run_until(lambda: len(answers) == len(expected), args.limit)
    except evpl.TimeoutError:
        pass
    elapsed = time.monotonic() - t0
    wrong = [k for k, (r, e) in answers.items()
             if e is None and r != struct.pack(">I", 1) + expected[k][::-1]]
    errors = [repr(e) for r, e in answers.values() if e is not None]
    stats = [c.stats() for c in clients]
    payload_bytes = sum(2 * len(p) for p in expected.values())
    print(json.dumps({
        "calls": len(expected),
        "answered": len(answers),
        "wrong": len(wrong),
        "errors": errors[:5],
        "never_ran": len(expected) - len(runs),
        "ran_more_than_once": sum(1 for v in runs.values() if v > 1),
        "retransmits": sum(s["retransmits"] for s in stats),
        "client_duplicates": sum(s["duplicates"] for s in stats),
        "client_out_of_order": sum(s["out_of_order"] for s in stats),
        "client_stale": sum(s["stale"] for s in stats),
        "max_inflight": max(s["max_inflight"] for s in stats),
        "placed": loop.stats()["placed"],
        "server": server.stats(),
        "elapsed": round(elapsed, 3),
        "goodput_mbit": round(payload_bytes * 8 / elapsed / 1e6, 2) if elapsed else 0,
    }), flush=True)
    for c in clients:
        c.close()
    server.close()
    loop.close()


if __name__ == "__main__":
    main()
