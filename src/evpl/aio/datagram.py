"""asyncio datagram transports that are evpl Binds.

A ``DatagramTransport`` is the ``evpl.Handler`` of one ``udp`` Bind (or
``io_uring_udp`` on an io_uring loop): the engine receives with recvmmsg
(or a multishot recvmsg) into pool memory and calls ``on_datagram`` per
datagram, which becomes ``protocol.datagram_received(bytes, addr)``;
``sendto`` queues on the Bind (``bytes`` referenced, not copied) and the
engine sends every datagram queued in one loop iteration with one
sendmmsg (same-size datagrams to one peer as a UDP GSO train, which the
kernel cuts into ordinary datagrams). Errors the socket reports (ICMP port
unreachable, a refused send) reach ``protocol.error_received`` through the
Bind's ``on_datagram_error`` and the transport stays open, as asyncio's.

What differs from asyncio's selector transport: a datagram leaves at the
end of the loop iteration, not inside ``sendto``, so right after
``sendto`` ``get_write_buffer_size()`` counts it, a send error reaches
``error_received`` a moment later (still before the next callbacks run),
and ``abort()`` drops what the iteration had not sent yet (``close()``
sends it first).

Unix datagram sockets (``family=AF_UNIX``) stay on asyncio's transport over
fd watches: the engine has no unix datagram Bind.
"""

from __future__ import annotations

import errno
import socket
from asyncio import futures, transports, trsock
from typing import TYPE_CHECKING, Any

from evpl._native.bind import Bind, Limits
from evpl.aio import _fast
from evpl.aio.transports import _HIGH, _NO_LIMIT, _BindTransport, _water_marks
from evpl.core import backends as _backends
from evpl.core.handler import Handler

if TYPE_CHECKING:
    from evpl.aio.loop import EvplEventLoop

__all__ = ["DatagramTransport", "adoptable"]

# the largest datagram received whole (IPv6 allows 65527 bytes of payload;
# the receive slots are 64 KiB anyway)
_MAX_DATAGRAM = 65535


def adoptable(sock: Any) -> bool:
    """Whether ``sock`` can become a datagram Bind: a real kernel UDP (or
    other IPv4/IPv6 datagram) socket. Anything else (unix datagram sockets,
    socket-like objects) keeps asyncio's transport."""
    return (isinstance(sock, socket.socket) and sock.type == socket.SOCK_DGRAM
            and sock.family in (socket.AF_INET, socket.AF_INET6))


class DatagramTransport(_BindTransport, Handler, transports._FlowControlMixin,
                        transports.DatagramTransport):
    """``asyncio.DatagramTransport`` over one evpl datagram Bind (see the
    module doc). Made by the loop's ``create_datagram_endpoint`` for a UDP
    socket it created or was given (``sock=``): connected (``remote_addr``
    without ``allow_broadcast``, or a connected ``sock``), the Bind sends
    to its peer only and a peer that refuses gives
    ``error_received(ConnectionRefusedError)``."""

    # what the per-datagram paths read: slots, not dict look-ups
    __slots__ = ("_address", "_bind", "_closing", "_conn_lost", "_connected", "_protocol",
                 "_recv", "_sbind")

    def __init__(self, loop: EvplEventLoop, sock: socket.socket, protocol: Any,
                 address: Any = None, waiter: Any = None, extra: dict[str, Any] | None = None,
                 *, backend: str = "udp") -> None:
        transports._FlowControlMixin.__init__(self, extra, loop)
        extra_ = self._extra
        extra_["socket"] = trsock.TransportSocket(sock)
        try:
            extra_["sockname"] = sock.getsockname()
        except OSError:
            extra_["sockname"] = None
        if "peername" not in extra_:
            try:
                extra_["peername"] = sock.getpeername()
            except OSError:
                extra_["peername"] = None
        self._sock: socket.socket | None = sock
        self._sock_fd = sock.fileno()
        self._address = address
        self._closing = False
        self._protocol = protocol
        self._recv = protocol.datagram_received
        self._protocol_connected = True
        self._conn_lost = 0
        self._paused = False
        self._reading = False           # started (after connection_made)
        peer = extra_["peername"]
        self._connected = bool(peer)
        sock.setblocking(False)
        module = _backends.native(backend)
        self._high_water, self._low_water = _HIGH, _HIGH // 4
        lim = Limits(self._high_water, self._low_water, _NO_LIMIT, _MAX_DATAGRAM, 0, 0)
        # the Bind delivers nothing until connection_made ran
        self._bind: Bind | None = module.datagram(loop._core, self._sock_fd, backend, self, lim,
                                                  True, peer if self._connected else None)
        self._bind.pause_reading()
        self._sbind: Bind | None = self._bind   # while sendto goes straight to the Bind
        loop._transports[self._sock_fd] = self
        loop.call_soon(protocol.connection_made, self)
        loop.call_soon(self._start_reading)
        if waiter is not None:
            loop.call_soon(futures._set_result_unless_cancelled, waiter, None)

    # ---- engine callbacks (evpl.Handler) -------------------------------------

    # a datagram: compiled (evpl.aio._fast), no interpreter frame
    on_datagram = _fast.on_datagram

    def on_datagram_error(self, bind: Bind, error: OSError) -> None:
        """The socket reported an error (ICMP, a refused send): asyncio's
        ``error_received``; the transport stays open."""
        if self._closing and self._conn_lost:
            return
        self._notify("error_received", "Exception in protocol.error_received()", error)

    def on_paused(self, bind: Bind) -> None:
        self._maybe_pause_protocol()

    def on_writable(self, bind: Bind) -> None:
        self._maybe_resume_protocol()

    def on_closed(self, bind: Bind, error: Any) -> None:
        """The Bind closed: after ``close()`` once the queue was sent, or
        because a callback failed."""
        loop = self._loop
        self._release_socket()
        if loop is None or loop.is_closed():
            self._bind = None
            self._closing = True
            self._drop_fast_paths()
            return
        if self._conn_lost:
            return
        self._closing = True
        self._drop_fast_paths()
        self._conn_lost += 1
        exc = error if error is None or isinstance(error, OSError) else OSError(str(error))
        loop.call_soon(self._call_connection_lost, exc)

    # ---- sending -------------------------------------------------------------

    # sendto (queue one datagram; see _fast.dg_sendto): compiled, no
    # interpreter frame
    sendto = _fast.dg_sendto

    def _refused_send(self, bind: Bind, data: Any, addr: Any, exc: ValueError) -> None:
        """What the Bind refused before queueing: a datagram over UDP's
        limit (asyncio's socket says EMSGSIZE) or a host name, which the
        socket module resolves for sendto (blocking, as asyncio's does)."""
        if len(memoryview(data).cast("B")) > 65507:
            self.on_datagram_error(bind, OSError(errno.EMSGSIZE, "Message too long"))
            return
        try:
            family = self._extra["socket"].family
            infos = socket.getaddrinfo(addr[0], addr[1], family, socket.SOCK_DGRAM)
        except OSError as err:
            self.on_datagram_error(bind, err)
            return
        except (TypeError, IndexError):
            raise exc from None
        bind.sendto(data, infos[0][4])

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        high, low = _water_marks(high, low)
        self._high_water, self._low_water = high, low
        bind = self._bind
        if bind is not None and not bind.closed and not self._closing:
            bind.set_write_limits(high, low, _NO_LIMIT)
        self._maybe_pause_protocol()

    # ---- reading -------------------------------------------------------------

    def _resume(self) -> None:
        if self._paused or self._closing or self._bind is None:
            return
        self._bind.resume_reading()

    # ---- life cycle ------------------------------------------------------------

    def close(self) -> None:
        """Close once everything queued has been sent; ``connection_lost(None)``
        follows. No more datagrams are delivered."""
        if self._closing:
            return
        self._closing = True
        self._drop_fast_paths()
        bind = self._bind
        if bind is None:
            self._conn_lost += 1
            self._loop.call_soon(self._call_connection_lost, None)
            return
        bind.pause_reading()
        bind.finish()               # closes now if nothing is queued
        if bind.closed and not self._conn_lost:
            self._release_socket()
            self._conn_lost += 1
            self._loop.call_soon(self._call_connection_lost, None)

    def _call_connection_lost(self, exc: BaseException | None) -> None:
        try:
            if self._protocol_connected:
                self._protocol.connection_lost(exc)
        finally:
            self._release_socket()
            self._sock = None
            self._bind = None
            self._drop_fast_paths()
            self._protocol = None
            self._loop = None

    def __repr__(self) -> str:
        info = [self.__class__.__name__]
        bind = self._bind
        if bind is None or bind.closed:
            info.append("closed")
        elif self._closing:
            info.append("closing")
        info.append(f"fd={self._sock_fd}")
        if bind is not None:
            info.append(bind.backend)
            info.append(f"write_bufsize={bind.queued_bytes}")
        return f"<{' '.join(info)}>"

    def _drop_fast_paths(self) -> None:
        self._recv = None
        self._sbind = None

    # ---- protocol --------------------------------------------------------------

    def set_protocol(self, protocol: Any) -> None:
        self._protocol = protocol
        self._recv = None if self._closing else protocol.datagram_received
        self._protocol_connected = True



_fast.register_slots(DatagramTransport, "dgram")
