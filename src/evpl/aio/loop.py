"""``EvplEventLoop``: an asyncio event loop on evpl's engine.

It is an ``asyncio.BaseEventLoop`` (as uvloop's loop is an
``AbstractEventLoop`` with asyncio's own semantics): tasks, futures,
``run_until_complete``, the default executor, ``getaddrinfo``, the
happy-eyeballs ``create_connection``, ``create_server``'s socket set-up,
``start_tls``, ``sendfile``'s fallback and the subprocess protocol are
asyncio's code. Underneath, everything that waits or moves bytes is the
engine's:

- one loop iteration is one ``LoopCore.run_once``: the engine waits in
  epoll (or spins, in hybrid mode), dispatches I/O, fires timers, flushes
  every Bind's send queue; then the callbacks that became ready run, in
  asyncio's order;
- ``call_later``/``call_at`` are engine timers (microsecond precision);
- ``call_soon_threadsafe`` rings a Doorbell;
- ``add_reader``/``add_writer`` (and ``sock_*``, pipes, unix datagram
  sockets, child processes through a pidfd) are engine fd watches;
- stream connections (tcp and unix, both directions) are evpl Binds, served
  by evpl Listeners: see ``evpl.aio.transports``;
- UDP endpoints (``create_datagram_endpoint``) are evpl datagram Binds: see
  ``evpl.aio.datagram``.
"""

from __future__ import annotations

import errno
import functools
import io
import os
import selectors
import signal
import socket
import stat
import sys
import threading
import weakref
from asyncio import (
    base_events,
    coroutines,
    events,
    exceptions,
    selector_events,
    sslproto,
    tasks,
    unix_events,
)
from asyncio.log import logger
from typing import Any

from evpl._native.loop import Deferral
from evpl.aio import _fast, datagram
from evpl.aio.transports import StreamTransport, limits
from evpl.core import backends as _backends
from evpl.core.loop import Loop
from evpl.errors import ConfigError

__all__ = ["AttachedEventLoop", "EvplEventLoop"]

_BACKENDS = {
    "epoll": {socket.AF_INET: "tcp", socket.AF_INET6: "tcp", socket.AF_UNIX: "unix"},
    "io_uring": {socket.AF_INET: "io_uring_tcp", socket.AF_INET6: "io_uring_tcp",
                 socket.AF_UNIX: "io_uring_unix"},
}


def _fileno(fileobj: Any) -> int:
    """A file descriptor from an int or an object with ``fileno()``."""
    if isinstance(fileobj, int):
        fd = fileobj
    else:
        try:
            fd = int(fileobj.fileno())
        except (AttributeError, TypeError, ValueError):
            raise ValueError(f"Invalid file object: {fileobj!r}") from None
    if fd < 0:
        raise ValueError(f"Invalid file descriptor: {fd}")
    return fd


def _noop() -> None:
    pass


class _FdEntry:
    """The reader and writer handles of one watched descriptor and its
    engine watch (level-triggered, like asyncio's selectors)."""

    __slots__ = ("fd", "loop", "reader", "watch", "writer")

    def __init__(self, loop: EvplEventLoop, fd: int) -> None:
        self.loop = loop
        self.fd = fd
        self.reader: events.Handle | None = None
        self.writer: events.Handle | None = None
        self.watch: Any = None

    def readable(self) -> None:
        handle = self.reader
        if handle is not None:
            if handle._cancelled:
                self.loop._remove_reader(self.fd)
            else:
                self.loop._run_inline(handle)

    def writable(self) -> None:
        handle = self.writer
        if handle is not None:
            if handle._cancelled:
                self.loop._remove_writer(self.fd)
            else:
                self.loop._run_inline(handle)

    def update(self) -> None:
        """Bring the engine watch in line with the handles."""
        on_r = self.readable if self.reader is not None else None
        on_w = self.writable if self.writer is not None else None
        core = self.loop._core
        if on_r is None and on_w is None:
            if self.watch is not None:
                self.watch.cancel()
                self.watch = None
            return
        if self.watch is not None:
            try:
                self.watch.modify(on_r, on_w)
                return
            except OSError:
                # the descriptor was closed (and maybe reused) behind our back
                self.watch.cancel()
                self.watch = None
        self.watch = core.watch_fd(self.fd, on_r, on_w)

    @property
    def mask(self) -> int:
        return ((selectors.EVENT_READ if self.reader is not None else 0)
                | (selectors.EVENT_WRITE if self.writer is not None else 0))


class _WatchSelector:
    """What asyncio's stdlib transports (pipes, datagram sockets) look up in
    ``loop._selector`` for their repr: the watched descriptors."""

    def __init__(self, watches: dict[int, _FdEntry]) -> None:
        self._watches = watches

    def get_key(self, fileobj: Any) -> selectors.SelectorKey:
        fd = _fileno(fileobj)
        ent = self._watches.get(fd)
        if ent is None or not ent.mask:
            raise KeyError(f"{fileobj!r} is not registered")
        return selectors.SelectorKey(fileobj, fd, ent.mask, (ent.reader, ent.writer))

    def get_map(self) -> dict[int, selectors.SelectorKey]:
        return {fd: self.get_key(fd) for fd, ent in self._watches.items() if ent.mask}


class EvplEventLoop(base_events.BaseEventLoop):
    """An asyncio event loop on evpl's engine.

    ``backend``: ``"epoll"`` (default) or ``"io_uring"``, the evpl backend of
    the stream connections this loop makes and accepts. ``poll_mode``
    (``"hybrid"``, ``"event"``, ``"always"``) and ``spin_ns`` are
    ``evpl.Loop``'s: in hybrid mode the loop keeps polling for ``spin_ns``
    after the last activity before it sleeps. ``pool``: the evpl buffer
    pool (default: the process-wide one).

    ``core``: an existing evpl ``Loop`` to run on instead of a new one (then
    ``poll_mode``, ``spin_ns`` and ``pool`` are that Loop's own). See
    :func:`evpl.aio.attach` for an asyncio loop that whoever runs an evpl
    Loop runs too.
    """

    # read per iteration or per call_soon by the compiled paths: slots, not
    # dict look-ups
    __slots__ = ("_closed", "_debug", "_ready", "_ready_append", "_stashed", "_stopping",
                 "_task_factory")

    def __init__(self, *, backend: str = "epoll", poll_mode: str = "hybrid",
                 spin_ns: int = 50_000, pool: Any = None, core: Loop | None = None) -> None:
        self._closed = True             # until set up (BaseEventLoop.__del__ looks)
        if backend not in _BACKENDS:
            raise ConfigError(f"backend must be 'epoll' or 'io_uring', got {backend!r}")
        names = _BACKENDS[backend]
        for name in set(names.values()):
            _backends.get(name, "stream")      # unavailable here: say so now
        _backends.get("io_uring_udp" if backend == "io_uring" else "udp", "datagram")
        self._owns_core = core is None
        if core is None:
            core = Loop(spin_ns=spin_ns, poll_mode=poll_mode, pool=pool)  # type: ignore[arg-type]
        self._core = core
        self._backend = backend
        super().__init__()
        self._ready_append = self._ready.append     # (call_soon's, without a look-up)
        self._stream_backends = names
        self._datagram_backend = "io_uring_udp" if backend == "io_uring" else "udp"
        self._watches: dict[int, _FdEntry] = {}
        self._selector = _WatchSelector(self._watches)
        self._transports: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
        self._listeners: dict[int, tuple[Any, socket.socket]] = {}
        self._doorbell = core.doorbell(_noop)
        self._signal_handlers: dict[int, events.Handle] = {}
        self._sig_pipe: tuple[int, int] | None = None
        self._stashed: BaseException | None = None
        self._driving = False           # run_forever entered the evpl Loop

    # ---- engine ---------------------------------------------------------------

    @property
    def core(self) -> Loop:
        """The evpl ``Loop`` underneath (its ``stats()``, its pool)."""
        return self._core

    def _stash(self, exc: BaseException) -> None:
        """SystemExit/KeyboardInterrupt from a callback the engine made: it
        is raised from ``run_forever`` once the engine's iteration is over."""
        if self._stashed is None:
            self._stashed = exc
        if self._driving:
            self._stopping = True   # run_iterations leaves after this iteration, raising it

    def run_forever(self) -> None:
        """asyncio's ``run_forever``, with the evpl Loop entered once for
        the whole run (each iteration is then one ``iterate``)."""
        core = self._core
        if self._closed or self.is_running():
            super().run_forever()           # (asyncio's error)
            return
        token = core.enter()
        self._driving = True
        try:
            if "_run_once" in self.__dict__ or type(self)._run_once is not _fast.run_once:
                super().run_forever()       # a replaced _run_once: asyncio's own loop
            else:
                self._run_forever_compiled()
        finally:
            self._driving = False
            core.leave(token)

    def _run_forever_compiled(self) -> None:
        """asyncio's ``run_forever`` (the same set-up and clean-up: running
        loop, thread id, async generator hooks, coroutine origin tracking)
        around ``_fast.run_iterations``, which repeats ``_run_once`` in C."""
        if hasattr(base_events.BaseEventLoop, "_run_forever_setup"):     # 3.12+
            self._run_forever_setup()
            try:
                _fast.run_iterations(self)
            finally:
                self._run_forever_cleanup()
            return
        self._check_closed()
        self._check_running()
        self._set_coroutine_origin_tracking(self._debug)
        old_agen_hooks = sys.get_asyncgen_hooks()
        try:
            self._thread_id = threading.get_ident()
            sys.set_asyncgen_hooks(firstiter=self._asyncgen_firstiter_hook,
                                   finalizer=self._asyncgen_finalizer_hook)
            events._set_running_loop(self)
            _fast.run_iterations(self)
        finally:
            self._stopping = False
            self._thread_id = None
            events._set_running_loop(None)
            self._set_coroutine_origin_tracking(False)
            sys.set_asyncgen_hooks(*old_agen_hooks)

    # one iteration, in asyncio's order: the callbacks that were ready run
    # first; then the engine polls (without waiting if callbacks are ready
    # now, else until an event, a doorbell or the next timer), dispatches
    # I/O to the transports and fd watches, fires the timers that are due
    # and flushes every Bind's send queue. What those callbacks schedule
    # runs in the next iteration (after that poll, as in asyncio, where the
    # poll of iteration k+1 comes before them). Compiled: evpl.aio._fast.
    _run_once = _fast.run_once
    # what C futures and tasks, and protocols, call per request: compiled
    # (call_soon too: a C method, set below the class)
    # (asyncio's are Python methods, a frame each)
    get_debug = _fast.get_debug
    time = _fast.loop_time
    create_future = _fast.create_future
    create_task = _fast.create_task

    def _raise_stashed(self) -> None:
        if self._stashed is not None:
            exc, self._stashed = self._stashed, None
            raise exc

    def _run_debug(self, handle: events.Handle) -> None:
        """Run ``handle``, warning if it takes longer than
        ``slow_callback_duration`` (debug mode)."""
        try:
            self._current_handle = handle
            t0 = self.time()
            handle._run()
            dt = self.time() - t0
            if dt >= self.slow_callback_duration:
                base_events.logger.warning("Executing %s took %.3f seconds",
                               base_events._format_handle(handle), dt)
        finally:
            self._current_handle = None

    def _run_inline(self, handle: events.Handle) -> None:
        """Run a timer or fd-watch callback where the engine dispatches it
        (asyncio's order: I/O, then timers, within one iteration).
        SystemExit/KeyboardInterrupt leave run_forever after the engine's
        iteration."""
        try:
            if self._debug:
                self._run_debug(handle)
            else:
                handle._run()
        except BaseException as exc:
            self._stash(exc)

    def _write_to_self(self) -> None:
        self._doorbell.ring()

    def _process_events(self, event_list: Any) -> None:
        """Not used: the engine dispatches events itself."""

    def _call_soon_slow(self, callback: Any, args: tuple[Any, ...],
                        context: Any) -> events.Handle:
        """call_soon through asyncio's own Handle (debug mode: its checks and
        the source traceback)."""
        if self._debug:
            self._check_thread()
            self._check_callback(callback, "call_soon")
        handle = events.Handle(callback, args, self, context)
        if handle._source_traceback:
            del handle._source_traceback[-1]        # this frame: the caller's is last
        self._ready.append(handle)
        return handle

    def call_later(self, delay: float, callback: Any, *args: Any,
                   context: Any = None) -> events.TimerHandle:
        """Run ``callback(*args)`` after ``delay`` seconds, on an engine timer."""
        if delay is None:
            raise TypeError("delay must not be None")
        return _fast.timer(self, self.time() + delay, delay, callback, args, context)

    def call_at(self, when: float, callback: Any, *args: Any,
                context: Any = None) -> events.TimerHandle:
        """Run ``callback(*args)`` at loop time ``when``, on an engine timer."""
        if when is None:
            raise TypeError("when cannot be None")
        return _fast.timer(self, when, when - self.time(), callback, args, context)

    def _timer_slow(self, when: float, delay: float, callback: Any, args: tuple[Any, ...],
                    context: Any) -> events.TimerHandle:
        """A timer made by asyncio's own TimerHandle ``__init__`` (debug mode:
        the source traceback; the engine calls it through ``_run_inline``,
        which times it)."""
        if self._debug:
            self._check_thread()
            self._check_callback(callback, "call_at")
        timer = _fast.TimerHandle(when, callback, args, self, context)
        if timer._source_traceback:
            del timer._source_traceback[-2:]        # _timer_slow, call_later/call_at
        timer._scheduled = True
        if self._debug:
            timer._evtimer = self._core.call_at(when, self._run_inline, timer)
        else:
            timer._evtimer = self._core.call_at(when, timer)
        return timer

    def _timer_handle_cancelled(self, handle: Any) -> None:
        evtimer = handle._evtimer
        if evtimer.active:
            evtimer.cancel()

    def close(self) -> None:
        """Close the loop: signal handlers, the default executor, and every
        Bind, listener and watch the engine still holds."""
        if self.is_running():
            raise RuntimeError("Cannot close a running event loop")
        if self.is_closed():
            return
        for sig in list(self._signal_handlers):
            self.remove_signal_handler(sig)
        super().close()
        listeners = list(self._listeners.values())
        self._listeners.clear()
        for listener, sock in listeners:
            listener.close()
            sock.detach()
        for ent in self._watches.values():
            ent.reader = ent.writer = None
        self._watches.clear()
        self._selector = None       # as asyncio's: stdlib transports' repr looks
        self._doorbell.close()
        if self._owns_core:
            self._core.close()
        if self._sig_pipe is not None:
            for fd in self._sig_pipe:
                os.close(fd)
            self._sig_pipe = None

    # ---- fd watches -------------------------------------------------------------

    def _entry(self, fd: int) -> _FdEntry:
        ent = self._watches.get(fd)
        if ent is None:
            ent = self._watches[fd] = _FdEntry(self, fd)
        return ent

    def _add_watch(self, side: str, fd: Any, callback: Any, args: Any) -> events.Handle:
        """Watch ``fd`` for ``side`` ("reader" or "writer"), replacing (and
        cancelling) the handle that side had."""
        self._check_closed()
        fd = _fileno(fd)
        handle = events.Handle(callback, args, self, None)
        ent = self._entry(fd)
        old = getattr(ent, side)
        setattr(ent, side, handle)
        try:
            ent.update()
        except BaseException:
            setattr(ent, side, old)
            if not ent.mask:
                del self._watches[fd]
            raise
        if old is not None:
            old.cancel()
        return handle

    def _remove_watch(self, side: str, fd: Any) -> bool:
        if self.is_closed():
            return False
        fd = _fileno(fd)
        ent = self._watches.get(fd)
        if ent is None or getattr(ent, side) is None:
            return False
        getattr(ent, side).cancel()
        setattr(ent, side, None)
        ent.update()
        if not ent.mask:
            del self._watches[fd]
        return True

    def _add_reader(self, fd: Any, callback: Any, *args: Any) -> events.Handle:
        return self._add_watch("reader", fd, callback, args)

    def _remove_reader(self, fd: Any) -> bool:
        return self._remove_watch("reader", fd)

    def _add_writer(self, fd: Any, callback: Any, *args: Any) -> events.Handle:
        return self._add_watch("writer", fd, callback, args)

    def _remove_writer(self, fd: Any) -> bool:
        return self._remove_watch("writer", fd)

    def _ensure_fd_no_transport(self, fd: Any) -> None:
        fileno = _fileno(fd)
        transport = self._transports.get(fileno)
        if transport is not None and not transport.is_closing():
            raise RuntimeError(f"File descriptor {fd!r} is used by transport {transport!r}")

    def add_reader(self, fd: Any, callback: Any, *args: Any) -> None:
        """Call ``callback(*args)`` while ``fd`` is readable (an engine fd watch)."""
        self._ensure_fd_no_transport(fd)
        self._add_reader(fd, callback, *args)

    def remove_reader(self, fd: Any) -> bool:
        self._ensure_fd_no_transport(fd)
        return self._remove_reader(fd)

    def add_writer(self, fd: Any, callback: Any, *args: Any) -> None:
        """Call ``callback(*args)`` while ``fd`` is writable (an engine fd watch)."""
        self._ensure_fd_no_transport(fd)
        self._add_writer(fd, callback, *args)

    def remove_writer(self, fd: Any) -> bool:
        self._ensure_fd_no_transport(fd)
        return self._remove_writer(fd)

    # ---- sock_* ------------------------------------------------------------------

    @staticmethod
    def _check_sock(sock: Any, debug: bool) -> None:
        base_events._check_ssl_socket(sock)
        if debug and sock.gettimeout() != 0:
            raise ValueError("the socket must be non-blocking")

    async def _sock_wait(self, sock: Any, writing: bool, fn: Any) -> Any:
        """Run ``fn()`` once the socket is ready (it raised BlockingIOError
        on the first try, made by the caller); ``fn`` looks the socket's
        method up each time, as asyncio's loops do."""
        fut = self.create_future()
        fd = sock.fileno()
        self._ensure_fd_no_transport(fd)

        def ready() -> None:
            if fut.done():
                return
            try:
                result = fn()
            except (BlockingIOError, InterruptedError):
                return
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                fut.set_exception(exc)
            else:
                fut.set_result(result)

        add, remove = ((self._add_writer, self._remove_writer) if writing
                       else (self._add_reader, self._remove_reader))
        handle = add(fd, ready)

        def done(_: Any) -> None:
            ent = self._watches.get(fd)
            if ent is not None and (ent.writer if writing else ent.reader) is handle:
                remove(fd)

        fut.add_done_callback(done)
        try:
            return await fut
        finally:
            fut = None  # type: ignore[assignment]  # no cycle through the traceback

    async def sock_recv(self, sock: Any, n: int) -> bytes:
        self._check_sock(sock, self._debug)
        try:
            return sock.recv(n)
        except (BlockingIOError, InterruptedError):
            pass
        return await self._sock_wait(sock, False, lambda: sock.recv(n))

    async def sock_recv_into(self, sock: Any, buf: Any) -> int:
        self._check_sock(sock, self._debug)
        try:
            return sock.recv_into(buf)
        except (BlockingIOError, InterruptedError):
            pass
        return await self._sock_wait(sock, False, lambda: sock.recv_into(buf))

    async def sock_recvfrom(self, sock: Any, bufsize: int) -> tuple[bytes, Any]:
        self._check_sock(sock, self._debug)
        try:
            return sock.recvfrom(bufsize)
        except (BlockingIOError, InterruptedError):
            pass
        return await self._sock_wait(sock, False, lambda: sock.recvfrom(bufsize))

    async def sock_recvfrom_into(self, sock: Any, buf: Any, nbytes: int = 0) -> tuple[int, Any]:
        self._check_sock(sock, self._debug)
        if not nbytes:
            nbytes = len(buf)
        try:
            return sock.recvfrom_into(buf, nbytes)
        except (BlockingIOError, InterruptedError):
            pass
        return await self._sock_wait(sock, False, lambda: sock.recvfrom_into(buf, nbytes))

    async def sock_sendto(self, sock: Any, data: Any, address: Any) -> int:
        self._check_sock(sock, self._debug)
        try:
            return sock.sendto(data, address)
        except (BlockingIOError, InterruptedError):
            pass
        return await self._sock_wait(sock, True, lambda: sock.sendto(data, 0, address))

    async def sock_sendall(self, sock: Any, data: Any) -> None:
        self._check_sock(sock, self._debug)
        try:
            n = sock.send(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        view = memoryview(data).cast("B")
        if n == len(view):
            return
        pos = [n]

        def send_more() -> int | None:
            start = pos[0]
            sent = sock.send(view[start:])
            pos[0] = start + sent
            if pos[0] < len(view):
                raise BlockingIOError
            return None

        await self._sock_wait(sock, True, send_more)

    async def sock_connect(self, sock: Any, address: Any) -> None:
        self._check_sock(sock, self._debug)
        if sock.family == socket.AF_INET or (base_events._HAS_IPv6
                                             and sock.family == socket.AF_INET6):
            resolved = await self._ensure_resolved(address, family=sock.family, type=sock.type,
                                                   proto=sock.proto, loop=self)
            _, _, _, _, address = resolved[0]
        try:
            sock.connect(address)
            return
        except (BlockingIOError, InterruptedError):
            pass

        def finished() -> None:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err != 0:
                raise OSError(err, f"Connect call failed {address}")

        await self._sock_wait(sock, True, finished)

    async def sock_accept(self, sock: Any) -> tuple[socket.socket, Any]:
        self._check_sock(sock, self._debug)

        def accept() -> tuple[socket.socket, Any]:
            conn, address = sock.accept()
            conn.setblocking(False)
            return conn, address

        try:
            return accept()
        except (BlockingIOError, InterruptedError):
            pass
        return await self._sock_wait(sock, False, accept)

    async def _sock_sendfile_native(self, sock: Any, file: Any, offset: int,
                                    count: int | None) -> int:
        """``sock_sendfile`` with ``os.sendfile`` (no copy through Python),
        waiting on an fd watch while the socket is full."""
        try:
            fileno = file.fileno()
        except (AttributeError, io.UnsupportedOperation):
            raise exceptions.SendfileNotAvailableError("not a regular file") from None
        try:
            fsize = os.fstat(fileno).st_size
        except OSError:
            raise exceptions.SendfileNotAvailableError("not a regular file") from None
        blocksize = count if count else fsize
        if not blocksize:
            return 0
        total = 0

        def send_some() -> int | None:
            nonlocal total
            while True:
                want = blocksize - total if count else blocksize
                if count and want <= 0:
                    return total
                try:
                    n = os.sendfile(sock.fileno(), fileno, offset + total, want)
                except (BlockingIOError, InterruptedError):
                    raise
                except OSError as exc:
                    if total == 0 and exc.errno in (errno.ENOTSOCK, errno.EINVAL,
                                                    errno.ENOTSUP, errno.EOPNOTSUPP):
                        raise exceptions.SendfileNotAvailableError(
                            "os.sendfile call failed") from exc
                    raise
                if n == 0:
                    return total        # end of file
                total += n

        try:
            try:
                return send_some()      # type: ignore[return-value]
            except (BlockingIOError, InterruptedError):
                pass
            return await self._sock_wait(sock, True, send_some)
        finally:
            if total > 0:
                os.lseek(fileno, offset + total, os.SEEK_SET)

    async def _sendfile_native(self, transp: Any, file: Any, offset: int,
                               count: int | None) -> int:
        """``loop.sendfile`` without copying through Python: ``os.sendfile``
        from an evpl stream transport's socket once its queue has drained
        (see ``StreamTransport._sendfile``). Other transports:
        ``SendfileNotAvailableError``, so asyncio falls back to reading and
        writing (or raises, with ``fallback=False``)."""
        if not isinstance(transp, StreamTransport):
            raise exceptions.SendfileNotAvailableError(
                f"native sendfile is not available for {transp!r}")
        return await transp._sendfile(file, offset, count)

    # ---- transports ------------------------------------------------------------------

    def _stream_module(self, family: int) -> tuple[Any, str] | None:
        name = self._stream_backends.get(family)
        if name is None:
            return None
        return _backends.native(name), name

    def _make_socket_transport(self, sock: Any, protocol: Any, waiter: Any = None, *,
                               extra: Any = None, server: Any = None) -> Any:
        """A connected stream socket becomes an evpl Bind (tcp, unix); any
        other family gets asyncio's own selector transport over fd watches."""
        found = self._stream_module(sock.family) if sock.type == socket.SOCK_STREAM else None
        if found is None:
            return selector_events._SelectorSocketTransport(self, sock, protocol, waiter,
                                                            extra, server)
        module, name = found
        if sock.family != socket.AF_UNIX:
            base_events._set_nodelay(sock)
        tr = StreamTransport(self, protocol, sock=sock, waiter=waiter, extra=extra,
                             server=server, family=sock.family)
        sock.setblocking(False)
        module.stream(self._core, sock.fileno(), name, tr, None, limits(), False, None, 0)
        return tr

    def _make_ssl_transport(self, rawsock: Any, protocol: Any, sslcontext: Any,
                            waiter: Any = None, *, server_side: bool = False,
                            server_hostname: str | None = None, extra: Any = None,
                            server: Any = None, ssl_handshake_timeout: Any = None,
                            ssl_shutdown_timeout: Any = None,
                            call_connection_made: bool = True) -> Any:
        """TLS: asyncio's SSLProtocol over an evpl stream transport."""
        ssl_protocol = sslproto.SSLProtocol(
            self, protocol, sslcontext, waiter, server_side, server_hostname,
            ssl_handshake_timeout=ssl_handshake_timeout,
            ssl_shutdown_timeout=ssl_shutdown_timeout,
            call_connection_made=call_connection_made)
        self._make_socket_transport(rawsock, ssl_protocol, extra=extra, server=server)
        return ssl_protocol._app_transport

    def _make_datagram_transport(self, sock: Any, protocol: Any, address: Any = None,
                                 waiter: Any = None, extra: Any = None) -> Any:
        """A UDP socket becomes an evpl datagram Bind (``udp``, or
        ``io_uring_udp`` on an io_uring loop); a unix datagram socket (the
        engine has no such Bind) or a socket-like object gets asyncio's own
        transport over fd watches."""
        if not datagram.adoptable(sock):
            return selector_events._SelectorDatagramTransport(self, sock, protocol, address,
                                                              waiter, extra)
        return datagram.DatagramTransport(self, sock, protocol, address, waiter, extra,
                                          backend=self._datagram_backend)

    def _make_read_pipe_transport(self, pipe: Any, protocol: Any, waiter: Any = None,
                                  extra: Any = None) -> Any:
        return unix_events._UnixReadPipeTransport(self, pipe, protocol, waiter, extra)

    def _make_write_pipe_transport(self, pipe: Any, protocol: Any, waiter: Any = None,
                                   extra: Any = None) -> Any:
        return unix_events._UnixWritePipeTransport(self, pipe, protocol, waiter, extra)

    def _start_serving(self, protocol_factory: Any, sock: Any, sslcontext: Any = None,
                       server: Any = None, backlog: int = 100,
                       ssl_handshake_timeout: Any = None,
                       ssl_shutdown_timeout: Any = None) -> None:
        """Accept on a listening socket with an evpl Listener: each
        connection is a Bind whose handler is a StreamTransport."""
        fd = sock.fileno()
        if fd in self._listeners:
            return
        found = self._stream_module(sock.family)
        if found is None:
            raise ValueError(f"cannot serve on a socket of family {sock.family!r}")
        module, name = found
        sock.setblocking(False)
        factory = functools.partial(
            StreamTransport, self, protocol_factory=protocol_factory, server=server,
            sslcontext=sslcontext, ssl_handshake_timeout=ssl_handshake_timeout,
            ssl_shutdown_timeout=ssl_shutdown_timeout, family=sock.family)
        nodelay = sock.family in (socket.AF_INET, socket.AF_INET6)
        listener = module.listener(self._core, fd, name, factory, None, None, limits(),
                                   nodelay, sock.getsockname())
        self._listeners[fd] = (listener, sock)

    def _stop_serving(self, sock: Any) -> None:
        entry = self._listeners.pop(sock.fileno(), None)
        if entry is None:
            sock.close()
            return
        entry[0].close()
        sock.detach()

    # ---- unix sockets --------------------------------------------------------------

    async def create_unix_connection(self, protocol_factory: Any, path: Any = None, *,
                                     ssl: Any = None, sock: Any = None,
                                     server_hostname: str | None = None,
                                     ssl_handshake_timeout: Any = None,
                                     ssl_shutdown_timeout: Any = None) -> Any:
        """Connect to a unix socket ``path`` (or adopt ``sock``)."""
        if ssl:
            if server_hostname is None:
                raise ValueError("you have to pass server_hostname when using ssl")
        else:
            if server_hostname is not None:
                raise ValueError("server_hostname is only meaningful with ssl")
            if ssl_handshake_timeout is not None:
                raise ValueError("ssl_handshake_timeout is only meaningful with ssl")
            if ssl_shutdown_timeout is not None:
                raise ValueError("ssl_shutdown_timeout is only meaningful with ssl")
        if path is not None:
            if sock is not None:
                raise ValueError("path and sock can not be specified at the same time")
            path = os.fspath(path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0)
            try:
                sock.setblocking(False)
                await self.sock_connect(sock, path)
            except BaseException:
                sock.close()
                raise
        else:
            if sock is None:
                raise ValueError("no path and sock were specified")
            if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
                raise ValueError(f"A UNIX Domain Stream Socket was expected, got {sock!r}")
            sock.setblocking(False)
        return await self._create_connection_transport(
            sock, protocol_factory, ssl, server_hostname,
            ssl_handshake_timeout=ssl_handshake_timeout,
            ssl_shutdown_timeout=ssl_shutdown_timeout)

    async def create_unix_server(self, protocol_factory: Any, path: Any = None, *,
                                 sock: Any = None, backlog: int = 100, ssl: Any = None,
                                 ssl_handshake_timeout: Any = None,
                                 ssl_shutdown_timeout: Any = None,
                                 start_serving: bool = True) -> base_events.Server:
        """Serve on a unix socket ``path`` (a stale socket file there is
        removed) or on ``sock``."""
        if isinstance(ssl, bool):
            raise TypeError("ssl argument must be an SSLContext or None")
        if ssl_handshake_timeout is not None and not ssl:
            raise ValueError("ssl_handshake_timeout is only meaningful with ssl")
        if ssl_shutdown_timeout is not None and not ssl:
            raise ValueError("ssl_shutdown_timeout is only meaningful with ssl")
        if path is not None:
            if sock is not None:
                raise ValueError("path and sock can not be specified at the same time")
            path = os.fspath(path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            if path[0] not in (0, "\x00"):
                try:
                    if stat.S_ISSOCK(os.stat(path).st_mode):
                        os.remove(path)
                except FileNotFoundError:
                    pass
                except OSError as err:
                    logger.error("Unable to check or remove stale UNIX socket %r: %r",
                                 path, err)
            try:
                sock.bind(path)
            except OSError as exc:
                sock.close()
                if exc.errno == errno.EADDRINUSE:
                    raise OSError(errno.EADDRINUSE,
                                  f"Address {path!r} is already in use") from None
                raise
            except BaseException:
                sock.close()
                raise
        else:
            if sock is None:
                raise ValueError("path was not specified, and no sock specified")
            if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
                raise ValueError(f"A UNIX Domain Stream Socket was expected, got {sock!r}")
        sock.setblocking(False)
        server = base_events.Server(self, [sock], protocol_factory, ssl, backlog,
                                    ssl_handshake_timeout, ssl_shutdown_timeout)
        if start_serving:
            server._start_serving()
            await tasks.sleep(0)    # as asyncio: serving starts before we return
        return server

    # ---- signals --------------------------------------------------------------------

    def _check_signal(self, sig: Any) -> None:
        if not isinstance(sig, int):
            raise TypeError(f"sig must be an int, not {sig!r}")
        if sig not in signal.valid_signals():
            raise ValueError(f"invalid signal number {sig}")

    def add_signal_handler(self, sig: int, callback: Any, *args: Any) -> None:
        """Run ``callback(*args)`` in the loop when signal ``sig`` arrives
        (main thread only)."""
        if coroutines.iscoroutine(callback) or coroutines.iscoroutinefunction(callback):
            raise TypeError("coroutines cannot be used with add_signal_handler()")
        self._check_signal(sig)
        self._check_closed()
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("set_wakeup_fd only works in main thread of the main interpreter")
        if self._sig_pipe is None:
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self._sig_pipe = (r, w)
            self._add_reader(r, self._drain_sig_pipe)
        try:
            signal.set_wakeup_fd(self._sig_pipe[1], warn_on_full_buffer=False)
        except (ValueError, OSError) as exc:
            raise RuntimeError(str(exc)) from None
        handle = events.Handle(callback, args, self, None)
        self._signal_handlers[sig] = handle
        try:
            signal.signal(sig, self._on_signal)
            signal.siginterrupt(sig, False)
        except OSError as exc:
            del self._signal_handlers[sig]
            if not self._signal_handlers:
                signal.set_wakeup_fd(-1)
            if exc.errno == errno.EINVAL:
                raise RuntimeError(f"sig {sig:d} cannot be caught") from None
            raise

    def _drain_sig_pipe(self) -> None:
        if self._sig_pipe is None:
            return
        try:
            while os.read(self._sig_pipe[0], 4096):
                pass
        except BlockingIOError:
            pass

    def _on_signal(self, signum: int, frame: Any) -> None:
        handle = self._signal_handlers.get(signum)
        if handle is None:
            return
        if handle._cancelled:
            self.remove_signal_handler(signum)
            return
        self._ready.append(handle)
        self._write_to_self()

    def remove_signal_handler(self, sig: int) -> bool:
        self._check_signal(sig)
        try:
            del self._signal_handlers[sig]
        except KeyError:
            return False
        handler = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
        try:
            signal.signal(sig, handler)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                raise RuntimeError(f"sig {sig:d} cannot be caught") from None
            raise
        if not self._signal_handlers:
            try:
                signal.set_wakeup_fd(-1)
            except (ValueError, OSError) as exc:
                logger.info("set_wakeup_fd(-1) failed: %s", exc)
        return True

    # ---- subprocesses -------------------------------------------------------------

    async def _make_subprocess_transport(self, protocol: Any, args: Any, shell: bool,
                                         stdin: Any, stdout: Any, stderr: Any, bufsize: int,
                                         extra: Any = None, **kwargs: Any) -> Any:
        """asyncio's subprocess transport; the child's exit is noticed through
        a pidfd watched by the engine (no SIGCHLD handler, no thread)."""
        waiter = self.create_future()
        transp = unix_events._UnixSubprocessTransport(
            self, protocol, args, shell, stdin, stdout, stderr, bufsize,
            waiter=waiter, extra=extra, **kwargs)
        self._watch_child(transp.get_pid(), transp)
        try:
            await waiter
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException:
            transp.close()
            await transp._wait()
            raise
        return transp

    def _watch_child(self, pid: int, transp: Any) -> None:
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            pidfd = -1
        if pidfd < 0:
            self.call_soon(self._reap, pid, transp, -1)
            return
        self._add_reader(pidfd, self._reap, pid, transp, pidfd)

    def _reap(self, pid: int, transp: Any, pidfd: int) -> None:
        if pidfd >= 0:
            self._remove_reader(pidfd)
            os.close(pidfd)
        try:
            got, status = os.waitpid(pid, 0)
        except ChildProcessError:
            logger.warning("child process pid %d was reaped by someone else; "
                           "its exit status is unknown (255)", pid)
            returncode = 255
        else:
            returncode = os.waitstatus_to_exitcode(status) if got else 255
        if self._debug:
            logger.debug("process %s exited with returncode %s", pid, returncode)
        transp._process_exited(returncode)

    # ---- odds and ends ------------------------------------------------------------

    def __repr__(self) -> str:
        return (f"<{self.__class__.__name__} backend={self._backend} "
                f"running={self.is_running()} closed={self.is_closed()} "
                f"debug={self.get_debug()}>")


_fast.register_slots(EvplEventLoop, "loop")
EvplEventLoop.call_soon = _fast.call_soon_method(EvplEventLoop)  # type: ignore[method-assign]


class AttachedEventLoop(EvplEventLoop):
    """An asyncio loop that runs inside an evpl ``Loop``'s own iterations.

    Whoever runs the evpl Loop (``run()``, ``run_until()``, a LoopThread)
    runs this loop's callbacks too: each ``call_soon`` arms a Deferral, and
    the ready callbacks run at the end of the engine iteration (with this
    loop set as the thread's running loop, so ``asyncio.get_running_loop()``
    works in them). Timers and fd watches are engine timers and watches, as
    in :class:`EvplEventLoop`. So code on the evpl Loop (an HTTP server's
    connections, a drpc client) and asyncio code share one thread and call
    each other directly, with no thread crossing.

    ``run_until_complete``/``run_forever`` work while the evpl Loop is not
    running (they drive it); while it runs they raise, as asyncio does for
    a loop that is already running. ``close()`` leaves the evpl Loop open.
    """

    def __init__(self, core: Loop, *, backend: str = "epoll") -> None:
        super().__init__(backend=backend, core=core)
        self._deferral = Deferral(core, self._run_ready)
        self._doorbell.close()
        self._doorbell = core.doorbell(self._deferral.arm)

    def is_running(self) -> bool:
        """True while this loop or the evpl Loop under it runs."""
        return super().is_running() or (bool(self._core.running) and not self._driving)

    call_soon = _fast.attached_call_soon
    _run_ready = _fast.attached_run_ready      # (the Deferral)
    _run_handles = _fast.run_handles

    def call_later(self, delay: float, callback: Any, *args: Any,
                   context: Any = None) -> events.TimerHandle:
        """Run ``callback(*args)`` after ``delay`` seconds (fired through
        ``_run_inline``, so with this loop as the running one)."""
        if delay is None:
            raise TypeError("delay must not be None")
        return self._timer_slow(self.time() + delay, delay, callback, args, context)

    def call_at(self, when: float, callback: Any, *args: Any,
                context: Any = None) -> events.TimerHandle:
        """Run ``callback(*args)`` at loop time ``when`` (see call_later)."""
        if when is None:
            raise TypeError("when cannot be None")
        return self._timer_slow(when, when - self.time(), callback, args, context)

    def _timer_slow(self, when: float, delay: float, callback: Any, args: tuple[Any, ...],
                    context: Any) -> events.TimerHandle:
        if self._closed:
            raise RuntimeError("Event loop is closed")
        timer = _fast.TimerHandle(when, callback, args, self, context)
        timer._scheduled = True
        timer._evtimer = self._core.call_at(when, self._run_inline, timer)
        return timer

    def _run_inline(self, handle: events.Handle) -> None:
        """A timer or fd-watch callback, with this loop as the running one."""
        self._run_handles((handle,))
