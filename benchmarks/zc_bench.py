"""Zero-copy sends on this machine: an evpl io_uring_tcp sender streams
messages into the C sink (``echo_epoll --mode sink``) with ``zc_threshold``
off and on, and reports Gbit/s and the sender's CPU per MiB.

This is the measurement behind ``zc_threshold=0`` (off) being the default
and behind not registering the pool as fixed buffers (docs/benchmarks.md):
fixed buffers only make zero-copy sends cheaper.

    python benchmarks/zc_bench.py [--repeat 3] [--duration 2] [--size 1048576]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

from run import BUILD, build

import evpl

SERVER_CORE, SENDER_CORE = "1", 0


class Sender(evpl.Handler):
    """Keeps about 8 messages queued: sends more whenever the queue drains."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.sent = 0
        self.bind: evpl.Bind | None = None

    def on_connected(self, bind: evpl.Bind) -> None:
        self.bind = bind
        self.top_up()

    def on_sent(self, bind: evpl.Bind) -> None:
        self.top_up()

    def top_up(self) -> None:
        assert self.bind is not None
        while self.bind.queued_bytes < 8 * len(self.payload):
            self.bind.send(self.payload)
            self.sent += len(self.payload)


def one_run(zc_threshold: int, size: int, duration: float) -> tuple[float, float]:
    """(Gbit/s, sender CPU µs per MiB) for one run."""
    server = subprocess.Popen(["taskset", "-c", SERVER_CORE, str(BUILD / "echo_epoll"),
                               "--mode", "sink", "--port", "0"],
                              stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline().split()[1])  # type: ignore[union-attr]
        os.sched_setaffinity(0, {SENDER_CORE})
        with evpl.Loop(zc_threshold=zc_threshold) as loop:
            sender = Sender(os.urandom(size))
            loop.connect("io_uring_tcp", ("127.0.0.1", port), sender)
            loop.run_until(lambda: sender.bind is not None, timeout=5)
            loop.run_until(lambda: sender.sent > 64 * size, timeout=30)   # warm-up
            start_sent, t0 = sender.sent, time.perf_counter()
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            loop.run_until(lambda: time.perf_counter() - t0 >= duration, timeout=duration + 30)
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            elapsed = time.perf_counter() - t0
            nbytes = sender.sent - start_sent
            zc = loop.stats()["zc_sends"]
            if zc_threshold and not zc:
                raise RuntimeError("zc_threshold set but no SEND_ZC was issued")
        cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        return nbytes * 8 / elapsed / 1e9, cpu / (nbytes / (1 << 20)) * 1e6
    finally:
        server.terminate()
        server.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=3, help="runs per setting (median)")
    p.add_argument("--duration", type=float, default=2.0, help="measured seconds per run")
    p.add_argument("--size", type=int, default=1 << 20, help="message size in bytes")
    opts = p.parse_args(argv)
    build(verbose=False)
    print(f"| zc_threshold | Gbit/s (median of {opts.repeat}) | sender CPU µs/MiB |")
    print("|---|--:|--:|")
    for zc in (0, 64 << 10):
        runs = [one_run(zc, opts.size, opts.duration) for _ in range(opts.repeat)]
        gbit = statistics.median(r[0] for r in runs)
        cpu = statistics.median(r[1] for r in runs)
        print(f"| {zc or 'off'} | {gbit:.1f} | {cpu:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
