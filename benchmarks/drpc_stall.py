"""drpc when a host stalls: large responses while one end is stopped on purpose.

A shared VM deschedules processes for milliseconds at a time; to a drpc
client that looks like an RTT spike, and a spike longer than the RTO looks
like loss. This reproduces that deterministically instead of waiting for the
host: a server process (core 0) answers 8 MiB responses (``--size``) in
1472-byte datagrams, a client process (core 1) makes one call at a time for
``--duration`` seconds, and this driver stops the server (or the client,
``--target client``) with SIGSTOP for ``--stall`` ms every ``--every`` ms,
then SIGCONT. ``--stall 0`` is the quiet baseline. ``--hog`` instead (or
as well) runs a busy loop pinned to the server's core, so that the
scheduler shares that core between the two in slices of milliseconds.

Printed per run (one JSON line per run, then the medians): goodput, per-call
latency (median and worst), rollbacks (``retransmits``) and duplicate
answers per call, the client's Timely rate (time-weighted mean and minimum,
sampled every 10 ms, and at the end), the number of Timely decreases, and
the server's duplicates and RFRs answered::

    flock /tmp/evpl-bench.lock python benchmarks/drpc_stall.py
    python benchmarks/drpc_stall.py --stall 20 --every 200 --repeat 3
    python benchmarks/drpc_stall.py --stall 0            # the same, no stalls
    python benchmarks/drpc_stall.py --stall 0 --hog      # a CPU hog on the server's core

The library under test is whatever ``import evpl`` finds (``PYTHONPATH``
selects another tree for an A/B run).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
SERVER_CORE, CLIENT_CORE = 0, 1


def serve(size: int) -> None:
    """The server role: answer type 1 with ``size`` bytes; print the port,
    then (at stdin's end) the counters."""
    import evpl
    from evpl.drpc import Server

    resp = bytes((i * 7) & 0xFF for i in range(size))
    loop = evpl.Loop()
    server = Server(loop, "udp", ("127.0.0.1", 0))
    server.register(1, lambda req: resp)
    eof: list[bool] = []

    def stdin_readable() -> None:
        if not sys.stdin.buffer.raw.read(4096):
            eof.append(True)

    loop.watch_fd(sys.stdin.fileno(), on_readable=stdin_readable)
    print(f"ready {server.address[1]}", flush=True)
    loop.run_until(lambda: eof)
    print(json.dumps(server.stats()), flush=True)


def client(port: int, size: int, duration: float, cc: bool = True,
           timely: dict[str, Any] | None = None) -> dict[str, Any]:
    """The client role: one call at a time for ``duration`` seconds."""
    import evpl
    from evpl.drpc import Client

    loop = evpl.Loop()
    c = Client(loop, "udp", ("127.0.0.1", port), peer_timeout=10.0, cc=cc, timely=timely)
    c.wait(c.call(1, b"warm-up"))
    base = c.stats()
    clock = time.perf_counter
    lat: list[float] = []
    errors: list[str] = []
    t_start = clock()
    end = t_start + duration
    rates: list[float] = []

    def sample_rate() -> None:
        rates.append(c.session.cc.rate if c.session.cc is not None else 0.0)

    sampler = loop.call_every(0.01, sample_rate)

    def issue() -> None:
        t0 = clock()

        def cb(resp: Any, err: Any) -> None:
            if err is not None or len(resp) != size:
                errors.append(repr(err) if err is not None else f"{len(resp)} bytes")
                return
            lat.append(clock() - t0)
            if clock() < end:
                issue()
        c.call(1, b"q" * 32, cb)

    issue()
    loop.run_until(lambda: errors or (lat and clock() >= end and c.outstanding == 0),
                   timeout=duration + 60)
    elapsed = clock() - t_start
    sampler.cancel()
    st = c.stats()
    c.close()
    if errors:
        raise SystemExit(f"call failed: {errors[0]}")
    n = len(lat)
    lat.sort()
    return {"calls": n, "gbit_per_s": n * size * 8 / elapsed / 1e9,
            "p50_ms": lat[n // 2] * 1e3, "max_ms": lat[-1] * 1e3,
            "retransmits_per_call": (st["retransmits"] - base["retransmits"]) / n,
            "duplicates_per_call": (st["duplicates"] - base["duplicates"]) / n,
            "rate_mean_gbps": statistics.fmean(rates) / 1e9 if rates else 0.0,
            "rate_min_gbps": min(rates) / 1e9 if rates else 0.0,
            "rate_end_gbps": st.get("rate_bps", 0.0) / 1e9,
            "decreases": st["timely"]["decreases"] - base["timely"]["decreases"]
            if "timely" in st else 0}


def measure(size: int, duration: float, stall_ms: float, every_ms: float,
            target: str, cc: bool = True, hog: bool = False,
            timely: str | None = None) -> dict[str, Any]:
    """One run: a fresh server and client, the stalls from here."""
    hogp = subprocess.Popen(["taskset", "-c", str(SERVER_CORE), sys.executable, "-c",
                             "while True: pass"]) if hog else None
    server = subprocess.Popen(["taskset", "-c", str(SERVER_CORE), sys.executable, str(HERE),
                               "--role", "server", "--size", str(size)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None and server.stdin is not None
    cl = None
    try:
        line = server.stdout.readline()
        if not line.startswith("ready "):
            raise SystemExit(f"server did not start: {line!r}")
        port = int(line.split()[1])
        cl = subprocess.Popen(["taskset", "-c", str(CLIENT_CORE), sys.executable, str(HERE),
                               "--role", "client", "--port", str(port), "--size", str(size),
                               "--duration", str(duration), *([] if cc else ["--no-cc"]),
                               *([] if timely is None else ["--timely", timely])],
                              stdout=subprocess.PIPE, text=True)
        victim = server if target == "server" else cl
        stalls = 0
        if stall_ms > 0:
            # let the client connect and warm up before the first stall
            time.sleep(0.3)
            while cl.poll() is None:
                os.kill(victim.pid, signal.SIGSTOP)
                time.sleep(stall_ms / 1e3)
                os.kill(victim.pid, signal.SIGCONT)
                stalls += 1
                time.sleep(max(every_ms - stall_ms, 0) / 1e3)
        out_text, _ = cl.communicate(timeout=duration + 120)
        if cl.returncode != 0:
            raise SystemExit(f"client failed ({cl.returncode})")
        out = json.loads(out_text.strip().splitlines()[-1])
        out["stalls"] = stalls
        server.stdin.close()
        sstats = json.loads(server.stdout.readline())
        out["server_duplicates"] = sstats["duplicates"]
        out["server_rfr"] = sstats["rfr"]
        return out
    finally:
        for p in (cl, server, hogp):
            if p is not None and p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
                p.wait()


KEYS = ["calls", "gbit_per_s", "p50_ms", "max_ms", "retransmits_per_call",
        "duplicates_per_call", "rate_mean_gbps", "rate_min_gbps", "rate_end_gbps",
        "decreases", "server_duplicates", "stalls"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--size", type=int, default=8 << 20, help="response bytes")
    ap.add_argument("--duration", type=float, default=4.0, help="seconds of calls per run")
    ap.add_argument("--stall", type=float, default=20.0, help="ms each stop lasts (0: none)")
    ap.add_argument("--every", type=float, default=200.0, help="ms from one stop to the next")
    ap.add_argument("--target", choices=["server", "client"], default="server")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-cc", action="store_true", help="the client without Timely (cc=False)")
    ap.add_argument("--hog", action="store_true", help="a busy loop on the server's core")
    ap.add_argument("--timely", default=None,
                    help='Timely parameters for the client, as JSON: \'{"alpha": 0.46}\'')
    ap.add_argument("--role", choices=["driver", "server", "client"], default="driver",
                    help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role == "server":
        serve(args.size)
        return
    if args.role == "client":
        timely = json.loads(args.timely) if args.timely else None
        print(json.dumps(client(args.port, args.size, args.duration, not args.no_cc, timely)),
              flush=True)
        return
    runs = []
    for r in range(args.repeat):
        out = measure(args.size, args.duration, args.stall, args.every, args.target,
                      not args.no_cc, args.hog, args.timely)
        runs.append(out)
        print(f"run {r + 1}: " + json.dumps({k: round(out[k], 3) for k in KEYS}), flush=True)
    med = {k: round(statistics.median(o[k] for o in runs), 3) for k in KEYS}
    what = f"{args.target} stopped {args.stall:g} ms every {args.every:g} ms" + \
        (", a hog on the server's core" if args.hog else "")
    print(f"median ({what}): " +
          json.dumps(med), flush=True)


if __name__ == "__main__":
    main()
