"""``evpl.drpc.Server``: request handlers behind one datagram Bind.

::

    server = evpl.drpc.Server(loop, "udp", ("0.0.0.0", 31850))
    server.register(1, lambda req: bytes(req.body).upper())   # answer now
    server.register(2, slow, background=True)                 # on a worker thread
    loop.run()

A handler gets a :class:`Request` (``body`` is an ``evpl.Buffer``: a slice of
the received packet for a single-packet request, no copy; the assembled
message otherwise) and either returns the response (any bytes-like object),
or returns ``None`` and calls ``request.respond(data)`` later, from any loop
callback, in any order. A background handler runs on a worker thread
(``Loop.offload`` on the server's ``WorkerPool``); what it returns comes
back to the loop through the loop's call queue and is sent from there. A
handler that raises answers the call with a :class:`~evpl.drpc.RemoteError`
(the exception's text) instead of leaving the client to time out.

The whole read batch of the socket reaches the protocol core in one Python
call (``on_datagrams``); see docs/drpc.md for the protocol and the limits.
"""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Callable
from typing import Any

from evpl.core.handler import Handler
from evpl.core.loop import engine_loop
from evpl.drpc._fast import Port
from evpl.drpc.client import kernel_rcvbuf, message_allocator
from evpl.drpc.session import Request, ServerEndpoint, ServerSession, ServerSlot
from evpl.drpc.wire import FLAG_ERROR, HEADER_SIZE, MAX_REQ_TYPE
from evpl.errors import ConfigError, EvplError, SendQueueFull
from evpl.threads.workers import WorkerPool

__all__ = ["Request", "Server"]

_log = logging.getLogger("evpl.drpc")


class _Handler(Port, Handler):
    """Read batches go to the endpoint through ``Port.on_datagrams`` (C)."""

    __slots__ = ("server",)

    def __init__(self, server: Server) -> None:
        self.server = server
        self.core = server._endpoint

    def on_closed(self, bind: Any, error: EvplError | None) -> None:
        self.server._closed(error)


class Server:
    """A drpc server on ``backend`` (a datagram backend: ``udp``,
    ``io_uring_udp``, ``xdp_udp``...) bound to ``address``.

    Limits it offers every session (a client may ask for less): ``window``
    requests outstanding (eRPC: 8), ``credits`` packets in flight (128;
    eRPC: 32; on kernel sockets at most what half the receive buffer the
    kernel granted holds, ``session.socket_credits``: 92 of 1472 bytes
    under a stock ``net.core.rmem_max`` of 208 KiB, 3 of 64 KB),
    ``max_message`` bytes per request or response (eRPC: 8 MiB),
    ``max_datagram`` bytes per packet including the 28-byte header (1472
    fits a 1500-byte Ethernet MTU; up to 65507 on loopback or jumbo paths).
    ``max_sessions`` bounds the session table; ``session_timeout`` (seconds,
    at least 1) forgets a session that sent nothing for that long (clients
    are told, and connect again after half of it idle); ``max_assembly``
    bounds the memory of multi-packet requests being received (beyond it
    new ones are dropped and retransmitted by their clients). ``workers``:
    where background handlers run, an ``evpl.threads.WorkerPool`` (shared,
    left open by ``close``) or the number of threads of one the server
    makes on first use (1024 jobs queued at most; when it is full the
    server stops reading until a worker takes a job, and its clients see
    that as delay). ``rcvbuf`` (default
    4 MiB) sizes the socket's receive buffer, which must hold the packets
    the sessions' credits allow in flight. Other keyword options go to
    ``Loop.bind``.
    """

    def __init__(self, loop: Any, backend: str, address: Any, *, window: int = 8,
                 credits: int = 128, max_message: int = 8 << 20, max_datagram: int = 1472,
                 max_sessions: int = 4096, session_timeout: float = 60.0,
                 max_assembly: int = 256 << 20, workers: int | WorkerPool = 4,
                 rcvbuf: int = 4 << 20, **options: Any) -> None:
        limits: list[tuple[str, Any, int, int]] = [
            ("window", window, 1, 1024), ("credits", credits, 1, 65535),
            ("max_message", max_message, 0, 0xFFFFFFFF),
            ("max_datagram", max_datagram, HEADER_SIZE + 1, 65507),
            ("max_sessions", max_sessions, 1, 1 << 24)]
        if not isinstance(workers, WorkerPool):
            limits.append(("workers", workers, 1, 1024))
        for name, v, lo, hi in limits:
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                raise ConfigError(f"{name} must be an int in {lo}..{hi}, got {v!r}")
        if not session_timeout >= 1:
            raise ConfigError(f"session_timeout must be >= 1 second, got {session_timeout!r}")
        loop = engine_loop(loop, "drpc")
        self.loop = loop
        self.workers = workers
        self._handlers: dict[int, tuple[Callable[[Request], Any], bool]] = {}
        # the pool background handlers run on: the caller's, or one made on
        # first use (and closed with the server)
        self._pool: WorkerPool | None = workers if isinstance(workers, WorkerPool) else None
        self.handler_errors = 0
        self.send_queue_full = 0
        self.closed = False
        self._now = loop.now_ns
        self.bind: Any = None
        self._endpoint = ServerEndpoint(
            self._sendto, self._dispatch, self._failed, window=window, credits=credits,
            max_message=max_message, max_datagram=max_datagram, max_sessions=max_sessions,
            session_timeout_ns=int(session_timeout * 1e9), max_assembly=max_assembly,
            alloc=message_allocator(loop.pool))
        options.setdefault("gro", False)        # on at a batch of two packets (Port)
        self.bind = loop.bind(backend, address, _Handler(self), rcvbuf=rcvbuf,
                              max_datagram=max_datagram, **options)
        self._endpoint.send_bind = self.bind        # the C path's (it counts SendQueueFull)
        # sessions get no more credits than the socket's receive buffer holds
        # (at their datagram size)
        self._endpoint.rcvbuf = kernel_rcvbuf(self.bind)
        self._expiry = loop.call_every(min(1.0, session_timeout / 4), self._expire)

    @property
    def address(self) -> Any:
        """The bound address (the port the kernel picked for port 0)."""
        return self.bind.local_address

    def register(self, req_type: int, handler: Callable[[Request], Any], *,
                 background: bool = False) -> None:
        """Serve requests of type ``req_type`` (0..255) with ``handler(request)``.

        ``background=False`` ("dispatch"): the handler runs in the loop and
        must not block; it returns the response, or ``None`` and calls
        ``request.respond(data)`` later. ``background=True``: it runs on a
        worker thread and returns the response (blocking is fine there)."""
        if not isinstance(req_type, int) or not 0 <= req_type <= MAX_REQ_TYPE:
            raise ConfigError(f"request type must be an int in 0..{MAX_REQ_TYPE}, "
                              f"got {req_type!r}")
        if not callable(handler):
            raise ConfigError(f"handler must be callable, got {handler!r}")
        if req_type in self._handlers:
            raise ConfigError(f"request type {req_type} already has a handler")
        self._handlers[req_type] = (handler, background)
        if not background:
            self._endpoint.handlers[req_type] = handler     # run by the core itself

    # -- the path of a request --

    def _sendto(self, data: Any, addr: Any) -> None:
        """Queue a packet; dropped (and counted) when the send queue is at its
        hard limit, as the network would drop it: the client retransmits.
        (Clients asking for 64 KB packets faster than the socket drains
        them used to close the server's socket with SendQueueFull.)"""
        try:
            self.bind.sendto(data, addr)
        except SendQueueFull:
            self.send_queue_full += 1

    def _dispatch(self, sess: ServerSession, slot: ServerSlot, req_type: int, req_num: int,
                  body: Any) -> Any:
        """A request the core has no dispatch handler for: a background
        handler's, or an unknown type (answered with an error)."""
        entry = self._handlers.get(req_type)
        if entry is None:
            self._endpoint.respond(sess, slot, req_num,
                                   f"no handler for request type {req_type}".encode(),
                                   FLAG_ERROR)
            return None
        self._background(entry[0], Request(self._endpoint, sess, slot, req_type, req_num, body))
        return None

    def _failed(self, req: Request, exc: BaseException) -> None:
        self.handler_errors += 1
        # a text, not the exception: a log record that kept its traceback would
        # keep the request (and its packet buffer) alive
        _log.warning("drpc handler for request type %d raised %s", req.req_type, repr(exc))
        req._endpoint.respond(req._sess, req._slot, req.req_num,
                              f"handler for request type {req.req_type} raised "
                              f"{type(exc).__name__}: {exc}".encode(), FLAG_ERROR)

    def _background(self, handler: Callable[[Request], Any], req: Request) -> None:
        pool = self._pool
        if pool is None:
            pool = self._pool = WorkerPool(self.workers, name="drpc-worker")
        fut = self.loop.offload(handler, req, workers=pool, on_full="pause", bind=self.bind)
        fut.add_done_callback(lambda f: self._finished(req, f))

    def _finished(self, req: Request, fut: concurrent.futures.Future[Any]) -> None:
        """On the loop: send what a background handler returned."""
        if fut.cancelled():
            return                          # the server closed before it ran
        error = fut.exception()
        if error is not None:
            self._failed(req, error)
        elif (result := fut.result()) is None:
            self._failed(req, EvplError("a background handler must return the response"))
        else:
            req.respond(result)

    def _expire(self) -> None:
        self._endpoint.expire(self._now())

    # -- life cycle --

    def stats(self) -> dict[str, Any]:
        """The server's counters (see ``ServerEndpoint.stats``), plus
        ``handler_errors`` and ``send_queue_full`` (packets dropped because
        the socket's send queue was at its hard limit)."""
        s = self._endpoint.stats()
        s["handler_errors"] = self.handler_errors
        s["send_queue_full"] = self.send_queue_full + self._endpoint.send_queue_full
        return s

    def sessions(self) -> list[dict[str, Any]]:
        """One dict per open session: number, peer, limits, requests served."""
        return [{"session": s.number, "peer": s.peer, "window": s.window,
                 "credits": s.credits, "max_message": s.max_message,
                 "max_datagram": s.max_datagram, "requests": s.requests}
                for s in self._endpoint.sessions.values()]

    def close(self) -> None:
        """Stop serving: close the socket, forget the sessions, stop the workers."""
        if self.closed:
            return
        self.closed = True
        self._endpoint.closing = True
        self._expiry.cancel()
        for sess in list(self._endpoint.sessions.values()):
            self._endpoint._drop(sess)
        if not self.bind.closed:
            self.bind.close()
        if self._pool is not None and not isinstance(self.workers, WorkerPool):
            self._pool.close(wait=True, cancel=True)    # queued handlers do not run
            self._pool = None

    def _closed(self, error: EvplError | None) -> None:
        if error is not None and not self.closed:
            _log.error("drpc server socket closed: %r", error)
        self.closed = True
        self._expiry.cancel()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
