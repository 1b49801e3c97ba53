"""The evpl rpc2 client of the rpc2 benchmark: calls/s against a BENCH_PROG server.

Keeps ``--depth`` calls in flight on one connection (1: sequential, each
call sent when the previous reply arrived; more: pipelined), through the
client stub generated from bench.x, and checks every result.

Usage::

    python evpl_client.py --port P [--proc 0|1] [--depth N] [--size N]
        [--duration S] [--warmup S] [--backend tcp|io_uring_tcp]

Prints one JSON line like the C programs: calls/s over the measured
interval, latency percentiles, the client's CPU per wall-clock second.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

try:
    import evpl
    from evpl.rpc2 import Client, load_x
except ImportError as exc:
    print(f"evpl is not importable: {exc}", file=sys.stderr)
    sys.exit(3)

bench = load_x(Path(__file__).resolve().parent / "bench.x", name="bench_x")


def cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def main(argv: list[str] | None = None) -> int:
    """Run the calls, print the JSON line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--backend", default="tcp")
    p.add_argument("--proc", type=int, choices=[0, 1], default=0)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--depth", type=int, default=1)
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--poll-mode", choices=["hybrid", "event", "always"], default="hybrid",
                   help="the client Loop's poll_mode (default: evpl's default, hybrid)")
    args = p.parse_args(argv)

    loop = evpl.Loop(poll_mode=args.poll_mode)
    client = Client(loop, args.backend, ("127.0.0.1", args.port), timeout=30.0)
    stub = bench.BENCH_VERSClient(client)
    size = args.size
    state: dict[str, Any] = {"measuring": False, "count": 0, "error": None}
    lat: list[int] = []
    clock = time.perf_counter_ns

    def issue() -> None:
        t0 = clock()
        rpc = stub.BENCH_NULL() if args.proc == 0 else stub.BENCH_GET4K(size)
        rpc.add_done_callback(lambda c: done(c, t0))

    def done(c: Any, t0: int) -> None:
        if "t1" in state:
            return  # the run is over: close() fails the calls still in flight
        try:
            value = c.result()
        except Exception as exc:
            state["error"] = f"call failed: {exc!r}"
            loop.stop()
            return
        if args.proc == 1 and len(value) != size:
            state["error"] = f"GET4K returned {len(value)} bytes"
            loop.stop()
            return
        if state["measuring"]:
            state["count"] += 1
            lat.append(clock() - t0)
        issue()

    def start() -> None:
        state["measuring"] = True
        state["t0"] = time.monotonic()
        state["cpu0"] = cpu_s()

    def stop() -> None:
        state["t1"] = time.monotonic()
        state["cpu1"] = cpu_s()
        state["measuring"] = False
        loop.stop()

    for _ in range(args.depth):
        issue()
    loop.call_later(args.warmup, start)
    loop.call_later(args.warmup + args.duration, stop)
    loop.run()
    client.close()
    loop.close()
    if state["error"] or "t1" not in state:
        print(json.dumps({"error": state["error"] or "stopped early"}))
        return 2
    dt = state["t1"] - state["t0"]
    lat.sort()

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(q / 100 * len(lat)))] / 1000 if lat else 0.0

    print(json.dumps({
        "client": "evpl", "backend": args.backend, "proc": args.proc, "depth": args.depth,
        "duration_s": round(dt, 6), "count": state["count"],
        "rate": round(state["count"] / dt, 1), "lat_p50_us": round(pct(50), 2),
        "lat_p99_us": round(pct(99), 2),
        "client_cpu": round((state["cpu1"] - state["cpu0"]) / dt, 4),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
