"""Instruction counts of the cross-shard message path, for callgrind.

Two Shards over one RingSet in one process, each loop driven in turn (event
mode, no spinning), so that a run is deterministic and callgrind can count
the instructions of both sides: run it with N messages and with 0, and
divide the difference by N.

  valgrind --tool=callgrind python benchmarks/shard_cost.py one-way 100000
  valgrind --tool=callgrind python benchmarks/shard_cost.py one-way 0

Loads: one-way (send_to, and an on_message that counts), batch (send_to,
and an on_messages that counts), round-trip (submit_to from the previous
reply's callback, an echo on_request). Without valgrind it prints the rate
(one core doing both sides: not a cross-core number).
"""

from __future__ import annotations

import argparse
import os
import time

import evpl
from evpl._native import rings as _rings
from evpl._native.buffers import Pool
from evpl.core.loop import Loop
from evpl.shards.shard import Shard

PAYLOAD = bytes(64)


def pair(ring_bytes: int = 1 << 20) -> tuple[Shard, Shard]:
    """Shards 0 and 1 of a group of 2, both in this process."""
    fd = os.memfd_create("evpl-shard-cost")
    rs = _rings.RingSet(fd, 2, ring_bytes, True)
    efds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(2)]
    out = []
    for i in range(2):
        loop = Loop(poll_mode="event", pool=Pool())
        rs.set_state(i, _rings.RUNNING, os.getpid())
        out.append(Shard(i, 2, loop, None, rs, efds, {}, 1000))
    return out[0], out[1]


def one_way(n: int, batch: bool) -> None:
    a, b = pair()
    got = [0]

    def on_message(src: int, p: bytes) -> None:
        got[0] += 1

    def on_messages(src: int, ps: list[bytes]) -> None:
        got[0] += len(ps)

    if batch:
        b.on_messages = on_messages
    else:
        b.on_message = on_message
    send = a.send_to
    sent = 0
    while sent < n:
        try:
            send(1, PAYLOAD)
            sent += 1
        except evpl.Busy:
            b.loop.run_once(0)
    a.loop.run_once(0)                  # publishes the last batch
    while got[0] < n:
        b.loop.run_once(0)


def round_trip(n: int) -> None:
    a, b = pair()
    b.on_request = lambda src, p: p
    count = [0]

    def again(_f: object = None) -> None:
        count[0] += 1
        if count[0] <= n:
            a.submit_to(1, PAYLOAD).add_done_callback(again)

    again()
    while count[0] <= n:
        b.loop.run_once(0)
        a.loop.run_once(0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 2)[2])
    p.add_argument("load", choices=["one-way", "batch", "round-trip"])
    p.add_argument("n", type=int, help="messages or round trips (0: the baseline)")
    opts = p.parse_args()
    t = time.perf_counter()
    if opts.load == "round-trip":
        round_trip(opts.n)
    else:
        one_way(opts.n, opts.load == "batch")
    dt = time.perf_counter() - t
    if opts.n:
        print(f"{opts.load}: {opts.n / dt:,.0f}/s on one core")


if __name__ == "__main__":
    main()
