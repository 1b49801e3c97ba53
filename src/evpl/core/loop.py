"""``evpl.Loop``: the native loop plus configuration checks and socket set-up.

Sockets are created and bound with Python's ``socket`` module (clear errors,
every address family), then handed to the engine as file descriptors; all
per-message work happens in the engine.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from collections.abc import Callable
from typing import Any, Literal

from evpl._native.bind import Bind, Limits, Listener
from evpl._native.buffers import Pool
from evpl._native.framing import Framer
from evpl._native.loop import LoopCore
from evpl.core import backends as _backends
from evpl.core.handler import Handler
from evpl.errors import ConfigError, EvplError, transport_error

__all__ = ["Loop", "default_pool"]

_default_pool: Pool | None = None

_OPTIONS = {"high_water", "low_water", "hard_limit", "max_datagram", "nodelay", "reuseport",
            "rcvbuf", "sndbuf", "gso", "gro", "idle_timeout", "message_timeout"}
_OPTIONS |= {"interface"}       # xdp_udp: the interface whose frames it reads


def default_pool() -> Pool:
    """The process-wide buffer pool used by Loops that are not given one."""
    global _default_pool
    if _default_pool is None:
        _default_pool = Pool()
    return _default_pool


def _handler(handler: Any) -> tuple[Callable[[], Handler] | None, Handler | None]:
    if isinstance(handler, Handler):
        return None, handler
    if callable(handler):
        return handler, None
    raise ConfigError(f"handler must be a Handler or a callable returning one, got {handler!r}")


def _make_handler(handler: Any) -> Handler:
    factory, shared = _handler(handler)
    h = shared if shared is not None else factory()  # type: ignore[misc]
    if not isinstance(h, Handler):
        raise ConfigError(f"handler factory returned {h!r}, not an evpl.Handler")
    return h


def _limits(options: dict[str, Any], framed: bool) -> Limits:
    """The per-Bind limits in ``options``, checked (see docs/api.md);
    ``framed``: the Binds have a framer (message_timeout needs one)."""
    unknown = set(options) - _OPTIONS
    if unknown:
        raise ConfigError(f"unknown option(s): {', '.join(sorted(unknown))}")
    for name in ("high_water", "low_water", "hard_limit", "max_datagram"):
        v = options.get(name, 0)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ConfigError(f"{name} must be a non-negative int, got {v!r}")
    for name in ("idle_timeout", "message_timeout"):
        v = options.get(name)
        if v is not None and (not isinstance(v, int | float) or isinstance(v, bool) or v < 0):
            raise ConfigError(f"{name} must be None or a non-negative number of seconds, "
                              f"got {v!r}")
    if options.get("message_timeout") and not framed:
        raise ConfigError("message_timeout bounds the time to complete a framed message: "
                          "it needs framing= (use idle_timeout for unframed Binds)")
    high = options.get("high_water", 1 << 20)
    low = options.get("low_water", high // 4)
    hard = options.get("hard_limit", 16 * high)
    max_dgram = options.get("max_datagram", 65507)
    if not low <= high <= hard:
        raise ConfigError(f"need low_water ({low}) <= high_water ({high}) <= hard_limit ({hard})")
    if not 1 <= max_dgram <= 65507:
        raise ConfigError(f"max_datagram must be in 1..65507, got {max_dgram}")
    return Limits(high, low, hard, max_dgram, options.get("idle_timeout") or 0,
                  options.get("message_timeout") or 0)


def _framer(framing: Framer | None) -> Framer | None:
    if framing is not None and not isinstance(framing, Framer):
        raise ConfigError("framing must come from evpl.framing (length_prefix, record_marking, "
                          f"callable), got {framing!r}")
    return framing


def _sockaddr(info: _backends.BackendInfo, address: Any, kind: int) -> tuple[int, Any]:
    """(family, sockaddr) for an address given to listen/connect/bind."""
    if info.family == socket.AF_UNIX:
        if not isinstance(address, str | bytes | os.PathLike):
            raise ConfigError(f"{info.name} addresses are paths, got {address!r}")
        return socket.AF_UNIX, os.fsdecode(address) if not isinstance(address, bytes) else address
    if not (isinstance(address, tuple) and len(address) >= 2):
        raise ConfigError(f"{info.name} addresses are (host, port) tuples, got {address!r}")
    host, port = address[0], address[1]
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"port must be an int in 0..65535, got {port!r}")
    try:
        ai = socket.getaddrinfo(host or None, port, type=kind, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot resolve {host!r}: {exc.strerror}") from None
    family, _, _, _, sa = ai[0]
    if family == socket.AF_INET6 and len(address) > 2:
        sa = (sa[0], sa[1], *address[2:4])
    return family, sa


def _flag(options: dict[str, Any], name: str) -> bool:
    """A boolean option (default True), checked."""
    v = options.get(name, True)
    if not isinstance(v, bool):
        raise ConfigError(f"{name} must be a bool, got {v!r}")
    return v


def _remove_stale_socket(path: str) -> None:
    """Remove a unix socket file left behind by a server that is gone. A
    socket somebody still listens on, or any other kind of file, is left
    alone and bind reports the clash."""
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return
    except FileNotFoundError:
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)              # nobody listens: stale
    except OSError:
        pass
    finally:
        probe.close()


def engine_loop(loop: Any, what: str) -> Loop:
    """The evpl ``Loop`` a protocol object runs on: ``loop`` itself, or the
    engine under evpl's asyncio loop (``evpl.aio``'s ``loop.core``), so that
    code under ``evpl.aio.run()`` can pass ``asyncio.get_running_loop()``.
    ``what`` names the caller in the error for anything else."""
    if isinstance(loop, Loop):
        return loop
    core = getattr(loop, "core", None)
    if isinstance(core, Loop):
        return core
    raise ConfigError(f"{what} runs on an evpl.Loop or evpl's asyncio loop (evpl.aio), "
                      f"not on {type(loop).__name__}")


def running_aio_loop(loop: Loop, what: str, instead: str) -> Any:
    """The running asyncio loop, when it is evpl's and runs ``loop``: what
    an awaitable of a client on ``loop`` (``what``, e.g. "Client.acall()")
    needs to be driven. Otherwise ``EvplError`` saying why, and what to use
    ``instead`` outside evpl's asyncio loop."""
    import asyncio

    try:
        aloop = asyncio.get_running_loop()
    except RuntimeError:
        raise EvplError(f"{what} needs a running evpl asyncio loop (evpl.aio.run(main())); "
                        f"without one use {instead}") from None
    core = getattr(aloop, "core", None)
    if core is not loop:
        raise EvplError(
            f"{what} needs evpl's asyncio loop running this client's Loop, and the running "
            f"loop is {type(aloop).__name__}"
            + ("" if isinstance(core, Loop) else
               " (plain asyncio/uvloop cannot drive evpl sockets: run the program with "
               "evpl.aio.run(main()) and make the client on asyncio.get_running_loop())"))
    return aloop


class Loop(LoopCore):
    """One event loop per thread (see docs/api.md).

    ``poll_mode``: ``"hybrid"`` polls while busy and sleeps after ``spin_ns``
    of quiet; ``"event"`` always sleeps when idle; ``"always"`` never sleeps.
    ``zc_threshold``: io_uring backends send messages of at least this many
    bytes with SEND_ZC (0 = never; on loopback the kernel copies anyway).
    ``sqpoll``: the io_uring ring gets a kernel thread that submits and
    completes requests, so neither costs a syscall (it spins on a core of its
    own while busy; ``sqpoll_cpu`` pins it). Off by default.
    """

    def __init__(self, *, spin_ns: int = 50_000,
                 poll_mode: Literal["hybrid", "event", "always"] = "hybrid",
                 pool: Pool | None = None, zc_threshold: int = 0,
                 sqpoll: bool = False, sqpoll_cpu: int | None = None) -> None:
        if poll_mode not in ("hybrid", "event", "always"):
            raise ConfigError(f"poll_mode must be 'hybrid', 'event' or 'always', got {poll_mode!r}")
        if not isinstance(spin_ns, int) or spin_ns < 0:
            raise ConfigError(f"spin_ns must be a non-negative int, got {spin_ns!r}")
        if poll_mode == "event":
            spin_ns = 0
        if not isinstance(zc_threshold, int) or zc_threshold < 0:
            raise ConfigError(f"zc_threshold must be a non-negative int, got {zc_threshold!r}")
        if not isinstance(sqpoll, bool):
            raise ConfigError(f"sqpoll must be a bool, got {sqpoll!r}")
        if sqpoll_cpu is not None:
            if not sqpoll:
                raise ConfigError("sqpoll_cpu needs sqpoll=True")
            ncpu = os.cpu_count() or 1
            if (not isinstance(sqpoll_cpu, int) or isinstance(sqpoll_cpu, bool)
                    or not 0 <= sqpoll_cpu < ncpu):
                raise ConfigError(f"sqpoll_cpu must be a CPU number in 0..{ncpu - 1}, "
                                  f"got {sqpoll_cpu!r}")
        super().__init__(pool if pool is not None else default_pool(), spin_ns=spin_ns,
                         poll_always=poll_mode == "always", base_handler=Handler,
                         sqpoll=sqpoll, sqpoll_cpu=-1 if sqpoll_cpu is None else sqpoll_cpu)
        self.zc_threshold = zc_threshold

    @property
    def poll_mode(self) -> str:
        if self.poll_always:
            return "always"
        return "hybrid" if self.spin_ns else "event"

    def _socket(self, info: _backends.BackendInfo, address: Any, kind: int,
                options: dict[str, Any]) -> tuple[socket.socket, Any]:
        family, sa = _sockaddr(info, address, kind)
        sock = socket.socket(family, kind)
        try:
            sock.setblocking(False)
            if "rcvbuf" in options:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, options["rcvbuf"])
            if "sndbuf" in options:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, options["sndbuf"])
        except BaseException:
            sock.close()
            raise
        return sock, sa

    def _bind_socket(self, sock: socket.socket, sa: Any, options: dict[str, Any]) -> None:
        try:
            if sock.family == socket.AF_UNIX and isinstance(sa, str) and not sa.startswith("\0"):
                _remove_stale_socket(sa)
            if sock.family != socket.AF_UNIX:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if options.get("reuseport"):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(sa)
        except OSError as exc:
            sock.close()
            raise transport_error(exc.errno or errno.EINVAL, f"bind {sa!r}") from None

    def listen(self, backend: str, address: Any, handler: Any, *,
               framing: Framer | None = None, backlog: int = 1024,
               **options: Any) -> Listener:
        """Accept connections on ``address``; each gets a Bind and a handler
        (``handler`` is a Handler, shared, or a factory called per connection)."""
        info = _backends.get(backend, "stream")
        limits = _limits(options, framing is not None)
        framing = _framer(framing)
        factory, shared = _handler(handler)
        sock, sa = self._socket(info, address, socket.SOCK_STREAM, options)
        self._bind_socket(sock, sa, options)
        try:
            sock.listen(backlog)
        except OSError as exc:
            sock.close()
            raise transport_error(exc.errno or errno.EINVAL, f"listen {sa!r}") from None
        bound = sock.getsockname()
        nodelay = bool(options.get("nodelay", True)) and sock.family != socket.AF_UNIX
        return _backends.native(info.name).listener(self, sock.detach(), info.name, factory,
                                                     shared, framing, limits, nodelay, bound)

    def connect(self, backend: str, address: Any, handler: Any, *,
                framing: Framer | None = None, **options: Any) -> Bind:
        """Connect to ``address``; ``on_connected`` or ``on_closed(bind, error)``
        reports the outcome.

        With a datagram backend the Bind is a connected datagram socket:
        ``send(data)`` sends a datagram to ``address``, only its datagrams
        are received, and a peer that refuses them (ICMP port unreachable)
        closes the Bind with ``ConnectionRefused``."""
        if backend == "xdp_udp":           # available once given an interface
            if framing is not None:
                raise ConfigError("datagram Binds carry no framing")
            from evpl.core import xdp
            return xdp.connect(self, backend, address, _make_handler(handler),
                               _limits(options, False), options)
        if "interface" in options:
            raise ConfigError("interface= is an xdp_udp option")
        info = _backends.get(backend)
        limits = _limits(options, framing is not None)
        if info.kind == "datagram":
            if framing is not None:
                raise ConfigError("datagram Binds carry no framing")
            return self._connect_datagram(info, address, handler, limits, options)
        framing = _framer(framing)
        h = _make_handler(handler)
        sock, sa = self._socket(info, address, socket.SOCK_STREAM, options)
        if sock.family != socket.AF_UNIX and options.get("nodelay", True):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex(sa)
        connecting = err in (errno.EINPROGRESS, errno.EAGAIN) and sock.family != socket.AF_UNIX
        if err == errno.EAGAIN and sock.family == socket.AF_UNIX:
            err = errno.ECONNREFUSED  # the listener's backlog is full
        connect_errno = 0 if err in (0, errno.EINPROGRESS) else err
        return _backends.native(info.name).stream(self, sock.detach(), info.name, h, framing,
                                                  limits, connecting, sa, connect_errno)

    def _fits_pool(self, limits: Limits) -> None:
        """A kernel datagram Bind receives each datagram into one pool
        buffer: ``max_datagram`` must fit one (else nothing could be read)."""
        size = self.pool.buffer_size
        if (limits.max_datagram + 63) & ~63 > size:
            raise ConfigError(
                f"max_datagram ({limits.max_datagram}) does not fit one buffer of this loop's "
                f"pool (buffer_size {size}): lower max_datagram or use a pool with larger "
                f"buffers")

    def _connect_datagram(self, info: _backends.BackendInfo, address: Any, handler: Any,
                          limits: Limits, options: dict[str, Any]) -> Bind:
        self._fits_pool(limits)
        gso = _flag(options, "gso")
        h = _make_handler(handler)
        sock, sa = self._socket(info, address, socket.SOCK_DGRAM, options)
        try:
            sock.connect(sa)
        except OSError as exc:
            sock.close()
            raise transport_error(exc.errno or errno.EINVAL, f"connect {sa!r}") from None
        return _backends.native(info.name).datagram(self, sock.detach(), info.name, h, limits,
                                                    gso and sock.family != socket.AF_UNIX, sa,
                                                    _flag(options, "gro"))

    def bind(self, backend: str, address: Any, handler: Any, **options: Any) -> Bind:
        """A datagram socket bound to ``address`` (port 0 picks a free port).

        ``gso`` (default True): datagrams queued in one iteration for the same
        peer with the same size leave as one UDP GSO send, which the kernel
        cuts into ordinary datagrams; the receiver sees no difference. Trains
        that arrive whole are accepted too (UDP GRO) and still delivered one
        ``on_datagram`` per datagram. ``gro=False`` leaves the kernel's GRO
        off until ``Bind.gro`` is set: it costs each received datagram a
        little, so request-response traffic that sees no train is faster
        without it."""
        if backend == "xdp_udp":           # available once given an interface
            from evpl.core import xdp
            return xdp.bind(self, backend, address, _make_handler(handler),
                            _limits(options, False), options)
        info = _backends.get(backend, "datagram")
        limits = _limits(options, False)
        self._fits_pool(limits)
        gso = _flag(options, "gso")
        h = _make_handler(handler)
        if "interface" in options:
            raise ConfigError("interface= is an xdp_udp option")
        sock, sa = self._socket(info, address, socket.SOCK_DGRAM, options)
        self._bind_socket(sock, sa, options)
        return _backends.native(info.name).datagram(self, sock.detach(), info.name, h, limits,
                                                    gso and sock.family != socket.AF_UNIX, None,
                                                    _flag(options, "gro"))

    def offload(self, fn: Callable[..., Any], *args: Any, workers: Any = None,
                on_full: Literal["raise", "pause"] = "raise",
                bind: Bind | None = None) -> Any:
        """Run ``fn(*args)`` on a worker thread (``workers``, an
        ``evpl.threads.WorkerPool``; default: the process-wide one) and
        return a ``concurrent.futures.Future`` that this loop completes on
        its own thread: its done callbacks run here and may use Binds.
        When the pool's queue is full, ``on_full="raise"`` raises
        ``evpl.Busy``; ``"pause"`` accepts the job, pauses reading on
        ``bind`` and resumes it when the job got into the queue (see
        docs/cores.md)."""
        from evpl.threads.workers import offload
        return offload(self, fn, *args, workers=workers, on_full=on_full, bind=bind)

    def __enter__(self) -> Loop:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
