"""A drpc server in a process of its own (for incast and dead-server tests).

Serves request type 1 (answers ``b"ok"``) and 2 (echo) on 127.0.0.1, prints
its port, and runs until its stdin closes; then prints its counters as one
JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys

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


if __name__ == "__main__":
    main()
