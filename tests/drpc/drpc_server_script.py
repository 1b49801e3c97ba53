"""A drpc server in a process of its own (for incast, stall and dead-server
tests).

Serves request type 1 (answers ``b"ok"``) and 2 (echo) on 127.0.0.1, prints
its port, and runs until its stdin closes; then prints its counters as one
JSON line. Tests start it with :func:`server_process`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import evpl
from evpl.drpc import Server


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--backend", default="udp")
    args = ap.parse_args()
    loop = evpl.Loop()
    server = Server(loop, args.backend, ("127.0.0.1", 0))
    server.register(1, lambda req: b"ok")
    server.register(2, lambda req: req.body)
    eof = []

    def stdin_readable() -> None:
        if not sys.stdin.buffer.raw.read(4096):
            eof.append(True)

    loop.watch_fd(sys.stdin.fileno(), on_readable=stdin_readable)
    print(server.address[1], flush=True)
    loop.run_until(lambda: eof)
    print(json.dumps(server.stats()), flush=True)
    server.close()
    loop.close()


@contextlib.contextmanager
def server_process(backend: str) -> Iterator[tuple[Any, int]]:
    """This script's server over ``backend``: yields the process and its port.
    Close its stdin and read :func:`counters`; on the way out a process still
    running (or stopped with SIGSTOP) is continued and killed."""
    server = subprocess.Popen([sys.executable, __file__, "--backend", backend],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdin is not None
        yield server, int(server.stdout.readline())
    finally:
        if server.poll() is None:
            os.kill(server.pid, signal.SIGCONT)
            server.kill()
            server.wait()


def counters(server: Any) -> dict[str, Any]:
    """Stop the server (its stdin closes) and return the counters it prints."""
    server.stdin.close()
    served = json.loads(server.stdout.readline())
    server.wait(10)
    return served  # type: ignore[no-any-return]


if __name__ == "__main__":
    main()
