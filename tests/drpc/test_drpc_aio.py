"""Awaitable drpc calls on evpl's asyncio loop (``evpl.aio``):
``await client.acall(...)`` over real sockets on every datagram backend,
pipelined past the window, every error raised by the ``await``, timeouts and
cancellation (a queued call is dropped unsent, a sent one is answered once
and the answer discarded), and the clear error on a plain asyncio loop."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from core.helpers import TIMEOUT

import evpl
import evpl.aio
from evpl.drpc import CallTimeout, Client, PeerDead, RemoteError, Server, SessionClosed
from evpl.drpc.wire import HEADER_SIZE
from evpl.errors import ConfigError, EvplError

ECHO, REVERSE, LATE, BOOM = 1, 2, 3, 5


def run(main: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """``main()`` on a new evpl asyncio loop, bounded so a bug fails, not hangs."""
    async def bounded() -> Any:
        async with asyncio.timeout(TIMEOUT * 6):
            return await main()
    return evpl.aio.run(bounded())


class Late:
    """A handler that answers only when told; ``arrived`` is awaited by the
    test to know the server is holding a request (no polling)."""

    def __init__(self) -> None:
        self.held: list[Any] = []
        self.runs = 0
        self.arrived: asyncio.Future[None] | None = None

    def __call__(self, req: Any) -> None:
        self.runs += 1
        self.held.append(req)
        if self.arrived is not None and not self.arrived.done():
            self.arrived.set_result(None)

    async def wait(self, n: int) -> None:
        while len(self.held) < n:
            self.arrived = asyncio.get_running_loop().create_future()
            await self.arrived


def serve(aloop: Any, backend: str, **kw: Any) -> tuple[Server, Late]:
    server = Server(aloop, backend, ("127.0.0.1", 0), **kw)
    late = Late()
    server.register(ECHO, lambda req: req.body)
    server.register(REVERSE, lambda req: bytes(req.body)[::-1])
    server.register(LATE, late)
    server.register(BOOM, lambda req: 1 / 0)
    return server, late


def test_round_trips_pipelined_past_the_window(datagram_backend) -> None:
    """0 B .. several packets, 40 calls gathered at once with a window of 4:
    every response correct, never more than 4 outstanding."""
    p = 1472 - HEADER_SIZE
    rnd = random.Random(3)
    payloads = [rnd.randbytes(n) for n in (0, 1, 32, p, p + 1, 5 * p + 3, 200_000)]
    payloads += [rnd.randbytes(rnd.randrange(3 * p)) for _ in range(33)]

    async def main() -> tuple[list[bytes], dict[str, Any]]:
        aloop = asyncio.get_running_loop()
        server, _ = serve(aloop, datagram_backend)
        client = Client(aloop, datagram_backend, server.address, window=4)
        assert client.loop is aloop.core and server.loop is aloop.core
        resps = await asyncio.gather(*(client.acall(REVERSE, m) for m in payloads))
        stats = client.stats()
        client.close()
        server.close()
        return [bytes(r) for r in resps], stats

    resps, stats = run(main)
    assert resps == [m[::-1] for m in payloads]
    assert stats["completed"] == len(payloads)
    assert stats["max_outstanding"] <= 4


def test_errors_are_raised_by_the_await(datagram_backend) -> None:
    """A handler that raises: RemoteError; the session survives it. A closed
    client: SessionClosed for its outstanding and later calls."""
    async def main() -> None:
        aloop = asyncio.get_running_loop()
        server, late = serve(aloop, datagram_backend)
        client = Client(aloop, datagram_backend, server.address)
        with pytest.raises(RemoteError, match="division by zero"):
            await client.acall(BOOM, b"x")
        assert bytes(await client.acall(ECHO, b"still up")) == b"still up"
        held = client.acall(LATE, b"never answered")
        await late.wait(1)
        client.close()
        with pytest.raises(SessionClosed):
            await held
        with pytest.raises(SessionClosed):
            await client.acall(ECHO, b"after close")
        server.close()

    run(main)


def test_dead_server_raises_peer_dead(datagram_backend) -> None:
    """The server stops reading: outstanding and queued awaited calls raise
    PeerDead after peer_timeout; a port that swallows the connect too."""
    async def main() -> None:
        aloop = asyncio.get_running_loop()
        server, _ = serve(aloop, datagram_backend)
        client = Client(aloop, datagram_backend, server.address, peer_timeout=0.3)
        t0 = aloop.core.now()   # before the server's last packet, which starts the timeout
        assert bytes(await client.acall(ECHO, b"up")) == b"up"
        server.bind.pause_reading()
        results = await asyncio.gather(*(client.acall(ECHO, b"x" * 3000) for _ in range(12)),
                                       return_exceptions=True)
        assert aloop.core.now() - t0 >= 0.3
        assert all(isinstance(r, PeerDead) for r in results), results
        client.close()
        server.close()

        sink = Server(aloop, datagram_backend, ("127.0.0.1", 0))
        sink.bind.pause_reading()
        client = Client(aloop, datagram_backend, sink.address, peer_timeout=0.2)
        with pytest.raises(PeerDead, match="no answer"):
            await client.acall(ECHO, b"x")
        client.close()
        sink.close()

    run(main)


def test_timeout_abandons_the_call_and_the_session_lives_on(datagram_backend) -> None:
    """``timeout=``: CallTimeout (a TimeoutError); the late answer, when it
    comes, is discarded; the handler ran once; later calls work."""
    async def main() -> None:
        aloop = asyncio.get_running_loop()
        server, late = serve(aloop, datagram_backend)
        client = Client(aloop, datagram_backend, server.address)
        slow = client.acall(LATE, b"slow", timeout=0.05)
        await late.wait(1)
        with pytest.raises(CallTimeout, match=r"within 0\.05 s"):
            await slow
        with pytest.raises(TimeoutError):           # what asyncio users catch
            await client.acall(LATE, b"slow too", timeout=0.01)
        assert bytes(await client.acall(ECHO, b"alive")) == b"alive"
        assert client.outstanding == 2              # the two sent calls keep their slots
        for req in late.held:
            req.respond(b"too late")
        # the late answers leave before this echo's (one socket, in order on
        # loopback): once it is back they have completed the abandoned
        # calls (discarded) and freed their slots
        assert bytes(await client.acall(ECHO, b"after")) == b"after"
        assert client.outstanding == 0
        assert late.runs == 2
        assert client.stats()["completed"] == 4 and client.stats()["withdrawn"] == 0
        assert slow.exception() is not None and isinstance(slow.exception(), CallTimeout)
        client.close()
        server.close()

    run(main)


def test_cancellation(datagram_backend) -> None:
    """window=1: the first call is held by the server, the second waits in
    the backlog. Cancelling the queued one drops it unsent (the server never
    sees it); cancelling the sent one discards its answer; asyncio.wait_for
    cancels too. The handler runs once per sent call."""
    async def main() -> None:
        aloop = asyncio.get_running_loop()
        server, late = serve(aloop, datagram_backend)
        client = Client(aloop, datagram_backend, server.address, window=1)
        assert bytes(await client.acall(ECHO, b"up")) == b"up"

        async def caller(t: int, body: bytes, sent: asyncio.Event) -> bytes:
            fut = client.acall(t, body)
            sent.set()
            return bytes(await fut)

        first = asyncio.create_task(caller(LATE, b"held", asyncio.Event()))
        await late.wait(1)
        submitted = asyncio.Event()
        queued = asyncio.create_task(caller(ECHO, b"queued", submitted))
        await submitted.wait()                        # submitted: into the backlog
        assert client.stats()["backlog"] == 1
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        assert client.stats()["backlog"] == 0 and client.stats()["withdrawn"] == 1
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(client.acall(ECHO, b"waits behind"), 0.02)
        assert client.stats()["withdrawn"] == 2
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert client.outstanding == 1                # sent: keeps its slot
        late.held[0].respond(b"discarded")
        assert bytes(await client.acall(ECHO, b"next")) == b"next"
        assert late.runs == 1
        sst = server.stats()
        assert sst["requests"] == 3                   # up, held, next: never the cancelled
        assert client.stats()["requests"] == 5 and client.stats()["completed"] == 3
        client.close()
        server.close()

    run(main)


def test_plain_asyncio_loop_is_a_clear_error() -> None:
    """On asyncio's own loop nothing drives evpl sockets: acall says so at
    once; a drpc Client or Server cannot be made on that loop either; and
    outside any running loop acall says what to use instead."""
    loop = evpl.Loop()
    sink = Server(loop, "udp", ("127.0.0.1", 0))
    client = Client(loop, "udp", sink.address)

    async def main() -> None:
        with pytest.raises(EvplError, match="plain asyncio/uvloop cannot drive"):
            client.acall(ECHO, b"x")
        with pytest.raises(ConfigError, match="not on _UnixSelectorEventLoop"):
            Client(asyncio.get_running_loop(), "udp", sink.address)

    asyncio.run(main())
    with pytest.raises(EvplError, match="needs a running evpl asyncio loop"):
        client.acall(ECHO, b"x")

    async def other_evpl_loop() -> None:
        with pytest.raises(EvplError, match="running this client's Loop"):
            client.acall(ECHO, b"x")

    evpl.aio.run(other_evpl_loop())
    assert client.stats()["requests"] == 0
    client.close()
    sink.close()
    loop.close()
