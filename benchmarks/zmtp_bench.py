#!/usr/bin/env python3
"""evpl.zmtp against pyzmq (blocking and zmq.asyncio) and libzmq in C.

Scenarios (each stack talks to itself; the measuring side on core 0, the
other side on core 1, pinned with taskset):

  pushpull   PUSH -> PULL, 64-byte messages, one connection: msg/s
  pubsub     PUB -> 8 SUB processes, 64-byte messages: delivered msg/s
  reqrep     REQ <-> REP round trips/s (evpl hybrid, event and poll mode), next
             to the kernel's floor: c/pingpong_floor.c, two C processes
             bouncing 64 bytes with a busy-polling recv and a send (what
             evpl's polling loop does for its last receiving socket) and no
             protocol at all (no ZeroMQ stack can beat it on this machine)
  large      PUSH -> PULL, 1 MiB messages: MB/s

Every number is the median of ``--repeat`` runs, interleaved (run 1 of every
stack, then run 2...), and is printed with its ratio to pyzmq (blocking) and
to libzmq C measured in the same invocation, and with the CPU time the
measuring side (receiver, or REQ client) spent per message: on a machine
shared with other work the rates follow the CPU share each process gets
(pyzmq and libzmq run two threads, an evpl process one), the CPU per message
does not.

  flock /tmp/evpl-bench.lock python benchmarks/zmtp_bench.py
  python benchmarks/zmtp_bench.py --scenarios pushpull,reqrep --repeat 5 --duration 3
  python benchmarks/zmtp_bench.py --scenarios reqrep --transport ipc

The C reference (c/zmq_perf.c) is compiled into build/ with gcc against
libzmq (Debian's libzmq3-dev); without it that stack is skipped. The roles
run by this same file (``--role``) are the peers in their fastest idiomatic
form: pyzmq's blocking loop of send/recv, zmq.asyncio's awaited send/recv,
and evpl.zmtp's batch callback (on_messages) and send loop.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD = os.path.join(HERE, "build")
MEASURE_CORE, PEER_CORE = "0", "1"


# ---------------------------------------------------------------- roles --------

def _emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


def _cpu() -> float:
    """CPU seconds of this process, every thread (user + system)."""
    t = os.times()
    return t.user + t.system


def role_evpl(role: str, ep: str, size: int, warmup: float, duration: float,
              mode: str) -> None:
    import evpl
    import evpl.zmtp as ez
    loop = evpl.Loop(poll_mode=mode)      # type: ignore[arg-type]
    msg = b"x" * size
    frames = [msg]
    state = {"n": 0, "t0": 0.0, "counting": False, "done": False}

    def started() -> None:
        state["t0"] = loop.now() + warmup
        loop.call_later(warmup, begin)

    def begin() -> None:
        state["n"] = 0
        state["t0"] = loop.now()
        state["cpu"] = _cpu()
        state["counting"] = True
        loop.call_later(duration, finish)

    def finish() -> None:
        _emit({"msgs": state["n"], "secs": loop.now() - state["t0"],
               "cpu": _cpu() - state["cpu"]})
        state["done"] = True
        loop.stop()

    if role in ("pull", "sub"):
        def on_messages(msgs: list[Any]) -> None:
            if not state["t0"]:
                started()
            state["n"] += len(msgs)
        s = ez.Socket(loop, role.upper(), on_messages=on_messages)
        if role == "sub":
            s.subscribe(b"")
            s.connect(ep)
        else:
            print("ready", s.bind(ep), flush=True)
        loop.run()
        os._exit(0)
    if role == "rep":
        s = ez.Socket(loop, "REP")
        s.on_message = s.send_multipart      # echo: the received frames go back out
        print("ready", s.bind(ep), flush=True)
        loop.run()
    if role == "req":
        def on_reply(m: list[Any]) -> None:
            if not state["t0"]:
                started()
            state["n"] += 1
            s.send_multipart(frames)
        s = ez.Socket(loop, "REQ", on_message=on_reply)
        s.connect(ep)
        s.send_multipart(frames, ez.NOBLOCK)
        loop.run()
        os._exit(0)
    # push / pub: send as fast as the peer takes it
    s = ez.Socket(loop, role.upper(), sndhwm=10000)
    if role == "pub":
        print("ready", s.bind(ep), flush=True)
    else:
        s.connect(ep)
    # small messages go out in batches (send_messages: one encode, one
    # queue entry per batch); large ones one by one (sent from the bytes
    # object itself, not copied)
    small = size < 4096
    batch = [frames] * 256
    send, send_many = s.send_multipart, s.send_messages
    while True:
        try:
            if small:
                send_many(batch)
            else:
                send(frames, ez.NOBLOCK)
            loop.run_once(0)
        except ez.Again:
            loop.run_once(0.001)


def role_pyzmq(role: str, ep: str, size: int, warmup: float, duration: float) -> None:
    import zmq
    ctx = zmq.Context()
    s = ctx.socket(getattr(zmq, role.upper()))
    msg = b"x" * size
    if role in ("pull", "pub", "rep"):
        s.bind(ep)
        print("ready", s.getsockopt_string(zmq.LAST_ENDPOINT), flush=True)
    else:
        if role == "sub":
            s.subscribe(b"")
        s.connect(ep)
    if role in ("push", "pub"):
        send = s.send
        while True:
            send(msg)
    if role == "rep":
        while True:
            s.send(s.recv())
    recv, send = s.recv, s.send
    req = role == "req"
    if req:
        send(msg)
    recv()
    t_end = time.monotonic() + warmup
    while time.monotonic() < t_end:
        for _ in range(64):
            if req:
                send(msg)
            recv()
    n = 0
    t0 = time.monotonic()
    c0 = _cpu()
    t_end = t0 + duration
    while True:
        for _ in range(256):
            if req:
                send(msg)
            recv()
        n += 256
        if time.monotonic() >= t_end:
            break
    _emit({"msgs": n, "secs": time.monotonic() - t0, "cpu": _cpu() - c0})
    os._exit(0)


def role_pyzmq_asyncio(role: str, ep: str, size: int, warmup: float, duration: float) -> None:
    import asyncio

    import zmq
    import zmq.asyncio

    async def main() -> None:
        ctx = zmq.asyncio.Context()
        s = ctx.socket(getattr(zmq, role.upper()))
        msg = b"x" * size
        if role in ("pull", "pub", "rep"):
            s.bind(ep)
            print("ready", s.getsockopt_string(zmq.LAST_ENDPOINT), flush=True)
        else:
            if role == "sub":
                s.subscribe(b"")
            s.connect(ep)
        if role in ("push", "pub"):
            while True:
                await s.send(msg)
        if role == "rep":
            while True:
                await s.send(await s.recv())
        req = role == "req"
        if req:
            await s.send(msg)
        await s.recv()
        t_end = time.monotonic() + warmup
        while time.monotonic() < t_end:
            if req:
                await s.send(msg)
            await s.recv()
        n = 0
        t0 = time.monotonic()
        c0 = _cpu()
        t_end = t0 + duration
        while True:
            for _ in range(64):
                if req:
                    await s.send(msg)
                await s.recv()
            n += 64
            if time.monotonic() >= t_end:
                break
        _emit({"msgs": n, "secs": time.monotonic() - t0, "cpu": _cpu() - c0})
        os._exit(0)
    asyncio.run(main())


# ---------------------------------------------------------------- driver -------

STACKS = {
    "evpl": ["--stack", "evpl"],                                  # hybrid: spin 50 us, then sleep
    "evpl-event": ["--stack", "evpl", "--mode", "event"],         # sleep at once when idle
    "evpl-poll": ["--stack", "evpl", "--mode", "always"],         # never sleep
    "pyzmq": ["--stack", "pyzmq"],
    "pyzmq-asyncio": ["--stack", "pyzmq-asyncio"],
    "libzmq-c": None,
    "c-floor": None,
}
SCENARIOS: dict[str, dict[str, Any]] = {
    "pushpull": {"measure": "pull", "peer": "push", "size": 64, "peers": 1,
                 "stacks": ["evpl", "pyzmq", "pyzmq-asyncio", "libzmq-c"], "unit": "msg/s"},
    "pubsub": {"measure": "sub", "peer": "pub", "size": 64, "peers": 8,
               "stacks": ["evpl", "pyzmq", "libzmq-c"], "unit": "msg/s delivered"},
    "reqrep": {"measure": "req", "peer": "rep", "size": 64, "peers": 1,
               "stacks": ["evpl", "evpl-event", "evpl-poll", "pyzmq", "pyzmq-asyncio",
                          "libzmq-c", "c-floor"],
               "unit": "round trips/s"},
    "large": {"measure": "pull", "peer": "push", "size": 1 << 20, "peers": 1,
              "stacks": ["evpl", "pyzmq", "libzmq-c"], "unit": "MB/s"},
}


def c_binary(name: str = "zmq_perf") -> str | None:
    src = os.path.join(HERE, "c", name + ".c")
    out = os.path.join(BUILD, name)
    if os.path.exists(out) and os.path.getmtime(out) >= os.path.getmtime(src):
        return out
    libs = ["-lzmq"] if name == "zmq_perf" else []
    if not shutil.which("gcc") or (libs and not os.path.exists("/usr/include/zmq.h")):
        return None
    os.makedirs(BUILD, exist_ok=True)
    r = subprocess.run(["gcc", "-O2", "-Wall", "-I", os.path.join(HERE, "c"), "-o", out, src,
                        *libs], capture_output=True)
    return out if r.returncode == 0 else None


_n_ep = 0


def endpoint(stack: str, opts: argparse.Namespace) -> str:
    """Where the binding side listens: a free tcp port, or a fresh ipc path."""
    global _n_ep
    if opts.transport == "ipc":
        _n_ep += 1
        return f"ipc:///tmp/evpl-zbench-{os.getpid()}-{_n_ep}.sock"
    return "tcp://127.0.0.1:*" if stack == "libzmq-c" else "tcp://127.0.0.1:0"


def command(stack: str, role: str, ep: str, size: int, opts: argparse.Namespace) -> list[str]:
    if stack == "libzmq-c":
        exe = c_binary()
        assert exe is not None
        return [exe, role, ep, str(size), str(opts.warmup), str(opts.duration)]
    return [sys.executable, os.path.abspath(__file__), "--role", role, "--endpoint", ep,
            "--size", str(size), "--warmup", str(opts.warmup), "--duration",
            str(opts.duration), *STACKS[stack]]


def pinned(core: str, cmd: list[str]) -> list[str]:
    return ["taskset", "-c", core, *cmd] if shutil.which("taskset") else cmd


def run_once(stack: str, sc: dict[str, Any], opts: argparse.Namespace) -> tuple[float, float]:
    """One measurement: the binding side first, then the others; the
    measuring processes print a JSON line each. Returns the rate (summed over
    the measuring processes)."""
    procs: list[subprocess.Popen[str]] = []
    if stack == "c-floor":
        exe = c_binary("pingpong_floor")
        assert exe is not None
        out = subprocess.run([exe, "unix-direct" if opts.transport == "ipc" else "tcp-direct",
                              str(opts.duration)], capture_output=True, text=True,
                             timeout=opts.duration + 30).stdout
        r = json.loads(out)
        return r["msgs"] / r["secs"], 0.0
    where = endpoint(stack, opts)
    try:
        measure_binds = sc["measure"] == "pull"
        first_role = sc["measure"] if measure_binds else sc["peer"]
        first = subprocess.Popen(pinned(MEASURE_CORE if measure_binds else PEER_CORE,
                                        command(stack, first_role, where,
                                                sc["size"], opts)),
                                 stdout=subprocess.PIPE, text=True)
        procs.append(first)
        line = first.stdout.readline().split()        # type: ignore[union-attr]
        if len(line) != 2 or line[0] != "ready":
            raise RuntimeError(f"{stack}: no ready line from {first_role}")
        ep = line[1]
        others_role = sc["peer"] if measure_binds else sc["measure"]
        n_others = 1 if measure_binds else sc["peers"]
        others = [subprocess.Popen(pinned(PEER_CORE if measure_binds else MEASURE_CORE,
                                          command(stack, others_role, ep, sc["size"], opts)),
                                   stdout=subprocess.PIPE, text=True)
                  for _ in range(n_others)]
        procs.extend(others)
        measuring = [first] if measure_binds else others
        total = 0.0
        cpu = msgs = 0.0
        limit = time.monotonic() + opts.warmup + opts.duration + 30
        for p in measuring:
            out = p.stdout.readline()                  # type: ignore[union-attr]
            if not out or time.monotonic() > limit:
                raise RuntimeError(f"{stack}: a {sc['measure']} process gave no result")
            r = json.loads(out)
            total += r["msgs"] / r["secs"]
            cpu += r.get("cpu", 0.0)
            msgs += r["msgs"]
        if sc["size"] >= 1 << 20:
            total = total * sc["size"] / 1e6
        return total, cpu * 1e6 / max(msgs, 1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        if where.startswith("ipc://"):
            try:
                os.unlink(where[len("ipc://"):])
            except OSError:
                pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS),
                    help=f"comma-separated, from {', '.join(SCENARIOS)} (default: all)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per stack (median; default 3)")
    ap.add_argument("--duration", type=float, default=2.0, help="measured seconds per run")
    ap.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds first")
    ap.add_argument("--transport", choices=("tcp", "ipc"), default="tcp",
                    help="tcp on 127.0.0.1 (default) or ipc (unix sockets) for every stack")
    ap.add_argument("--json", help="also write the results to this file")
    # a role (used by the driver itself)
    ap.add_argument("--role", help=argparse.SUPPRESS)
    ap.add_argument("--endpoint", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, default=64, help=argparse.SUPPRESS)
    ap.add_argument("--stack", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="hybrid", help=argparse.SUPPRESS)
    opts = ap.parse_args()
    if opts.role:
        if opts.stack == "evpl":
            role_evpl(opts.role, opts.endpoint, opts.size, opts.warmup, opts.duration,
                      opts.mode)
        elif opts.stack == "pyzmq":
            role_pyzmq(opts.role, opts.endpoint, opts.size, opts.warmup, opts.duration)
        else:
            role_pyzmq_asyncio(opts.role, opts.endpoint, opts.size, opts.warmup,
                               opts.duration)
        return
    if (os.cpu_count() or 1) < 2:
        sys.exit("zmtp_bench needs at least 2 cores (sender and receiver pinned apart)")
    have_c = c_binary() is not None
    results: dict[str, dict[str, list[float]]] = {}
    cpus: dict[str, dict[str, list[float]]] = {}
    names = [s for s in opts.scenarios.split(",") if s]
    for name in names:
        if name not in SCENARIOS:
            sys.exit(f"unknown scenario {name!r}; one of {', '.join(SCENARIOS)}")
    for name in names:
        sc = SCENARIOS[name]
        stacks = [s for s in sc["stacks"] if (s != "libzmq-c" or have_c)
                  and (s != "c-floor" or c_binary("pingpong_floor"))]
        results[name] = {s: [] for s in stacks}
        cpus[name] = {s: [] for s in stacks}
        for rep in range(opts.repeat):
            for st in stacks:
                try:
                    rate, us = run_once(st, sc, opts)
                    results[name][st].append(rate)
                    cpus[name][st].append(us)
                except RuntimeError as exc:
                    print(f"  {name}/{st} run {rep + 1} failed: {exc}", file=sys.stderr)
        print(f"\n{name} ({sc['unit']}; {opts.transport}; median of {opts.repeat}; "
              f"{sc['size']} B messages{'; 8 subscribers' if name == 'pubsub' else ''})")
        med = {s: statistics.median(v) for s, v in results[name].items() if v}
        base = med.get("pyzmq")
        cref = med.get("libzmq-c")
        for st, v in med.items():
            runs = ", ".join(f"{x:,.0f}" for x in results[name][st])
            r1 = f"{v / base:5.2f}x pyzmq" if base else ""
            r2 = f"{v / cref:5.2f}x libzmq-C" if cref else ""
            us = statistics.median(cpus[name][st])
            cpu = f"{us:8.2f} us CPU/msg ({sc['measure']})" if st != "c-floor" else " " * 23
            print(f"  {st:14s} {v:14,.0f}   {r1}  {r2}   {cpu}   [{runs}]")
        if not have_c:
            print("  libzmq-c: skipped (needs gcc and libzmq3-dev)")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump({"rates": results, "cpu_us_per_msg": cpus}, f, indent=1)


if __name__ == "__main__":
    main()
