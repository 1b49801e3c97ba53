"""ASGI 3.0 (``http`` and ``lifespan`` scopes) on the evpl HTTP server.

The app runs on evpl's own asyncio loop, attached to the server's evpl
Loop (:func:`evpl.aio.attach`): whoever runs the Loop runs the app's
coroutines too, on the same thread, so a request goes from the parser to
the app's task and the response from ``send()`` to the connection by plain
calls, with no thread crossing and no wake-up.

Backpressure: ``await send(...)`` with a body waits while the client is
slow (the connection's send queue is above its high-water mark, or the
HTTP/2 stream window is closed), so a slow client never makes the server
buffer a whole response. Request bodies arrive through ``receive()`` as
they are read; ``Expect: 100-continue`` is answered on the first
``receive()``.

Lifespan: ``startup`` completes before the Server's constructor returns
when the Loop is not running yet (the usual case: a startup failure raises
there); a Server made on a running Loop holds its requests until startup
is done. ``shutdown`` runs in ``Server.close()``.
"""

from __future__ import annotations

import asyncio
import logging
from asyncio import Task
from typing import Any
from urllib.parse import unquote

from evpl.aio import AttachedEventLoop, attach
from evpl.errors import EvplError
from evpl.http.server import Exchange, Server

__all__ = ["ASGIRunner"]

log = logging.getLogger("evpl.http")

_ASGI = {"version": "3.0", "spec_version": "2.4"}
_STARTUP_TIMEOUT = 60.0
_SHUTDOWN_TIMEOUT = 30.0


class _Call:
    """One ASGI ``http`` call: the app's ``receive``/``send`` over one
    Exchange."""

    __slots__ = ("body_done", "chunks", "disconnected", "ended", "ex", "more", "started",
                 "waiter", "wanted", "writable")

    def __init__(self, ex: Exchange) -> None:
        self.ex = ex
        self.chunks: list[bytes] = []
        req = ex.request
        self.more = not req.complete
        if req.complete and req.body:
            self.chunks.append(req.body)
        self.disconnected = False
        self.started = False
        self.ended = False
        self.wanted = False
        self.body_done = False
        self.waiter: asyncio.Future[None] | None = None
        self.writable: asyncio.Event | None = None

    # from the connection
    def body(self, data: bytes, more: bool) -> None:
        if data:
            self.chunks.append(data)
        self.more = more
        self._wake()

    def body_end(self) -> None:
        self.body(b"", False)

    def disconnect(self) -> None:
        self.disconnected = True
        self._wake()
        self.resume()

    def resume(self) -> None:
        if self.writable is not None:
            self.writable.set()

    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    # the app's callables
    async def receive(self) -> dict[str, Any]:
        while True:
            if self.chunks:
                chunks = self.chunks
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                self.body_done = not self.more
                return {"type": "http.request", "body": data, "more_body": self.more}
            if not self.more and not self.body_done:
                self.body_done = True
                return {"type": "http.request", "body": b"", "more_body": False}
            if self.disconnected or (self.ended and self.body_done):
                return {"type": "http.disconnect"}
            if self.more and not self.wanted:
                self.wanted = True
                self.ex.want_body()
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None

    async def send(self, msg: dict[str, Any]) -> None:
        kind = msg["type"]
        if self.disconnected:
            return
        ex = self.ex
        if kind == "http.response.start":
            if self.started:
                raise RuntimeError("http.response.start sent twice")
            self.started = True
            ex.start(int(msg["status"]), _headers(msg.get("headers", ())))
        elif kind == "http.response.body":
            if not self.started:
                raise RuntimeError("http.response.body before http.response.start")
            if self.ended:
                raise RuntimeError("http.response.body after the body ended")
            body = msg.get("body", b"")
            more = msg.get("more_body", False)
            if body:
                ex.write(body if type(body) is bytes else bytes(body))
            if not more:
                self.ended = True
                self._wake()
                ex.end()
            elif ex.paused and not self.disconnected:
                # the client is slow: wait until the connection drained
                if self.writable is None:
                    self.writable = asyncio.Event()
                self.writable.clear()
                await self.writable.wait()
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r}")

    async def run(self, app: Any, scope: dict[str, Any]) -> None:
        ex = self.ex
        try:
            await app(scope, self.receive, self.send)
        except Exception:
            log.exception("the ASGI app raised on %s %s", scope["method"], scope["path"])
            if not self.started:
                _error(ex)
            elif not self.ended and not ex.closed:
                ex.abort()          # the app failed mid-body: the response is cut
            return
        finally:
            self.ended = True
            # the exchange's callbacks are this call's bound methods: let go
            # of them, or every request would leave a reference cycle for
            # the garbage collector
            ex.on_body = ex.on_body_end = ex.on_disconnect = ex.on_writable = None
        if not self.started:
            if not self.disconnected:       # (a gone client's sends are dropped)
                log.error("the ASGI app returned without a response to %s %s",
                          scope["method"], scope["path"])
            _error(ex)
        elif not ex.ended:
            ex.end()


_seen_headers: dict[tuple[Any, ...], list[tuple[bytes, bytes]]] = {}


def _headers(raw: Any) -> list[tuple[bytes, bytes]]:
    """An app's response headers as lower-case ``bytes`` pairs (what the
    server's framing checks expect); header lists an app sends again and
    again (a constant ``http.response.start``) come from a small cache."""
    try:
        key = tuple(raw)
        got = _seen_headers.get(key)
    except TypeError:               # unhashable (lists as pairs): no cache
        return [(bytes(k).lower(), bytes(v)) for k, v in raw]
    if got is None:
        got = [(bytes(k).lower(), bytes(v)) for k, v in raw]
        if len(_seen_headers) >= 256:
            _seen_headers.clear()
        _seen_headers[key] = got
    return got


def _error(ex: Exchange) -> None:
    if ex.closed:
        return
    ex.start(500, [(b"content-type", b"text/plain"), (b"content-length", b"21")])
    ex.write(b"Internal Server Error")
    ex.end()


class ASGIRunner:
    """Runs an ASGI 3.0 app for a :class:`~evpl.http.server.Server`."""

    def __init__(self, server: Server, app: Any) -> None:
        self.server = server
        self.app = app
        self.aloop: AttachedEventLoop | None = None
        self.state: dict[str, Any] = {}
        self.lifespan = False
        self._lifespan_q: asyncio.Queue[dict[str, Any]] | None = None
        self._lifespan_out: asyncio.Queue[dict[str, Any]] | None = None
        self._lifespan_done: Any = None
        self._held: list[Exchange] | None = None     # requests waiting for startup
        self._server_addr: Any = None

    def start(self) -> None:
        loop = self.server.loop
        aloop = self.aloop = attach(loop)
        startup = asyncio.wait_for(self._lifespan_start(), _STARTUP_TIMEOUT)
        if loop.running:
            self._held = []
            aloop.create_task(startup).add_done_callback(self._started)
            return
        try:
            message = aloop.run_until_complete(startup)
        except Exception as exc:
            self.stop()
            raise EvplError(f"ASGI lifespan startup failed: {exc!r}") from exc
        if message is not None:
            self.stop()
            raise EvplError(f"ASGI lifespan startup failed: {message}")

    def _started(self, task: asyncio.Task[str | None]) -> None:
        """Startup on a running Loop is over: serve the held requests, or
        close the server if it failed."""
        held, self._held = self._held or [], None
        try:
            message = task.result()
        except Exception as exc:
            message = repr(exc)
        if message is not None:
            log.error("ASGI lifespan startup failed: %s; closing the server", message)
            self.server.close()
            return
        for ex in held:
            if not ex.closed:
                self.run(ex)

    async def _lifespan_start(self) -> str | None:
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        out: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._lifespan_q = q
        scope = {"type": "lifespan", "asgi": _ASGI, "state": self.state}
        unsupported = asyncio.get_running_loop().create_future()

        async def run() -> None:
            try:
                await self.app(scope, q.get, out.put)
            except Exception as exc:
                if not unsupported.done():
                    unsupported.set_result(exc)
                else:
                    log.exception("the ASGI app raised in lifespan")
            if not unsupported.done():
                unsupported.set_result(None)

        self._lifespan_done = asyncio.ensure_future(run())   # (a task needs a reference)
        await q.put({"type": "lifespan.startup"})
        got = asyncio.ensure_future(out.get())
        done, _ = await asyncio.wait({got, unsupported}, return_when=asyncio.FIRST_COMPLETED)
        if got in done:
            msg = got.result()
            self.lifespan = True
            if msg["type"] == "lifespan.startup.failed":
                return str(msg.get("message", "") or "the app said so")
            self._lifespan_out = out
            return None
        got.cancel()
        # the app refused the lifespan scope (raised or returned): no lifespan
        log.debug("the ASGI app does not support lifespan: %r", unsupported.result())
        return None

    async def _lifespan_stop(self) -> None:
        if not self.lifespan or self._lifespan_q is None or self._lifespan_out is None:
            return
        await self._lifespan_q.put({"type": "lifespan.shutdown"})
        try:
            msg = await asyncio.wait_for(self._lifespan_out.get(), _SHUTDOWN_TIMEOUT)
        except TimeoutError:
            log.warning("the ASGI app did not complete lifespan shutdown in %.0f s",
                        _SHUTDOWN_TIMEOUT)
            return
        if msg["type"] == "lifespan.shutdown.failed":
            log.error("ASGI lifespan shutdown failed: %s", msg.get("message", ""))

    def stop(self) -> None:
        """Lifespan shutdown, then cancel what the app still runs and close
        the asyncio loop. On a running Loop (close() from a callback) the
        shutdown is only started: it finishes while the Loop runs."""
        aloop = self.aloop
        if aloop is None:
            return
        self.aloop = None
        if self.server.loop.running:
            aloop.create_task(self._lifespan_stop())
            return
        try:
            aloop.run_until_complete(self._lifespan_stop())
        except Exception as exc:
            log.error("ASGI lifespan shutdown: %r", exc)
        tasks = asyncio.all_tasks(aloop)
        for task in tasks:
            task.cancel()
        if tasks:
            aloop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        aloop.close()

    def run(self, ex: Exchange) -> None:
        """Start the app on one exchange (called on the loop's thread)."""
        if self._held is not None:
            self._held.append(ex)
            return
        aloop = self.aloop
        if aloop is None:
            _error(ex)
            return
        req = ex.request
        path, _, query = req.target.partition("?")
        if self._server_addr is None:
            self._server_addr = _server_addr(ex)
        scope = {
            "type": "http", "asgi": _ASGI, "http_version": req.version,
            "method": req.method, "scheme": ex.scheme,
            "path": unquote(path) if "%" in path else path, "raw_path": path.encode("ascii"),
            "query_string": query.encode("ascii"), "root_path": self.server.root_path,
            "headers": req.headers, "client": _addr(ex.peer),
            "server": self._server_addr, "state": self.state.copy() if self.state else {},
        }
        call = _Call(ex)
        if not req.complete:
            ex.on_body = lambda data: call.body(data, True)
            ex.on_body_end = call.body_end
        ex.on_disconnect = call.disconnect
        ex.on_writable = call.resume
        # (create_task minus its checks; a constant name: no "Task-N" formatted per request)
        Task(call.run(self.app, scope), loop=aloop, name="asgi")


def _addr(peer: Any) -> Any:
    """ASGI's ``(host, port)`` of a socket address (None for unix sockets)."""
    if peer.__class__ is tuple:
        return peer if len(peer) == 2 else peer[:2]
    return None


def _server_addr(ex: Exchange) -> Any:
    conn = getattr(ex, "conn", None) or getattr(getattr(ex, "h2c", None), "conn", None)
    try:
        return _addr(conn.bind.local_address)
    except AttributeError:
        return None
