"""Instructions per message on evpl's per-message paths, counted by callgrind.

Timings on a shared VM move by 20%; callgrind's instruction counts do not
(the same binary and input give the same count whatever else runs). Each
scenario serves N messages in one process (an evpl server and a plain
non-blocking socket client over a unix socket) and is run twice under
``valgrind --tool=callgrind``, with N and with 1 message; the difference
divided by N-1 is the cost of one message, start-up excluded. The client's
Python (a send per 16 messages, a recv per read) is included, the kernel is
not (callgrind counts user space only). The rpc scenarios repeat within
~2%; the echo ones move by up to ~15% between runs, because how many
messages a read finds, and the loop's once-a-second housekeeping under
valgrind's slow clock, change the per-read costs spread over a message.

Scenarios:
  echo-batch  64-byte length-prefixed echo, ``on_messages`` + ``send_messages``
  echo-msg    the same with ``on_message`` + ``send`` (a Python call per message)
  rpc-null    rpc2 NULL calls (bench.x), 64 in flight
  rpc-get4k   rpc2 calls answering a 4 KiB opaque, 64 in flight

Usage: python benchmarks/instructions.py [scenario ...] [--n N]
(needs valgrind: apt-get install valgrind)
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCENARIOS = ("echo-batch", "echo-msg", "rpc-null", "rpc-get4k")


def _serve(scenario: str, n: int) -> None:
    """Run one scenario in this process (under callgrind when measured)."""
    import evpl

    loop = evpl.Loop(spin_ns=0)
    path = tempfile.mktemp(prefix="evpl-instr-", dir="/tmp")
    if scenario.startswith("echo"):
        per_message = scenario == "echo-msg"

        class Echo(evpl.Handler):
            def on_message(self, bind, msg):
                bind.send(msg)

        class BatchEcho(evpl.Handler):
            def on_messages(self, bind, msgs):
                bind.send_messages(msgs)

        loop.listen("unix", path, Echo if per_message else BatchEcho,
                    framing=evpl.framing.length_prefix(4))
        record = (60).to_bytes(4, "big") + b"x" * 60
        reply_len = len(record)
    else:
        from evpl.rpc2 import Server, load_x
        from evpl.rpc2.wire import encode_call

        bench = load_x(HERE / "rpc" / "bench.x", name="bench_x")
        data = b"y" * 4096

        class Bench(bench.BENCH_VERSServer):
            def BENCH_NULL(self) -> None:
                return None

            def BENCH_GET4K(self, size: int) -> bytes:
                return data

        server = Server(loop)
        server.register(bench.BENCH_PROG, bench.BENCH_VERS, Bench())
        server.listen("unix", path)
        proc = 0 if scenario == "rpc-null" else 1
        args = b"" if proc == 0 else (4096).to_bytes(4, "big")
        call = encode_call(1, bench.BENCH_PROG, bench.BENCH_VERS, proc, args)
        record = (0x80000000 | len(call)).to_bytes(4, "big") + call
        reply_len = 28 + (0 if proc == 0 else 4100)   # record mark + accepted head [+ opaque]
    client = socket.socket(socket.AF_UNIX)
    client.connect(path)
    client.setblocking(False)
    burst = record * 16
    sent = got = 0
    while got < n * reply_len:
        while sent < n and sent - got // reply_len < 64:
            k = min(16, n - sent)
            try:
                client.send(burst[:len(record) * k])
            except BlockingIOError:
                break
            sent += k
        while True:
            try:
                chunk = client.recv(1 << 20)
            except BlockingIOError:
                break
            got += len(chunk)
        loop.run_once(0.01)
    os.unlink(path)


def _count(scenario: str, n: int) -> int:
    """Instructions callgrind counts for a run of ``n`` messages."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        proc = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
             sys.executable, __file__, "--child", scenario, "--n", str(n)],
            capture_output=True, text=True, check=True)
        m = re.search(r"Collected : (\d+)", proc.stderr)
        if not m:
            raise RuntimeError(f"no count in valgrind's output:\n{proc.stderr[-2000:]}")
        return int(m.group(1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("scenarios", nargs="*", metavar="scenario",
                   help=f"any of {', '.join(SCENARIOS)} (default: all)")
    p.add_argument("--n", type=int, default=2001, help="messages per measured run")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _serve(args.child, args.n)
        return 0
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    for scenario in args.scenarios or SCENARIOS:
        per = (_count(scenario, args.n) - _count(scenario, 1)) / (args.n - 1)
        print(f"{scenario:12s} {per:9,.0f} instructions per message")
    return 0


if __name__ == "__main__":
    sys.exit(main())
