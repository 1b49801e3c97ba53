"""UDP endpoints on the evpl loop are evpl datagram Binds (``udp``, or
``io_uring_udp`` on an io_uring loop): tested against the kernel's UDP
stack with plain ``socket`` peers and with a stock asyncio loop in another
thread as the peer, for both backends."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import socket
import struct
import termios
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import evpl.aio
from aio.helpers import run

HAS_IPV6 = socket.has_ipv6
try:
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as _s:
        _s.bind(("::1", 0))
except OSError:
    HAS_IPV6 = False


class Recorder(asyncio.DatagramProtocol):
    """Records everything a datagram transport tells its protocol; futures
    that complete at the n-th datagram or error and at connection_lost."""

    def __init__(self, want: int = 1, echo: bool = False) -> None:
        loop = asyncio.get_running_loop()
        self.echo = echo
        self.transport: Any = None
        self.got: list[tuple[bytes, Any]] = []
        self.errors: list[OSError] = []
        self.events: list[str] = []
        self.want = want
        self.enough = loop.create_future()
        self.error = loop.create_future()
        self.lost = loop.create_future()

    def connection_made(self, transport: Any) -> None:
        self.events.append("made")
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        assert type(data) is bytes
        self.got.append((data, addr))
        if self.echo:
            self.transport.sendto(data, addr)
        if len(self.got) >= self.want and not self.enough.done():
            self.enough.set_result(None)

    def error_received(self, exc: OSError) -> None:
        self.errors.append(exc)
        if not self.error.done():
            self.error.set_result(exc)

    def pause_writing(self) -> None:
        self.events.append("pause")

    def resume_writing(self) -> None:
        self.events.append("resume")

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append("lost")
        if not self.lost.done():
            self.lost.set_result(exc)


def _peer(family: int = socket.AF_INET, host: str = "127.0.0.1") -> socket.socket:
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.settimeout(20)
    s.bind((host, 0))
    return s


async def _recv(sock: socket.socket, n: int = 65536) -> tuple[bytes, Any]:
    """A blocking receive on a plain socket, off the loop's thread."""
    return await asyncio.get_running_loop().run_in_executor(None, sock.recvfrom, n)


@pytest.fixture
def peer() -> Iterator[socket.socket]:
    """A plain IPv4 UDP socket on loopback, closed after the test."""
    s = _peer()
    yield s
    s.close()


async def _until(cond: Any, limit: int = 100_000) -> None:
    """Let the loop run until ``cond()`` (bounded: a hang fails)."""
    for _ in range(limit):
        if cond():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never became true")


@contextlib.contextmanager
def asyncio_thread() -> Iterator[asyncio.AbstractEventLoop]:
    """A stock asyncio loop (the default selector loop) running in another
    thread: the peer nobody here wrote."""
    loop = asyncio.SelectorEventLoop()
    t = threading.Thread(target=loop.run_forever, name="asyncio-peer", daemon=True)
    t.start()
    try:
        yield loop
    finally:
        loop.call_soon_threadsafe(loop.stop)
        t.join(20)
        loop.close()


def _on(loop: asyncio.AbstractEventLoop, coro: Any) -> Any:
    """Run ``coro`` on the other thread's loop; an awaitable here."""
    return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))


# ---- plain socket peers --------------------------------------------------------------


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_echo_server_against_plain_sockets(aio_loop: Any, family: str) -> None:
    if family == "ipv6" and not HAS_IPV6:
        pytest.skip("no IPv6 loopback here")
    fam, host = ((socket.AF_INET, "127.0.0.1") if family == "ipv4"
                 else (socket.AF_INET6, "::1"))

    async def main() -> None:
        tr, proto = await aio_loop.create_datagram_endpoint(
            lambda: Recorder(want=3, echo=True), local_addr=(host, 0))
        assert type(tr).__name__ == "DatagramTransport"
        assert isinstance(tr, asyncio.DatagramTransport)
        assert tr.get_extra_info("socket").family == fam
        addr = tr.get_extra_info("sockname")
        assert tr.get_extra_info("peername") is None
        peers = [_peer(fam, host) for _ in range(3)]
        try:
            for i, p in enumerate(peers):
                p.sendto(b"ping %d" % i, addr[:2])
            for i, p in enumerate(peers):
                data, src = await _recv(p)
                assert data == b"ping %d" % i
                assert src[:2] == addr[:2]
            await proto.enough
            assert sorted(d for d, _ in proto.got) == [b"ping 0", b"ping 1", b"ping 2"]
            # the sender addresses are asyncio's: (host, port) or the IPv6 4-tuple
            srcs = {a for _, a in proto.got}
            assert srcs == {p.getsockname() for p in peers}
        finally:
            for p in peers:
                p.close()
        tr.close()
        assert await proto.lost is None
        assert proto.events[0] == "made" and proto.events[-1] == "lost"

    run(aio_loop, main())


def test_connected_client_sends_to_its_peer_and_reads_only_from_it(aio_loop: Any) -> None:
    server = _peer()
    stranger = _peer()

    async def main() -> None:
        tr, proto = await aio_loop.create_datagram_endpoint(
            lambda: Recorder(want=2), remote_addr=server.getsockname())
        assert tr.get_extra_info("peername") == server.getsockname()
        local = tr.get_extra_info("sockname")
        tr.sendto(b"one")
        tr.sendto(b"two", server.getsockname())         # the peer's own address is fine
        with pytest.raises(ValueError, match="Invalid address"):
            tr.sendto(b"x", ("127.0.0.1", 9))
        with pytest.raises(TypeError, match="bytes-like"):
            tr.sendto("text")
        assert [(await _recv(server))[0] for _ in range(2)] == [b"one", b"two"]
        stranger.sendto(b"not for you", local)           # the kernel filters it
        server.sendto(b"r1", local)
        server.sendto(b"r2", local)
        await proto.enough
        assert proto.got == [(b"r1", server.getsockname()), (b"r2", server.getsockname())]
        tr.close()
        await proto.lost

    try:
        run(aio_loop, main())
    finally:
        server.close()
        stranger.close()


def test_refused_peer_is_error_received_and_the_endpoint_stays_open(aio_loop: Any) -> None:
    """A connected endpoint whose peer has no socket: the kernel's ICMP port
    unreachable becomes error_received(ConnectionRefusedError), as asyncio
    reports it, and the transport stays usable."""
    gone = _peer()
    addr = gone.getsockname()
    gone.close()
    live = _peer()

    async def main() -> None:
        tr, proto = await aio_loop.create_datagram_endpoint(
            Recorder, remote_addr=addr)
        tr.sendto(b"anyone?")
        exc = await proto.error
        assert isinstance(exc, ConnectionRefusedError)
        assert not tr.is_closing()
        assert not proto.lost.done()
        # still open: it sends again, and the next refusal is reported too
        proto.error = asyncio.get_running_loop().create_future()
        tr.sendto(b"still there?")
        assert isinstance(await proto.error, ConnectionRefusedError)
        # an unconnected endpoint learns nothing from ICMP (Linux), and goes on
        tr2, proto2 = await aio_loop.create_datagram_endpoint(
            Recorder, local_addr=("127.0.0.1", 0))
        tr2.sendto(b"lost", addr)
        tr2.sendto(b"heard", live.getsockname())
        assert (await _recv(live))[0] == b"heard"
        tr.close()
        tr2.close()
        await proto.lost
        await proto2.lost
        assert proto2.errors == []

    try:
        run(aio_loop, main())
    finally:
        live.close()


def test_oversized_and_named_destinations(aio_loop: Any, peer: socket.socket) -> None:

    async def main() -> None:
        tr, proto = await aio_loop.create_datagram_endpoint(
            Recorder, local_addr=("127.0.0.1", 0))
        port = peer.getsockname()[1]
        tr.sendto(b"a" * 70_000, peer.getsockname())
        exc = await proto.error
        assert isinstance(exc, OSError) and exc.errno == errno.EMSGSIZE
        assert not tr.is_closing()
        big = bytes(range(256)) * 255 + b"x" * 227          # 65507 bytes: UDP's largest
        tr.sendto(big, peer.getsockname())
        tr.sendto(b"by name", ("localhost", port))
        got = [(await _recv(peer))[0] for _ in range(2)]
        assert got == [big, b"by name"]
        # and the largest datagram the other way
        peer.sendto(big, tr.get_extra_info("sockname"))
        proto.want = 1
        await proto.enough
        assert proto.got[0][0] == big
        tr.close()
        await proto.lost

    run(aio_loop, main())


def test_flow_control_and_write_buffer_size(aio_loop: Any, peer: socket.socket) -> None:
    """The queue is the Bind's: a burst above the high-water mark pauses
    the protocol, the end-of-iteration send empties it and resumes it."""
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)

    async def main() -> None:
        tr, proto = await aio_loop.create_datagram_endpoint(
            Recorder, remote_addr=peer.getsockname())
        assert tr.get_write_buffer_limits() == (16384, 65536)
        tr.set_write_buffer_limits(high=1000)
        assert tr.get_write_buffer_limits() == (250, 1000)
        for i in range(10):
            tr.sendto(b"%03d" % i + b"." * 197)
        assert tr.get_write_buffer_size() == 2000
        assert proto.events == ["made", "pause"]
        await _until(lambda: tr.get_write_buffer_size() == 0)
        await _until(lambda: "resume" in proto.events)
        assert proto.events == ["made", "pause", "resume"]
        got = [(await _recv(peer))[0][:3] for _ in range(10)]
        assert got == [b"%03d" % i for i in range(10)]
        tr.close()
        await proto.lost

    run(aio_loop, main())


def test_pause_and_resume_reading(aio_loop: Any, peer: socket.socket) -> None:

    async def main() -> None:
        tr, proto = await aio_loop.create_datagram_endpoint(
            lambda: Recorder(want=3), local_addr=("127.0.0.1", 0))
        await asyncio.sleep(0)          # connection_made and reading started
        tr.pause_reading()
        assert not tr.is_reading()
        addr = tr.get_extra_info("sockname")
        for i in range(3):
            peer.sendto(b"d%d" % i, addr)
        fd = tr.get_extra_info("socket").fileno()

        def waiting() -> int:
            return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]

        await _until(lambda: waiting() > 0)     # they are in the kernel's queue
        for _ in range(20):
            await asyncio.sleep(0)
        assert proto.got == []
        tr.resume_reading()
        assert proto.got == []                  # delivered from the next iteration on
        await proto.enough
        assert [d for d, _ in proto.got] == [b"d0", b"d1", b"d2"]
        tr.close()
        await proto.lost

    run(aio_loop, main())


def test_close_sends_what_was_queued_abort_drops_it(aio_loop: Any, peer: socket.socket) -> None:

    async def main() -> None:
        tr, proto = await aio_loop.create_datagram_endpoint(
            Recorder, remote_addr=peer.getsockname())
        for i in range(5):
            tr.sendto(b"last words %d" % i)
        tr.close()
        assert tr.is_closing()
        tr.sendto(b"after close")              # dropped, as asyncio drops it
        assert await proto.lost is None
        got = [(await _recv(peer))[0] for _ in range(5)]
        assert got == [b"last words %d" % i for i in range(5)]

        tr2, proto2 = await aio_loop.create_datagram_endpoint(
            Recorder, remote_addr=peer.getsockname())
        tr2.sendto(b"never sent")
        tr2.abort()
        assert await proto2.lost is None
        assert tr2.get_extra_info("socket") is not None
        tr3, proto3 = await aio_loop.create_datagram_endpoint(
            Recorder, remote_addr=peer.getsockname())
        tr3.sendto(b"marker")
        assert (await _recv(peer))[0] == b"marker"      # nothing from tr2 came first
        tr3.close()
        await proto3.lost

    run(aio_loop, main())


def test_protocol_exception_is_reported_and_the_endpoint_stays(aio_loop: Any,
                                                               peer: socket.socket) -> None:

    class Fragile(Recorder):
        def datagram_received(self, data: bytes, addr: Any) -> None:
            if data == b"boom":
                raise RuntimeError("protocol bug")
            super().datagram_received(data, addr)

    async def main() -> None:
        tr, proto = await aio_loop.create_datagram_endpoint(
            Fragile, local_addr=("127.0.0.1", 0))
        addr = tr.get_extra_info("sockname")
        peer.sendto(b"boom", addr)
        peer.sendto(b"fine", addr)
        await proto.enough
        assert proto.got[0][0] == b"fine"
        assert not tr.is_closing()
        tr.close()
        await proto.lost

    run(aio_loop, main())
    errors = list(aio_loop.errors)
    aio_loop.errors.clear()
    assert len(errors) == 1
    assert isinstance(errors[0]["exception"], RuntimeError)


# ---- asyncio's parameters -----------------------------------------------------------------


def test_socket_options_and_sock_argument(aio_loop: Any) -> None:
    async def main() -> None:
        tr, proto = await aio_loop.create_datagram_endpoint(
            Recorder, local_addr=("127.0.0.1", 0), reuse_port=True, allow_broadcast=True)
        sock = tr.get_extra_info("socket")
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST)
        port = tr.get_extra_info("sockname")[1]
        # reuse_port: a second endpoint on the same port
        tr_b, proto_b = await aio_loop.create_datagram_endpoint(
            Recorder, local_addr=("127.0.0.1", port), reuse_port=True)
        assert tr_b.get_extra_info("sockname")[1] == port
        tr.close()
        tr_b.close()
        await proto.lost
        await proto_b.lost

        # sock=: a connected UDP socket made by the caller, owned by the transport
        peer = _peer()
        try:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.connect(peer.getsockname())
            tr, proto = await aio_loop.create_datagram_endpoint(Recorder, sock=s)
            assert type(tr).__name__ == "DatagramTransport"
            assert tr.get_extra_info("peername") == peer.getsockname()
            tr.sendto(b"via sock=")
            assert (await _recv(peer))[0] == b"via sock="
            tr.close()
            await proto.lost
            assert s.fileno() == -1            # the transport closed it
        finally:
            peer.close()

        # family= alone: an unbound-then-autobound socket that can send
        peer = _peer()
        try:
            tr, proto = await aio_loop.create_datagram_endpoint(
                lambda: Recorder(want=1), family=socket.AF_INET)
            tr.sendto(b"from nowhere", peer.getsockname())
            data, src = await _recv(peer)
            assert data == b"from nowhere"
            peer.sendto(b"back", src)
            await proto.enough
            tr.close()
            await proto.lost
        finally:
            peer.close()

        # allow_broadcast with remote_addr: not connected, sends to remote_addr
        peer = _peer()
        try:
            tr, proto = await aio_loop.create_datagram_endpoint(
                Recorder, remote_addr=peer.getsockname(), allow_broadcast=True)
            assert tr.get_extra_info("peername") is None
            tr.sendto(b"to the address")
            assert (await _recv(peer))[0] == b"to the address"
            tr.close()
            await proto.lost
        finally:
            peer.close()

    run(aio_loop, main())


def test_unix_datagram_endpoints_keep_asyncios_transport(aio_loop: Any, tmp_path: Any) -> None:
    """The engine has no unix datagram Bind: AF_UNIX endpoints are asyncio's
    transport over fd watches, and work."""
    path = str(tmp_path / "dgram.sock")

    async def main() -> None:
        tr, proto = await aio_loop.create_datagram_endpoint(
            lambda: Recorder(echo=True), local_addr=path, family=socket.AF_UNIX)
        assert type(tr).__name__ == "_SelectorDatagramTransport"
        c = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        c.bind(str(tmp_path / "client.sock"))
        c.settimeout(20)
        try:
            c.sendto(b"local", path)
            assert (await _recv(c))[0] == b"local"
        finally:
            c.close()
        tr.close()
        await proto.lost

    run(aio_loop, main())


# ---- a stock asyncio loop as the peer ------------------------------------------------------


def test_against_a_stock_asyncio_loop(aio_loop: Any) -> None:
    """evpl server, asyncio client in another thread; then an asyncio
    server and an evpl client: 200 datagrams each way, every one answered."""
    n = 200

    async def asyncio_side_client(addr: Any) -> list[bytes]:
        loop = asyncio.get_running_loop()
        tr, proto = await loop.create_datagram_endpoint(
            lambda: Recorder(want=n), remote_addr=addr)
        for i in range(n):
            tr.sendto(b"q%04d" % i)
            if i % 50 == 49:
                await asyncio.sleep(0)
        await asyncio.wait_for(proto.enough, 20)
        tr.close()
        return sorted(d for d, _ in proto.got)

    async def asyncio_side_server() -> tuple[Any, Any]:
        loop = asyncio.get_running_loop()
        return await loop.create_datagram_endpoint(
            lambda: Recorder(want=n, echo=True), local_addr=("127.0.0.1", 0))

    async def main() -> None:
        with asyncio_thread() as other:
            tr, proto = await aio_loop.create_datagram_endpoint(
                lambda: Recorder(want=n, echo=True), local_addr=("127.0.0.1", 0))
            echoed = await _on(other, asyncio_side_client(tr.get_extra_info("sockname")))
            assert echoed == [b"q%04d" % i for i in range(n)]
            tr.close()
            await proto.lost

            srv_tr, _ = await _on(other, asyncio_side_server())
            tr, proto = await aio_loop.create_datagram_endpoint(
                lambda: Recorder(want=n), remote_addr=srv_tr.get_extra_info("sockname"))
            for i in range(n):
                tr.sendto(b"e%04d" % i)
                if i % 50 == 49:
                    await asyncio.sleep(0)
            await proto.enough
            assert sorted(d for d, _ in proto.got) == [b"e%04d" % i for i in range(n)]
            tr.close()
            await proto.lost
            other.call_soon_threadsafe(srv_tr.close)

    run(aio_loop, main())


def test_datagram_transports_are_binds_of_the_loops_backend(aio_loop: Any,
                                                            aio_backend: str) -> None:
    async def main() -> str:
        tr, proto = await aio_loop.create_datagram_endpoint(
            Recorder, local_addr=("127.0.0.1", 0))
        backend = tr._bind.backend
        tr.close()
        await proto.lost
        return str(backend)

    assert run(aio_loop, main()) == ("io_uring_udp" if aio_backend == "io_uring" else "udp")


def test_loop_close_with_an_open_endpoint() -> None:
    """A loop closed while a datagram endpoint is open: the Bind is closed
    with the engine, nothing is reported twice."""
    loop = evpl.aio.new_event_loop()
    try:
        async def main() -> Any:
            return await loop.create_datagram_endpoint(
                asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0))

        tr, _ = loop.run_until_complete(main())
        sock = tr.get_extra_info("socket")
        assert sock.fileno() >= 0
    finally:
        loop.close()
    assert tr._bind is None or tr._bind.closed
