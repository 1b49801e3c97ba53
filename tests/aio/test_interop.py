"""Real libraries on the evpl asyncio loop, each against a real peer:
aiohttp (server driven by curl and by aiohttp's client), asyncio streams
against a C echo server and a stdlib one, pyzmq's zmq.asyncio against a
plain pyzmq socket, TLS against ``openssl s_client`` / ``s_server`` with a
certificate made by trustme. The fixture checks the pool after each test
(no Buffer leaked)."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import socketserver
import ssl
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

import evpl
from aio.helpers import run

ROOT = Path(__file__).resolve().parents[2]


# ---- aiohttp --------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_aiohttp_server_with_curl_and_aiohttp_client(aio_loop: Any) -> None:
    aiohttp = pytest.importorskip("aiohttp")
    from aiohttp import web

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=f"hello {request.match_info.get('name', 'world')}")

    async def echo(request: web.Request) -> web.Response:
        return web.Response(body=await request.read())

    async def main() -> None:
        app = web.Application(client_max_size=8 << 20)
        app.add_routes([web.get("/hello/{name}", hello), web.post("/echo", echo)])
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            # curl: a real HTTP/1.1 client in another process, keep-alive, two requests
            proc = await asyncio.create_subprocess_exec(
                "curl", "-sS", "--max-time", "20", f"http://127.0.0.1:{port}/hello/curl",
                f"http://127.0.0.1:{port}/hello/again", stdout=asyncio.subprocess.PIPE)
            out, _ = await proc.communicate()
            assert proc.returncode == 0
            assert out == b"hello curlhello again"
            # aiohttp's client on the same loop: a body larger than socket buffers
            body = os.urandom(3 << 20)
            async with aiohttp.ClientSession() as session:
                for _ in range(3):
                    async with session.post(f"http://127.0.0.1:{port}/echo", data=body) as r:
                        assert r.status == 200
                        assert await r.read() == body
                async with session.get(f"http://127.0.0.1:{port}/hello/client") as r:
                    assert await r.text() == "hello client"
        finally:
            await runner.cleanup()

    run(aio_loop, main())


# ---- asyncio streams against C and stdlib peers --------------------------------------------


@pytest.fixture(scope="module")
def c_echo(tmp_path_factory: Any) -> str:
    """benchmarks/c/echo_epoll.c built for the test (a C peer)."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed: cannot build the C echo server")
    out = tmp_path_factory.mktemp("c") / "echo_epoll"
    src = ROOT / "benchmarks" / "c" / "echo_epoll.c"
    subprocess.run(["gcc", "-O2", f"-I{src.parent}", "-o", str(out), str(src)], check=True)
    return str(out)


async def _stream_echo_roundtrips(host: str, port: int) -> None:
    r, w = await asyncio.open_connection(host, port)
    try:
        for i in range(200):                 # ping-pong, small
            msg = b"%06d" % i
            w.write(msg)
            assert await r.readexactly(len(msg)) == msg
        big = os.urandom(2 << 20)             # bulk, both ways at once
        w.write(big)
        got = await r.readexactly(len(big))
        assert got == big
        w.write_eof()
        assert await r.read() == b""          # the peer closes after our EOF
    finally:
        w.close()
        await w.wait_closed()


def test_streams_against_c_echo_server(aio_loop: Any, c_echo: str) -> None:
    async def main() -> None:
        proc = await asyncio.create_subprocess_exec(
            c_echo, "--port", "0", "--mode", "raw", stdout=asyncio.subprocess.PIPE)
        try:
            assert proc.stdout is not None
            line = await proc.stdout.readline()
            assert line.startswith(b"ready "), line
            await _stream_echo_roundtrips("127.0.0.1", int(line.split()[1]))
        finally:
            proc.terminate()
            await proc.wait()

    run(aio_loop, main())


class _StdlibEcho(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


def test_streams_against_stdlib_echo_server(aio_loop: Any) -> None:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _StdlibEcho)
    server.daemon_threads = True
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        run(aio_loop, _stream_echo_roundtrips(*server.server_address))
    finally:
        server.shutdown()
        server.server_close()
        t.join()


def test_stdlib_client_against_streams_server(aio_loop: Any) -> None:
    """asyncio.start_server on evpl, served to blocking stdlib clients in threads."""
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while line := await r.readline():
            w.write(line.upper())
            await w.drain()
        w.close()

    def client(port: int, i: int, out: list[bytes]) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
            f = s.makefile("rwb")
            for j in range(20):
                f.write(b"line %d-%d\n" % (i, j))
                f.flush()
                out.append(f.readline())

    async def main() -> list[bytes]:
        srv = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        out: list[bytes] = []
        await asyncio.gather(*(asyncio.to_thread(client, port, i, out) for i in range(4)))
        srv.close()
        await srv.wait_closed()
        return out

    out = run(aio_loop, main())
    assert sorted(out) == sorted(b"LINE %d-%d\n" % (i, j) for i in range(4) for j in range(20))


# ---- pyzmq ------------------------------------------------------------------------------


def test_zmq_asyncio_against_plain_pyzmq(aio_loop: Any) -> None:
    pytest.importorskip("zmq")
    import zmq
    import zmq.asyncio

    ctx = zmq.asyncio.Context()
    plain = zmq.Context()

    def peer(endpoint: str) -> None:
        """A plain (blocking) pyzmq REP peer in a thread."""
        s = plain.socket(zmq.REP)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(endpoint)
        try:
            for _ in range(100):
                parts = s.recv_multipart()
                s.send_multipart([p.upper() for p in parts])
        finally:
            s.close()

    async def main() -> None:
        req = ctx.socket(zmq.REQ)
        req.setsockopt(zmq.LINGER, 0)
        port = req.bind_to_random_port("tcp://127.0.0.1")
        t = threading.Thread(target=peer, args=(f"tcp://127.0.0.1:{port}",))
        t.start()
        try:
            for i in range(100):
                await req.send_multipart([b"hello", b"%d" % i])
                reply = await asyncio.wait_for(req.recv_multipart(), 20)
                assert reply == [b"HELLO", b"%d" % i]
        finally:
            req.close()
            await asyncio.to_thread(t.join)

    try:
        run(aio_loop, main())
    finally:
        ctx.term()
        plain.term()


# ---- TLS against openssl ------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: Any) -> dict[str, str]:
    """A CA and a server certificate for 127.0.0.1, made by trustme."""
    trustme = pytest.importorskip("trustme")
    d = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    paths = {"ca": str(d / "ca.pem"), "chain": str(d / "chain.pem"), "key": str(d / "key.pem")}
    ca.cert_pem.write_to_path(paths["ca"])
    cert.private_key_pem.write_to_path(paths["key"])
    with open(paths["chain"], "wb") as f:
        for blob in cert.cert_chain_pems:
            f.write(blob.bytes())
    return paths


needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None,
                                   reason="the openssl command is not installed")


@needs_openssl
def test_tls_server_with_openssl_s_client(aio_loop: Any, certs: dict[str, str]) -> None:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        line = await r.readline()
        w.write(b"echo: " + line)
        await w.drain()
        w.close()

    async def main() -> bytes:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(certs["chain"], certs["key"])
        srv = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
        port = srv.sockets[0].getsockname()[1]
        try:
            proc = await asyncio.create_subprocess_exec(
                "openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile", certs["ca"],
                "-verify_return_error", "-quiet", "-servername", "localhost",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE)
            out, err = await proc.communicate(b"over TLS\n")
            assert proc.returncode == 0, err
            return out
        finally:
            srv.close()
            await srv.wait_closed()

    assert run(aio_loop, main()) == b"echo: over TLS\n"


@needs_openssl
def test_tls_client_against_openssl_s_server(aio_loop: Any, certs: dict[str, str]) -> None:
    async def main() -> list[bytes]:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        proc = await asyncio.create_subprocess_exec(
            "openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-cert", certs["chain"],
            "-key", certs["key"], "-rev", "-naccept", "1",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        try:
            assert proc.stdout is not None
            while b"ACCEPT" not in await proc.stdout.readline():
                pass
            ctx = ssl.create_default_context(cafile=certs["ca"])
            r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx,
                                                 server_hostname="localhost")
            assert w.get_extra_info("sslcontext") is ctx
            assert w.get_extra_info("peercert")["subjectAltName"]
            replies = []
            for word in (b"hello", b"evpl"):
                w.write(word + b"\n")
                await w.drain()
                replies.append((await r.readline()).strip())
            w.close()
            try:
                await w.wait_closed()
            except (ConnectionError, ssl.SSLError):
                pass          # s_server may drop the TCP connection without close_notify
            return replies
        finally:
            if proc.returncode is None:
                proc.terminate()
            await proc.wait()

    assert run(aio_loop, main()) == [b"olleh", b"lpve"]


def test_start_tls_upgrade_between_evpl_ends(aio_loop: Any, certs: dict[str, str]) -> None:
    """A plain connection upgraded with start_tls on both ends (STARTTLS)."""
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(certs["chain"], certs["key"])
    client_ctx = ssl.create_default_context(cafile=certs["ca"])

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        assert await r.readline() == b"STARTTLS\n"
        w.write(b"GO\n")
        await w.drain()
        await w.start_tls(server_ctx)
        w.write(await r.readline())
        await w.drain()
        w.close()

    async def main() -> bytes:
        srv = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"STARTTLS\n")
        assert await r.readline() == b"GO\n"
        await w.start_tls(client_ctx, server_hostname="localhost")
        w.write(b"secret\n")
        line = await r.readline()
        w.close()
        try:
            await w.wait_closed()
        except ConnectionError:
            pass
        srv.close()
        await srv.wait_closed()
        return line

    assert run(aio_loop, main()) == b"secret\n"


def test_sendfile_over_tls_falls_back(aio_loop: Any, certs: dict[str, str],
                                      tmp_path: Any) -> None:
    """TLS cannot use os.sendfile: loop.sendfile falls back to reading and
    writing (the peer decrypts the file), and with fallback=False says so."""
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(certs["chain"], certs["key"])
    client_ctx = ssl.create_default_context(cafile=certs["ca"])
    payload = os.urandom(1_300_000)
    path = tmp_path / "tls.bin"
    path.write_bytes(payload)
    received: asyncio.Future[bytes] = aio_loop.create_future()

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        received.set_result(await r.read())
        w.close()

    async def main() -> None:
        srv = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
        port = srv.sockets[0].getsockname()[1]
        _, w = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx,
                                             server_hostname="localhost")
        with open(path, "rb") as f:
            with pytest.raises(RuntimeError, match="fallback is disabled"):
                await aio_loop.sendfile(w.transport, f, fallback=False)
            assert await aio_loop.sendfile(w.transport, f, offset=100) == len(payload) - 100
            assert f.tell() == len(payload)
        w.close()                       # close_notify after the data: the peer's EOF
        assert await received == payload[100:]
        srv.close()
        await srv.wait_closed()

    run(aio_loop, main())


# ---- ownership ------------------------------------------------------------------------------


def test_no_pool_buffer_outlives_the_traffic(aio_loop: Any) -> None:
    """Many connections into a BufferedProtocol that pauses and resumes
    reading: once the loop is closed every pool buffer is back."""
    class Sink(asyncio.BufferedProtocol):
        def __init__(self) -> None:
            self.buf = bytearray(4096)
            self.n = 0
            self.done = asyncio.get_event_loop().create_future()

        def connection_made(self, transport: Any) -> None:
            self.transport = transport

        def get_buffer(self, sizehint: int) -> bytearray:
            return self.buf

        def buffer_updated(self, nbytes: int) -> None:
            self.n += nbytes
            if self.n % 3 == 0:
                self.transport.pause_reading()
                asyncio.get_event_loop().call_soon(self.transport.resume_reading)

        def eof_received(self) -> None:
            self.done.set_result(self.n)

    async def main() -> None:
        sinks: list[Sink] = []

        def factory() -> Sink:
            sinks.append(Sink())
            return sinks[-1]

        srv = await aio_loop.create_server(factory, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]

        async def send(i: int) -> None:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"x" * (100_000 + i))
            w.write_eof()
            await r.read()
            w.close()

        await asyncio.gather(*(send(i) for i in range(20)))
        totals = await asyncio.gather(*(s.done for s in sinks))
        assert sorted(totals) == [100_000 + i for i in range(20)]
        for s in sinks:
            s.transport.close()
        srv.close()
        await srv.wait_closed()
        await asyncio.sleep(0)

    run(aio_loop, main())
    aio_loop.close()          # the io_uring ring's own buffers go back with the loop
    import gc

    gc.collect()
    stats = evpl.default_pool().stats()
    assert stats["buffers_in_use"] == 0, stats
    assert stats["heap_in_use"] == 0, stats
