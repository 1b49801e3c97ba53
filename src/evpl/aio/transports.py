"""asyncio stream transports that are evpl Binds.

A ``StreamTransport`` is the ``evpl.Handler`` of one stream Bind (``tcp``,
``unix`` or their io_uring twins): the engine reads into pool memory and
calls ``on_data`` with a Buffer, which becomes the ``bytes`` asyncio promises
to ``Protocol.data_received`` (or is copied straight into the buffer a
``BufferedProtocol`` lends, with no intermediate ``bytes``); ``write`` queues
on the Bind's send queue (``bytes`` referenced, not copied) and the engine
flushes every dirty Bind once per loop iteration with one ``sendmsg``.
Backpressure uses the Bind's watermarks (``on_paused``/``on_writable`` become
``pause_writing``/``resume_writing``), read flow control its
``pause_reading``/``resume_reading``, ``write_eof`` its ``shutdown_write``.

The socket: the Bind owns the file descriptor (it closes it). The Python
socket object asyncio shows as ``get_extra_info("socket")`` shares the same
descriptor and is detached (not closed) once the Bind has closed it.
"""

from __future__ import annotations

import os
import socket
import warnings
from asyncio import constants, futures, protocols, sslproto, transports, trsock
from asyncio.log import logger
from typing import TYPE_CHECKING, Any

from evpl._native.bind import Bind, Limits
from evpl.aio import _fast
from evpl.core.handler import Handler

if TYPE_CHECKING:
    from evpl.aio.loop import EvplEventLoop

__all__ = ["StreamTransport"]

# asyncio's transports never refuse a write; the queue's hard limit is
# therefore out of reach, and flow control is the protocol's business
_NO_LIMIT = 1 << 62
_HIGH = 64 * 1024


def limits(high: int = _HIGH, low: int | None = None) -> Limits:
    """The Bind limits for asyncio's default watermarks."""
    return Limits(high, high // 4 if low is None else low, _NO_LIMIT, 65507, 0, 0)


def _water_marks(high: int | None, low: int | None) -> tuple[int, int]:
    """asyncio's rule for ``set_write_buffer_limits`` arguments."""
    if high is None:
        high = _HIGH if low is None else 4 * low
    if low is None:
        low = high // 4
    if not high >= low >= 0:
        raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
    return high, low


class _BindTransport:
    """What the stream and the datagram transports over an evpl Bind share
    (both keep ``_bind``, ``_sock``, ``_loop`` and ``_protocol``)."""

    __slots__ = ()
    _bind: Any
    _sock: Any
    _loop: Any
    _protocol: Any
    _closing: bool
    _conn_lost: int
    _paused: bool
    _reading: bool

    def _fatal_error(self, exc: BaseException,
                     message: str = "Fatal error on transport") -> None:
        if isinstance(exc, OSError):
            if self._loop.get_debug():
                logger.debug("%r: %s", self, message, exc_info=True)
        else:
            self._loop.call_exception_handler({
                "message": message, "exception": exc, "transport": self,
                "protocol": self._protocol})
        self._force_close(exc)

    def _notify(self, name: str, message: str, *args: Any) -> None:
        """Call the protocol's ``name`` callback as asyncio does: SystemExit
        and KeyboardInterrupt stop the loop (stashed, raised by
        run_forever), anything else (a missing method too) goes to the
        loop's exception handler with ``message``."""
        try:
            getattr(self._protocol, name)(*args)
        except (SystemExit, KeyboardInterrupt) as exc:
            self._loop._stash(exc)
        except BaseException as exc:
            self._loop.call_exception_handler({
                "message": message, "exception": exc, "transport": self,
                "protocol": self._protocol})

    def _release_socket(self) -> None:
        """The Bind closed the descriptor: the Python socket that shares it
        must not close it again (the number may be reused already)."""
        bind = self._bind
        if bind is not None:
            fd = bind.fileno()
            transports_ = self._loop._transports if self._loop is not None else None
            if transports_ is not None and transports_.get(fd) is self:
                del transports_[fd]
        sock = self._sock
        if sock is not None and (bind is None or bind.closed):
            sock.detach()

    def __del__(self, _warn: Any = warnings.warn) -> None:
        bind = getattr(self, "_bind", None)
        if bind is not None and not bind.closed:
            _warn(f"unclosed transport {self!r}", ResourceWarning, source=self)
            bind.close()
            self._release_socket()

    def get_protocol(self) -> Any:
        return self._protocol

    def _drop_fast_paths(self) -> None:
        """Forget the slots the compiled paths deliver and send through (a
        closing transport takes neither)."""
        raise NotImplementedError

    def _force_close(self, exc: BaseException | None) -> None:
        if self._conn_lost:
            return
        self._closing = True
        self._drop_fast_paths()
        self._conn_lost += 1
        bind = self._bind
        if bind is not None:
            bind.close()
            self._release_socket()
        self._loop.call_soon(self._call_connection_lost, exc)

    def abort(self) -> None:
        """Close now, dropping what was not sent yet."""
        self._force_close(None)

    is_closing = _fast.is_closing     # (compiled: protocols ask per write)

    def get_write_buffer_size(self) -> int:
        """Bytes queued and not yet handed to the kernel."""
        bind = self._bind
        return bind.queued_bytes if bind is not None else 0

    # ---- reading ------------------------------------------------------------

    def is_reading(self) -> bool:
        return not self._closing and not self._paused

    def pause_reading(self) -> None:
        """Deliver nothing more until resume_reading (what arrives meanwhile
        waits in the socket, or in the Bind if already read)."""
        if self._closing or self._paused:
            return
        self._paused = True
        if self._bind is not None:
            self._bind.pause_reading()
        if self._loop.get_debug():
            logger.debug("%r pauses reading", self)

    def resume_reading(self) -> None:
        """Deliver again, from the next loop iteration (like asyncio, never
        from inside this call)."""
        if self._closing or not self._paused:
            return
        self._paused = False
        if self._reading:
            self._loop.call_soon(self._resume)
        if self._loop.get_debug():
            logger.debug("%r resumes reading", self)

    def _start_reading(self) -> None:
        """Reading starts (a loop turn after connection_made), unless paused."""
        bind = self._bind
        if bind is None or self._closing:
            return
        self._reading = True
        if not self._paused:
            bind.resume_reading()


class StreamTransport(_BindTransport, Handler, transports._FlowControlMixin):
    """``asyncio.Transport`` over one evpl stream Bind (see the module doc).

    Made in two ways: by the loop for a connected socket it adopts
    (``create_connection``, ``connect_accepted_socket``), with the protocol
    known; or per accepted connection by a listener, with a protocol factory
    called once the connection is there.
    """

    # loop.sendfile: os.sendfile from the Bind's socket once its queue has
    # drained (see _sendfile); asyncio's fallback where that cannot be
    _sendfile_compatible = constants._SendfileMode.TRY_NATIVE
    _start_tls_compatible = True

    # the fields the per-read and per-write paths read are slots (a member
    # descriptor, not a dict look-up); the rest live in the instance dict
    __slots__ = ("_bind", "_buffered", "_closing", "_conn_lost", "_eof", "_protocol", "_recv",
                 "_wbind")

    def __init__(self, loop: EvplEventLoop, protocol: Any = None, *, sock: Any = None,
                 waiter: Any = None, extra: dict[str, Any] | None = None, server: Any = None,
                 protocol_factory: Any = None, sslcontext: Any = None,
                 ssl_handshake_timeout: float | None = None,
                 ssl_shutdown_timeout: float | None = None, family: int = socket.AF_INET) -> None:
        transports._FlowControlMixin.__init__(self, extra, loop)
        self._bind: Bind | None = None
        self._recv: Any = None          # protocol.data_received while bytes go straight to it
        self._wbind: Bind | None = None  # the Bind while writes go straight to it
        self._sock = sock
        self._family = family
        self._waiter = waiter
        self._server = server
        self._protocol: Any = None
        self._buffered = False
        self._protocol_connected = False
        self._protocol_paused = False
        self._high = _HIGH
        self._low = _HIGH // 4
        self._closing = False
        self._conn_lost = 0
        self._eof = 0                  # 1: write_eof() was called; 2: a sendfile runs
        self._drain_waiter: Any = None  # a sendfile waits for the queue to drain
        self._paused = False
        self._reading = False          # reading started (after connection_made)
        self._pending: Any = None      # part of a read a BufferedProtocol did not take yet
        self._factory = protocol_factory
        self._sslcontext = sslcontext
        self._ssl_timeouts = (ssl_handshake_timeout, ssl_shutdown_timeout)
        if protocol is not None:
            self.set_protocol(protocol)
        if server is not None:
            server._attach()

    # ---- engine callbacks (evpl.Handler) -----------------------------------

    def on_connected(self, bind: Bind) -> None:
        """The Bind is open: hold reading until ``connection_made`` ran, then
        let asyncio's start-up order play out (connection_made, reading, the
        waiter)."""
        loop = self._loop
        self._bind = bind
        if not self._eof:
            self._wbind = bind
        bind.pause_reading()
        extra = self._extra
        # as asyncio's transports: known from the start, still there after close
        if "sockname" not in extra:
            extra["sockname"] = bind.local_address
        if "peername" not in extra:
            extra["peername"] = bind.peer_address
        try:
            loop._transports[bind.fileno()] = self
            if self._factory is not None:
                self._accepted()
            if self._protocol is None:
                return
            loop.call_soon(self._protocol.connection_made, self)
            loop.call_soon(self._start_reading)
            if self._waiter is not None:
                loop.call_soon(futures._set_result_unless_cancelled, self._waiter, None)
        except (SystemExit, KeyboardInterrupt) as exc:
            loop._stash(exc)
        except BaseException as exc:
            self._fatal_error(exc, "Fatal error on transport creation")

    def _accepted(self) -> None:
        """A listener's connection: make the protocol (and the TLS layer)."""
        loop = self._loop
        factory, self._factory = self._factory, None
        try:
            protocol = factory()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            if loop.get_debug():
                loop.call_exception_handler({
                    "message": "Error on transport creation for incoming connection",
                    "exception": exc})
            self._server_detach()
            self._force_close(None)
            return
        if self._sslcontext is None:
            self.set_protocol(protocol)
            return
        waiter = loop.create_future()
        hs, sd = self._ssl_timeouts
        ssl_protocol = sslproto.SSLProtocol(loop, protocol, self._sslcontext, waiter,
                                            server_side=True, ssl_handshake_timeout=hs,
                                            ssl_shutdown_timeout=sd)
        self.set_protocol(ssl_protocol)
        waiter.add_done_callback(self._ssl_accept_done)

    def _ssl_accept_done(self, waiter: Any) -> None:
        if waiter.cancelled():
            return
        exc = waiter.exception()
        if exc is not None:
            self.close()
            if self._loop is not None and self._loop.get_debug():
                self._loop.call_exception_handler({
                    "message": "Error on transport creation for incoming connection",
                    "exception": exc})

    # a read and a write: compiled (evpl.aio._fast), no interpreter frame
    on_data = _fast.on_data
    write = _fast.write

    def _feed_buffered(self, data: Any) -> None:
        """Copy received bytes into the buffers a BufferedProtocol lends; what
        it does not take before pausing is kept for ``resume_reading``."""
        view = memoryview(data)
        size = len(view)
        off = 0
        protocol = self._protocol
        while off < size:
            if self._paused or self._closing:
                self._pending = view[off:]
                return
            buf = protocol.get_buffer(size - off)
            dst = memoryview(buf).cast("B")
            room = len(dst)
            if not room:
                raise RuntimeError("get_buffer() returned an empty buffer")
            n = min(room, size - off)
            dst[:n] = view[off:off + n]
            del dst, buf
            off += n
            protocol.buffer_updated(n)

    def on_eof(self, bind: Bind) -> None:
        if self._closing:
            return
        try:
            keep_open = self._protocol.eof_received()
        except (SystemExit, KeyboardInterrupt) as exc:
            self._loop._stash(exc)
            return
        except BaseException as exc:
            self._fatal_error(exc, "Fatal error: protocol.eof_received() call failed.")
            return
        if not keep_open:
            self.close()

    def on_paused(self, bind: Bind) -> None:
        if self._protocol_paused or bind.queued_bytes <= self._high:
            return      # (closing: the Bind's marks are 0, see close())
        self._protocol_paused = True
        self._notify("pause_writing", "protocol.pause_writing() failed")

    def on_writable(self, bind: Bind) -> None:
        waiter = self._drain_waiter
        if waiter is not None and bind.queued_bytes == 0:
            self._drain_waiter = None
            if not self._closing:
                bind.set_write_limits(self._high, self._low, _NO_LIMIT)
            if not waiter.done():
                waiter.set_result(None)
        if self._protocol_paused and bind.queued_bytes <= self._low:
            self._protocol_paused = False
            self._notify("resume_writing", "protocol.resume_writing() failed")
        if self._closing and not self._conn_lost and bind.queued_bytes == 0:
            self._finish()

    def on_closed(self, bind: Bind, error: Any) -> None:
        loop = self._loop
        self._release_socket()
        if loop is None or loop.is_closed():
            self._bind = None
            self._closing = True
            self._recv = None
            return
        if self._conn_lost:
            return
        if error is not None and not isinstance(error, OSError):
            exc: BaseException | None = ConnectionError(str(error))
        else:
            exc = error
        if exc is not None and not self._closing and loop.get_debug():
            logger.debug("%r: %s", self, exc, exc_info=True)
        self._closing = True
        self._recv = None
        self._conn_lost += 1
        loop.call_soon(self._call_connection_lost, exc)

    # ---- life cycle -----------------------------------------------------------

    def _server_detach(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server._detach()

    def _call_connection_lost(self, exc: BaseException | None) -> None:
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionError("Connection is closed by peer"))
        try:
            if self._protocol_connected:
                self._protocol.connection_lost(exc)
        finally:
            self._release_socket()
            self._bind = None
            self._wbind = None
            self._recv = None
            self._protocol = None
            self._loop = None
            self._pending = None
            self._server_detach()

    def close(self) -> None:
        """Close once everything written has been sent (what is written
        meanwhile is sent too, as asyncio does); ``connection_lost`` follows.
        No more data is delivered."""
        if self._closing:
            return
        self._closing = True
        self._recv = None
        bind = self._bind
        if bind is None:
            self._conn_lost += 1
            self._loop.call_soon(self._call_connection_lost, None)
            return
        bind.pause_reading()
        if bind.queued_bytes == 0:
            self._finish()
        else:
            # on_writable fires when the queue is empty: close then
            bind.set_write_limits(0, 0, _NO_LIMIT)

    def _finish(self) -> None:
        """Closing, nothing left to send: close the Bind (after sends still
        in flight, if any); connection_lost comes next (as asyncio's, before
        a task that yields once runs again)."""
        bind = self._bind
        assert bind is not None
        bind.finish()
        if bind.closed:
            self._release_socket()
            self._conn_lost += 1
            self._loop.call_soon(self._call_connection_lost, None)

    def __repr__(self) -> str:
        info = [self.__class__.__name__]
        bind = self._bind
        if bind is None or bind.closed:
            info.append("closed")
        elif self._closing:
            info.append("closing")
        if bind is not None:
            info.append(f"fd={bind.fileno()}")
            info.append(bind.backend)
            info.append(f"write_bufsize={bind.queued_bytes}")
        return f"<{' '.join(info)}>"

    def _drop_fast_paths(self) -> None:
        self._recv = None

    # ---- protocol -----------------------------------------------------------

    def set_protocol(self, protocol: Any) -> None:
        # The paused state stays with the transport (asyncio's sendfile
        # fallback takes it over and waits for resume_writing). But the TLS
        # layer start_tls puts in was never paused, and asserts so: where
        # asyncio's transports have sent the bytes already, ours may still
        # hold them.
        if isinstance(protocol, sslproto.SSLProtocol):
            self._protocol_paused = False
        self._protocol = protocol
        self._buffered = isinstance(protocol, protocols.BufferedProtocol)
        self._recv = None if self._buffered or self._closing else protocol.data_received
        self._protocol_connected = True

    # ---- reading ------------------------------------------------------------

    def _resume(self) -> None:
        if self._paused or self._closing or self._bind is None:
            return
        pending, self._pending = self._pending, None
        if pending is not None:
            try:
                self._feed_buffered(pending)
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._fatal_error(exc, "Fatal error: protocol.buffer_updated() call failed.")
                return
            if self._paused or self._closing:
                return
        self._bind.resume_reading()

    # ---- writing -------------------------------------------------------------

    def _write_refused(self, call: str = "write") -> str:
        """Why ``write``/``writelines`` raise now (as asyncio words it)."""
        if self._eof == 2:
            return f"unable to {call}; sendfile is in progress"
        return f"Cannot call {call}() after write_eof()"

    def writelines(self, list_of_data: Any) -> None:
        if self._eof:
            raise RuntimeError(self._write_refused("writelines"))
        bind = self._bind
        if self._conn_lost or bind is None or bind.closed:
            self._conn_lost += 1
            return
        bind.sendv(list_of_data)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        """Shut the sending side down once everything written is sent; the
        peer sees EOF, reading goes on."""
        if self._eof == 2:
            raise RuntimeError("unable to write_eof; sendfile is in progress")
        if self._closing or self._eof:
            return
        self._eof = 1
        self._wbind = None
        if self._bind is not None and not self._bind.closed:
            self._bind.shutdown_write()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (self._low, self._high)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high, self._low = _water_marks(high, low)
        if self._bind is not None and not self._bind.closed and not self._closing:
            self._bind.set_write_limits(self._high, self._low, _NO_LIMIT)

    # ---- sendfile -----------------------------------------------------------------

    async def _sendfile(self, file: Any, offset: int, count: int | None) -> int:
        """``loop.sendfile`` on this transport: wait until the engine has
        sent everything queued (the Bind's queue drained), then
        ``os.sendfile`` from the socket (waiting on an fd watch while it is
        full). ``write`` raises meanwhile, as asyncio's does; reading goes
        on. ``SendfileNotAvailableError`` (not a regular file, a socket
        sendfile refuses) lets asyncio fall back to reading and writing."""
        loop = self._loop
        bind = self._bind
        if bind is None or bind.closed or self._closing:
            raise RuntimeError("Transport is closing")
        if self._eof == 2:
            raise RuntimeError("sendfile is in progress")
        # a second descriptor for the same socket: the engine watches it for
        # writability while the Bind keeps its own registration
        sock = socket.socket(self._family, socket.SOCK_STREAM, 0, os.dup(bind.fileno()))
        eof, self._eof = self._eof, 2
        self._wbind = None
        try:
            loop._check_sendfile_params(sock, file, offset, count)
            if bind.queued_bytes:
                self._drain_waiter = loop.create_future()
                bind.set_write_limits(0, 0, _NO_LIMIT)      # on_writable once empty
                await self._drain_waiter
            return await loop._sock_sendfile_native(sock, file, offset, count)
        finally:
            self._drain_waiter = None
            if self._eof == 2:
                self._eof = eof
                if not eof and self._bind is bind and not bind.closed:
                    self._wbind = bind
            sock.close()

    # ---- extra info -------------------------------------------------------------

    def _socket(self) -> Any:
        """The Python socket over the Bind's descriptor (made when first
        asked for: most programs never do)."""
        if self._sock is None:
            bind = self._bind
            if bind is None or bind.closed:
                return None
            self._sock = socket.socket(self._family, socket.SOCK_STREAM, 0, bind.fileno())
        return self._sock

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        extra = self._extra
        if name in extra:
            return extra[name]
        if name not in ("socket", "sockname", "peername"):
            return default
        sock = self._socket()
        if sock is None:
            return default
        if name == "socket":
            value: Any = trsock.TransportSocket(sock)
        else:
            try:
                value = sock.getsockname() if name == "sockname" else sock.getpeername()
            except OSError:
                value = None
        extra[name] = value
        return value


_fast.register_slots(StreamTransport, "stream")
