"""evpl.rpc2 Server <-> Client over real sockets (tcp, unix, udp), plus raw-socket peers
that send hostile records and retransmissions."""

from __future__ import annotations

import logging
import os
import socket
import struct
from pathlib import Path
from typing import Any

import pytest

import evpl
from evpl.rpc2 import (
    DEFER,
    AuthError,
    AuthStat,
    AuthSys,
    Client,
    ClientClosed,
    GarbageArgs,
    OpaqueAuth,
    ProcUnavail,
    ProgMismatch,
    ProgUnavail,
    RpcMismatch,
    RpcTimeout,
    Server,
    SystemErr,
    load_x,
    portmap,
)
from evpl.rpc2.client import reply_error
from evpl.rpc2.portmap import PortmapClient, PortmapServer, parse_uaddr, uaddr
from evpl.rpc2.server import DRC_ENTRY_OVERHEAD
from evpl.rpc2.wire import (
    RecordReader,
    decode_reply,
    encode_accepted,
    encode_call,
    record_mark,
)
from evpl.rpc2.xdr import XdrError

calc = load_x(Path(__file__).parent / "data" / "calc.x", name="calc_x")

TIMEOUT = 10.0
PROG, VERS = calc.CALC_PROG, calc.CALC_VERS
UID_PROG = 0x20000124


class Calc(calc.CALC_VERSServer):
    """The test implementation: counts calls, holds CALC_DELAY calls for the test."""

    def __init__(self) -> None:
        self.calls = 0
        self.held: list[tuple[Any, int]] = []

    def CALC_ADD(self, p: Any) -> int:
        self.calls += 1
        return p.a + p.b  # may overflow int: the encoder fails -> SYSTEM_ERR

    def CALC_ECHO(self, a: Any) -> Any:
        return calc.echo_res(a.name, a.values, sum(a.values) + a.big)

    def CALC_CALC(self, a: Any) -> Any:
        if a.op == calc.OP_ADD:
            return calc.calc_res(0, a.a + a.b)
        if a.op == calc.OP_MUL:
            return calc.calc_res(0, a.a * a.b)
        if a.b == 0:
            return calc.calc_res(1, b"division by zero")
        return calc.calc_res(0, a.a // a.b)

    def CALC_DELAY(self, ctx: Any, n: int) -> Any:
        self.held.append((ctx, n))
        return DEFER

    def CALC_BLOB(self, n: int) -> bytes:
        if n == 0xFFFFFFFF:
            raise RuntimeError("handler failure on purpose")
        return bytes(i & 0xFF for i in range(n))

    def CALC_NUM(self, num: Any) -> int:
        return num.value


def uid_proc(ctx: Any, args: memoryview) -> bytes:
    """A raw dict-registered procedure: returns the caller's AUTH_SYS uid."""
    if not isinstance(ctx.cred, AuthSys):
        raise AuthError(AuthStat.AUTH_TOOWEAK)
    return struct.pack(">I", ctx.cred.uid)


RAW_PROG = 0x20000125


def raw_procs(loop: evpl.Loop) -> dict[int, Any]:
    """Raw dict-registered procedures without ``ctx`` (``fn(args)``: the
    native batch path on streams): reversed arguments, no result, a result
    large enough to be sent by reference, a result that is not bytes-like,
    a memoryview result, and a call deferred through current_call()."""
    from evpl.rpc2 import current_call
    from evpl.rpc2.xdr import SCATTER_MIN

    def later(args: memoryview) -> Any:
        ctx = current_call()
        loop.call_later(0, ctx.reply, b"late" + bytes(args))
        return DEFER

    return {1: lambda args: bytes(args)[::-1],
            2: lambda args: None,
            3: lambda args: bytes(range(256)) * (SCATTER_MIN // 256 + 1),
            4: lambda args: "not bytes",
            5: lambda args: memoryview(b"view" + bytes(args)),
            6: later}


TRANSPORTS = ["tcp", "unix", "udp"]


class Setup:
    def __init__(self, loop: evpl.Loop, transport: str, address: Any, **server_kw: Any) -> None:
        self.loop = loop
        self.transport = transport
        self.impl = Calc()
        self.server = Server(loop, **server_kw)
        self.server.register(PROG, VERS, self.impl)
        self.server.register(PROG, 3, {})  # versions 1..3 -> PROG_MISMATCH(1, 3)
        self.server.register(UID_PROG, 1, {1: uid_proc})
        self.server.register(RAW_PROG, 1, raw_procs(loop))
        if transport == "udp":
            self.bind = self.server.bind_udp(("127.0.0.1", 0))
            self.addr = self.bind.local_address
        else:
            listener = self.server.listen(transport, address(transport))
            self.addr = listener.address
        self.client = self.make_client()
        self.stub = calc.CALC_VERSClient(self.client)

    def make_client(self, **kw: Any) -> Client:
        kw.setdefault("timeout", 5.0)
        return Client(self.loop, self.transport, self.addr, **kw)

    def wait(self, rpc: Any) -> Any:
        return self.client.wait(rpc, TIMEOUT)


@pytest.fixture(params=TRANSPORTS)
def setup(request, loop, address) -> Setup:
    return Setup(loop, request.param, address)


def test_values(setup: Setup) -> None:
    s = setup
    assert s.wait(s.client.call(PROG, VERS, 0, b"", None)) == b""
    assert s.wait(s.stub.CALC_ADD(calc.pair(2, 3))) == 5
    r = s.wait(s.stub.CALC_ECHO(calc.echo_args(b"hello", [1, 2, 3], 1 << 40)))
    assert (r.name, r.values, r.sum) == (b"hello", [1, 2, 3], (1 << 40) + 6)
    assert s.wait(s.stub.CALC_CALC(calc.calc_args(calc.OP_MUL, 6, -7))).value == -42
    err = s.wait(s.stub.CALC_CALC(calc.calc_args(calc.OP_DIV, 1, 0)))
    assert (err.status, err.value) == (1, b"division by zero")
    assert s.wait(s.stub.CALC_NUM(calc.calc_num(2, -(1 << 50)))) == -(1 << 50)
    assert s.wait(s.stub.CALC_BLOB(1000)) == bytes(i & 0xFF for i in range(1000))


def test_pipelined(setup: Setup) -> None:
    s = setup
    n = 2000 if s.transport != "udp" else 200
    calls = [s.stub.CALC_ADD(calc.pair(i, i)) for i in range(n)]
    assert s.client.pending == n
    s.loop.run_until(lambda: all(c.done for c in calls), TIMEOUT)
    assert [c.result() for c in calls] == [2 * i for i in range(n)]
    assert s.impl.calls == n


def test_out_of_order_deferred_replies(setup: Setup) -> None:
    s = setup
    calls = [s.stub.CALC_DELAY(i) for i in range(8)]
    order: list[int] = []
    for c in calls:
        c.add_done_callback(lambda c: order.append(c.result()))
    s.loop.run_until(lambda: len(s.impl.held) == 8, TIMEOUT)
    assert not any(c.done for c in calls)
    for ctx, n in reversed(s.impl.held):
        ctx.reply(n * 10)
    s.loop.run_until(lambda: all(c.done for c in calls), TIMEOUT)
    assert order == [n * 10 for n in reversed(range(8))]


def test_errors(setup: Setup) -> None:
    s = setup
    c = s.client
    with pytest.raises(ProgUnavail):
        s.wait(c.call(0x3FFFFFFF, 1, 0))
    with pytest.raises(ProgMismatch) as mm:
        s.wait(c.call(PROG, 2, 0))
    assert (mm.value.low, mm.value.high) == (1, 3)
    with pytest.raises(ProcUnavail):
        s.wait(c.call(PROG, VERS, 99))
    with pytest.raises(ProcUnavail):
        s.wait(c.call(PROG, 3, 1))
    assert s.wait(c.call(PROG, 3, 0)) == b""  # NULL answered though not registered
    with pytest.raises(GarbageArgs):
        s.wait(c.call(PROG, VERS, calc.CALC_ADD, b"\0\0\0\1"))  # truncated pair
    with pytest.raises(GarbageArgs):  # enum value out of range
        s.wait(c.call(PROG, VERS, calc.CALC_CALC, struct.pack(">Iqq", 77, 1, 2)))
    with pytest.raises(GarbageArgs):  # union discriminant without an arm
        s.wait(c.call(PROG, VERS, calc.CALC_NUM, struct.pack(">Ii", 9, 1)))
    with pytest.raises(SystemErr):  # result does not fit an int
        s.wait(s.stub.CALC_ADD(calc.pair(2**31 - 1, 1)))
    with pytest.raises(SystemErr):  # the handler raised
        s.wait(s.stub.CALC_BLOB(0xFFFFFFFF))
    with pytest.raises(AuthError) as ae:  # raised by the handler: AUTH_NONE is too weak
        s.wait(c.call(UID_PROG, 1, 1))
    assert ae.value.stat is AuthStat.AUTH_TOOWEAK
    # after all that the server still serves this client
    assert s.wait(s.stub.CALC_ADD(calc.pair(1, 1))) == 2


def test_raw_procedures_without_ctx(setup: Setup, caplog: pytest.LogCaptureFixture) -> None:
    """``{proc: fn}`` with ``fn(args)``: the undecoded arguments in, the
    encoded result out, pipelined calls answered in order, a deferred call
    answered later, and a result that is not bytes-like answered SYSTEM_ERR."""
    from evpl.rpc2.xdr import SCATTER_MIN

    s = setup
    c = s.client
    calls = [c.call(RAW_PROG, 1, 1, b"abcd%04d" % i, None) for i in range(40)]
    calls.append(c.call(RAW_PROG, 1, 6, b"wxyz", None))
    calls.append(c.call(RAW_PROG, 1, 2, b"1234", None))
    calls.append(c.call(RAW_PROG, 1, 5, b"5678", None))
    got = [s.wait(r) for r in calls]
    assert got[:40] == [(b"abcd%04d" % i)[::-1] for i in range(40)]
    assert got[40:] == [b"latewxyz", b"", b"view5678"]
    if s.transport != "udp":        # (UDP datagrams stop at 64 KiB)
        big = s.wait(c.call(RAW_PROG, 1, 3, b"", None))
        assert len(big) >= SCATTER_MIN and big == bytes(range(256)) * (len(big) // 256)
    with caplog.at_level(logging.ERROR, logger="evpl.rpc2"), pytest.raises(SystemErr):
        s.wait(c.call(RAW_PROG, 1, 4, b"", None))
    assert "cannot encode the result" in caplog.text
    assert s.wait(c.call(RAW_PROG, 1, 1, b"4321", None)) == b"1234"


def test_unencodable_result_is_logged_as_a_result(setup: Setup,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    s = setup
    caplog.set_level(logging.ERROR, logger="evpl.rpc2")
    with pytest.raises(SystemErr):
        s.wait(s.stub.CALC_ADD(calc.pair(2**31 - 1, 1)))  # 2**31 does not fit an int
    [record] = [r for r in caplog.records if r.name == "evpl.rpc2"]
    first_line = record.getMessage().splitlines()[0]
    assert first_line.startswith("rpc2: cannot encode the result of <CallContext")
    assert first_line.endswith("(answering SYSTEM_ERR): cannot encode int: "
                               "'i' format requires -2147483648 <= number <= 2147483647")
    assert "argument" not in record.getMessage()
    assert s.server.stats["system_err"] == 1


def test_trailing_bytes_after_arguments_are_ignored(setup: Setup) -> None:
    """As libtirpc does (docs/rpc2.md, differences from rpcgen)."""
    s = setup
    args = calc.encode_pair(calc.pair(20, 22)) + b"\0\0\0\7extra..."
    assert s.wait(s.client.call(PROG, VERS, calc.CALC_ADD, args,
                                lambda b: struct.unpack(">i", b)[0])) == 42


def test_unknown_enum_argument_is_garbage_args(setup: Setup) -> None:
    """rpcgen's xdr_enum would accept 3 and run the procedure."""
    s = setup
    with pytest.raises(GarbageArgs):
        s.wait(s.client.call(PROG, VERS, calc.CALC_CALC, struct.pack(">iqq", 3, 1, 2)))
    assert s.wait(s.stub.CALC_CALC(calc.calc_args(calc.OP_ADD, 1, 2))).value == 3


def test_auth(setup: Setup) -> None:
    s = setup
    good = s.make_client(auth=AuthSys(7, b"host", 1234, 100, (1, 2, 3)))
    assert good.wait(good.call(UID_PROG, 1, 1, b"", lambda b: struct.unpack(">I", b)[0]),
                     TIMEOUT) == 1234
    good.cred = AuthSys(8, b"host", 4321, 100, ())      # the next calls carry these
    assert good.wait(good.call(UID_PROG, 1, 1, b"", lambda b: struct.unpack(">I", b)[0]),
                     TIMEOUT) == 4321
    with pytest.raises(XdrError):
        good.call(0x1_0000_0000, 1, 1)                  # prog is a uint32
    assert good.pending == 0
    bad = s.make_client(auth=OpaqueAuth(1, b"\0\0\0\1"))  # AUTH_SYS body truncated
    with pytest.raises(AuthError) as ae:
        bad.wait(bad.call(PROG, VERS, 0), TIMEOUT)
    assert ae.value.stat is AuthStat.AUTH_BADCRED
    dh = s.make_client(auth=OpaqueAuth(3, b"x" * 8))  # AUTH_DH is not supported
    with pytest.raises(AuthError) as ae:
        dh.wait(dh.call(PROG, VERS, 0), TIMEOUT)
    assert ae.value.stat is AuthStat.AUTH_REJECTEDCRED
    for cl in (good, bad, dh):
        cl.close()


def test_wait_inside_callback_is_refused(setup: Setup) -> None:
    s = setup
    seen: list[BaseException] = []

    def cb(c: Any) -> None:
        try:
            s.client.wait(s.stub.CALC_ADD(calc.pair(1, 2)))
        except evpl.EvplError as e:
            seen.append(e)

    first = s.stub.CALC_ADD(calc.pair(0, 0))
    first.add_done_callback(cb)
    s.wait(first)
    assert seen and "callback" in str(seen[0])


def test_timeout(setup: Setup) -> None:
    s = setup
    client = s.make_client(timeout=0.2, retransmit=0.05)
    rpc = calc.CALC_VERSClient(client).CALC_DELAY(1)  # held by the server, never answered
    with pytest.raises(RpcTimeout):
        client.wait(rpc, TIMEOUT)
    assert client.pending == 0
    if s.transport == "udp":
        # every retransmission hits the duplicate request cache as "in progress"
        # (the last ones may still be on their way when the deadline fires)
        sent = rpc.retransmits
        s.loop.run_until(lambda: s.server.drc_stats()["drc_in_progress"] >= sent, TIMEOUT)
        assert s.server.drc_stats()["drc_in_progress"] == sent
        assert len(s.impl.held) == 1
    # a late reply to a timed-out call is ignored
    s.impl.held[0][0].reply(5)
    assert client.wait(client.call(PROG, VERS, 0), TIMEOUT) == b""


def test_close_fails_pending(setup: Setup) -> None:
    s = setup
    rpc = s.stub.CALC_DELAY(1)
    s.client.close()
    with pytest.raises(ClientClosed):
        rpc.result()
    with pytest.raises(ClientClosed):
        s.client.call(PROG, VERS, 0).result()


# -- stream specifics ---------------------------------------------------------

STREAMS = ["tcp", "unix"]


@pytest.fixture(params=STREAMS)
def stream(request, loop, address) -> Setup:
    return Setup(loop, request.param, address)


def raw_connect(addr: Any) -> socket.socket:
    family = socket.AF_UNIX if isinstance(addr, str) else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT)
    sock.connect(addr)
    sock.setblocking(False)
    return sock


class RawPeer:
    """A plain socket that sends records and reads replies while the loop runs."""

    def __init__(self, loop: evpl.Loop, addr: Any) -> None:
        self.loop = loop
        self.sock = raw_connect(addr)
        self.reader = RecordReader()
        self.records: list[bytes] = []
        self.eof = False

    def send(self, data: bytes) -> None:
        self.sock.setblocking(True)
        self.sock.sendall(data)
        self.sock.setblocking(False)

    def _pump(self) -> bool:
        try:
            data = self.sock.recv(1 << 20)
        except BlockingIOError:
            return bool(self.records)
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
        else:
            self.records += self.reader.feed(data)
        return bool(self.records) or self.eof

    def reply(self) -> Any:
        self.loop.run_until(self._pump, TIMEOUT)
        assert self.records, "connection closed without a reply"
        return decode_reply(self.records.pop(0))

    def wait_closed(self) -> None:
        self.loop.run_until(lambda: self._pump() and self.eof, TIMEOUT)

    def close(self) -> None:
        self.sock.close()


def call_bytes(xid: int, proc: int, args: bytes = b"", prog: int = PROG) -> bytes:
    return encode_call(xid, prog, VERS, proc, args)


def test_multi_fragment_call_and_big_reply(stream: Setup) -> None:
    s = stream
    peer = RawPeer(s.loop, s.addr)
    msg = call_bytes(1, calc.CALC_ECHO, calc.encode_echo_args(
        calc.echo_args(b"frag", list(range(500)), 0)))
    parts = [msg[:10], msg[10:700], msg[700:]]
    peer.send(b"".join(record_mark(len(p), i == 2) + p for i, p in enumerate(parts)))
    r = peer.reply()
    assert r.ok and calc.decode_echo_res(r.results).sum == sum(range(500))
    peer.close()
    blob = s.wait(s.stub.CALC_BLOB(1 << 20))
    assert len(blob) == 1 << 20 and blob[:3] == b"\0\1\2"


def test_rpc_version_mismatch(stream: Setup) -> None:
    peer = RawPeer(stream.loop, stream.addr)
    msg = bytearray(call_bytes(0x55, 0))
    msg[8:12] = struct.pack(">I", 3)
    peer.send(record_mark(len(msg)) + bytes(msg))
    r = peer.reply()
    assert r.xid == 0x55 and r.mismatch == (2, 2)
    assert isinstance(reply_error(r), RpcMismatch)
    peer.close()


@pytest.mark.parametrize("case", ["4gib_opaque", "string_past_record", "array_count",
                                  "bad_enum", "bad_union", "trailing_short"])
def test_hostile_args_get_garbage_args(stream: Setup, case: str) -> None:
    s = stream
    args = {
        "4gib_opaque": (calc.CALC_ECHO, struct.pack(">I", 0xFFFFFFFF) + b"abcd"),
        "string_past_record": (calc.CALC_ECHO, struct.pack(">I", 40) + b"short"),
        "array_count": (calc.CALC_ECHO, struct.pack(">I4sI", 4, b"name", 0x40000000)),
        "bad_enum": (calc.CALC_CALC, struct.pack(">Iqq", 0x80000000, 1, 1)),
        "bad_union": (calc.CALC_NUM, struct.pack(">Iq", 3, 1)),
        "trailing_short": (calc.CALC_CALC, struct.pack(">Iq", 0, 1)),
    }[case]
    peer = RawPeer(s.loop, s.addr)
    for xid in (1, 2):
        msg = call_bytes(xid, *args)
        peer.send(record_mark(len(msg)) + msg)
        r = peer.reply()
        assert r.xid == xid and r.accept_stat.name == "GARBAGE_ARGS"
    # the same connection keeps serving
    msg = call_bytes(3, calc.CALC_ADD, calc.encode_pair(calc.pair(4, 5)))
    peer.send(record_mark(len(msg)) + msg)
    r = peer.reply()
    assert r.ok and struct.unpack(">i", r.results)[0] == 9
    peer.close()


@pytest.mark.parametrize("case", ["4gib_record", "over_max_record", "short_header",
                                  "reply_not_call", "cred_past_end"])
def test_hostile_records_close_connection(stream: Setup, case: str) -> None:
    s = stream
    payload = {
        "4gib_record": struct.pack(">I", 0xFFFFFFFF) + b"x" * 16,
        "over_max_record": record_mark(s.server.max_record + 1) + b"x" * 16,
        "short_header": record_mark(10) + b"x" * 10,
        "reply_not_call": record_mark(24) + encode_accepted(9),
        "cred_past_end": record_mark(32) + struct.pack(">8I", 1, 0, 2, PROG, VERS, 0, 1, 300),
    }[case]
    peer = RawPeer(s.loop, s.addr)
    peer.send(payload)
    peer.wait_closed()
    peer.close()
    # other clients are still served
    assert s.wait(s.stub.CALC_ADD(calc.pair(20, 22))) == 42


def test_in_flight_limit_pauses_reading(loop, address) -> None:
    s = Setup(loop, "tcp", address, max_in_flight=4)
    calls = [s.stub.CALC_DELAY(i) for i in range(10)]
    loop.run_until(lambda: len(s.impl.held) == 4, TIMEOUT)
    for _ in range(20):
        loop.run_once(0.005)
    assert len(s.impl.held) == 4  # the connection is paused, calls wait in the socket
    answered = [0]
    while answered[0] < 10:
        loop.run_until(lambda: len(s.impl.held) > answered[0], TIMEOUT)
        for ctx, n in s.impl.held[answered[0]:]:
            ctx.reply(n)
            answered[0] += 1
    loop.run_until(lambda: all(c.done for c in calls), TIMEOUT)
    assert [c.result() for c in calls] == list(range(10))


def test_connection_refused_and_reset(loop, address) -> None:
    s = Setup(loop, "tcp", address)
    port = s.addr[1]
    s.server.close()
    loop.run_once(0)
    client = Client(loop, "tcp", ("127.0.0.1", port), timeout=5)
    with pytest.raises(evpl.ConnectionRefused):
        client.wait(client.call(PROG, VERS, 0), TIMEOUT)
    # a server that goes away fails pending calls with the transport error
    s2 = Setup(loop, "tcp", address)
    rpc = s2.stub.CALC_DELAY(1)
    loop.run_until(lambda: s2.impl.held, TIMEOUT)
    s2.server.close()
    with pytest.raises(evpl.TransportError):
        s2.wait(rpc)


def test_unix_connection_refused_fails_the_call(loop, address) -> None:
    """A unix socket nobody listens on refuses the connect at once: the call
    fails with ConnectionRefused (it used to raise "send on a closed Bind")."""
    path = address("unix")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens
    client = Client(loop, "unix", path, timeout=5)
    rpc = client.call(PROG, VERS, 0)
    with pytest.raises(evpl.ConnectionRefused):
        client.wait(rpc, TIMEOUT)
    with pytest.raises(evpl.ConnectionRefused):  # later calls fail the same way
        client.call(PROG, VERS, 0).result()


# -- UDP specifics ------------------------------------------------------------

@pytest.fixture
def udp(loop, address) -> Setup:
    return Setup(loop, "udp", address)


def test_udp_duplicate_request_cache(udp: Setup) -> None:
    s = udp
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    msg = call_bytes(0x1234, calc.CALC_ADD, calc.encode_pair(calc.pair(1, 2)))
    replies: list[bytes] = []
    want = [0]

    def pump() -> bool:
        try:
            replies.append(sock.recv(65536))
        except BlockingIOError:
            pass
        return len(replies) >= want[0]

    for want[0] in (1, 2, 3):
        sock.sendto(msg, s.addr)
        s.loop.run_until(pump, TIMEOUT)
    assert s.impl.calls == 1  # executed once, answered three times
    assert replies[0] == replies[1] == replies[2]
    assert struct.unpack(">i", decode_reply(replies[0]).results)[0] == 3
    assert s.server.drc_stats()["drc_hits"] == 2
    # same xid, different arguments: a new call
    sock.sendto(call_bytes(0x1234, calc.CALC_ADD, calc.encode_pair(calc.pair(5, 5))), s.addr)
    want[0] = 4
    s.loop.run_until(pump, TIMEOUT)
    assert s.impl.calls == 2 and struct.unpack(">i", decode_reply(replies[3]).results)[0] == 10
    sock.close()


def test_udp_retransmission_while_in_progress(udp: Setup) -> None:
    s = udp
    client = s.make_client(retransmit=0.02)
    rpc = calc.CALC_VERSClient(client).CALC_DELAY(7)
    s.loop.run_until(lambda: s.server.drc_stats()["drc_in_progress"] >= 2, TIMEOUT)
    assert len(s.impl.held) == 1  # retransmissions did not run the handler again
    s.impl.held[0][0].reply(70)
    assert client.wait(rpc, TIMEOUT) == 70


class UdpPeer:
    """A raw UDP socket that sends calls to a server and collects the replies."""

    def __init__(self, loop: evpl.Loop, addr: Any) -> None:
        self.loop = loop
        self.addr = addr
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.replies: list[bytes] = []

    def exchange(self, *messages: bytes) -> list[bytes]:
        """Send ``messages``; run the loop until as many replies came back."""
        want = len(self.replies) + len(messages)
        for m in messages:
            self.sock.sendto(m, self.addr)

        def pump() -> bool:
            while True:
                try:
                    self.replies.append(self.sock.recv(65536))
                except BlockingIOError:
                    return len(self.replies) >= want

        self.loop.run_until(pump, TIMEOUT)
        return self.replies[want - len(messages):]

    def close(self) -> None:
        self.sock.close()


def add_call(xid: int, a: int = 1, b: int = 2) -> bytes:
    return call_bytes(xid, calc.CALC_ADD, calc.encode_pair(calc.pair(a, b)))


def test_udp_drc_outlives_a_burst_of_other_calls(loop, address) -> None:
    """A call is remembered for a time, not for a number of calls: 3000 other
    calls in between (more than the old 1024-entry LRU held) do not make its
    retransmission run again."""
    s = Setup(loop, "udp", address)
    peer = UdpPeer(loop, s.addr)
    [first] = peer.exchange(add_call(7))
    for chunk in range(30):
        peer.exchange(*(call_bytes(1000 + chunk * 100 + i, 0) for i in range(100)))
    assert s.server.drc_stats()["drc_entries"] == 3001
    assert peer.exchange(add_call(7)) == [first]
    assert s.impl.calls == 1
    stats = s.server.drc_stats()
    assert (stats["drc_hits"], stats["drc_expired"], stats["drc_evicted"]) == (1, 0, 0)
    assert stats["drc_bytes"] >= 3001 * DRC_ENTRY_OVERHEAD
    peer.close()


def test_udp_drc_forgets_after_its_window(loop, address) -> None:
    # the retransmission right after the call must land inside the window
    # even if the machine holds the process up for a while: 0.5 s, not 50 ms
    s = Setup(loop, "udp", address, drc_window=0.5)
    peer = UdpPeer(loop, s.addr)
    [first] = peer.exchange(add_call(8))
    assert peer.exchange(add_call(8)) == [first] and s.impl.calls == 1
    # let the window pass (the behaviour under test is time), then retransmit
    passed: list[bool] = []
    loop.call_later(0.55, passed.append, True)
    loop.run_until(lambda: bool(passed), TIMEOUT)
    peer.exchange(add_call(8))
    assert s.impl.calls == 2  # forgotten: it ran again
    stats = s.server.drc_stats()
    assert stats["drc_expired"] == 1 and stats["drc_entries"] == 1
    peer.close()


def test_udp_drc_byte_bound_drops_the_oldest(loop, address) -> None:
    bound = 10 * (DRC_ENTRY_OVERHEAD + 32)
    s = Setup(loop, "udp", address, drc_max_bytes=bound)
    peer = UdpPeer(loop, s.addr)
    first = peer.exchange(*(add_call(100 + i) for i in range(30)))
    stats = s.server.drc_stats()
    assert stats["drc_bytes"] <= bound and stats["drc_evicted"] >= 20
    assert stats["drc_entries"] == 30 - stats["drc_evicted"]
    assert peer.exchange(add_call(129)) == [first[29]]  # newest: still cached
    assert s.impl.calls == 30
    peer.exchange(add_call(100))  # oldest: dropped early, so it runs again
    assert s.impl.calls == 31
    peer.close()


def test_udp_drc_can_be_turned_off(loop, address) -> None:
    s = Setup(loop, "udp", address, drc_window=0)
    peer = UdpPeer(loop, s.addr)
    peer.exchange(add_call(9), add_call(9))
    assert s.impl.calls == 2
    assert s.server.drc_stats()["drc_entries"] == 0
    peer.close()


@pytest.mark.parametrize("kw", [{"drc_window": -1}, {"drc_window": float("nan")},
                                {"drc_max_bytes": 100}])
def test_drc_configuration_is_checked(loop, kw: dict[str, Any]) -> None:
    with pytest.raises(evpl.ConfigError):
        Server(loop, **kw)


class DropFirst(evpl.Handler):
    """A fake UDP server that ignores the first copy of each call."""

    def __init__(self) -> None:
        self.seen: dict[int, int] = {}

    def on_datagram(self, bind: Any, data: Any, addr: Any) -> None:
        xid = struct.unpack_from(">I", data)[0]
        self.seen[xid] = self.seen.get(xid, 0) + 1
        if self.seen[xid] == 2:
            reply = encode_accepted(xid, results=struct.pack(">i", 99))
            bind.sendto(reply, addr)
            bind.sendto(reply, addr)  # a duplicate reply: ignored by the client


class Answer(evpl.Handler):
    """A fake UDP server that answers every call with SUCCESS and ``results``."""

    def __init__(self, results: bytes) -> None:
        self.results = results

    def on_datagram(self, bind: Any, data: Any, addr: Any) -> None:
        xid = struct.unpack_from(">I", data)[0]
        bind.sendto(encode_accepted(xid, results=self.results), addr)


def test_client_rejects_bytes_after_the_results(loop) -> None:
    """libtirpc would ignore them; evpl's client says the reply is malformed."""
    bind = loop.bind("udp", ("127.0.0.1", 0), Answer(struct.pack(">i", 5) + b"\0\0\0\0"))
    client = Client(loop, "udp", bind.local_address, timeout=5)
    with pytest.raises(XdrError, match="4 unexpected bytes after the value"):
        client.wait(calc.CALC_VERSClient(client).CALC_ADD(calc.pair(1, 2)), TIMEOUT)
    client.close()
    bind.close()


def test_udp_client_retransmits(loop) -> None:
    fake = DropFirst()
    bind = loop.bind("udp", ("127.0.0.1", 0), fake)
    client = Client(loop, "udp", bind.local_address, timeout=5, retransmit=0.02)
    stub = calc.CALC_VERSClient(client)
    assert client.wait(stub.CALC_ADD(calc.pair(0, 0)), TIMEOUT) == 99
    assert client.wait(stub.CALC_ADD(calc.pair(0, 0)), TIMEOUT) == 99
    assert sorted(fake.seen.values()) == [2, 2]
    assert client.pending == 0


# -- portmapper (embedded server <-> client, on a high port) --------------------

@pytest.mark.parametrize("backend", ["tcp", "udp"])
def test_portmap_client_and_server(loop, backend: str) -> None:
    pmap = PortmapServer(loop)
    port = pmap.listen(("127.0.0.1", 0))
    pc = PortmapClient(loop, ("127.0.0.1", port), backend=backend)

    def wait(rpc: Any) -> Any:
        return pc.wait(rpc, TIMEOUT)

    assert wait(pc.null()) is None
    assert wait(pc.set(PROG, 1, "tcp", 5000)) is True
    assert wait(pc.set(PROG, 1, "tcp", 5001)) is False  # already registered
    assert wait(pc.rpcb_set(PROG, 1, "udp", uaddr("0.0.0.0", 5002), "me", 3)) is True
    assert wait(pc.getport(PROG, 1, "tcp")) == 5000
    assert wait(pc.getport(PROG, 1, "udp")) == 5002
    assert wait(pc.getport(PROG, 2, "tcp")) == 0
    assert wait(pc.getaddr(PROG, 1, "tcp")) == b"127.0.0.1.19.136"
    assert wait(pc.getaddr(PROG, 9, "tcp")) == b""
    dump = wait(pc.dump())
    assert (PROG, 1, 6, 5000) in [(m.prog, m.vers, m.prot, m.port) for m in dump]
    assert (0x186A0, 4, 17, port) in [(m.prog, m.vers, m.prot, m.port) for m in dump]
    rows = [(e.rpcb_map.r_prog, e.rpcb_map.r_netid, e.rpcb_map.r_owner)
            for e in wait(pc.rpcb_dump(4))]
    assert (PROG, b"udp", b"me") in rows
    assert wait(pc.rpcb_unset(PROG, 1, "udp")) is True
    assert wait(pc.getport(PROG, 1, "udp")) == 0
    assert wait(pc.unset(PROG, 1)) is True
    assert wait(pc.unset(PROG, 1)) is False
    assert parse_uaddr(b"10.1.2.3.8.1") == ("10.1.2.3", 2049)
    with pytest.raises(evpl.ConfigError):
        parse_uaddr("nonsense")
    pc.close()
    pmap.close()


@pytest.fixture
def local_pmap(loop, address, monkeypatch) -> Any:
    """An embedded portmapper listening where portmap looks for rpcbind's local
    socket (RPCBIND_SOCKET, pointed at a temporary path)."""
    path = address("unix")
    monkeypatch.setattr(portmap, "RPCBIND_SOCKET", path)
    pmap = PortmapServer(loop)
    pmap.server.listen("unix", path)
    yield pmap
    pmap.close()


def test_portmap_helpers_use_the_local_socket(loop, local_pmap, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="evpl.rpc2.portmap")
    assert portmap.local_rpcbind() == ("unix", portmap.RPCBIND_SOCKET)
    assert portmap.register(loop, PROG, 1, "tcp", 5000) is True
    entry = local_pmap.registry.get(PROG, 1, "tcp")
    assert (entry.addr, entry.owner) == ("0.0.0.0.19.136", str(os.geteuid()))
    assert portmap.getport(loop, PROG, 1, "tcp") == 5000
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]

    # refused: the log says what is registered, and how to replace it
    assert portmap.register(loop, PROG, 1, "tcp", 6000) is False
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    msg = warning.getMessage()
    assert warning.name == "evpl.rpc2.portmap"
    assert msg.startswith(f"rpcbind (local socket {portmap.RPCBIND_SOCKET}) refused to "
                          f"register program {PROG} version 1 on tcp at 0.0.0.0.23.112: ")
    assert f"already maps it to 0.0.0.0.19.136 (owner '{os.geteuid()}')" in msg
    assert f"portmap.unregister(loop, {PROG}, 1)" in msg
    caplog.clear()

    assert portmap.unregister(loop, PROG, 1) is True
    assert portmap.register(loop, PROG, 1, "tcp", 6000) is True
    assert portmap.getport(loop, PROG, 1, "tcp") == 6000
    assert portmap.unregister(loop, PROG, 1, "tcp") is True
    # nothing left: False, and not worth a warning
    assert portmap.unregister(loop, PROG, 1) is False
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_portmap_client_address_forms(loop, local_pmap, monkeypatch, tmp_path) -> None:
    pc = PortmapClient(loop)  # the local socket
    assert (pc.backend, pc.address) == ("unix", portmap.RPCBIND_SOCKET)
    assert pc.wait(pc.null(), TIMEOUT) is None
    pc.close()
    pc = PortmapClient(loop, portmap.RPCBIND_SOCKET)  # a path: unix
    assert pc.backend == "unix"
    assert pc.wait(pc.set(PROG, 2, "udp", 7000), TIMEOUT) is True
    pc.close()
    # no socket there (missing, or a plain file): TCP to 127.0.0.1:111
    monkeypatch.setattr(portmap, "RPCBIND_SOCKET", str(tmp_path / "missing.sock"))
    assert portmap.local_rpcbind() == ("tcp", ("127.0.0.1", 111))
    (tmp_path / "file").write_text("")
    monkeypatch.setattr(portmap, "RPCBIND_SOCKET", str(tmp_path / "file"))
    assert portmap.local_rpcbind() == ("tcp", ("127.0.0.1", 111))


def test_current_call_defer_inside_a_pipelined_batch(loop, address) -> None:
    """Handlers without ``ctx`` that take their context with current_call()
    and answer later, mixed in one read batch with calls answered at once:
    every call gets its own context and its own answer."""
    from evpl.rpc2 import DEFER, current_call

    seen: list[int] = []

    class Mixed(Calc):
        def CALC_ADD(self, p: Any) -> Any:
            if p.a % 2 == 0:
                return p.a + p.b
            ctx = current_call()
            seen.append(ctx.xid)
            loop.call_later(0.001, ctx.reply, p.a + p.b)
            return DEFER

    server = Server(loop)
    server.register(PROG, VERS, Mixed())
    listener = server.listen("tcp", address("tcp"))
    client = Client(loop, "tcp", listener.address)
    stub = calc.CALC_VERSClient(client)
    calls = [stub.CALC_ADD(calc.pair(i, 1000)) for i in range(300)]
    loop.run_until(lambda: all(c.done for c in calls), TIMEOUT)
    assert [c.result() for c in calls] == [i + 1000 for i in range(300)]
    assert len(seen) == 150 and len(set(seen)) == 150
    assert sorted(seen) == sorted(c.xid for c in calls[1::2])


def test_completed_calls_are_not_kept_until_their_deadline(loop, address) -> None:
    """A client keeps each call's deadline until it comes up (30 s by
    default); the results of calls that completed long before must not stay
    referenced through it (zero-copy results would pin pool buffers, and a
    busy client would hold 30 s of calls)."""
    import gc
    import weakref

    class Result:
        def __init__(self, data: memoryview) -> None:
            self.data = data

    server = Server(loop)
    server.register(RAW_PROG, 1, {1: lambda args: bytes(4096)})
    client = Client(loop, "tcp", server.listen("tcp", address("tcp")).address)
    refs: list[weakref.ref[Result]] = []
    done = [0]

    def issue() -> None:
        def cb(rpc: Any) -> None:
            refs.append(weakref.ref(rpc.result()))
            done[0] += 1
            if done[0] <= 2000 - 8:
                issue()
        client.call(RAW_PROG, 1, 1, b"", Result).add_done_callback(cb)

    for _ in range(8):
        issue()
    loop.run_until(lambda: done[0] >= 2000, timeout=TIMEOUT)
    gc.collect()
    alive = sum(r() is not None for r in refs)
    assert alive <= 100, alive          # (the heap's lazy bound: 2 x 8 in flight + 64)
    client.close()
