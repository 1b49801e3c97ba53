"""WSGI (PEP 3333) on the evpl HTTP server.

A WSGI app blocks, so it runs in a bounded pool of worker threads; the
connections stay on the evpl Loop, and what the app returns comes back to
the loop through a doorbell (one ring per batch of results). The request
body is read in full (up to the server's ``max_body``) before the app is
called and handed to it as ``wsgi.input``; the response body is streamed:
a worker that produces a body faster than the client reads it waits (its
iterator is not advanced) until the connection drains, so a slow client
never makes the server buffer a whole response.
"""

from __future__ import annotations

import io
import logging
import sys
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import unquote

from evpl.http.server import Exchange, Server

__all__ = ["WSGIRunner"]

log = logging.getLogger("evpl.http")

_COALESCE = 64 << 10        # body bytes a worker gathers before handing them over
_STALL = 60.0               # seconds a worker waits for a slow client before giving up


class _Flow:
    """Per-request flow control between a worker and the loop."""

    __slots__ = ("closed", "ex", "writable")

    def __init__(self, ex: Exchange) -> None:
        self.ex = ex
        self.writable = threading.Event()
        self.writable.set()
        self.closed = False


class WSGIRunner:
    """Runs a WSGI app in ``workers`` threads for a :class:`Server`."""


    def __init__(self, server: Server, app: Any, workers: int) -> None:
        self.server = server
        self.app = app
        self.workers = workers
        self.pool: ThreadPoolExecutor | None = None
        self._done: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self._bell: Any = None

    def start(self) -> None:
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="evpl-wsgi")
        self._bell = self.server.loop.doorbell(self._drain)

    def stop(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None
        if self._bell is not None:
            self._bell.close()
            self._bell = None

    def _post(self, fn: Callable[..., Any], *args: Any) -> None:
        self._done.append((fn, args))
        bell = self._bell
        if bell is not None:
            bell.ring()

    def _drain(self) -> None:
        q = self._done
        while q:
            fn, args = q.popleft()
            try:
                fn(*args)
            except Exception:
                log.exception("WSGI result hand-over failed")

    def run(self, ex: Exchange) -> None:
        """Called on the loop's thread: call the app once the body is here."""
        if not ex.request.complete:
            ex.on_body_end = lambda: self.run(ex)
            ex.want_body()
            return
        flow = _Flow(ex)

        def writable() -> None:
            flow.writable.set()

        def gone() -> None:
            flow.closed = True
            flow.writable.set()

        ex.on_writable = writable
        ex.on_disconnect = gone
        environ = self._environ(ex)
        assert self.pool is not None
        self.pool.submit(self._call, flow, environ)

    def _environ(self, ex: Exchange) -> dict[str, Any]:
        req = ex.request
        path, _, query = req.target.partition("?")
        conn = getattr(ex, "conn", None) or getattr(getattr(ex, "h2c", None), "conn", None)
        local = conn.bind.local_address if conn is not None else ("", 0)
        env: dict[str, Any] = {
            "REQUEST_METHOD": req.method,
            "SCRIPT_NAME": self.server.root_path,
            "PATH_INFO": unquote(path, "latin-1"),
            "QUERY_STRING": query,
            "SERVER_NAME": str(local[0]) if isinstance(local, tuple) else "localhost",
            "SERVER_PORT": str(local[1]) if isinstance(local, tuple) else "0",
            "SERVER_PROTOCOL": f"HTTP/{req.version}" if req.version != "2" else "HTTP/2",
            "REMOTE_ADDR": ex.peer[0] if isinstance(ex.peer, tuple) else "",
            "REMOTE_PORT": str(ex.peer[1]) if isinstance(ex.peer, tuple) else "",
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": ex.scheme,
            "wsgi.input": io.BytesIO(req.body),
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
        }
        for k, v in req.headers:
            name = k.decode("latin-1").upper().replace("-", "_")
            value = v.decode("latin-1")
            if name == "CONTENT_TYPE" or name == "CONTENT_LENGTH":
                env[name] = value
                continue
            key = "HTTP_" + name
            if key in env:
                env[key] += ("; " if name == "COOKIE" else ",") + value
            else:
                env[key] = value
        if req.version == "2" and "HTTP_HOST" not in env:
            env["HTTP_HOST"] = env["SERVER_NAME"]
        return env

    # ---- in a worker thread ----
    def _call(self, flow: _Flow, environ: dict[str, Any]) -> None:
        state: dict[str, Any] = {"status": None, "headers": None, "sent": False}

        def start_response(status: str, headers: list[tuple[str, str]],
                           exc_info: Any = None) -> Callable[[bytes], None]:
            if exc_info is not None:
                try:
                    if state["sent"]:
                        raise exc_info[1].with_traceback(exc_info[2])
                finally:
                    exc_info = None
            elif state["status"] is not None:
                raise AssertionError("start_response called twice without exc_info")
            state["status"] = int(status.split(" ", 1)[0])
            state["headers"] = [(k.lower().encode("latin-1"), v.encode("latin-1"))
                                for k, v in headers]
            return write

        pending: list[bytes] = []
        size = 0

        def hand_over(last: bool) -> None:
            nonlocal pending, size
            if state["status"] is None:
                raise RuntimeError("the WSGI app did not call start_response")
            head = None
            if not state["sent"]:
                state["sent"] = True
                head = (state["status"], state["headers"])
            if not last:
                flow.writable.clear()     # set again once the loop has passed them on
            self._post(_deliver, flow, head, pending, last)
            pending = []
            size = 0
            if not last:
                self._wait_writable(flow)

        def write(data: bytes) -> None:
            nonlocal size
            if data:
                pending.append(data)
                size += len(data)
                if size >= _COALESCE:
                    hand_over(False)

        result = None
        try:
            result = self.app(environ, start_response)
            for data in result:
                if flow.closed:
                    break
                if data:
                    pending.append(data)
                    size += len(data)
                    if size >= _COALESCE:
                        hand_over(False)
            hand_over(True)
        except Exception:
            log.exception("the WSGI app raised on %s %s", environ["REQUEST_METHOD"],
                          environ["PATH_INFO"])
            self._post(_fail, flow, state["sent"])
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:
                    log.exception("the WSGI app's close() raised")

    def _wait_writable(self, flow: _Flow) -> None:
        if not flow.writable.wait(_STALL):
            flow.closed = True
            raise TimeoutError(f"client did not read for {_STALL:.0f} s")


def _deliver(flow: _Flow, head: tuple[int, list[tuple[bytes, bytes]]] | None,
             pieces: list[bytes], last: bool) -> None:
    """On the loop: pass a worker's output to the exchange."""
    ex = flow.ex
    if ex.closed:
        flow.closed = True
        flow.writable.set()
        return
    if head is not None:
        status, headers = head
        if last and not any(k == b"content-length" for k, _ in headers):
            headers = [*headers, (b"content-length", b"%d" % sum(map(len, pieces)))]
        ex.start(status, headers)
    for p in pieces:
        ex.write(p)
    if last:
        ex.end()
    elif not ex.paused:
        flow.writable.set()       # else on_writable sets it when the client caught up


def _fail(flow: _Flow, sent: bool) -> None:
    ex = flow.ex
    if ex.closed:
        return
    if not sent:
        ex.start(500, [(b"content-type", b"text/plain"), (b"content-length", b"21")])
        ex.write(b"Internal Server Error")
        ex.end()
    else:
        ex.abort()
