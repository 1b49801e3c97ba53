"""The evpl rpc2 server of the rpc2 benchmark: BENCH_PROG (bench.x) on one Loop.

Written the way a user would: the server skeleton generated from bench.x by
``evpl.rpc2.load_x``, subclassed; BENCH_NULL and BENCH_GET4K return their
results and the generated codecs decode the argument and encode the reply.

Usage::

    python evpl_server.py --port P [--backend tcp|io_uring_tcp] [--poll]

Prints ``ready PORT`` once it listens and ``stats {...}`` (the server's and
the loop's counters, JSON) on stderr when SIGTERM/SIGINT stops it. Exit
status 3: evpl or the backend is not available.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import Any

try:
    import evpl
    from evpl.rpc2 import Server, load_x
except ImportError as exc:  # reported as "skipped"
    print(f"evpl is not importable: {exc}", file=sys.stderr)
    sys.exit(3)

bench = load_x(Path(__file__).resolve().parent / "bench.x", name="bench_x")

DATA = bytes((i * 31 + 7) & 0xFF for i in range(bench.BENCH_MAX_DATA))


class Bench(bench.BENCH_VERSServer):
    """BENCH_PROG version 1."""

    def __init__(self) -> None:
        self._slices: dict[int, bytes] = {}

    def BENCH_NULL(self) -> None:
        return None

    def BENCH_GET4K(self, n: int) -> bytes:
        data = self._slices.get(n)
        if data is None:
            data = self._slices[n] = DATA[:n]
        return data


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, serve until signalled."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="tcp")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--poll", action="store_true", help='poll_mode="always" (burns a core)')
    p.add_argument("--max-in-flight", type=int, default=128)
    args = p.parse_args(argv)
    try:
        loop = evpl.Loop(poll_mode="always" if args.poll else "event")
        server = Server(loop, max_in_flight=args.max_in_flight)
        server.register(bench.BENCH_PROG, bench.BENCH_VERS, Bench())
        listener = server.listen(args.backend, (args.host, args.port))
    except (evpl.BackendUnavailable, evpl.EvplError) as exc:
        print(f"backend {args.backend!r} unavailable: {exc}", file=sys.stderr)
        return 3

    def on_signal(signum: int, frame: Any) -> None:
        loop.stop()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    print(f"ready {listener.address[1]}", flush=True)
    try:
        loop.run()
    finally:
        stats: dict[str, Any] = {"server": dict(server.stats)}
        try:
            stats["loop"] = loop.stats()
        except Exception as exc:
            stats["loop"] = repr(exc)
        print("stats " + json.dumps(stats, default=str), file=sys.stderr, flush=True)
        server.close()
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
