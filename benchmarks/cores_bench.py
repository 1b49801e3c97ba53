"""Cores benchmarks: evpl's threads, offload and shards against what a user
would otherwise pick, measured in the same run, medians of --repeat runs.

  calls    cross-thread calls into a loop: LoopThread.call_soon (one way) and
           LoopThread.call(...).result() and call_wait (round trip; in the
           default event mode and with a polling loop) vs asyncio's and
           uvloop's call_soon_threadsafe / run_coroutine_threadsafe and a
           one-thread concurrent.futures executor
  offload  Loop.offload round trips (one job at a time) and a burst of jobs
           (completions come back batched) vs run_in_executor on asyncio
           and uvloop
  rings    shard to shard with 64-byte payloads: one-way messages/s and
           round trips/s in event and poll mode, vs multiprocessing.Pipe,
           multiprocessing.Queue and pyzmq ipc:// sockets (the two ends
           pinned to different cores)
  scaling  the framed echo load of benchmarks/run.py (C loadgen: 32
           connections x 16 pipelined 64-byte messages) against 1 and 2
           evpl shards and 1 and 2 uvloop processes on one SO_REUSEPORT
           port; server CPU per message summed over the server processes.
           The load generator shares the 2 cores with the servers. evpl
           runs in its default hybrid poll mode (it spins 50 us after
           work: CPU spent waiting) and in event mode (never spins).

Run: flock /tmp/evpl-bench.lock python benchmarks/cores_bench.py all
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import evpl  # noqa: E402
from evpl import shards  # noqa: E402
from evpl.threads import LoopThread, WorkerPool  # noqa: E402

PAYLOAD = bytes(64)


def median_of(fn: Callable[[], float], repeat: int) -> float:
    return statistics.median(fn() for _ in range(repeat))


# ---------------------------------------------------------------- calls
def evpl_one_way(n: int, **options: Any) -> float:
    with LoopThread(**options) as lt:
        done = threading.Event()
        count = [0]

        def f() -> None:
            count[0] += 1
            if count[0] == n:
                done.set()

        call = lt.call_soon
        t = time.perf_counter()
        for _ in range(n):
            call(f)
        done.wait()
        return n / (time.perf_counter() - t)


def evpl_round_trip(n: int, **options: Any) -> float:
    with LoopThread(**options) as lt:
        call = lt.call
        t = time.perf_counter()
        for _ in range(n):
            call(int).result()
        return n / (time.perf_counter() - t)


def evpl_call_wait(n: int, **options: Any) -> float:
    with LoopThread(**options) as lt:
        wait = lt.call_wait
        t = time.perf_counter()
        for _ in range(n):
            wait(int)
        return n / (time.perf_counter() - t)


def _aio_loop(kind: str) -> tuple[asyncio.AbstractEventLoop, threading.Thread]:
    if kind == "uvloop":
        import uvloop
        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    return loop, t


def _aio_stop(loop: asyncio.AbstractEventLoop, t: threading.Thread) -> None:
    loop.call_soon_threadsafe(loop.stop)
    t.join()
    loop.close()


def aio_one_way(kind: str, n: int) -> float:
    loop, th = _aio_loop(kind)
    done = threading.Event()
    count = [0]

    def f() -> None:
        count[0] += 1
        if count[0] == n:
            done.set()

    call = loop.call_soon_threadsafe
    t = time.perf_counter()
    for _ in range(n):
        call(f)
    done.wait()
    rate = n / (time.perf_counter() - t)
    _aio_stop(loop, th)
    return rate


def aio_round_trip(kind: str, n: int) -> float:
    loop, th = _aio_loop(kind)

    async def coro() -> int:
        return 0

    run = asyncio.run_coroutine_threadsafe
    t = time.perf_counter()
    for _ in range(n):
        run(coro(), loop).result()
    rate = n / (time.perf_counter() - t)
    _aio_stop(loop, th)
    return rate


def executor_one_way(n: int) -> float:
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        done = threading.Event()
        count = [0]

        def f() -> None:
            count[0] += 1
            if count[0] == n:
                done.set()

        submit = ex.submit
        t = time.perf_counter()
        for _ in range(n):
            submit(f)
        done.wait()
        return n / (time.perf_counter() - t)


def executor_round_trip(n: int) -> float:
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        t = time.perf_counter()
        for _ in range(n):
            ex.submit(int).result()
        return n / (time.perf_counter() - t)


def bench_calls(opts: argparse.Namespace) -> list[dict[str, Any]]:
    n1, n2 = opts.calls, opts.calls // 10
    rows = []
    runs: dict[str, tuple[Callable[[], float], Callable[[], float]]] = {
        "evpl LoopThread": (lambda: evpl_one_way(n1), lambda: evpl_round_trip(n2)),
        "evpl LoopThread, call_wait": (lambda: evpl_one_way(n1), lambda: evpl_call_wait(n2)),
        "evpl LoopThread polling, call_wait": (lambda: evpl_one_way(n1, poll_mode="always"),
                                               lambda: evpl_call_wait(n2, poll_mode="always")),
        "asyncio call_soon_threadsafe": (lambda: aio_one_way("asyncio", n1),
                                         lambda: aio_round_trip("asyncio", n2)),
        "uvloop call_soon_threadsafe": (lambda: aio_one_way("uvloop", n1),
                                        lambda: aio_round_trip("uvloop", n2)),
        "concurrent.futures (1 thread)": (lambda: executor_one_way(n1),
                                          lambda: executor_round_trip(n2)),
    }
    for name, (one, rt) in runs.items():
        rows.append({"stack": name, "one_way_per_s": median_of(one, opts.repeat),
                     "round_trips_per_s": median_of(rt, opts.repeat)})
    return rows


# ---------------------------------------------------------------- offload
def evpl_offload(n: int, burst: bool) -> float:
    loop = evpl.Loop(spin_ns=0)
    workers = WorkerPool(1, max_queued=n + 1)
    done = [0]
    t = time.perf_counter()
    if burst:
        def count(_f: Any) -> None:
            done[0] += 1
        for _ in range(n):
            loop.offload(int, workers=workers).add_done_callback(count)
    else:
        def chain(_f: Any = None) -> None:
            done[0] += 1
            if done[0] <= n:
                loop.offload(int, workers=workers).add_done_callback(chain)
        chain()
        n += 1
    loop.run_until(lambda: done[0] >= n)
    rate = n / (time.perf_counter() - t)
    workers.close()
    loop.close()
    return rate


def aio_offload(kind: str, n: int, burst: bool) -> float:
    async def main() -> float:
        loop = asyncio.get_running_loop()
        ex = concurrent.futures.ThreadPoolExecutor(1)
        t = time.perf_counter()
        if burst:
            await asyncio.gather(*[loop.run_in_executor(ex, int) for _ in range(n)])
        else:
            for _ in range(n):
                await loop.run_in_executor(ex, int)
        rate = n / (time.perf_counter() - t)
        ex.shutdown()
        return rate
    if kind == "uvloop":
        import uvloop
        return uvloop.run(main())
    return asyncio.run(main())


def bench_offload(opts: argparse.Namespace) -> list[dict[str, Any]]:
    n = opts.calls // 10
    rows = []
    for name, fn in [("evpl Loop.offload", lambda b: evpl_offload(n, b)),
                     ("asyncio run_in_executor", lambda b: aio_offload("asyncio", n, b)),
                     ("uvloop run_in_executor", lambda b: aio_offload("uvloop", n, b))]:
        rows.append({"stack": name,
                     "round_trips_per_s": median_of(lambda fn=fn: fn(False), opts.repeat),
                     "burst_jobs_per_s": median_of(lambda fn=fn: fn(True), opts.repeat)})
    return rows


# ---------------------------------------------------------------- rings
WINDOW = 64     # pipelined round trips: requests in flight


def _evpl_rings(mode: str, batched: str, n_msgs: int, n_rt: int, out: Any) -> None:
    def main(shard: Any) -> None:
        loop = shard.loop
        if shard.id == 1:
            got = [0]

            def on_message(src: int, p: bytes) -> None:
                got[0] += 1
                if got[0] == n_msgs:
                    shard.send_to(0, b"done")

            def on_messages(src: int, batch: list[bytes]) -> None:
                got[0] += len(batch)
                if got[0] == n_msgs:
                    shard.send_to(0, b"done")
            if batched != "no":
                shard.on_messages = on_messages
            else:
                shard.on_message = on_message
            shard.on_request = lambda src, p: p
            return
        finished = []
        shard.on_message = lambda src, p: finished.append(time.perf_counter())
        send = shard.send_to
        t = time.perf_counter()
        sent = 0
        if batched == "both":
            chunk = [PAYLOAD] * 256
            while sent < n_msgs:
                n = shard.send_many(1, chunk if n_msgs - sent >= 256 else chunk[:n_msgs - sent])
                sent += n
                if n < 256:
                    loop.run_once(0)
        while sent < n_msgs:
            try:
                send(1, PAYLOAD)
                sent += 1
            except evpl.Busy:
                loop.run_once(0)
        loop.run_until(lambda: finished)
        one_way = n_msgs / (finished[0] - t)
        count = [0]
        t = time.perf_counter()

        def again(f: Any = None) -> None:
            count[0] += 1
            if count[0] <= n_rt:
                shard.submit_to(1, PAYLOAD).add_done_callback(again)
        again()
        loop.run_until(lambda: count[0] > n_rt)
        rt = n_rt / (time.perf_counter() - t)
        # pipelined: WINDOW requests in flight, a new one per reply
        count[0] = 0
        t = time.perf_counter()

        def more(f: Any = None) -> None:
            count[0] += 1
            if count[0] <= n_rt * 4:
                shard.submit_to(1, PAYLOAD).add_done_callback(more)
        for _ in range(WINDOW):
            shard.submit_to(1, PAYLOAD).add_done_callback(more)
        loop.run_until(lambda: count[0] >= n_rt * 4 + WINDOW)
        piped = n_rt * 4 / (time.perf_counter() - t)
        os.write(out, json.dumps({"one_way": one_way, "rt": rt, "piped": piped}).encode())
        shard.stop_group()

    opts: dict[str, Any] = {"poll_mode": mode}
    statuses = shards.run(main, 2, cpus=[0, 1], **opts)
    if statuses != [0, 0]:
        raise RuntimeError(f"shards exited with {statuses}")


def evpl_rings(mode: str, n_msgs: int, n_rt: int, batched: str = "no") -> dict[str, float]:
    r, w = os.pipe()
    # from a child process: this one may have threads, and shards fork
    p = multiprocessing.get_context("fork").Process(target=_evpl_rings,
                                                    args=(mode, batched, n_msgs, n_rt, w))
    p.start()
    p.join()
    os.close(w)
    data = json.loads(os.read(r, 4096))
    os.close(r)
    return data


def _pin(cpu: int) -> None:
    os.sched_setaffinity(0, {cpu})


def _pipe_peer(conn: Any, n_msgs: int, n_rt: int) -> None:
    _pin(1)
    for _ in range(n_msgs):
        conn.recv_bytes()
    conn.send_bytes(b"done")
    for _ in range(n_rt + n_rt * 4 + WINDOW):
        conn.send_bytes(conn.recv_bytes())


def mp_pipe(n_msgs: int, n_rt: int) -> dict[str, float]:
    ctx = multiprocessing.get_context("fork")
    a, b = ctx.Pipe()
    p = ctx.Process(target=_pipe_peer, args=(b, n_msgs, n_rt))
    p.start()
    _pin(0)
    try:
        t = time.perf_counter()
        for _ in range(n_msgs):
            a.send_bytes(PAYLOAD)
        a.recv_bytes()
        one_way = n_msgs / (time.perf_counter() - t)
        t = time.perf_counter()
        for _ in range(n_rt):
            a.send_bytes(PAYLOAD)
            a.recv_bytes()
        rt = n_rt / (time.perf_counter() - t)
        t = time.perf_counter()
        for _ in range(WINDOW):
            a.send_bytes(PAYLOAD)
        for _ in range(n_rt * 4):
            a.recv_bytes()
            a.send_bytes(PAYLOAD)
        piped = n_rt * 4 / (time.perf_counter() - t)
        for _ in range(WINDOW):
            a.recv_bytes()
    finally:
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
        p.join()
    return {"one_way": one_way, "rt": rt, "piped": piped}


def _queue_peer(q_in: Any, q_out: Any, n_msgs: int, n_rt: int) -> None:
    _pin(1)
    for _ in range(n_msgs):
        q_in.get()
    q_out.put(b"done")
    for _ in range(n_rt + n_rt * 4 + WINDOW):
        q_out.put(q_in.get())


def mp_queue(n_msgs: int, n_rt: int) -> dict[str, float]:
    ctx = multiprocessing.get_context("fork")
    q_in, q_out = ctx.Queue(), ctx.Queue()
    p = ctx.Process(target=_queue_peer, args=(q_in, q_out, n_msgs, n_rt))
    p.start()
    _pin(0)
    try:
        t = time.perf_counter()
        for _ in range(n_msgs):
            q_in.put(PAYLOAD)
        q_out.get()
        one_way = n_msgs / (time.perf_counter() - t)
        t = time.perf_counter()
        for _ in range(n_rt):
            q_in.put(PAYLOAD)
            q_out.get()
        rt = n_rt / (time.perf_counter() - t)
        t = time.perf_counter()
        for _ in range(WINDOW):
            q_in.put(PAYLOAD)
        for _ in range(n_rt * 4):
            q_out.get()
            q_in.put(PAYLOAD)
        piped = n_rt * 4 / (time.perf_counter() - t)
        for _ in range(WINDOW):
            q_out.get()
    finally:
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
        p.join()
    return {"one_way": one_way, "rt": rt, "piped": piped}


def _zmq_peer(path: str, n_msgs: int, n_rt: int, handler: bool) -> None:
    import zmq
    _pin(1)
    ctx = zmq.Context()
    s = ctx.socket(zmq.PAIR)
    s.connect(path)
    if handler:
        # like for like with evpl's receiver: a Python function per message
        got = [0]

        def on_message(src: int, p: bytes) -> None:
            got[0] += 1
            if got[0] == n_msgs:
                pass
        recv = s.recv
        for _ in range(n_msgs):
            on_message(0, recv())
    else:
        for _ in range(n_msgs):
            s.recv()                # copying beats a zero-copy Frame at 64 bytes
    s.send(b"done")
    for _ in range(n_rt + n_rt * 4 + WINDOW):
        s.send(s.recv())
    s.close()
    ctx.term()


def zmq_ipc(n_msgs: int, n_rt: int, handler: bool = False) -> dict[str, float]:
    import zmq
    path = f"ipc:///tmp/evpl-cores-bench-{os.getpid()}"
    ctx = zmq.Context()
    s = ctx.socket(zmq.PAIR)
    s.bind(path)
    p = multiprocessing.get_context("fork").Process(target=_zmq_peer,
                                                    args=(path, n_msgs, n_rt, handler))
    p.start()
    _pin(0)
    try:
        t = time.perf_counter()
        for _ in range(n_msgs):
            s.send(PAYLOAD)
        s.recv()
        one_way = n_msgs / (time.perf_counter() - t)
        t = time.perf_counter()
        for _ in range(n_rt):
            s.send(PAYLOAD)
            s.recv()
        rt = n_rt / (time.perf_counter() - t)
        t = time.perf_counter()
        for _ in range(WINDOW):
            s.send(PAYLOAD)
        for _ in range(n_rt * 4):
            s.recv()
            s.send(PAYLOAD)
        piped = n_rt * 4 / (time.perf_counter() - t)
        for _ in range(WINDOW):
            s.recv()
    finally:
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
        p.join()
        s.close()
        ctx.term()
    return {"one_way": one_way, "rt": rt, "piped": piped}


def bench_rings(opts: argparse.Namespace) -> list[dict[str, Any]]:
    n_msgs, n_rt = opts.messages, opts.messages // 20
    stacks: dict[str, Callable[[], dict[str, float]]] = {
        "evpl shards, event mode": lambda: evpl_rings("event", n_msgs, n_rt),
        "evpl shards, poll mode": lambda: evpl_rings("always", n_msgs, n_rt),
        "evpl shards, poll, send_to/on_messages":
            lambda: evpl_rings("always", n_msgs, n_rt, "recv"),
        "evpl shards, poll, send_many/on_messages":
            lambda: evpl_rings("always", n_msgs, n_rt, "both"),
        "multiprocessing.Pipe": lambda: mp_pipe(n_msgs, n_rt),
        "multiprocessing.Queue": lambda: mp_queue(n_msgs, n_rt),
        "pyzmq ipc:// PAIR": lambda: zmq_ipc(n_msgs, n_rt),
        "pyzmq ipc:// PAIR, a Python handler per message": lambda: zmq_ipc(n_msgs, n_rt, True),
    }
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in stacks}
    for _ in range(opts.repeat):               # interleaved: noise hurts all alike
        for name, fn in stacks.items():
            runs[name].append(fn())
    return [{"stack": name,
             "one_way_per_s": statistics.median(r["one_way"] for r in rs),
             "round_trips_per_s": statistics.median(r["rt"] for r in rs),
             f"pipelined_rt_per_s_{WINDOW}_in_flight": statistics.median(r["piped"] for r in rs)}
            for name, rs in runs.items()]


# ---------------------------------------------------------------- scaling
def _cpu_ticks(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _evpl_server(n: int, port: int, mode: str, ready: Any) -> None:
    import signal

    from servers_evpl import BatchEcho

    def main(shard: Any) -> None:
        shard.listen("echo", BatchEcho, framing=evpl.framing.length_prefix(4, "big"))

    group = shards.start(main, n, cpus=list(range(n)), poll_mode=mode,
                         listen={"echo": ("tcp", ("127.0.0.1", port))})
    signal.signal(signal.SIGTERM, lambda *_: group.stop())
    os.write(ready, json.dumps([p for p in group.pids]).encode())
    group.wait()


def _uvloop_server(port: int, cpu: int, ready: Any) -> None:
    import uvloop
    from servers_py import FramedEcho
    _pin(cpu)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        await loop.create_server(FramedEcho, "127.0.0.1", port, reuse_port=True, backlog=1024)
        os.write(ready, b"[%d]" % os.getpid())
        await asyncio.Event().wait()

    uvloop.run(serve())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scaling_run(stack: str, n: int, opts: argparse.Namespace) -> dict[str, float]:
    port = _free_port()
    ctx = multiprocessing.get_context("fork")
    r, w = os.pipe()
    procs = []
    if stack.startswith("evpl"):
        mode = "event" if stack == "evpl-event" else "hybrid"
        procs.append(ctx.Process(target=_evpl_server, args=(n, port, mode, w)))
    else:
        procs += [ctx.Process(target=_uvloop_server, args=(port, i, w)) for i in range(n)]
    for p in procs:
        p.start()
    pids: list[int] = []
    while len(pids) < n:
        pids += json.loads(os.read(r, 4096).decode().replace("][", ","))
    os.close(r)
    os.close(w)
    try:
        cpu0 = _cpu_ticks(pids)
        out = subprocess.run([str(HERE / "build" / "loadgen"), "pipeline", "--conns", "32",
                              "--depth", "16", "--size", "64", "--host", "127.0.0.1",
                              "--port", str(port), "--duration", str(opts.duration),
                              "--warmup", "0"], capture_output=True, text=True, check=True)
        cpu = _cpu_ticks(pids) - cpu0
        data = json.loads([ln for ln in out.stdout.splitlines() if ln.startswith("{")][-1])
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.join()
    msgs = data["rate"] * opts.duration
    return {"rate": data["rate"], "cpu_us_per_msg": cpu / msgs * 1e6}


def bench_scaling(opts: argparse.Namespace) -> list[dict[str, Any]]:
    subprocess.run([sys.executable, "-c", "import run; run.build(False)"], cwd=HERE, check=True)
    configs = [("evpl", 1), ("evpl", 2), ("evpl-event", 1), ("evpl-event", 2),
               ("uvloop", 1), ("uvloop", 2)]
    runs: dict[tuple[str, int], list[dict[str, float]]] = {c: [] for c in configs}
    for _ in range(opts.repeat):
        for c in configs:
            runs[c].append(scaling_run(c[0], c[1], opts))
    return [{"stack": f"{s} x{n}",
             "msgs_per_s": statistics.median(r["rate"] for r in runs[(s, n)]),
             "server_cpu_us_per_msg": statistics.median(r["cpu_us_per_msg"]
                                                        for r in runs[(s, n)])}
            for s, n in configs]


# ---------------------------------------------------------------- output
def show(title: str, rows: list[dict[str, Any]], base: str | None) -> None:
    print(f"\n## {title}\n")
    cols = [k for k in rows[0] if k != "stack"]
    ref = next((r for r in rows if base and r["stack"].startswith(base)), None)
    print("| stack | " + " | ".join(cols) + (" | ratios vs " + base if ref else "") + " |")
    print("|---" * (len(cols) + 1 + (1 if ref else 0)) + "|")
    for r in rows:
        cells = [f"{r[c]:,.0f}" if r[c] >= 100 else f"{r[c]:.2f}" for c in cols]
        ratio = ""
        if ref:
            ratio = " | " + ", ".join(f"{r[c] / ref[c]:.2f}x" for c in cols)
        print(f"| {r['stack']} | " + " | ".join(cells) + ratio + " |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 2)[2])
    p.add_argument("which", nargs="*", default=["all"],
                   choices=["all", "calls", "offload", "rings", "scaling"])
    p.add_argument("--repeat", type=int, default=3, help="runs per number (median)")
    p.add_argument("--calls", type=int, default=200_000,
                   help="one-way calls per run (round trips: a tenth)")
    p.add_argument("--messages", type=int, default=1_000_000,
                   help="one-way shard messages per run (round trips: a twentieth)")
    p.add_argument("--duration", type=float, default=3.0, help="scaling: seconds per run")
    p.add_argument("--json", metavar="PATH", help="also write every table as JSON")
    opts = p.parse_args(argv)
    which = {"calls", "offload", "rings", "scaling"} if "all" in opts.which else set(opts.which)
    results: dict[str, Any] = {}
    if "calls" in which:
        results["calls"] = rows = bench_calls(opts)
        show("cross-thread calls into a loop", rows, "uvloop")
    if "offload" in which:
        results["offload"] = rows = bench_offload(opts)
        show("offload to a worker thread and back", rows, "uvloop")
    if "rings" in which:
        results["rings"] = rows = bench_rings(opts)
        show("shard to shard, 64-byte payloads, cores 0 and 1", rows, "pyzmq")
    if "scaling" in which:
        results["scaling"] = rows = bench_scaling(opts)
        show("framed echo, 32 conns x 16 x 64 B; servers and loadgen share 2 cores",
             rows, "uvloop x2")
    if opts.json:
        Path(opts.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
