"""The stricter Bind contract, on every backend: pause_reading takes effect
within a read batch, idle and message timeouts close a Bind with
TimeoutError, and a connected datagram Bind reports a refusing peer."""

from __future__ import annotations

import socket

import pytest

import evpl
from core.helpers import TIMEOUT, Ticker, raw_connect

N = 64


class Pauser(evpl.Handler):
    """Pauses reading inside the callback of the ``at``-th message."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.got: list[bytes] = []
        self.binds: list[evpl.Bind] = []
        self.closed: list[object] = []

    def on_connected(self, bind):
        self.binds.append(bind)

    def take(self, bind, data):
        self.got.append(bytes(data))
        if len(self.got) == self.at:
            bind.pause_reading()

    def on_message(self, bind, msg):
        self.take(bind, msg)

    def on_datagram(self, bind, buf, addr):
        self.take(bind, buf)

    def on_closed(self, bind, error):
        self.closed.append(error)


@pytest.mark.parametrize("framing", ["length_prefix", "record_marking"])
def test_pause_inside_a_batch_stops_delivery(loop, stream_backend, address, framing):
    """64 messages arrive in one read; pausing in the 10th callback delivers
    no more of them until resume_reading, which delivers the rest in order."""
    server = Pauser(at=10)
    fr = getattr(evpl.framing, framing)()
    listener = loop.listen(stream_backend, address(stream_backend), lambda: server, framing=fr)
    msgs = [b"m%03d" % i * (i % 7 + 1) for i in range(N)]
    if framing == "length_prefix":
        wire = b"".join(len(m).to_bytes(4, "big") + m for m in msgs)
    else:
        wire = b"".join((len(m) | 0x80000000).to_bytes(4, "big") + m for m in msgs)
    with raw_connect(stream_backend, listener.address) as peer:
        peer.sendall(wire)
        # every byte is read (and kept), but only 10 messages are delivered
        loop.run_until(lambda: loop.stats()["bytes_in"] >= len(wire), timeout=TIMEOUT)
        ticker = Ticker(loop)
        loop.run_until(lambda: ticker.count >= 5, timeout=TIMEOUT)
        ticker.cancel()
        assert server.got == msgs[:10]
        bind = server.binds[0]
        assert not bind.reading
        bind.resume_reading()
        loop.run_until(lambda: len(server.got) >= N, timeout=TIMEOUT)
        assert server.got == msgs
        assert not server.closed


def test_pause_twice_in_one_batch(loop, stream_backend, address):
    """Pausing again in the first message delivered after a resume keeps the
    rest, again, in order; then EOF arrives after the kept messages."""

    class Twice(Pauser):
        eofs = 0

        def take(self, bind, data):
            self.got.append(bytes(data))
            if len(self.got) in (5, 6):
                bind.pause_reading()

        def on_eof(self, bind):
            self.eofs += 1
            super().on_eof(bind)

    server = Twice(at=0)
    listener = loop.listen(stream_backend, address(stream_backend), lambda: server,
                           framing=evpl.framing.length_prefix(2))
    msgs = [bytes([i]) * (i + 1) for i in range(20)]
    wire = b"".join(len(m).to_bytes(2, "big") + m for m in msgs)
    with raw_connect(stream_backend, listener.address) as peer:
        peer.sendall(wire)
        peer.shutdown(socket.SHUT_WR)
        loop.run_until(lambda: len(server.got) == 5 and server.binds, timeout=TIMEOUT)
        bind = server.binds[0]
        bind.resume_reading()
        assert server.got == msgs[:6]
        assert not bind.reading
        assert server.eofs == 0          # EOF waits behind the kept messages
        bind.resume_reading()
        loop.run_until(lambda: server.eofs == 1, timeout=TIMEOUT)
        assert server.got == msgs


def test_pause_inside_a_datagram_batch(loop, datagram_backend):
    """Datagrams already received when a callback pauses are kept, not
    delivered, until resume_reading."""
    server = Pauser(at=3)
    bind = loop.bind(datagram_backend, ("127.0.0.1", 0), server)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
        sent = [b"d%02d" % i for i in range(20)]
        for d in sent:
            peer.sendto(d, bind.local_address)
        loop.run_until(lambda: loop.stats()["datagrams_in"] >= 20, timeout=TIMEOUT)
        ticker = Ticker(loop)
        loop.run_until(lambda: ticker.count >= 5, timeout=TIMEOUT)
        ticker.cancel()
        assert server.got == sent[:3]
        bind.resume_reading()
        loop.run_until(lambda: len(server.got) >= 20, timeout=TIMEOUT)
        assert server.got == sent


def test_exception_in_the_middle_of_a_batch(loop, stream_backend, address):
    """A callback that raises closes its Bind: the rest of the batch is not
    delivered, and every Buffer goes back to the pool (checked at teardown)."""

    class Raiser(Pauser):
        def take(self, bind, data):
            self.got.append(bytes(data))
            if len(self.got) == 4:
                raise ValueError("boom")

    server = Raiser(at=0)
    listener = loop.listen(stream_backend, address(stream_backend), lambda: server,
                           framing=evpl.framing.length_prefix(4))
    wire = b"".join((3).to_bytes(4, "big") + b"m%02d" % i for i in range(N))
    with raw_connect(stream_backend, listener.address) as peer:
        peer.sendall(wire)
        loop.run_until(lambda: server.closed, timeout=TIMEOUT)
    assert len(server.got) == 4
    assert isinstance(server.closed[0], evpl.EvplError)
    errors = list(loop.callback_errors)
    loop.callback_errors.clear()
    assert [type(e) for e, _ in errors] == [ValueError]


# ----------------------------------------------------------------- timeouts

def test_idle_timeout_closes_a_silent_connection(loop, stream_backend, address):
    server = Pauser(at=-1)
    listener = loop.listen(stream_backend, address(stream_backend), lambda: server,
                           idle_timeout=0.2)
    with raw_connect(stream_backend, listener.address):
        loop.run_until(lambda: server.closed, timeout=TIMEOUT)
    assert isinstance(server.closed[0], evpl.TimeoutError)
    assert "nothing received" in str(server.closed[0])
    assert loop.stats()["timeouts"] == 1


def test_idle_timeout_is_reset_by_traffic(loop, stream_backend, address):
    """A peer that keeps sending is not idle; once it stops, the Bind closes."""
    server = Pauser(at=-1)
    listener = loop.listen(stream_backend, address(stream_backend), lambda: server,
                           framing=evpl.framing.length_prefix(4), idle_timeout=2.0)
    with raw_connect(stream_backend, listener.address) as peer:
        ticks = []

        def tick():
            ticks.append(1)
            peer.sendall(b"\0\0\0\x01x")

        timer = loop.call_every(0.05, tick)
        loop.run_until(lambda: len(ticks) >= 50 or server.closed, timeout=TIMEOUT)
        timer.cancel()
        assert not server.closed        # 2.5 s of traffic, longer than the timeout; a
        # stall of the whole process for over 2 s would be needed to fail here
        loop.run_until(lambda: server.closed, timeout=TIMEOUT)
    assert isinstance(server.closed[0], evpl.TimeoutError)
    assert len(server.got) >= 50


def test_message_timeout_closes_a_half_sent_message(loop, stream_backend, address):
    """A peer that announces a message and sends half of it (a slowloris)
    is closed with TimeoutError; the connection's idle time does not matter."""
    server = Pauser(at=-1)
    listener = loop.listen(stream_backend, address(stream_backend), lambda: server,
                           framing=evpl.framing.length_prefix(4), message_timeout=0.2)
    with raw_connect(stream_backend, listener.address) as peer:
        peer.sendall((1000).to_bytes(4, "big") + b"x" * 500)
        loop.run_until(lambda: server.closed, timeout=TIMEOUT)
    assert isinstance(server.closed[0], evpl.TimeoutError)
    assert "message not complete" in str(server.closed[0])


def test_message_timeout_spares_an_idle_connection(loop, stream_backend, address):
    """Between whole messages a connection may stay idle under
    message_timeout alone."""
    server = Pauser(at=-1)
    listener = loop.listen(stream_backend, address(stream_backend), lambda: server,
                           framing=evpl.framing.length_prefix(4), message_timeout=0.05)
    with raw_connect(stream_backend, listener.address) as peer:
        peer.sendall(b"\0\0\0\x02hi")
        loop.run_until(lambda: server.got, timeout=TIMEOUT)
        fired = loop.stats()["timers_fired"]
        # the watchdog looks again several times and finds nothing pending
        loop.run_until(lambda: loop.stats()["timers_fired"] >= fired + 5, timeout=TIMEOUT)
        assert not server.closed
        assert server.got == [b"hi"]


@pytest.mark.parametrize("value", [-1, "1", True])
def test_timeout_options_are_checked(loop, value):
    with pytest.raises(evpl.ConfigError):
        loop.listen("tcp", ("127.0.0.1", 0), evpl.Handler(), idle_timeout=value)


def test_message_timeout_needs_framing(loop):
    """A message timeout on a Bind that has no messages is refused when given."""
    with pytest.raises(evpl.ConfigError, match="needs framing"):
        loop.listen("tcp", ("127.0.0.1", 0), evpl.Handler(), message_timeout=1.0)
    with pytest.raises(evpl.ConfigError, match="needs framing"):
        loop.bind("udp", ("127.0.0.1", 0), evpl.Handler(), message_timeout=1.0)


# -------------------------------------------------------- connected datagrams

def test_connected_datagram_bind_echo(loop, datagram_backend):
    """A connected datagram Bind sends with send() and receives its peer's
    datagrams."""

    class Echo(evpl.Handler):
        def on_datagram(self, bind, buf, addr):
            bind.sendto(buf, addr)

    server = loop.bind(datagram_backend, ("127.0.0.1", 0), Echo())
    client = Pauser(at=-1)
    bind = loop.connect(datagram_backend, server.local_address, client)
    assert bind.peer_address == server.local_address
    for i in range(5):
        bind.send(b"ping %d" % i)
    loop.run_until(lambda: len(client.got) == 5, timeout=TIMEOUT)
    assert sorted(client.got) == [b"ping %d" % i for i in range(5)]
    with pytest.raises(evpl.EvplError):
        bind.sendto(b"x", server.local_address)
    with pytest.raises(ValueError):
        bind.send(b"x" * 70000)


def test_connected_datagram_bind_reports_refusal(loop, datagram_backend):
    """ICMP port unreachable closes a connected datagram Bind with
    ConnectionRefused (an RPC client learns at once, not at its timeout)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()          # nobody listens there once closed
    client = Pauser(at=-1)
    bind = loop.connect(datagram_backend, dead, client)
    bind.send(b"hello?")
    loop.run_until(lambda: client.closed, timeout=TIMEOUT)
    assert isinstance(client.closed[0], evpl.ConnectionRefused)
    assert bind.closed


def test_connected_datagram_send_messages(loop, datagram_backend):
    """send_messages on a connected datagram Bind sends one datagram per
    item, all or nothing; sendv is refused (a datagram is one piece)."""

    class Sink(evpl.Handler):
        def __init__(self):
            self.got = []

        def on_datagrams(self, bind, datagrams):
            self.got += [bytes(b) for b, _ in datagrams]

    server = Sink()
    sbind = loop.bind(datagram_backend, ("127.0.0.1", 0), server)
    bind = loop.connect(datagram_backend, sbind.local_address, evpl.Handler())
    with pytest.raises(ValueError):
        bind.send_messages([b"ok", b"x" * 70000])
    assert bind.queued_bytes == 0
    with pytest.raises(evpl.EvplError):
        bind.sendv([b"a", b"b"])
    bind.send_messages([b"d%02d" % i for i in range(30)])
    loop.run_until(lambda: len(server.got) == 30, timeout=TIMEOUT)
    assert sorted(server.got) == [b"d%02d" % i for i in range(30)]
