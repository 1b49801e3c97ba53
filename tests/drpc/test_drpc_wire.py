"""drpc's packet codec (sans-I/O): header round trips, malformed input, control payloads."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from evpl.drpc import wire
from evpl.drpc.wire import (
    HEADER_SIZE,
    Connect,
    ConnectOk,
    ConnectReject,
    PacketType,
    check_data_packet,
    pack_header,
    packets,
    parse_header,
)
from evpl.errors import ProtocolError


def test_header_round_trip_and_layout() -> None:
    h = pack_header(PacketType.REQ, 7, 0xDEADBEEF, 2**63 + 5, 1 << 23, 77, 2**32 + 9,
                    wire.FLAG_ERROR)
    assert len(h) == HEADER_SIZE == 28
    assert h[0] == wire.MAGIC and h[1] == PacketType.REQ and h[2] == 7 and h[3] == 1
    assert h[4:8] == bytes.fromhex("deadbeef")          # network byte order
    assert parse_header(h + b"payload") == (PacketType.REQ, 7, wire.FLAG_ERROR, 0xDEADBEEF,
                                            2**63 + 5, 1 << 23, 77, 9)  # ts is mod 2**32


@pytest.mark.parametrize("data, why", [
    (b"", "shorter"),
    (b"\xd7\x01" + bytes(10), "shorter"),
    (b"\x00" + bytes(27), "magic"),
    (bytes([wire.MAGIC, 0]) + bytes(26), "type"),
    (bytes([wire.MAGIC, 200]) + bytes(26), "type"),
])
def test_parse_header_rejects(data: bytes, why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        parse_header(data)


@given(st.binary(max_size=64))
def test_parse_header_never_crashes(data: bytes) -> None:
    try:
        fields = parse_header(data)
    except ProtocolError:
        return
    assert len(data) >= HEADER_SIZE and fields[0] in set(PacketType)


def test_packets() -> None:
    assert packets(0, 100) == 1
    assert packets(1, 100) == 1
    assert packets(100, 100) == 1
    assert packets(101, 100) == 2
    assert packets(8 << 20, 1444) == 5810


def test_check_data_packet() -> None:
    p = 1444
    assert check_data_packet(0, 0, 0, p, 100) is None
    assert check_data_packet(3000, 0, p, p, 8 << 20) is None
    assert check_data_packet(3000, 2, 3000 - 2 * p, p, 8 << 20) is None
    assert "exceeds" in check_data_packet(9 << 20, 0, p, p, 8 << 20)
    assert "packet 3 of a 3-packet" in check_data_packet(3000, 3, 10, p, 8 << 20)
    assert "carries" in check_data_packet(3000, 2, p, p, 8 << 20)       # too long a tail
    assert "carries" in check_data_packet(3000, 0, 10, p, 8 << 20)      # a short middle


def test_control_payloads() -> None:
    c = Connect(5, 1 << 20, 1472, 8, 32)
    assert Connect.unpack(c.pack()) == c
    ok = ConnectOk(0xFFFFFFFF, 1 << 23, 9000, 8, 32)
    assert ConnectOk.unpack(ok.pack()) == ok
    rej = ConnectReject(wire.RejectReason.TOO_MANY_SESSIONS, "full")
    assert ConnectReject.unpack(rej.pack()) == rej
    for cls in (Connect, ConnectOk, ConnectReject):
        with pytest.raises(ProtocolError, match="truncated"):
            cls.unpack(b"\x00")
    with pytest.raises(ProtocolError, match="unusable"):
        ConnectOk.unpack(ConnectOk(1, 1, 1472, 0, 32).pack())
    with pytest.raises(ProtocolError, match="unusable"):
        ConnectOk.unpack(ConnectOk(1, 1, 20, 8, 32).pack())


# -- the server core fed hostile datagrams (sans-I/O) ------------------------------

_FIELDS = st.tuples(st.integers(0, 12), st.integers(0, 255), st.integers(0, 3),
                    st.sampled_from([0, 1, 0xFFFFFFFF]), st.integers(0, 2**64 - 1),
                    st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))


@given(st.lists(st.one_of(
    st.binary(max_size=80),
    st.tuples(_FIELDS, st.binary(max_size=64)).map(
        lambda f: wire.HEADER.pack(wire.MAGIC, f[0][0], f[0][1], f[0][2], f[0][3], f[0][4],
                                   f[0][5], f[0][6], 0) + f[1])), max_size=30))
def test_server_core_survives_fuzzed_packets(packets_: list[bytes]) -> None:
    """Random datagrams and random headers (a session number 1 that exists)
    never raise, never run a handler for a malformed request, and every
    datagram is counted once as a packet."""
    from evpl.drpc.session import ServerEndpoint

    sent: list[tuple[bytes, object]] = []
    ran: list[int] = []
    ep = ServerEndpoint(lambda d, a: sent.append((bytes(d), a)),
                        lambda s, sl, t, n, body: ran.append(len(body)),
                        lambda req, exc: None, max_message=4096)
    peer = ("10.0.0.1", 5)
    ep.receive([(pack_header(PacketType.CONNECT, 0, 0, 1) + Connect(9, 4096, 1472, 8, 32).pack(),
                 peer)], 0)
    (number,) = ep.sessions
    ep.sessions[1] = ep.sessions.pop(number)
    ep.sessions[1].number = 1
    ep.receive([(p, peer) for p in packets_], 1)
    assert ep.stats()["packets"] == len(packets_) + 1
    assert all(n <= 4096 for n in ran)
