"""A framed Bind whose peer hangs up in the middle of a large message.

Issue 8 section 5: the peer announces a 1 MiB message (length_prefix 4),
sends 600 KiB of it, then 100 KiB more and resets (SO_LINGER 0) or shuts
down and closes. On the epoll backends the 100 KiB and the hang-up arrived in
one edge-triggered event; the large-message branch of the framed reader took
its short read for "drained" and waited for an edge that never came: no
``on_closed``, the fd stayed open (CLOSE-WAIT), the assembly buffer stayed
pinned, and the interpreter crashed at exit unless ``loop.close()`` ran.

The test drives the peer step by step so that the sequence is the same every
time: the server has taken the first 600 KiB (the message is being assembled
in a chunk of its own) before the rest is sent, and the rest and the hang-up
are both in the server's socket before the loop runs again.
"""

from __future__ import annotations

import fcntl
import os
import random
import select
import socket
import struct
import subprocess
import sys
import termios
import textwrap

import pytest

import evpl

from .helpers import TIMEOUT, InThread, backend_info, raw_connect, wait_until

ANNOUNCED = 1 << 20          # the length prefix announces 1 MiB
FIRST = 600 << 10            # sent (and read by the server) first
REST = 100 << 10             # then this much, then the hang-up

TCP_CLOSE = 7                # tcpi_state values (include/net/tcp_states.h)
TCP_CLOSE_WAIT = 8


class Server(evpl.Handler):
    def __init__(self, greeting: bytes | None = None):
        self.greeting = greeting
        self.binds: list[evpl.Bind] = []
        self.msgs: list[int] = []
        self.closed: list[object] = []

    def on_connected(self, bind):
        self.binds.append(bind)
        if self.greeting is not None:
            bind.send(self.greeting)

    def on_message(self, bind, msg):
        self.msgs.append(len(msg))

    def on_closed(self, bind, error):
        self.closed.append(error)


def outq(sock: socket.socket) -> int:
    """Bytes the kernel still holds in ``sock``'s send queue (TCP: not yet
    acknowledged by the receiving kernel)."""
    buf = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    return struct.unpack("i", buf)[0]


def tcp_state(fd: int) -> int:
    """The TCP state of the socket ``fd`` (TCP_INFO's first byte)."""
    s = socket.socket(fileno=os.dup(fd))
    try:
        return s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
    finally:
        s.close()


def start_large_message(loop, backend, address, *, reset: bool):
    """A framed server, a plain-socket peer, and a 1 MiB message of which the
    server has read the first 600 KiB. With ``reset`` the server greets the
    peer, who never reads it: closing then resets the connection (unix
    sockets too: unread data makes the other side's reads fail with
    ECONNRESET)."""
    server = Server(b"unread" if reset else None)
    # room for the rest in the server's socket while the loop does not read
    listener = loop.listen(backend, address(backend), lambda: server,
                           framing=evpl.framing.length_prefix(4), rcvbuf=1 << 20)
    peer = raw_connect(backend, listener.address)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    loop.run_until(lambda: server.binds, timeout=TIMEOUT)
    head = ANNOUNCED.to_bytes(4, "big") + random.randbytes(FIRST)
    sender = InThread(loop, lambda: peer.sendall(head))
    loop.run_until(lambda: sender.done() and loop.stats()["bytes_in"] >= len(head),
                   timeout=TIMEOUT)
    sender.get()
    assert loop.stats()["bytes_in"] == len(head)
    assert not server.msgs and not server.closed
    return server, peer


def hang_up(peer: socket.socket, server_fd: int, inet: bool, reset: bool) -> None:
    """Send the next 100 KiB and hang up, without running the loop: when it
    runs again, the data and the hang-up are both waiting in the server's
    socket (one epoll edge)."""
    if reset:
        # the greeting is there to be left unread
        assert select.select([peer], [], [], TIMEOUT)[0], "the greeting never arrived"
    peer.sendall(random.randbytes(REST))
    if inet:
        # unix sockets queue at the receiver during send(); TCP: acknowledged
        wait_until(lambda: outq(peer) == 0, "the server's kernel acknowledged everything")
    if reset:
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    else:
        peer.shutdown(socket.SHUT_WR)
    peer.close()
    if inet:
        want = TCP_CLOSE if reset else TCP_CLOSE_WAIT
        wait_until(lambda: tcp_state(server_fd) == want, "the server's kernel saw the hang-up")


@pytest.mark.parametrize("hangup", ["reset", "fin"])
def test_hangup_while_assembling_large_message(loop, stream_backend, address, hangup):
    reset = hangup == "reset"
    inet = "inet" in backend_info(stream_backend).capabilities
    server, peer = start_large_message(loop, stream_backend, address, reset=reset)
    bind = server.binds[0]
    hang_up(peer, bind.fileno(), inet, reset)
    try:
        loop.run_until(lambda: server.closed, timeout=TIMEOUT)
    except evpl.TimeoutError:
        pytest.fail(f"the Bind is stuck open after the peer's {hangup}: {bind!r}, "
                    f"bytes_in={loop.stats()['bytes_in']}, "
                    f"pool={evpl.default_pool().stats()}")
    assert bind.closed
    assert loop.stats()["bytes_in"] == 4 + FIRST + REST
    assert server.msgs == []
    assert len(server.closed) == 1
    if reset:
        assert isinstance(server.closed[0], evpl.ConnectionReset), server.closed
    else:
        assert isinstance(server.closed[0], evpl.FramingError), server.closed
        assert "in the middle of a message" in str(server.closed[0])
    # the loop fixture then checks that no pool buffer is left in use


# ------------------------------------------------------------ exit with a live Bind

# A framed server Bind left exactly as the bug above left it: a large message
# half assembled in a pool buffer of its own, the peer gone (reset), a
# received message's Buffer still referenced, and the loop never closed.
# Then either the interpreter exits ("exit": its final garbage collection
# frees loop, Binds, Buffers and pool in whatever order), or everything is
# dropped into a reference cycle and collected ("cycle").
_EXIT_SCRIPT = textwrap.dedent("""
    import gc, random, socket, struct, sys, threading
    import evpl

    backend, address, how = sys.argv[1], sys.argv[2], sys.argv[3]
    loop = evpl.Loop()

    class Server(evpl.Handler):
        def __init__(self):
            self.binds, self.msgs = [], []
        def on_connected(self, bind):
            self.binds.append(bind)
        def on_message(self, bind, msg):
            self.msgs.append(msg)

    server = Server()
    inet = address == "inet"
    listener = loop.listen(backend, ("127.0.0.1", 0) if inet else address, lambda: server,
                           framing=evpl.framing.length_prefix(4))
    peer = socket.socket(socket.AF_INET if inet else socket.AF_UNIX, socket.SOCK_STREAM)
    peer.connect(listener.address)
    loop.run_until(lambda: server.binds, timeout=10)
    head = (8).to_bytes(4, "big") + b"complete" + (1 << 20).to_bytes(4, "big")
    sender = threading.Thread(target=peer.sendall, args=(head + random.randbytes(600 << 10),))
    sender.start()
    loop.run_until(lambda: loop.stats()["bytes_in"] >= len(head) + (600 << 10), timeout=10)
    sender.join()
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()
    pool = evpl.default_pool()
    assert len(server.msgs) == 1 and pool.stats()["buffers_in_use"] >= 2, pool.stats()
    assert not server.binds[0].closed
    if how == "cycle":
        junk = [loop, server, listener]
        junk.append(junk)
        del loop, server, listener, junk, Server
        gc.collect()
        if "io_uring" not in backend:
            # (an io_uring loop stays alive: its armed receives hold its Binds)
            stats = pool.stats()
            assert stats["buffers_in_use"] == 0 and stats["heap_in_use"] == 0, stats
    print("done", flush=True)
""")


@pytest.mark.parametrize("how", ["exit", "cycle"])
def test_live_framed_bind_at_exit_or_gc(stream_backend, address, how):
    """The Bind above, never closed, freed at interpreter exit or by the
    garbage collector: no crash (it was a segfault in Bind.__dealloc__, exit
    code 139) and, when collected, every pool buffer goes back."""
    inet = "inet" in backend_info(stream_backend).capabilities
    where = "inet" if inet else address(stream_backend)
    proc = subprocess.run([sys.executable, "-c", _EXIT_SCRIPT, stream_backend, where, how],
                          capture_output=True, text=True, timeout=TIMEOUT * 6)
    assert proc.returncode == 0, (proc.returncode, proc.stdout[-1000:], proc.stderr[-3000:])
    assert proc.stdout.strip() == "done"
