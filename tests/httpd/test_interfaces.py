"""ASGI (bare, Starlette, FastAPI) and WSGI (bare, Flask) apps, HTTP/2 with
curl and h2load, load tools (wrk), and nginx as a reverse proxy in front."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import subprocess
import tempfile
import time

import pytest
from core.helpers import TIMEOUT

from evpl.http import Response, StreamingResponse
from httpd.support import run, tool

# ---- apps ----

events: list[str] = []


async def bare_asgi(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            m = await receive()
            if m["type"] == "lifespan.startup":
                events.append("startup")
                scope["state"]["greeting"] = "hello from lifespan"
                await send({"type": "lifespan.startup.complete"})
            else:
                events.append("shutdown")
                await send({"type": "lifespan.shutdown.complete"})
                return
    assert scope["type"] == "http"
    if scope["path"] == "/boom":
        raise RuntimeError("app failure")
    if scope["path"] == "/stream":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain")]})
        for i in range(200):
            await send({"type": "http.response.body", "body": b"%04d\n" % i,
                        "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    body = b""
    while True:
        m = await receive()
        body += m.get("body", b"")
        if not m.get("more_body"):
            break
    out = json.dumps({"method": scope["method"], "path": scope["path"],
                      "query": scope["query_string"].decode(), "len": len(body),
                      "http_version": scope["http_version"],
                      "state": scope["state"].get("greeting"),
                      "host": dict(scope["headers"]).get(b"host", b"").decode()}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(out)).encode())]})
    await send({"type": "http.response.body", "body": out})


def bare_wsgi(environ, start_response):
    if environ["PATH_INFO"] == "/boom":
        raise RuntimeError("app failure")
    body = environ["wsgi.input"].read()
    out = json.dumps({"method": environ["REQUEST_METHOD"], "path": environ["PATH_INFO"],
                      "query": environ["QUERY_STRING"], "len": len(body),
                      "host": environ.get("HTTP_HOST")}).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [out]


def native(req):
    if req.path == "/big":
        return Response(b"b" * 100_000, content_type="application/octet-stream")
    if req.path == "/stream":
        return StreamingResponse(b"%04d\n" % i for i in range(200))
    return Response(json.dumps({"method": req.method, "len": len(req.body),
                                "version": req.version}), content_type="application/json")


def get_json(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    c.request(method, path, body=body)
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, json.loads(data) if r.status == 200 else {}


# ---- ASGI ----

def test_bare_asgi_app_with_lifespan_bodies_streams_and_errors(serve):
    events.clear()
    s = serve(bare_asgi, interface="asgi")
    assert events == ["startup"]

    def peer():
        out = [get_json(s.port, "GET", "/a%20b?x=1")]
        out.append(get_json(s.port, "POST", "/up", b"z" * 300_000))
        c = http.client.HTTPConnection("127.0.0.1", s.port, timeout=TIMEOUT)
        c.request("POST", "/chunked", body=iter([b"a" * 1000] * 50), encode_chunked=True)
        r = c.getresponse()
        out.append((r.status, json.loads(r.read())))
        c.request("GET", "/stream")
        r = c.getresponse()
        out.append((r.status, r.read()))
        c.request("GET", "/boom")
        r = c.getresponse()
        out.append((r.status, r.read()))
        c.close()
        return out

    out = s.run(peer)
    assert out[0][1]["path"] == "/a b" and out[0][1]["query"] == "x=1"
    assert out[0][1]["state"] == "hello from lifespan" and out[0][1]["http_version"] == "1.1"
    assert out[1][1]["len"] == 300_000 and out[2][1]["len"] == 50_000
    assert out[3] == (200, b"".join(b"%04d\n" % i for i in range(200)))
    assert out[4][0] == 500
    s.server.close()
    assert events == ["startup", "shutdown"]


def test_pipelined_asgi_requests_are_answered_in_order(serve):
    """16 pipelined requests in one write, plain GETs (queued from C) with a
    POST and a streamed response among them: one exchange at a time, every
    answer in request order, then the close the last one asks for."""
    s = serve(bare_asgi, interface="asgi")
    reqs = []
    for i in range(16):
        if i == 5:
            reqs.append(b"POST /up HTTP/1.1\r\nHost: h\r\nContent-Length: 7\r\n\r\n1234567")
        elif i == 9:
            reqs.append(b"GET /stream HTTP/1.1\r\nHost: h\r\n\r\n")
        else:
            last = b"Connection: close\r\n" if i == 15 else b""
            reqs.append(b"GET /p%d HTTP/1.1\r\nHost: h\r\n%s\r\n" % (i, last))

    def peer():
        import socket
        c = socket.create_connection(("127.0.0.1", s.port), timeout=TIMEOUT)
        c.sendall(b"".join(reqs))
        chunks = []
        while True:
            d = c.recv(65536)
            if not d:
                break
            chunks.append(d)
        c.close()
        return b"".join(chunks)

    data = s.run(peer)
    parts = data.split(b"HTTP/1.1 200 OK")[1:]
    assert len(parts) == 16, data[:300]
    paths = [json.loads(p.split(b"\r\n\r\n", 1)[1])["path"] for i, p in enumerate(parts)
             if i not in (5, 9)]
    assert paths == [f"/p{i}" for i in range(16) if i not in (5, 9)]
    assert json.loads(parts[5].split(b"\r\n\r\n", 1)[1])["len"] == 7
    assert b"0199\n" in parts[9]
    assert b"connection: close" in parts[15]


after_response: list[str] = []


async def awaitable_forms_asgi(scope, receive, send):
    """Awaits ``receive``/``send`` in the forms apps use besides a plain
    ``await``: through ``asyncio.wait_for``, ``asyncio.ensure_future`` and
    ``asyncio.gather``; a ``receive`` after the response gets
    ``http.disconnect`` (recorded in ``after_response``)."""
    if scope["type"] != "http":
        return
    body = b""
    while True:
        msg = await asyncio.wait_for(receive(), TIMEOUT)
        body += msg["body"]
        if not msg["more_body"]:
            break
    start = asyncio.ensure_future(send({"type": "http.response.start", "status": 200,
                                        "headers": [(b"content-type", b"text/plain")]}))
    await start
    await asyncio.gather(send({"type": "http.response.body", "body": body[:3],
                               "more_body": True}),
                         asyncio.sleep(0))
    await send({"type": "http.response.body", "body": body[3:]})
    after_response.append((await receive())["type"])


def test_asgi_send_and_receive_in_every_awaitable_form(serve):
    """send/receive return awaitables (a done Future, or a coroutine when
    they must wait), not coroutines of ``async def``: wait_for,
    ensure_future and gather take them, with a body that is there at once
    and a chunked one that may come in pieces."""
    after_response.clear()
    s = serve(awaitable_forms_asgi, interface="asgi")

    def peer():
        c = http.client.HTTPConnection("127.0.0.1", s.port, timeout=TIMEOUT)
        out = []
        c.request("POST", "/", body=b"hello world")
        r = c.getresponse()
        out.append((r.status, r.read()))
        c.request("POST", "/", body=iter([b"abc", b"defg"]), encode_chunked=True)
        r = c.getresponse()
        out.append((r.status, r.read()))
        c.close()
        return out

    assert s.run(peer) == [(200, b"hello world"), (200, b"abcdefg")]
    assert after_response == ["http.disconnect"] * 2


def test_asgi_100_continue_with_curl(serve):
    curl = tool("curl")
    s = serve(bare_asgi, interface="asgi")
    r = s.run(lambda: run([curl, "-sS", "-v", "-H", "Expect: 100-continue", "--data-binary",
                           "@-", s.url + "/up"], input=b"q" * 5000))
    assert json.loads(r.stdout)["len"] == 5000 and b"100 Continue" in r.stderr


def test_starlette_app(serve):
    starlette = pytest.importorskip("starlette", reason="starlette is in the test extra")
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.responses import StreamingResponse as SStream
    from starlette.routing import Route

    @asynccontextmanager
    async def lifespan(app):
        yield {"db": "connected"}

    async def home(request):
        return PlainTextResponse("Hello, world!")

    async def item(request):
        body = await request.body()
        return JSONResponse({"id": int(request.path_params["id"]),
                             "q": request.query_params.get("q"), "len": len(body),
                             "db": request.state.db})

    async def stream(request):
        async def gen():
            for i in range(100):
                yield f"{i}\n"
                await asyncio.sleep(0)
        return SStream(gen(), media_type="text/plain")

    app = Starlette(routes=[Route("/", home), Route("/items/{id}", item, methods=["GET", "POST"]),
                            Route("/stream", stream)], lifespan=lifespan)
    s = serve(app, interface="asgi")

    def peer():
        c = http.client.HTTPConnection("127.0.0.1", s.port, timeout=TIMEOUT)
        out = []
        for method, path, body in (("GET", "/", None), ("POST", "/items/7?q=x", b"abc"),
                                   ("GET", "/stream", None), ("GET", "/missing", None)):
            c.request(method, path, body=body)
            r = c.getresponse()
            out.append((r.status, r.read()))
        c.close()
        return out

    out = s.run(peer)
    assert starlette.__version__
    assert out[0] == (200, b"Hello, world!")
    assert json.loads(out[1][1]) == {"id": 7, "q": "x", "len": 3, "db": "connected"}
    assert out[2] == (200, "".join(f"{i}\n" for i in range(100)).encode())
    assert out[3][0] == 404


def test_fastapi_app(serve):
    fastapi = pytest.importorskip("fastapi", reason="FastAPI is not installed (optional peer)")
    app = fastapi.FastAPI()

    @app.post("/add")
    async def add(payload: dict) -> dict:
        return {"sum": payload["a"] + payload["b"]}

    s = serve(app, interface="asgi")

    def peer():
        c = http.client.HTTPConnection("127.0.0.1", s.port, timeout=TIMEOUT)
        c.request("POST", "/add", body=json.dumps({"a": 2, "b": 40}),
                  headers={"content-type": "application/json"})
        r = c.getresponse()
        return r.status, json.loads(r.read())

    assert s.run(peer) == (200, {"sum": 42})


# ---- WSGI ----

def test_bare_wsgi_app(serve):
    s = serve(bare_wsgi, interface="wsgi", workers=4)

    def peer():
        out = [get_json(s.port, "GET", "/x?y=1"), get_json(s.port, "PUT", "/p", b"w" * 200_000)]
        c = http.client.HTTPConnection("127.0.0.1", s.port, timeout=TIMEOUT)
        c.request("GET", "/boom")
        out.append(c.getresponse().status)
        return out

    out = s.run(peer)
    assert out[0][1] == {"method": "GET", "path": "/x", "query": "y=1", "len": 0,
                         "host": f"127.0.0.1:{s.port}"}
    assert out[1][1]["len"] == 200_000
    assert out[2] == 500


def test_flask_app(serve):
    flask = pytest.importorskip("flask", reason="flask is in the test extra")
    app = flask.Flask("evpl_test")

    @app.route("/")
    def home():
        return "Hello from Flask"

    @app.route("/echo", methods=["POST"])
    def echo():
        return flask.jsonify(n=len(flask.request.get_data()),
                             ct=flask.request.content_type)

    @app.route("/gen")
    def gen():
        return flask.Response((f"{i}\n" for i in range(2000)), mimetype="text/plain")

    s = serve(app, interface="wsgi")

    def peer():
        c = http.client.HTTPConnection("127.0.0.1", s.port, timeout=TIMEOUT)
        out = []
        for method, path, body, hs in (("GET", "/", None, {}),
                                       ("POST", "/echo", b"k" * 1234,
                                        {"content-type": "application/x-test"}),
                                       ("GET", "/gen", None, {}), ("GET", "/nope", None, {})):
            c.request(method, path, body=body, headers=hs)
            r = c.getresponse()
            out.append((r.status, r.read()))
        return out

    out = s.run(peer)
    assert out[0] == (200, b"Hello from Flask")
    assert json.loads(out[1][1]) == {"n": 1234, "ct": "application/x-test"}
    assert out[2] == (200, "".join(f"{i}\n" for i in range(2000)).encode())
    assert out[3][0] == 404


# ---- HTTP/2 ----

@pytest.mark.parametrize("interface,app", [("evpl", native), ("asgi", bare_asgi),
                                           ("wsgi", bare_wsgi)])
def test_http2_with_curl_prior_knowledge_and_h2c_upgrade(serve, interface, app):
    curl = tool("curl")
    s = serve(app, interface=interface)

    def peer():
        # one URL per curl: curl 7.88 fails to reuse a prior-knowledge
        # connection (curl issue 10634); h2load below runs many streams per connection
        a = run([curl, "-sS", "--http2-prior-knowledge", "-w", "\\n%{http_version}",
                 s.url + "/p?q=1"])
        b = run([curl, "-sS", "--http2", "-w", "\\n%{http_version}", "--data-binary", "@-",
                 s.url + "/post"], input=b"m" * 70_000)
        c = run([curl, "-sS", "--http2", "-w", "\\n%{http_version}", s.url + "/get"])
        return a, b, c

    a, b, c = s.run(peer)
    body, _, ver = a.stdout.rpartition(b"\n")
    assert ver == b"2", a.stderr
    assert json.loads(body)["method"] == "GET"
    # a POST with a body is not upgraded by curl (h2c needs a bodiless request):
    # it is served as HTTP/1.1, the GET is upgraded
    bbody, _, bver = b.stdout.rpartition(b"\n")
    assert json.loads(bbody)["len"] == 70_000 and bver in (b"1.1", b"2")
    assert c.stdout.rpartition(b"\n")[2] == b"2"


def test_http2_large_body_and_stream_with_flow_control(serve):
    curl = tool("curl")
    s = serve(native)
    r = s.run(lambda: run([curl, "-sS", "--http2-prior-knowledge", s.url + "/big"]))
    r2 = s.run(lambda: run([curl, "-sS", "--http2-prior-knowledge", s.url + "/stream"]))
    assert r.stdout == b"b" * 100_000
    assert r2.stdout == b"".join(b"%04d\n" % i for i in range(200))


def test_h2load_multiplexed_streams(serve):
    h2load = tool("h2load")
    s = serve(native)
    r = s.run(lambda: run([h2load, "-c", "8", "-m", "16", "-n", "4000", s.url + "/"]))
    out = r.stdout.decode()
    assert re.search(r"requests: 4000 total, 4000 started, 4000 done, 4000 succeeded", out), out
    r = s.run(lambda: run([h2load, "--h1", "-c", "8", "-m", "4", "-n", "2000", s.url + "/"]))
    assert "2000 succeeded, 0 failed" in r.stdout.decode(), r.stdout.decode()


def test_wrk_keepalive_and_pipelined(serve, tmp_path):
    wrk = tool("wrk")
    s = serve(native)
    script = tmp_path / "pipe.lua"
    script.write_text('init = function(args)\n local r = {}\n for i=1,16 do '
                      'r[i] = wrk.format(nil, "/") end\n req = table.concat(r)\nend\n'
                      'request = function() return req end\n')
    r = s.run(lambda: run([wrk, "-t1", "-c16", "-d1s", s.url + "/"]))
    r2 = s.run(lambda: run([wrk, "-t1", "-c16", "-d1s", "-s", str(script), s.url + "/"]))
    for res in (r, r2):
        out = res.stdout.decode()
        n = int(re.search(r"(\d+) requests in", out).group(1))
        assert n > 0 and "Non-2xx" not in out and "Socket errors" not in out, out


# ---- nginx in front ----

def test_nginx_reverse_proxy_in_front(serve, tmp_path):
    nginx = tool("nginx")
    s = serve(native)
    import socket as _s
    with _s.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    conf = tmp_path / "nginx.conf"
    conf.write_text(f"""
daemon off; master_process off; worker_processes 1; pid {tmp_path}/nginx.pid;
error_log {tmp_path}/error.log;
events {{ worker_connections 256; }}
http {{
  access_log off;
  client_body_temp_path {tmp_path}; proxy_temp_path {tmp_path};
  fastcgi_temp_path {tmp_path}; uwsgi_temp_path {tmp_path}; scgi_temp_path {tmp_path};
  upstream evpl {{ server 127.0.0.1:{s.port}; keepalive 8; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{ proxy_pass http://evpl; proxy_http_version 1.1;
                 proxy_set_header Connection ""; }}
  }}
}}
""")
    proc = subprocess.Popen([nginx, "-c", str(conf), "-p", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def peer():
            import time
            deadline = time.monotonic() + TIMEOUT
            while True:                        # nginx binds its port after it starts
                try:
                    _s.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise
                    time.sleep(0.05)
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
            out = []
            for method, path, body in (("GET", "/", None), ("POST", "/", b"p" * 100_000),
                                       ("GET", "/big", None), ("GET", "/stream", None)):
                c.request(method, path, body=body)
                r = c.getresponse()
                out.append((r.status, r.read()))
            return out

        out = s.run(peer)
    finally:
        proc.terminate()
        proc.wait(TIMEOUT)
    assert json.loads(out[0][1])["method"] == "GET"
    assert json.loads(out[1][1])["len"] == 100_000
    assert out[2] == (200, b"b" * 100_000)
    assert out[3] == (200, b"".join(b"%04d\n" % i for i in range(200)))


def cli_serve(tmp_path, app: str, *options: str) -> tuple[subprocess.Popen, int, str]:
    """``evpl http serve app --app-dir tmp_path options`` on a free port;
    returns the process, the port and the line it logs once it listens."""
    import socket as _s
    with _s.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(["evpl", "http", "serve", app, "--port", str(port),
                             "--app-dir", str(tmp_path), *options],
                            stderr=subprocess.PIPE, cwd=tempfile.gettempdir())
    return proc, port, proc.stderr.readline().decode()


def test_cli_serves_a_module(tmp_path):
    curl = tool("curl")
    (tmp_path / "myapp.py").write_text(
        "from evpl.http import Response\n"
        "def app(request):\n    return Response(b'cli ok')\n")
    proc, port, line = cli_serve(tmp_path, "myapp:app")
    try:
        assert "serving myapp:app (evpl interface)" in line, line
        r = run([curl, "-sS", f"http://127.0.0.1:{port}/"])
        assert r.stdout == b"cli ok"
    finally:
        proc.terminate()
        assert proc.wait(TIMEOUT) == 0                  # SIGTERM: graceful stop


def test_cli_serves_with_shards(tmp_path):
    """--shards 2: two processes with a SO_REUSEPORT socket each serve the
    port; SIGTERM stops both and the command exits 0."""
    curl = tool("curl")
    (tmp_path / "shardapp.py").write_text(
        "import os\nfrom evpl.http import Response\n"
        "def app(request):\n    return Response(str(os.getpid()).encode())\n")
    proc, port, line = cli_serve(tmp_path, "shardapp:app", "--shards", "2")
    try:
        assert "2 shards" in line, line                 # shard 0 listens
        pids = set()
        for _ in range(20):
            r = run([curl, "-sS", f"http://127.0.0.1:{port}/"])
            pids.add(int(r.stdout))
        assert pids and os.getpid() not in pids          # served by the shard processes
    finally:
        proc.terminate()
        assert proc.wait(TIMEOUT) == 0


def test_cli_shards_finish_requests_in_flight_on_sigterm(tmp_path):
    """--shards 2 and SIGTERM while a request is in the app: the shard
    stops accepting, finishes the request (its response arrives whole),
    and the command exits 0."""
    curl = tool("curl")
    marker = tmp_path / "started"
    (tmp_path / "slowapp.py").write_text(
        "import asyncio, pathlib\n"
        f"MARKER = pathlib.Path({str(marker)!r})\n"
        "async def app(scope, receive, send):\n"
        "    if scope['type'] != 'http':\n"
        "        return\n"
        "    MARKER.write_text('x')\n"
        "    await asyncio.sleep(1.0)\n"
        "    await send({'type': 'http.response.start', 'status': 200,\n"
        "                'headers': [(b'content-length', b'4')]})\n"
        "    await send({'type': 'http.response.body', 'body': b'done'})\n")
    proc, port, line = cli_serve(tmp_path, "slowapp:app", "--shards", "2")
    try:
        assert "2 shards" in line, line
        client = subprocess.Popen([curl, "-sS", "-m", str(TIMEOUT), f"http://127.0.0.1:{port}/"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + TIMEOUT
        while not marker.exists():                  # the request is in the app
            assert client.poll() is None and time.monotonic() < deadline, client.stderr.read()
            time.sleep(0.01)
        proc.terminate()
        out, err = client.communicate(timeout=TIMEOUT)
        assert client.returncode == 0 and out == b"done", err
        assert proc.wait(TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_refuses_bad_shard_counts(tmp_path):
    r = subprocess.run(["evpl", "http", "serve", "x:app", "--shards", "0"],
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode != 0 and "--shards must be >= 1" in r.stderr


@pytest.mark.parametrize("interface", ["asgi", "wsgi"])
def test_app_waits_for_a_slow_client(serve, interface):
    """A client that does not read: the ASGI app's ``await send()`` stops
    returning, the WSGI app's iterator stops being advanced, so the server
    never holds much more than its high-water mark of the 25 MiB response."""
    chunk = b"s" * 65536
    total = 400

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(total * len(chunk)).encode())]})
        for _ in range(total - 1):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": chunk})

    def wsgi_app(environ, start_response):
        start_response("200 OK", [("Content-Length", str(total * len(chunk)))])
        return (chunk for _ in range(total))

    s = serve(app if interface == "asgi" else wsgi_app, interface=interface,
              listen_opts={"high_water": 256 << 10, "sndbuf": 65536})
    import socket as _s
    c = _s.create_connection(("127.0.0.1", s.port))
    c.setsockopt(_s.SOL_SOCKET, _s.SO_RCVBUF, 65536)
    c.sendall(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    most = [0]

    def sample():
        for conn in s.server._conns:
            most[0] = max(most[0], conn.bind.queued_bytes)

    ticker = s.loop.call_every(0.001, sample)
    s.loop.run_until(lambda: any(conn.write_paused for conn in s.server._conns),
                     timeout=TIMEOUT)
    for _ in range(50):                 # room for an app that ignored the pause to run ahead
        s.loop.run_once(0.01)
    got = [0]

    def reader():
        head = b""
        while b"\r\n\r\n" not in head:
            head += c.recv(1)
        while got[0] < total * len(chunk):
            d = c.recv(1 << 20)
            if not d:
                break
            got[0] += len(d)

    import threading
    t = threading.Thread(target=reader)
    t.start()
    s.loop.run_until(lambda: not t.is_alive(), timeout=TIMEOUT * 3)
    ticker.cancel()
    c.close()
    assert got[0] == total * len(chunk)
    assert most[0] < 4 << 20, most[0]          # far below the 25 MiB body


@pytest.mark.parametrize("interface,app", [("asgi", bare_asgi), ("wsgi", bare_wsgi)])
def test_pipelined_requests_through_an_app_interface_stay_in_order(serve, interface, app):
    import socket as _s
    s = serve(app, interface=interface)
    reqs = b"".join(b"POST /r%d HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n%s"
                    % (i, i, b"x" * i) for i in range(40))
    reqs += b"GET /last HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"

    def peer():
        c = _s.create_connection(("127.0.0.1", s.port), timeout=TIMEOUT)
        c.sendall(reqs)
        buf = b""
        while d := c.recv(65536):
            buf += d
        c.close()
        return buf

    data = s.run(peer)
    bodies = [json.loads(part.split(b"\r\n\r\n", 1)[1].split(b"HTTP/1.1")[0])
              for part in data.split(b"HTTP/1.1 200 OK")[1:]]
    assert [b["path"] for b in bodies] == [f"/r{i}" for i in range(40)] + ["/last"]
    assert [b["len"] for b in bodies[:40]] == list(range(40))


def test_http2_garbage_after_the_preface_gets_goaway_and_a_close(serve):
    import socket as _s

    from evpl.http.wire import H2_PREFACE
    s = serve(native)

    def peer():
        c = _s.create_connection(("127.0.0.1", s.port), timeout=TIMEOUT)
        # a DATA frame on stream 0 where SETTINGS must come first: PROTOCOL_ERROR
        c.sendall(H2_PREFACE + b"\x00\x00\x08\x00\x00\x00\x00\x00\x00garbage!")
        buf = b""
        while d := c.recv(65536):
            buf += d
        c.close()
        ok = get_json(s.port, "GET", "/")
        return buf, ok

    buf, ok = s.run(peer)
    assert b"\x07\x00\x00\x00\x00\x00" in buf          # a GOAWAY frame (type 7, stream 0)
    assert ok[0] == 200 and s.server.protocol_errors == 1
