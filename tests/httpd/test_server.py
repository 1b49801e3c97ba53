"""The server with the native interface against real peers: curl, Python's
http.client and urllib3, raw sockets for hostile input."""

from __future__ import annotations

import http.client
import json
import socket
import time

import pytest
from core.helpers import TIMEOUT
from hypothesis import given, settings
from hypothesis import strategies as st

import evpl
from evpl.http import Response, StreamingResponse, Upgrade
from httpd.support import run, tool


def app(req):
    if req.path == "/echo":
        return Response(req.body, headers=[("x-method", req.method)],
                        content_type="application/octet-stream")
    if req.path == "/boom":
        raise RuntimeError("the app failed")
    if req.path == "/badheader":
        return Response(b"x", headers=[("x-evil", "a\r\nset-cookie: x=1")])
    if req.path == "/stream":
        n = int(req.query or "10")
        return StreamingResponse((b"%06d\n" % i for i in range(n)), content_type="text/plain")
    if req.path == "/headers":
        return Response(json.dumps([[k.decode(), v.decode()] for k, v in req.headers]),
                        content_type="application/json")
    return Response(b"Hello, world!", content_type="text/plain")


def raw(port: int, data: bytes, *, read_all: bool = True, timeout: float = TIMEOUT) -> bytes:
    """Send ``data`` on a fresh connection, read until the server closes."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(data)
        chunks = []
        while True:
            try:
                d = s.recv(65536)
            except ConnectionResetError:
                break
            if not d:
                break
            chunks.append(d)
            if not read_all:
                break
        return b"".join(chunks)
    finally:
        s.close()


def test_curl_get_keepalive_head_and_post(serve):
    curl = tool("curl")
    s = serve(app)

    def peer():
        out = {}
        r = run([curl, "-sS", "-v", s.url + "/", s.url + "/"])  # two requests, one connection
        out["body"], out["err"] = r.stdout, r.stderr
        r = run([curl, "-sS", "-I", s.url + "/"])
        out["head"] = r.stdout
        r = run([curl, "-sS", "--data-binary", "@-", s.url + "/echo"], input=b"x" * 100000)
        out["post"] = r.stdout
        r = run([curl, "-sS", "-H", "Transfer-Encoding: chunked", "--data-binary", "@-",
                 s.url + "/echo"], input=b"y" * 50000)
        out["chunked"] = r.stdout
        r = run([curl, "-sS", "-v", "-H", "Expect: 100-continue", "--data-binary", "@-",
                 s.url + "/echo"], input=b"z" * 2000)
        out["expect"], out["expect_err"] = r.stdout, r.stderr
        return out

    out = s.run(peer)
    assert out["body"] == b"Hello, world!" * 2
    assert b"Re-using existing connection" in out["err"] or b"reusing" in out["err"].lower()
    assert out["head"].startswith(b"HTTP/1.1 200 OK") and b"content-length: 13" in out["head"]
    assert out["post"] == b"x" * 100000
    assert out["chunked"] == b"y" * 50000
    assert out["expect"] == b"z" * 2000 and b"HTTP/1.1 100 Continue" in out["expect_err"]


def test_http_client_keepalive_stream_and_errors(serve):
    s = serve(app)

    def peer():
        c = http.client.HTTPConnection("127.0.0.1", s.port, timeout=TIMEOUT)
        res = []
        for path in ("/", "/stream?1000", "/boom", "/badheader", "/"):
            c.request("GET", path)
            r = c.getresponse()
            res.append((r.status, r.getheader("transfer-encoding"), r.read()))
        c.request("POST", "/echo", body=iter([b"ab", b"cd"]), encode_chunked=True)
        r = c.getresponse()
        res.append((r.status, r.getheader("x-method"), r.read()))
        c.close()
        return res

    res = s.run(peer)
    assert res[0] == (200, None, b"Hello, world!")
    assert res[1][:2] == (200, "chunked")
    assert res[1][2] == b"".join(b"%06d\n" % i for i in range(1000))
    assert res[2][0] == 500 and res[3][0] == 500         # app error, injected header
    assert res[4] == (200, None, b"Hello, world!")       # the server carried on
    assert res[5] == (200, "POST", b"abcd")


def test_urllib3_pool(serve):
    urllib3 = pytest.importorskip("urllib3", reason="urllib3 is in the test extra")
    s = serve(app)

    def peer():
        pool = urllib3.HTTPConnectionPool("127.0.0.1", s.port, maxsize=2)
        out = [pool.request("GET", "/headers", headers={"X-Test": "1"}).json()
               for _ in range(5)]
        out.append(pool.request("POST", "/echo", body=b"q" * 70000).data)
        return out

    out = s.run(peer)
    assert ["x-test", "1"] in out[0] and all(o == out[0] for o in out[:5])
    assert out[5] == b"q" * 70000


def test_pipelined_requests_answered_in_order_in_one_read(serve):
    s = serve(app)
    reqs = b"".join(b"GET /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\n%02d" % i
                    for i in range(50))
    reqs += b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
    data = s.run(lambda: raw(s.port, reqs))
    bodies = [p.split(b"\r\n\r\n", 1)[1][:2] for p in data.split(b"HTTP/1.1 200 OK")[1:]]
    assert bodies[:50] == [b"%02d" % i for i in range(50)]
    assert data.endswith(b"Hello, world!") and data.count(b"HTTP/1.1 200 OK") == 51


def test_plain_and_other_requests_mixed_in_one_read_keep_their_order(serve):
    """Plain GETs take the server's C path (evpl.http._fast), the others
    (a body, HEAD, a streaming response, a refused response header, which
    closes the connection) the Python path; mixed in one read, every answer
    comes in request order."""
    s = serve(app)

    def get(n, path="/headers", extra=b""):
        return b"GET %s HTTP/1.1\r\nHost: h\r\nX-N: %d\r\n%s\r\n" % (path.encode(), n, extra)

    reqs = (get(0) + get(1) + b"POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc"
            + get(2) + b"HEAD / HTTP/1.1\r\nHost: h\r\n\r\n" + get(3) + get(4, "/stream?3")
            + get(5) + get(7) + get(6, "/badheader") + get(8))
    data = s.run(lambda: raw(s.port, reqs))
    parts = data.split(b"HTTP/1.1 ")[1:]
    assert len(parts) == 10, data
    seen = [json.loads(p.split(b"\r\n\r\n", 1)[1]) for p in parts
            if b"application/json" in p.split(b"\r\n\r\n", 1)[0]]
    order = [dict(h)["x-n"] for h in seen]
    assert order == ["0", "1", "2", "3", "5", "7"]
    assert parts[2].endswith(b"abc") and b"x-method: POST" in parts[2]
    assert parts[4].startswith(b"200 OK") and parts[4].endswith(b"\r\n\r\n")     # HEAD: no body
    assert parts[6].startswith(b"200 OK") and b"000002" in parts[6]            # streamed
    assert parts[9].startswith(b"500 ") and b"connection: close" in parts[9]


def test_pipelined_behind_a_streaming_response_waits_its_turn(serve):
    s = serve(app)
    reqs = (b"GET /stream?20000 HTTP/1.1\r\nHost: h\r\n\r\n"
            b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    data = s.run(lambda: raw(s.port, reqs))
    first, _, second = data.partition(b"0\r\n\r\nHTTP/1.1 200 OK")
    assert first.count(b"\n") > 20000 and second.endswith(b"Hello, world!")


def test_http10_and_connection_close(serve):
    s = serve(app)
    d1 = s.run(lambda: raw(s.port, b"GET / HTTP/1.0\r\n\r\n"))
    assert d1.startswith(b"HTTP/1.1 200 OK") and b"connection: close" in d1
    d2 = s.run(lambda: raw(s.port, b"GET /stream?3 HTTP/1.0\r\n\r\n"))
    assert b"transfer-encoding" not in d2 and d2.endswith(b"000002\n")    # close-delimited


@pytest.mark.parametrize("data,status", [
    (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 30\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: h\r\nX: a\r\n b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: h\r\nX: a\rb\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: h\r\nBad Name: b\r\n\r\n", 400),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: h\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\nHost: h\r\n" + b"X-A: " + b"b" * 70000 + b"\r\n\r\n", 431),
    (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 999999999\r\n\r\n", 413),
    (b"GET / HTTP/1.1\r\n\r\n", 400),
])
def test_hostile_requests_get_an_error_and_a_close(serve, data, status):
    s = serve(app)
    out = s.run(lambda: raw(s.port, data))
    assert out.startswith(b"HTTP/1.1 %d " % status), out[:80]
    assert b"connection: close" in out
    assert b"/smuggled" not in out and out.count(b"\r\n\r\n") == 1     # one response


def test_good_requests_before_a_bad_one_are_answered_first(serve):
    s = serve(app)
    out = s.run(lambda: raw(s.port, b"GET / HTTP/1.1\r\nHost: h\r\n\r\nGET\x01 / HTTP/1.1\r\n\r\n"))
    assert out.startswith(b"HTTP/1.1 200 OK") and b"HTTP/1.1 400 Bad Request" in out


def test_upgrade_hand_off_to_a_handler(serve):
    class Echo(evpl.Handler):
        def on_data(self, bind, data):
            bind.send(b"echo:" + bytes(data))

    def upgrading(req):
        if req.upgrade == b"echo":
            return Upgrade("echo", Echo())
        return app(req)

    s = serve(upgrading)

    def peer():
        c = socket.create_connection(("127.0.0.1", s.port), timeout=TIMEOUT)
        c.sendall(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\nhi")
        buf = b""
        while b"echo:hi" not in buf:
            buf += c.recv(1000)
        c.sendall(b"more")
        while b"echo:more" not in buf:
            buf += c.recv(1000)
        # an upgrade the app does not take is served as a plain request
        c2 = socket.create_connection(("127.0.0.1", s.port), timeout=TIMEOUT)
        c2.sendall(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\nUpgrade: other\r\n\r\n"
                   b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        buf2 = b""
        while d := c2.recv(1000):
            buf2 += d
        c.close()
        c2.close()
        return buf, buf2

    buf, buf2 = s.run(peer)
    assert buf.startswith(b"HTTP/1.1 101 Switching Protocols") and b"upgrade: echo" in buf
    assert buf2.count(b"Hello, world!") == 2


def test_slowloris_connections_get_408_and_others_are_served(serve):
    s = serve(app, header_timeout=0.5, keepalive_timeout=30)
    n = 1000

    def peer():
        socks = []
        for _ in range(n):
            c = socket.create_connection(("127.0.0.1", s.port), timeout=TIMEOUT * 3)
            c.sendall(b"GET / HTTP/1.1\r\nHost: h\r\nX-Slow: ")
            socks.append(c)
        good = raw(s.port, b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        answers = []
        for c in socks:
            buf = b""
            while d := c.recv(1000):
                buf += d
            answers.append(buf)
            c.close()
        return good, answers

    good, answers = s.run(peer, timeout=TIMEOUT * 6)
    assert good.endswith(b"Hello, world!")
    assert all(a.startswith(b"HTTP/1.1 408 ") for a in answers)
    assert s.server.timeouts >= n


def test_idle_keepalive_connection_is_closed(serve):
    s = serve(app, keepalive_timeout=0.3)

    def peer():
        c = socket.create_connection(("127.0.0.1", s.port), timeout=TIMEOUT)
        c.sendall(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        buf = b""
        while d := c.recv(1000):            # the response, then EOF after the idle timeout
            buf += d
        c.close()
        return buf

    assert s.run(peer).endswith(b"Hello, world!")


def test_max_connections_gives_503(serve):
    s = serve(app, max_connections=2)

    def peer():
        a = socket.create_connection(("127.0.0.1", s.port), timeout=TIMEOUT)
        b = socket.create_connection(("127.0.0.1", s.port), timeout=TIMEOUT)
        a.sendall(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        b.sendall(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        a.recv(1000)
        b.recv(1000)                          # both are in: the server counted them
        third = raw(s.port, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        a.close()
        b.close()
        return third

    assert s.run(peer).startswith(b"HTTP/1.1 503 ")
    assert s.server.refused == 1


def test_slow_reader_backpressure_bounds_memory(serve):
    """A client that does not read: the streaming iterator stops being pulled
    once the send queue is full, instead of buffering the whole body."""
    pulled = []

    def gen():
        for i in range(100000):
            pulled.append(i)
            yield b"x" * 16384

    s = serve(lambda req: StreamingResponse(gen()),
              listen_opts={"high_water": 256 << 10, "sndbuf": 65536})
    c = socket.create_connection(("127.0.0.1", s.port))
    c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    c.sendall(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    s.loop.run_until(lambda: len(pulled) > 10, timeout=TIMEOUT)
    stalled_at = None
    # run the loop until the server stops pulling (the send queue is full)
    for _ in range(200):
        before = len(pulled)
        s.loop.run_once(0.02)
        if len(pulled) == before:
            stalled_at = before
            break
    assert stalled_at is not None and stalled_at < 200   # ~3 MiB, far from 1.6 GiB
    c.setblocking(False)
    got = 0
    deadline = time.monotonic() + TIMEOUT
    while len(pulled) < stalled_at + 50 and time.monotonic() < deadline:
        try:
            got += len(c.recv(1 << 20))
        except BlockingIOError:
            pass
        s.loop.run_once(0.001)
    assert len(pulled) >= stalled_at + 50 and got > 0      # reading resumed the stream
    c.close()


def test_graceful_shutdown_finishes_in_flight_and_refuses_new(loop):
    from httpd.support import Served

    holder = {}

    def gen():
        yield b"first "
        holder["go"] = True
        yield b"second"

    s = Served(loop, lambda req: StreamingResponse(gen()) if req.path == "/slow" else
               Response(b"ok"))

    def peer():
        c = http.client.HTTPConnection("127.0.0.1", s.port, timeout=TIMEOUT)
        c.request("GET", "/slow")
        r = c.getresponse()
        return r.status, r.read(), r.getheader("connection")

    from core.helpers import InThread
    t = InThread(loop, peer)
    loop.run_until(lambda: holder.get("go"), timeout=TIMEOUT)
    s.server.shutdown(timeout=TIMEOUT)
    loop.run_until(t.done, timeout=TIMEOUT)
    status, body, _ = t.get()
    assert status == 200 and body == b"first second"
    assert s.server.connections == 0 and s.listener.closed


def test_fuzzed_bytes_never_break_the_server(serve):
    """Random bytes on one connection, then a good request on another: the
    server answers the second every time (no crash, no hang for the others),
    and nothing it does leaks (checked at teardown)."""
    s = serve(app, header_timeout=0.5, keepalive_timeout=0.5)

    @settings(max_examples=150)
    @given(st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=5))
    def one(chunks):
        def peer():
            c = socket.create_connection(("127.0.0.1", s.port), timeout=TIMEOUT)
            try:
                for ch in chunks:
                    c.sendall(ch)
            except OSError:
                pass
            good = raw(s.port, b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
            c.close()
            return good

        assert s.run(peer).endswith(b"Hello, world!")

    one()
    s.loop.run_until(lambda: s.server.connections == 0, timeout=TIMEOUT)


INET_STREAM = [b.name for b in evpl.backends()
               if b.available and b.kind == "stream" and "inet" in b.capabilities]


@pytest.mark.parametrize("backend", INET_STREAM)
def test_every_inet_stream_backend_serves(serve, backend):
    s = serve(app, backend=backend)
    reqs = b"".join(b"GET /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\n\r\n%d" % (i % 10)
                    for i in range(30)) + b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"

    def peer():
        c = http.client.HTTPConnection("127.0.0.1", s.port, timeout=TIMEOUT)
        c.request("POST", "/echo", body=b"b" * 200_000)
        r = c.getresponse()
        return r.read(), raw(s.port, reqs)

    big, piped = s.run(peer)
    assert big == b"b" * 200_000
    assert piped.count(b"HTTP/1.1 200 OK") == 31 and piped.endswith(b"Hello, world!")


def test_a_stream_that_fails_midway_is_cut_not_completed(serve):
    def gen():
        yield b"partial "
        raise RuntimeError("generator failed")

    s = serve(lambda req: StreamingResponse(gen()) if req.path == "/bad" else app(req))

    def peer():
        c = http.client.HTTPConnection("127.0.0.1", s.port, timeout=TIMEOUT)
        c.request("GET", "/bad")
        r = c.getresponse()
        try:
            r.read()
            cut = False
        except http.client.IncompleteRead:
            cut = True
        c.close()
        return cut, raw(s.port, b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")

    cut, after = s.run(peer)
    assert cut and after.endswith(b"Hello, world!")
