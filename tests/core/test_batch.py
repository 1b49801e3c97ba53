"""Batch delivery on every backend: ``on_messages`` / ``on_datagrams`` get a
whole read batch in one call, ``send_messages`` queues a reply batch in one
call, and the fixed-size framer cuts messages without calling Python."""

from __future__ import annotations

import random
import socket

import pytest

import evpl
from core.helpers import (
    TIMEOUT,
    InThread,
    Ticker,
    raw_connect,
    raw_listener,
    recv_exactly,
)

FRAMERS = {
    "length_prefix": (evpl.framing.length_prefix(4),
                      lambda m: len(m).to_bytes(4, "big") + m),
    "record_marking": (evpl.framing.record_marking(),
                       lambda m: (len(m) | 0x80000000).to_bytes(4, "big") + m),
    "fixed": (evpl.framing.fixed(16), lambda m: m),
}


class Batcher(evpl.Handler):
    """Echoes every batch with one send_messages; records the batches."""

    def __init__(self, pause_after: int | None = None, raise_at: int | None = None) -> None:
        self.batches: list[list[bytes]] = []
        self.binds: list[evpl.Bind] = []
        self.closed: list[object] = []
        self.pause_after = pause_after
        self.raise_at = raise_at
        self.singles = 0

    def on_connected(self, bind):
        self.binds.append(bind)

    def on_message(self, bind, msg):
        self.singles += 1                  # never: on_messages takes them all

    def on_messages(self, bind, msgs):
        assert all(type(m) is evpl.Buffer for m in msgs)
        self.batches.append([bytes(m) for m in msgs])
        if self.raise_at is not None and len(self.batches) == self.raise_at:
            raise RuntimeError("batch refused")
        bind.send_messages(msgs)
        if self.pause_after is not None and len(self.batches) == self.pause_after:
            bind.pause_reading()

    def on_closed(self, bind, error):
        self.closed.append(error)

    @property
    def messages(self) -> list[bytes]:
        return [m for b in self.batches for m in b]


def _messages(n: int, fixed: bool) -> list[bytes]:
    rnd = random.Random(n)
    if fixed:
        return [b"%016d" % i for i in range(n)]
    return [rnd.randbytes(rnd.randint(0, 300)) for _ in range(n)]


@pytest.mark.parametrize("framing", list(FRAMERS))
def test_on_messages_gets_read_batches_and_send_messages_replies(loop, stream_backend,
                                                                  address, framing):
    framer, encode = FRAMERS[framing]
    server = Batcher()
    listener = loop.listen(stream_backend, address(stream_backend), lambda: server,
                           framing=framer)
    msgs = _messages(2000, framing == "fixed")
    wire = b"".join(encode(m) for m in msgs)
    with raw_connect(stream_backend, listener.address) as peer:

        def send() -> None:
            # in random pieces, so that messages are cut by reads
            rnd = random.Random(7)
            i = 0
            while i < len(wire):
                k = rnd.randint(1, 9000)
                peer.sendall(wire[i:i + k])
                i += k

        sender = InThread(loop, send)      # the echo flows back meanwhile
        reply = _read_all(loop, peer, len(wire))
        sender.get()
    assert server.messages == msgs
    assert server.singles == 0
    assert len(server.batches) < len(msgs)          # many messages per call
    assert reply == wire                             # each reply framed on its own
    assert loop.stats()["messages_in"] == len(msgs)
    # one call into Python per batch, none per message
    assert loop.stats()["receive_calls"] == len(server.batches)


def _read_all(loop: evpl.Loop, peer: socket.socket, n: int) -> bytes:
    """Read ``n`` bytes from a plain socket while the loop keeps sending."""
    data = bytearray()

    def more() -> None:
        while len(data) < n:
            chunk = peer.recv(1 << 20)
            if not chunk:
                break
            data.extend(chunk)

    reader = InThread(loop, more)
    loop.run_until(reader.done, timeout=TIMEOUT)
    reader.get()
    return bytes(data)


def test_pause_inside_on_messages(loop, stream_backend, address):
    """After a batch pauses reading, no further batch is delivered until
    resume_reading; then everything arrives in order."""
    server = Batcher(pause_after=1)
    listener = loop.listen(stream_backend, address(stream_backend), lambda: server,
                           framing=evpl.framing.length_prefix(4))
    msgs = _messages(50, False)
    with raw_connect(stream_backend, listener.address) as peer:
        peer.sendall(b"".join(len(m).to_bytes(4, "big") + m for m in msgs[:10]))
        loop.run_until(lambda: server.batches, timeout=TIMEOUT)
        first = len(server.messages)
        peer.sendall(b"".join(len(m).to_bytes(4, "big") + m for m in msgs[10:]))
        ticker = Ticker(loop)
        loop.run_until(lambda: ticker.count >= 10, timeout=TIMEOUT)
        ticker.cancel()
        assert len(server.batches) == 1 and len(server.messages) == first
        server.binds[0].resume_reading()
        loop.run_until(lambda: len(server.messages) >= len(msgs), timeout=TIMEOUT)
    assert server.messages == msgs


def test_exception_in_on_messages_closes_the_bind(loop, stream_backend, address):
    server = Batcher(raise_at=1)
    listener = loop.listen(stream_backend, address(stream_backend), lambda: server,
                           framing=evpl.framing.length_prefix(4))
    with raw_connect(stream_backend, listener.address) as peer:
        peer.sendall(b"".join(len(m).to_bytes(4, "big") + m for m in _messages(30, False)))
        loop.run_until(lambda: server.closed, timeout=TIMEOUT)
    assert isinstance(server.closed[0], evpl.EvplError)
    errors = list(loop.callback_errors)
    loop.callback_errors.clear()
    assert [type(e) for e, _ in errors] == [RuntimeError]


def test_bad_frame_after_good_ones_in_a_batch(loop, stream_backend, address):
    """The good messages before a bad frame are delivered (and answered)
    before the Bind closes with FramingError."""
    server = Batcher()
    listener = loop.listen(stream_backend, address(stream_backend), lambda: server,
                           framing=evpl.framing.length_prefix(4, max_message=100))
    good = [b"a" * 10, b"b" * 20]
    wire = b"".join(len(m).to_bytes(4, "big") + m for m in good) + (1000).to_bytes(4, "big")
    with raw_connect(stream_backend, listener.address) as peer:
        peer.sendall(wire)
        loop.run_until(lambda: server.closed, timeout=TIMEOUT)
        reply = recv_exactly(peer, 38)
    assert server.messages == good
    assert isinstance(server.closed[0], evpl.FramingError)
    assert reply == wire[:38]


def test_send_messages_is_all_or_nothing(loop, stream_backend, address):
    server = Batcher()
    listener = loop.listen(stream_backend, address(stream_backend), lambda: server,
                           framing=evpl.framing.fixed(4))
    client = evpl.Handler()
    bind = loop.connect(stream_backend, listener.address, client,
                        framing=evpl.framing.fixed(4))
    with pytest.raises(evpl.FramingError):
        bind.send_messages([b"abcd", b"abc", b"wxyz"])
    assert bind.queued_bytes == 0
    with pytest.raises(evpl.FramingError):
        bind.send(b"toolong")
    bind.send_messages([b"abcd", b"wxyz"])
    assert bind.queued_bytes == 8
    loop.run_until(lambda: len(server.messages) == 2, timeout=TIMEOUT)
    assert server.messages == [b"abcd", b"wxyz"]


def test_send_messages_takes_tuples_of_pieces(loop, stream_backend, address):
    """A tuple item is one message made of pieces (a reply header next to a
    payload sent by reference), framed once; a bad one refuses the batch."""
    server = Batcher()
    framer = evpl.framing.length_prefix(4)
    listener = loop.listen(stream_backend, address(stream_backend), lambda: server,
                           framing=framer)
    bind = loop.connect(stream_backend, listener.address, evpl.Handler(), framing=framer)
    payload = bytes(range(256)) * 16
    with pytest.raises(TypeError):
        bind.send_messages([b"ok", (b"head", 42)])
    assert bind.queued_bytes == 0
    bind.send_messages([b"one", (b"head:", payload, bytearray(b":tail")), (), (b"x",)])
    assert bind.queued_bytes == 4 * 4 + 3 + 5 + len(payload) + 5 + 0 + 1
    loop.run_until(lambda: len(server.messages) == 4, timeout=TIMEOUT)
    assert server.messages == [b"one", b"head:" + payload + b":tail", b"", b"x"]


def test_send_messages_tuples_refused_on_datagram_binds(loop, datagram_backend):
    rx = loop.bind(datagram_backend, ("127.0.0.1", 0), evpl.Handler())
    tx = loop.connect(datagram_backend, rx.local_address, evpl.Handler())
    with pytest.raises(evpl.EvplError, match="one datagram at a time"):
        tx.send_messages([b"a", (b"b", b"c")])
    assert tx.queued_bytes == 0


@pytest.mark.parametrize("size", [0, -1, True, "4"])
def test_fixed_framer_rejects_bad_sizes(size):
    with pytest.raises(evpl.ConfigError):
        evpl.framing.fixed(size)


def test_on_datagrams_gets_read_batches(loop, dgram_net):
    class Dgrams(evpl.Handler):
        def __init__(self):
            self.batches = []
            self.singles = 0

        def on_datagram(self, bind, buf, addr):
            self.singles += 1

        def on_datagrams(self, bind, datagrams):
            self.batches.append([(bytes(b), a) for b, a in datagrams])
            if len(self.batches) == 1:
                bind.pause_reading()

    server = Dgrams()
    bind = dgram_net.bind(loop, server, "a")
    with dgram_net.peer_socket("b") as peer:
        sent = [b"d%03d" % i for i in range(40)]
        for d in sent[:20]:
            peer.sendto(d, bind.local_address)
        loop.run_until(lambda: server.batches, timeout=TIMEOUT)
        first = sum(map(len, server.batches))
        for d in sent[20:]:
            peer.sendto(d, bind.local_address)
        ticker = Ticker(loop)
        loop.run_until(lambda: ticker.count >= 10, timeout=TIMEOUT)
        ticker.cancel()
        assert sum(map(len, server.batches)) == first      # paused: nothing delivered
        bind.resume_reading()
        loop.run_until(lambda: sum(map(len, server.batches)) >= 40, timeout=TIMEOUT)
        me = peer.getsockname()
    got = [d for b in server.batches for d in b]
    assert [d for d, _ in got] == sent
    assert all(a == me for _, a in got)
    assert server.singles == 0
    assert len(server.batches) < 40


class Forwarder(evpl.Handler):
    """Sends each received batch on in one call, but first tries it with a
    refused item appended: received messages that follow each other in
    memory share one send-queue entry (``txq_merge``), and the refused
    batch must leave none of them queued, nor the entry they extended."""

    def __init__(self, refuse: object) -> None:
        self.refuse = refuse
        self.sent: list[bytes] = []
        self.refused = 0

    def on_messages(self, bind, msgs):
        before = bind.queued_bytes
        # the first message alone, so the batch's others extend its entry
        bind.send(msgs[0])
        self.sent.append(bytes(msgs[0]))
        queued = bind.queued_bytes
        try:
            bind.send_messages([*msgs[1:], self.refuse])
        except (evpl.FramingError, TypeError):
            self.refused += 1
        assert bind.queued_bytes == queued > before
        bind.send_messages(msgs[1:])
        self.sent.extend(bytes(m) for m in msgs[1:])


@pytest.mark.parametrize("kind", sorted(FRAMERS))
def test_forwarded_batches_send_what_was_received(loop, stream_backend, address, kind):
    """Received messages sent on as they came (an echo, a forwarder) go out
    byte for byte, on every framer; a batch refused halfway leaves nothing
    of itself queued, even where it had extended an earlier entry."""
    framer, frame = FRAMERS[kind]
    refuse = b"too short" if kind == "fixed" else 42
    server = Forwarder(refuse)
    listener = loop.listen(stream_backend, address(stream_backend), lambda: server,
                           framing=framer)
    msgs = _messages(3000, kind == "fixed")
    wire = b"".join(frame(m) for m in msgs)
    peer = raw_connect(stream_backend, listener.address)
    with peer:
        reader = InThread(loop, lambda: recv_exactly(peer, len(wire)))
        writer = InThread(loop, lambda: peer.sendall(wire))     # many messages a read
        loop.run_until(lambda: reader.done() and writer.done(), timeout=TIMEOUT)
        writer.get()
        assert reader.get() == wire
    assert server.sent == msgs
    assert server.refused > 0


def test_framed_sendv_while_the_queue_drains(loop, stream_backend, address):
    """Multi-piece framed messages queued while a slow peer takes earlier
    ones in pieces: the queue's entries move down as it refills (its head
    has advanced), and every header still lands on its own message."""
    lsock, laddr = raw_listener(stream_backend, address, rcvbuf=4096)
    rng = random.Random(11)
    msgs = [tuple(bytes([(i + k) % 251]) * rng.randint(0, 120) for k in range(3))
            for i in range(6000)]
    expected = b"".join(len(b"".join(m)).to_bytes(4, "big") + b"".join(m) for m in msgs)
    closed: list[object] = []
    sent = 0

    class Sender(evpl.Handler):
        def on_connected(self, bind):
            self.step(bind)

        def step(self, bind):
            nonlocal sent
            for _ in range(16):
                if sent < len(msgs):
                    bind.sendv(msgs[sent])
                    sent += 1
            if sent < len(msgs):
                loop.call_later(0, self.step, bind)     # on the next iteration
            else:
                bind.finish()

        def on_closed(self, bind, error):
            closed.append(error)

    loop.connect(stream_backend, laddr, Sender(), sndbuf=4096,
                 framing=evpl.framing.length_prefix(4), hard_limit=64 << 20)
    peer, _ = lsock.accept()
    with lsock, peer:
        reader = InThread(loop, lambda: recv_exactly(peer, len(expected)))
        loop.run_until(lambda: reader.done() and closed, timeout=TIMEOUT)
        data = reader.get()
    assert closed == [None]
    assert data == expected
