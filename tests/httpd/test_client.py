"""evpl.http.Client against real servers: nginx, Python's http.server, and
the evpl server."""

from __future__ import annotations

import http.server
import socket
import subprocess
import threading
import time

import pytest
from core.helpers import TIMEOUT

import evpl
from evpl.http import Client, Response
from httpd.support import tool


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def nginx(tmp_path):
    """nginx serving tmp_path/www on a loopback port, with a redirect and a
    chunked (unknown-length) location."""
    exe = tool("nginx")
    www = tmp_path / "www"
    www.mkdir()
    (www / "small.txt").write_bytes(b"hello nginx\n")
    (www / "big.bin").write_bytes(bytes(range(256)) * 4096)      # 1 MiB
    port = free_port()
    conf = tmp_path / "nginx.conf"
    conf.write_text(f"""
daemon off; master_process off; worker_processes 1; pid {tmp_path}/nginx.pid;
error_log {tmp_path}/error.log;
events {{ worker_connections 256; }}
http {{
  access_log off;
  client_body_temp_path {tmp_path}; proxy_temp_path {tmp_path};
  fastcgi_temp_path {tmp_path}; uwsgi_temp_path {tmp_path}; scgi_temp_path {tmp_path};
  server {{
    listen 127.0.0.1:{port};
    root {www};
    keepalive_requests 1000;
    location = /moved {{ return 302 /small.txt; }}
    location = /echo-len {{ return 200 "len=$content_length te=$http_transfer_encoding"; }}
  }}
}}
""")
    proc = subprocess.Popen([exe, "-c", str(conf), "-p", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, "nginx did not start"
            time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", www
    proc.terminate()
    proc.wait(TIMEOUT)


def test_client_against_nginx_keepalive_pipelining_redirects(loop, nginx):
    base, www = nginx
    client = Client(loop, pipeline=8, max_per_host=2, follow_redirects=True)
    r = client.fetch("GET", base + "/small.txt")
    assert r.status == 200 and r.body == b"hello nginx\n"
    assert r.header("content-type") == b"text/plain"
    ps = [client.get(base + ("/big.bin" if i % 5 == 0 else "/small.txt")) for i in range(60)]
    loop.run_until(lambda: all(p.done() for p in ps), timeout=TIMEOUT * 3)
    for i, p in enumerate(ps):
        expected = (www / ("big.bin" if i % 5 == 0 else "small.txt")).read_bytes()
        assert p.result().body == expected
    assert sum(len(c) for c in client._conns.values()) <= 2       # pooled and reused
    r = client.fetch("GET", base + "/moved")
    assert r.status == 200 and r.url.endswith("/small.txt")
    r = client.fetch("HEAD", base + "/big.bin")
    assert r.status == 200 and r.body == b"" and r.header("content-length") == b"1048576"
    r = client.fetch("GET", base + "/missing")
    assert r.status == 404
    client.close()


def test_client_chunked_upload_to_nginx(loop, nginx):
    base, _ = nginx
    client = Client(loop)
    r = client.fetch("POST", base + "/echo-len", body=iter([b"a" * 1000, b"b" * 500]))
    assert r.status == 200 and r.body.endswith(b" te=chunked")     # nginx took it chunked
    r = client.fetch("POST", base + "/echo-len", body=b"x" * 123)
    assert r.body == b"len=123 te="
    client.close()


def test_client_against_python_http_server(loop, tmp_path):
    (tmp_path / "f.txt").write_bytes(b"from http.server\n")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a):
            pass

    def handler(*a, **kw):
        return Quiet(*a, directory=str(tmp_path), **kw)

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        client = Client(loop, pipeline=4)
        url = f"http://127.0.0.1:{srv.server_address[1]}/f.txt"
        ps = [client.get(url) for _ in range(20)]             # HTTP/1.0: one per connection
        loop.run_until(lambda: all(p.done() for p in ps), timeout=TIMEOUT * 3)
        assert all(p.result().body == b"from http.server\n" for p in ps)
        client.close()
    finally:
        srv.shutdown()
        srv.server_close()


def test_client_and_server_on_one_loop(serve, loop):
    def app(req):
        if req.path == "/slow":
            return Response(b"never")            # (the timeout test uses a silent socket)
        return Response(req.body or b"empty", headers=[("x-n", str(len(req.body)))])

    s = serve(app)
    client = Client(loop, pipeline=16, max_per_host=1)
    ps = [client.post(s.url + "/e", body=b"%d" % i) for i in range(100)]
    loop.run_until(lambda: all(p.done() for p in ps), timeout=TIMEOUT * 3)
    assert [p.result().body for p in ps] == [b"%d" % i for i in range(100)]
    r = client.fetch("POST", s.url + "/e", body=iter([b"x"] * 1000))
    assert r.body == b"x" * 1000 and r.header("x-n") == b"1000"
    client.close()


def test_client_timeout_and_refused(loop):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    client = Client(loop, timeout=0.3)
    p = client.get(f"http://127.0.0.1:{silent.getsockname()[1]}/")
    loop.run_until(p.done, timeout=TIMEOUT)
    with pytest.raises(evpl.TimeoutError):
        p.result()
    p = client.get(f"http://127.0.0.1:{free_port()}/")
    loop.run_until(p.done, timeout=TIMEOUT)
    with pytest.raises(evpl.ConnectionRefused):
        p.result()
    with pytest.raises(evpl.ConfigError):
        client.get("https://example.com/")
    client.close()
    silent.close()


def test_await_requests_on_evpl_asyncio_loop(nginx):
    """Under evpl.aio.run, a Client made on the running asyncio loop is
    awaited: one request, a gather of pipelined ones against nginx, an
    error raised at the await, and a cancelled await that leaves the
    client usable."""
    import asyncio

    import evpl.aio

    base, _ = nginx

    async def main():
        client = Client(asyncio.get_running_loop(), pipeline=8, max_per_host=2)
        one = await client.get(base + "/small.txt")
        many = await asyncio.gather(*(client.get(base + f"/echo-len?{i}") for i in range(20)))
        try:
            await client.get(f"http://127.0.0.1:{free_port()}/")
            refused = None
        except evpl.ConnectionRefused as exc:
            refused = exc
        silent = socket.socket()            # accepts, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        task = asyncio.ensure_future(client.get(f"http://127.0.0.1:{silent.getsockname()[1]}/"))
        await asyncio.sleep(0)              # (the task now waits in the await)
        task.cancel()
        again = await client.get(base + "/small.txt")
        client.close()
        silent.close()
        return one, many, refused, task.cancelled(), again

    one, many, refused, cancelled, again = evpl.aio.run(main())
    assert one.status == 200 and one.body == b"hello nginx\n"
    assert [r.status for r in many] == [200] * 20
    assert isinstance(refused, evpl.ConnectionRefused)
    assert cancelled and again.body == b"hello nginx\n"


def test_awaiting_a_request_off_evpl_asyncio_is_a_clear_error(loop):
    """A Client on a plain evpl Loop awaited from stock asyncio: nothing
    drives its sockets there, so the await raises at once, saying why."""
    import asyncio

    client = Client(loop)

    async def main():
        with pytest.raises(evpl.EvplError, match=r"evpl\.aio\.run"):
            await client.get("http://127.0.0.1:1/")

    asyncio.run(main())
    client.close()
