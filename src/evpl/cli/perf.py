"""``evpl perf``: measure every available backend on loopback, side by side.

With no arguments it starts a perf server (another process, pinned to one
core) in event mode and in poll mode, and runs three loads from this process
(pinned to another core) over every available backend:

- ping-pong: one connection, one small message in flight: round trips/s and
  latency percentiles;
- rate: many connections with pipelined small messages, one Python callback
  per message on both ends: messages/s;
- bulk: one connection streaming large messages to a sink: Gbit/s.

``evpl perf server`` and ``evpl perf client HOST`` run the two ends apart.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import evpl

LOADS = ("pingpong", "rate", "bulk")
MODES = ("event", "poll")
_POLL_MODE: dict[str, Literal["event", "always"]] = {"event": "event", "poll": "always"}
_FRAMING = evpl.framing.length_prefix(4, "big")


# ---------------------------------------------------------------- server side


class _Echo(evpl.Handler):
    """Echo every message back (zero-copy: the received Buffer is sent)."""

    def on_message(self, bind: evpl.Bind, msg: evpl.Buffer) -> None:
        bind.send(msg)

    def on_datagram(self, bind: evpl.Bind, data: evpl.Buffer, addr: Any) -> None:
        bind.sendto(data, addr)


class _Sink(evpl.Handler):
    """Count payload bytes; an empty message asks for the count (8 bytes)."""

    def __init__(self) -> None:
        self.received = 0

    def on_message(self, bind: evpl.Bind, msg: evpl.Buffer) -> None:
        n = len(msg)
        if n:
            self.received += n
        else:
            bind.send(self.received.to_bytes(8, "big"))


@dataclass
class ServerAddresses:
    """Where a perf server listens, per backend and load."""

    echo: dict[str, Any] = field(default_factory=dict)
    sink: dict[str, Any] = field(default_factory=dict)


def _serve(loop: evpl.Loop, host: str, port: int, unix_dir: str | None,
           only: set[str] | None = None) -> ServerAddresses:
    """Listen on every available backend (or those in ``only``). With a fixed
    port only the first inet backend of each kind can have it."""
    addrs = ServerAddresses()
    taken: set[str] = set()
    for b in evpl.backends():
        if not b.available or (only is not None and b.name not in only):
            continue
        if "xdp" in b.capabilities:
            continue        # needs an interface's own address: benchmarks/xdp_bench.py
        if port and "inet" in b.capabilities:
            if b.kind in taken:
                continue
            taken.add(b.kind)
        if "local" in b.capabilities:
            if unix_dir is None:
                continue
            echo_addr: Any = os.path.join(unix_dir, f"{b.name}-echo.sock")
            sink_addr: Any = os.path.join(unix_dir, f"{b.name}-sink.sock")
        else:
            echo_addr, sink_addr = (host, port), (host, port + 1 if port else 0)
        if b.kind == "stream":
            li = loop.listen(b.name, echo_addr, _Echo(), framing=_FRAMING,
                             high_water=8 << 20)
            addrs.echo[b.name] = li.address
            li = loop.listen(b.name, sink_addr, _Sink, framing=_FRAMING)
            addrs.sink[b.name] = li.address
        else:
            bd = loop.bind(b.name, echo_addr, _Echo())
            addrs.echo[b.name] = bd.local_address
    return addrs


def run_server(args: argparse.Namespace) -> int:
    """``evpl perf server``: serve every backend until interrupted."""
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    loop = evpl.Loop(poll_mode=_POLL_MODE[args.poll])
    only = set(args.backend.split(",")) if args.backend else None
    addrs = _serve(loop, args.host, args.port, args.unix_dir, only)
    print(json.dumps({"pid": os.getpid(), **asdict(addrs)}), flush=True)
    if not args.quiet:
        print(f"evpl perf server ({args.poll} mode) listening: {addrs.echo}", file=sys.stderr)
    try:
        loop.run()
    except KeyboardInterrupt:
        pass
    finally:
        loop.close()
    return 0


# ---------------------------------------------------------------- client side


@dataclass
class Result:
    """One measurement."""

    backend: str
    mode: str
    load: str
    value: float
    unit: str
    p50_us: float | None = None
    p99_us: float | None = None
    server_cpu_us: float | None = None
    ops: int = 0
    error: str | None = None


class _Run:
    """Shared bookkeeping of one timed load."""

    def __init__(self, loop: evpl.Loop, duration: float) -> None:
        self.loop = loop
        self.duration = duration
        self.ops = 0
        self.start_ops = 0
        self.t0 = 0
        self.t1 = 0
        self.measuring = False
        self.done = False
        self.error: BaseException | None = None

    def begin(self, warmup: float) -> None:
        self.loop.call_later(warmup, self._start)

    def _start(self) -> None:
        self.measuring = True
        self.start_ops = self.ops
        self.t0 = self.loop.now_ns()
        self.loop.call_later(self.duration, self._stop)

    def _stop(self) -> None:
        self.t1 = self.loop.now_ns()
        self.measuring = False
        self.done = True

    def rate(self) -> float:
        return (self.ops - self.start_ops) / max((self.t1 - self.t0) / 1e9, 1e-9)

    def fail(self, bind: evpl.Bind, error: BaseException | None) -> None:
        if not self.done and error is not None:
            self.error = error
            self.done = True


class _PingPong(evpl.Handler):
    def __init__(self, run: _Run, payload: bytes, datagram_to: Any = None) -> None:
        self.run = run
        self.payload = payload
        self.to = datagram_to
        self.sent_at = 0
        self.samples: list[int] = []

    def _send(self, bind: evpl.Bind) -> None:
        self.sent_at = self.run.loop.now_ns()
        if self.to is None:
            bind.send(self.payload)
        else:
            bind.sendto(self.payload, self.to)

    def on_connected(self, bind: evpl.Bind) -> None:
        self._send(bind)

    def _reply(self, bind: evpl.Bind) -> None:
        run = self.run
        if run.measuring:
            self.samples.append(run.loop.now_ns() - self.sent_at)
        run.ops += 1
        if not run.done:
            self._send(bind)

    def on_message(self, bind: evpl.Bind, msg: evpl.Buffer) -> None:
        self._reply(bind)

    def on_datagram(self, bind: evpl.Bind, data: evpl.Buffer, addr: Any) -> None:
        self._reply(bind)

    def on_closed(self, bind: evpl.Bind, error: evpl.EvplError | None) -> None:
        self.run.fail(bind, error)


class _Pipeline(evpl.Handler):
    """Keep ``depth`` messages in flight; every reply sends the next one."""

    def __init__(self, run: _Run, payload: bytes, depth: int, datagram_to: Any = None) -> None:
        self.run = run
        self.payload = payload
        self.depth = depth
        self.to = datagram_to
        self.seen = 0

    def on_connected(self, bind: evpl.Bind) -> None:
        for _ in range(self.depth):
            if self.to is None:
                bind.send(self.payload)
            else:
                bind.sendto(self.payload, self.to)

    def on_message(self, bind: evpl.Bind, msg: evpl.Buffer) -> None:
        self.run.ops += 1
        if not self.run.done:
            bind.send(self.payload)

    def on_datagram(self, bind: evpl.Bind, data: evpl.Buffer, addr: Any) -> None:
        self.run.ops += 1
        self.seen += 1
        if not self.run.done:
            bind.sendto(self.payload, self.to)

    def refill(self, bind: evpl.Bind, last_seen: int) -> int:
        """UDP can drop: if nothing came back since the last check, refill."""
        if self.seen == last_seen and not self.run.done and not bind.closed:
            for _ in range(self.depth):
                bind.sendto(self.payload, self.to)
        return self.seen

    def on_closed(self, bind: evpl.Bind, error: evpl.EvplError | None) -> None:
        self.run.fail(bind, error)


class _Bulk(evpl.Handler):
    """Stream large messages while the send queue has room."""

    def __init__(self, run: _Run, payload: bytes) -> None:
        self.run = run
        self.payload = payload
        self.total: int | None = None
        self.t_conn = 0
        self.t_done = 0

    def _pump(self, bind: evpl.Bind) -> None:
        while not bind.paused and not self.run.done:
            bind.send(self.payload)
        if self.run.done and self.total is None and not bind.closed:
            bind.send(b"")          # ask the sink how much it received
            self.total = -1

    def on_connected(self, bind: evpl.Bind) -> None:
        self.t_conn = self.run.loop.now_ns()
        self._pump(bind)

    def on_writable(self, bind: evpl.Bind) -> None:
        self._pump(bind)

    def on_message(self, bind: evpl.Bind, msg: evpl.Buffer) -> None:
        self.total = int.from_bytes(msg, "big")
        self.t_done = self.run.loop.now_ns()

    def on_closed(self, bind: evpl.Bind, error: evpl.EvplError | None) -> None:
        self.run.fail(bind, error)


def _cpu_seconds(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def _measure(backend: evpl.BackendInfo, mode: str, load: str, echo: Any, sink: Any,
             args: argparse.Namespace, server_pid: int | None) -> Result:
    loop = evpl.Loop(poll_mode=_POLL_MODE[mode])
    run = _Run(loop, args.duration)
    stream = backend.kind == "stream"
    payload = os.urandom(args.size)
    unit = {"pingpong": "rt/s", "rate": "msg/s", "bulk": "Gbit/s"}[load]
    result = Result(backend.name, mode, load, 0.0, unit)
    handlers: list[Any] = []
    binds: list[evpl.Bind] = []
    try:
        if load == "pingpong":
            h: Any = _PingPong(run, payload, None if stream else echo)
            handlers.append(h)
            if stream:
                binds.append(loop.connect(backend.name, echo, h, framing=_FRAMING))
            else:
                b = loop.bind(backend.name, ("0.0.0.0", 0), h)
                binds.append(b)
                h.on_connected(b)
        elif load == "rate":
            count = args.connections if stream else min(args.connections, 8)
            for _ in range(count):
                h = _Pipeline(run, payload, args.depth, None if stream else echo)
                handlers.append(h)
                if stream:
                    binds.append(loop.connect(backend.name, echo, h, framing=_FRAMING,
                                              high_water=4 << 20))
                else:
                    b = loop.bind(backend.name, ("0.0.0.0", 0), h)
                    binds.append(b)
                    h.on_connected(b)
            if not stream:
                marks = [0] * len(handlers)

                def refill() -> None:
                    for i, (hh, bb) in enumerate(zip(handlers, binds, strict=True)):
                        marks[i] = hh.refill(bb, marks[i])

                loop.call_every(0.05, refill)
        else:
            h = _Bulk(run, os.urandom(args.bulk_size))
            handlers.append(h)
            binds.append(loop.connect(backend.name, sink, h, framing=_FRAMING,
                                      high_water=8 << 20, hard_limit=64 << 20))
        cpu0 = 0.0
        started = False

        def measuring() -> bool:
            nonlocal cpu0, started
            if run.measuring and not started:
                started = True
                cpu0 = _cpu_seconds(server_pid) or 0.0
            return run.done

        run.begin(min(0.1, args.duration / 4))
        loop.run_until(measuring, timeout=args.duration + 10)
        cpu1 = _cpu_seconds(server_pid)
        if run.error is not None:
            raise run.error
        if load == "bulk":
            bulk = handlers[0]
            loop.run_until(lambda: bulk.total is not None and bulk.total >= 0, timeout=30)
            # everything the sink counted, from connect to its final answer
            result.value = bulk.total * 8 / ((bulk.t_done - bulk.t_conn) / 1e9) / 1e9
            result.ops = bulk.total
        else:
            result.value = run.rate()
            result.ops = run.ops - run.start_ops
        if load == "pingpong":
            samples = sorted(handlers[0].samples)
            if samples:
                result.p50_us = samples[len(samples) // 2] / 1000
                result.p99_us = samples[min(len(samples) - 1, int(len(samples) * 0.99))] / 1000
        if cpu1 is not None and result.ops and load != "bulk":
            result.server_cpu_us = (cpu1 - cpu0) * 1e6 / max(result.ops, 1)
    except (evpl.EvplError, OSError) as exc:
        result.error = str(exc)
    finally:
        loop.close()
    return result


def _start_server(mode: str, cpu: int | None, unix_dir: str) -> tuple[subprocess.Popen, dict]:
    os.makedirs(os.path.join(unix_dir, mode), exist_ok=True)
    cmd = [sys.executable, "-m", "evpl.cli", "perf", "server", "--quiet", "--port", "0",
           "--poll", mode, "--unix-dir", os.path.join(unix_dir, mode)]
    if cpu is not None:
        cmd += ["--cpu", str(cpu)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline() if proc.stdout else ""
    if not line:
        proc.kill()
        raise evpl.EvplError("the perf server did not start (see its error above)")
    info = json.loads(line)
    for table in (info["echo"], info["sink"]):   # JSON turned address tuples into lists
        for name, addr in table.items():
            table[name] = tuple(addr) if isinstance(addr, list) else addr
    return proc, info


def _stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _selected_backends(args: argparse.Namespace) -> list[evpl.BackendInfo]:
    wanted = set(args.backend.split(",")) if args.backend else None
    out = []
    for b in evpl.backends():
        if wanted is not None and b.name not in wanted:
            continue
        if not b.available:
            if wanted is not None:
                raise evpl.BackendUnavailable(f"{b.name}: {b.reason}")
            continue
        if "xdp" in b.capabilities:
            continue        # the perf server does not serve it (see _serve)
        out.append(b)
    if wanted:
        unknown = wanted - {b.name for b in evpl.backends()}
        if unknown:
            raise evpl.ConfigError(f"unknown backend(s): {', '.join(sorted(unknown))}")
    return out


def _plan(args: argparse.Namespace, backends: list[evpl.BackendInfo]) -> list[tuple]:
    loads = args.mode.split(",") if args.mode else list(LOADS)
    for load in loads:
        if load not in LOADS:
            raise evpl.ConfigError(f"unknown load {load!r} (choose from {', '.join(LOADS)})")
    modes = list(MODES) if args.poll == "both" else [args.poll]
    plan = []
    for mode in modes:
        for b in backends:
            for load in loads:
                if load == "bulk" and b.kind != "stream":
                    continue
                plan.append((mode, b, load))
    return plan


def _cpus(spec: str | None) -> tuple[int | None, int | None]:
    if spec == "none":
        return None, None
    if spec:
        try:
            server, client = (int(x) for x in spec.split(","))
        except ValueError:
            raise evpl.ConfigError(f"--cpu wants SERVER,CLIENT (e.g. 0,1), got {spec!r}") from None
        return server, client
    cpus = sorted(os.sched_getaffinity(0))
    return (cpus[0], cpus[1]) if len(cpus) >= 2 else (None, None)


def _format(r: Result) -> str:
    if r.error:
        return f"error: {r.error}"
    if r.unit == "Gbit/s":
        return f"{r.value:.1f} Gbit/s"
    for scale, suffix in ((1e6, "M"), (1e3, "k")):
        if r.value >= scale:
            return f"{r.value / scale:.2f}{suffix} {r.unit}"
    return f"{r.value:.0f} {r.unit}"


def _table(results: list[Result]) -> Any:
    from rich.table import Table

    table = Table(title="evpl perf (loopback; server and client on separate cores)",
                  caption="p50µs/p99µs: round-trip latency; srv µs: server CPU per op")
    for col in ("backend", "mode", "load", "result", "p50µs", "p99µs", "srv µs"):
        table.add_column(col, justify="right" if col not in ("backend", "mode", "load") else "left",
                         no_wrap=True)
    for r in results:
        table.add_row(r.backend, r.mode, r.load, _format(r),
                      f"{r.p50_us:.1f}" if r.p50_us is not None else "",
                      f"{r.p99_us:.1f}" if r.p99_us is not None else "",
                      f"{r.server_cpu_us:.2f}" if r.server_cpu_us is not None else "")
    return table


def run_local(args: argparse.Namespace) -> int:
    """``evpl perf``: start servers here and measure every backend."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    backends = _selected_backends(args)
    plan = _plan(args, backends)
    server_cpu, client_cpu = _cpus(args.cpu)
    if client_cpu is not None:
        os.sched_setaffinity(0, {client_cpu})
    console = Console(stderr=args.json)
    results: list[Result] = []
    unix_dir = tempfile.mkdtemp(prefix="evpl-perf-")
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), TimeRemainingColumn(),
                      console=console, transient=True, disable=args.json) as progress:
            task = progress.add_task("starting", total=len(plan))
            for mode in dict.fromkeys(m for m, _, _ in plan):
                proc, info = _start_server(mode, server_cpu, unix_dir)
                try:
                    for m, b, load in plan:
                        if m != mode:
                            continue
                        progress.update(task, description=f"{b.name:>8} {mode:<5} {load}")
                        results.append(_measure(b, mode, load, info["echo"].get(b.name),
                                                info["sink"].get(b.name), args, info["pid"]))
                        progress.advance(task)
                finally:
                    _stop_server(proc)
    finally:
        shutil.rmtree(unix_dir, ignore_errors=True)
    return _report(results, args, console)


def _report(results: list[Result], args: argparse.Namespace, console: Any) -> int:
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=2))
    else:
        console.print(_table(results))
    return 1 if any(r.error for r in results) else 0


def run_client(args: argparse.Namespace) -> int:
    """``evpl perf client HOST``: measure against a remote ``evpl perf server``."""
    from rich.console import Console

    backends = [b for b in _selected_backends(args) if "inet" in b.capabilities]
    plan = _plan(args, backends)
    _, client_cpu = _cpus(args.cpu if args.cpu else "none")
    if client_cpu is not None:
        os.sched_setaffinity(0, {client_cpu})
    results = []
    for mode, b, load in plan:
        echo = (args.host, args.port)
        results.append(_measure(b, mode, load, echo, (args.host, args.port + 1), args, None))
    return _report(results, args, Console(stderr=args.json))


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "perf", help="measure latency, message rate and throughput of every backend",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=run_local)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--backend", metavar="NAMES",
                        help="comma-separated backends (default: every available one)")
    common.add_argument("--mode", metavar="LOADS",
                        help=f"comma-separated loads: {', '.join(LOADS)} (default: all)")
    common.add_argument("--poll", nargs="?", const="poll", default="both",
                        choices=("event", "poll", "both"),
                        help="loop mode: event (sleep when idle), poll (spin), both "
                             "(default; '--poll' alone means poll)")
    common.add_argument("--size", type=int, default=64,
                        help="message size in bytes for ping-pong and rate (default 64)")
    common.add_argument("--bulk-size", type=int, default=1 << 20,
                        help="message size for bulk (default 1 MiB)")
    common.add_argument("--connections", type=int, default=32,
                        help="connections for the rate load (default 32; udp uses <= 8)")
    common.add_argument("--depth", type=int, default=16,
                        help="messages in flight per connection for rate (default 16)")
    common.add_argument("--duration", type=float, default=0.25,
                        help="seconds measured per backend/mode/load (default 0.25)")
    common.add_argument("--cpu", metavar="SERVER,CLIENT",
                        help="pin server and client to these CPUs (default: the first two "
                             "allowed; 'none' disables pinning)")
    common.add_argument("--json", action="store_true", help="print results as JSON")
    for a in common._actions:
        p._add_action(a)
    psub = p.add_subparsers(dest="role", metavar="ROLE")
    ps = psub.add_parser("server", help="run the perf server until interrupted",
                         description="Serve echo (PORT) and sink (PORT+1) on every backend.")
    ps.add_argument("--host", default="127.0.0.1", help="address to listen on")
    ps.add_argument("--port", type=int, default=7700, help="echo port; sink is PORT+1")
    ps.add_argument("--unix-dir", help="directory for unix-socket listeners (default: none)")
    ps.add_argument("--backend", metavar="NAMES",
                    help="comma-separated backends to serve (default: all available; with a "
                         "fixed --port the first inet stream and datagram backend)")
    ps.add_argument("--poll", default="event", choices=MODES, help="loop mode (default event)")
    ps.add_argument("--cpu", type=int, help="pin the server to this CPU")
    ps.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    ps.set_defaults(func=run_server)
    pc = psub.add_parser("client", parents=[common], help="run the loads against a perf server",
                         description="Run the perf loads against 'evpl perf server' on HOST.")
    pc.add_argument("host", help="the perf server's address")
    pc.add_argument("--port", type=int, default=7700, help="the server's echo port")
    pc.set_defaults(func=run_client)
