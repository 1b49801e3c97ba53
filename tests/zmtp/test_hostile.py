"""Hostile and foreign peers on a raw socket: bad greetings, unknown
mechanisms, oversized, huge, truncated and garbled frames, a command flood,
and a ZMTP 3.0 peer (subscriptions as messages). Every bad case is a clean
close with a monitor event; the loop fixture checks no buffer leaked."""

from __future__ import annotations

import socket
import struct

import pytest

import evpl.zmtp as ez
from evpl.zmtp import wire
from zmtp.zhelpers import tobytes, until


def _serve(loop, stype="PULL", **opts):
    got: list[list[bytes]] = []
    ev: list[tuple[ez.Event, object]] = []
    s = ez.Socket(loop, stype, on_message=lambda m: got.append(tobytes(m))
                  if stype != "PUB" else None, **opts)
    s.monitor(lambda e, ep, d: ev.append((e, d)))
    ep = s.bind("tcp://127.0.0.1:0")
    host, port = ep[6:].rsplit(":", 1)
    raw = socket.create_connection((host, int(port)))
    raw.setblocking(False)
    return s, raw, got, ev


def _closed_by_peer(loop, raw) -> bool:
    try:
        data = raw.recv(65536)
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True
    return data == b""


def _drain_until_closed(loop, raw):
    until(loop, lambda: _closed_by_peer(loop, raw))
    raw.close()


def _handshake(raw, loop, stype=b"PUSH", minor=1):
    raw.sendall(wire.encode_greeting("NULL", False, (3, minor))
                + wire.ready({"Socket-Type": stype}))
    buf = bytearray()

    def have():
        try:
            buf.extend(raw.recv(65536))
        except BlockingIOError:
            pass
        return len(buf) >= 64 + 2 + 25     # greeting and the shortest READY (PUB)
    until(loop, have)
    g = wire.parse_greeting(bytes(buf[:64]))
    return g, buf[64:]


BAD_GREETINGS = {
    "bad-signature": b"\x00" * 64,
    "zmtp-2": b"\xff" + b"\x00" * 8 + b"\x7f\x01\x00" + b"NULL".ljust(20, b"\x00") + b"\x00" * 32,
    "unknown-mechanism": wire.SIGNATURE + b"\x03\x01" + b"FOO".ljust(20, b"\x00") + b"\x00" * 32,
    "garbled-mechanism": wire.SIGNATURE + b"\x03\x01" + b"N\x00LL".ljust(20, b"\x00")
    + b"\x00" * 32,
}


@pytest.mark.parametrize("name", sorted(BAD_GREETINGS))
def test_bad_greeting_is_a_clean_close(loop, name):
    s, raw, got, ev = _serve(loop)
    raw.sendall(BAD_GREETINGS[name])
    _drain_until_closed(loop, raw)
    until(loop, lambda: any(e is ez.Event.HANDSHAKE_FAILED_PROTOCOL for e, _ in ev))
    assert not got
    s.close()


def _after_handshake(loop, payload, **opts):
    s, raw, got, ev = _serve(loop, **opts)
    _handshake(raw, loop)
    until(loop, lambda: any(e is ez.Event.HANDSHAKE_SUCCEEDED for e, _ in ev))
    raw.sendall(wire.encode_message([b"good"]) + payload)
    return s, raw, got, ev


@pytest.mark.parametrize("case", ["oversized", "size-2^63", "reserved-flags",
                                  "command-with-more", "second-greeting", "unknown-command",
                                  "data-before-handshake"])
def test_bad_frames_close_cleanly(loop, case):
    if case == "data-before-handshake":
        s, raw, got, ev = _serve(loop)
        raw.sendall(wire.encode_greeting() + wire.encode_message([b"early"]))
        _drain_until_closed(loop, raw)
        assert not got
        assert any(e is ez.Event.HANDSHAKE_FAILED_PROTOCOL for e, _ in ev)
        s.close()
        return
    payload = {
        "oversized": wire.encode_frame(b"x" * 2000),
        "size-2^63": struct.pack(">BQ", 2, 1 << 63) + b"abc",
        "reserved-flags": b"\xf0\x01z",
        "command-with-more": b"\x05\x05\x04PING",
        "second-greeting": wire.encode_greeting(),
        "unknown-command": wire.encode_command("BOGUS", b"x"),
    }[case]
    s, raw, got, ev = _after_handshake(loop, payload, maxmsgsize=1000)
    _drain_until_closed(loop, raw)
    until(loop, lambda: any(e is ez.Event.DISCONNECTED for e, _ in ev))
    assert got == [[b"good"]]          # what came before the bad frame was delivered
    s.close()


def test_truncated_frame_then_eof(loop):
    s, raw, got, ev = _after_handshake(loop, b"\x00\x10only-half")
    raw.shutdown(socket.SHUT_WR)
    until(loop, lambda: any(e is ez.Event.DISCONNECTED for e, _ in ev))
    assert got == [[b"good"]]
    raw.close()
    s.close()


def test_command_flood_stays_bounded(loop):
    """100,000 PINGs without reading the PONGs: the connection survives,
    the socket answers only while its send queue has room."""
    s, raw, got, _ev = _after_handshake(loop, b"", sndbuf=4096)
    flood = wire.ping(0, b"ctx") * 100_000
    view = memoryview(flood)
    sent = 0

    def push():
        nonlocal sent
        try:
            sent += raw.send(view[sent:sent + 65536])
        except BlockingIOError:
            pass
        return sent == len(flood)
    until(loop, push)
    raw.sendall(wire.encode_message([b"after", b"flood"]))
    until(loop, lambda: len(got) == 2)
    assert got[1] == [b"after", b"flood"]
    peer = s._accepted and next(iter(s._accepted))
    assert peer and peer.bind.queued_bytes <= 16 * 4096
    raw.close()
    s.close()


def test_zmtp30_peer_gets_subscription_messages(loop):
    """evpl SUB to a ZMTP 3.0 PUB (a raw socket): the subscription is a
    0x01-prefixed message, not a SUBSCRIBE command."""
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(1)
    lst.setblocking(False)
    sub = ez.Socket(loop, "SUB")
    got = []
    sub.on_message = lambda m: got.append(tobytes(m))
    sub.subscribe(b"topic")
    sub.connect(f"tcp://127.0.0.1:{lst.getsockname()[1]}")
    conn = []

    def accepted():
        try:
            conn.append(lst.accept()[0])
        except BlockingIOError:
            return False
        return True
    until(loop, accepted)
    raw = conn[0]
    raw.setblocking(False)
    g, rest = _handshake(raw, loop, b"PUB", minor=0)
    assert (g.major, g.minor) == (3, 1)
    dec = wire.Decoder()
    dec.feed(wire.encode_greeting())
    events: list = dec.feed(bytes(rest))

    def sub_msg():
        try:
            events.extend(dec.feed(raw.recv(65536)))
        except BlockingIOError:
            pass
        return any(isinstance(e, wire.Message) for e in events)
    until(loop, sub_msg)
    msgs = [e for e in events if isinstance(e, wire.Message)]
    assert msgs[0].frames == [b"\x01topic"]
    assert not any(isinstance(e, wire.Command) and e.name == "SUBSCRIBE" for e in events)
    raw.sendall(wire.encode_message([b"other"]) + wire.encode_message([b"topic.1", b"x"]))
    until(loop, lambda: got)
    assert got == [[b"topic.1", b"x"]]
    raw.close()
    lst.close()
    sub.close()


def test_zmtp30_subscriber_to_evpl_pub(loop):
    s, raw, _got, _ev = _serve(loop, "PUB")
    _g, rest = _handshake(raw, loop, b"SUB", minor=0)
    raw.sendall(wire.encode_message([b"\x01ab"]))
    peer = []
    until(loop, lambda: (peer.extend(p for p in s._peers if p.subs.counts) or peer))
    assert not peer[0].zmtp31
    s.send_multipart([b"zz", b"dropped"])
    s.send_multipart([b"abc", b"kept"])
    dec = wire.Decoder()
    dec.feed(wire.encode_greeting())
    events: list = dec.feed(bytes(rest))

    def data():
        try:
            events.extend(dec.feed(raw.recv(65536)))
        except BlockingIOError:
            pass
        return any(isinstance(e, wire.Message) for e in events)
    until(loop, data)
    assert [e.frames for e in events if isinstance(e, wire.Message)] == [[b"abc", b"kept"]]
    raw.close()
    s.close()


def test_peer_ping_ttl_closes_a_silent_peer(loop):
    """A PING with a TTL (spec 37) makes a silent peer a dead one after the
    TTL, without any heartbeat option on this side; the PING is answered."""
    s, raw, got, ev = _serve(loop)
    _, rest = _handshake(raw, loop)
    raw.sendall(wire.encode_message([b"good"]) + wire.ping(0.3, b"hb"))
    dec = wire.Decoder()
    dec.feed(wire.encode_greeting())
    data = bytearray(rest)

    def closed() -> bool:
        try:
            chunk = raw.recv(65536)
        except BlockingIOError:
            return False
        data.extend(chunk)
        return chunk == b""
    until(loop, closed)
    events = dec.feed(bytes(data))
    assert wire.Command("PONG", b"hb") in events
    until(loop, lambda: any(e is ez.Event.DISCONNECTED for e, _ in ev))
    reason = next(d for e, d in ev if e is ez.Event.DISCONNECTED)
    assert str(reason).startswith("heartbeat TTL")
    assert got == [[b"good"]]
    raw.close()
    s.close()
