"""Process RSS across connection storms (issue 8, section 5). A script, not a test.

An evpl Loop (in a thread) runs an echo listener; the main thread opens
``--conns`` loopback connections per round, ``--batch`` at a time, each
sending one message and reading its echo, then closes them. After each round
(and an idle pause) it prints VmRSS from /proc/self/status and the pool's
counters. Bounded: loopback only, a fixed number of rounds and connections,
and a deadline.

    python tests/core/storm_rss.py --backend io_uring_tcp --rounds 5 --conns 10000
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import time

import evpl


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class Echo(evpl.Handler):
    def on_data(self, bind: evpl.Bind, buf: evpl.Buffer) -> None:
        bind.send(buf)


class OnLoop:
    """Runs a function on the loop's thread (a doorbell made before the loop
    starts: only ``ring`` may be called from another thread)."""

    def __init__(self, loop: evpl.Loop) -> None:
        self.fn = None
        self.out: object = None
        self.done = threading.Event()
        self.bell = loop.doorbell(self._run)

    def _run(self) -> None:
        if self.fn is not None:
            self.out = self.fn()
            self.fn = None
            self.done.set()

    def __call__(self, fn) -> object:
        self.done.clear()
        self.fn = fn
        self.bell.ring()
        if not self.done.wait(10):
            raise RuntimeError("loop did not answer")
        return self.out


def storm(addr, round_no: int, conns: int, batch: int, payload: bytes, deadline: float) -> None:
    # each round connects from its own 127.0.0.x so ports in TIME_WAIT never run out
    src = (f"127.0.{1 + round_no // 250}.{2 + round_no % 250}", 0)
    left = conns
    while left > 0:
        if time.monotonic() > deadline:
            raise SystemExit("deadline passed")
        socks = []
        for _ in range(min(batch, left)):
            s = socket.create_connection(addr, timeout=10, source_address=src)
            socks.append(s)
        for s in socks:
            s.sendall(payload)
        for s in socks:
            got = b""
            while len(got) < len(payload):
                part = s.recv(len(payload) - len(got))
                if not part:
                    raise RuntimeError("server closed early")
                got += part
            if got != payload:
                raise RuntimeError("echo differs from what was sent")
        for s in socks:
            s.close()
        left -= len(socks)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="io_uring_tcp")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--conns", type=int, default=10000, help="connections per round")
    ap.add_argument("--batch", type=int, default=500, help="connections open at once")
    ap.add_argument("--size", type=int, default=64, help="bytes each connection echoes")
    ap.add_argument("--idle", type=float, default=1.0, help="seconds idle after each round")
    ap.add_argument("--trim", action="store_true",
                    help="call pool.trim() from a 0.5 s timer on the loop (where supported)")
    ap.add_argument("--max-seconds", type=float, default=300.0)
    args = ap.parse_args()

    deadline = time.monotonic() + args.max_seconds
    pool = evpl.Pool()
    ready = threading.Event()
    made: dict[str, object] = {}

    def serve() -> None:
        # the loop is made on the thread that runs it (an io_uring ring with
        # SINGLE_ISSUER belongs to the thread that set it up)
        loop = evpl.Loop(pool=pool)
        listener = loop.listen(args.backend, ("127.0.0.1", 0), Echo, backlog=4096)
        if args.trim:
            loop.call_every(0.5, pool.trim)
        made.update(loop=loop, addr=listener.address, on_loop=OnLoop(loop))
        ready.set()
        loop.run()
        loop.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    if not ready.wait(10):
        raise SystemExit("loop did not start")
    loop, addr, on_loop = made["loop"], made["addr"], made["on_loop"]
    payload = os.urandom(args.size)

    def report(label: str) -> None:
        st = on_loop(pool.stats)
        keys = ("resident_bytes", "idle_resident_bytes", "trimmed_bytes")
        extra = "".join(f" {k}={st[k] >> 20}M" for k in keys if k in st)
        print(f"{label:>10}: rss {rss_mb():6.1f} MB  slabs={st['slabs']} "
              f"in_use={st['buffers_in_use']}{extra}", flush=True)

    time.sleep(0.2)
    report("start")
    for r in range(args.rounds):
        t0 = time.monotonic()
        storm(addr, r, args.conns, args.batch, payload, deadline)
        dt = time.monotonic() - t0
        time.sleep(args.idle)
        report(f"round {r + 1}")
        print(f"{'':>10}  ({args.conns} connections in {dt:.1f} s)", flush=True)
    loop.stop()
    t.join(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
