"""HTTP servers side by side: evpl (native, ASGI, Starlette on ASGI, WSGI)
against uvicorn + httptools, granian (ASGI, Starlette on its ASGI, and
RSGI) and nginx (the C limit), in the same run, with ratios.

    flock /tmp/evpl-bench.lock python benchmarks/http_bench.py [--runs 3] [--duration 3]

Each server runs pinned to core 0 (``taskset -c 0``) with one worker; the
load (``wrk -t1 -c64``, ``h2load -c64 -m16``) runs on core 1. The
exception, "evpl native 2 shards" (``--shards 2``), is pinned to cores 0
and 1: on a two-core machine its second shard shares core 1 with wrk, so it
shows what a second shard costs here, not how it scales on a bigger one.
Loads:

- ``plain``: GET / (13 bytes), keep-alive, 64 connections;
- ``pipe16``: the same with 16 pipelined requests per write (TechEmpower
  "plaintext");
- ``big``: GET /big (64 KiB), keep-alive;
- ``h2``: HTTP/2, ``h2load -c64 -m16`` (servers that speak h2c).

Every cell is the median of ``--runs`` runs: requests/s, p50/p99 latency
(wrk), server CPU per request (utime+stime of the server's processes
over the run / requests) and the load generator's CPU per request (what it
takes of the cores: with ``--shards 2`` on a 2-core machine the second
shard shares its core with it). A server that is not installed is skipped,
saying why.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
SERVER_CPU, CLIENT_CPU = "0", "1"
PIPE_LUA = ('init = function(args)\n local r = {}\n for i=1,16 do r[i] = wrk.format(nil, "/") end\n'
            ' req = table.concat(r)\nend\nrequest = function() return req end\n')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Peer:
    name: str
    cmd: list[str]                    # {port} and {tmp} are filled in
    loads: tuple[str, ...] = ("plain", "pipe16", "big", "h2")
    needs: str = ""                   # executable or module that must exist
    cpus: str = SERVER_CPU            # the cores the server is pinned to
    setup: str = ""                   # "nginx": write its config first
    results: dict[str, list[dict]] = field(default_factory=dict)


def peers() -> list[Peer]:
    py = sys.executable
    evpl = [py, "-m", "evpl.cli", "http", "serve", "--app-dir", HERE, "--port", "{port}"]
    return [
        Peer("evpl native", [*evpl, "http_apps:native", "--interface", "evpl"]),
        Peer("evpl ASGI", [*evpl, "http_apps:asgi", "--interface", "asgi"]),
        Peer("evpl ASGI Starlette", [*evpl, "http_apps:starlette", "--interface", "asgi"],
             loads=("plain", "pipe16"), needs="starlette"),
        Peer("evpl native 2 shards", [*evpl, "http_apps:native", "--interface", "evpl",
                                       "--shards", "2"],
             loads=("plain", "pipe16"), cpus=f"{SERVER_CPU},{CLIENT_CPU}"),
        Peer("evpl WSGI", [*evpl, "http_apps:wsgi", "--interface", "wsgi"],
             loads=("plain", "pipe16", "big")),
        Peer("uvicorn httptools", [py, "-m", "uvicorn", "--app-dir", HERE, "--port", "{port}",
                                   "--http", "httptools", "--loop", "uvloop",
                                   "--no-access-log", "--log-level", "warning",
                                   "http_apps:asgi"],
             loads=("plain", "pipe16", "big"), needs="uvicorn"),
        Peer("uvicorn Starlette", [py, "-m", "uvicorn", "--app-dir", HERE, "--port", "{port}",
                                   "--http", "httptools", "--loop", "uvloop",
                                   "--no-access-log", "--log-level", "warning",
                                   "http_apps:starlette"],
             loads=("plain", "pipe16"), needs="uvicorn"),
        Peer("granian ASGI", [py, "-m", "granian", "--interface", "asgi", "--workers", "1",
                              "--runtime-threads", "1", "--port", "{port}", "--no-ws",
                              "--http", "auto", "--log-level", "warning",
                              "--working-dir", HERE, "http_apps:asgi"], needs="granian"),
        Peer("granian Starlette", [py, "-m", "granian", "--interface", "asgi", "--workers", "1",
                                   "--runtime-threads", "1", "--port", "{port}", "--no-ws",
                                   "--http", "auto", "--log-level", "warning",
                                   "--working-dir", HERE, "http_apps:starlette"],
             loads=("plain", "pipe16"), needs="granian"),
        Peer("granian RSGI", [py, "-m", "granian", "--interface", "rsgi", "--workers", "1",
                              "--runtime-threads", "1", "--port", "{port}", "--no-ws",
                              "--http", "auto", "--log-level", "warning",
                              "--working-dir", HERE, "http_apps:rsgi"], needs="granian"),
        Peer("nginx", ["nginx", "-c", "{tmp}/nginx.conf", "-p", "{tmp}"], needs="nginx",
             setup="nginx"),
    ]


NGINX_CONF = """
daemon off; master_process off; worker_processes 1; pid {tmp}/nginx.pid;
error_log {tmp}/error.log crit;
events {{ worker_connections 4096; }}
http {{
  access_log off; keepalive_requests 1000000;
  client_body_temp_path {tmp}; proxy_temp_path {tmp};
  fastcgi_temp_path {tmp}; uwsgi_temp_path {tmp}; scgi_temp_path {tmp};
  server {{ listen 127.0.0.1:{port}; listen 127.0.0.1:{port2} http2;
    location = / {{ default_type text/plain; return 200 "Hello, world!"; }}
    location = /big {{ root {tmp}; try_files /big =404; }}
  }}
}}
"""


def available(p: Peer) -> str | None:
    """None if the peer can run, else why not."""
    if p.needs in ("nginx",):
        if not (shutil.which("nginx") or os.path.exists("/usr/sbin/nginx")):
            return "nginx is not installed (Debian package nginx)"
    elif p.needs:
        try:
            __import__(p.needs)
        except ImportError:
            return f"{p.needs} is not installed (pip install {p.needs})"
    return None


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its threads (from /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {proc.args}") from None
            time.sleep(0.1)


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of a process and all its descendants (granian's worker,
    evpl's shards)."""
    try:
        kids = open(f"/proc/{pid}/task/{pid}/children").read().split()
    except OSError:
        kids = []
    return cpu_seconds(pid) + sum(tree_cpu_seconds(int(k)) for k in kids)


def run_load(load: str, port: int, h2port: int, duration: float, tmp: str) -> dict:
    if load == "h2":
        n = int(40000 * duration)
        cmd = ["h2load", "-c64", "-m16", "-n", str(n), f"http://127.0.0.1:{h2port}/"]
    else:
        cmd = ["wrk", "-t1", "-c64", f"-d{duration:g}s", "--latency"]   # wrk wants "3s", not "3.0s"
        if load == "pipe16":
            cmd += ["-s", os.path.join(tmp, "pipe.lua")]
        cmd.append(f"http://127.0.0.1:{port}/" + ("big" if load == "big" else ""))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(["taskset", "-c", CLIENT_CPU, *cmd], capture_output=True, text=True,
                         timeout=duration * 10 + 60).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # the load generator's own CPU (what it leaves of a shared core to a server)
    load_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if load == "h2":
        m = re.search(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s", out)
        ok = re.search(r"(\d+) succeeded", out)
        if not m or not ok or int(ok.group(1)) == 0:
            return {"rps": 0.0, "requests": 0, "error": out[-300:]}
        return {"rps": float(m.group(3)), "requests": int(ok.group(1)), "p50": None, "p99": None,
                "load_cpu": load_cpu}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    reqs = re.search(r"(\d+) requests in", out)
    errors = "Non-2xx" in out or "Socket errors" in out

    def lat(pct: str) -> float | None:
        mm = re.search(rf"\s{pct}%\s+([\d.]+)(us|ms|s)", out)
        if not mm:
            return None
        return float(mm.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[mm.group(2)]

    return {"rps": float(m.group(1)) if m else 0.0,
            "requests": int(reqs.group(1)) if reqs else 0,
            "p50": lat("50"), "p99": lat("99"), "error": out[-300:] if errors else None,
            "load_cpu": load_cpu}


def bench(p: Peer, loads: list[str], duration: float, tmp: str) -> None:
    port, port2 = free_port(), free_port()
    if p.setup == "nginx":
        with open(os.path.join(tmp, "nginx.conf"), "w") as f:
            f.write(NGINX_CONF.format(tmp=tmp, port=port, port2=port2))
        with open(os.path.join(tmp, "big"), "wb") as f:
            f.write(b"x" * 65536)
    else:
        port2 = port
    cmd = [c.format(port=port, tmp=tmp) for c in p.cmd]
    proc = subprocess.Popen(["taskset", "-c", p.cpus, *cmd], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=HERE)
    try:
        wait_port(port, proc)
        time.sleep(0.5)                     # let the server settle (not a test: a benchmark)
        for load in loads:
            if load not in p.loads:
                continue
            run_load(load, port, port2, 1, tmp)          # warm-up
            c0 = tree_cpu_seconds(proc.pid)
            r = run_load(load, port, port2, duration, tmp)
            r["cpu_us"] = ((tree_cpu_seconds(proc.pid) - c0) / r["requests"] * 1e6
                           if r["requests"] else None)
            r["load_cpu_us"] = r["load_cpu"] / r["requests"] * 1e6 if r["requests"] else None
            p.results.setdefault(load, []).append(r)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def median(rs: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rs if r.get(key) is not None and r.get("rps")]
    return statistics.median(vals) if vals else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="runs per cell (median)")
    ap.add_argument("--duration", type=float, default=3.0, help="seconds per run")
    ap.add_argument("--loads", default="plain,pipe16,big,h2")
    ap.add_argument("--only", default="", help="comma-separated peer names to run")
    args = ap.parse_args()
    for tool in ("wrk", "h2load", "taskset"):
        if shutil.which(tool) is None:
            print(f"{tool} is needed (Debian: wrk, nghttp2-client, util-linux)")
            return 2
    loads = args.loads.split(",")
    todo = []
    for p in peers():
        if args.only and p.name not in args.only.split(","):
            continue
        why = available(p)
        if why:
            print(f"skipping {p.name}: {why}")
        else:
            todo.append(p)
    with tempfile.TemporaryDirectory(prefix="evpl-http-bench-") as tmp:
        with open(os.path.join(tmp, "pipe.lua"), "w") as f:
            f.write(PIPE_LUA)
        for run in range(args.runs):
            for p in todo:              # interleaved: every peer sees the same noise
                print(f"run {run + 1}/{args.runs}: {p.name}", file=sys.stderr, flush=True)
                bench(p, loads, args.duration, tmp)
    ref = {load: median(todo[0].results.get(load, []), "rps") for load in loads} if todo else {}
    print(f"\nserver on core {SERVER_CPU}, load on core {CLIENT_CPU}; median of {args.runs} "
          f"runs of {args.duration:g} s; ratio = evpl native / peer\n")
    print("| server | load | req/s | p50 ms | p99 ms | server CPU µs/req | load CPU µs/req "
          "| evpl native ÷ this |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for p in todo:
        for load in loads:
            rs = p.results.get(load)
            if not rs:
                continue
            rps = median(rs, "rps")
            p50, p99, cpu = median(rs, "p50"), median(rs, "p99"), median(rs, "cpu_us")
            load_cpu = median(rs, "load_cpu_us")
            ratio = f"{ref[load] / rps:.2f}" if rps and ref.get(load) else "-"
            fmt = lambda v, d=2: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
            print(f"| {p.name} | {load} | {fmt(rps, 0)} | {fmt(p50)} | {fmt(p99)} | "
                  f"{fmt(cpu, 1)} | {fmt(load_cpu, 1)} | {ratio} |")
            errs = [r["error"] for r in rs if r.get("error")]
            if errs:
                print(f"|   ({p.name} {load}: errors in {len(errs)} run(s)) ||||||")
    return 0


if __name__ == "__main__":
    sys.exit(main())
