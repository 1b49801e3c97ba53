"""The HTTP server: HTTP/1.1 and HTTP/2 on any evpl stream backend.

::

    import evpl
    from evpl.http import Response, Server

    def app(request):
        return Response(b"Hello, world!", content_type="text/plain")

    loop = evpl.Loop()
    server = Server(loop, app)                 # interface="evpl" (native)
    server.listen(("127.0.0.1", 8000))
    loop.run()

Three interfaces run the application:

- ``"evpl"`` (native): ``app(request) -> Response | StreamingResponse |
  Upgrade``, called in the loop; the fastest path. Each read is parsed in one
  go and the responses to all the requests it held (pipelining) leave in one
  ``sendv``.
- ``"asgi"``: an ASGI 3.0 application (``http`` and ``lifespan`` scopes), see
  :mod:`evpl.http.asgi`.
- ``"wsgi"``: a PEP 3333 application run in a bounded pool of worker
  threads, see :mod:`evpl.http.wsgi`.

Every interface sees the same :class:`Exchange` (one request and its
response) whether the request came over HTTP/1.1 or HTTP/2.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from evpl._native.httphead import parse_head
from evpl.core.handler import Handler
from evpl.errors import ConfigError, EvplError
from evpl.http import _fast, wire
from evpl.http.h2wire import H2Server
from evpl.http.wire import H2_PREFACE, HTTPError, Request

__all__ = ["Exchange", "Response", "Server", "StreamingResponse", "Upgrade"]

log = logging.getLogger("evpl.http")
access_log = logging.getLogger("evpl.http.access")

HeaderList = Iterable[tuple[str | bytes, str | bytes]]

# the framing fields that end a response head, by (keep-alive, HTTP/1.0)
_TAILS = {(True, False): b"content-length: %d\r\n\r\n",
          (True, True): b"content-length: %d\r\nconnection: keep-alive\r\n\r\n",
          (False, False): b"content-length: %d\r\nconnection: close\r\n\r\n",
          (False, True): b"content-length: %d\r\nconnection: close\r\n\r\n"}


def _b(s: str | bytes) -> bytes:
    return s if isinstance(s, bytes) else s.encode("latin-1")


class Response:
    """A whole response from a native app: ``body`` (bytes or str, UTF-8),
    ``status``, extra ``headers`` as ``(name, value)`` pairs, and a
    ``content_type`` shortcut. ``Content-Length`` and ``Date`` are added by
    the server."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, body: bytes | str = b"", status: int = 200, headers: HeaderList = (),
                 content_type: str | bytes | None = None) -> None:
        self.body = body if body.__class__ is bytes else _body(body)
        self.status = status
        hs = [(_b(k).lower(), _b(v)) for k, v in headers] if headers else []
        if content_type is not None:
            hs.append((b"content-type", content_type if content_type.__class__ is bytes
                       else _b(content_type)))
        self.headers = hs


def _body(body: bytes | str) -> bytes:
    return body.encode() if isinstance(body, str) else body


class StreamingResponse:
    """A response whose body comes from an iterable of bytes, pulled only as
    fast as the client reads (the iterator is not advanced while the
    connection's send queue is above its high-water mark). Sent chunked
    unless ``headers`` has a ``Content-Length``."""

    __slots__ = ("chunks", "headers", "status")

    def __init__(self, chunks: Iterable[bytes], status: int = 200, headers: HeaderList = (),
                 content_type: str | bytes | None = None) -> None:
        self.chunks = chunks
        self.status = status
        hs = [(_b(k).lower(), _b(v)) for k, v in headers]
        if content_type is not None:
            hs.append((b"content-type", _b(content_type)))
        self.headers = hs


class Upgrade:
    """Switch an HTTP/1.1 connection to another protocol (RFC 9110 7.8):
    the server answers ``101 Switching Protocols`` with ``Upgrade:
    protocol`` and from then on hands the connection to ``handler`` (an
    :class:`evpl.Handler`): ``on_connected(bind)`` first, then ``on_data``
    with any bytes the client sent after the request, and every later
    callback."""

    __slots__ = ("handler", "headers", "protocol")

    def __init__(self, protocol: str, handler: Handler, headers: HeaderList = ()) -> None:
        self.protocol = protocol
        self.handler = handler
        self.headers = [(_b(k).lower(), _b(v)) for k, v in headers]


class Exchange:
    """One request and its response, whatever the HTTP version: what the
    ASGI and WSGI adapters (and streaming native responses) drive, on the
    loop's thread.

    ``start(status, headers)``, then ``write(data)`` any number of times,
    then ``end(trailers)``. ``paused`` is true while the client is slow
    (the connection's send queue, or the HTTP/2 flow-control window, is
    full); ``on_writable`` (if set) is called when it drains. Request body
    pieces arrive through ``on_body(data)`` and ``on_body_end()`` when the
    adapter sets them (else they are collected in ``request.body``);
    ``on_disconnect()`` reports a client that went away.
    """

    __slots__ = ("_body_parts", "closed", "ended", "on_body", "on_body_end",
                 "on_disconnect", "on_writable", "peer", "request", "scheme", "started",
                 "status")

    def __init__(self, request: Request, peer: Any, scheme: str = "http") -> None:
        self.request = request
        self.peer = peer
        self.scheme = scheme
        self.started = False
        self.ended = False
        self.closed = False
        self.status = 0
        self.on_body: Callable[[bytes], Any] | None = None
        self.on_body_end: Callable[[], Any] | None = None
        self.on_writable: Callable[[], Any] | None = None
        self.on_disconnect: Callable[[], Any] | None = None
        self._body_parts: list[bytes] = []

    @property
    def paused(self) -> bool:
        raise NotImplementedError

    def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        raise NotImplementedError

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def end(self, trailers: list[tuple[bytes, bytes]] | None = None) -> None:
        raise NotImplementedError

    def want_body(self) -> None:
        """The app is ready for the request body (sends ``100 Continue`` to a
        client that waits for it)."""

    def abort(self) -> None:
        """The response cannot be completed (the app failed after it started):
        cut it so the client cannot mistake it for a whole one (HTTP/1.1:
        close the connection; HTTP/2: reset the stream)."""
        raise NotImplementedError

    # the transport's side
    _body = _fast.exchange_body
    _body_end = _fast.exchange_body_end


class _Native:
    """The native interface: the app is called in the loop."""

    def __init__(self, server: Server, app: Callable[[Request], Any]) -> None:
        self.server = server
        self.app = app

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def call(self, req: Request) -> Any:
        """The app's response to ``req``; an exception becomes a 500."""
        try:
            return self.app(req)
        except Exception:
            return self.failed(req)

    def failed(self, req: Request) -> Response:
        """The app raised on ``req`` (called in the except block): log, 500."""
        log.exception("the app raised on %s %s", req.method, req.target)
        return Response(b"Internal Server Error", 500, content_type=b"text/plain")

    def run(self, ex: Exchange) -> None:
        """Serve ``ex`` once its body is complete (used by HTTP/2 and for
        requests with bodies)."""
        if not ex.request.complete:
            ex.on_body_end = lambda: self.run(ex)
            ex.want_body()
            return
        self.answer(ex, self.call(ex.request))

    def answer(self, ex: Exchange, resp: Any) -> None:
        """Send what the app returned on ``ex``: a Response, a streaming
        response, or (anything else) a logged 500."""
        if isinstance(resp, Response):
            hs = resp.headers
            if resp.status >= 200 and resp.status not in (204, 304):
                hs = [*hs, (b"content-length", b"%d" % len(resp.body))]
            ex.start(resp.status, hs)
            if resp.body:
                ex.write(resp.body)
            ex.end()
        elif isinstance(resp, StreamingResponse):
            _Pump(ex, resp).start()
        else:
            log.error("the app returned %r, not a Response", resp)
            ex.start(500, [(b"content-type", b"text/plain")])
            ex.write(b"Internal Server Error")
            ex.end()


class _Pump:
    """Feeds a StreamingResponse to an Exchange as fast as the client reads."""

    def __init__(self, ex: Exchange, resp: StreamingResponse) -> None:
        self.ex = ex
        self.resp = resp
        self.it: Iterator[bytes] | None = None

    def start(self) -> None:
        self.ex.start(self.resp.status, self.resp.headers)
        self.it = iter(self.resp.chunks)
        self.ex.on_writable = self.pump
        self.pump()

    def pump(self) -> None:
        ex = self.ex
        it = self.it
        if it is None:
            return
        try:
            while not ex.paused and not ex.closed:
                try:
                    data = next(it)
                except StopIteration:
                    self.it = None
                    ex.end()
                    return
                if data:
                    ex.write(_b(data) if isinstance(data, str) else data)
        except Exception:
            log.exception("a streaming response raised")
            self.it = None
            ex.abort()
        if ex.closed:
            self.it = None
            close = getattr(it, "close", None)
            if close is not None:
                close()


#: An exchange on an HTTP/1.1 connection (compiled; ``Exchange``'s interface).
_H1Exchange = _fast.H1Exchange


class _Conn(Handler):
    """One HTTP connection (HTTP/1.1, or HTTP/2 after a preface or an h2c upgrade)."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.bind: Any = None
        self.peer: Any = None
        self.parser = wire.RequestParser(**server._parser_limits)
        self.last = 0.0
        self.head_since = 0.0
        self.write_paused = False
        self.current: _H1Exchange | None = None
        self.backlog: deque[object] = deque()
        self.h2: Any = None
        self.upgraded: Handler | None = None
        self.sniffed = False
        self.plain = False                # on_data's fast path applies
        self.closing = False
        self.handling = False
        self.over_limit = False

    # ---- evpl.Handler ----
    def on_connected(self, bind: Any) -> None:
        server = self.server
        self.bind = bind
        self.peer = bind.peer_address
        self.last = server.loop.now()
        server._conns.add(self)
        if len(server._conns) > server.max_connections or server.draining:
            # answered 503 once its request arrives: closing before reading
            # it would make the kernel reset the connection, dropping the answer
            self.over_limit = True

    # the common case (HTTP/1.1, sniffed, in limits: ``plain``) in C, the
    # rest in on_data_slow
    on_data = _fast.on_data

    def on_data_slow(self, bind: Any, buf: Any) -> None:
        """``on_data`` for a connection that is not ``plain``."""
        if self.upgraded is not None:
            self.upgraded.on_data(bind, buf)
            return
        # a copy, and the pool buffer let go at once: an app's exception
        # traceback (kept by a log handler) must not pin pool memory
        data = bytes(buf)
        del buf
        if self.h2 is not None:
            self.h2.data(data)
            return
        self.last = self.server.loop.now()
        if self.over_limit:
            if not self.closing:
                self.server.refused += 1
                self._refuse(HTTPError(503, "too many connections"))
            return
        if not self.sniffed:
            if self.parser.buffered + len(data) < len(H2_PREFACE) and \
                    H2_PREFACE.startswith(data):
                self.parser._buf += data      # wait for the rest of a possible preface
                return
            self.sniffed = True
            self.plain = not self.over_limit
            if self.parser.buffered:
                data = self.parser.take_rest() + data
            if data.startswith(H2_PREFACE) and self.server.http2:
                self._to_h2(data, None)
                return
        self._feed(data)

    def on_paused(self, bind: Any) -> None:
        self.write_paused = True
        bind.pause_reading()              # HTTP/2 too: acks and answers queue otherwise

    def on_writable(self, bind: Any) -> None:
        self.write_paused = False
        if self.h2 is not None:
            bind.resume_reading()
            self.h2.writable()
            return
        ex = self.current
        if ex is not None and ex.on_writable is not None:
            ex.on_writable()
        if not self.write_paused and len(self.backlog) < self.server.max_pipeline:
            bind.resume_reading()

    def on_eof(self, bind: Any) -> None:
        if self.upgraded is not None:
            self.upgraded.on_eof(bind)
            return
        if self.current is None and not self.backlog:
            bind.finish()
        else:
            self.parser.stopped = True        # answer what was asked, then close

    def on_closed(self, bind: Any, error: EvplError | None) -> None:
        self.server._conns.discard(self)
        if self.upgraded is not None:
            self.upgraded.on_closed(bind, error)
        if self.h2 is not None:
            self.h2.closed()
        ex = self.current
        if ex is not None and not ex.closed:
            ex.closed = True
            if ex.on_disconnect is not None:
                ex.on_disconnect()
        self.current = None
        self.backlog.clear()

    # ---- HTTP/1.1 ----
    def _feed(self, data: bytes) -> None:
        parser = self.parser
        try:
            events = parser.feed(data)
        except HTTPError as exc:
            self._handle(parser.pending)
            self._refuse(exc)
            return
        if parser.in_head:
            if not self.head_since:
                self.head_since = self.last
        else:
            self.head_since = 0.0
        if events:
            self._handle(events)

    def _handle(self, events: list[object]) -> None:
        """Serve the events of one read in order. Native requests are answered
        at once, all their responses in one sendv; the body events of the
        exchange in progress go to it; requests that arrive while an exchange
        is in progress wait in the backlog (pipelining, responses in order)."""
        self.handling = True
        try:
            self._handle_events(events)
        finally:
            self.handling = False
        if self.current is None and (self.parser.stopped or self.write_paused or
                                     not self.bind.reading):
            self._idle()

    def _handle_events(self, events: list[object]) -> None:
        server = self.server
        native = server._native
        out: list[Any] = []
        n = len(events)
        i = 0
        while i < n:
            ev = events[i]
            if self.current is not None or self.backlog or self.closing:
                if self.closing:
                    break
                if not self.backlog and ev.__class__ is not Request:
                    i += 1
                    self._dispatch(ev)       # the body of the exchange in progress
                    continue
                self._send(out)
                self.backlog.extend(events[i:])
                if len(self.backlog) >= server.max_pipeline:
                    self.bind.pause_reading()
                return
            i += 1
            if ev.__class__ is Request and ev.complete and native is not None \
                    and ev.upgrade is None:       # type: ignore[attr-defined]
                try:
                    resp = native.app(ev)
                except Exception:
                    resp = native.failed(ev)     # type: ignore[arg-type]
                if resp.__class__ is Response:
                    if not self._encode(out, ev, resp):  # type: ignore[arg-type]
                        self._send(out)
                        self._close_after_send()
                        return
                    continue
                self._send(out)
                out = []
                self._begin(ev, resp)            # type: ignore[arg-type]
            else:
                self._send(out)
                out = []
                self._dispatch(ev)
        self._send(out)

    def _close_after_send(self) -> None:
        self.closing = True
        self.backlog.clear()
        self.bind.finish()

    def _send(self, out: list[Any]) -> None:
        if out:
            self.bind.sendv(out)

    def _encode(self, out: list[Any], req: Request, resp: Response) -> bool:
        """Append the response's bytes to ``out``; False if the connection
        must close after it."""
        server = self.server
        body = resp.body
        status = resp.status
        keep = req.keep_alive and not server.draining
        try:
            line = server._status_lines[status]
            block = server._block(resp.headers)
        except (KeyError, ValueError):
            try:
                line = server._status_line(status)
                block = server._block(resp.headers)
            except ValueError as bad:
                log.error("bad response from the app: %s", bad)
                out.append(_fast.head(server, 500, [], [(b"content-length", b"0"),
                                                        (b"connection", b"close")]))
                return False
        if status >= 200 and status != 204 and status != 304:
            tail = _TAILS[keep, req.version == "1.0"] % len(body)
            if body and req.method != "HEAD":
                if len(body) <= 2048:     # one piece: fewer iovecs for the writev
                    out.append(b"".join((line, server._date, block, tail, body)))
                else:
                    out.append(b"".join((line, server._date, block, tail)))
                    out.append(body)
            else:
                out.append(b"".join((line, server._date, block, tail)))
        else:
            out.append(b"".join((line, server._date, block,
                                 b"\r\n" if keep else b"connection: close\r\n\r\n")))
        if server.access_log:
            server._log_access(self.peer, req, status, len(body))
        return keep

    def _begin(self, req: Request, resp: Any) -> None:
        """A native response that is not a plain Response."""
        ex = _H1Exchange(self, req)
        self.current = ex
        if isinstance(resp, StreamingResponse):
            _Pump(ex, resp).start()
        elif isinstance(resp, Upgrade) and req.upgrade is not None:
            self._upgrade(ex, resp)
        else:
            if not isinstance(resp, Upgrade):
                log.error("the app returned %r, not a Response", resp)
            ex.start(500, [(b"content-length", b"21")])
            ex.write(b"Internal Server Error")
            ex.end()

    def _upgrade(self, ex: _H1Exchange, up: Upgrade) -> None:
        bind = self.bind
        self.current = None
        rest = self.parser.take_rest()
        bind.send(wire.encode_head(b"HTTP/1.1 101 Switching Protocols",
                                   [(b"connection", b"upgrade"), (b"upgrade", up.protocol),
                                    *up.headers]))
        self.upgraded = up.handler
        self.plain = False
        self.backlog.clear()
        up.handler.on_connected(bind)
        if rest:
            up.handler.on_data(bind, rest)

    def _dispatch(self, ev: object) -> None:
        """One event for an exchange driven by an adapter (or a native request
        with a body, or an upgrade)."""
        cls = ev.__class__
        if cls is Request:
            req: Request = ev  # type: ignore[assignment]
            if req.upgrade is not None:
                self._upgrade_request(req)
                return
            ex = _H1Exchange(self, req)
            self.current = ex
            self.server._runner.run(ex)
        elif cls is wire.Data:
            if self.current is not None:
                self.current._body(ev.data)    # type: ignore[attr-defined]
        elif cls is wire.EndOfMessage:
            if self.current is not None:
                self.current.request.trailers = ev.trailers  # type: ignore[attr-defined]
                self.current._body_end()

    def _upgrade_request(self, req: Request) -> None:
        """A request that asks to switch protocols: h2c is ours, others go
        to a native app (which may answer :class:`Upgrade`); otherwise it is
        served as a plain request and parsing goes on."""
        if req.upgrade.lower() == b"h2c" and self.server.http2 and req.complete \
                and req.header(b"http2-settings") is not None:       # type: ignore[union-attr]
            self._to_h2(self.parser.take_rest(), req)
            return
        native = self.server._native
        resp = native.call(req) if native is not None and req.complete else None
        if isinstance(resp, Upgrade):
            self._begin(req, resp)
            return
        req.upgrade = None
        self.parser.stopped = False
        if resp is None:
            self._dispatch(req)
        elif isinstance(resp, Response):
            out: list[Any] = []
            keep = self._encode(out, req, resp)
            self._send(out)
            if not keep:
                self._close_after_send()
                return
        else:
            self._begin(req, resp)
        self._resume_parser()

    def _resume_parser(self) -> None:
        try:
            events = self.parser.feed(b"")
        except HTTPError as exc:
            self._handle(self.parser.pending)
            self._refuse(exc)
            return
        if events:
            self._handle(events)

    def _exchange_done(self, ex: _H1Exchange) -> None:
        """The current response is complete: close or go on with the backlog."""
        if self.current is not ex:
            return
        if self.server.access_log:
            self.server._log_access(self.peer, ex.request, ex.status, -1)
        if not ex.request.complete:
            # answered before the body was read: the rest of the body is
            # unread, so the connection cannot be reused
            ex.keep_alive = False
        self.current = None
        # the adapters' callbacks (bound to the objects that hold ``ex``) are
        # done with: dropping them leaves no reference cycle per request
        ex.on_body = ex.on_body_end = ex.on_writable = ex.on_disconnect = None
        if not ex.keep_alive or self.server.draining:
            self._close_after_send()
            return
        if self.handling:
            return                        # _handle goes on with the rest of its read
        backlog = self.backlog
        if backlog and self.server._native is None and backlog[0].__class__ is Request:
            # an adapter's next pipelined request: start it, the rest stay
            # queued (no pass over the whole backlog per request)
            self.handling = True
            try:
                self._dispatch(backlog.popleft())
            finally:
                self.handling = False
            if self.current is not None or self.closing:
                return
        if backlog:
            events = list(self.backlog)
            self.backlog.clear()
            self._handle(events)
        else:
            self._idle()

    def _idle(self) -> None:
        """Nothing in progress: close if the client asked to, else read on."""
        if self.current is None and not self.backlog and not self.closing \
                and self.upgraded is None and self.h2 is None:
            if self.parser.stopped:
                self._close_after_send()
            elif not self.write_paused:
                self.bind.resume_reading()

    def _refuse(self, exc: HTTPError) -> None:
        """Answer a request that broke the rules, then close."""
        self.server.protocol_errors += 1
        self.parser.stopped = True
        if self.current is not None or self.backlog:
            # answer the requests before it first, then close
            self.backlog.clear()
            if self.current is not None:
                self.current.keep_alive = False
            return
        self.closing = True
        body = exc.detail.encode("utf-8", "replace") + b"\n"
        try:
            head = _fast.head(self.server, exc.status, [(b"content-type", b"text/plain")],
                              [(b"content-length", b"%d" % len(body)), (b"connection", b"close")])
            self.bind.sendv([head, body])
        except EvplError:
            pass
        self.bind.finish()

    def _to_h2(self, data: bytes, upgrade_req: Request | None) -> None:
        from evpl.http.h2 import H2Connection

        self.plain = False
        self.h2 = H2Connection(self, upgrade_req)
        if data:
            self.h2.data(data)

    def _timeout(self, now: float) -> None:
        """Called by the server's sweep: enforce the header and idle timeouts."""
        server = self.server
        if self.bind is None or self.bind.closed or self.upgraded is not None:
            return
        if self.h2 is not None:
            if self.h2.idle and now - self.last > server.keepalive_timeout:
                self.h2.goaway()
            return
        if self.current is not None or self.backlog:
            return
        if self.head_since and now - self.head_since > server.header_timeout:
            server.timeouts += 1
            self._refuse(HTTPError(408, "request head not received in time"))
        elif now - self.last > server.keepalive_timeout:
            server.timeouts += 1
            if self.parser.idle:
                self.bind.close()
            else:
                self._refuse(HTTPError(408, "request not received in time"))


_H2_OPTIONS = ("max_concurrent_streams", "initial_window", "connection_window", "max_resets",
               "max_control", "max_continuations")


def _h2_options(options: dict[str, int] | None, max_head: int) -> dict[str, Any]:
    """``Server(http2_options=...)`` checked (by making a core with them)
    and completed with the header list size the head limit gives."""
    opts = dict(options or {})
    unknown = sorted(set(opts) - set(_H2_OPTIONS))
    if unknown:
        raise ConfigError(f"unknown http2_options {unknown}; known: {list(_H2_OPTIONS)}")
    for name, v in opts.items():
        if not isinstance(v, int) or isinstance(v, bool):
            raise ConfigError(f"http2_options[{name!r}] must be an int, got {v!r}")
    opts["max_header_list_size"] = max_head
    try:
        H2Server(**opts)
    except ValueError as exc:
        raise ConfigError(f"http2_options: {exc}") from None
    return opts


class Server:
    """An HTTP/1.1 and HTTP/2 (h2c) server for ``app`` on ``loop``.

    ``interface``: ``"evpl"`` (native ``app(request) -> Response``), ``"asgi"``
    or ``"wsgi"``. Limits: ``max_line`` (request line, 414), ``max_head`` (the
    whole head, 431), ``max_headers`` (431), ``max_body`` (413),
    ``max_connections`` (beyond it a new connection gets 503 and is closed),
    ``max_pipeline`` (pipelined requests queued per connection before it
    stops reading). Timeouts, in seconds: ``header_timeout`` (the time a
    client has to send a whole request head once it started: slowloris),
    ``keepalive_timeout`` (an idle connection is closed). ``workers``: the
    WSGI thread pool size. ``access_log``: one line per request on the
    ``evpl.http.access`` logger (off by default: it costs).
    ``server_header``: value of a ``Server`` field (none by default).
    ``http2``: accept HTTP/2 (prior knowledge and the ``h2c`` upgrade).
    ``http2_options``: the HTTP/2 limits and windows, by name (defaults in
    brackets): ``max_concurrent_streams`` [128], ``initial_window`` (each
    stream's receive window) [262144], ``connection_window`` [1 MiB],
    ``max_resets`` and ``max_control`` (RST_STREAM, and SETTINGS/PING/
    PRIORITY frames, per second from a client before the server goes away:
    rapid reset and floods) [200, 1000], ``max_continuations`` (CONTINUATION
    frames per header block) [64].

    Counters: ``timeouts`` (connections closed by the header or idle
    timeout), ``refused`` (503s past ``max_connections``),
    ``protocol_errors`` (requests refused by the parser, HTTP/2 protocol
    errors); ``connections`` is the number open now.
    """

    def __init__(self, loop: Any, app: Any, *, interface: str = "evpl",
                 max_line: int = 8190, max_head: int = 65536, max_headers: int = 100,
                 max_body: int = 16 << 20, max_connections: int = 10000,
                 max_pipeline: int = 64, header_timeout: float = 10.0,
                 keepalive_timeout: float = 5.0, workers: int = 16, access_log: bool = False,
                 server_header: str | None = None, http2: bool = True,
                 http2_options: dict[str, int] | None = None, root_path: str = "") -> None:
        for name, v in (("max_connections", max_connections), ("max_pipeline", max_pipeline),
                        ("workers", workers)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{name} must be a positive int, got {v!r}")
        for name, t in (("header_timeout", header_timeout),
                        ("keepalive_timeout", keepalive_timeout)):
            if not isinstance(t, int | float) or isinstance(t, bool) or t <= 0:
                raise ConfigError(f"{name} must be a positive number of seconds, got {t!r}")
        if not callable(app):
            raise ConfigError(f"app must be callable, got {app!r}")
        self.loop = loop
        self.app = app
        self._parser_limits = {"max_line": max_line, "max_head": max_head,
                               "max_headers": max_headers, "max_body": max_body}
        wire.RequestParser(**self._parser_limits)      # checks the limits now
        self._parser_limits["head_parser"] = parse_head
        self.max_body = max_body
        self.max_connections = max_connections
        self.max_pipeline = max_pipeline
        self.header_timeout = float(header_timeout)
        self.keepalive_timeout = float(keepalive_timeout)
        self.access_log = access_log
        self.http2 = http2
        self._h2_options = _h2_options(http2_options, max_head)
        self.root_path = root_path
        self.draining = False
        self.timeouts = 0
        self.refused = 0
        self.protocol_errors = 0
        self._conns: set[_Conn] = set()
        self._listeners: list[Any] = []
        self._server_field = (b"server: " + server_header.encode("latin-1") + b"\r\n"
                              if server_header else b"")
        self._status_lines: dict[int, bytes] = {}
        self._blocks: dict[tuple[tuple[bytes, bytes], ...], bytes] = {}
        for st in (200, 201, 204, 301, 302, 304, 400, 404, 500):
            self._status_line(st)
        self._date = b""
        self._tick()
        self._clock = loop.call_every(1.0, self._tick)
        period = max(0.05, min(1.0, self.header_timeout / 4, self.keepalive_timeout / 4))
        self._sweeper = loop.call_every(period, self._sweep)
        self.interface = interface
        self._native: _Native | None = None
        if interface == "evpl":
            self._native = _Native(self, app)
            self._runner: Any = self._native
        elif interface == "asgi":
            from evpl.http.asgi import ASGIRunner

            self._runner = ASGIRunner(self, app)
        elif interface == "wsgi":
            from evpl.http.wsgi import WSGIRunner

            self._runner = WSGIRunner(self, app, workers)
        else:
            self._clock.cancel()
            self._sweeper.cancel()
            raise ConfigError(f"interface must be 'evpl', 'asgi' or 'wsgi', got {interface!r}")
        self._runner.start()

    # ---- public ----
    def listen(self, address: Any = ("127.0.0.1", 8000), backend: str = "tcp",
               **options: Any) -> Any:
        """Accept connections on ``address`` over a stream ``backend``; returns
        the Listener (its ``address`` has the port picked for port 0)."""
        listener = self.loop.listen(backend, address, self._new_conn, **options)
        self._listeners.append(listener)
        return listener

    def listen_shard(self, shard: Any, name: str, **options: Any) -> Any:
        """Accept connections on the shard group's listener ``name`` (see
        ``evpl.shards.run(listen=...)``): each shard runs its own Server on
        its own SO_REUSEPORT socket of the group; returns the Listener."""
        listener = shard.listen(name, self._new_conn, **options)
        self._listeners.append(listener)
        return listener

    @property
    def connections(self) -> int:
        """Connections open now."""
        return len(self._conns)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Graceful stop, run from outside the loop (it runs the loop): stop
        accepting, close idle connections, let in-flight requests finish
        (their responses carry ``Connection: close``) for up to ``timeout``
        seconds, then close what is left and stop the app interface."""
        self.draining = True
        for listener in self._listeners:
            listener.close()
        for conn in list(self._conns):
            if conn.h2 is not None:
                conn.h2.goaway()
            elif conn.current is None and not conn.backlog and conn.bind is not None:
                conn.bind.close()
        try:
            self.loop.run_until(lambda: not self._conns, timeout=timeout)
        except EvplError:
            log.warning("shutdown: %d connection(s) still busy after %.1f s, closing them",
                        len(self._conns), timeout)
        self.close()

    def close(self) -> None:
        """Stop now: close listeners and connections, stop the interface."""
        self.draining = True
        for listener in self._listeners:
            listener.close()
        self._listeners.clear()
        for conn in list(self._conns):
            if conn.bind is not None:
                conn.bind.close()
        self._clock.cancel()
        self._sweeper.cancel()
        self._runner.stop()

    # ---- internals ----
    def _new_conn(self) -> _Conn:
        return _Conn(self)

    def _tick(self) -> None:
        self._date = b"date: " + wire.format_date() + b"\r\n" + self._server_field

    def _sweep(self) -> None:
        now = self.loop.now()
        for conn in list(self._conns):
            conn._timeout(now)

    def _status_line(self, status: int) -> bytes:
        line = self._status_lines.get(status)
        if line is None:
            if not isinstance(status, int) or isinstance(status, bool) or \
                    not 100 <= status <= 999:
                raise ValueError(f"bad status {status!r}")
            line = wire.status_line(status) + b"\r\n"
            if len(self._status_lines) < 64:
                self._status_lines[status] = line
        return line

    def _block(self, headers: list[tuple[bytes, bytes]]) -> bytes:
        """The app's header fields as bytes, checked (no CR/LF injection, no
        invalid names); blocks seen before come from a small cache."""
        if not headers:
            return b""
        key = tuple(headers)
        block = self._blocks.get(key)
        if block is None:
            parts: list[bytes] = []
            for k, v in headers:
                wire._check_field(k, v)
                parts += (k, b": ", v, b"\r\n")
            block = b"".join(parts)
            if len(self._blocks) >= 256:
                self._blocks.clear()
            self._blocks[key] = block
        return block

    def _log_access(self, peer: Any, req: Request, status: int, size: int) -> None:
        host = peer[0] if isinstance(peer, tuple) else peer
        access_log.info('%s - "%s %s HTTP/%s" %d %s', host, req.method, req.target,
                        req.version, status, size if size >= 0 else "-")


_fast.configure(Request, Response)
