"""An HTTP/1.1 client on an evpl Loop: a keep-alive connection pool per
host, optional pipelining, chunked request bodies, timeouts and optional
redirects.

::

    client = Client(loop)
    resp = client.fetch("GET", "http://127.0.0.1:8000/")   # runs the loop until done
    pending = client.get("http://127.0.0.1:8000/a")         # or: start it, go on
    pending.add_done_callback(lambda p: print(p.result().status))

and in coroutines on evpl's asyncio loop (``evpl.aio.run(main())``)::

    client = Client(asyncio.get_running_loop())
    resp = await client.get("http://127.0.0.1:8000/")

Requests to one host share up to ``max_per_host`` connections; with
``pipeline=N`` up to N requests are in flight on each (the responses come
back in order). A request that fails on a kept-alive connection before any
of its response arrived (the server closed the idle connection) is retried
once on a new one.
"""

from __future__ import annotations

import asyncio
import json as _json
from collections import deque
from collections.abc import Callable, Generator, Iterable
from typing import Any
from urllib.parse import urljoin, urlsplit

from evpl.core.handler import Handler
from evpl.core.loop import Loop, engine_loop, running_aio_loop
from evpl.errors import ConfigError, ConnectionReset, EvplError, TimeoutError
from evpl.http import wire
from evpl.http.wire import HTTPError

__all__ = ["Client", "ClientResponse", "Pending"]

_REDIRECTS = (301, 302, 303, 307, 308)


class ClientResponse:
    """A complete response: ``status``, ``reason``, ``version``, ``headers``
    (lower-case ``(name, value)`` bytes pairs), ``body``, ``trailers``."""

    __slots__ = ("body", "headers", "reason", "status", "trailers", "url", "version")

    def __init__(self, head: wire.Response, body: bytes, url: str) -> None:
        self.status = head.status
        self.reason = head.reason
        self.version = head.version
        self.headers = head.headers
        self.trailers = head.trailers
        self.body = body
        self.url = url

    def header(self, name: str | bytes, default: bytes | None = None) -> bytes | None:
        key = name.lower() if isinstance(name, bytes) else name.lower().encode("latin-1")
        for k, v in self.headers:
            if k == key:
                return v
        return default

    def text(self, encoding: str = "utf-8") -> str:
        return self.body.decode(encoding)

    def json(self) -> Any:
        return _json.loads(self.body)

    def __repr__(self) -> str:
        return f"<ClientResponse {self.status} {self.url}>"


class Pending:
    """A request in progress: ``done()``, ``result()`` (the response, or
    raises the error), ``add_done_callback(fn)``; and awaitable in a
    coroutine on evpl's asyncio loop whose engine is the client's Loop
    (``resp = await client.get(url)``). Cancelling the awaiting task does
    not stop the request: its response is discarded."""

    __slots__ = ("_callbacks", "_error", "_loop", "_result")

    def __init__(self, loop: Loop) -> None:
        self._loop = loop
        self._result: ClientResponse | None = None
        self._error: BaseException | None = None
        self._callbacks: list[Callable[[Pending], Any]] = []

    def __await__(self) -> Generator[Any, None, ClientResponse]:
        if not self.done():
            aloop = running_aio_loop(self._loop, "awaiting a request", "Client.fetch")
            fut: asyncio.Future[None] = aloop.create_future()

            def arrived(_: Pending) -> None:
                if not fut.done():          # (a cancelled await: the response is dropped)
                    fut.set_result(None)

            self.add_done_callback(arrived)
            yield from fut.__await__()
        return self.result()

    def done(self) -> bool:
        return self._result is not None or self._error is not None

    def result(self) -> ClientResponse:
        if self._error is not None:
            raise self._error
        if self._result is None:
            raise EvplError("the request is still in progress")
        return self._result

    def add_done_callback(self, fn: Callable[[Pending], Any]) -> None:
        if self.done():
            fn(self)
        else:
            self._callbacks.append(fn)

    def _set(self, result: ClientResponse | None, error: BaseException | None) -> None:
        if self.done():
            return
        self._result, self._error = result, error
        for fn in self._callbacks:
            fn(self)
        self._callbacks.clear()


class _Req:
    __slots__ = ("body", "head", "host", "method", "pending", "redirects", "retried",
                 "timer", "url")

    def __init__(self, method: str, url: str, head: bytes, body: Any, host: tuple[str, int],
                 pending: Pending, redirects: int) -> None:
        self.method = method
        self.url = url
        self.head = head
        self.body = body
        self.host = host
        self.pending = pending
        self.redirects = redirects
        self.retried = False
        self.timer: Any = None


class _ClientConn(Handler):
    def __init__(self, client: Client, host: tuple[str, int]) -> None:
        self.client = client
        self.host = host
        self.parser = wire.ResponseParser(max_body=client.max_body)
        self.inflight: deque[_Req] = deque()
        self.bind: Any = None
        self.connected = False
        self.used = False
        self.closing = False
        self.head: wire.Response | None = None
        self.parts: list[bytes] = []

    def send(self, r: _Req) -> None:
        self.inflight.append(r)
        self.parser.expect(r.method)
        if self.connected:
            self._write(r)

    def _write(self, r: _Req) -> None:
        body = r.body
        if body is None or isinstance(body, bytes | bytearray | memoryview):
            self.bind.sendv([r.head, body] if body else [r.head])
        else:
            pieces: list[Any] = [r.head]
            for piece in body:
                pieces += wire.chunk(piece)
            pieces.append(wire.last_chunk())
            self.bind.sendv(pieces)

    def on_connected(self, bind: Any) -> None:
        self.connected = True
        for r in self.inflight:
            self._write(r)

    def on_data(self, bind: Any, buf: Any) -> None:
        try:
            events = self.parser.feed(bytes(buf))
        except HTTPError as exc:
            self._fail_all(exc)
            bind.close()
            return
        self._events(events)

    def _events(self, events: list[object]) -> None:
        for ev in events:
            cls = ev.__class__
            if cls is wire.Response:
                if 100 <= ev.status < 200:        # type: ignore[attr-defined]
                    continue
                if ev.complete:                   # type: ignore[attr-defined]
                    self._finish(ev, ev.body)     # type: ignore[arg-type, attr-defined]
                else:
                    self.head = ev                # type: ignore[assignment]
                    self.parts = []
            elif cls is wire.Data:
                self.parts.append(ev.data)        # type: ignore[attr-defined]
            elif cls is wire.EndOfMessage and self.head is not None:
                head, self.head = self.head, None
                self._finish(head, b"".join(self.parts))
                self.parts = []

    def _finish(self, head: wire.Response, body: bytes) -> None:
        if not self.inflight:
            return
        r = self.inflight.popleft()
        self.used = True
        if not head.keep_alive:
            self.closing = True
            self.client._no_keepalive.add(self.host)
        self.client._completed(self, r, ClientResponse(head, body, r.url))
        if self.closing and not self.inflight:
            self.bind.close()

    def on_eof(self, bind: Any) -> None:
        try:
            self._events(self.parser.feed_eof())
        except HTTPError as exc:
            self._fail_all(exc)
        bind.close()

    def on_closed(self, bind: Any, error: EvplError | None) -> None:
        self.client._gone(self)
        for r in self.inflight:
            if self.closing:
                # the server said it would close: it did not read these
                self.client._dispatch(r)
            elif self.used and not r.retried:
                r.retried = True          # a kept-alive connection the server dropped
                self.client._dispatch(r)
            else:
                self.client._fail(r, error or ConnectionReset(
                    "the server closed the connection before the response"))
        self.inflight.clear()

    def _fail_all(self, exc: BaseException) -> None:
        for r in self.inflight:
            self.client._fail(r, exc)
        self.inflight.clear()


class Client:
    """An HTTP/1.1 client on ``loop``: an evpl Loop, or evpl's asyncio
    loop (see the module docstring).

    ``max_per_host``: connections per (host, port); ``pipeline``: requests
    in flight per connection (1 = no pipelining); ``timeout``: seconds for
    a whole request (connect to last byte), ``None`` for none;
    ``follow_redirects``/``max_redirects``; ``headers``: sent with every
    request; ``backend``: the evpl stream backend; ``max_body``: largest
    response body accepted.
    """

    def __init__(self, loop: Any, *, backend: str = "tcp", max_per_host: int = 8,
                 pipeline: int = 1, timeout: float | None = 30.0,
                 follow_redirects: bool = False, max_redirects: int = 10,
                 headers: Iterable[tuple[str, str]] = (), max_body: int = 1 << 30) -> None:
        if not isinstance(max_per_host, int) or max_per_host < 1:
            raise ConfigError(f"max_per_host must be a positive int, got {max_per_host!r}")
        if not isinstance(pipeline, int) or pipeline < 1:
            raise ConfigError(f"pipeline must be a positive int, got {pipeline!r}")
        if timeout is not None and (not isinstance(timeout, int | float) or timeout <= 0):
            raise ConfigError(f"timeout must be None or a positive number, got {timeout!r}")
        self.loop = engine_loop(loop, "evpl.http.Client")
        self.backend = backend
        self.max_per_host = max_per_host
        self.pipeline = pipeline
        self.timeout = timeout
        self.follow_redirects = follow_redirects
        self.max_redirects = max_redirects
        self.max_body = max_body
        self.headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        self._conns: dict[tuple[str, int], list[_ClientConn]] = {}
        self._queued: dict[tuple[str, int], deque[_Req]] = {}
        self._closed = False
        self._no_keepalive: set[tuple[str, int]] = set()

    # ---- public ----
    def request(self, method: str, url: str, *, headers: Iterable[tuple[str, str]] = (),
                body: bytes | Iterable[bytes] | None = None,
                json: Any = None) -> Pending:
        """Start a request; ``body`` is bytes (sent with Content-Length) or an
        iterable of bytes (sent chunked); ``json`` encodes a JSON body."""
        if self._closed:
            raise EvplError("the client is closed")
        hs = list(headers)
        if json is not None:
            body = _json.dumps(json).encode()
            hs.append(("content-type", "application/json"))
        pending = Pending(self.loop)
        self._dispatch(self._build(method, url, hs, body, pending, 0))
        return pending

    def get(self, url: str, **kw: Any) -> Pending:
        return self.request("GET", url, **kw)

    def head(self, url: str, **kw: Any) -> Pending:
        return self.request("HEAD", url, **kw)

    def post(self, url: str, **kw: Any) -> Pending:
        return self.request("POST", url, **kw)

    def put(self, url: str, **kw: Any) -> Pending:
        return self.request("PUT", url, **kw)

    def delete(self, url: str, **kw: Any) -> Pending:
        return self.request("DELETE", url, **kw)

    def fetch(self, method: str, url: str, **kw: Any) -> ClientResponse:
        """Make a request and run the loop until its response is complete
        (for scripts and tests: call it from outside the loop)."""
        p = self.request(method, url, **kw)
        self.loop.run_until(p.done)
        return p.result()

    def close(self) -> None:
        """Close every pooled connection; requests in flight fail."""
        self._closed = True
        for conns in list(self._conns.values()):
            for c in list(conns):
                if c.bind is not None:
                    c.bind.close()
        for q in self._queued.values():
            for r in q:
                self._fail(r, EvplError("the client was closed"))
        self._queued.clear()

    # ---- internals ----
    def _build(self, method: str, url: str, headers: list[tuple[str, str]], body: Any,
               pending: Pending, redirects: int) -> _Req:
        parts = urlsplit(url)
        if parts.scheme != "http":
            raise ConfigError(f"only http:// URLs are supported (no TLS yet), got {url!r}")
        if not parts.hostname:
            raise ConfigError(f"no host in {url!r}")
        port = parts.port or 80
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host_field = parts.netloc.rpartition("@")[2]
        fields: list[tuple[str | bytes, str | bytes]] = [(b"host", host_field.encode("idna"))]
        fields += self.headers
        names = set()
        for k, v in headers:
            fields.append((k, v))
            names.add(k.lower())
        if body is not None and "content-length" not in names \
                and "transfer-encoding" not in names:
            if isinstance(body, bytes | bytearray | memoryview):
                fields.append((b"content-length", b"%d" % len(body)))
            else:
                fields.append((b"transfer-encoding", b"chunked"))
        elif body is None and method in ("POST", "PUT", "PATCH"):
            fields.append((b"content-length", b"0"))
        line = f"{method} {target} HTTP/1.1".encode("ascii")
        head = wire.encode_head(line, fields)
        r = _Req(method, url, head, body, (parts.hostname, port), pending, redirects)
        if self.timeout is not None:
            r.timer = self.loop.call_later(self.timeout, self._expired, r)
        return r

    def _dispatch(self, r: _Req) -> None:
        conns = self._conns.setdefault(r.host, [])
        best = None
        depth = 1 if r.host in self._no_keepalive else self.pipeline
        for c in conns:
            if not c.closing and len(c.inflight) < depth and (
                    best is None or len(c.inflight) < len(best.inflight)):
                best = c
                if not c.inflight:
                    break
        if best is None and len(conns) < self.max_per_host:
            best = _ClientConn(self, r.host)
            try:
                best.bind = self.loop.connect(self.backend, r.host, best)
            except EvplError as exc:
                self._fail(r, exc)
                return
            conns.append(best)
        if best is None:
            self._queued.setdefault(r.host, deque()).append(r)
            return
        best.send(r)

    def _completed(self, conn: _ClientConn, r: _Req, resp: ClientResponse) -> None:
        if self.follow_redirects and resp.status in _REDIRECTS \
                and resp.header(b"location") is not None:
            if r.redirects >= self.max_redirects:
                self._fail(r, EvplError(f"more than {self.max_redirects} redirects"))
            else:
                if r.timer is not None:
                    r.timer.cancel()
                loc = urljoin(r.url, resp.header(b"location").decode("latin-1"))  # type: ignore[union-attr]
                method, body = r.method, r.body
                if resp.status == 303 or (resp.status in (301, 302) and method == "POST"):
                    method, body = ("GET" if method != "HEAD" else "HEAD"), None
                try:
                    nr = self._build(method, loc, [], body, r.pending, r.redirects + 1)
                except EvplError as exc:
                    self._fail(r, exc)
                else:
                    self._dispatch(nr)
        else:
            if r.timer is not None:
                r.timer.cancel()
            r.pending._set(resp, None)
        self._next(conn.host)

    def _next(self, host: tuple[str, int]) -> None:
        q = self._queued.get(host)
        while q:
            r = q.popleft()
            self._dispatch(r)
            if q and q[-1] is r:          # no connection could take it: wait
                return

    def _gone(self, conn: _ClientConn) -> None:
        conns = self._conns.get(conn.host)
        if conns and conn in conns:
            conns.remove(conn)
        if not self._closed:
            self.loop.defer(self._next, conn.host)

    def _fail(self, r: _Req, exc: BaseException) -> None:
        if r.timer is not None:
            r.timer.cancel()
        r.pending._set(None, exc)

    def _expired(self, r: _Req) -> None:
        r.timer = None
        for conns in self._conns.values():
            for c in conns:
                if r in c.inflight:
                    c.inflight.remove(r)
                    self._fail(r, TimeoutError(f"{r.method} {r.url}: no response in "
                                               f"{self.timeout} s"))
                    if c.bind is not None:
                        c.bind.close()
                    return
        q = self._queued.get(r.host)
        if q and r in q:
            q.remove(r)
        self._fail(r, TimeoutError(f"{r.method} {r.url}: no response in {self.timeout} s"))
