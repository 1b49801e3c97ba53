"""Hostile input to every framer: garbage, oversized and truncated frames.

The Bind must close with FramingError (or cleanly, when the bytes happen to
be a valid stream), deliver exactly the whole messages that came before the
damage, never crash or hang, and give every buffer back to the pool.
"""

from __future__ import annotations

import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import evpl

from .helpers import STREAM_BACKENDS, TIMEOUT, backend_info, check_pool, raw_connect

MAX = 1000          # max_message of the framers under test (where settable)
WAIT = TIMEOUT / 2  # per wait; a failing example must not take long (hypothesis shrinks)


def call_fn(peek: memoryview) -> int:
    """User framer: 2-byte big-endian length that counts itself; < 2 is bad."""
    if len(peek) < 2:
        return 0
    n = int.from_bytes(peek[:2], "big")
    return n if n >= 2 else -1


FRAMERS = {
    "lp1": lambda: evpl.framing.length_prefix(1),
    "lp2-little-inc": lambda: evpl.framing.length_prefix(2, "little", includes_header=True,
                                                         max_message=MAX),
    "lp4": lambda: evpl.framing.length_prefix(4, max_message=MAX),
    "lp8": lambda: evpl.framing.length_prefix(8, max_message=MAX),
    "lp8-little-inc": lambda: evpl.framing.length_prefix(8, "little", includes_header=True,
                                                         max_message=MAX),
    "record": lambda: evpl.framing.record_marking(max_message=MAX),
    "callable": lambda: evpl.framing.callable(call_fn, max_message=MAX),
}


def reference(name: str, framer, data: bytes) -> tuple[list[bytes], str]:
    """Reference parser: the messages an application must see, and whether
    the stream is "ok", "truncated" (ends inside a message) or "bad"."""
    msgs: list[bytes] = []
    off, n, limit = 0, len(data), framer.max_message
    while off < n:
        if name.startswith("lp"):
            size, inc = framer.size, framer.includes_header
            if n - off < size:
                return msgs, "truncated"
            v = int.from_bytes(data[off:off + size], "big" if framer.big else "little")
            if inc:
                if v < size:
                    return msgs, "bad"
                v -= size
            if v > limit:
                return msgs, "bad"
            if n - off < size + v:
                return msgs, "truncated"
            msgs.append(data[off + size:off + size + v])
            off += size + v
        elif name == "record":
            pos, total, frags, parts = off, 0, 0, []
            while True:
                if n - pos < 4:
                    return msgs, "truncated"
                h = int.from_bytes(data[pos:pos + 4], "big")
                flen = h & 0x7FFFFFFF
                total += flen
                frags += 1
                if total > limit or frags > 4096:
                    return msgs, "bad"
                if n - pos - 4 < flen:
                    return msgs, "truncated"
                parts.append(data[pos + 4:pos + 4 + flen])
                pos += 4 + flen
                if h & 0x80000000:
                    break
            msgs.append(b"".join(parts))
            off = pos
        else:
            r = call_fn(memoryview(data[off:]))
            if r < 0 or r > limit:
                return msgs, "bad"
            if r == 0 or r > n - off:
                return msgs, "truncated"
            msgs.append(data[off:off + r])
            off += r
    return msgs, "ok"


def encode(name: str, framer, payload: bytes) -> bytes:
    if name.startswith("lp"):
        v = len(payload) + (framer.size if framer.includes_header else 0)
        return v.to_bytes(framer.size, "big" if framer.big else "little") + payload
    if name == "record":
        return (len(payload) | 0x80000000).to_bytes(4, "big") + payload
    return (len(payload) + 2).to_bytes(2, "big") + payload


class Server(evpl.Handler):
    def __init__(self):
        self.msgs: list[bytes] = []
        self.closed: list[object] = []

    def on_message(self, bind, msg):
        self.msgs.append(bytes(msg))

    def on_closed(self, bind, error):
        self.closed.append(error)


def address_for(backend: str, tmp_dir: str, i: int):
    if "local" in backend_info(backend).capabilities:
        return f"{tmp_dir}/h{i}.sock"
    return ("127.0.0.1", 0)


_counter = [0]


def feed(backend: str, tmp_dir: str, name: str, data: bytes, cut: int) -> None:
    """Send ``data`` (in two writes, split at ``cut``) then EOF to a framed
    evpl server; check what it delivered and how it closed."""
    pool = evpl.Pool(slab_size=1 << 20, buffer_size=64 << 10, max_bytes=4 << 20)
    loop = evpl.Loop(pool=pool)
    errors = []
    loop.exception_handler = lambda lp, exc, bind: errors.append(exc)
    framer = FRAMERS[name]()
    server = Server()
    _counter[0] += 1
    try:
        listener = loop.listen(backend, address_for(backend, tmp_dir, _counter[0]),
                               lambda: server, framing=framer)
        peer = raw_connect(backend, listener.address)
        with peer:
            try:
                for part in (data[:cut], data[cut:]):
                    if not part:
                        continue
                    want = loop.stats()["bytes_in"] + len(part)
                    peer.sendall(part)
                    loop.run_until(lambda w=want: loop.stats()["bytes_in"] >= w or server.closed,
                                   timeout=WAIT)
                    if server.closed:
                        break
                peer.shutdown(socket.SHUT_WR)
            except OSError:
                pass                     # the server hung up first: expected for bad streams
            loop.run_until(lambda: server.closed, timeout=WAIT)
        expected, status = reference(name, framer, data)
        assert server.msgs == expected
        assert len(server.closed) == 1
        if status == "ok":
            assert server.closed == [None]
        else:
            assert isinstance(server.closed[0], evpl.FramingError), (status, server.closed)
        assert not errors
    finally:
        loop.close()
        check_pool(pool)


def hostile_streams(name: str):
    framer = FRAMERS[name]()
    payloads = st.lists(st.binary(max_size=300), max_size=6)
    valid = payloads.map(lambda ps: b"".join(encode(name, framer, p) for p in ps))
    size = framer.size if name.startswith("lp") else (4 if name == "record" else 2)
    big_header = st.integers(min_value=0, max_value=(1 << (8 * size)) - 1).map(
        lambda v: v.to_bytes(size, "big") + v.to_bytes(size, "little"))
    tail = st.one_of(st.just(b""), st.binary(max_size=64), big_header)
    stream = st.one_of(
        st.binary(max_size=3000),                                   # garbage
        st.tuples(valid, tail).map(lambda t: t[0] + t[1]),          # damage after valid
        st.tuples(valid, st.integers(0, 50)).map(                   # truncated at EOF
            lambda t: t[0][:max(0, len(t[0]) - t[1])]),
    )
    return stream.flatmap(lambda d: st.tuples(st.just(d), st.integers(0, len(d))))


def _hostile_test(name):
    @settings(max_examples=50, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture,
                                     HealthCheck.too_slow])
    @given(case=hostile_streams(name))
    def test(stream_backend, tmp_path, case):
        data, cut = case
        feed(stream_backend, _short(tmp_path), name, data, cut)

    test.__name__ = f"test_hostile_{name.replace('-', '_')}"
    return test


def _short(tmp_path) -> str:
    path = str(tmp_path)
    if len(path) > 80:
        import tempfile
        path = tempfile.mkdtemp(prefix="evpl-h", dir="/tmp")
    return path


for _name in FRAMERS:
    _t = _hostile_test(_name)
    globals()[_t.__name__] = _t
del _t, _name


# ---------------------------------------------------------------- explicit cases


@pytest.mark.parametrize("backend", STREAM_BACKENDS)
@pytest.mark.parametrize("name,data", [
    ("lp8", (1 << 63).to_bytes(8, "big") + b"x" * 100),
    ("lp8", ((1 << 64) - 1).to_bytes(8, "big")),
    ("lp8-little-inc", (1 << 63).to_bytes(8, "little") + b"x"),
    ("lp8-little-inc", (3).to_bytes(8, "little")),                 # smaller than its header
    ("lp2-little-inc", b"\x01\x00"),
    ("lp4", (MAX + 1).to_bytes(4, "big")),
    ("lp4", (MAX).to_bytes(4, "big") + b"y" * MAX + b"\x00\x00"),  # truncated header at EOF
    ("record", (0x7FFFFFFF).to_bytes(4, "big")),
    ("record", b"\x00\x00\x00\x00" * 4097 + b"\x80\x00\x00\x00"),  # too many fragments
    ("record", b"\x00\x00\x00\x05abc"),                            # truncated at EOF
    ("callable", b"\x00\x01"),
    ("callable", b"\xff\xff"),
], ids=lambda v: v if isinstance(v, str) else f"{len(v)}B")
def test_hostile_explicit(backend, tmp_path, name, data):
    framer = FRAMERS[name]()
    assert reference(name, framer, data)[1] != "ok"
    feed(backend, _short(tmp_path), name, data, len(data) // 2)


def close_by_callable_framer(loop, stream_backend, address, fn) -> list:
    """Send a few bytes to a server whose callable framer is ``fn``; the
    Bind must close with an EvplError and deliver nothing. Returns the
    types of the callback errors the loop reported (and clears them)."""
    server = Server()
    listener = loop.listen(stream_backend, address(stream_backend), lambda: server,
                           framing=evpl.framing.callable(fn))
    peer = raw_connect(stream_backend, listener.address)
    with peer:
        peer.sendall(b"anything")
        loop.run_until(lambda: server.closed, timeout=TIMEOUT)
    assert server.msgs == []
    assert isinstance(server.closed[0], evpl.EvplError)
    errors = [type(e) for e, _ in loop.callback_errors]
    loop.callback_errors.clear()
    return errors


def test_callable_framer_raising(loop, stream_backend, address):
    def fn(peek):
        raise ValueError("framer exploded")

    assert close_by_callable_framer(loop, stream_backend, address, fn) == [ValueError]


def test_callable_framer_returning_nonsense(loop, stream_backend, address):
    errors = close_by_callable_framer(loop, stream_backend, address, lambda peek: "ten")
    assert len(errors) == 1
