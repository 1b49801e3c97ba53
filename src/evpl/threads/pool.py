"""``ThreadPool``: n LoopThreads, with listeners spread over them and work
submitted to the least busy one."""

from __future__ import annotations

import concurrent.futures
import errno
import logging
import os
import socket
from collections.abc import Callable, Sequence
from typing import Any, Literal

from evpl import numa
from evpl._native.framing import Framer
from evpl.core import backends as _backends
from evpl.core.handler import Handler
from evpl.core.loop import _framer, _handler, _limits, _remove_stale_socket, _sockaddr
from evpl.errors import ConfigError, EvplError, transport_error
from evpl.threads.loop_thread import LoopThread, check_cpu, current_loop_thread

__all__ = ["PoolListener", "ThreadPool"]

_log = logging.getLogger("evpl")


class PoolListener:
    """A listener spread over a ThreadPool's loops: one SO_REUSEPORT socket
    per loop (``mode == "reuseport"``), or one acceptor thread handing each
    accepted socket to the loop with the fewest live connections
    (``mode == "acceptor"``)."""

    def __init__(self, pool: ThreadPool, mode: str, address: Any) -> None:
        self.pool = pool
        self.mode = mode
        self.address = address
        self._listeners: list[tuple[LoopThread, Any]] = []
        self._acceptor: _Acceptor | None = None
        self.handed = [0] * len(pool.threads)

    @property
    def accepted(self) -> list[int]:
        """Connections accepted per loop of the pool, in pool order."""
        return list(self.handed)

    def close(self) -> None:
        """Stop accepting; accepted connections stay open."""
        for lt, li in self._listeners:
            if lt.alive:
                lt.call(li.close).result()
        self._listeners = []
        if self._acceptor is not None:
            self._acceptor.close()
            self._acceptor = None


class _Acceptor:
    """Accepts on one socket (a watch on the acceptor's own LoopThread) and
    hands every connection to the least loaded loop of the pool, where it
    becomes a Bind of ``backend``."""

    def __init__(self, pool: ThreadPool, sock: socket.socket, backend: str, handler: Any,
                 framer: Framer | None, limits: Any, nodelay: bool, handed: list[int]) -> None:
        self.pool = pool
        self.sock = sock
        self.backend = backend
        self.native = _backends.native(backend)
        self.factory, self.shared = _handler(handler)
        self.framer = framer
        self.limits = limits
        self.nodelay = nodelay
        self.handed = handed                # connections handed to each loop
        self.thread = LoopThread(name="evpl-acceptor", spin_ns=0).start()
        self.watch = self.thread.call(self.thread.loop.watch_fd, sock.fileno(),
                                      self._accept).result()

    def _accept(self) -> None:
        threads = self.pool.threads
        for _ in range(64):                 # a batch, then let the loop breathe
            try:
                fd, peer = self.sock._accept()  # type: ignore[attr-defined]
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EINTR):
                    continue
                _log.error("acceptor: accept failed: %s", exc)
                return
            live = [lt for lt in threads if lt.alive]
            if not live:
                os.close(fd)
                continue
            target = min(live, key=lambda lt: lt.connections + lt.pending)
            target.connections += 1
            self.handed[threads.index(target)] += 1
            try:
                target.call_soon(self._adopt, target, fd, peer)
            except EvplError:
                target.connections -= 1
                os.close(fd)

    def _adopt(self, lt: LoopThread, fd: int, peer: Any) -> None:
        """On ``lt``'s loop: make the Bind, count it until it closes."""
        try:
            os.set_blocking(fd, False)
            if self.nodelay:
                _set_nodelay(fd)
            h = self.shared if self.shared is not None else self.factory()
            if not isinstance(h, Handler):
                raise ConfigError(f"handler factory returned {h!r}, not an evpl.Handler")
        except BaseException:
            lt.connections -= 1
            os.close(fd)
            raise
        self.native.stream(lt.loop, fd, self.backend, _counted(h, lt), self.framer,
                           self.limits, False, peer, 0)

    def close(self) -> None:
        if self.thread.alive:
            self.thread.call(self.watch.cancel).result()
        self.thread.stop()
        self.sock.close()


def _set_nodelay(fd: int) -> None:
    s = socket.socket(fileno=fd)
    try:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    finally:
        s.detach()


class _Counted(Handler):
    """Forwards to the connection's handler and counts the connection off
    its loop when it closes (the acceptor's load measure). The Bind reads
    the callbacks once, so forwarding costs nothing per message."""

    def __init__(self, inner: Handler, lt: LoopThread) -> None:
        self.inner = inner
        self.lt = lt
        for name in ("on_connected", "on_data", "on_message", "on_datagram", "on_paused",
                     "on_writable", "on_eof"):
            setattr(self, name, getattr(inner, name))

    def on_closed(self, bind: Any, error: Any) -> None:
        self.lt.connections -= 1
        self.inner.on_closed(bind, error)


class _CountedBatch(_Counted):
    def on_messages(self, bind: Any, msgs: list[Any]) -> None:
        self.inner.on_messages(bind, msgs)


class _CountedSent(_Counted):
    def on_sent(self, bind: Any) -> None:
        self.inner.on_sent(bind)


class _CountedBoth(_CountedBatch, _CountedSent):
    pass


def _counted(inner: Handler, lt: LoopThread) -> _Counted:
    """The forwarding handler whose class overrides exactly the optional
    callbacks (batches, on_sent) that ``inner``'s class overrides, so the
    Bind delivers the same way it would to ``inner``."""
    cls = type(inner)
    batch = cls.on_messages is not Handler.on_messages
    sent = cls.on_sent is not Handler.on_sent
    kind = _CountedBoth if batch and sent else _CountedBatch if batch else \
        _CountedSent if sent else _Counted
    return kind(inner, lt)


class ThreadPool:
    """``n`` LoopThreads (default: one per CPU this process may use), pinned
    to ``cpus`` if given (placed node by node, reused round robin); the
    ``loop_options`` go to every Loop. Start with ``start()`` or ``with``.

    The GIL lets one thread run Python at a time: a pool spreads waiting and
    blocking work, not Python work (use ``evpl.shards`` for that)."""

    def __init__(self, n: int | None = None, cpus: Sequence[int] | None = None,
                 **loop_options: Any) -> None:
        if cpus is not None:
            cpus = [check_cpu(c) for c in cpus]
            if not cpus:
                raise ConfigError("cpus must name at least one CPU")
        if n is None:
            n = len(cpus) if cpus else len(os.sched_getaffinity(0))
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ConfigError(f"n must be a positive int, got {n!r}")
        placed = numa.placement(n, cpus) if cpus else [None] * n     # node by node
        self.threads = [LoopThread(name=f"evpl-pool-{i}", cpu=placed[i], **loop_options)
                        for i in range(n)]
        self._listeners: list[PoolListener] = []
        self._started = False

    def start(self) -> ThreadPool:
        """Start every thread; returns once all loops run."""
        if self._started:
            raise EvplError("the pool was already started")
        self._started = True
        try:
            for lt in self.threads:
                lt.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float | None = None) -> bool:
        """Close the listeners and stop every loop; True if all threads ended."""
        for li in self._listeners:
            li.close()
        self._listeners = []
        done = True
        for lt in self.threads:
            done = lt.stop(timeout) and done
        return done

    def __enter__(self) -> ThreadPool:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __len__(self) -> int:
        return len(self.threads)

    @property
    def alive(self) -> list[bool]:
        return [lt.alive for lt in self.threads]

    def least_busy(self) -> LoopThread:
        """The live thread with the fewest queued calls and connections."""
        live = [lt for lt in self.threads if lt.alive]
        if not live:
            raise EvplError("no loop thread of the pool is alive")
        return min(live, key=lambda lt: lt.pending + lt.connections)

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
        """Run ``fn(*args)`` on the least busy loop (``LoopThread.call``)."""
        return self.least_busy().call(fn, *args)

    def call_all(self, fn: Callable[..., Any], *args: Any) -> list[Any]:
        """Run ``fn(*args)`` on every loop and wait for the results, in pool
        order (exceptions are raised)."""
        futures = [lt.call(fn, *args) for lt in self.threads]
        return [f.result() for f in futures]

    def listen(self, backend: str, address: Any, handler: Any, *,
               mode: Literal["auto", "reuseport", "acceptor"] = "auto",
               framing: Framer | None = None, backlog: int = 1024,
               **options: Any) -> PoolListener:
        """Accept connections on ``address`` and spread them over the loops.

        ``mode="reuseport"``: one SO_REUSEPORT socket per loop, the kernel
        spreads connections (by a hash of the addresses). ``"acceptor"``: one
        socket, accepted by an acceptor thread that hands each connection to
        the loop with the fewest live connections. ``"auto"``: reuseport for
        TCP, the acceptor for unix sockets (which have no SO_REUSEPORT
        groups). ``handler`` is shared or a factory, as for ``Loop.listen``.
        """
        if not self._started:
            raise EvplError("start the pool before listening")
        info = _backends.get(backend, "stream")
        if mode not in ("auto", "reuseport", "acceptor"):
            raise ConfigError(f"mode must be 'auto', 'reuseport' or 'acceptor', got {mode!r}")
        if mode == "auto":
            mode = "acceptor" if info.family == socket.AF_UNIX else "reuseport"
        if mode == "reuseport" and info.family == socket.AF_UNIX:
            raise ConfigError("unix sockets have no SO_REUSEPORT groups: use mode='acceptor'")
        _handler(handler)
        if mode == "reuseport":
            return self._listen_reuseport(backend, address, handler, framing, backlog, options)
        limits = _limits(options, framing is not None)
        framing = _framer(framing)
        family, sa = _sockaddr(info, address, socket.SOCK_STREAM)
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            if family == socket.AF_UNIX:
                if isinstance(sa, str) and not sa.startswith("\0"):
                    _remove_stale_socket(sa)
            else:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sa)
            sock.listen(backlog)
        except OSError as exc:
            sock.close()
            raise transport_error(exc.errno or errno.EINVAL, f"listen {sa!r}") from None
        nodelay = bool(options.get("nodelay", True)) and family != socket.AF_UNIX
        li = PoolListener(self, "acceptor", sock.getsockname())
        try:
            li._acceptor = _Acceptor(self, sock, info.name, handler, framing, limits, nodelay,
                                     li.handed)
        except BaseException:
            sock.close()
            raise
        self._listeners.append(li)
        return li

    def _listen_reuseport(self, backend: str, address: Any, handler: Any,
                          framing: Framer | None, backlog: int,
                          options: dict[str, Any]) -> PoolListener:
        options = dict(options, reuseport=True)
        factory, shared = _handler(handler)
        li = PoolListener(self, "reuseport", None)

        def listen(addr: Any) -> Any:
            lt = current_loop_thread()
            assert lt is not None
            index = self.threads.index(lt)

            def make() -> Handler:
                h = shared if shared is not None else factory()  # type: ignore[misc]
                if not isinstance(h, Handler):
                    raise ConfigError(f"handler factory returned {h!r}, not an evpl.Handler")
                lt.connections += 1
                li.handed[index] += 1
                return _counted(h, lt)

            return lt.loop.listen(backend, addr, make, framing=framing, backlog=backlog,
                                  **options)

        first = self.threads[0].call(listen, address).result()
        bound = li.address = first.address
        li._listeners.append((self.threads[0], first))
        try:
            for lt in self.threads[1:]:
                li._listeners.append((lt, lt.call(listen, (bound[0], bound[1])).result()))
        except BaseException:
            li.close()
            raise
        self._listeners.append(li)
        return li
