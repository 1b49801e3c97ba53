"""Instructions per HTTP request through the evpl server's native path,
in-process (no sockets, no kernel): what the Python side costs, measured by
callgrind so the number does not move with the machine's load.

    flock /tmp/evpl-bench.lock python benchmarks/http_cost.py

It feeds a typical wrk request (one per read, then 16 pipelined per read)
to a server connection whose Bind is a stand-in that drops what is sent,
and reports (instructions with N requests - instructions with none) / N.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

_CHILD = r'''
import sys
import evpl
from evpl.http import Response, Server
from evpl.http.server import _Conn


class DropBind:
    closed = False
    reading = True
    peer_address = ("127.0.0.1", 1)

    def sendv(self, out): pass
    def send(self, data): pass
    def resume_reading(self): pass
    def pause_reading(self): pass
    def finish(self): pass


def app(req):
    return Response(b"Hello, world!", content_type="text/plain")


loop = evpl.Loop()
server = Server(loop, app)
conn = _Conn(server)
conn.bind = DropBind()
conn.sniffed = conn.plain = True
req = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n"
n, per_read = int(sys.argv[1]), int(sys.argv[2])
data = req * per_read
for _ in range(n // per_read):
    conn.on_data(None, data)
server.close()
loop.close()
'''


def instructions(n: int, per_read: int) -> int:
    out = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
                          sys.executable, "-c", _CHILD, str(n), str(per_read)],
                         capture_output=True, text=True, check=True).stderr
    return int(re.search(r"Collected : (\d+)", out).group(1))


def main() -> int:
    if shutil.which("valgrind") is None:
        print("valgrind is needed (Debian package valgrind)")
        return 2
    base = instructions(0, 1)
    for n, per_read in ((4000, 1), (8000, 16)):
        cost = (instructions(n, per_read) - base) / n
        print(f"{per_read:2d} request(s) per read: {cost:,.0f} instructions per request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
