"""Instructions per HTTP request through the evpl server's native path,
in-process (no sockets, no kernel): what the Python side costs, measured by
callgrind so the number does not move with the machine's load.

    flock /tmp/evpl-bench.lock python benchmarks/http_cost.py

It feeds a typical wrk request (one per read, then 16 pipelined per read)
to a server connection whose Bind is a stand-in that drops what is sent,
and reports (instructions with N requests - instructions with none) / N.
Then the same over HTTP/2 (h2load's requests: one stream per request, one
or 16 HEADERS frames per read), and through the ASGI interface (a bare app
and the same in Starlette, the apps of http_apps.py). Last, the least an
ASGI request costs on asyncio whatever the server: one asyncio Task of an
empty coroutine, made and run to its end on the server's asyncio loop
(ASGI apps need a Task per request: anyio, so Starlette and FastAPI, look
up ``asyncio.current_task()``).
"""

from __future__ import annotations

import os
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
    local_address = ("127.0.0.1", 8080)

    def sendv(self, out): pass
    def send(self, data): pass
    def resume_reading(self): pass
    def pause_reading(self): pass
    def finish(self): pass


def app(req):
    return Response(b"Hello, world!", content_type="text/plain")


loop = evpl.Loop()
if sys.argv[3] == "task":
    from asyncio import Task
    from evpl.aio import attach

    aloop = attach(loop)

    async def nothing():
        pass

    for _ in range(int(sys.argv[1])):
        Task(nothing(), loop=aloop, name="x")
        loop.run_once(0)
    aloop.close()
    loop.close()
    sys.exit(0)
if sys.argv[3] == "asgi":
    sys.path.insert(0, sys.argv[5])
    import http_apps
    server = Server(loop, getattr(http_apps, sys.argv[4]), interface="asgi")
else:
    server = Server(loop, app)
conn = _Conn(server)
conn.bind = DropBind()
conn.sniffed = conn.plain = True
req = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n"
n, per_read = int(sys.argv[1]), int(sys.argv[2])
if sys.argv[3] in ("h1", "asgi"):
    data = req * per_read
    for _ in range(n // per_read):
        conn.on_data(None, data)
        if sys.argv[3] == "asgi":
            while conn.current is not None or conn.backlog:
                loop.run_once(0)          # the app's task runs in the Loop's iteration
else:
    # HTTP/2 as h2load sends it: HEADERS with END_STREAM per request, HPACK-
    # indexed after the first, a connection WINDOW_UPDATE per read. The reads
    # are built in both runs (argv[4] says whether to feed them) so only the
    # serving is counted
    from evpl.http import h2wire

    def frame(ftype, flags, sid, payload):
        return len(payload).to_bytes(3, "big") + bytes((ftype, flags)) + \
            sid.to_bytes(4, "big") + payload

    conn.bind = DropBind()
    conn._to_h2(h2wire.PREFACE + frame(4, 0, 0, b""), None)
    enc = h2wire.Encoder()
    hs = [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http"),
          (b":authority", b"127.0.0.1:8080"), (b"accept", b"*/*"),
          (b"accept-encoding", b"gzip, deflate"), (b"user-agent", b"h2load nghttp2/1.52.0")]
    reads, sid = [], 1
    for _ in range(n // per_read):
        parts = []
        for _ in range(per_read):
            parts.append(frame(1, 5, sid, enc.encode(hs)))
            sid += 2
        parts.append(frame(8, 0, 0, (13 * per_read).to_bytes(4, "big")))
        reads.append(b"".join(parts))
    if sys.argv[4] == "feed":
        for data in reads:
            conn.on_data(None, data)
server.close()
loop.close()
'''


def instructions(n: int, per_read: int, proto: str = "h1", feed: str = "feed") -> int:
    out = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
                          sys.executable, "-c", _CHILD, str(n), str(per_read), proto, feed,
                          os.path.dirname(os.path.abspath(__file__))],
                         capture_output=True, text=True, check=True).stderr
    return int(re.search(r"Collected : (\d+)", out).group(1))


def main() -> int:
    if shutil.which("valgrind") is None:
        print("valgrind is needed (Debian package valgrind)")
        return 2
    base = instructions(0, 1)
    for n, per_read in ((4000, 1), (8000, 16)):
        cost = (instructions(n, per_read) - base) / n
        print(f"HTTP/1.1, {per_read:2d} request(s) per read: {cost:,.0f} instructions per request")
    for n, per_read in ((4000, 1), (8000, 16)):
        cost = (instructions(n, per_read, "h2") - instructions(n, per_read, "h2", "build")) / n
        print(f"HTTP/2,   {per_read:2d} request(s) per read: {cost:,.0f} instructions per request")
    for app in ("asgi", "starlette"):
        base = instructions(0, 1, "asgi", app)
        for n, per_read in ((2000, 1), (4000, 16)):
            cost = (instructions(n, per_read, "asgi", app) - base) / n
            print(f"ASGI {app}, {per_read:2d} request(s) per read: {cost:,.0f} instructions"
                  " per request")
    cost = (instructions(4000, 1, "task") - instructions(0, 1, "task")) / 4000
    print(f"an empty asyncio Task, made and run: {cost:,.0f} instructions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
