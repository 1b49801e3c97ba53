"""Hostile input for the evpl.rpc2 Server, fuzzed with hypothesis.

A raw socket sends generated streams to a server serving calc.x: random
bytes, record-marked random records, valid call headers followed by random
or adversarial arguments (4 GiB lengths, unknown enum and union
discriminants, counts past the record), truncated headers, credentials with
huge opaque_auth lengths, record marks claiming more than the record holds
(up to 2 GiB, and 4 GiB with the last-fragment bit), random fragmentation,
and concatenations of these. Then it half-closes and reads until the server
closes. Whatever it sent:

- everything the server wrote back is a well-formed reply;
- when the stream holds only well-formed calls (any arguments, any
  fragmentation), each is answered (SUCCESS, GARBAGE_ARGS, SYSTEM_ERR,
  PROC_UNAVAIL...); after a hostile record the server may close instead;
- the server drops the connection and keeps no state for it;
- a second, well-behaved client keeps getting correct replies;
- no callback raised, and at the end no pool buffer is in use.

The same over UDP with datagrams: each is ignored or answered with a
well-formed reply, and the server keeps serving.
"""

from __future__ import annotations

import itertools
import socket
import struct
from pathlib import Path
from typing import Any

import pytest
from core.helpers import close_loop_clean
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import evpl
from evpl.rpc2 import Client, GarbageArgs, Server, load_x
from evpl.rpc2.wire import RecordReader, decode_reply, encode_call, record_mark

calc = load_x(Path(__file__).parent / "data" / "calc.x", name="calc_x")

PROG, VERS = calc.CALC_PROG, calc.CALC_VERS
TIMEOUT = 10.0
MAX_RECORD = 64 << 10
FUZZ = settings(max_examples=100, deadline=None, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class Calc(calc.CALC_VERSServer):
    """Every procedure answers at once; nothing allocates from a client's number."""

    def CALC_ADD(self, p: Any) -> int:
        return p.a + p.b  # may overflow an int: SYSTEM_ERR

    def CALC_ECHO(self, a: Any) -> Any:
        return calc.echo_res(a.name, a.values, sum(a.values) + a.big)

    def CALC_CALC(self, a: Any) -> Any:
        return calc.calc_res(0, a.a + a.b)

    def CALC_DELAY(self, n: int) -> int:
        return n

    def CALC_BLOB(self, n: int) -> bytes:
        if n > 4096:
            raise GarbageArgs("too big for the fuzz test")
        return bytes(n)

    def CALC_NUM(self, num: Any) -> int:
        return num.value


# -- strategies -----------------------------------------------------------------

U32 = st.one_of(
    st.sampled_from([0, 1, 2, 3, 4, 7, 64, 65, 400, 401, 1000, 1001, 4096, 1 << 20,
                     0x3FFFFFFF, 0x40000000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFF0,
                     0xFFFFFFFC, 0xFFFFFFFF]),
    st.integers(0, 0xFFFFFFFF),
)
PROCS = st.sampled_from([0, 1, 2, 2, 3, 3, 4, 5, 6, 6, 99])  # more of the rich arguments
XIDS = st.integers(0, 0xFFFFFFFF)


def words(n: int) -> st.SearchStrategy[bytes]:
    """Up to ``n`` XDR words of adversarial values: lengths, counts, discriminants."""
    return st.lists(U32, max_size=n).map(lambda ws: struct.pack(f">{len(ws)}I", *ws))


ARGS = st.one_of(st.binary(max_size=300), words(24),
                 st.tuples(words(4), st.binary(max_size=64)).map(b"".join))


class Piece:
    """Bytes for the stream; ``xid``: a well-formed call the server must answer;
    ``hostile``: the server may close the connection on it."""

    def __init__(self, data: bytes, xid: int | None = None, hostile: bool = True) -> None:
        self.data = data
        self.xid = xid
        self.hostile = hostile

    def __repr__(self) -> str:
        return f"Piece({self.data[:48]!r}{'...' if len(self.data) > 48 else ''}, " \
               f"xid={self.xid}, hostile={self.hostile})"


@st.composite
def valid_call(draw: Any) -> Piece:
    """A well-formed call header (AUTH_NONE) with random arguments, maybe fragmented."""
    xid, proc, args = draw(XIDS), draw(PROCS), draw(ARGS)
    msg = encode_call(xid, PROG, VERS, proc, args)
    cuts = sorted(draw(st.lists(st.integers(0, len(msg)), max_size=3)))
    bounds = [0, *cuts, len(msg)]
    frags = [msg[a:b] for a, b in itertools.pairwise(bounds)]
    data = b"".join(record_mark(len(f), i == len(frags) - 1) + f for i, f in enumerate(frags))
    return Piece(data, xid, hostile=False)


@st.composite
def truncated_header(draw: Any) -> Piece:
    msg = encode_call(draw(XIDS), PROG, VERS, draw(PROCS), draw(ARGS))
    cut = draw(st.integers(0, 39))
    return Piece(record_mark(cut) + msg[:cut])


@st.composite
def huge_auth(draw: Any) -> Piece:
    """A call whose credentials (or verifier) claim a huge or oversized body."""
    flavor = draw(st.sampled_from([0, 1, 2, 3, 6]))
    length = draw(U32)
    body = draw(st.binary(max_size=64))
    head = struct.pack(">6I", draw(XIDS), 0, 2, PROG, VERS, draw(PROCS))
    if draw(st.booleans()):
        msg = head + struct.pack(">II", flavor, length) + body
    else:  # good credentials, hostile verifier
        msg = head + struct.pack(">IIII", 0, 0, flavor, length) + body
    return Piece(record_mark(len(msg)) + msg)


@st.composite
def short_record(draw: Any) -> Piece:
    """A record mark claiming more bytes than follow (up to 2 GiB; or a 4 GiB claim)."""
    data = draw(st.binary(max_size=64)) or b"x"
    if draw(st.booleans()):
        mark = struct.pack(">I", draw(st.integers(len(data) + 1, 0xFFFFFFFF)) | 0x80000000)
    else:
        mark = struct.pack(">I", draw(st.sampled_from([0xFFFFFFFF, 0x7FFFFFFF, 0xFFFFFFF0])))
    return Piece(mark + data)


def marked(data: bytes) -> Piece:
    return Piece(record_mark(len(data)) + data)


PIECES = st.one_of(
    valid_call(),
    st.binary(min_size=1, max_size=512).map(lambda b: Piece(b)),  # no record marking
    st.binary(max_size=512).map(marked),
    words(32).map(marked),
    truncated_header(),
    huge_auth(),
    short_record(),
)
# well-formed calls first (so they are served), then anything
STREAMS = st.tuples(st.lists(valid_call(), max_size=3), st.lists(PIECES, max_size=3)).map(
    lambda t: t[0] + t[1]).filter(bool)


# -- the harness ------------------------------------------------------------------

class Harness:
    """A server on ``backend`` and a well-behaved client of it."""

    def __init__(self, loop: evpl.Loop, backend: str) -> None:
        self.loop = loop
        self.server = Server(loop, max_record=MAX_RECORD, max_in_flight=16)
        self.server.register(PROG, VERS, Calc())
        if backend == "udp":
            self.addr = self.server.bind_udp(("127.0.0.1", 0)).local_address
        else:
            self.addr = self.server.listen(backend, ("127.0.0.1", 0)).address
        self.client = Client(loop, backend, self.addr, timeout=5.0, retransmit=0.2)
        self.stub = calc.CALC_VERSClient(self.client)
        self.n = 0

    def check_still_serving(self) -> None:
        self.n += 1
        rpc = self.stub.CALC_ADD(calc.pair(self.n, 1000))
        assert self.client.wait(rpc, TIMEOUT) == self.n + 1000
        errors = self.loop.callback_errors  # type: ignore[attr-defined]
        assert not errors, "\n".join(errors.tracebacks)

    def close(self) -> None:
        """Close everything (the loop too); no pool buffer may still be in use."""
        self.client.close()
        self.server.close()
        close_loop_clean(self.loop)


def exchange(loop: evpl.Loop, addr: Any, data: bytes) -> tuple[list[bytes], bytes]:
    """Send ``data`` on a fresh connection, half-close, read until the server closes.

    Returns the complete records received and any trailing partial bytes.
    """
    sock = socket.create_connection(addr, timeout=TIMEOUT)
    received = bytearray()
    eof = [False]
    try:
        sock.setblocking(False)
        view = memoryview(data)

        def pump() -> bool:
            nonlocal view
            if view:
                try:
                    view = view[sock.send(view):]
                except BlockingIOError:
                    pass
                except (BrokenPipeError, ConnectionResetError):
                    view = view[:0]  # the server closed on an earlier record
                if not view:
                    try:
                        sock.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
            while True:
                try:
                    chunk = sock.recv(1 << 16)
                except BlockingIOError:
                    return False
                except ConnectionResetError:
                    chunk = b""
                if not chunk:
                    eof[0] = True
                    return not view
                received.extend(chunk)

        loop.run_until(pump, TIMEOUT)
    finally:
        sock.close()
    reader = RecordReader()
    records = reader.feed(bytes(received))
    return records, bytes(received[len(received) - reader.buffered:]) if reader.buffered else b""


# -- the tests ----------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["tcp"])
def test_fuzz_stream(loop, backend: str) -> None:
    h = Harness(loop, backend)
    h.check_still_serving()

    @FUZZ
    @given(pieces=STREAMS)
    def check(pieces: list[Piece]) -> None:
        data = b"".join(p.data for p in pieces)
        records, partial = exchange(loop, h.addr, data)
        assert not partial, f"a partial reply record: {partial[:64]!r}"
        replies = [decode_reply(r) for r in records]  # every one well-formed
        if not any(p.hostile for p in pieces):
            # only well-formed calls: each one answered (a hostile record may close
            # the connection before the replies queued for earlier calls go out)
            answered = {r.xid for r in replies}
            for p in pieces:
                assert p.xid in answered, f"no reply to the well-formed call {p.xid:#x}"
        # the server forgot the connection (only the well-behaved client is left)
        loop.run_until(lambda: len(h.server._conns) == 1, TIMEOUT)
        h.check_still_serving()

    check()
    stats = h.server.stats
    assert stats["calls"] > 100 and stats["garbage_args"] > 0 and stats["bad_headers"] > 0
    h.close()


U_DATAGRAMS = st.lists(st.one_of(
    st.binary(max_size=600),
    st.builds(lambda xid, proc, args: encode_call(xid, PROG, VERS, proc, args),
              XIDS, PROCS, ARGS),
    huge_auth().map(lambda p: p.data[4:]),
    truncated_header().map(lambda p: p.data[4:]),
    words(40),
), min_size=1, max_size=6)


def test_fuzz_udp(loop) -> None:
    h = Harness(loop, "udp")
    h.check_still_serving()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)

    def drain() -> list[bytes]:
        got = []
        while True:
            try:
                got.append(sock.recv(1 << 16))
            except BlockingIOError:
                return got

    @FUZZ
    @given(datagrams=U_DATAGRAMS)
    def check(datagrams: list[bytes]) -> None:
        for d in datagrams:
            sock.sendto(d, h.addr)
        # the well-behaved call arrives after the fuzz datagrams on the server's socket
        h.check_still_serving()
        for _ in range(3):
            loop.run_once(0.001)
        for reply in drain():
            decode_reply(reply)  # ignored or answered with a well-formed reply

    try:
        check()
    finally:
        sock.close()
    h.close()


def test_slowloris_record_is_timed_out() -> None:
    """A client that announces a record, sends part of it and stops is
    disconnected after the server's message_timeout; a client that pipelines
    whole calls on the same server is served meanwhile."""
    loop = evpl.Loop()
    server = Server(loop, message_timeout=0.3)
    server.register(PROG, VERS, Calc())
    listener = server.listen("tcp", ("127.0.0.1", 0))
    slow = socket.create_connection(listener.address)
    slow.sendall(record_mark(1000, True) + b"x" * 100)
    good = Client(loop, "tcp", listener.address)
    stub = calc.CALC_VERSClient(good)
    assert good.wait(stub.CALC_ADD(calc.pair(2, 3)), timeout=10) == 5
    slow.settimeout(10)
    got = []

    def hung_up() -> bool:
        try:
            got.append(slow.recv(100, socket.MSG_DONTWAIT))
        except BlockingIOError:
            return False
        except ConnectionResetError:
            got.append(b"")
        return True

    loop.run_until(lambda: loop.stats()["timeouts"] >= 1, timeout=10)
    loop.run_until(hung_up, timeout=10)
    assert got == [b""]                           # closed, nothing answered
    assert good.wait(stub.CALC_ADD(calc.pair(4, 5)), timeout=10) == 9
    slow.close()
    good.close()
    close_loop_clean(loop)
