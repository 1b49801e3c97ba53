#!/usr/bin/env python3
"""Instructions per evpl.zmtp round trip, counted by callgrind.

REQ/REP round trips between two processes are dominated on a shared VM by
how much of its core each process gets; callgrind's instruction counts are
not (the same code and input give the same count whatever else runs). Here an
evpl.zmtp REQ and an evpl.zmtp REP run on one Loop in one process over an
ipc (unix socket) connection; the REQ sends the next request from its reply
callback, as benchmarks/zmtp_bench.py's REQ does. The run is counted twice
under ``valgrind --tool=callgrind``, with N round trips and with 1; the
difference divided by N-1 is the user-space cost of one round trip, both
sides together (the REQ's send and receive, the REP's receive and send),
start-up and handshake excluded. The kernel is not counted: the system calls
per round trip are printed next to it (strace -c, when installed), since
that is the other half of a round trip's cost.

Usage: python benchmarks/zmtp_cost.py [--n N] [--top K]
(needs valgrind; --top K prints the K costliest functions, inclusive, from
callgrind_annotate)
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def _serve(n: int) -> None:
    """N REQ/REP round trips of a 64-byte message in this process."""
    import evpl
    import evpl.zmtp as ez

    loop = evpl.Loop(spin_ns=0)
    path = tempfile.mktemp(prefix="evpl-zcost-", dir="/tmp")
    rep = ez.Socket(loop, "REP")
    rep.on_message = rep.send_multipart          # echo, as the benchmark's REP
    rep.bind(f"ipc://{path}")
    frames = [b"x" * 64]
    left = [n]

    def on_reply(m: list[object]) -> None:
        left[0] -= 1
        if left[0] > 0:
            req.send_multipart(frames)
        else:
            loop.stop()
    req = ez.Socket(loop, "REQ", on_message=on_reply)
    req.connect(f"ipc://{path}")
    req.send_multipart(frames)
    loop.run()
    os.unlink(path)


def _count(n: int, out: Path) -> int:
    proc = subprocess.run(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
         sys.executable, __file__, "--child", "--n", str(n)],
        capture_output=True, text=True, check=True)
    m = re.search(r"Collected : (\d+)", proc.stderr)
    if not m:
        raise RuntimeError(f"no count in valgrind's output:\n{proc.stderr[-2000:]}")
    return int(m.group(1))


def _syscalls(n: int) -> dict[str, int]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "strace.txt"
        subprocess.run(["strace", "-c", "-o", str(out), sys.executable, __file__, "--child",
                        "--n", str(n)], capture_output=True, check=True)
        calls: dict[str, int] = {}
        for line in out.read_text().splitlines():
            f = line.split()
            if len(f) >= 5 and f[0][0].isdigit() and f[-1] != "total":
                calls[f[-1]] = int(f[3])
        return calls


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("--n", type=int, default=2001, help="round trips per measured run")
    p.add_argument("--top", type=int, default=0, help="print the K costliest functions")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _serve(args.n)
        return 0
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        big, small = Path(tmp) / "n.out", Path(tmp) / "1.out"
        per = (_count(args.n, big) - _count(1, small)) / (args.n - 1)
        print(f"REQ/REP round trip (both sides, user space): {per:9,.0f} instructions")
        if args.top and shutil.which("callgrind_annotate"):
            ann = subprocess.run(["callgrind_annotate", "--inclusive=yes", str(big)],
                                 capture_output=True, text=True).stdout
            rows = [ln for ln in ann.splitlines() if re.match(r"\s*[\d,]+ \(", ln)]
            for ln in rows[:args.top]:
                print("  " + ln.strip()[:150])
    if shutil.which("strace"):
        a, b = _syscalls(args.n), _syscalls(1)
        per_rt = {k: (v - b.get(k, 0)) / (args.n - 1) for k, v in a.items()}
        print("system calls per round trip (both sides): " + ", ".join(
            f"{k} {v:.2f}" for k, v in sorted(per_rt.items(), key=lambda kv: -kv[1])
            if v >= 0.05))
    return 0


if __name__ == "__main__":
    sys.exit(main())
