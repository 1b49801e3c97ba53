"""The polling loop's direct read of the stream that received last (epoll
``tcp``/``unix``): what it delivers, the ends of a stream it meets, and the
rule that stops it on a loop whose traffic comes from many connections.

Every peer here is a kernel socket over loopback, which queues what it sends
on the receiver within ``send``: data is there before the loop spins, so the
spin's first round decides and the counts below are exact."""

from __future__ import annotations

import socket
import struct

import evpl

from .helpers import TIMEOUT


class Server(evpl.Handler):
    """Records the connections, the messages (framed) or bytes, and closes."""

    def __init__(self):
        self.binds: list[evpl.Bind] = []
        self.msgs: list[tuple[evpl.Bind, bytes]] = []
        self.data = bytearray()
        self.eofs = 0
        self.closed: list[object] = []

    def on_connected(self, bind):
        self.binds.append(bind)

    def on_message(self, bind, msg):
        self.msgs.append((bind, bytes(msg)))

    def on_data(self, bind, buf):
        self.data += buf

    def on_eof(self, bind):
        self.eofs += 1
        bind.finish()

    def on_closed(self, bind, error):
        self.closed.append(error)


def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def serve(make_loop, framed: bool = True, **opts):
    """A polling loop listening on tcp, and a connected kernel-socket peer."""
    loop = make_loop(poll_mode="always", **opts)
    server = Server()
    kw = {"framing": evpl.framing.length_prefix(4)} if framed else {}
    listener = loop.listen("tcp", ("127.0.0.1", 0), lambda: server, **kw)
    return loop, server, listener


def connect(loop, server, listener) -> socket.socket:
    peer = socket.create_connection(listener.address)
    n = len(server.binds)
    loop.run_until(lambda: len(server.binds) > n, timeout=TIMEOUT)
    return peer


def receiving(make_loop):
    """A polling framed server whose one connection just received a first
    message (epoll reported it; the connection is the loop's last
    receiver now): the loop, the server and the peer."""
    loop, server, listener = serve(make_loop)
    peer = connect(loop, server, listener)
    peer.sendall(frame(b"first"))
    loop.run_until(lambda: server.msgs, timeout=TIMEOUT)
    return loop, server, peer


def test_messages_arrive_through_the_direct_read(make_loop):
    """After a first message makes the connection the loop's last receiver,
    the spin reads it straight away: messages sent one at a time, and a
    burst larger than one read, arrive whole and in order, and the loop
    counts direct hits."""
    loop, server, peer = receiving(make_loop)
    try:
        hits = loop.stats()["spin_hits"]
        events = loop.stats()["events"]
        for i in range(20):
            peer.sendall(frame(b"one%02d" % i))
            loop.run_until(lambda n=2 + i: len(server.msgs) == n, timeout=TIMEOUT)
        assert loop.stats()["spin_hits"] - hits == 20
        # and epoll reports nothing afterwards: the registration holds no
        # EPOLLOUT (a writable socket is reported by every wake-up)
        assert loop.stats()["events"] == events
        burst = [b"burst%04d" % i + bytes(300) for i in range(2000)]    # ~620 KB
        peer.sendall(b"".join(frame(m) for m in burst))
        loop.run_until(lambda: len(server.msgs) == 21 + len(burst), timeout=TIMEOUT)
        assert [m for _, m in server.msgs] == [b"first", *(b"one%02d" % i for i in range(20)),
                                              *burst]
    finally:
        peer.close()


def test_bytes_through_the_direct_read(make_loop):
    """An unframed Bind gets the same bytes through the direct read."""
    loop, server, listener = serve(make_loop, framed=False)
    peer = connect(loop, server, listener)
    try:
        sent = bytearray()
        for i in range(50):
            chunk = b"%03d" % i * (i + 1)
            sent += chunk
            want = len(sent)
            peer.sendall(chunk)
            loop.run_until(lambda n=want: len(server.data) == n, timeout=TIMEOUT)
        assert server.data == sent
        assert loop.stats()["spin_hits"] >= 49
    finally:
        peer.close()


def test_a_reset_met_by_the_direct_read_closes_with_connection_reset(make_loop):
    """The kernel reports a reset once: the direct read that meets it closes
    the Bind with ConnectionReset (read again, it would look like EOF)."""
    loop, server, peer = receiving(make_loop)
    hits = loop.stats()["spin_hits"]
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()                                    # RST
    loop.run_until(lambda: server.closed, timeout=TIMEOUT)
    assert isinstance(server.closed[0], evpl.ConnectionReset), server.closed
    assert loop.stats()["spin_hits"] == hits + 1


def test_an_eof_met_by_the_direct_read_ends_the_stream(make_loop):
    """A FIN after data: the direct read takes the data, then meets the end
    (a read of 0 bytes); on_eof, then a clean close."""
    loop, server, peer = receiving(make_loop)
    try:
        hits = loop.stats()["spin_hits"]
        peer.sendall(frame(b"last"))
        peer.shutdown(socket.SHUT_WR)
        loop.run_until(lambda: server.closed, timeout=TIMEOUT)
        assert loop.stats()["spin_hits"] - hits == 2    # the data, then the end
        assert [m for _, m in server.msgs] == [b"first", b"last"]
        assert server.eofs == 1 and server.closed == [None]
        assert peer.recv(64) == b""                 # the Bind finished its side
    finally:
        peer.close()


def test_direct_reads_stop_while_other_connections_receive(make_loop):
    """A server whose connections take turns: the last receiver is never the
    next, so its direct read would be a wasted syscall in every spin round.
    After a few spins that epoll ended for another connection the loop stops
    reading directly; once one connection receives twice in a row (epoll
    reports the last receiver again) it starts again."""
    loop, server, listener = serve(make_loop)
    a = connect(loop, server, listener)
    b = connect(loop, server, listener)
    try:
        reads = []
        for i in range(12):
            (a if i % 2 == 0 else b).sendall(frame(b"turn%02d" % i))
            loop.run_until(lambda n=i + 1: len(server.msgs) == n, timeout=TIMEOUT)
            reads.append(loop.stats()["spin_reads"])
        assert reads[-1] == reads[-5], reads            # stopped
        hits = loop.stats()["spin_hits"]
        for i in range(4):
            a.sendall(frame(b"again%d" % i))
            loop.run_until(lambda n=13 + i: len(server.msgs) == n, timeout=TIMEOUT)
        # epoll reports the first (b received last) and the second (a, the
        # last receiver now: direct reads start again); the direct read
        # finds the other two
        assert loop.stats()["spin_hits"] - hits == 2
        assert [m for _, m in server.msgs][-4:] == [b"again%d" % i for i in range(4)]
    finally:
        a.close()
        b.close()


def test_a_connecting_stream_stops_watching_for_write_space(make_loop):
    """The side that connects watches EPOLLOUT for the connect's outcome,
    then no more: messages it receives afterwards through the direct read
    leave no event behind, and what it sends still goes out."""
    loop = make_loop(poll_mode="always")
    lsock = socket.create_server(("127.0.0.1", 0))
    client = Server()
    try:
        bind = loop.connect("tcp", lsock.getsockname(), client,
                            framing=evpl.framing.length_prefix(4))
        peer, _ = lsock.accept()
        loop.run_until(lambda: client.binds, timeout=TIMEOUT)
        bind.send(b"hello")                         # (the framing adds the header)
        loop.run_once(0)                            # the iteration's end sends it
        assert peer.recv(64) == frame(b"hello")
        peer.sendall(frame(b"first"))
        loop.run_until(lambda: client.msgs, timeout=TIMEOUT)
        events = loop.stats()["events"]
        for i in range(10):
            peer.sendall(frame(b"m%d" % i))
            loop.run_until(lambda n=2 + i: len(client.msgs) == n, timeout=TIMEOUT)
        assert loop.stats()["events"] == events
        assert [m for _, m in client.msgs] == [b"first", *(b"m%d" % i for i in range(10))]
        peer.close()
    finally:
        lsock.close()
