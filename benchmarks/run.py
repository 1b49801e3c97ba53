"""Benchmark driver: evpl against the stacks a user would otherwise pick.

Every load runs against every stack in the same invocation, interleaved
(repetition 1 of every stack, then repetition 2, ...) so that a noisy
neighbour hurts all stacks alike; results are medians and every number is
also given as a ratio to uvloop and to the C epoll server measured in the
same run.

The server is pinned to core 0 and the C load generator to core 1
(``taskset``). The load generator reads the server's utime+stime from /proc
over exactly the measured interval, which gives the server CPU per unit.

Run ``python benchmarks/run.py --help``; README.md beside this file explains
the loads and how to read the table.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BUILD = HERE / "build"
PYTHON = sys.executable
SERVER_CORE = "0"
CLIENT_CORE = "1"
SKIP_EXIT_CODE = 3  # servers exit with this when their stack is unavailable


# --------------------------------------------------------------------- loads
@dataclass(frozen=True)
class Load:
    """One traffic pattern: what the server does and what the client sends."""

    name: str
    title: str
    server_mode: str  # raw | framed | fixed | sink | udp
    loadgen: list[str]  # loadgen mode and its options
    unit: str  # what the headline number counts
    metric: str  # "rate" (units/s) or "gbit" (Gbit/s)
    latency: bool = False


LOADS: dict[str, Load] = {
    load.name: load
    for load in [
        Load("pingpong", "ping-pong cross-core, 1 conn, 64 B", "raw",
             ["pingpong", "--conns", "1", "--size", "64"], "RTT", "rate", latency=True),
        Load("framed", "32 conns x 16 pipelined 64 B msgs, per-message handler", "framed",
             ["pipeline", "--conns", "32", "--depth", "16", "--size", "64"], "msg", "rate",
             latency=True),
        Load("fixed", "32 conns x 16 pipelined fixed 64 B records, per-message handler",
             "fixed", ["pipeline", "--conns", "32", "--depth", "16", "--size", "64"], "msg",
             "rate", latency=True),
        Load("raw", "32 conns x 16 pipelined 64 B, raw byte echo", "raw",
             ["raw", "--conns", "32", "--depth", "16", "--size", "64"], "msg", "rate"),
        Load("bulk", "bulk 1 MiB writes into a sink, 1 conn", "sink",
             ["bulk", "--conns", "1", "--write-size", str(1 << 20)], "Gbit", "gbit"),
        Load("bulk-socat", "bulk as bulk, the client is socat (1 MiB blocks from /dev/zero)",
             "sink", ["socat"], "Gbit", "gbit"),
        Load("udp", "UDP echo, 8 sockets x 32 in flight, 64 B", "udp",
             ["udp", "--conns", "8", "--depth", "32", "--size", "64"], "datagram", "rate"),
        Load("udp-gso", "UDP echo as udp, client sends GSO trains and reads with UDP_GRO",
             "udp", ["udp", "--conns", "8", "--depth", "32", "--size", "64", "--gso", "--gro"],
             "datagram", "rate"),
    ]
}


# -------------------------------------------------------------------- stacks
@dataclass(frozen=True)
class Stack:
    """A server implementation and the loads it takes part in."""

    name: str
    kind: str  # "py", "evpl", "c", "iperf3"
    args: tuple[str, ...] = ()
    loads: tuple[str, ...] = tuple(LOADS)
    client_spin: bool = False  # load generator busy-polls too
    note: str = ""


STACKS: dict[str, Stack] = {
    s.name: s
    for s in [
        Stack("asyncio", "py", ("--stack", "asyncio")),
        Stack("uvloop", "py", ("--stack", "uvloop")),
        Stack("evpl", "evpl"),
        Stack("evpl-base", "evpl",
              note="evpl run by --evpl-base-python (an A/B baseline build); compare with evpl"),
        Stack("evpl-msg", "evpl", ("--per-message",), loads=("framed", "fixed"),
              note="on_message + send per message instead of on_messages batches"),
        Stack("evpl-poll", "evpl", ("--poll",), loads=("pingpong",), client_spin=True,
              note='poll_mode="always"; client spins too'),
        Stack("c", "c"),
        Stack("c-spin", "c", ("--spin",), loads=("pingpong",), client_spin=True,
              note="server and client busy-poll: the ping-pong limit"),
        Stack("iperf3", "iperf3", loads=("bulk",), note="iperf3 -l 1M"),
    ]
}


# ------------------------------------------------------------------- results
@dataclass
class Result:
    """All repetitions of one (load, stack) pair."""

    load: str
    stack: str
    runs: list[dict[str, Any]] = field(default_factory=list)
    skipped: str | None = None
    errors: list[str] = field(default_factory=list)

    def median(self, key: str) -> float | None:
        """Median of ``key`` over the successful runs, None if absent."""
        values = [r[key] for r in self.runs if r.get(key) is not None]
        return statistics.median(values) if values else None

    def spread(self, key: str) -> float | None:
        """(max - min) / median of ``key``: how noisy the repetitions were."""
        values = [r[key] for r in self.runs if r.get(key) is not None]
        med = statistics.median(values) if values else 0
        if len(values) < 2 or not med:
            return None
        return (max(values) - min(values)) / med


class SkipStack(Exception):
    """The stack cannot run on this machine (reason in the message)."""


# ------------------------------------------------------------------- helpers
def build(verbose: bool = True, names: tuple[str, ...] = ("loadgen", "echo_epoll")) -> None:
    """Compile the C programs ``names`` (c/NAME.c) into build/ when their
    sources are newer."""
    BUILD.mkdir(exist_ok=True)
    for name in names:
        src = HERE / "c" / f"{name}.c"
        out = BUILD / name
        header = HERE / "c" / "bench_common.h"  # shared by the C programs
        if out.exists() and all(out.stat().st_mtime >= f.stat().st_mtime for f in (src, header)):
            continue
        cmd = ["gcc", "-O2", "-Wall", "-Wextra", f"-I{HERE / 'c'}", "-o", str(out), str(src)]
        if verbose:
            print("building:", " ".join(cmd), file=sys.stderr)
        subprocess.run(cmd, check=True)


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A currently unused loopback port."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_busy_cores(interval: float) -> float:
    """Cores' worth of non-idle time on the whole machine over ``interval``."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields[:8]) - idle, sum(fields[:8])

    busy0, _ = sample()
    time.sleep(interval)
    busy1, _ = sample()
    return (busy1 - busy0) / os.sysconf("SC_CLK_TCK") / interval


def proc_stat() -> dict[str, list[int]]:
    """Per-CPU jiffy counters from /proc/stat (user nice system idle iowait irq softirq steal)."""
    out: dict[str, list[int]] = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu"):
                name, *fields = line.split()
                out[name] = [int(x) for x in fields[:8]]
    return out


def stat_delta(before: dict[str, list[int]], after: dict[str, list[int]],
               seconds: float) -> dict[str, float]:
    """Per-core busy, (soft)irq and steal fractions between two proc_stat() samples."""
    tck = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for name in (f"cpu{SERVER_CORE}", f"cpu{CLIENT_CORE}"):
        if name not in before or name not in after:
            continue
        d = [a - b for a, b in zip(after[name], before[name], strict=True)]
        out[f"{name}_busy"] = round((sum(d) - d[3] - d[4]) / tck / seconds, 3)
        out[f"{name}_irq"] = round((d[5] + d[6]) / tck / seconds, 3)
        out[f"{name}_steal"] = round(d[7] / tck / seconds, 3)
    return out


def wait_for_quiet(limit: float, max_wait: float) -> float:
    """Wait (up to ``max_wait`` s) until the machine uses < ``limit`` cores.

    Returns the last load seen; the caller flags the run as noisy if it is
    still above the limit.
    """
    deadline = time.monotonic() + max_wait
    while True:
        busy = cpu_busy_cores(0.3)
        if busy < limit or time.monotonic() >= deadline:
            return busy
        time.sleep(0.5)


class Server:
    """A server process pinned to the server core; always killed on exit."""

    def __init__(self, cmd: list[str], ready_prefix: str, timeout: float = 15.0,
                 grace: float = 2.0) -> None:
        """Start ``cmd`` and wait for a stdout line starting with ``ready_prefix``;
        ``grace``: how long ``stop`` lets it exit before killing it."""
        self.grace = grace
        self.stderr_file = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            ["taskset", "-c", SERVER_CORE, *cmd],
            stdout=subprocess.PIPE, stderr=self.stderr_file, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.ready_line = ""
        try:
            self._wait_ready(ready_prefix, timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, prefix: str, timeout: float) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        sel = selectors.DefaultSelector()
        sel.register(fd, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        pending = b""
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise RuntimeError(f"server not ready after {timeout}s: {self.stderr_tail()}")
                if not sel.select(remaining):
                    continue
                chunk = os.read(fd, 65536)  # unbuffered: select() must see the rest
                if not chunk:  # exited before it was ready
                    code = self.proc.wait()
                    reason = self.stderr_tail() or f"exit status {code}"
                    # whatever the cause, a server that cannot start is "skipped"
                    raise SkipStack(reason if code == SKIP_EXIT_CODE
                                    else f"server exited with status {code}: {reason}")
                pending += chunk
                for line in pending.decode(errors="replace").splitlines():
                    if line.startswith(prefix):
                        self.ready_line = line.strip()
                        return
        finally:
            sel.close()

    @property
    def pid(self) -> int:
        """The server's pid (taskset execs it, so it is the same process)."""
        return self.proc.pid

    def stderr_tail(self, lines: int = 3) -> str:
        """The last lines the server wrote to stderr."""
        self.stderr_file.flush()
        self.stderr_file.seek(0)
        text = self.stderr_file.read().strip().splitlines()
        return " | ".join(text[-lines:])

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; idempotent."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(self.grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()


@contextlib.contextmanager
def running(cmd: list[str], ready_prefix: str = "ready", timeout: float = 15.0,
            grace: float = 2.0) -> Iterator[Server]:
    """Context manager around :class:`Server`."""
    server = Server(cmd, ready_prefix, timeout, grace)
    try:
        yield server
    finally:
        server.stop()


def server_command(stack: Stack, load: Load, opts: argparse.Namespace) -> list[str]:
    """The command line of ``stack``'s server for ``load``."""
    if stack.kind == "py":
        return [PYTHON, str(HERE / "servers_py.py"), *stack.args,
                "--mode", load.server_mode, "--port", "0"]
    if stack.kind == "evpl":
        python = PYTHON
        if stack.name == "evpl-base":
            if not opts.evpl_base_python:
                raise SystemExit("the evpl-base stack needs --evpl-base-python")
            python = opts.evpl_base_python
        cmd = [python, str(HERE / "servers_evpl.py"), *stack.args,
               "--mode", load.server_mode, "--port", "0"]
        backend = opts.evpl_udp_backend if load.server_mode == "udp" else opts.evpl_backend
        cmd += ["--backend", backend]
        if opts.evpl_spin_ns is not None and "--poll" not in stack.args:
            cmd += ["--spin-ns", str(opts.evpl_spin_ns)]
        if opts.evpl_sqpoll_cpu is not None:
            cmd += ["--sqpoll-cpu", str(opts.evpl_sqpoll_cpu)]
        if opts.evpl_no_gso:
            cmd += ["--no-gso"]
        return cmd
    if stack.kind == "c":
        # a byte echo answers fixed-size records as a record echo would
        mode = "raw" if load.server_mode == "fixed" else load.server_mode
        return [str(BUILD / "echo_epoll"), *stack.args, "--mode", mode, "--port", "0"]
    raise ValueError(stack.kind)


def run_loadgen(args: list[str], timeout: float) -> dict[str, Any]:
    """Run the load generator on the client core and parse its JSON line."""
    cmd = ["taskset", "-c", CLIENT_CORE, str(BUILD / "loadgen"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"loadgen failed ({proc.returncode}): {proc.stderr.strip()}")
    data: dict[str, Any] = json.loads(lines[-1])
    if "error" in data:
        raise RuntimeError(f"loadgen: {data['error']}")
    return data


def measure(stack: Stack, load: Load, opts: argparse.Namespace) -> dict[str, Any]:
    """One measurement of ``load`` against ``stack``; returns the run record."""
    if stack.kind == "iperf3":
        return measure_iperf3(opts)
    with running(server_command(stack, load, opts)) as server:
        target = server.ready_line.split()[1]
        if load.loadgen == ["socat"]:
            return finish_record(measure_socat(server.pid, int(target), opts), load)
        addr = (["--unix", target[5:]] if target.startswith("unix:")
                else ["--host", "127.0.0.1", "--port", target])
        args = [*load.loadgen, *addr, "--duration", str(opts.duration),
                "--warmup", str(opts.warmup), "--server-pid", str(server.pid)]
        if stack.client_spin:
            args.append("--spin")
        t0, st0 = time.monotonic(), proc_stat()
        data = run_loadgen(args, timeout=opts.duration + opts.warmup + 30)
        cores = stat_delta(st0, proc_stat(), time.monotonic() - t0)
        data["cores"] = cores
        # CPU used on the two cores by anything but this server and client
        ours = sum(cores.get(f"cpu{c}_{k}", 0.0) for c in (SERVER_CORE, CLIENT_CORE)
                   for k in ("irq", "steal"))
        busy = sum(cores.get(f"cpu{c}_busy", 0.0) for c in (SERVER_CORE, CLIENT_CORE))
        data["other_cores"] = round(max(0.0, busy - ours - data.get("server_cpu", 0.0)
                                        - data.get("client_cpu", 0.0)), 3)
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited during the run: {server.stderr_tail()}")
    # the server printed its stats (evpl) on the way out
    stats = [ln for ln in server.stderr_tail(20).split(" | ") if ln.startswith("stats ")]
    if stats:
        with contextlib.suppress(ValueError):
            data["server_stats"] = json.loads(stats[-1][6:])
            st = data["server_stats"]
            units = st.get("messages_in") or st.get("datagrams_in")
            if units and "receive_calls" in st:
                # the engine's calls into Python per message received
                data["py_calls_per_msg"] = st["receive_calls"] / units
    return finish_record(data, load)


def finish_record(data: dict[str, Any], load: Load) -> dict[str, Any]:
    """Add the derived numbers: headline value, server CPU per unit."""
    data["value"] = data["gbit_per_s"] if load.metric == "gbit" else data["rate"]
    cpu_s = data.get("server_cpu_s")
    if cpu_s is not None:
        if load.metric == "gbit":  # µs of server CPU per MiB moved
            mib = data["bytes"] / (1 << 20)
            data["server_us_per_unit"] = cpu_s / mib * 1e6 if mib else None
        else:
            data["server_us_per_unit"] = cpu_s / data["count"] * 1e6 if data["count"] else None
    return data


def measure_iperf3(opts: argparse.Namespace) -> dict[str, Any]:
    """iperf3 -l 1M on one connection: the bulk reference."""
    port = free_port()
    with running(["iperf3", "-s", "-p", str(port), "--forceflush"], "Server listening"):
        seconds = max(1, round(opts.duration))
        omit = max(0, round(opts.warmup))
        cmd = ["taskset", "-c", CLIENT_CORE, "iperf3", "-c", "127.0.0.1", "-p", str(port),
               "-t", str(seconds), "-O", str(omit), "-l", "1M", "-J"]
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              timeout=seconds + omit + 30, stdin=subprocess.DEVNULL)
    out = json.loads(proc.stdout)
    if "error" in out:
        raise RuntimeError(f"iperf3: {out['error']}")
    end = out["end"]
    recv = end["sum_received"]
    cpu = end["cpu_utilization_percent"]
    data: dict[str, Any] = {
        "mode": "bulk", "duration_s": recv["seconds"], "bytes": recv["bytes"],
        "count": recv["bytes"], "rate": recv["bytes"] / recv["seconds"],
        "gbit_per_s": recv["bits_per_second"] / 1e9,
        "client_cpu": cpu["host_total"] / 100, "server_cpu": cpu["remote_total"] / 100,
        "server_cpu_s": cpu["remote_total"] / 100 * recv["seconds"],
    }
    return finish_record(data, LOADS["bulk"])


def _cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _bytes_received(port: int) -> int:
    """bytes_received of the established connections to local ``port`` (ss -ti)."""
    out = subprocess.run(["ss", "-tinH", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True, check=True).stdout
    return sum(int(m) for m in re.findall(r"bytes_received:(\d+)", out))


def measure_socat(server_pid: int, port: int, opts: argparse.Namespace) -> dict[str, Any]:
    """A second, independent bulk client: socat writing 1 MiB blocks of
    /dev/zero; throughput from the server socket's byte counter (ss), server
    CPU from /proc over the same interval."""
    if not shutil.which("socat"):
        raise SkipStack("socat not installed (apt-get install -y socat)")
    cmd = ["taskset", "-c", CLIENT_CORE, "socat", "-u", "-b", str(1 << 20),
           "OPEN:/dev/zero", f"TCP:127.0.0.1:{port}"]
    client = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    try:
        time.sleep(opts.warmup)
        if client.poll() is not None:
            raise RuntimeError(f"socat exited: {client.stderr.read().decode().strip()}")
        t0, b0, c0 = time.monotonic(), _bytes_received(port), _cpu_seconds(server_pid)
        k0 = _cpu_seconds(client.pid)
        time.sleep(opts.duration)
        t1, b1, c1 = time.monotonic(), _bytes_received(port), _cpu_seconds(server_pid)
        k1 = _cpu_seconds(client.pid)
    finally:
        client.kill()
        client.wait()
    secs = t1 - t0
    moved = b1 - b0
    return {"mode": "bulk-socat", "duration_s": secs, "bytes": moved, "count": moved,
            "rate": moved / secs, "gbit_per_s": moved * 8 / secs / 1e9,
            "server_cpu": (c1 - c0) / secs, "server_cpu_s": c1 - c0,
            "client_cpu": (k1 - k0) / secs}


# ------------------------------------------------------------------- driver
def measure_quietly(stack: Stack, load: Load,
                    opts: argparse.Namespace) -> tuple[dict[str, Any], float]:
    """Measure once the machine is quiet; redo runs disturbed by other work.

    A run is "noisy" if the machine was busy before it started or if other
    processes used more than ``--quiet-limit`` cores during it; such a run is
    repeated up to ``--noise-retries`` times and kept (flagged) after that.
    """
    for attempt in range(opts.noise_retries + 1):
        busy = wait_for_quiet(opts.quiet_limit, opts.quiet_wait) if opts.quiet_limit else 0.0
        rec = measure(stack, load, opts)
        rec["noisy"] = bool(opts.quiet_limit and (
            busy >= opts.quiet_limit or rec.get("other_cores", 0.0) >= opts.quiet_limit))
        rec["attempt"] = attempt + 1
        if not rec["noisy"]:
            break
        print(f"  {load.name}/{stack.name}: disturbed (other work used "
              f"{max(busy, rec.get('other_cores', 0.0)):.2f} cores)"
              + (", retrying" if attempt < opts.noise_retries else ""), file=sys.stderr)
    return rec, busy


def run_all(opts: argparse.Namespace) -> dict[tuple[str, str], Result]:
    """Run every (load, stack, repetition), interleaved; return the results."""
    results: dict[tuple[str, str], Result] = {}
    for load_name in opts.loads:
        for stack_name in opts.stacks:
            if load_name in STACKS[stack_name].loads:
                res = results[(load_name, stack_name)] = Result(load_name, stack_name)
                if stack_name == "iperf3" and not shutil.which("iperf3"):
                    res.skipped = "iperf3 not installed (apt-get install -y iperf3)"

    def measure_one(load_name: str, stack_name: str) -> dict[str, Any]:
        rec, busy = measure_quietly(STACKS[stack_name], LOADS[load_name], opts)
        rec["busy_before"] = round(busy, 3)
        return rec

    run_interleaved(results, opts.repeat, measure_one,
                    lambda ld, rec: f"{fmt_value(rec['value'], LOADS[ld])} {unit_label(LOADS[ld])}")
    return results


def run_interleaved(results: dict[tuple[str, str], Result], repeat: int,
                    measure: Callable[[str, str], dict[str, Any]],
                    describe: Callable[[str, dict[str, Any]], str]) -> None:
    """Measure every (load, stack) of ``results`` ``repeat`` times, one
    repetition of each in turn (so slow drifts of the machine hit every stack
    alike), reporting progress on stderr. A stack that cannot run is skipped
    for good; a failed run is recorded as an error and the others go on."""
    total, done = len(results) * repeat, 0
    for rep in range(repeat):
        for (load_name, stack_name), res in results.items():
            done += 1
            if res.skipped:
                continue
            label = f"[{done}/{total}] {load_name:9s} {stack_name:10s} rep {rep + 1}"
            try:
                rec = measure(load_name, stack_name)
            except SkipStack as exc:
                res.skipped = str(exc)
                print(f"{label}: skipped: {exc}", file=sys.stderr)
                continue
            except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError,
                    KeyError, OSError) as exc:
                res.errors.append(str(exc))
                print(f"{label}: ERROR {exc}", file=sys.stderr)
                continue
            res.runs.append(rec)
            print(f"{label}: {describe(load_name, rec)}"
                  f"  server {fmt_pct(rec.get('server_cpu'))}"
                  f"  client {fmt_pct(rec.get('client_cpu'))}"
                  + (f"  receive calls/msg {rec['py_calls_per_msg']:.3f}"
                     if rec.get("py_calls_per_msg") is not None else "")
                  + ("  (machine busy with other work)" if rec["noisy"] else ""),
                  file=sys.stderr)


def unit_label(load: Load) -> str:
    """Unit of the headline number."""
    return "Gbit/s" if load.metric == "gbit" else f"{load.unit}/s"


def fmt_value(value: float | None, load: Load) -> str:
    """Headline number, human sized."""
    if value is None:
        return "-"
    if load.metric == "gbit":
        return f"{value:.1f}"
    return fmt_count(value)


def fmt_count(value: float | None) -> str:
    """A count per second, human sized (1.23M, 45.6k, 789)."""
    if value is None:
        return "-"
    if value >= 1e6:
        return f"{value / 1e6:.2f}M"
    if value >= 1e3:
        return f"{value / 1e3:.1f}k"
    return f"{value:.0f}"


def fmt_pct(value: float | None) -> str:
    """A core fraction as a percentage."""
    return "-" if value is None else f"{value * 100:.0f}%"


def reference_for(stack: Stack, load: str, base: str) -> str:
    """The C row a stack is compared with (spinning stacks against c-spin)."""
    if base == "c" and stack.client_spin and load in STACKS["c-spin"].loads:
        return "c-spin"
    return base


def summarize(results: dict[tuple[str, str], Result]) -> list[dict[str, Any]]:
    """One row per (load, stack) with medians and ratios."""
    rows: list[dict[str, Any]] = []
    for (load_name, stack_name), res in results.items():
        load, stack = LOADS[load_name], STACKS[stack_name]
        row: dict[str, Any] = {
            "load": load_name, "load_title": load.title, "stack": stack_name,
            "unit": unit_label(load), "note": stack.note, "skipped": res.skipped,
            "errors": res.errors, "runs": len(res.runs),
            "value": res.median("value"), "spread": res.spread("value"),
            "server_cpu": res.median("server_cpu"), "client_cpu": res.median("client_cpu"),
            "server_us_per_unit": res.median("server_us_per_unit"),
            "cpu_unit": "µs/MiB" if load.metric == "gbit" else f"µs/{load.unit}",
            "lat_p50_us": res.median("lat_p50_us") if load.latency else None,
            "lat_p99_us": res.median("lat_p99_us") if load.latency else None,
            "losses": res.median("losses") if load_name.startswith("udp") else None,
            "noisy_runs": sum(1 for r in res.runs if r.get("noisy")),
        }
        for base in ("uvloop", "c"):
            ref_name = reference_for(stack, load_name, base)
            ref = results.get((load_name, ref_name))
            ref_value = ref.median("value") if ref else None
            row[f"vs_{base}"] = (row["value"] / ref_value
                                 if row["value"] is not None and ref_value else None)
            row[f"vs_{base}_ref"] = ref_name
        rows.append(row)
    return rows


def fmt_ratio(value: float | None) -> str:
    """A ratio like 1.23x."""
    return "-" if value is None else f"{value:.2f}x"


def table_cells(row: dict[str, Any]) -> list[str]:
    """The printable cells of one summary row."""
    load = LOADS[row["load"]]
    if row["value"] is None:
        why = row["skipped"] or ("; ".join(row["errors"])[:80] if row["errors"] else "no data")
        status = "skipped" if row["skipped"] else "failed"
        return [row["load"], row["stack"], f"{status}: {why}", "", "", "", "", "", ""]
    spread = f" ±{row['spread'] * 50:.0f}%" if row["spread"] is not None else ""
    lat = (f"{row['lat_p50_us']:.0f} / {row['lat_p99_us']:.0f}"
           if row["lat_p50_us"] is not None else "")
    if row["losses"]:
        lat = f"{row['losses']:.0f} lost"
    vs_c = fmt_ratio(row["vs_c"])
    if row["vs_c_ref"] != "c" and row["vs_c"] is not None:
        vs_c += f" ({row['vs_c_ref']})"
    cpu = row["server_us_per_unit"]
    return [
        row["load"], row["stack"],
        f"{fmt_value(row['value'], load)} {row['unit']}{spread}",
        fmt_ratio(row["vs_uvloop"]), vs_c, lat,
        "-" if cpu is None else f"{cpu:.2f} {row['cpu_unit']}",
        fmt_pct(row["server_cpu"]), fmt_pct(row["client_cpu"]),
    ]


HEADERS = ["load", "stack", "result (median)", "vs uvloop", "vs C", "p50/p99 µs",
           "server CPU", "server core", "client core"]


def print_table(rows: list[dict[str, Any]]) -> None:
    """Print the summary with rich if it is installed, plain text otherwise."""
    cells = [table_cells(r) for r in rows]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print_plain_table(HEADERS, cells)
        return
    table = Table(title="evpl benchmarks (medians)")
    for h in HEADERS:
        table.add_column(h, justify="left" if h in ("load", "stack") else "right")
    prev = None
    for c in cells:
        if prev is not None and c[0] != prev:
            table.add_section()
        prev = c[0]
        table.add_row(*c)
    console = Console()
    if not console.is_terminal or console.width < 150:
        console = Console(width=150)
    console.print(table)


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "kernel": platform.release(), "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    for mod in ("uvloop", "evpl"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            info[mod] = None
    return info


def render_markdown(title: str, intro: str, headers: list[str], cells: list[list[str]],
                    rows: list[dict[str, Any]], loads: dict[str, Any],
                    stacks: dict[str, Any]) -> str:
    """A Markdown report: heading, intro paragraph, the table of ``cells``, then the
    titles of the loads and the notes of the stacks in ``rows`` (shared by run.py and
    rpc_bench.py)."""
    out = [
        f"## {title}",
        "",
        intro,
        "",
        "| " + " | ".join(headers) + " |",
        "|" + "|".join(["---"] * 2 + ["--:"] * (len(headers) - 2)) + "|",
    ]
    for c in cells:
        out.append("| " + " | ".join(x.replace("|", "/") for x in c) + " |")
    out += ["", "Loads:", ""]
    for name in dict.fromkeys(r["load"] for r in rows):
        out.append(f"- `{name}`: {loads[name].title}")
    notes = [f"- `{s}`: {stacks[s].note}" for s in dict.fromkeys(r["stack"] for r in rows)
             if stacks[s].note]
    if notes:
        out += ["", "Stacks:", "", *notes]
    noisy = sum(r["noisy_runs"] for r in rows)
    if noisy:
        out += ["", f"{noisy} run(s) were disturbed by other work on the machine "
                    "(kept after retries)."]
    return "\n".join(out) + "\n"


def markdown(rows: list[dict[str, Any]], opts: argparse.Namespace, info: dict[str, Any]) -> str:
    """The report as Markdown (for docs/benchmarks.md)."""
    intro = (
        f"Measured {info['date']} on {info.get('cpu', '?')}, {info['cpus']} cores, "
        f"Linux {info['kernel']}, Python {info['python']}, uvloop {info['uvloop']}, "
        f"evpl {info['evpl']}. Server on core {SERVER_CORE}, load generator on core "
        f"{CLIENT_CORE}; median of {opts.repeat} runs of {opts.duration:g} s "
        f"(after {opts.warmup:g} s warm-up). Ratios are against uvloop and the C epoll "
        "server measured in the same run (spinning stacks against the spinning C server)."
    )
    return render_markdown("Results", intro, HEADERS, [table_cells(r) for r in rows], rows,
                           LOADS, STACKS)


def print_plain_table(headers: list[str], cells: list[list[str]],
                      blank_between_loads: bool = False) -> None:
    """Print ``cells`` under ``headers`` as left-aligned plain-text columns."""
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    prev = None
    for c in cells:
        if blank_between_loads and prev is not None and c[0] != prev:
            print()
        prev = c[0]
        print("  ".join(x.ljust(w) for x, w in zip(c, widths, strict=True)))


# --------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command line."""
    p = argparse.ArgumentParser(description="evpl vs asyncio, uvloop, C epoll and iperf3.")
    add_run_options(p, STACKS, LOADS)
    p.add_argument("--evpl-backend", default="tcp", help="evpl stream backend (default tcp)")
    p.add_argument("--evpl-udp-backend", default="udp", help="evpl datagram backend")
    p.add_argument("--evpl-base-python", metavar="PATH", default=None,
                   help="the Python of a venv with another evpl build: the evpl-base stack "
                        "runs its server with it (compare two engine builds in one run)")
    p.add_argument("--evpl-spin-ns", type=int, default=None,
                   help="spin_ns for the (hybrid) evpl server; default: evpl's default")
    p.add_argument("--evpl-no-gso", action="store_true",
                   help="evpl UDP server: bind(..., gso=False)")
    p.add_argument("--evpl-sqpoll-cpu", type=int, default=None,
                   help="io_uring backends: give the evpl server's ring an SQPOLL thread "
                        "pinned to this CPU")
    return finish_options(p, p.parse_args(argv), STACKS, LOADS)


def add_run_options(p: argparse.ArgumentParser, stacks: dict[str, Any],
                    loads: dict[str, Any]) -> None:
    """The options every benchmark driver here takes: what to run, how long,
    how often, where to write, and how to keep other work out of the runs."""
    p.add_argument("--stacks", default=",".join(s for s in stacks if not s.endswith("-base")),
                   help=f"comma-separated, from: {', '.join(stacks)}")
    p.add_argument("--loads", default=",".join(loads),
                   help=f"comma-separated, from: {', '.join(loads)}")
    p.add_argument("--repeat", type=int, default=3, help="runs per measurement (median)")
    p.add_argument("--duration", type=float, default=3.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per run")
    p.add_argument("--quick", action="store_true",
                   help="1 run of 1 s, 0.5 s warm-up, no waiting for a quiet machine")
    p.add_argument("--json", metavar="PATH", help="write all runs and the summary as JSON")
    p.add_argument("--markdown", metavar="PATH", help="write the summary as Markdown")
    p.add_argument("--quiet-limit", type=float, default=None,
                   help="before each run wait until the machine uses fewer cores than "
                        "this (0 disables; default 0.25, --quick 0)")
    p.add_argument("--quiet-wait", type=float, default=20.0,
                   help="give up waiting for quiet after this many seconds")
    p.add_argument("--noise-retries", type=int, default=2,
                   help="redo a run disturbed by other work up to this many times")


def finish_options(p: argparse.ArgumentParser, opts: argparse.Namespace,
                   stacks: dict[str, Any], loads: dict[str, Any]) -> argparse.Namespace:
    """Apply --quick and the quiet-limit default, then check the selection."""
    if opts.quick:
        opts.repeat, opts.duration, opts.warmup = 1, 1.0, 0.5
    if opts.quiet_limit is None:
        opts.quiet_limit = 0.0 if opts.quick else 0.25
    return check_selection(p, opts, stacks, loads)


def check_selection(p: argparse.ArgumentParser, opts: argparse.Namespace,
                    stacks: dict[str, Any], loads: dict[str, Any]) -> argparse.Namespace:
    """Split --stacks/--loads into lists and reject unknown names and bad timings
    (shared by run.py and rpc_bench.py)."""
    opts.stacks = [s.strip() for s in opts.stacks.split(",") if s.strip()]
    opts.loads = [s.strip() for s in opts.loads.split(",") if s.strip()]
    for s in opts.stacks:
        if s not in stacks:
            p.error(f"unknown stack {s!r}; choose from {', '.join(stacks)}")
    for ld in opts.loads:
        if ld not in loads:
            p.error(f"unknown load {ld!r}; choose from {', '.join(loads)}")
    if opts.repeat < 1 or opts.duration <= 0 or opts.warmup < 0:
        p.error("--repeat must be >= 1, --duration > 0, --warmup >= 0")
    return opts


def machine_ready() -> bool:
    """Warn on one CPU; refuse without taskset (every run is pinned)."""
    if (os.cpu_count() or 0) < 2:
        print("warning: fewer than 2 CPUs; server and client share a core", file=sys.stderr)
    if not shutil.which("taskset"):
        print("taskset not found (util-linux)", file=sys.stderr)
        return False
    return True


def run_interruptibly(run: Callable[[argparse.Namespace], dict[tuple[str, str], Result]],
                      opts: argparse.Namespace) -> dict[tuple[str, str], Result] | None:
    """``run(opts)``, with SIGTERM turned into KeyboardInterrupt so the
    servers' finally blocks kill them; None when interrupted."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return run(opts)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return None


def report(opts: argparse.Namespace, results: dict[tuple[str, str], Result],
           rows: list[dict[str, Any]], info: dict[str, Any], settings: tuple[str, ...],
           markdown_text: Callable[[], str]) -> int:
    """Write --json and --markdown; exit status 1 if a measurement failed."""
    if opts.json:
        doc = {
            "machine": info,
            "settings": {k: getattr(opts, k) for k in settings},
            "summary": rows,
            "runs": {f"{k[0]}/{k[1]}": r.runs for k, r in results.items()},
        }
        text = json.dumps(doc, indent=2, default=str)
        if opts.json == "-":
            print(text)
        else:
            Path(opts.json).write_text(text + "\n")
    if opts.markdown:
        Path(opts.markdown).write_text(markdown_text())
    failed = any(r["errors"] and r["value"] is None and not r["skipped"] for r in rows)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """Build, measure, report."""
    opts = parse_args(argv)
    if not machine_ready():
        return 1
    build()
    results = run_interruptibly(run_all, opts)
    if results is None:
        return 130
    rows = summarize(results)
    info = machine_info()
    print_table(rows)
    return report(opts, results, rows, info,
                  ("stacks", "loads", "repeat", "duration", "warmup", "evpl_backend",
                   "evpl_udp_backend", "evpl_spin_ns", "evpl_sqpoll_cpu", "evpl_no_gso"),
                  lambda: markdown(rows, opts, info))


if __name__ == "__main__":
    sys.exit(main())
