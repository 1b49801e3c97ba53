"""CPU instructions per small RPC, drpc against rpc2 over TCP (callgrind).

Wall-clock rates on a shared VM move by 2x between runs; instruction counts
do not. This runs a client and a server in one process and one Loop (event
mode, so no spinning is counted; drpc with ``cc=False``: pacing only runs
under congestion), 8 calls in flight (``--depth``; 1 is the latency load's
shape), 32-byte requests and responses, under
``valgrind --tool=callgrind`` for N and 2N calls: the difference over N is
the user-space instructions one call costs both ends together (the
kernel's share is not counted).

    python benchmarks/drpc_cost.py                 # needs valgrind
    python benchmarks/drpc_cost.py --calls 4000 --depth 1
    python benchmarks/drpc_cost.py --calls 2 --depth 1 --response-size 8388608

With ``--response-size`` larger than one packet the figure per response
packet (1,444 payload bytes at drpc's default 1472-byte datagrams: the
packet, its RFR and the work around both) is printed as well.
"""

from __future__ import annotations

import argparse
import math
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


def run_calls(stack: str, n: int, depth: int, size: int) -> None:
    import evpl

    loop = evpl.Loop(poll_mode="event")
    resp, payload = (bytes(range(256)) * (size // 256 + 1))[:size], b"q" * 32
    done = [0]
    if stack == "drpc":
        from evpl.drpc import Client, Server

        server = Server(loop, "udp", ("127.0.0.1", 0), max_message=max(size, 8 << 20))
        server.register(1, lambda req: resp)
        # under valgrind the process runs ~50x slower: a 5 ms RTO would fire
        # and count retransmissions that a real run never makes
        client = Client(loop, "udp", server.address, cc=False, rto=10.0, peer_timeout=60.0,
                        max_message=max(size, 8 << 20))
        client.wait(client.call(1, b"x"))

        def issue() -> None:
            def cb(r: Any, e: Any) -> None:
                done[0] += 1
                if done[0] < n:
                    issue()
            client.call(1, payload, cb)
    else:
        from evpl.rpc2 import Client as RpcClient
        from evpl.rpc2 import Server as RpcServer

        rserver = RpcServer(loop, max_record=max(size, 1 << 20) + 4096)
        rserver.register(7, 1, {1: lambda data: resp})
        rclient = RpcClient(loop, "tcp", rserver.listen("tcp", ("127.0.0.1", 0)).address,
                            max_record=max(size, 1 << 20) + 4096)
        rclient.wait(rclient.call(7, 1, 1, b"x"))

        def issue() -> None:
            def cb(rpc: Any) -> None:
                rpc.result()
                done[0] += 1
                if done[0] < n:
                    issue()
            rclient.call(7, 1, 1, payload, len).add_done_callback(cb)
    for _ in range(depth):
        issue()
    loop.run_until(lambda: done[0] >= n, 600)


def instructions(stack: str, n: int, depth: int, size: int) -> int:
    with tempfile.TemporaryDirectory() as d:
        res = subprocess.run(["valgrind", "--tool=callgrind",
                              f"--callgrind-out-file={Path(d) / 'cg.out'}", sys.executable,
                              __file__, "--run", stack, "--calls", str(n),
                              "--depth", str(depth), "--response-size", str(size)],
                             capture_output=True, text=True, check=True)
    m = re.search(r"Collected : (\d+)", res.stderr)
    if m is None:
        raise SystemExit(f"no callgrind total in: {res.stderr[-500:]}")
    return int(m.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=2000, help="N (the runs make N and 2N calls)")
    ap.add_argument("--depth", type=int, default=8, help="calls in flight (default 8)")
    ap.add_argument("--response-size", type=int, default=32,
                    help="bytes per response (default 32)")
    ap.add_argument("--run", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run:
        run_calls(args.run, args.calls, args.depth, args.response_size)
        return
    per = {}
    for stack in ("drpc", "rpc2-tcp"):
        kind = "drpc" if stack == "drpc" else "rpc2"
        a = instructions(kind, args.calls, args.depth, args.response_size)
        b = instructions(kind, 2 * args.calls, args.depth, args.response_size)
        per[stack] = (b - a) / args.calls
        print(f"{stack:9} {per[stack]:>9,.0f} instructions per call (client + server)")
    print(f"rpc2-tcp / drpc: {per['rpc2-tcp'] / per['drpc']:.2f}x")
    packets = math.ceil(args.response_size / (1472 - 28))
    if packets > 1:
        print(f"drpc: {per['drpc'] / packets:,.0f} instructions per response packet "
              f"({packets} packets per response)")


if __name__ == "__main__":
    main()
