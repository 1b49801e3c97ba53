"""asyncio loops side by side: evpl.aio against uvloop and stock asyncio.

The same asyncio programs (below, one per load) run on each loop in the same
invocation, interleaved (repetition 1 of every loop, then repetition 2...),
medians reported with ratios to uvloop. Servers are pinned to core 0, the C
load generator of benchmarks/c (or wrk) to core 1.

Loads:

* ``proto``     Protocol echo (data_received -> write), 32 conns x 16
                pipelined 64 B messages (loadgen raw mode).
* ``streams``   asyncio streams echo: readexactly(64) / write / drain per
                message, same load.
* ``pingpong``  one connection, one 64 B message in flight (round trips/s),
                Protocol echo.
* ``aiohttp``   an aiohttp "hello" app under wrk (1 thread, 32 connections);
                each run also prints the server's user and system CPU per
                request, its core's softirq and idle time, and the IPIs
                wrk's core took per request (/proc: a server that sends
                each response on its own wakes wrk about once per
                request; evpl's end-of-iteration sends once per batch).
* ``timers``    1M call_later callbacks (delays spread over 0-100 ms)
                scheduled and fired, in one process: callbacks/s.

Loops: ``asyncio``, ``uvloop``, ``evpl`` (evpl.aio, hybrid polling, the
default), ``evpl-event`` (poll_mode="event": never spins), ``evpl-uring``
(backend="io_uring", hybrid), ``evpl-uring-event`` (io_uring, event mode).

References, not asyncio loops: ``c`` and ``c-spin`` are benchmarks/c's
echo_epoll (raw mode: one read, one write) sleeping in epoll_wait or
spinning on a zero-timeout epoll_wait, for the proto, streams and pingpong
loads: what the kernel allows a server with no Python at all, the first
like uvloop and evpl-event, the second like evpl's hybrid mode while busy.

    flock /tmp/evpl-bench.lock python benchmarks/aio_bench.py
    python benchmarks/aio_bench.py --loads proto pingpong --repeat 5 --duration 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run as _run  # noqa: E402  (the C load generator's build and runner)

SERVER_CORE = "0"
CLIENT_CORE = "1"
LOOPS = ("asyncio", "uvloop", "evpl", "evpl-event", "evpl-uring", "evpl-uring-event", "c",
         "c-spin")
C_LOADS = ("proto", "streams", "pingpong")
LOADS = ("proto", "streams", "pingpong", "aiohttp", "timers")
MSG = 64


# ---- the programs under test (run in a child process: --serve LOOP LOAD) ---------------


def new_loop(name: str) -> asyncio.AbstractEventLoop:
    """A fresh loop of kind ``name``."""
    if name == "asyncio":
        return asyncio.new_event_loop()
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    import evpl.aio

    options: dict[str, Any] = {}
    if name.endswith("-event"):
        options["poll_mode"] = "event"
    if name.startswith("evpl-uring"):
        options["backend"] = "io_uring"
    return evpl.aio.new_event_loop(**options)


class Echo(asyncio.Protocol):
    """The fastest idiomatic asyncio echo: write back what arrives."""

    def connection_made(self, transport: Any) -> None:
        self.write = transport.write

    def data_received(self, data: bytes) -> None:
        self.write(data)


async def stream_echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    """Per message: readexactly, write, drain."""
    try:
        while True:
            msg = await r.readexactly(MSG)
            w.write(msg)
            await w.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    w.close()


async def start_hello() -> tuple[Any, int]:
    """The aiohttp "hello" app on 127.0.0.1: its AppRunner and port."""
    from aiohttp import web

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="Hello, World!")

    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


async def serve(load: str) -> None:
    loop = asyncio.get_running_loop()
    if load in ("proto", "pingpong"):
        srv: Any = await loop.create_server(Echo, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
    elif load == "streams":
        srv = await asyncio.start_server(stream_echo, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
    elif load == "aiohttp":
        _runner, port = await start_hello()
    else:
        raise SystemExit(f"unknown load {load}")
    stop = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
    loop.add_signal_handler(signal.SIGINT, stop.set_result, None)
    print(f"ready {port}", flush=True)
    await stop


def timers(n: int) -> float:
    """Callbacks/s for ``n`` call_later timers (delays spread over 0-100 ms)."""
    loop = asyncio.get_event_loop()
    left = [n]
    done = loop.create_future()

    def fire() -> None:
        left[0] -= 1
        if not left[0]:
            done.set_result(None)

    t0 = time.perf_counter()
    call_later = loop.call_later
    for i in range(n):
        call_later((i % 1000) * 0.0001, fire)
    loop.run_until_complete(done)
    return n / (time.perf_counter() - t0)


def child(loop_name: str, load: str, n: int) -> None:
    loop = new_loop(loop_name)
    asyncio.set_event_loop(loop)
    try:
        if load == "timers":
            print(json.dumps({"rate": timers(n)}), flush=True)
        else:
            loop.run_until_complete(serve(load))
    finally:
        loop.close()


# ---- the driver ------------------------------------------------------------------------


@contextlib.contextmanager
def server(loop_name: str, load: str) -> Iterator[tuple[int, int]]:
    """Start the server for ``load`` on ``loop_name`` on the server core."""
    if loop_name in ("c", "c-spin"):
        if load not in C_LOADS:
            raise RuntimeError(f"the C reference serves only {', '.join(C_LOADS)}")
        cmd = [str(_run.BUILD / "echo_epoll"), "--mode", "raw", "--port", "0"]
        if loop_name == "c-spin":
            cmd.append("--spin")
    else:
        cmd = [sys.executable, __file__, "--serve", loop_name, load]
    proc = subprocess.Popen(["taskset", "-c", SERVER_CORE, *cmd], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("ready "):  # (the C reference prints the same line)
            raise RuntimeError(f"{loop_name} {load} server did not start: {line!r}")
        yield int(line.split()[1]), proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# server user and system CPU, its core's softirq and idle time (µs), and IPIs to
# wrk's core, per request of the last aiohttp run, per (loop, load)
cpu_per_req: dict[tuple[str, str], list[float]] = {}


def _cpu_times(pid: int) -> tuple[float, float, float, float, float]:
    """utime and stime of process ``pid``, and the softirq and idle time of
    the server's core (not charged to any process), in seconds; and the
    inter-processor interrupts the load generator's core took (rescheduling
    and function-call IPIs: mostly the server waking wrk up), times 1e-6."""
    tick = os.sysconf("SC_CLK_TCK")
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    with open("/proc/stat") as f:
        core = next(line.split() for line in f if line.startswith(f"cpu{SERVER_CORE} "))
    ipis = 0
    with open("/proc/interrupts") as f:
        for line in f:
            p = line.split()
            if p and p[0] in ("RES:", "CAL:"):
                ipis += int(p[1 + int(CLIENT_CORE)])
    # /proc/stat: user nice system idle iowait irq softirq ...
    return (int(fields[11]) / tick, int(fields[12]) / tick, int(core[7]) / tick,
            (int(core[4]) + int(core[5])) / tick, ipis / 1e6)


def measure(loop_name: str, load: str, opts: argparse.Namespace) -> float:
    """One measurement: the load's headline rate."""
    if loop_name in ("c", "c-spin") and load not in C_LOADS:
        raise RuntimeError(f"the C reference serves only {', '.join(C_LOADS)}")
    if load == "timers":
        out = subprocess.run(
            ["taskset", "-c", SERVER_CORE, sys.executable, __file__, "--serve", loop_name,
             load, "--timers", str(opts.timers)], capture_output=True, text=True, check=True)
        return float(json.loads(out.stdout.strip().splitlines()[-1])["rate"])
    with server(loop_name, load) as (port, pid):
        common = ["--port", str(port), "--duration", str(opts.duration),
                  "--warmup", str(opts.warmup), "--server-pid", str(pid)]
        if load in ("proto", "streams"):
            data = _run.run_loadgen(["raw", "--conns", "32", "--depth", "16", "--size",
                                     str(MSG), *common], timeout=opts.duration + 60)
            return float(data["rate"])
        if load == "pingpong":
            data = _run.run_loadgen(["pingpong", "--conns", "1", "--size", str(MSG), *common],
                                    timeout=opts.duration + 60)
            return float(data["rate"])
        if load == "aiohttp":
            cpu0 = _cpu_times(pid)
            out = subprocess.run(
                ["taskset", "-c", CLIENT_CORE, "wrk", "-t1", "-c32",
                 f"-d{max(1, round(opts.duration))}s", f"http://127.0.0.1:{port}/"],
                capture_output=True, text=True, timeout=opts.duration + 60, check=True)
            cpu1 = _cpu_times(pid)
            m = re.search(r"Requests/sec:\s+([\d.]+)", out.stdout)
            n = re.search(r"(\d+) requests in", out.stdout)
            if not m or not n or "Non-2xx" in out.stdout or "errors" in out.stdout:
                raise RuntimeError(f"wrk: {out.stdout}")
            reqs = int(n.group(1))
            # (includes wrk's connection set-up, a few per mille of a run)
            cpu_per_req[(loop_name, load)] = [(b - a) / reqs * 1e6
                                              for a, b in zip(cpu0, cpu1, strict=True)]
            return float(m.group(1))
    raise ValueError(load)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--loads", nargs="+", default=list(LOADS), choices=LOADS)
    ap.add_argument("--loops", nargs="+", default=list(LOOPS), choices=LOOPS)
    ap.add_argument("--repeat", type=int, default=3, help="repetitions (median; default 3)")
    ap.add_argument("--duration", type=float, default=3, help="seconds per run (default 3)")
    ap.add_argument("--warmup", type=float, default=1, help="loadgen warm-up s (default 1)")
    ap.add_argument("--timers", type=int, default=1_000_000, help="timers per run (1M)")
    ap.add_argument("--json", help="write every run here")
    ap.add_argument("--serve", nargs=2, metavar=("LOOP", "LOAD"), help=argparse.SUPPRESS)
    opts = ap.parse_args(argv)
    if opts.serve:
        child(opts.serve[0], opts.serve[1], opts.timers)
        return 0
    _run.build(verbose=False)
    runs: dict[tuple[str, str], list[float]] = {}
    for load in opts.loads:
        for rep in range(opts.repeat):
            for loop_name in opts.loops:
                try:
                    value = measure(loop_name, load, opts)
                except Exception as exc:  # a stack that cannot run is reported, not fatal
                    print(f"{load:9} {loop_name:16} run {rep + 1}: FAILED {exc}", flush=True)
                    continue
                runs.setdefault((load, loop_name), []).append(value)
                cpu = cpu_per_req.pop((loop_name, load), None)
                extra = (f"   µs/req: server user {cpu[0]:.2f} sys {cpu[1]:.2f}, its core's "
                         f"softirq {cpu[2]:.2f} idle {cpu[3]:.2f}; wrk wake-ups (IPIs)/req "
                         f"{cpu[4]:.2f}" if cpu else "")
                print(f"{load:9} {loop_name:16} run {rep + 1}: {value:14,.0f}{extra}", flush=True)
    print()
    print(f"{'load':9} {'loop':16} {'median/s':>14} {'vs uvloop':>10} {'vs asyncio':>11}")
    for load in opts.loads:
        base_uv = runs.get((load, "uvloop"))
        base_aio = runs.get((load, "asyncio"))
        for loop_name in opts.loops:
            values = runs.get((load, loop_name))
            if not values:
                continue
            med = statistics.median(values)
            uv = f"{med / statistics.median(base_uv):9.2f}x" if base_uv else "-"
            aio = f"{med / statistics.median(base_aio):10.2f}x" if base_aio else "-"
            print(f"{load:9} {loop_name:16} {med:14,.0f} {uv:>10} {aio:>11}")
    if opts.json:
        Path(opts.json).write_text(json.dumps(
            {f"{lo}/{lp}": v for (lo, lp), v in runs.items()}, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
