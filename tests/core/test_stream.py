"""Stream Bind behaviour, the same for every available stream backend."""

from __future__ import annotations

import fcntl
import hashlib
import random
import select
import socket
import struct
import termios
import time

import pytest

import evpl

from .helpers import (
    TIMEOUT,
    InThread,
    Ticker,
    backend_info,
    raw_connect,
    raw_listener,
    recv_all,
    recv_exactly,
)

# ---------------------------------------------------------------- handlers


class Echo(evpl.Handler):
    """Sends back whatever arrives (the received Buffer itself: zero copy)."""

    def on_data(self, bind, buf):
        bind.send(buf)

    def on_message(self, bind, msg):
        bind.send(msg)


class Recorder(evpl.Handler):
    """Records everything that happens to the Binds it serves."""

    def __init__(self):
        self.connected = 0
        self.data = bytearray()
        self.msgs: list[bytes] = []
        self.eofs = 0
        self.closed: list[object] = []
        self.binds: list[evpl.Bind] = []

    def on_connected(self, bind):
        self.connected += 1
        self.binds.append(bind)

    def on_data(self, bind, buf):
        self.data += buf

    def on_message(self, bind, msg):
        self.msgs.append(bytes(msg))

    def on_eof(self, bind):
        self.eofs += 1
        super().on_eof(bind)

    def on_closed(self, bind, error):
        self.closed.append(error)


def wait_readable(sock: socket.socket) -> bool:
    """Block until ``sock`` has something to read (poll: any fd number)."""
    p = select.poll()
    p.register(sock, select.POLLIN)
    return bool(p.poll(TIMEOUT * 1000))


def fionread(fd: int) -> int:
    """Bytes waiting in the kernel receive queue of ``fd``."""
    buf = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    return struct.unpack("i", buf)[0]


# ---------------------------------------------------------------- framers

LP_SPECS = [("lp", size, order, inc) for size in (1, 2, 4, 8)
            for order in ("big", "little") for inc in (False, True)]
FRAMER_SPECS = [*LP_SPECS, ("rm",), ("call",)]


def spec_id(spec) -> str:
    if spec[0] == "lp":
        return f"lp{spec[1]}-{spec[2]}-{'inc' if spec[3] else 'exc'}"
    return {"rm": "record_marking", "call": "callable"}[spec[0]]


def call_framer_fn(peek: memoryview) -> int:
    """A user framer: 4-byte big-endian payload length, then the payload."""
    if len(peek) < 4:
        return 0
    return 4 + int.from_bytes(peek[:4], "big")


def make_framer(spec, max_message=None):
    if spec[0] == "lp":
        return evpl.framing.length_prefix(spec[1], spec[2], includes_header=spec[3],
                                          max_message=max_message)
    if spec[0] == "rm":
        return evpl.framing.record_marking(max_message=max_message)
    return evpl.framing.callable(call_framer_fn, max_message=max_message)


def encode(spec, payload: bytes) -> bytes:
    """What a message looks like on the wire (reference encoder)."""
    if spec[0] == "lp":
        size, order, inc = spec[1:]
        return (len(payload) + (size if inc else 0)).to_bytes(size, order) + payload
    if spec[0] == "rm":
        return (len(payload) | 0x80000000).to_bytes(4, "big") + payload
    return len(payload).to_bytes(4, "big") + payload


def user_message(spec, payload: bytes) -> bytes:
    """What the application passes to send() / gets from on_message."""
    return encode(spec, payload) if spec[0] == "call" else payload


def record(*fragments: bytes) -> bytes:
    """An ONC RPC record made of ``fragments`` (the last one flagged)."""
    out = b""
    for i, frag in enumerate(fragments):
        last = 0x80000000 if i == len(fragments) - 1 else 0
        out += (len(frag) | last).to_bytes(4, "big") + frag
    return out


def payload_sizes(framer) -> list[int]:
    top = min(framer.max_message - 4, 200_000)
    return sorted({0, 1, 2, 7, 100, 255 if top >= 255 else top, top})


# ---------------------------------------------------------------- echo


def test_echo_unframed(loop, stream_backend, address):
    listener = loop.listen(stream_backend, address(stream_backend), Echo)
    client = Recorder()
    bind = loop.connect(stream_backend, listener.address, client)
    payload = random.randbytes(300_000)
    bind.send(payload)
    loop.run_until(lambda: len(client.data) >= len(payload), timeout=TIMEOUT)
    assert bytes(client.data) == payload
    assert client.connected == 1
    assert bind.backend == stream_backend
    bind.finish()
    loop.run_until(lambda: client.closed, timeout=TIMEOUT)
    assert client.closed == [None]
    assert bind.closed


def test_addresses(loop, stream_backend, address):
    server = Recorder()
    listener = loop.listen(stream_backend, address(stream_backend), lambda: server)
    client = Recorder()
    bind = loop.connect(stream_backend, listener.address, client)
    loop.run_until(lambda: server.connected and client.connected, timeout=TIMEOUT)
    assert bind.connected
    assert bind.peer_address == listener.address
    if "inet" in backend_info(stream_backend).capabilities:
        assert server.binds[0].peer_address == bind.local_address
        assert server.binds[0].local_address == listener.address
    assert bind.fileno() >= 0
    assert bind.handler is client


@pytest.mark.parametrize("spec", FRAMER_SPECS, ids=spec_id)
def test_echo_framed(loop, stream_backend, address, spec):
    """evpl client <-> evpl server echo, every message intact and in order."""
    framer = make_framer(spec)
    listener = loop.listen(stream_backend, address(stream_backend), Echo, framing=framer)
    client = Recorder()
    bind = loop.connect(stream_backend, listener.address, client, framing=make_framer(spec))
    assert bind.framed
    sizes = payload_sizes(framer)
    expected = []
    for n in sizes * 3:
        msg = user_message(spec, random.randbytes(n))
        expected.append(msg)
        bind.send(msg)
    loop.run_until(lambda: len(client.msgs) >= len(expected), timeout=TIMEOUT)
    assert client.msgs == expected


@pytest.mark.parametrize("spec", FRAMER_SPECS, ids=spec_id)
def test_framed_wire_format(loop, stream_backend, address, spec):
    """A plain socket speaking the format by hand: evpl parses and emits it exactly."""
    framer = make_framer(spec)
    listener = loop.listen(stream_backend, address(stream_backend), Echo, framing=framer)
    payloads = [random.randbytes(n) for n in payload_sizes(framer)]
    wire = b"".join(encode(spec, p) for p in payloads)
    peer = raw_connect(stream_backend, listener.address)
    with peer:
        t = InThread(loop, lambda: (peer.sendall(wire), recv_exactly(peer, len(wire)))[1])
        loop.run_until(t.done, timeout=TIMEOUT)
        assert t.get() == wire


@pytest.mark.parametrize("spec", FRAMER_SPECS, ids=spec_id)
def test_sendv_is_one_message(loop, stream_backend, address, spec):
    server = Recorder()
    listener = loop.listen(stream_backend, address(stream_backend), lambda: server,
                           framing=make_framer(spec))
    bind = loop.connect(stream_backend, listener.address, Recorder(), framing=make_framer(spec))
    pieces = [b"abc", bytearray(b"defg"), memoryview(b"hij"), b""]
    whole = user_message(spec, b"abcdefghij")
    if spec[0] == "call":
        bind.sendv([whole[:3], whole[3:]])
    else:
        bind.sendv(pieces)
    bind.sendv([user_message(spec, b"z")])
    loop.run_until(lambda: len(server.msgs) >= 2, timeout=TIMEOUT)
    assert server.msgs == [whole, user_message(spec, b"z")]


def test_sendv_is_all_or_nothing(loop, stream_backend, address):
    """A piece that is not bytes-like fails the whole sendv: nothing of it is
    queued or sent, and the Bind goes on working."""
    framing = evpl.framing.length_prefix(4)
    server = Recorder()
    listener = loop.listen(stream_backend, address(stream_backend), lambda: server,
                           framing=framing)
    bind = loop.connect(stream_backend, listener.address, Recorder(), framing=framing)
    with pytest.raises(TypeError):
        bind.sendv([b"first", b"second", 42])
    assert bind.queued_bytes == 0
    bind.send(b"after")
    loop.run_until(lambda: server.msgs, timeout=TIMEOUT)
    assert server.msgs == [b"after"]


def test_many_connections(loop, stream_backend, address):
    """1000 connections open at once, each doing one echo round trip."""
    n = 1000
    server_closed = []

    class Server(Echo):
        def on_closed(self, bind, error):
            server_closed.append(error)

    listener = loop.listen(stream_backend, address(stream_backend), Server)
    client = Recorder()
    echoed: dict[evpl.Bind, bytearray] = {}

    class Client(Recorder):
        def on_data(self, bind, buf):
            echoed.setdefault(bind, bytearray()).extend(buf)

    client = Client()
    binds = []
    for _ in range(0, n, 100):           # ramp up, but keep every one open
        binds += [loop.connect(stream_backend, listener.address, client)
                  for _ in range(100)]
        opened = len(binds)
        loop.run_until(lambda k=opened: client.connected >= k, timeout=TIMEOUT)
    assert not client.closed
    assert len({b.fileno() for b in binds}) == n
    for i, b in enumerate(binds):
        b.send(b"hello %d" % i)

    def all_echoed():
        return sum(len(v) for v in echoed.values()) >= sum(len(b"hello %d" % i)
                                                           for i in range(n))

    loop.run_until(all_echoed, timeout=TIMEOUT)
    for i, b in enumerate(binds):
        assert echoed[b] == b"hello %d" % i
    for b in binds:
        b.finish()
    loop.run_until(lambda: len(server_closed) == n and len(client.closed) == n,
                   timeout=TIMEOUT)
    assert server_closed == [None] * n
    assert client.closed == [None] * n


# ---------------------------------------------------------------- big messages


def small_buffer_loop(make_loop, **kw):
    pool = evpl.Pool(slab_size=1 << 20, buffer_size=64 << 10)
    return make_loop(pool=pool, **kw), pool


@pytest.mark.parametrize("spec", [("lp", 4, "big", False), ("lp", 8, "little", True), ("rm",),
                                  ("call",)], ids=spec_id)
def test_messages_larger_than_a_buffer(make_loop, stream_backend, address, spec):
    loop, pool = small_buffer_loop(make_loop)
    listener = loop.listen(stream_backend, address(stream_backend), Echo,
                           framing=make_framer(spec))
    client = Recorder()
    bind = loop.connect(stream_backend, listener.address, client, framing=make_framer(spec))
    expected = [user_message(spec, random.randbytes(n))
                for n in (1 << 20, 3 << 20, 100, (64 << 10) - 3, 3 << 20)]
    for m in expected:
        bind.send(m)
    loop.run_until(lambda: len(client.msgs) >= len(expected), timeout=TIMEOUT)
    assert [len(m) for m in client.msgs] == [len(m) for m in expected]
    assert client.msgs == expected
    assert pool.stats()["buffer_size"] == 64 << 10


def test_unframed_bulk_with_small_buffers(make_loop, stream_backend, address):
    loop, _pool = small_buffer_loop(make_loop)
    listener = loop.listen(stream_backend, address(stream_backend), Echo)
    client = Recorder()
    bind = loop.connect(stream_backend, listener.address, client)
    payload = random.randbytes(3 << 20)
    bind.send(payload)
    loop.run_until(lambda: len(client.data) >= len(payload), timeout=TIMEOUT)
    assert bytes(client.data) == payload


def test_large_multifragment_record(make_loop, stream_backend, address):
    loop, _pool = small_buffer_loop(make_loop)
    server = Recorder()
    listener = loop.listen(stream_backend, address(stream_backend), lambda: server,
                           framing=evpl.framing.record_marking())
    frags = [random.randbytes(n) for n in (1 << 20, 5, 0, 200_000, 1 << 20)]
    small = [b"x", b"", b"yz"]
    wire = record(*frags) + record(*small) + record(b"") + record(*frags[:2])
    peer = raw_connect(stream_backend, listener.address)
    with peer:
        t = InThread(loop, lambda: peer.sendall(wire))
        loop.run_until(lambda: len(server.msgs) >= 4, timeout=TIMEOUT)
        t.get()
    assert server.msgs == [b"".join(frags), b"xyz", b"", b"".join(frags[:2])]


# ---------------------------------------------------------------- split framing


def split_stream(spec) -> tuple[bytes, list[bytes]]:
    """A wire stream of several messages and the messages the app must see."""
    payloads = [b"", b"a", b"hello world", bytes(range(40)), b"\xff" * 3]
    wire = b"".join(encode(spec, p) for p in payloads)
    expected = [user_message(spec, p) for p in payloads]
    if spec[0] == "rm":
        wire += record(b"frag", b"", b"ment", b"ed") + record(b"", b"")
        expected += [b"fragmented", b""]
    return wire, expected


@pytest.mark.parametrize("spec", FRAMER_SPECS, ids=spec_id)
def test_framing_split_at_every_offset(loop, stream_backend, address, spec):
    server = Recorder()
    listener = loop.listen(stream_backend, address(stream_backend), lambda: server,
                           framing=make_framer(spec))
    wire, expected = split_stream(spec)
    peer = raw_connect(stream_backend, listener.address)
    with peer:
        loop.run_until(lambda: server.connected, timeout=TIMEOUT)
        received = 0
        for cut in range(1, len(wire)):
            base = loop.stats()["bytes_in"]
            peer.sendall(wire[:cut])
            loop.run_until(lambda w=base + cut: loop.stats()["bytes_in"] >= w, timeout=TIMEOUT)
            peer.sendall(wire[cut:])
            received += len(expected)
            loop.run_until(lambda r=received: len(server.msgs) >= r, timeout=TIMEOUT)
        # and one byte at a time
        for i in range(len(wire)):
            base = loop.stats()["bytes_in"]
            peer.sendall(wire[i:i + 1])
            loop.run_until(lambda b=base: loop.stats()["bytes_in"] > b, timeout=TIMEOUT)
        received += len(expected)
        loop.run_until(lambda: len(server.msgs) >= received, timeout=TIMEOUT)
    assert server.msgs == expected * len(wire)
    assert not server.closed or server.closed == [None]


# ---------------------------------------------------------------- backpressure


class Pump(evpl.Handler):
    """Sends ``total`` bytes in chunks, honouring on_paused / on_writable."""

    CHUNK = 64 << 10

    def __init__(self, total: int):
        self.total = total
        self.sent = 0
        self.digest = hashlib.sha256()
        self.paused = 0
        self.writable = 0
        self.max_queued = 0
        self.closed: list[object] = []
        self.connected = False

    def piece(self) -> bytes:
        n = min(self.CHUNK, self.total - self.sent)
        seed = (self.sent // self.CHUNK).to_bytes(4, "big")
        return (seed * (n // 4 + 1))[:n]

    def push(self, bind) -> None:
        """Queue one more chunk (may raise SendQueueFull)."""
        p = self.piece()
        bind.send(p)
        self.digest.update(p)
        self.sent += len(p)
        self.max_queued = max(self.max_queued, bind.queued_bytes)

    def pump(self, bind) -> None:
        while self.sent < self.total and not bind.paused and not bind.closed:
            self.push(bind)
        if self.sent >= self.total and not bind.closed:
            bind.finish()

    def on_connected(self, bind):
        self.connected = True
        self.pump(bind)

    def on_paused(self, bind):
        self.paused += 1

    def on_writable(self, bind):
        self.writable += 1
        self.pump(bind)

    def on_closed(self, bind, error):
        self.closed.append(error)


def test_slow_reader_backpressure(loop, stream_backend, address):
    high, low, hard = 2 << 20, 1 << 20, 4 << 20
    total = 16 << 20
    lsock, laddr = raw_listener(stream_backend, address, rcvbuf=65536)
    pump = Pump(total)
    bind = loop.connect(stream_backend, laddr, pump, high_water=high, low_water=low,
                        hard_limit=hard, sndbuf=65536)
    peer, _ = lsock.accept()
    with lsock, peer:
        loop.run_until(lambda: pump.paused >= 1, timeout=TIMEOUT)
        assert bind.paused
        assert low < bind.queued_bytes <= hard
        # a caller that ignores on_paused hits the hard limit, and nothing is queued
        with pytest.raises(evpl.SendQueueFull):
            for _ in range(hard // Pump.CHUNK + 2):
                before = bind.queued_bytes
                pump.push(bind)
        assert bind.queued_bytes == before
        assert bind.queued_bytes <= hard
        assert isinstance(evpl.SendQueueFull("x"), evpl.EvplError)
        writable_before = pump.writable
        # the peer still does not read: the queue cannot drain below low_water
        ticker = Ticker(loop)
        loop.run_until(lambda: ticker.count >= 30, timeout=TIMEOUT)
        ticker.cancel()
        assert pump.writable == writable_before
        assert bind.queued_bytes > low
        assert not bind.closed
        # now the peer reads everything: on_writable resumes the pump, nothing is lost
        reader = InThread(loop, lambda: recv_all(peer))
        loop.run_until(lambda: reader.done() and pump.closed, timeout=TIMEOUT)
        data = reader.get()
    assert pump.writable > writable_before
    assert pump.max_queued <= hard
    assert pump.closed == [None]
    assert len(data) == pump.sent == total
    assert hashlib.sha256(data).digest() == pump.digest.digest()


def test_peer_reset(loop, stream_backend, address):
    """The peer closes with unread data (and SO_LINGER 0): the Bind reports a reset."""

    class Server(Recorder):
        def on_connected(self, bind):
            super().on_connected(bind)
            bind.send(b"x" * 1000)

    server = Server()
    listener = loop.listen(stream_backend, address(stream_backend), lambda: server)
    peer = raw_connect(stream_backend, listener.address)
    loop.run_until(lambda: server.connected, timeout=TIMEOUT)
    assert wait_readable(peer), "server data never arrived"
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()
    loop.run_until(lambda: server.closed, timeout=TIMEOUT)
    assert len(server.closed) == 1
    assert isinstance(server.closed[0], evpl.ConnectionReset), server.closed
    assert isinstance(server.closed[0], evpl.TransportError)
    assert isinstance(server.closed[0], ConnectionResetError)


def test_peer_reset_while_sending(loop, stream_backend, address):
    pump = Pump(1 << 40)
    listener = loop.listen(stream_backend, address(stream_backend), lambda: pump,
                           sndbuf=65536)
    peer = raw_connect(stream_backend, listener.address, rcvbuf=65536)
    loop.run_until(lambda: pump.paused, timeout=TIMEOUT)
    assert wait_readable(peer)
    peer.recv(1000)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()
    # keep the sender busy: reading the peer drains nothing, so it pumps on writable
    loop.run_until(lambda: pump.closed, timeout=TIMEOUT)
    assert len(pump.closed) == 1
    assert isinstance(pump.closed[0], evpl.ConnectionReset), pump.closed


def test_connect_refused(loop, stream_backend, address):
    """Nobody listens at the address: on_closed(bind, ConnectionRefused)."""
    addr = address(stream_backend)
    if isinstance(addr, str):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(addr)                 # the path exists, but nobody listens
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(addr)                 # reserve a port, never listen on it
        addr = s.getsockname()
    with s:
        client = Recorder()
        bind = loop.connect(stream_backend, addr, client)
        loop.run_until(lambda: client.closed, timeout=TIMEOUT)
    assert client.connected == 0
    assert len(client.closed) == 1
    assert isinstance(client.closed[0], evpl.ConnectionRefused), client.closed
    assert isinstance(client.closed[0], ConnectionRefusedError)
    assert bind.closed
    with pytest.raises(evpl.EvplError):
        bind.send(b"x")


def test_connect_missing_unix_path(loop, stream_backend, address):
    if "local" not in backend_info(stream_backend).capabilities:
        pytest.skip("path addresses only")
    client = Recorder()
    bind = loop.connect(stream_backend, address(stream_backend), client)
    loop.run_until(lambda: client.closed, timeout=TIMEOUT)
    assert client.connected == 0
    assert isinstance(client.closed[0], evpl.TransportError), client.closed
    assert bind.closed


# ---------------------------------------------------------------- closing


def test_close_with_queued_sends(loop, stream_backend, address):
    lsock, laddr = raw_listener(stream_backend, address, rcvbuf=65536)
    client = Recorder()
    bind = loop.connect(stream_backend, laddr, client, hard_limit=64 << 20, sndbuf=65536)
    peer, _ = lsock.accept()
    pool = evpl.default_pool()
    pieces = []
    for i in range(64):
        buf = pool.allocate(64 << 10)
        memoryview(buf)[:] = bytes([i]) * (64 << 10)
        pieces.append(buf)
    for buf in pieces:
        bind.send(buf)
    assert bind.queued_bytes == 64 * (64 << 10)
    del buf
    pieces.clear()
    ticker = Ticker(loop)
    loop.run_until(lambda: ticker.count >= 5, timeout=TIMEOUT)
    ticker.cancel()
    assert bind.queued_bytes > 0          # the peer does not read
    bind.close()
    assert bind.closed
    assert bind.queued_bytes == 0
    loop.run_until(lambda: client.closed, timeout=TIMEOUT)
    assert client.closed == [None]
    with lsock, peer:
        data = recv_all(peer)             # what made it out, then EOF (no hang)
    assert len(data) < 64 * (64 << 10)
    expected = b"".join(bytes([i]) * (64 << 10) for i in range(64))
    assert data == expected[:len(data)]


def test_finish_drains(loop, stream_backend, address):
    total = 8 << 20
    lsock, laddr = raw_listener(stream_backend, address)
    client = Recorder()
    bind = loop.connect(stream_backend, laddr, client, hard_limit=32 << 20)
    peer, _ = lsock.accept()
    payload = random.randbytes(total)
    for off in range(0, total, 1 << 20):
        bind.send(payload[off:off + (1 << 20)])
    bind.finish()
    assert not bind.closed                # not before the queue has drained
    with pytest.raises(evpl.EvplError):
        bind.send(b"late")
    with lsock, peer:
        reader = InThread(loop, lambda: recv_all(peer))
        loop.run_until(lambda: reader.done() and client.closed, timeout=TIMEOUT)
        data = reader.get()
    assert len(data) == total
    assert data == payload
    assert client.closed == [None]


def test_half_close_default_finishes(loop, stream_backend, address):
    """Peer shuts down its sending side: on_eof, and the default handler
    finishes (after the echo went out)."""

    class Server(Recorder):
        def on_data(self, bind, buf):
            super().on_data(bind, buf)
            bind.send(buf)

    server = Server()
    listener = loop.listen(stream_backend, address(stream_backend), lambda: server)
    payload = random.randbytes(100_000)
    peer = raw_connect(stream_backend, listener.address)

    def talk():
        peer.sendall(payload)
        echoed = recv_exactly(peer, len(payload))
        peer.shutdown(socket.SHUT_WR)
        return echoed, recv_all(peer)

    with peer:
        t = InThread(loop, talk)
        loop.run_until(lambda: t.done() and server.closed, timeout=TIMEOUT)
        assert t.get() == (payload, b"")
    assert server.data == payload
    assert server.eofs == 1
    assert server.closed == [None]


@pytest.mark.parametrize("framed", [False, True], ids=["raw", "framed"])
def test_half_close_data_and_fin_together(loop, stream_backend, address, framed):
    """Data and FIN arriving together: the data, then on_eof, are delivered."""
    server = Recorder()
    framing = evpl.framing.length_prefix(1) if framed else None
    listener = loop.listen(stream_backend, address(stream_backend), lambda: server,
                           framing=framing)
    peer = raw_connect(stream_backend, listener.address)
    msg = (lambda p: bytes([len(p)]) + p) if framed else (lambda p: p)
    got = (lambda: server.msgs) if framed else (lambda: [bytes(server.data)] if server.data
                                                        else [])
    with peer:
        peer.sendall(msg(b"x"))
        loop.run_until(lambda: got() == [b"x"], timeout=TIMEOUT)
        # both arrive while the loop is not running: one readiness edge
        peer.sendall(msg(b"ping"))
        peer.shutdown(socket.SHUT_WR)
        loop.run_until(lambda: server.closed, timeout=1)
        assert recv_all(peer) == b""
    assert got() == ([b"x", b"ping"] if framed else [b"xping"])
    assert server.eofs == 1
    assert server.closed == [None]


def test_send_after_eof(loop, stream_backend, address):
    """A handler that overrides on_eof can still answer before finishing."""

    class Server(Recorder):
        def on_eof(self, bind):
            self.eofs += 1
            bind.send(b"got %d bytes" % len(self.data))
            bind.finish()

    server = Server()
    listener = loop.listen(stream_backend, address(stream_backend), lambda: server)
    peer = raw_connect(stream_backend, listener.address)
    with peer:
        peer.sendall(b"abcdef")
        loop.run_until(lambda: len(server.data) == 6, timeout=TIMEOUT)
        peer.shutdown(socket.SHUT_WR)
        loop.run_until(lambda: server.closed, timeout=TIMEOUT)
        assert recv_all(peer) == b"got 6 bytes"
    assert server.eofs == 1
    assert server.closed == [None]


def test_on_sent(loop, stream_backend, address):
    class Client(Recorder):
        def __init__(self):
            super().__init__()
            self.sent_calls = []

        def on_sent(self, bind):
            self.sent_calls.append(bind.queued_bytes)

    server = Recorder()
    listener = loop.listen(stream_backend, address(stream_backend), lambda: server)
    client = Client()
    bind = loop.connect(stream_backend, listener.address, client)
    payload = random.randbytes(2 << 20)
    bind.send(payload)
    loop.run_until(lambda: client.sent_calls and len(server.data) >= len(payload),
                   timeout=TIMEOUT)
    assert all(q == 0 for q in client.sent_calls)
    assert bind.queued_bytes == 0
    assert bytes(server.data) == payload


def test_send_on_closed_bind_raises(loop, stream_backend, address):
    listener = loop.listen(stream_backend, address(stream_backend), Echo)
    client = Recorder()
    bind = loop.connect(stream_backend, listener.address, client)
    loop.run_until(lambda: client.connected, timeout=TIMEOUT)
    bind.close()
    assert bind.closed
    with pytest.raises(evpl.EvplError):
        bind.send(b"x")
    with pytest.raises(evpl.EvplError):
        bind.sendv([b"x"])
    bind.close()                          # closing twice is harmless
    bind.finish()
    loop.run_until(lambda: client.closed, timeout=TIMEOUT)
    assert client.closed == [None]
    with pytest.raises(evpl.EvplError):
        bind.sendto(b"x", ("127.0.0.1", 9))


def test_pause_and_resume_reading(loop, stream_backend, address):
    class Server(Recorder):
        def on_connected(self, bind):
            super().on_connected(bind)
            bind.pause_reading()

    server = Server()
    listener = loop.listen(stream_backend, address(stream_backend), lambda: server)
    peer = raw_connect(stream_backend, listener.address)
    with peer:
        loop.run_until(lambda: server.connected, timeout=TIMEOUT)
        bind = server.binds[0]
        assert not bind.reading
        peer.sendall(b"a" * 5000)
        ticker = Ticker(loop)
        # the bytes sit in the kernel: evpl does not read them while paused
        loop.run_until(lambda: fionread(bind.fileno()) == 5000, timeout=TIMEOUT)
        loop.run_until(lambda: ticker.count >= 5, timeout=TIMEOUT)
        assert server.data == b""
        bind.resume_reading()
        assert bind.reading
        loop.run_until(lambda: len(server.data) >= 5000, timeout=TIMEOUT)
        # pause from inside on_data: nothing more is delivered until resumed
        bind.pause_reading()
        peer.sendall(b"b" * 3000)
        loop.run_until(lambda: fionread(bind.fileno()) == 3000, timeout=TIMEOUT)
        loop.run_until(lambda: ticker.count >= 10, timeout=TIMEOUT)
        assert len(server.data) == 5000
        bind.resume_reading()
        loop.run_until(lambda: len(server.data) >= 8000, timeout=TIMEOUT)
        ticker.cancel()
    assert server.data == b"a" * 5000 + b"b" * 3000


def test_send_copies_mutable_data(loop, stream_backend, address):
    server = Recorder()
    listener = loop.listen(stream_backend, address(stream_backend), lambda: server)
    bind = loop.connect(stream_backend, listener.address, Recorder())
    data = bytearray(b"original")
    bind.send(data)
    data[:] = b"mutated!"
    buf = evpl.default_pool().allocate(4)
    memoryview(buf)[:] = b"pool"
    bind.send(buf)
    del buf
    bind.send(memoryview(b"-view"))
    loop.run_until(lambda: len(server.data) >= 17, timeout=TIMEOUT)
    assert server.data == b"originalpool-view"


def test_framed_send_too_big_raises(loop, stream_backend, address):
    listener = loop.listen(stream_backend, address(stream_backend), Echo)
    bind = loop.connect(stream_backend, listener.address, Recorder(),
                        framing=evpl.framing.length_prefix(1))
    with pytest.raises(evpl.FramingError):
        bind.send(b"x" * 256)
    assert bind.queued_bytes == 0
    bind.send(b"x" * 255)
    assert bind.queued_bytes == 256
    bind2 = loop.connect(stream_backend, listener.address, Recorder(),
                         framing=evpl.framing.length_prefix(4, max_message=10))
    with pytest.raises(evpl.FramingError):
        bind2.sendv([b"123456", b"78901"])
    assert bind2.queued_bytes == 0


def test_accept_when_the_loop_starts_late(loop, stream_backend, address):
    """Connections made before the loop first runs (here 100 ms after listen)
    are accepted and their data delivered."""
    server = Recorder()
    listener = loop.listen(stream_backend, address(stream_backend), lambda: server)
    time.sleep(0.1)        # the condition under test, not synchronisation
    peer = raw_connect(stream_backend, listener.address)
    with peer:
        peer.sendall(b"early")
        loop.run_until(lambda: server.data == b"early", timeout=TIMEOUT)
    assert server.connected == 1


def test_listener_close(loop, stream_backend, address):
    class Server(Recorder):
        def on_data(self, bind, buf):
            bind.send(buf)

    server = Server()
    listener = loop.listen(stream_backend, address(stream_backend), lambda: server)
    client = Recorder()
    bind = loop.connect(stream_backend, listener.address, client)
    loop.run_until(lambda: client.connected and server.connected, timeout=TIMEOUT)
    addr = listener.address
    listener.close()
    assert listener.closed
    # the accepted connection survives the listener
    bind.send(b"still here")
    loop.run_until(lambda: len(client.data) >= 10, timeout=TIMEOUT)
    assert client.data == b"still here"
    late = Recorder()
    loop.connect(stream_backend, addr, late)
    loop.run_until(lambda: late.closed, timeout=TIMEOUT)
    assert isinstance(late.closed[0], evpl.TransportError)


def test_loop_close_closes_everything(make_loop, stream_backend, address):
    loop = make_loop()
    server = Recorder()
    listener = loop.listen(stream_backend, address(stream_backend), lambda: server)
    client = Recorder()
    bind = loop.connect(stream_backend, listener.address, client)
    loop.run_until(lambda: server.connected and client.connected, timeout=TIMEOUT)
    bind.send(b"pending")
    loop.close()
    assert bind.closed and server.binds[0].closed and listener.closed
    assert client.closed == [None] and server.closed == [None]


def test_many_small_framed_sends_survive_partial_writes(loop, stream_backend, address):
    """Many small framed messages to a peer with a small receive buffer,
    which takes them in pieces: the byte stream is still every header and
    message, in order."""
    lsock, laddr = raw_listener(stream_backend, address, rcvbuf=4096)
    rng = random.Random(7)
    msgs = [bytes([i % 251]) * rng.randint(0, 300) for i in range(20_000)]
    expected = b"".join(struct.pack(">I", len(m)) + m for m in msgs)
    closed = []

    class Sender(evpl.Handler):
        def on_connected(self, bind):
            for i in range(0, len(msgs), 64):
                bind.send_messages(msgs[i:i + 64])
            bind.finish()

        def on_closed(self, bind, error):
            closed.append(error)

    loop.connect(stream_backend, laddr, Sender(), sndbuf=4096,
                 framing=evpl.framing.length_prefix(4, "big"), hard_limit=64 << 20)
    peer, _ = lsock.accept()
    with lsock, peer:
        reader = InThread(loop, lambda: recv_all(peer))
        loop.run_until(lambda: reader.done() and closed, timeout=TIMEOUT)
        data = reader.get()
    assert closed == [None]
    assert len(data) == len(expected)
    assert data == expected
