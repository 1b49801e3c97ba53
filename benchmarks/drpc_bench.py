"""drpc benchmark: small-RPC rate, round-trip latency and large-message
throughput of evpl.drpc against the stacks a Python user would otherwise
pick, in the same run.

Stacks (each a server process and a client process of this file):

* ``drpc-udp``, ``drpc-uring``: evpl.drpc over ``udp`` / ``io_uring_udp``
  (1472-byte datagrams, the default; ``drpc-udp-64k``: 65507-byte datagrams,
  for loopback or jumbo-frame paths, large loads only);
* ``rpc2-tcp``, ``rpc2-udp``: evpl.rpc2 (ONC RPC) over TCP / UDP, a raw
  procedure returning the same bytes;
* ``asyncio-udp``, ``uvloop-udp``: a DatagramProtocol request-response pair
  written in its fastest idiomatic form (a 4-byte id; a request unanswered
  for 50 ms is replaced, nothing more: no sessions, no flow control);
* ``evpl-udp``: the same pair on evpl's own udp Binds (``on_datagrams``,
  the id sent as a ``header=``): what drpc's sessions, flow control and
  loss recovery cost over evpl's datagrams with Python at both ends;
* ``grpc``: grpcio's asyncio API, unary calls of raw bytes (no protobuf),
  the same concurrency as everyone else (one task per call in flight).

``--veth``: server and client in two network namespaces joined by a veth
pair (made for the run, removed after), to compare ``drpc-udp`` and
``drpc-uring`` with ``drpc-xdp`` (both ends on ``xdp_udp``: AF_XDP in copy
mode, veth has no zero-copy); ratios are then to ``drpc-udp``.

``--c-limit``: also run benchmarks/c/udp_limit.c (built into
benchmarks/build/), C moving bulk data over loopback UDP with the same
pinning: 64 KB datagrams, with and without a copy into a message buffer
(drpc's reassembly), and 1472-byte datagrams with and without GSO/GRO. It
is the ceiling for the ``large`` load over UDP on this machine. With the
``latency`` load it also runs benchmarks/c/pingpong_floor.c: two C
processes bouncing 64 bytes over loopback ``tcp`` and ``udp`` with a
zero-timeout ``epoll_wait`` spin and one recv and one send each way, and
``tcp-direct``/``udp-direct``, whose spin is the ``recv`` itself (what
evpl's polling loop does for the socket that received last): the kernel's
floor for a round trip, with no RPC and no Python.

Loads: ``small`` (32-byte request and response, ``--depth`` calls in flight,
default 8), ``latency`` (one call in flight; both loops in poll mode where
the stack has one: ``poll_mode="always"``), ``large`` (a 32-byte request,
an 8 MiB response, one call in flight), ``upload`` (an 8 MiB request, a
32-byte response, one call in flight).

As benchmarks/run.py: server pinned to core 0, client to core 1
(``taskset``), a fresh server per measurement, repetitions interleaved,
medians, and every number as a ratio to ``rpc2-tcp`` measured in the same
run. Wrap runs in ``flock /tmp/evpl-bench.lock``::

    flock /tmp/evpl-bench.lock python benchmarks/drpc_bench.py
    python benchmarks/drpc_bench.py --loads small --stacks drpc-udp,rpc2-tcp,grpc --repeat 5
    python benchmarks/drpc_bench.py --veth --stacks drpc-udp,drpc-xdp --loads small,latency
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as _run  # (builds the C programs of c/)

HERE = Path(__file__).resolve()
SERVER_CORE, CLIENT_CORE = 0, 1
SMALL = 32
LARGE = 8 << 20
PROG, VERS, PROC = 0x20000999, 1, 1

STACKS = ["drpc-udp", "drpc-uring", "drpc-udp-64k", "drpc-xdp", "rpc2-tcp", "rpc2-udp",
          "asyncio-udp", "uvloop-udp", "evpl-udp", "grpc"]
# --veth: the namespaces, interfaces and addresses of the two sides
VETH_NS = {"server": "evx-drpcb-a", "client": "evx-drpcb-b"}
VETH_IF = {"server": "evx-drpcb-a", "client": "evx-drpcb-b"}
VETH_IP = {"server": "10.252.0.1", "client": "10.252.0.2"}
VETH_STACKS = ["drpc-udp", "drpc-uring", "drpc-xdp", "rpc2-tcp", "rpc2-udp"]
# where this process binds and which interface it uses (set from the options)
HOST = {"server": "127.0.0.1", "client": "127.0.0.1"}
IFACE: dict[str, str] = {}
# drpc's credits on both ends (--credits; None: the defaults, 128 capped by
# the server's receive buffer)
DRPC: dict[str, int] = {}
LOADS = ["small", "latency", "large", "upload"]
# which stacks make sense for which load
SKIP = {("drpc-udp-64k", "small"), ("drpc-udp-64k", "latency"),
        ("asyncio-udp", "large"), ("uvloop-udp", "large"), ("rpc2-udp", "large"),
        ("asyncio-udp", "upload"), ("uvloop-udp", "upload"), ("rpc2-udp", "upload"),
        ("evpl-udp", "large"), ("evpl-udp", "upload")}
BASELINE = "rpc2-tcp"


def _length(results: Any) -> int:
    return len(results)


def response_for(load: str) -> bytes:
    return bytes((i * 7) & 0xFF for i in range(LARGE)) if load == "large" else b"r" * SMALL


# ----------------------------------------------------------------- servers

def _drpc_backend(stack: str) -> str:
    return {"drpc-uring": "io_uring_udp", "drpc-xdp": "xdp_udp"}.get(stack, "udp")


def serve(stack: str, load: str, poll: bool) -> None:
    """Run the server of ``stack``; print ``ready PORT``; run until killed."""
    resp = response_for(load)
    if stack.startswith("drpc") or stack.startswith("rpc2"):
        import evpl

        loop = evpl.Loop(poll_mode="always" if poll else "hybrid")
        if stack.startswith("drpc"):
            from evpl.drpc import Server

            backend = _drpc_backend(stack)
            dgram = 65507 if stack.endswith("64k") else 1472
            xdp = {"interface": IFACE["server"]} if backend == "xdp_udp" else {}
            server = Server(loop, backend, (HOST["server"], 0), max_datagram=dgram, **xdp,
                            **DRPC)
            server.register(1, lambda req: resp)
            port = server.address[1]
        else:
            from evpl.rpc2 import Server as RpcServer

            rserver = RpcServer(loop, max_record=64 << 20)
            rserver.register(PROG, VERS, {PROC: lambda data: resp})
            if stack == "rpc2-tcp":
                port = rserver.listen("tcp", (HOST["server"], 0)).address[1]
            else:
                port = rserver.bind_udp((HOST["server"], 0)).local_address[1]
        print(f"ready {port}", flush=True)
        loop.run()
        return
    if stack == "evpl-udp":
        import evpl

        eloop = evpl.Loop(poll_mode="always" if poll else "hybrid")

        class EvplEcho(evpl.Handler):
            def on_datagrams(self, bind: Any, datagrams: list[tuple[Any, Any]]) -> None:
                for buf, addr in datagrams:
                    bind.sendto(resp, addr, header=buf[:4])

        ebind = eloop.bind("udp", (HOST["server"], 0), EvplEcho())
        print(f"ready {ebind.local_address[1]}", flush=True)
        eloop.run()
        return
    if stack in ("asyncio-udp", "uvloop-udp"):
        if stack == "uvloop-udp":
            import uvloop

            uvloop.install()

        class Echo(asyncio.DatagramProtocol):
            def connection_made(self, transport: Any) -> None:
                self.transport = transport

            def datagram_received(self, data: bytes, addr: Any) -> None:
                self.transport.sendto(data[:4] + resp, addr)

        async def main() -> None:
            loop = asyncio.get_running_loop()
            transport, _ = await loop.create_datagram_endpoint(
                Echo, local_addr=("127.0.0.1", 0))
            print(f"ready {transport.get_extra_info('sockname')[1]}", flush=True)
            await asyncio.Event().wait()

        asyncio.run(main())
        return
    if stack == "grpc":
        import grpc

        async def handler(request: bytes, context: Any) -> bytes:
            return resp

        async def gmain() -> None:
            server = grpc.aio.server(options=[("grpc.max_send_message_length", 64 << 20),
                                              ("grpc.max_receive_message_length", 64 << 20)])
            server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
                "bench.Bench", {"Call": grpc.unary_unary_rpc_method_handler(handler)})])
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            print(f"ready {port}", flush=True)
            await server.wait_for_termination()

        asyncio.run(gmain())
        return
    raise SystemExit(f"unknown stack {stack}")


# ----------------------------------------------------------------- clients

class Meter:
    """Counts completions in the measured window and their latencies."""

    def __init__(self, warmup: float, duration: float) -> None:
        self.start = time.perf_counter() + warmup
        self.end = self.start + duration
        self.count = 0
        self.bytes = 0
        self.lat: list[float] = []

    def done(self, t0: float, nbytes: int) -> bool:
        """Record a completion that started at ``t0``; False once the run is over."""
        now = time.perf_counter()
        if now >= self.end:
            return False
        if t0 >= self.start:
            self.count += 1
            self.bytes += nbytes
            self.lat.append(now - t0)
        return True

    def result(self) -> dict[str, Any]:
        lat = sorted(self.lat) or [0.0]
        return {"calls_per_s": self.count / (self.end - self.start),
                "gbit_per_s": self.bytes * 8 / (self.end - self.start) / 1e9,
                "p50_us": lat[len(lat) // 2] * 1e6, "p99_us": lat[int(len(lat) * 0.99)] * 1e6}


def client(stack: str, load: str, port: int, depth: int, warmup: float, duration: float,
           poll: bool) -> dict[str, Any]:
    expect = len(response_for(load))
    # what one call moves: the response, or for ``upload`` the request
    counted = LARGE if load == "upload" else expect
    meter = Meter(warmup, duration)
    payload = response_for("large") if load == "upload" else b"q" * SMALL
    clock = time.perf_counter
    if stack.startswith("drpc") or stack.startswith("rpc2"):
        import evpl

        loop = evpl.Loop(poll_mode="always" if poll else "hybrid")
        finished = []
        if stack.startswith("drpc"):
            from evpl.drpc import Client

            backend = _drpc_backend(stack)
            dgram = 65507 if stack.endswith("64k") else 1472
            xdp = ({"interface": IFACE["client"], "local_address": (HOST["client"], 0)}
                   if backend == "xdp_udp" else {})
            c = Client(loop, backend, (HOST["server"], port), window=max(8, depth), **DRPC,
                       max_datagram=dgram, **xdp)
            call = c.call

            def issue() -> None:
                t0 = clock()

                def cb(resp: Any, err: Any) -> None:
                    if err is not None or len(resp) != expect:
                        finished.append(f"bad response {err!r}")
                    elif meter.done(t0, counted):
                        issue()
                    elif not finished:
                        finished.append(None)
                call(1, payload, cb)
        else:
            from evpl.rpc2 import Client as RpcClient

            c = RpcClient(loop, "tcp" if stack == "rpc2-tcp" else "udp", (HOST["server"], port),
                          max_record=64 << 20)
            call = c.call

            def issue() -> None:
                t0 = clock()

                def cb(rpc: Any) -> None:
                    try:
                        n = rpc.result()
                    except Exception as exc:
                        finished.append(repr(exc))
                        return
                    if n != expect:
                        finished.append(f"bad response length {n}")
                    elif meter.done(t0, counted):
                        issue()
                    elif not finished:
                        finished.append(None)
                call(PROG, VERS, PROC, payload, _length).add_done_callback(cb)
        for _ in range(depth):
            issue()
        loop.run_until(lambda: finished, timeout=warmup + duration + 30)
        if finished[0] is not None:
            raise SystemExit(finished[0])
        out = meter.result()
        if stack.startswith("drpc"):
            st = c.stats()          # what the wall clock alone does not say
            out["retransmits"] = st["retransmits"]
            out["rate_gbps"] = st["rate_bps"] / 1e9
        out["loop_sleeps"] = loop.stats()["sleeps"]     # the client's hybrid loop
        return out
    if stack in ("asyncio-udp", "uvloop-udp"):
        if stack == "uvloop-udp":
            import uvloop

            uvloop.install()
        return asyncio.run(_udp_client(port, depth, meter, payload, expect))
    if stack == "evpl-udp":
        return _evpl_udp_client(port, depth, meter, payload, expect, poll)
    if stack == "grpc":
        return asyncio.run(_grpc_client(port, depth, meter, payload, expect, counted))
    raise SystemExit(f"unknown stack {stack}")


async def _udp_client(port: int, depth: int, meter: Meter, payload: bytes,
                      expect: int) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    started: dict[int, float] = {}
    seq = [0]
    clock = time.perf_counter

    class Proto(asyncio.DatagramProtocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport

        def send(self) -> None:
            seq[0] += 1
            n = seq[0] & 0xFFFFFFFF
            started[n] = clock()
            self.transport.sendto(n.to_bytes(4, "big") + payload)

        def resend_lost(self) -> None:
            """UDP loses datagrams: a request unanswered for 50 ms is
            replaced by a new one, so the depth holds."""
            old = clock() - 0.05
            for n in [n for n, t0 in started.items() if t0 < old]:
                del started[n]
                self.send()
            if not done.done():
                loop.call_later(0.01, self.resend_lost)

        def datagram_received(self, data: bytes, addr: Any) -> None:
            t0 = started.pop(int.from_bytes(data[:4], "big"), None)
            if t0 is None or len(data) - 4 != expect:
                return
            if meter.done(t0, expect):
                self.send()
            elif not done.done():
                done.set_result(None)

    transport, proto = await loop.create_datagram_endpoint(
        Proto, remote_addr=("127.0.0.1", port))
    for _ in range(depth):
        proto.send()
    proto.resend_lost()
    await asyncio.wait_for(done, meter.end - time.perf_counter() + 30)
    transport.close()
    return meter.result()


def _evpl_udp_client(port: int, depth: int, meter: Meter, payload: bytes, expect: int,
                     poll: bool) -> dict[str, Any]:
    """``_udp_client`` on evpl: a connected udp Bind, one callback per read
    batch, the request id sent as a header in front of the payload."""
    import evpl

    loop = evpl.Loop(poll_mode="always" if poll else "hybrid")
    started: dict[int, float] = {}
    seq = [0]
    finished: list[None] = []
    clock = time.perf_counter

    def send() -> None:
        seq[0] += 1
        n = seq[0] & 0xFFFFFFFF
        started[n] = clock()
        bind.send(payload, header=n.to_bytes(4, "big"))

    def resend_lost() -> None:
        """As _udp_client: a request unanswered for 50 ms is replaced."""
        old = clock() - 0.05
        for n in [n for n, t0 in started.items() if t0 < old]:
            del started[n]
            send()

    class Client(evpl.Handler):
        def on_datagrams(self, bind: Any, datagrams: list[tuple[Any, Any]]) -> None:
            for buf, _addr in datagrams:
                t0 = started.pop(int.from_bytes(buf[:4], "big"), None)
                if t0 is None or len(buf) - 4 != expect:
                    continue
                if meter.done(t0, expect):
                    send()
                elif not finished:
                    finished.append(None)

    bind = loop.connect("udp", (HOST["server"], port), Client())
    for _ in range(depth):
        send()
    ticker = loop.call_every(0.01, resend_lost)
    loop.run_until(lambda: finished, timeout=meter.end - time.perf_counter() + 30)
    ticker.cancel()
    out = meter.result()
    out["loop_sleeps"] = loop.stats()["sleeps"]
    return out


async def _grpc_client(port: int, depth: int, meter: Meter, payload: bytes,
                       expect: int, counted: int) -> dict[str, Any]:
    import grpc

    async with grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", 64 << 20),
                                          ("grpc.max_send_message_length", 64 << 20)]
    ) as channel:
        call = channel.unary_unary("/bench.Bench/Call")
        clock = time.perf_counter

        async def worker() -> None:
            while True:
                t0 = clock()
                resp = await call(payload)
                if len(resp) != expect:
                    raise SystemExit(f"bad response length {len(resp)}")
                if not meter.done(t0, counted):
                    return

        await asyncio.gather(*(worker() for _ in range(depth)))
    return meter.result()


# ----------------------------------------------------------------- driver

VETH = False


def _netns(role: str) -> list[str]:
    return ["ip", "netns", "exec", VETH_NS[role]] if VETH else []


def veth_setup() -> None:
    """The two namespaces and the veth pair between them (fresh)."""
    veth_teardown()
    for role in ("server", "client"):
        subprocess.run(["ip", "netns", "add", VETH_NS[role]], check=True, timeout=30)
    subprocess.run(["ip", "link", "add", VETH_IF["server"], "netns", VETH_NS["server"], "type",
                    "veth", "peer", "name", VETH_IF["client"], "netns", VETH_NS["client"]],
                   check=True, timeout=30)
    for role in ("server", "client"):
        ns = VETH_NS[role]
        for argv in (["addr", "add", f"{VETH_IP[role]}/24", "dev", VETH_IF[role]],
                     ["link", "set", VETH_IF[role], "up"], ["link", "set", "lo", "up"]):
            subprocess.run(["ip", "-n", ns, *argv], check=True, timeout=30)


def veth_teardown() -> None:
    for ns in VETH_NS.values():
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def measure(stack: str, load: str, depth: int, warmup: float, duration: float,
            poll: bool) -> dict[str, Any]:
    """One measurement: a fresh server on core 0, the client on core 1."""
    cmd = [sys.executable, str(HERE), "--role", "server", "--stacks", stack, "--loads", load]
    if poll:
        cmd.append("--poll")
    if VETH:
        cmd.append("--veth")
    if DRPC:
        cmd += ["--credits", str(DRPC["credits"])]
    server = subprocess.Popen([*_netns("server"), "taskset", "-c", str(SERVER_CORE), *cmd],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        if not line.startswith("ready "):
            err = server.stderr.read() if server.stderr else ""
            return {"error": f"server did not start: {line.strip()} {err.strip()[-300:]}"}
        port = int(line.split()[1])
        ccmd = [sys.executable, str(HERE), "--role", "client", "--stacks", stack, "--loads",
                load, "--port", str(port), "--depth", str(depth), "--warmup", str(warmup),
                "--duration", str(duration)]
        if poll:
            ccmd.append("--poll")
        if VETH:
            ccmd.append("--veth")
        if DRPC:
            ccmd += ["--credits", str(DRPC["credits"])]
        res = subprocess.run([*_netns("client"), "taskset", "-c", str(CLIENT_CORE), *ccmd],
                             capture_output=True,
                             text=True, timeout=warmup + duration + 120)
        if res.returncode != 0:
            return {"error": (res.stderr.strip() or res.stdout.strip())[-300:]}
        return json.loads(res.stdout.strip().splitlines()[-1])
    finally:
        server.kill()
        server.wait()


def run(stacks: list[str], loads: list[str], repeat: int, depth: int, warmup: float,
        duration: float) -> dict[str, dict[str, list[dict[str, Any]]]]:
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for r in range(repeat):
        for load in loads:
            for stack in stacks:
                if (stack, load) in SKIP:
                    continue
                d = 1 if load in ("latency", "large", "upload") else depth
                out = measure(stack, load, d, warmup, duration, load == "latency")
                results.setdefault(load, {}).setdefault(stack, []).append(out)
                print(f"  run {r + 1}/{repeat} {load:8} {stack:13} {_short(out)}", flush=True)
    return results


def _short(out: dict[str, Any]) -> str:
    if "error" in out:
        return "error: " + out["error"]
    return (f"{out['calls_per_s']:,.0f} calls/s  {out['gbit_per_s']:.2f} Gbit/s  "
            f"p50 {out['p50_us']:.0f} us  p99 {out['p99_us']:.0f} us" +
            (f"  retransmits {out['retransmits']}  rate {out['rate_gbps']:.1f} Gbit/s"
             if "retransmits" in out else "") +
            (f"  client sleeps {out['loop_sleeps']}" if "loop_sleeps" in out else ""))


def _ratios(med: dict[str, float], stack: str, higher: bool) -> Callable[[str], str]:
    def ratio(base: str) -> str:
        if base not in med or stack not in med or not med[base] or not med[stack]:
            return ""
        r = med[stack] / med[base] if higher else med[base] / med[stack]
        return f"{r:.2f}x"
    return ratio


def table(results: dict[str, dict[str, list[dict[str, Any]]]], baseline: str = BASELINE) -> str:
    """A markdown table of medians, with ratios to ``baseline`` (and grpc)."""
    key: dict[str, tuple[str, str, Callable[[float], str], bool]] = {
        "small": ("calls_per_s", "calls/s", lambda v: f"{v:,.0f}", True),
        "latency": ("p50_us", "p50 round trip (us)", lambda v: f"{v:.1f}", False),
        "large": ("gbit_per_s", "Gbit/s (8 MiB responses)", lambda v: f"{v:.2f}", True),
        "upload": ("gbit_per_s", "Gbit/s (8 MiB requests)", lambda v: f"{v:.2f}", True),
    }
    lines = [f"| load | stack | median | spread | vs {baseline} | vs grpc |",
             "| --- | --- | --- | --- | --- | --- |"]
    for load, per_stack in results.items():
        field, unit, fmt, higher = key[load]
        med: dict[str, float] = {}
        spread: dict[str, str] = {}
        for stack, outs in per_stack.items():
            vals = [o[field] for o in outs if "error" not in o]
            if vals:
                m = statistics.median(vals)
                med[stack] = m
                spread[stack] = f"±{(max(vals) - min(vals)) / 2 / m * 100:.0f}%" if m else ""
        for stack in per_stack:
            ratio = _ratios(med, stack, higher)
            if stack not in med:
                err = next(o["error"] for o in per_stack[stack] if "error" in o)
                lines.append(f"| {load} | {stack} | failed: {err[:60]} | | | |")
                continue

            lines.append(f"| {load} | {stack} | {fmt(med[stack])} {unit} | {spread[stack]} | "
                         f"{ratio(baseline)} | {ratio('grpc')} |")
    return "\n".join(lines)


def _median_table(head: str, unit: str, runs: dict[str, list[float]]) -> str:
    """A markdown table of each configuration's median and its runs."""
    lines = [f"| {head} | median {unit} | runs |", "| --- | --- | --- |"]
    for name, vals in runs.items():
        lines.append(f"| {name} | {statistics.median(vals):.2f} | "
                     f"{', '.join(f'{v:.1f}' for v in vals)} |")
    return "\n".join(lines)


def c_limit(repeat: int, duration: float, loads: list[str]) -> str:
    """Build and run the C limits for ``loads`` (udp_limit.c for ``large``,
    pingpong_floor.c for ``latency``); markdown tables of medians."""
    _run.build(False, ("udp_limit", "pingpong_floor"))
    tables = []
    if "large" in loads:
        configs = [["65507"], ["65507", "copy"], ["1472"], ["1472", "gso"],
                   ["1472", "copy", "gso"]]
        runs: dict[str, list[float]] = {}
        for r in range(repeat):
            for cfg in configs:
                out = subprocess.run([str(_run.BUILD / "udp_limit"), cfg[0], str(duration),
                                      *cfg[1:]], capture_output=True, text=True,
                                     timeout=duration + 30, check=True).stdout.strip()
                print(f"  run {r + 1}/{repeat} C udp_limit {out}", flush=True)
                runs.setdefault(" ".join(cfg), []).append(float(out.split(": ")[1].split()[0]))
        tables.append(_median_table("C over loopback UDP (udp_limit.c)", "Gbit/s", runs))
    if "latency" in loads:
        rts: dict[str, list[float]] = {}
        for r in range(repeat):
            for mode in ("tcp", "tcp-direct", "udp", "udp-direct"):
                out = json.loads(subprocess.run([str(_run.BUILD / "pingpong_floor"), mode,
                                                 str(duration)], capture_output=True, text=True,
                                                timeout=duration + 30, check=True).stdout)
                rt = out["secs"] / out["msgs"] * 1e6
                print(f"  run {r + 1}/{repeat} C pingpong_floor {mode}: {rt:.2f} us", flush=True)
                rts.setdefault(mode, []).append(rt)
        tables.append(_median_table("C ping-pong floor (pingpong_floor.c)",
                                    "mean round trip (us)", rts))
    return "\n\n".join(tables)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Ratios: higher is better for drpc (for latency: "
                                        "rpc2-tcp's p50 divided by the stack's).")
    ap.add_argument("--stacks", default=",".join(STACKS), help="comma-separated, of: "
                    + ", ".join(STACKS))
    ap.add_argument("--loads", default=",".join(LOADS), help="comma-separated, of: "
                    + ", ".join(LOADS))
    ap.add_argument("--repeat", type=int, default=3, help="runs per stack and load (median)")
    ap.add_argument("--depth", type=int, default=8, help="calls in flight (small load)")
    ap.add_argument("--warmup", type=float, default=0.5)
    ap.add_argument("--duration", type=float, default=2.0)
    ap.add_argument("--markdown", default=None, help="also write the table here")
    ap.add_argument("--c-limit", action="store_true",
                    help="also measure the C limits over loopback: udp_limit.c (the ceiling "
                         "for the large load) and pingpong_floor.c (the kernel's floor for "
                         "the latency load)")
    ap.add_argument("--veth", action="store_true",
                    help="server and client in two network namespaces joined by a veth pair "
                         "(root; needed by drpc-xdp); ratios to drpc-udp")
    ap.add_argument("--credits", type=int, default=None,
                    help="drpc's session credits on both ends (default: drpc's 128, "
                         "capped by what the server's receive buffer holds)")
    ap.add_argument("--role", choices=["driver", "server", "client"], default="driver",
                    help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--poll", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    stacks = args.stacks.split(",")
    loads = args.loads.split(",")
    for s in stacks:
        if s not in STACKS:
            ap.error(f"unknown stack {s!r}")
    for ld in loads:
        if ld not in LOADS:
            ap.error(f"unknown load {ld!r}")
    global VETH
    VETH = args.veth
    if args.credits is not None:
        DRPC["credits"] = args.credits
    if VETH:
        HOST.update(VETH_IP)
        IFACE.update(VETH_IF)
        other = [s for s in stacks if s not in VETH_STACKS]
        if other:
            ap.error(f"--veth runs {', '.join(VETH_STACKS)} only, not {', '.join(other)}")
    elif "drpc-xdp" in stacks:
        ap.error("drpc-xdp needs --veth (AF_XDP needs an interface, not loopback)")
    if args.role == "server":
        serve(stacks[0], loads[0], args.poll)
        return
    if args.role == "client":
        out = client(stacks[0], loads[0], args.port, args.depth, args.warmup, args.duration,
                     args.poll)
        print(json.dumps(out), flush=True)
        return
    if (os.cpu_count() or 1) < 2:
        raise SystemExit("needs at least 2 cores (server and client are pinned apart)")
    print(f"drpc benchmark: {args.repeat} runs of {args.duration} s (+{args.warmup} s warm-up), "
          f"small-load depth {args.depth}; server on core {SERVER_CORE}, client on core "
          f"{CLIENT_CORE}", flush=True)
    if VETH:
        veth_setup()
    try:
        results = run(stacks, loads, args.repeat, args.depth, args.warmup, args.duration)
    finally:
        if VETH:
            veth_teardown()
    md = table(results, "drpc-udp" if VETH else BASELINE)
    if args.c_limit:
        md += "\n\n" + c_limit(args.repeat, args.duration, loads)
    print(md)
    if args.markdown:
        Path(args.markdown).write_text(md + "\n")


if __name__ == "__main__":
    main()
