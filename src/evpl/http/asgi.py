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
from typing import Any

from evpl.aio import AttachedEventLoop, attach
from evpl.errors import EvplError
from evpl.http._asgi import ASGI_VERSION, AsgiCall, asgi_addr, start
from evpl.http.server import Exchange, Server

__all__ = ["ASGIRunner"]

log = logging.getLogger("evpl.http")

_STARTUP_TIMEOUT = 60.0
_SHUTDOWN_TIMEOUT = 30.0


async def _run(call: AsgiCall, app: Any, scope: dict[str, Any]) -> None:
    """The task of one ASGI ``http`` call: the app, then what it left
    undone (a 500 if it never started a response, the end of the body)."""
    ex = call.ex
    try:
        await app(scope, call.receive, call.send)
    except Exception:
        log.exception("the ASGI app raised on %s %s", scope["method"], scope["path"])
        if not call.started:
            _error(ex)
        elif not call.ended and not ex.closed:
            ex.abort()          # the app failed mid-body: the response is cut
        return
    finally:
        call.ended = True
        # the exchange's callbacks are this call's bound methods: let go
        # of them, or every request would leave a reference cycle for
        # the garbage collector
        ex.on_body = ex.on_body_end = ex.on_disconnect = ex.on_writable = None
    if not call.started:
        if not call.disconnected:       # (a gone client's sends are dropped)
            log.error("the ASGI app returned without a response to %s %s",
                      scope["method"], scope["path"])
        _error(ex)
    elif not ex.ended:
        ex.end()


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
        self._done: asyncio.Future[None] | None = None

    def start(self) -> None:
        loop = self.server.loop
        aloop = self.aloop = attach(loop)
        self._done = aloop.create_future()      # (AsgiCall.send's answer)
        self._done.set_result(None)
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
        scope = {"type": "lifespan", "asgi": ASGI_VERSION, "state": self.state}
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
        if self._server_addr is None:
            self._server_addr = _server_addr(ex)
        start(ex, self.app, aloop, self._done, self.server.root_path, self._server_addr,
              self.state, _run)


def _server_addr(ex: Exchange) -> Any:
    conn = getattr(ex, "conn", None) or getattr(getattr(ex, "h2c", None), "conn", None)
    try:
        return asgi_addr(conn.bind.local_address)
    except AttributeError:
        return None
