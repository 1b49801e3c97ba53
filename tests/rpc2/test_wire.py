"""Tests of evpl.rpc2.wire: RPC v2 messages, AUTH_SYS and record marking."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from evpl.errors import FramingError, ProtocolError
from evpl.rpc2 import wire
from evpl.rpc2.wire import (
    AUTH_NONE,
    AcceptStat,
    AuthFlavor,
    AuthStat,
    AuthSys,
    OpaqueAuth,
    RecordReader,
    RejectStat,
    ReplyStat,
    RpcVersionError,
    XidTable,
)
from evpl.rpc2.xdr import XdrError

CRED = AuthSys(12345, b"client.example", 1000, 100, (100, 4, 27)).to_auth()


def test_call_round_trip_keeps_args_as_a_view() -> None:
    raw = bytearray(wire.encode_call(0xDEADBEEF, 100003, 3, 1, b"ARGS", cred=CRED))
    call = wire.decode_call(raw)
    assert (call.xid, call.prog, call.vers, call.proc) == (0xDEADBEEF, 100003, 3, 1)
    assert call.cred == CRED and call.verf == AUTH_NONE
    assert bytes(call.args) == b"ARGS"
    raw[-1] = ord("!")  # the args are a view of the message, not a copy
    assert bytes(call.args) == b"ARG!"
    assert AuthSys.from_auth(call.cred) == AuthSys(12345, b"client.example", 1000, 100,
                                                   (100, 4, 27))


def test_call_header_layout() -> None:
    buf = bytearray()
    wire.pack_call_header(buf, 1, 100000, 2, 3)
    assert bytes(buf) == struct.pack(">10I", 1, 0, 2, 100000, 2, 3, 0, 0, 0, 0)


def test_every_truncated_call_is_rejected() -> None:
    data = wire.encode_call(7, 1, 2, 3, b"", cred=CRED, verf=OpaqueAuth(9, b"v" * 5))
    assert wire.decode_call(data).verf == OpaqueAuth(9, b"v" * 5)
    for cut in range(len(data)):
        with pytest.raises(XdrError):
            wire.decode_call(data[:cut])


def test_rpc_version_mismatch_carries_xid() -> None:
    data = bytearray(wire.encode_call(77, 1, 1, 0))
    data[8:12] = struct.pack(">I", 3)
    with pytest.raises(RpcVersionError) as info:
        wire.decode_call(data)
    assert info.value.xid == 77 and info.value.version == 3
    reply = wire.decode_reply(wire.encode_rpc_mismatch(77))
    assert reply.reject_stat is RejectStat.RPC_MISMATCH and reply.mismatch == (2, 2)


def test_auth_bounds() -> None:
    with pytest.raises(XdrError):
        OpaqueAuth(1, b"x" * 401)
    OpaqueAuth(1, b"x" * 400)
    with pytest.raises(XdrError):
        AuthSys(0, b"m" * 256, 0, 0).to_auth()
    with pytest.raises(XdrError):
        AuthSys(0, b"m", 0, 0, tuple(range(17))).to_auth()
    AuthSys(0, b"m" * 255, 0, 0, tuple(range(16))).to_auth()
    # a hostile credential claiming 17 gids, or a body longer than 400 bytes
    body = struct.pack(">II", 0, 0) + struct.pack(">III", 0, 0, 17) + bytes(68)
    with pytest.raises(XdrError, match="gids"):
        AuthSys.from_auth(OpaqueAuth(AuthFlavor.AUTH_SYS, body))
    data = bytearray(wire.encode_call(1, 1, 1, 1, cred=OpaqueAuth(1, bytes(8))))
    data[28:32] = struct.pack(">I", 404)
    with pytest.raises(XdrError, match="400"):
        wire.decode_call(bytes(data) + bytes(400))
    with pytest.raises(XdrError):
        AuthSys.from_auth(AUTH_NONE)
    with pytest.raises(XdrError):
        AuthSys.from_auth(OpaqueAuth(AuthFlavor.AUTH_SYS, CRED.body[:-1]))


@pytest.mark.parametrize("stat", list(AcceptStat))
def test_accepted_replies(stat: AcceptStat) -> None:
    verf = OpaqueAuth(AuthFlavor.AUTH_SYS, b"abc") if stat == AcceptStat.SYSTEM_ERR else AUTH_NONE
    data = wire.encode_accepted(5, stat, b"RESULTS", verf=verf, low=2, high=4)
    reply = wire.decode_reply(data)
    assert reply.xid == 5 and reply.stat is ReplyStat.MSG_ACCEPTED and reply.accept_stat is stat
    assert reply.verf == verf
    assert reply.ok is (stat is AcceptStat.SUCCESS)
    assert bytes(reply.results) == (b"RESULTS" if reply.ok else b"")
    assert reply.mismatch == ((2, 4) if stat is AcceptStat.PROG_MISMATCH else None)
    assert wire.decode_message(data) == reply


def test_auth_error_reply() -> None:
    reply = wire.decode_reply(wire.encode_auth_error(9, AuthStat.AUTH_TOOWEAK))
    assert reply.stat is ReplyStat.MSG_DENIED and reply.reject_stat is RejectStat.AUTH_ERROR
    assert reply.auth_stat is AuthStat.AUTH_TOOWEAK and not reply.ok
    unknown = struct.pack(">5I", 9, 1, 1, 1, 99)
    assert wire.decode_reply(unknown).auth_stat == 99


@pytest.mark.parametrize("data,match", [
    (struct.pack(">3I", 1, 1, 2), "reply_stat"),
    (struct.pack(">4I", 1, 1, 1, 5), "reject_stat"),
    (struct.pack(">6I", 1, 1, 0, 0, 0, 9), "accept_stat"),
    (struct.pack(">6I", 1, 0, 0, 0, 0, 0), "not a reply"),
    (struct.pack(">4I", 1, 1, 1, 0), "truncated"),
    (struct.pack(">10I", 1, 1, 0, 0, 0, 0, 0, 0, 0, 0), "not a call"),
])
def test_malformed_replies(data: bytes, match: str) -> None:
    with pytest.raises(XdrError, match=match):
        wire.decode_call(data) if match == "not a call" else wire.decode_reply(data)


def test_reply_header_shares_buffer_with_results() -> None:
    buf = bytearray(4)
    wire.pack_accepted_header(buf, 3)
    buf += b"\0\0\0\1"
    wire.set_record_mark(buf)
    assert struct.unpack_from(">I", buf)[0] == 0x80000000 | (len(buf) - 4)
    assert bytes(wire.decode_reply(buf[4:]).results) == b"\0\0\0\1"


@given(st.binary(max_size=120))
def test_garbage_messages_raise_only_protocol_errors(data: bytes) -> None:
    try:
        msg = wire.decode_message(data)
    except ProtocolError:
        return
    if isinstance(msg, wire.Call) and msg.cred.flavor == AuthFlavor.AUTH_SYS:
        try:
            AuthSys.from_auth(msg.cred)
        except XdrError:
            pass


# -- record marking ---------------------------------------------------------------

def frame(*fragments: bytes, last_flags: tuple[bool, ...] | None = None) -> bytes:
    flags = last_flags or tuple(i == len(fragments) - 1 for i in range(len(fragments)))
    return b"".join(wire.record_mark(len(f), last) + f for f, last in zip(fragments, flags,
                                                                          strict=True))


def test_record_reader_reassembles_fragments_fed_byte_by_byte() -> None:
    stream = frame(b"hello ", b"", b"world") + frame(b"second") + frame(b"")
    reader = RecordReader()
    records = []
    for i in range(len(stream)):
        records += reader.feed(stream[i:i + 1])
    assert records == [b"hello world", b"second", b""]
    assert reader.buffered == 0
    assert RecordReader().feed(stream) == records


def test_record_reader_enforces_max_before_data_arrives() -> None:
    reader = RecordReader(max_record=10)
    assert reader.feed(frame(b"0123456789")) == [b"0123456789"]
    with pytest.raises(FramingError, match="exceeds"):
        reader.feed(wire.record_mark(0x7FFFFFFF))
    with pytest.raises(FramingError):
        reader.feed(b"more")  # a broken stream stays broken
    reader = RecordReader(max_record=10)
    reader.feed(wire.record_mark(6, last=False) + b"012345")
    with pytest.raises(FramingError):
        reader.feed(wire.record_mark(6))


def test_record_mark_range() -> None:
    with pytest.raises(FramingError):
        wire.record_mark(1 << 31)
    with pytest.raises(FramingError):
        wire.encode_record(b"x", max_fragment=0)


@given(payload=st.binary(max_size=300), max_fragment=st.integers(1, 64),
       cuts=st.lists(st.integers(1, 50), max_size=20))
def test_encode_record_round_trip(payload: bytes, max_fragment: int, cuts: list[int]) -> None:
    stream = b"".join(bytes(p) for p in wire.encode_record(payload, max_fragment))
    reader = RecordReader()
    out: list[bytes] = []
    pos = 0
    for n in [*cuts, len(stream)]:
        out += reader.feed(stream[pos:pos + n])
        pos += n
    assert out == [payload]


def test_xid_table() -> None:
    table = XidTable(start=0xFFFFFFFF)
    a = table.add("a")
    b = table.add("b")
    assert (a, b) == (0xFFFFFFFF, 0)
    assert len(table) == 2 and sorted(table.pending()) == [0, 0xFFFFFFFF]
    assert table.pop(a) == "a" and table.pop(a) is None
    for _ in range(3):  # wrapping around skips xids still in use
        assert table.add("c") not in (b, a)
