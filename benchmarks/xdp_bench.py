"""xdp_udp against udp and io_uring_udp, across a veth pair, in one run.

The server (benchmarks/servers_evpl.py, pinned to core 0) runs in network
namespace A on one end of a veth pair; the load runs in namespace B on the
other end, pinned to core 1:

* ``echo``: the C load generator (benchmarks/c/loadgen.c), 8 UDP sockets x
  32 datagrams of 64 bytes in flight; echoed datagrams/s.
* ``latency``: the same with 1 socket and 1 datagram in flight; p50/p99
  round trip.
* ``oneway``: ``sockperf throughput`` floods 64-byte datagrams at a server
  that drops them; datagrams the server received per second.

Two C servers give the limit of each kernel path with no Python at all:
``c-udp`` (c/echo_epoll.c, recvmmsg/sendmmsg on one UDP socket) and
``c-xsk`` (c/xsk_echo.c, one AF_XDP socket through libxdp, copy mode on
veth; the load's side gets a static neighbour entry for it, as its program
takes ARP too). They run the ``echo`` and ``latency`` loads. Their ratio is
what ``xdp_udp`` could gain over ``udp`` on this path if Python cost
nothing.

For ``xdp_udp`` the table also gives the datagrams sent per ``sendto``
(copy mode needs one per batch; ``EVPL_XDP_TX_BUDGET=32`` in the
environment sets the kernel's default batch of 32 back, for comparisons).

Each backend in event mode (the loop sleeps when idle) and poll mode
(``poll_mode="always"``), repeated, medians reported, with the ratio to the
``udp`` backend of the same load and mode. Needs root (namespaces, AF_XDP),
libxdp-built evpl and sockperf. veth has no zero-copy AF_XDP: this measures
copy mode, AF_XDP's worst case (see docs/xdp.md and docs/benchmarks.md).

    flock /tmp/evpl-bench.lock python benchmarks/xdp_bench.py --repeat 3
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
from typing import Any

from run import BUILD, HERE, SkipStack, build, running

NS = {"a": "evx-xdp-bench-a", "b": "evx-xdp-bench-b"}
IF = {"a": "evx-xdpbench-a", "b": "evx-xdpbench-b"}
IP = {"a": "10.251.0.1", "b": "10.251.0.2"}
CLIENT_CORE = "1"
BACKENDS = ["udp", "io_uring_udp", "xdp_udp", "c-udp", "c-xsk"]
C_LOADS = ("echo", "latency")         # the C servers echo; they do not count a flood
XSK_PORT = "7777"                     # c-xsk binds no kernel socket: any port will do
MODES = ["event", "poll"]
LOADS = ["echo", "latency", "oneway"]


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=30)


def setup() -> None:
    """The two namespaces and the veth pair between them (fresh)."""
    teardown()
    for side in "ab":
        sh("ip", "netns", "add", NS[side])
    sh("ip", "link", "add", IF["a"], "netns", NS["a"], "type", "veth", "peer", "name", IF["b"],
       "netns", NS["b"])
    for side in "ab":
        sh("ip", "-n", NS[side], "addr", "add", f"{IP[side]}/24", "dev", IF[side])
        sh("ip", "-n", NS[side], "link", "set", IF[side], "up")
        sh("ip", "-n", NS[side], "link", "set", "lo", "up")


def teardown() -> None:
    for n in NS.values():
        subprocess.run(["ip", "netns", "del", n], capture_output=True, timeout=30)


def build_xsk() -> None:
    """Compile c/xsk_echo.c against libxdp, or say why c-xsk cannot run."""
    src, out = HERE / "c" / "xsk_echo.c", BUILD / "xsk_echo"
    if out.exists() and out.stat().st_mtime >= src.stat().st_mtime:
        return
    r = subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-o", str(out), str(src), "-lxdp",
                        "-lbpf"], capture_output=True, text=True)
    if r.returncode != 0:
        raise SkipStack(f"c/xsk_echo.c does not build (libxdp-dev?): {r.stderr.strip()[-200:]}")


def mac_of(side: str) -> str:
    out = subprocess.run(["ip", "-n", NS[side], "-j", "link", "show", IF[side]], check=True,
                         capture_output=True, text=True, timeout=30).stdout
    return str(json.loads(out)[0]["address"])


def server_cmd(backend: str, mode: str, load: str) -> list[str]:
    spin = ["--spin"] if mode == "poll" else []
    if backend == "c-udp":
        return ["ip", "netns", "exec", NS["a"], str(BUILD / "echo_epoll"), "--mode", "udp",
                "--host", IP["a"], "--port", "0", *spin]
    if backend == "c-xsk":
        build_xsk()
        return ["ip", "netns", "exec", NS["a"], str(BUILD / "xsk_echo"), "--interface", IF["a"],
                "--port", XSK_PORT, *spin]
    cmd = ["ip", "netns", "exec", NS["a"], sys.executable, str(HERE / "servers_evpl.py"),
           "--mode", "udpsink" if load == "oneway" else "udp", "--backend", backend,
           "--host", IP["a"], "--port", "0"]
    if backend == "xdp_udp":
        cmd += ["--interface", IF["a"]]
    if mode == "poll":
        cmd.append("--poll")
    return cmd


def in_b(argv: list[str]) -> list[str]:
    return ["ip", "netns", "exec", NS["b"], "taskset", "-c", CLIENT_CORE, *argv]


def measure(backend: str, mode: str, load: str, opts: argparse.Namespace) -> dict[str, Any]:
    """One run of ``load`` against one server; the numbers it gave."""
    if backend.startswith("c-") and load not in C_LOADS:
        raise SkipLoad
    if backend == "c-xsk":
        sh("ip", "-n", NS["b"], "neigh", "replace", IP["a"], "lladdr", mac_of("a"), "dev", IF["b"],
           "nud", "permanent")
    try:
        return _measure(backend, mode, load, opts)
    finally:
        if backend == "c-xsk":
            subprocess.run(["ip", "-n", NS["b"], "neigh", "del", IP["a"], "dev", IF["b"]],
                           capture_output=True, timeout=30)


class SkipLoad(Exception):
    """This server does not run this load."""


def _measure(backend: str, mode: str, load: str, opts: argparse.Namespace) -> dict[str, Any]:
    with running(server_cmd(backend, mode, load)) as server:
        port = server.ready_line.split()[1]
        if load == "oneway":
            r = subprocess.run(in_b(["sockperf", "throughput", "-i", IP["a"], "-p", port,
                                     "-m", "64", "-t", str(opts.duration)]),
                               capture_output=True, text=True, timeout=opts.duration + 60)
            if r.returncode != 0:
                raise RuntimeError(f"sockperf: {r.stderr.strip()[-300:]}")
            server.stop()
            return {"rate": _server_stats(server).get("datagrams_in", 0) / opts.duration}
        conns, depth = ("8", "32") if load == "echo" else ("1", "1")
        args = [str(BUILD / "loadgen"), "udp", "--conns", conns, "--depth", depth, "--size",
                "64", "--host", IP["a"], "--port", port, "--duration", str(opts.duration),
                "--warmup", str(opts.warmup), "--server-pid", str(server.pid)]
        r = subprocess.run(in_b(args), capture_output=True, text=True,
                           timeout=opts.duration + opts.warmup + 60)
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
        if not lines:
            raise RuntimeError(f"loadgen: {r.stderr.strip()[-300:]}")
        data: dict[str, Any] = json.loads(lines[-1])
        if "error" in data:
            raise RuntimeError(f"loadgen: {data['error']}")
        server.stop()
        st = _server_stats(server)
        if st.get("xdp_tx_wakeups"):        # how well sends were batched per sendto
            data["tx_per_wakeup"] = st["xdp_tx_frames"] / st["xdp_tx_wakeups"]
        return data


def _server_stats(server: Any) -> dict[str, Any]:
    """The server's ``Loop.stats()``, printed when it stopped."""
    stats = [ln for ln in server.stderr_tail(20).split(" | ") if ln.startswith("stats ")]
    return json.loads(stats[-1][6:]) if stats else {}


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "rate":
        return f"{v / 1e3:,.0f}k/s"
    return f"{v:.1f} µs"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=3.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per run")
    p.add_argument("--repeat", type=int, default=3, help="runs per cell (median reported)")
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--loads", default=",".join(LOADS))
    p.add_argument("--json", metavar="FILE", help="write every run's numbers to FILE")
    opts = p.parse_args(argv)
    if os.geteuid() != 0:
        p.error("needs root (network namespaces, AF_XDP)")
    backends, modes, loads = (opts.backends.split(","), opts.modes.split(","),
                              opts.loads.split(","))
    build()
    setup()
    runs: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    skipped: dict[str, str] = {}
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(1))
    try:
        for rep in range(opts.repeat):
            for load in loads:
                for mode in modes:
                    for backend in backends:     # interleaved: drift hits all alike
                        if backend in skipped:
                            continue
                        try:
                            d = measure(backend, mode, load, opts)
                        except SkipStack as exc:
                            skipped[backend] = str(exc)
                            continue
                        except SkipLoad:
                            continue
                        runs.setdefault((load, mode, backend), []).append(d)
                        print(f"[{rep + 1}/{opts.repeat}] {load:7} {mode:5} {backend:13} "
                              f"{fmt(d.get('rate'), 'rate'):>12} "
                              f"p50 {fmt(d.get('lat_p50_us'), 'us')}", file=sys.stderr)
                        time.sleep(0.2)
    finally:
        teardown()
    for b, why in skipped.items():
        print(f"skipped {b}: {why}")
    print(f"\n{'load':8} {'mode':6} {'backend':13} {'datagrams/s':>12} {'vs udp':>7} "
          f"{'p50':>9} {'p99':>9} {'server CPU':>10} {'sends/wakeup':>12}")
    out = []
    for load in loads:
        for mode in modes:
            base = None
            for backend in backends:
                rs = runs.get((load, mode, backend))
                if not rs:
                    continue

                def med(key: str, rs: list[dict[str, Any]] = rs) -> float | None:
                    vals = [r[key] for r in rs if r.get(key) is not None]
                    return statistics.median(vals) if vals else None

                rate = med("rate")
                if backend == "udp":
                    base = rate
                ratio = f"{rate / base:.2f}x" if base and rate else "-"
                cpu = med("server_cpu")
                row = {"load": load, "mode": mode, "backend": backend, "rate": rate,
                       "p50_us": med("lat_p50_us"), "p99_us": med("lat_p99_us"),
                       "server_cpu": cpu, "tx_per_wakeup": med("tx_per_wakeup"),
                       "runs": len(rs)}
                out.append(row)
                print(f"{load:8} {mode:6} {backend:13} {fmt(rate, 'rate'):>12} {ratio:>7} "
                      f"{fmt(row['p50_us'], 'us'):>9} {fmt(row['p99_us'], 'us'):>9} "
                      f"{'-' if cpu is None else f'{cpu:.2f} core':>10} "
                      f"{_num(row['tx_per_wakeup']):>12}")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump({"summary": out, "runs": {"/".join(k): v for k, v in runs.items()}}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
