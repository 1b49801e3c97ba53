"""HTTP/2 (RFC 9113) on an evpl connection, with the ``h2`` library
(python-hyper) as the frame, HPACK and stream state layer.

A connection becomes HTTP/2 when it starts with the client preface (prior
knowledge) or after an ``Upgrade: h2c`` request (RFC 7540 3.2; the request
becomes stream 1). Each stream is an :class:`~evpl.http.server.Exchange`,
so the same native, ASGI and WSGI apps serve it. Everything a read
produces (responses, WINDOW_UPDATEs, SETTINGS acks) leaves in one send at
the end of the read.

Flow control meets the engine's backpressure twice: a stream's response
body waits for the peer's window (``Exchange.paused`` while it does), and
the whole connection pauses while the Bind's send queue is above its
high-water mark. Request bodies are acknowledged (window given back) as
they are read, up to the server's ``max_body``.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from evpl.http.server import Exchange
from evpl.http.wire import Request

__all__ = ["H2Connection"]

log = logging.getLogger("evpl.http")

_HOP_BY_HOP = frozenset((b"connection", b"keep-alive", b"proxy-connection",
                         b"transfer-encoding", b"upgrade"))
_MAX_STREAMS = 128
_STREAM_BUFFER = 1 << 20       # a stream's unsent body above this pauses its writer


class _H2Exchange(Exchange):
    __slots__ = (
        "body_size",
        "h2c",
        "head",
        "pending",
        "pending_bytes",
        "sid",
        "trailers",
        "want_end",
    )

    def __init__(self, h2c: H2Connection, sid: int, req: Request) -> None:
        super().__init__(req, h2c.conn.peer)
        self.h2c = h2c
        self.sid = sid
        self.head: list[tuple[bytes, bytes]] | None = None
        self.pending: deque[memoryview] = deque()
        self.pending_bytes = 0
        self.want_end = False
        self.trailers: list[tuple[bytes, bytes]] | None = None
        self.body_size = 0

    @property
    def paused(self) -> bool:
        return self.pending_bytes > _STREAM_BUFFER or self.h2c.conn.write_paused

    def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        if self.started or self.closed:
            return
        self.started = True
        server = self.h2c.server
        try:
            server._block(headers)                # names are tokens, no CR/LF/NUL
            server._status_line(status)
        except ValueError as exc:
            log.error("bad response from the app: %s", exc)
            status, headers = 500, [(b"content-length", b"0")]
            self.request.method = "HEAD"          # no body after this head
        self.status = status
        hs = [(b":status", b"%d" % status), (b"date", self.h2c.date())]
        hs += [(k.lower(), v) for k, v in headers if k not in _HOP_BY_HOP]
        self.head = hs

    def write(self, data: bytes) -> None:
        if self.closed or self.ended or not data:
            return
        if not self.started:
            self.start(200, [])
        if self.request.method == "HEAD":
            return
        self.pending.append(memoryview(data))
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
            self.start(200, [(b"content-length", b"0")])
        self.ended = True
        self.want_end = True
        self.trailers = trailers or None
        if not self.closed:
            self.h2c.drain(self)


class H2Connection:
    """The HTTP/2 side of one server connection (``conn`` is its
    ``evpl.http.server._Conn``)."""

    def __init__(self, conn: Any, upgrade_req: Request | None) -> None:
        self.conn = conn
        self.server = conn.server
        self.bind = conn.bind
        # inbound headers are checked by h2; outbound ones by evpl (Server._block,
        # cached per distinct header list) instead of h2's slower per-field pass
        cfg = h2.config.H2Configuration(client_side=False, header_encoding=None,
                                        validate_inbound_headers=True,
                                        validate_outbound_headers=False,
                                        normalize_outbound_headers=False)
        self.c = h2.connection.H2Connection(cfg)
        self.c.local_settings = h2.settings.Settings(
            client=False, initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: _MAX_STREAMS,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: self.server._parser_limits[
                    "max_head"],
            })
        self.streams: dict[int, _H2Exchange] = {}
        self.going_away = False
        self._flush_armed = False
        if upgrade_req is not None:
            self.bind.send(b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\n"
                           b"upgrade: h2c\r\n\r\n")
            settings = upgrade_req.header(b"http2-settings") or b""
            try:
                self.c.initiate_upgrade_connection(settings)
            except Exception:           # bad HTTP2-Settings: h2 raises several kinds
                self.bind.close()
                return
            upgrade_req.keep_alive = True
            self._new_stream(1, upgrade_req)
        else:
            self.c.initiate_connection()
        self.flush()

    @property
    def idle(self) -> bool:
        return not self.streams

    def date(self) -> bytes:
        return self.server._date[6:self.server._date.index(b"\r\n")]

    # ---- from the connection ----
    def data(self, data: bytes) -> None:
        self.conn.last = self.server.loop.now()
        try:
            events = self.c.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            log.debug("HTTP/2 protocol error from %s: %s", self.conn.peer, exc)
            self.server.protocol_errors += 1
            self.flush()
            self.bind.finish()
            return
        for ev in events:
            cls = ev.__class__
            if cls is h2.events.RequestReceived:
                self._request(ev)
            elif cls is h2.events.DataReceived:
                ex = self.streams.get(ev.stream_id)
                if ev.flow_controlled_length:
                    self.c.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                if ex is not None:
                    ex.body_size += len(ev.data)
                    if ex.body_size > self.server.max_body:
                        self._refuse(ex, 413)
                    else:
                        ex._body(ev.data)
            elif cls is h2.events.StreamEnded:
                ex = self.streams.get(ev.stream_id)
                if ex is not None and not ex.request.complete:
                    ex._body_end()
            elif cls is h2.events.StreamReset:
                ex = self.streams.pop(ev.stream_id, None)
                if ex is not None:
                    self._lost(ex)
            elif cls is h2.events.WindowUpdated or cls is h2.events.RemoteSettingsChanged:
                for ex in list(self.streams.values()):
                    if ex.pending or ex.want_end:
                        self.drain(ex)
                    if ex.on_writable is not None and not ex.paused and not ex.closed:
                        ex.on_writable()
            elif cls is h2.events.ConnectionTerminated:
                self.going_away = True
                for ex in list(self.streams.values()):
                    if ex.sid > (ev.last_stream_id or 0):
                        self.streams.pop(ex.sid, None)
                        self._lost(ex)
                if not self.streams:
                    self.flush()
                    self.bind.finish()
                    return
        self.flush()

    def writable(self) -> None:
        for ex in list(self.streams.values()):
            if ex.pending or ex.want_end:
                self.drain(ex)
            if ex.on_writable is not None and not ex.paused:
                ex.on_writable()
        self.flush()

    def closed(self) -> None:
        for ex in list(self.streams.values()):
            self._lost(ex)
        self.streams.clear()

    def goaway(self) -> None:
        """Stop taking new streams; close once the open ones are done."""
        if not self.going_away:
            self.going_away = True
            self.c.close_connection()
            self.flush()
        if not self.streams:
            self.bind.finish()

    # ---- streams ----
    def _request(self, ev: Any) -> None:
        sid = ev.stream_id
        if self.going_away:
            self.c.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        method = target = authority = None
        scheme = b"http"
        headers: list[tuple[bytes, bytes]] = []
        for k, v in ev.headers:
            if k[:1] == b":":
                if k == b":method":
                    method = v
                elif k == b":path":
                    target = v
                elif k == b":authority":
                    authority = v
                elif k == b":scheme":
                    scheme = v
            else:
                headers.append((k, v))
        if method is None or target is None:
            self.c.reset_stream(sid, h2.errors.ErrorCodes.PROTOCOL_ERROR)
            return
        if authority is not None:
            headers.insert(0, (b"host", authority))
        try:
            req = Request(method.decode("ascii"), target.decode("ascii"), "2", headers)
        except UnicodeDecodeError:
            self.c.reset_stream(sid, h2.errors.ErrorCodes.PROTOCOL_ERROR)
            return
        req.complete = ev.stream_ended is not None
        ex = self._new_stream(sid, req)
        ex.scheme = scheme.decode("ascii", "replace")
        if not req.complete:
            for k, v in headers:
                if k == b"content-length" and v.isdigit() and int(v) > self.server.max_body:
                    self._refuse(ex, 413)
                    return

    def _new_stream(self, sid: int, req: Request) -> _H2Exchange:
        ex = _H2Exchange(self, sid, req)
        self.streams[sid] = ex
        self.server._runner.run(ex)
        return ex

    def _refuse(self, ex: _H2Exchange, status: int) -> None:
        if not ex.started:
            ex.start(status, [(b"content-length", b"0")])
            ex.end()
        ex.closed = True
        self._arm_flush()
        self.streams.pop(ex.sid, None)
        try:
            self.c.reset_stream(ex.sid, h2.errors.ErrorCodes.CANCEL)
        except h2.exceptions.StreamClosedError:
            pass

    def _lost(self, ex: _H2Exchange) -> None:
        if not ex.closed:
            ex.closed = True
            if ex.on_disconnect is not None:
                ex.on_disconnect()

    def drain(self, ex: _H2Exchange) -> None:
        """Send what the stream's flow-control window allows."""
        c = self.c
        sid = ex.sid
        if ex.closed:
            return
        try:
            if ex.head is not None:
                head = ex.head
                ex.head = None
                end_now = ex.want_end and not ex.pending and ex.trailers is None
                c.send_headers(sid, head, end_stream=end_now)
                if end_now:
                    self._done(ex)
                    return
            while ex.pending:
                window = min(c.local_flow_control_window(sid), c.max_outbound_frame_size)
                if window <= 0:
                    break
                piece = ex.pending[0]
                if len(piece) <= window:
                    ex.pending.popleft()
                else:
                    ex.pending[0] = piece[window:]
                    piece = piece[:window]
                ex.pending_bytes -= len(piece)
                last = ex.want_end and not ex.pending and ex.trailers is None
                c.send_data(sid, piece.tobytes(), end_stream=last)
                if last:
                    self._done(ex)
                    return
            if ex.want_end and not ex.pending:
                if ex.trailers:
                    c.send_headers(sid, [(k, v) for k, v in ex.trailers
                                         if k not in _HOP_BY_HOP], end_stream=True)
                else:
                    c.end_stream(sid)
                self._done(ex)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError) as exc:
            log.debug("stream %d: %s", sid, exc)
            self.streams.pop(sid, None)
            self._lost(ex)
        self._arm_flush()

    def _done(self, ex: _H2Exchange) -> None:
        self.streams.pop(ex.sid, None)
        if self.server.access_log:
            self.server._log_access(self.conn.peer, ex.request, ex.status, -1)
        if (self.going_away or self.server.draining) and not self.streams:
            if not self.going_away:
                self.going_away = True
                self.c.close_connection()
            self.flush()
            self.bind.finish()

    def _arm_flush(self) -> None:
        if not self._flush_armed:
            self._flush_armed = True
            self.server.loop.defer(self.flush)

    def flush(self) -> None:
        self._flush_armed = False
        out = self.c.data_to_send()
        if out and not self.bind.closed:
            self.bind.send(out)
