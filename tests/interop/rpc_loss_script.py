"""At-most-once over lossy UDP: an evpl rpc2 server and client in one process.

Run by tests/interop/test_rpc2_udp_loss.py inside a network namespace whose
iptables drop a random share of UDP packets (calls and replies alike); it can
also be run by hand there to measure.  The procedure is not idempotent: it
counts how often each call number ran and returns that count.  Meanwhile a
second client sends NULL calls at ``--filler-rate`` (a busy server's other
traffic), which push older calls out of a duplicate request cache that is
bounded by count rather than by time.  Prints one JSON object: how many calls ran more
than once, how many timed out, the retransmissions, the server's DRC
counters and the elapsed time.
"""

from __future__ import annotations

import argparse
import json
import struct
import time
from collections import Counter
from typing import Any

import evpl
from evpl.rpc2 import Client, RpcTimeout, Server

PROG, VERS, APPLY = 0x20000126, 1, 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--calls", type=int, default=300, help="non-idempotent calls")
    ap.add_argument("--rate", type=float, default=0.0,
                    help="calls started per second (0: all at once)")
    ap.add_argument("--filler-rate", type=float, default=2000.0,
                    help="NULL calls per second from a 2nd client while the calls run")
    ap.add_argument("--filler-window", type=int, default=256,
                    help="most filler calls in flight at once")
    ap.add_argument("--client", default="{}", help="Client keyword arguments (JSON)")
    ap.add_argument("--server", default="{}", help="Server keyword arguments (JSON)")
    ap.add_argument("--limit", type=float, default=120.0, help="give up after this (s)")
    ap.add_argument("--gso", action="store_true",
                    help="send UDP GSO trains (on lo, iptables then drops a whole train "
                         "at once: off by default, so that loss hits datagrams one by one)")
    args = ap.parse_args()

    loop = evpl.Loop()
    runs: Counter[int] = Counter()

    def apply(ctx: Any, data: memoryview) -> bytes:
        (n,) = struct.unpack(">I", data)
        runs[n] += 1
        return struct.pack(">I", runs[n])

    server = Server(loop, **json.loads(args.server))
    server.register(PROG, VERS, {APPLY: apply})
    addr = server.bind_udp(("127.0.0.1", 0), gso=args.gso).local_address
    client = Client(loop, "udp", addr, gso=args.gso, **json.loads(args.client))
    filler = Client(loop, "udp", addr, timeout=0.2, retransmit=0.2, max_retransmit=0.2,
                    max_pending=args.filler_window, gso=args.gso)

    answers: dict[int, Any] = {}
    calls: list[Any] = []
    filler_sent = [0]
    tick = 0.01

    def send_filler() -> None:
        """Every ``tick``: the NULL calls due, within the window, until the calls end."""
        if len(answers) == args.calls or filler.closed:
            return
        for _ in range(round(args.filler_rate * tick)):
            if filler.pending >= args.filler_window:
                break
            filler.call(PROG, VERS, 0)
            filler_sent[0] += 1
        loop.call_later(tick, send_filler)

    def start(n: int) -> None:
        rpc = client.call(PROG, VERS, APPLY, struct.pack(">I", n),
                          lambda b: struct.unpack(">I", b)[0])
        rpc.add_done_callback(lambda c, n=n: answers.__setitem__(n, c))
        calls.append(rpc)

    t0 = time.monotonic()
    send_filler()
    if args.rate > 0:
        for n in range(args.calls):
            loop.call_later(n / args.rate, start, n)
    else:
        for n in range(args.calls):
            start(n)
    loop.run_until(lambda: len(answers) == args.calls, args.limit)
    elapsed = time.monotonic() - t0
    filler.close()
    timeouts = sum(1 for c in answers.values() if isinstance(c.exception(), RpcTimeout))
    errors = [repr(c.exception()) for c in answers.values()
              if c.exception() is not None and not isinstance(c.exception(), RpcTimeout)]
    print(json.dumps({
        "calls": args.calls,
        "answered": len(answers),
        "ran_more_than_once": sum(1 for v in runs.values() if v > 1),
        "never_ran": args.calls - len(runs),
        "answers_not_1": sum(1 for c in answers.values()
                             if c.exception() is None and c.result() != 1),
        "timeouts": timeouts,
        "errors": errors[:5],
        "retransmits": sum(c.retransmits for c in calls),
        "max_retransmits": max((c.retransmits for c in calls), default=0),
        "filler_sent": filler_sent[0],
        "drc": server.drc_stats(),
        "elapsed": round(elapsed, 2),
    }), flush=True)
    client.close()
    server.close()
    loop.close()


if __name__ == "__main__":
    main()
