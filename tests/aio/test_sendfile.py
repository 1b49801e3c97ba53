"""``loop.sendfile`` on evpl stream transports is ``os.sendfile`` from the
Bind's socket once its queue has drained; ``sock_sendfile`` is native too.
Real files (over 1 MiB), real TCP peers (plain blocking sockets reading in a
thread), both backends."""

from __future__ import annotations

import asyncio
import io
import os
import socket
from typing import Any

import pytest
from core.helpers import recv_all

from aio.helpers import run

MiB = 1 << 20


@pytest.fixture
def big_file(tmp_path: Any) -> Any:
    """A 3 MiB + 123 bytes file of non-repeating content."""
    data = os.urandom(3 * MiB + 123)
    path = tmp_path / "payload.bin"
    path.write_bytes(data)
    with open(path, "rb") as f:
        yield f, data


class Proto(asyncio.Protocol):
    def __init__(self) -> None:
        self.lost = asyncio.get_running_loop().create_future()
        self.data = bytearray()

    def data_received(self, data: bytes) -> None:
        self.data += data

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


async def _connected(loop: Any) -> tuple[Any, Proto, socket.socket]:
    """An evpl transport connected to a plain socket (small receive buffer,
    so a big sendfile fills the socket and waits)."""
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)   # accepted: inherited
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    lsock.settimeout(30)
    try:
        tr, proto = await loop.create_connection(Proto, *lsock.getsockname())
        peer, _ = await loop.run_in_executor(None, lsock.accept)
    finally:
        lsock.close()
    peer.settimeout(30)
    tr.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    return tr, proto, peer


def test_sendfile_after_queued_writes_then_more_writes(aio_loop: Any, big_file: Any) -> None:
    f, data = big_file

    async def main() -> None:
        tr, proto, peer = await _connected(aio_loop)
        with peer:
            reader = aio_loop.run_in_executor(None, recv_all, peer)
            head = b"H" * (2 * MiB)          # still queued when sendfile starts
            tr.write(head)
            assert tr.get_write_buffer_size() > 0
            sent = await aio_loop.sendfile(tr, f)
            assert sent == len(data)
            assert f.tell() == len(data)
            tr.write(b"tail")
            tr.close()
            got = await reader
            assert got == head + data + b"tail"
            await proto.lost

    run(aio_loop, main(), timeout=60)


def test_sendfile_offset_and_count(aio_loop: Any, big_file: Any) -> None:
    f, data = big_file

    async def main() -> None:
        tr, proto, peer = await _connected(aio_loop)
        with peer:
            reader = aio_loop.run_in_executor(None, recv_all, peer)
            # a count that stops short of the end
            n = await aio_loop.sendfile(tr, f, offset=1000, count=MiB + 500)
            assert n == MiB + 500
            assert f.tell() == 1000 + MiB + 500
            # a count past the end stops at EOF
            n2 = await aio_loop.sendfile(tr, f, offset=len(data) - 10, count=MiB)
            assert n2 == 10
            assert f.tell() == len(data)
            tr.close()
            assert await reader == data[1000:1000 + MiB + 500] + data[-10:]
            await proto.lost

    run(aio_loop, main(), timeout=60)


def test_write_during_sendfile_raises(aio_loop: Any, big_file: Any) -> None:
    f, data = big_file

    async def main() -> None:
        tr, proto, peer = await _connected(aio_loop)
        with peer:
            task = asyncio.ensure_future(aio_loop.sendfile(tr, f))
            await asyncio.sleep(0)           # the sendfile has started
            assert not task.done()
            with pytest.raises(RuntimeError, match="sendfile is in progress"):
                tr.write(b"x")
            with pytest.raises(RuntimeError, match="sendfile is in progress"):
                tr.writelines([b"x"])
            reader = aio_loop.run_in_executor(None, recv_all, peer)
            assert await task == len(data)
            tr.write(b"!")                   # allowed again
            tr.close()
            assert await reader == data + b"!"
            await proto.lost

    run(aio_loop, main(), timeout=60)


def test_sendfile_fallback_and_its_refusal(aio_loop: Any) -> None:
    """Something os.sendfile cannot read from (an in-memory file): native
    sendfile is not available; with fallback (the default) asyncio reads
    and writes it, with fallback=False it raises."""
    payload = os.urandom(MiB + 7)

    async def main() -> None:
        tr, proto, peer = await _connected(aio_loop)
        with peer:
            reader = aio_loop.run_in_executor(None, recv_all, peer)
            with pytest.raises(asyncio.SendfileNotAvailableError):
                await aio_loop.sendfile(tr, io.BytesIO(payload), fallback=False)
            mem = io.BytesIO(payload)
            assert await aio_loop.sendfile(tr, mem, offset=5, count=MiB) == MiB
            assert mem.tell() == 5 + MiB
            tr.close()
            assert await reader == payload[5:5 + MiB]
            await proto.lost

    run(aio_loop, main(), timeout=60)


def test_sendfile_argument_checks(aio_loop: Any, big_file: Any, tmp_path: Any) -> None:
    f, _ = big_file
    text = tmp_path / "text.txt"
    text.write_text("hello")

    async def main() -> None:
        tr, proto, peer = await _connected(aio_loop)
        with peer, open(text) as tf:
            with pytest.raises(ValueError, match="count must be a positive integer"):
                await aio_loop.sendfile(tr, f, count=0)
            with pytest.raises(TypeError, match="count must be a positive integer"):
                await aio_loop.sendfile(tr, f, count="10")
            with pytest.raises(ValueError, match="offset must be a non-negative integer"):
                await aio_loop.sendfile(tr, f, offset=-1)
            with pytest.raises(TypeError, match="offset must be a non-negative integer"):
                await aio_loop.sendfile(tr, f, offset=1.5)
            with pytest.raises(ValueError, match="binary mode"):
                await aio_loop.sendfile(tr, tf)
            # the transport is unharmed
            tr.write(b"ok")
            tr.close()
            assert await aio_loop.run_in_executor(None, recv_all, peer) == b"ok"
            await proto.lost
            with pytest.raises(RuntimeError, match="closing"):
                await aio_loop.sendfile(tr, f)

    run(aio_loop, main(), timeout=60)


def test_sendfile_when_the_peer_goes_away(aio_loop: Any, big_file: Any) -> None:
    f, _ = big_file

    async def main() -> None:
        tr, proto, peer = await _connected(aio_loop)
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        task = asyncio.ensure_future(aio_loop.sendfile(tr, f))
        await asyncio.sleep(0)
        peer.close()                        # RST: the sendfile fails
        with pytest.raises(ConnectionError):
            await task
        assert 0 < f.tell() < os.fstat(f.fileno()).st_size
        tr.abort()
        await proto.lost

    run(aio_loop, main(), timeout=60)


def test_sock_sendfile(aio_loop: Any, big_file: Any) -> None:
    f, data = big_file
    a, b = socket.socketpair()
    a.setblocking(False)
    b.settimeout(30)

    async def main() -> None:
        reader = aio_loop.run_in_executor(None, recv_all, b)
        n = await aio_loop.sock_sendfile(a, f, offset=3, count=2 * MiB)
        assert n == 2 * MiB
        assert f.tell() == 3 + 2 * MiB
        n2 = await aio_loop.sock_sendfile(a, f, offset=3 + 2 * MiB)    # to the end
        assert n2 == len(data) - (3 + 2 * MiB)
        a.shutdown(socket.SHUT_WR)
        assert await reader == data[3:]
        with pytest.raises(ValueError, match="count"):
            await aio_loop.sock_sendfile(a, f, count=-1)

    try:
        run(aio_loop, main(), timeout=60)
    finally:
        a.close()
        b.close()
