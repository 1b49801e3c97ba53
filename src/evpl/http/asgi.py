"""ASGI 3.0 (``http`` and ``lifespan`` scopes) on the evpl HTTP server.

The server's connections live on the evpl Loop; the ASGI app runs on an
asyncio event loop. :func:`pick_loop` is the one place that chooses that
loop: today it is a plain asyncio loop in a thread of its own (so any
asyncio loop works, uvloop included), and requests and responses cross
between the two threads in batches (one self-pipe write and one doorbell
ring per batch, not per message). Once evpl's own asyncio loop
(``evpl.aio``) is available, ``pick_loop`` returns it running on the
server's Loop, and the same code runs in one thread with no crossing.

Backpressure: ``await send(...)`` with a body waits while the client is
slow (the connection's send queue is above its high-water mark, or the
HTTP/2 stream window is closed), so a slow client never makes the server
buffer a whole response. Request bodies arrive through ``receive()`` as
they are read; ``Expect: 100-continue`` is answered on the first
``receive()``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

from evpl.errors import EvplError
from evpl.http.server import Exchange, Server

__all__ = ["ASGIRunner", "pick_loop"]

log = logging.getLogger("evpl.http")

_ASGI = {"version": "3.0", "spec_version": "2.4"}
_AHEAD = 512 << 10     # body bytes an app may have in flight to the loop before send() waits


class _Bridge:
    """Calls between the evpl Loop's thread (I/O) and the asyncio loop's
    thread (the app), batched: a call is queued, and only the first call
    of a batch wakes the other side."""

    def __init__(self, loop: Any, aloop: asyncio.AbstractEventLoop) -> None:
        self.aloop = aloop
        self._to_app: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self._to_io: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self._app_woken = False
        self._bell = loop.doorbell(self._run_io)

    def to_app(self, fn: Callable[..., Any], *args: Any) -> None:
        self._to_app.append((fn, args))
        if not self._app_woken:
            self._app_woken = True
            self.aloop.call_soon_threadsafe(self._run_app)

    def to_io(self, fn: Callable[..., Any], *args: Any) -> None:
        self._to_io.append((fn, args))
        self._bell.ring()

    def _run_app(self) -> None:
        self._app_woken = False
        q = self._to_app
        while q:
            fn, args = q.popleft()
            try:
                fn(*args)
            except Exception:
                log.exception("ASGI bridge call failed")

    def _run_io(self) -> None:
        q = self._to_io
        while q:
            fn, args = q.popleft()
            try:
                fn(*args)
            except Exception:
                log.exception("ASGI bridge call failed")

    def close(self) -> None:
        self._bell.close()


def pick_loop(evpl_loop: Any) -> tuple[asyncio.AbstractEventLoop, threading.Thread | None]:
    """The asyncio loop ASGI apps run on, and the thread that runs it
    (``None`` if it is the evpl Loop's own thread).

    The one place to change when ``evpl.aio`` lands: return its loop built on
    ``evpl_loop`` and ``None`` for the thread.
    """
    aloop = asyncio.new_event_loop()
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(aloop)
        aloop.call_soon(ready.set)
        aloop.run_forever()

    thread = threading.Thread(target=run, name="evpl-asgi", daemon=True)
    thread.start()
    ready.wait()
    return aloop, thread


class _Call:
    """One ASGI ``http`` call; app-side state lives here, touched only on
    the asyncio thread (the I/O side reaches it through the bridge)."""

    __slots__ = ("blocked", "body_done", "bridge", "chunks", "disconnected", "ended", "ex",
                 "more", "sent", "started", "waiter", "wanted", "writable", "written")

    def __init__(self, bridge: _Bridge, ex: Exchange) -> None:
        self.bridge = bridge
        self.ex = ex
        self.chunks: deque[bytes] = deque()
        req = ex.request
        self.more = not req.complete
        if req.complete and req.body:
            self.chunks.append(req.body)
        self.disconnected = False
        self.started = False
        self.ended = False
        self.wanted = False
        self.body_done = False
        # flow control across the threads: ``sent`` is written only by the
        # app's thread, ``written`` only by the loop's; ``blocked`` is set by
        # the app before it posts the write it will wait after, and cleared
        # by the loop when it wakes it
        self.sent = 0
        self.written = 0
        self.blocked = False
        self.waiter: asyncio.Future[None] | None = None
        self.writable: asyncio.Event | None = None

    # from the I/O side
    def body(self, data: bytes, more: bool) -> None:
        if data:
            self.chunks.append(data)
        self.more = more
        self._wake()

    def disconnect(self) -> None:
        self.disconnected = True
        self._wake()
        if self.writable is not None:
            self.writable.set()

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
                data = self.chunks.popleft() if len(self.chunks) == 1 else b"".join(self.chunks)
                self.chunks.clear()
                self.body_done = not self.more
                return {"type": "http.request", "body": data, "more_body": self.more}
            if not self.more and not self.body_done:
                self.body_done = True
                return {"type": "http.request", "body": b"", "more_body": False}
            if self.disconnected or (self.ended and self.body_done):
                return {"type": "http.disconnect"}
            if self.more and not self.wanted:
                self.wanted = True
                self.bridge.to_io(self.ex.want_body)
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None

    async def send(self, msg: dict[str, Any]) -> None:
        kind = msg["type"]
        if self.disconnected:
            return
        if kind == "http.response.start":
            if self.started:
                raise RuntimeError("http.response.start sent twice")
            self.started = True
            headers = [(bytes(k).lower(), bytes(v)) for k, v in msg.get("headers", ())]
            self.bridge.to_io(self.ex.start, int(msg["status"]), headers)
        elif kind == "http.response.body":
            if not self.started:
                raise RuntimeError("http.response.body before http.response.start")
            if self.ended:
                raise RuntimeError("http.response.body after the body ended")
            body = msg.get("body", b"")
            more = msg.get("more_body", False)
            if not more:
                self.ended = True
                self._wake()
            body = bytes(body)
            self.sent += len(body)
            wait = more and (self.sent - self.written > _AHEAD or self.ex.paused)
            if wait:
                if self.writable is None:
                    self.writable = asyncio.Event()
                self.writable.clear()
                self.blocked = True
            self.bridge.to_io(_io_write, self, body, more)
            if wait:
                await self.writable.wait()       # type: ignore[union-attr]
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r}")

    async def run(self, app: Any, scope: dict[str, Any]) -> None:
        try:
            await app(scope, self.receive, self.send)
        except Exception:
            log.exception("the ASGI app raised on %s %s", scope["method"], scope["path"])
            if not self.started:
                self.bridge.to_io(_io_error, self.ex)
            elif not self.ended:
                self.bridge.to_io(_io_abort, self.ex)
            return
        finally:
            self.ended = True
        if not self.started:
            log.error("the ASGI app returned without a response to %s %s",
                      scope["method"], scope["path"])
            self.bridge.to_io(_io_error, self.ex)
        elif not self.ex.ended:
            self.bridge.to_io(self.ex.end)


def _io_write(call: _Call, body: bytes, more: bool) -> None:
    ex = call.ex
    if body:
        ex.write(body)
    call.written += len(body)
    if not more:
        ex.end()
    else:
        _io_maybe_resume(call)


def _io_maybe_resume(call: _Call) -> None:
    """On the loop: wake an app waiting in send() once the client caught up."""
    if call.blocked and not call.ex.paused and call.sent - call.written <= _AHEAD:
        call.blocked = False
        call.bridge.to_app(call.resume)


def _io_error(ex: Exchange) -> None:
    ex.start(500, [(b"content-type", b"text/plain"), (b"content-length", b"21")])
    ex.write(b"Internal Server Error")
    ex.end()


def _io_abort(ex: Exchange) -> None:
    """The app failed mid-body: the response is cut (see Exchange.abort)."""
    if not ex.closed:
        ex.abort()


class ASGIRunner:
    """Runs an ASGI 3.0 app for a :class:`~evpl.http.server.Server`."""


    def __init__(self, server: Server, app: Any) -> None:
        self.server = server
        self.app = app
        self.aloop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.bridge: _Bridge | None = None
        self.state: dict[str, Any] = {}
        self.lifespan = False
        self._lifespan_q: asyncio.Queue[dict[str, Any]] | None = None
        self._lifespan_done: Any = None
        self._server_addr: Any = None

    def start(self) -> None:
        self.aloop, self.thread = pick_loop(self.server.loop)
        self.bridge = _Bridge(self.server.loop, self.aloop)
        fut = asyncio.run_coroutine_threadsafe(self._lifespan_start(), self.aloop)
        try:
            message = fut.result(timeout=60)
        except Exception as exc:
            self.stop()
            raise EvplError(f"ASGI lifespan startup failed: {exc}") from exc
        if message is not None:
            self.stop()
            raise EvplError(f"ASGI lifespan startup failed: {message}")

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
        if not self.lifespan or self._lifespan_q is None:
            return
        await self._lifespan_q.put({"type": "lifespan.shutdown"})
        try:
            msg = await asyncio.wait_for(self._lifespan_out.get(), 30)
        except TimeoutError:
            log.warning("the ASGI app did not complete lifespan shutdown in 30 s")
            return
        if msg["type"] == "lifespan.shutdown.failed":
            log.error("ASGI lifespan shutdown failed: %s", msg.get("message", ""))

    def stop(self) -> None:
        aloop = self.aloop
        if aloop is None:
            return
        self.aloop = None
        if self.thread is not None and aloop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(self._lifespan_stop(), aloop).result(35)
            except Exception as exc:
                log.error("ASGI lifespan shutdown: %s", exc)
            aloop.call_soon_threadsafe(aloop.stop)
            self.thread.join(10)
            aloop.close()
        if self.bridge is not None:
            self.bridge.close()

    def run(self, ex: Exchange) -> None:
        """Start the app on one exchange (called on the loop's thread)."""
        bridge = self.bridge
        assert bridge is not None
        req = ex.request
        path, _, query = req.target.partition("?")
        if self._server_addr is None:
            self._server_addr = _server_addr(ex)
        scope = {
            "type": "http", "asgi": _ASGI, "http_version": req.version,
            "method": req.method, "scheme": ex.scheme,
            "path": unquote(path), "raw_path": path.encode("ascii"),
            "query_string": query.encode("ascii"), "root_path": self.server.root_path,
            "headers": req.headers, "client": _addr(ex.peer),
            "server": self._server_addr, "state": dict(self.state),
        }
        call = _Call(bridge, ex)
        if not req.complete:
            ex.on_body = lambda data: bridge.to_app(call.body, data, True)
            ex.on_body_end = lambda: bridge.to_app(call.body, b"", False)
        ex.on_disconnect = lambda: bridge.to_app(call.disconnect)

        ex.on_writable = lambda: _io_maybe_resume(call)
        bridge.to_app(_spawn, call, self.app, scope)


def _spawn(call: _Call, app: Any, scope: dict[str, Any]) -> None:
    asyncio.get_running_loop().create_task(call.run(app, scope))


def _addr(peer: Any) -> Any:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return [peer[0], peer[1]]
    return None


def _server_addr(ex: Exchange) -> Any:
    conn = getattr(ex, "conn", None) or getattr(getattr(ex, "h2c", None), "conn", None)
    try:
        return _addr(conn.bind.local_address)
    except AttributeError:
        return None
