"""The sans-I/O ZMTP core (wire.py) and the native frame helpers: round
trips, hostile bytes (hypothesis), and the engine framer against the
pure-Python decoder."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

import evpl
from evpl._native import zmtp as nz
from evpl.errors import ProtocolError
from evpl.zmtp import wire
from zmtp.zhelpers import tobytes

frames_st = st.lists(st.binary(max_size=600), min_size=1, max_size=6)
# REQ/REP-like: empty frames (delimiters) often
env_frames_st = st.lists(st.one_of(st.just(b""), st.binary(max_size=300)), min_size=1,
                         max_size=6)


def _want_env(m):
    """What split_env gives for message ``m``: the wire bytes up to and
    including the first empty frame that is not the last, and the rest."""
    for i in range(len(m) - 1):
        if m[i] == b"":
            return b"".join(wire.encode_frame(f, more=True) for f in m[:i + 1]), m[i + 1:]
    return None, m


def test_greeting_round_trip_and_versions():
    g = wire.parse_greeting(wire.encode_greeting("PLAIN", True))
    assert (g.major, g.minor, g.mechanism, g.as_server) == (3, 1, "PLAIN", True)
    assert g.zmtp31
    assert not wire.parse_greeting(wire.encode_greeting(version=(3, 0))).zmtp31
    assert wire.parse_greeting(wire.encode_greeting(version=(3, 7))).zmtp31   # newer minor
    with pytest.raises(ProtocolError, match="ZMTP 2"):
        wire.parse_greeting(wire.encode_greeting(version=(2, 0)))
    with pytest.raises(ProtocolError, match="signature"):
        wire.parse_greeting(b"\x00" * 64)


def test_commands_and_metadata():
    cmd = wire.parse_command(wire.encode_command("READY", wire.encode_metadata(
        {"Socket-Type": b"DEALER", "Identity": b""}))[2:])
    assert cmd.name == "READY"
    assert wire.decode_metadata(cmd.data) == {"Socket-Type": b"DEALER", "Identity": b""}
    with pytest.raises(ProtocolError):
        wire.decode_metadata(b"\x0bSocket-Type\x00\x00\x00\x09PUB")      # value truncated
    with pytest.raises(ProtocolError):
        wire.parse_command(b"\x09READY")
    assert wire.parse_command(wire.ping(1.5, b"ab")[2:]).data == b"\x00\x0fab"


@given(st.lists(frames_st, min_size=1, max_size=5), st.integers(1, 50))
def test_decoder_round_trip_in_any_pieces(msgs, step):
    data = wire.encode_greeting() + b"".join(wire.encode_message(m) for m in msgs)
    dec = wire.Decoder()
    out = []
    for i in range(0, len(data), step):
        out.extend(dec.feed(data[i:i + step]))
    assert isinstance(out[0], wire.Greeting)
    assert [e.frames for e in out[1:]] == msgs


@given(st.binary(max_size=300))
def test_decoder_hostile_bytes(junk):
    """Anything at all: events or ProtocolError, never another exception,
    and a failed decoder stays failed."""
    dec = wire.Decoder(max_message=1000)
    try:
        dec.feed(wire.encode_greeting() + junk)
    except ProtocolError:
        with pytest.raises(ProtocolError):
            dec.feed(b"\x00\x00")


@given(frames_st)
def test_native_encode_matches_wire(frames):
    enc = nz.encode(frames)
    data = enc if isinstance(enc, bytes) else b"".join(bytes(p) for p in enc)
    assert data == wire.encode_message(frames)
    assert nz.encode_many([frames, [frames[0]]]) == data + wire.encode_frame(frames[0])
    assert nz.encode(memoryview(frames[0])) == wire.encode_frame(frames[0])


def test_native_encode_large_frames_are_not_copied():
    big = b"z" * 100_000
    pieces = nz.encode([b"head", big])
    assert isinstance(pieces, list) and pieces[-1] is big
    with pytest.raises(TypeError):
        nz.encode(["text"])


class _Collect(evpl.Handler):
    def __init__(self):
        self.units = []

    def on_messages(self, bind, msgs):
        self.units.extend(msgs)


@given(st.lists(frames_st, min_size=1, max_size=8), st.integers(1, 4000))
def test_engine_framer_cuts_like_the_decoder(msgs, chunk):
    """A byte stream through a real socket pair, cut by the engine's ZMTP
    framer and split natively, gives the same messages as wire.Decoder."""
    import socket
    loop = evpl.Loop()
    try:
        h = _Collect()
        lst = loop.listen("tcp", ("127.0.0.1", 0), h, framing=evpl.framing.zmtp())
        a = socket.create_connection(lst.address[:2])
        data = wire.encode_greeting() + b"".join(wire.encode_message(m) for m in msgs)
        for i in range(0, len(data), chunk):
            a.sendall(data[i:i + chunk])
        want = len(msgs) + 1
        loop.run_until(lambda: len(h.units) >= want, 10)
        out, cmds = [], []
        nz.split(h.units, out, cmds)
        assert len(cmds) == 1 and bytes(cmds[0]) == wire.encode_greeting()
        assert [tobytes(m) for m in out] == msgs
        envs: list = []
        nz.split_env(h.units, envs, [])
        assert [(e, tobytes(b)) for e, b in envs] == [_want_env(m) for m in msgs]
        a.close()
        h.units.clear()
        out.clear()
        cmds.clear()
    finally:
        loop.close()


@given(st.lists(env_frames_st, min_size=1, max_size=6))
def test_native_envelope_split_and_encode_behind_it(msgs):
    """split_env cuts REQ/REP envelopes as received (wire bytes) and
    encode(head=envelope) puts them back in front of a reply unchanged."""
    loop = evpl.Loop()
    try:
        import socket
        h = _Collect()
        lst = loop.listen("tcp", ("127.0.0.1", 0), h, framing=evpl.framing.zmtp())
        a = socket.create_connection(lst.address[:2])
        a.sendall(b"".join(wire.encode_message(m) for m in msgs))
        loop.run_until(lambda: len(h.units) >= len(msgs), 10)
        envs: list = []
        cmds: list = []
        assert nz.split_env(h.units, envs, cmds) == len(msgs) and not cmds
        for (env, body), m in zip(envs, msgs, strict=True):
            assert (env, tobytes(body)) == _want_env(m)
            if env is not None and body:
                reply = [b"r" * len(body[0]), *tobytes(body[1:])]
                enc = nz.encode(reply, False, env)
                data = enc if isinstance(enc, bytes) else b"".join(bytes(x) for x in enc)
                assert data == env + wire.encode_message(reply)
        a.close()
    finally:
        loop.close()


def test_native_encode_head_with_a_large_message():
    big = b"q" * 100_000
    pieces = nz.encode([big], False, b"\x01\x00")
    assert isinstance(pieces, list) and pieces[0] == b"\x01\x00" and pieces[-1] is big
    assert b"".join(bytes(p) for p in pieces) == b"\x01\x00" + wire.encode_message([big])
