"""evpl.rpc2 Client <-> Server round trips over every available stream backend.

The backends come from the registry (``evpl.backends()``, through the
``stream_backend`` fixture of tests/conftest.py), so rpc2 is proven over
tcp, unix and the io_uring backends (io_uring_tcp, io_uring_unix) wherever
they exist: pipelined calls, a 1 MiB opaque argument and reply, and
deferred replies sent out of order.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

from core.helpers import close_loop_clean

import evpl
from evpl.rpc2 import DEFER, Client, Server, load_x

calc = load_x(Path(__file__).parent / "data" / "calc.x", name="calc_x")

TIMEOUT = 20.0
PROG, VERS = calc.CALC_PROG, calc.CALC_VERS
BLOB_PROG = 0x20000125  # a dict-registered program: proc 1 echoes an opaque<>
MIB = 1 << 20


class Calc(calc.CALC_VERSServer):
    def __init__(self) -> None:
        self.held: list[tuple[Any, int]] = []

    def CALC_ADD(self, p: Any) -> int:
        return p.a + p.b

    def CALC_DELAY(self, ctx: Any, n: int) -> Any:
        self.held.append((ctx, n))
        return DEFER

    def CALC_BLOB(self, n: int) -> bytes:
        return bytes(i & 0xFF for i in range(n))


def echo_opaque(ctx: Any, args: memoryview) -> bytes:
    """Raw procedure: the argument is an opaque<>; reply with the same opaque, reversed."""
    (n,) = struct.unpack_from(">I", args, 0)
    data = bytes(args[4:4 + n])
    if len(data) != n:
        raise ValueError("short opaque")
    pad = -n % 4
    return struct.pack(">I", n) + data[::-1] + b"\0" * pad


def opaque(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data + b"\0" * (-len(data) % 4)


def unpack_opaque(buf: Any) -> bytes:
    (n,) = struct.unpack_from(">I", buf, 0)
    return bytes(buf[4:4 + n])


class Pair:
    """A server on ``backend`` and a client connected to it."""

    def __init__(self, loop: evpl.Loop, backend: str, address: Any) -> None:
        self.loop = loop
        self.impl = Calc()
        self.server = Server(loop, max_record=4 * MIB)
        self.server.register(PROG, VERS, self.impl)
        self.server.register(BLOB_PROG, 1, {1: echo_opaque})
        listener = self.server.listen(backend, address(backend))
        self.client = Client(loop, backend, listener.address, timeout=TIMEOUT,
                             max_record=4 * MIB)
        self.stub = calc.CALC_VERSClient(self.client)

    def wait(self, rpc: Any) -> Any:
        return self.client.wait(rpc, TIMEOUT)

    def close(self) -> None:
        """Close everything, the loop too, and check that no pool buffer is still in use
        (the ``loop`` fixture checks again at teardown)."""
        self.client.close()
        self.server.close()
        close_loop_clean(self.loop)


def test_pipelined(loop, stream_backend: str, address) -> None:
    p = Pair(loop, stream_backend, address)
    assert p.wait(p.client.call(PROG, VERS, 0)) == b""
    n = 3000
    calls = [p.stub.CALC_ADD(calc.pair(i, 2 * i)) for i in range(n)]
    assert p.client.pending == n
    loop.run_until(lambda: all(c.done for c in calls), TIMEOUT)
    assert [c.result() for c in calls] == [3 * i for i in range(n)]
    # a second wave, mixed with NULL calls, on the same connection
    calls = [p.stub.CALC_ADD(calc.pair(i, 1)) if i % 2 else p.client.call(PROG, VERS, 0)
             for i in range(500)]
    loop.run_until(lambda: all(c.done for c in calls), TIMEOUT)
    assert [c.result() for c in calls] == [i + 1 if i % 2 else b"" for i in range(500)]
    p.close()


def test_one_mib_argument_and_reply(loop, stream_backend: str, address) -> None:
    p = Pair(loop, stream_backend, address)
    data = bytes((i * 7 + 3) & 0xFF for i in range(MIB))
    rpc = p.client.call(BLOB_PROG, 1, 1, opaque(data), unpack_opaque)
    assert p.wait(rpc) == data[::-1]
    blob = p.wait(p.stub.CALC_BLOB(MIB))  # 1 MiB reply from a generated procedure
    assert blob == bytes(i & 0xFF for i in range(MIB))
    # several big calls in flight at once, plus small ones between them
    odd = data[: MIB - 3]  # padded opaque
    calls = [p.client.call(BLOB_PROG, 1, 1, opaque(odd), unpack_opaque),
             p.stub.CALC_ADD(calc.pair(1, 2)),
             p.client.call(BLOB_PROG, 1, 1, opaque(data), unpack_opaque)]
    loop.run_until(lambda: all(c.done for c in calls), TIMEOUT)
    assert calls[0].result() == odd[::-1]
    assert calls[1].result() == 3
    assert calls[2].result() == data[::-1]
    p.close()


def test_out_of_order_async_replies(loop, stream_backend: str, address) -> None:
    p = Pair(loop, stream_backend, address)
    n = 16
    calls = [p.stub.CALC_DELAY(i) for i in range(n)]
    order: list[int] = []
    for c in calls:
        c.add_done_callback(lambda c: order.append(c.result()))
    loop.run_until(lambda: len(p.impl.held) == n, TIMEOUT)
    assert not any(c.done for c in calls)
    # immediate replies overtake the held ones on the same connection
    assert p.wait(p.stub.CALC_ADD(calc.pair(5, 6))) == 11
    # answer odd ones first (reversed), then even ones, some from a later callback
    held = dict((n_, ctx) for ctx, n_ in p.impl.held)
    for i in reversed(range(1, n, 2)):
        held[i].reply(i * 100)
    for i in range(0, n, 2):
        loop.call_later(0.001 * (n - i), held[i].reply, i * 100)
    loop.run_until(lambda: all(c.done for c in calls), TIMEOUT)
    expected = [i * 100 for i in reversed(range(1, n, 2))]
    expected += [i * 100 for i in reversed(range(0, n, 2))]
    assert order == expected
    assert [c.result() for c in calls] == [i * 100 for i in range(n)]
    p.close()


def test_udp_call_to_a_dead_port_fails_at_once(loop, datagram_backend: str) -> None:
    """The UDP client's socket is connected: ICMP port unreachable fails the
    pending calls with ConnectionRefused, long before the call timeout."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()
    client = Client(loop, datagram_backend, dead, timeout=60.0)
    rpc = client.call(100000, 2, 0)
    started = loop.now()
    loop.run_until(lambda: rpc.done, timeout=TIMEOUT)
    assert isinstance(rpc.exception(), evpl.ConnectionRefused)
    assert loop.now() - started < 60.0      # not the call timeout
    later = client.call(100000, 2, 0)       # the client is closed now
    assert later.done and later.exception() is not None
