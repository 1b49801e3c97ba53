"""HTTP/2 (RFC 9113) on an evpl connection, on evpl's own sans-I/O core
:mod:`evpl.http.h2wire` (frames, stream states, flow control, HPACK; Cython).

A connection becomes HTTP/2 when it starts with the client preface (prior
knowledge) or after an ``Upgrade: h2c`` request (RFC 7540 3.2; the request
becomes stream 1). Everything a read produces (responses, WINDOW_UPDATEs,
SETTINGS and PING acks) leaves in one send at the end of the read.

The common case stays out of Python objects of its own: a request that
arrives whole (HEADERS with END_STREAM) for a native app becomes a
:class:`~evpl.http.wire.Request`, the app's :class:`Response` goes back
through one ``H2Server.respond`` call (HEADERS and DATA). Everything else
(request bodies, streaming responses, ASGI, WSGI) is an
:class:`~evpl.http.server.Exchange` per stream, so the same apps serve it.

Flow control meets the engine's backpressure twice: a stream's response
body waits for the peer's window (``Exchange.paused`` while it does), and
the whole connection stops reading while the Bind's send queue is above its
high-water mark. Request bodies are acknowledged (window given back) as
they are read, up to the server's ``max_body``.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections import deque
from typing import Any

from evpl.http import h2wire
from evpl.http.h2wire import H2Server
from evpl.http.server import Exchange, Response
from evpl.http.wire import Request

__all__ = ["H2Connection"]

log = logging.getLogger("evpl.http")

_STREAM_BUFFER = 1 << 20       # a stream's unsent body above this pauses its writer
_EMPTY = [(b"content-length", b"0")]
_EV_REQUEST = h2wire.EV_REQUEST
_EV_DATA = h2wire.EV_DATA
_EV_END = h2wire.EV_END
_EV_RESET = h2wire.EV_RESET
_EV_WINDOW = h2wire.EV_WINDOW
_EV_GOAWAY = h2wire.EV_GOAWAY
_EV_ERROR = h2wire.EV_ERROR


class _H2Exchange(Exchange):
    __slots__ = ("body_size", "done", "h2c", "head_only", "pending", "pending_bytes", "sid",
                 "trailers", "want_end")

    def __init__(self, h2c: H2Connection, sid: int, req: Request) -> None:
        super().__init__(req, h2c.conn.peer)
        self.h2c = h2c
        self.sid = sid
        self.pending: deque[tuple[bytes, int]] = deque()
        self.pending_bytes = 0
        self.want_end = False
        self.done = False
        self.head_only = req.method == "HEAD"
        self.trailers: list[tuple[bytes, bytes]] | None = None
        self.body_size = 0

    @property
    def paused(self) -> bool:
        return self.pending_bytes > _STREAM_BUFFER or self.h2c.conn.write_paused

    def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        if self.started or self.closed:
            return
        self.started = True
        core = self.h2c.core
        try:
            hs = [(k.lower(), v) for k, v in headers]
            if not 200 <= status <= 999:
                raise ValueError(f"bad final status {status!r}")
            core.send_headers(self.sid, status, hs)
        except (ValueError, TypeError, AttributeError) as exc:
            log.error("bad response from the app: %s", exc)
            status = 500
            self.head_only = True             # no body after this head
            core.send_headers(self.sid, 500, _EMPTY)
        self.status = status
        self.h2c._arm_flush()

    def write(self, data: bytes) -> None:
        if self.closed or self.ended or not data:
            return
        if not self.started:
            self.start(200, [])
        if self.head_only:
            return
        data = bytes(data)
        self.pending.append((data, 0))
        self.pending_bytes += len(data)
        self.h2c.drain(self)

    def abort(self) -> None:
        self.ended = True
        if not self.closed:
            self.h2c._refuse(self, 500)

    def end(self, trailers: list[tuple[bytes, bytes]] | None = None) -> None:
        if self.ended:
            return
        if not self.started:
            self.start(200, _EMPTY)
        self.ended = True
        self.want_end = True
        self.trailers = [(k.lower(), v) for k, v in trailers] if trailers else None
        if not self.closed:
            self.h2c.drain(self)


class H2Connection:
    """The HTTP/2 side of one server connection (``conn`` is its
    ``evpl.http.server._Conn``)."""

    def __init__(self, conn: Any, upgrade_req: Request | None) -> None:
        self.conn = conn
        server = self.server = conn.server
        self.bind = conn.bind
        self.core = H2Server(**server._h2_options)
        field = server._server_field             # b"server: name\r\n" or b""
        self._server_name = field[8:-2] if field else None
        self._date_src = b""
        self._set_date()
        self.streams: dict[int, _H2Exchange] = {}
        self._flush_armed = False
        if upgrade_req is not None:
            settings = upgrade_req.header(b"http2-settings") or b""
            try:
                self.core.apply_settings(base64.urlsafe_b64decode(
                    settings + b"=" * (-len(settings) % 4)))
            except (ValueError, binascii.Error):
                self.bind.send(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n"
                               b"connection: close\r\n\r\n")
                self.bind.finish()
                self.core.dead = True           # nothing more in or out
                self.core.data_to_send()
                return
            self.bind.send(b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\n"
                           b"upgrade: h2c\r\n\r\n")
            self.core.upgraded_stream()
            upgrade_req.keep_alive = True
            self._new_stream(1, upgrade_req, b"http")
        self.flush()

    @property
    def idle(self) -> bool:
        return not self.streams and not self.core.nstreams

    def _set_date(self) -> None:
        src = self.server._date
        self._date_src = src
        self.core.set_date(src[6:src.index(b"\r\n")], self._server_name)

    # ---- from the connection ----
    def data(self, data: bytes) -> None:
        server = self.server
        self.conn.last = now = server.loop.now()
        if server._date is not self._date_src:
            self._set_date()
        core = self.core
        native = server._native
        streams = self.streams
        for ev in core.receive(data, now):
            kind = ev[0]
            if kind == _EV_REQUEST:
                sid = ev[1]
                method = ev[2]
                req = Request(method, ev[3], "2", ev[6])
                if native is not None and ev[7]:
                    # the common case: a whole request to a native app
                    try:
                        resp = native.app(req)
                    except Exception:
                        resp = native.failed(req)
                    if resp.__class__ is Response:
                        self._respond(sid, req, resp)
                        continue
                    native.answer(self._new_stream(sid, req, ev[5], run=False), resp)
                    continue
                req.complete = ev[7]
                ex = self._new_stream(sid, req, ev[5], run=False)
                if not req.complete:
                    cl = req.header(b"content-length")
                    if cl is not None and int(cl) > server.max_body:
                        self._refuse(ex, 413)
                        continue
                server._runner.run(ex)
            elif kind == _EV_DATA:
                sid = ev[1]
                data = ev[2]
                core.acknowledge(sid, len(data))
                ex = streams.get(sid)
                if ex is not None:
                    ex.body_size += len(data)
                    if ex.body_size > server.max_body:
                        self._refuse(ex, 413)
                        continue
                    if data:
                        ex._body(data)
                    if ev[3] and not ex.request.complete:
                        ex._body_end()
            elif kind == _EV_END:
                ex = streams.get(ev[1])
                if ex is not None and not ex.request.complete:
                    ex.request.trailers = ev[2]
                    ex._body_end()
            elif kind == _EV_RESET:
                ex = streams.pop(ev[1], None)
                if ex is not None:
                    self._lost(ex)
            elif kind == _EV_WINDOW:
                self._wake()
            elif kind == _EV_GOAWAY:
                for ex in list(streams.values()):
                    if ex.sid > ev[1]:
                        streams.pop(ex.sid, None)
                        self._lost(ex)
                if not streams:
                    self.flush()
                    self.bind.finish()
                    return
            elif kind == _EV_ERROR:
                log.debug("HTTP/2 protocol error from %s: %s", self.conn.peer, ev[2])
                server.protocol_errors += 1
                self.flush()
                self.bind.finish()
                return
        if server.draining and self.idle:
            self.goaway()
            return
        self.flush()

    def _respond(self, sid: int, req: Request, resp: Response) -> None:
        """A native app's whole Response, in one core call."""
        body = resp.body
        if body.__class__ is not bytes:
            body = bytes(body)
        status = resp.status
        try:
            sent = self.core.respond(sid, status, resp.headers, body, req.method == "HEAD")
        except (ValueError, TypeError) as exc:
            log.error("bad response from the app: %s", exc)
            status = 500
            body = b""
            sent = self.core.respond(sid, 500, _EMPTY, b"")
        if 0 <= sent < len(body) and req.method != "HEAD":
            # the windows took part of it: the rest goes as they open
            ex = _H2Exchange(self, sid, req)
            ex.started = ex.ended = ex.want_end = True
            ex.status = status
            ex.pending.append((body, sent))
            ex.pending_bytes = len(body) - sent
            self.streams[sid] = ex
            return
        if self.server.access_log:
            self.server._log_access(self.conn.peer, req, status, len(body))

    def _wake(self) -> None:
        for ex in list(self.streams.values()):
            if ex.pending or ex.want_end:
                self.drain(ex)
            if ex.on_writable is not None and not ex.paused and not ex.closed:
                ex.on_writable()

    def writable(self) -> None:
        self._wake()
        self.flush()

    def closed(self) -> None:
        for ex in list(self.streams.values()):
            self._lost(ex)
        self.streams.clear()

    def goaway(self) -> None:
        """Stop taking new streams; close once the open ones are done."""
        self.core.goaway()
        self.flush()
        if self.idle:
            self.bind.finish()

    # ---- streams ----
    def _new_stream(self, sid: int, req: Request, scheme: bytes | None,
                    run: bool = True) -> _H2Exchange:
        ex = _H2Exchange(self, sid, req)
        if scheme is not None and scheme != b"http":
            ex.scheme = scheme.decode("ascii", "replace")
        self.streams[sid] = ex
        if run:
            self.server._runner.run(ex)
        return ex

    def _refuse(self, ex: _H2Exchange, status: int) -> None:
        if not ex.started:                       # the answer ends the stream
            ex.started = ex.ended = True
            ex.status = status
            self.core.send_headers(ex.sid, status, _EMPTY, True)
        ex.closed = True
        self.streams.pop(ex.sid, None)
        self.core.reset_stream(ex.sid, h2wire.CANCEL)
        self._arm_flush()

    def _lost(self, ex: _H2Exchange) -> None:
        if not ex.closed:
            ex.closed = True
            if ex.on_disconnect is not None:
                ex.on_disconnect()

    def drain(self, ex: _H2Exchange) -> None:
        """Send what the stream's flow-control windows allow."""
        if ex.closed or ex.done:
            return
        core = self.core
        sid = ex.sid
        pending = ex.pending
        while pending:
            data, off = pending[0]
            last = ex.want_end and len(pending) == 1 and ex.trailers is None
            n = core.send_data(sid, data, off, last)
            if n < 0:
                self.streams.pop(sid, None)
                self._lost(ex)
                self._arm_flush()
                return
            ex.pending_bytes -= n
            if off + n < len(data):
                pending[0] = (data, off + n)
                break
            pending.popleft()
            if last:
                self._done(ex)
                break
        else:
            if ex.want_end:
                if ex.trailers:
                    try:
                        core.send_trailers(sid, ex.trailers)
                    except ValueError as exc:
                        log.error("bad trailer from the app: %s", exc)
                        core.send_data(sid, b"", 0, True)
                else:
                    core.send_data(sid, b"", 0, True)
                self._done(ex)
        self._arm_flush()

    def _done(self, ex: _H2Exchange) -> None:
        ex.done = True
        self.streams.pop(ex.sid, None)
        if self.server.access_log:
            self.server._log_access(self.conn.peer, ex.request, ex.status, -1)
        if (self.core.going_away or self.server.draining) and self.idle:
            self.goaway()

    def _arm_flush(self) -> None:
        if not self._flush_armed:
            self._flush_armed = True
            self.server.loop.defer(self.flush)

    def flush(self) -> None:
        self._flush_armed = False
        out = self.core.data_to_send()
        if out and not self.bind.closed:
            self.bind.send(out)
