"""Sans-I/O HTTP/1.1 (RFC 9110, RFC 9112): bytes in, events out; events in, bytes out.

Nothing here touches a socket, so the parser can be fed hostile bytes in a
test, a fuzzer or a server alike. :class:`RequestParser` turns a byte stream
into :class:`Request` heads, :class:`Data` pieces of their bodies and
:class:`EndOfMessage` markers, in order, however the stream was cut.
:class:`ResponseParser` does the same on the client side. The encoders build
heads and chunked framing.

The parser is strict on purpose: whatever two HTTP implementations could read
differently (the root of request smuggling) is refused with a
:class:`HTTPError` that carries the status to answer with, after which the
connection must be closed:

- ``Content-Length`` together with ``Transfer-Encoding``, a repeated or
  non-numeric ``Content-Length``, a transfer coding other than a lone
  ``chunked``, ``Transfer-Encoding`` in an HTTP/1.0 request (400, 501);
- obsolete line folding, a bare CR or LF, a NUL or other control byte,
  whitespace before the colon, an invalid header name (400);
- an HTTP/1.1 request without exactly one ``Host`` (400);
- a request line longer than ``max_line`` (414), a head larger than
  ``max_head`` or with more than ``max_headers`` fields (431), a body larger
  than ``max_body`` (413), an unknown ``Expect`` (417), a version other than
  1.0/1.1 (505).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable

from evpl.errors import ProtocolError

__all__ = [
    "H2_PREFACE",
    "REASONS",
    "Data",
    "EndOfMessage",
    "HTTPError",
    "Request",
    "RequestParser",
    "Response",
    "ResponseParser",
    "chunk",
    "encode_head",
    "format_date",
    "last_chunk",
]

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
"""What an HTTP/2 client with prior knowledge sends first (RFC 9113 3.4)."""

REASONS: dict[int, bytes] = {
    100: b"Continue", 101: b"Switching Protocols", 200: b"OK", 201: b"Created",
    202: b"Accepted", 204: b"No Content", 206: b"Partial Content",
    301: b"Moved Permanently", 302: b"Found", 303: b"See Other", 304: b"Not Modified",
    307: b"Temporary Redirect", 308: b"Permanent Redirect", 400: b"Bad Request",
    401: b"Unauthorized", 403: b"Forbidden", 404: b"Not Found", 405: b"Method Not Allowed",
    408: b"Request Timeout", 409: b"Conflict", 411: b"Length Required",
    413: b"Content Too Large", 414: b"URI Too Long", 415: b"Unsupported Media Type",
    417: b"Expectation Failed", 422: b"Unprocessable Content", 426: b"Upgrade Required",
    429: b"Too Many Requests", 431: b"Request Header Fields Too Large",
    500: b"Internal Server Error", 501: b"Not Implemented", 502: b"Bad Gateway",
    503: b"Service Unavailable", 504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
}

_TCHAR = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
# a field value: visible bytes (and obs-text), single spaces/tabs only between them
_VALUE = rb"(?:[\x21-\x7e\x80-\xff]+(?:[ \t]+[\x21-\x7e\x80-\xff]+)*)?"
_REQUEST_LINE = re.compile(rb"(" + _TCHAR + rb"+) ([\x21-\x7e]+) HTTP/([0-9])\.([0-9])\r\n")
_STATUS_LINE = re.compile(rb"HTTP/([0-9])\.([0-9]) ([0-9]{3})(?: ([\t \x21-\x7e\x80-\xff]*))?\r\n")
_FIELD = rb"(" + _TCHAR + rb"+):[ \t]*(" + _VALUE + rb")[ \t]*\r\n"
_FIELDS_VALID = re.compile(rb"(?:" + _TCHAR + rb"+:[ \t]*" + _VALUE + rb"[ \t]*\r\n)*\r\n")
_FIELD_PAIRS = re.compile(_FIELD)
_TOKEN = re.compile(_TCHAR + rb"+")
_OUT_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[\t \x21-\x7e\x80-\xff]*)?\r\n")
_DIGITS = re.compile(rb"[0-9]{1,18}")

_DEFAULT_MAX_LINE = 8190
_DEFAULT_MAX_HEAD = 65536
_DEFAULT_MAX_HEADERS = 100
_DEFAULT_MAX_BODY = 16 << 20
_MAX_CHUNK_LINE = 1024


class HTTPError(ProtocolError):
    """The peer broke HTTP: answer ``status`` (if a server) and close."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status} {REASONS.get(status, b'').decode()}: {message}")
        self.status = status
        self.detail = message


class Request:
    """One request head, and its body once the parser has all of it.

    ``headers`` keeps every field in order as ``(name, value)`` bytes, the
    name lower-cased. ``body`` is the whole body (``b""`` when there is none)
    when ``complete`` is true; otherwise :class:`Data` events follow with the
    body and an :class:`EndOfMessage` ends it.
    """

    __slots__ = ("body", "chunked", "complete", "content_length", "expect_continue",
                 "headers", "keep_alive", "method", "target", "trailers", "upgrade",
                 "version")

    def __init__(self, method: str, target: str, version: str,
                 headers: list[tuple[bytes, bytes]]) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.keep_alive = version == "1.1"
        self.body = b""
        self.complete = True
        self.chunked = False
        self.content_length: int | None = None
        self.expect_continue = False
        self.upgrade: bytes | None = None
        self.trailers: list[tuple[bytes, bytes]] = []

    @property
    def path(self) -> str:
        """The target without its query string."""
        return self.target.partition("?")[0]

    @property
    def query(self) -> str:
        return self.target.partition("?")[2]

    def header(self, name: bytes, default: bytes | None = None) -> bytes | None:
        """The value of the first field called ``name`` (lower-case bytes)."""
        return _first_field(self.headers, name, default)

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.target} HTTP/{self.version}>"


def _first_field(headers: list[tuple[bytes, bytes]], name: bytes,
                 default: bytes | None) -> bytes | None:
    for k, v in headers:
        if k == name:
            return v
    return default


class Response:
    """One response head (client side); its body follows as events like a
    request's (``complete``/``body`` as in :class:`Request`)."""

    __slots__ = ("body", "complete", "headers", "keep_alive", "reason", "status",
                 "trailers", "version")

    def __init__(self, status: int, reason: str, version: str,
                 headers: list[tuple[bytes, bytes]]) -> None:
        self.status = status
        self.reason = reason
        self.version = version
        self.headers = headers
        self.keep_alive = version == "1.1"
        self.body = b""
        self.complete = True
        self.trailers: list[tuple[bytes, bytes]] = []

    def header(self, name: bytes, default: bytes | None = None) -> bytes | None:
        """The value of the first field called ``name`` (lower-case bytes)."""
        return _first_field(self.headers, name, default)

    def __repr__(self) -> str:
        return f"<Response {self.status} HTTP/{self.version}>"


class Data:
    """A piece of the current message's body."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __repr__(self) -> str:
        return f"<Data {len(self.data)} bytes>"


class EndOfMessage:
    """The current message's body is complete; ``trailers`` from a chunked body."""

    __slots__ = ("trailers",)

    def __init__(self, trailers: list[tuple[bytes, bytes]]) -> None:
        self.trailers = trailers

    def __repr__(self) -> str:
        return f"<EndOfMessage trailers={len(self.trailers)}>"


Event = Request | Response | Data | EndOfMessage

HeadParser = Callable[[bytes, int, int, int], tuple]
"""``fn(buf, start, end, max_line)``: check and split the request head ``buf[start:end]``
into ``(method, target, minor, headers)``, or ``(status, reason)`` to refuse
it, exactly as :class:`RequestParser` does by itself (evpl's engine has one
in C: ``evpl._native.httphead.parse_head``)."""

# body framing states
_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILERS, _UNTIL_CLOSE, _DONE = range(8)


def _tokens(value: bytes) -> list[bytes]:
    return [t.strip().lower() for t in value.split(b",") if t.strip()]


class _Parser:
    """What request and response parsing share: the body state machine."""

    def __init__(self, max_line: int, max_head: int, max_headers: int, max_body: int) -> None:
        for name, v in (("max_line", max_line), ("max_head", max_head),
                        ("max_headers", max_headers), ("max_body", max_body)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                from evpl.errors import ConfigError

                raise ConfigError(f"{name} must be a positive int, got {v!r}")
        self.max_line = max_line
        self.max_head = max_head
        self.max_headers = max_headers
        self.max_body = max_body
        self._buf = bytearray()
        self._state = _HEAD
        self._remaining = 0
        self._body_seen = 0
        self.stopped = False

    @property
    def buffered(self) -> int:
        """Bytes received and not yet turned into events."""
        return len(self._buf)

    @property
    def in_head(self) -> bool:
        """Waiting for (the rest of) a head, with some of it received."""
        return self._state == _HEAD and len(self._buf) > 0

    @property
    def idle(self) -> bool:
        """Between messages with nothing buffered."""
        return self._state == _HEAD and not self._buf

    def take_rest(self) -> bytes:
        """The bytes after the last event (after an upgrade: the new protocol's)."""
        rest = bytes(self._buf)
        self._buf.clear()
        return rest

    def _fields(self, buf: bytes | bytearray, start: int, end: int) -> list[tuple[bytes, bytes]]:
        """Validate and split the field lines in ``buf[start:end]`` (which ends
        with the empty line)."""
        if _FIELDS_VALID.fullmatch(buf, start, end) is None:
            raise HTTPError(400, self._field_problem(bytes(buf[start:end])))
        pairs = _FIELD_PAIRS.findall(buf, start, end)
        if len(pairs) > self.max_headers:
            raise HTTPError(431, f"more than {self.max_headers} header fields")
        return [(k.lower(), v) for k, v in pairs]

    @staticmethod
    def _field_problem(block: bytes) -> str:
        for line in block.split(b"\r\n"):
            if not line:
                continue
            if line[:1] in (b" ", b"\t"):
                return "obsolete line folding"
            name, colon, _ = line.partition(b":")
            if not colon:
                return "header line without a colon"
            if _TOKEN.fullmatch(name) is None:
                return f"invalid header name {name[:40]!r}"
            if b"\r" in line or b"\n" in line:
                return "bare CR or LF in a header"
            return "control character in a header value"
        return "malformed header block"

    def _body_events(self, events: list[object], msg: Request | Response) -> None:
        """Turn buffered bytes into body events of ``msg`` while they complete
        pieces; leave the rest buffered."""
        buf = self._buf
        while not self.stopped:
            st = self._state
            if st == _LENGTH:
                if not buf:
                    return
                n = min(self._remaining, len(buf))
                piece = bytes(buf[:n])
                del buf[:n]
                self._remaining -= n
                events.append(Data(piece))
                if self._remaining == 0:
                    self._state = _HEAD
                    events.append(EndOfMessage([]))
                    return
            elif st == _CHUNK_SIZE:
                end = buf.find(b"\r\n", 0, _MAX_CHUNK_LINE)
                if end < 0:
                    if len(buf) >= _MAX_CHUNK_LINE or b"\n" in buf or (
                            b"\r" in buf[:-1]):
                        raise HTTPError(400, "malformed chunk size line")
                    return
                m = _CHUNK_LINE.fullmatch(buf, 0, end + 2)
                if m is None:
                    raise HTTPError(400, "malformed chunk size line")
                size = int(m.group(1), 16)
                del buf[:end + 2]
                if size == 0:
                    self._state = _TRAILERS
                    continue
                self._body_seen += size
                if self._body_seen > self.max_body:
                    raise HTTPError(413, f"body larger than {self.max_body} bytes")
                self._remaining = size
                self._state = _CHUNK_DATA
            elif st == _CHUNK_DATA:
                if not buf:
                    return
                n = min(self._remaining, len(buf))
                events.append(Data(bytes(buf[:n])))
                del buf[:n]
                self._remaining -= n
                if self._remaining == 0:
                    self._state = _CHUNK_CRLF
            elif st == _CHUNK_CRLF:
                if len(buf) < 2:
                    if buf[:1] not in (b"", b"\r"):
                        raise HTTPError(400, "chunk data not followed by CRLF")
                    return
                if buf[:2] != b"\r\n":
                    raise HTTPError(400, "chunk data not followed by CRLF")
                del buf[:2]
                self._state = _CHUNK_SIZE
            elif st == _TRAILERS:
                if buf[:2] == b"\r\n":
                    del buf[:2]
                    trailers: list[tuple[bytes, bytes]] = []
                else:
                    end = buf.find(b"\r\n\r\n")
                    if end < 0:
                        if len(buf) > self.max_head:
                            raise HTTPError(431, "trailer section too large")
                        return
                    trailers = self._fields(buf, 0, end + 4)
                    del buf[:end + 4]
                self._state = _HEAD
                msg.trailers = trailers
                events.append(EndOfMessage(trailers))
                return
            elif st == _UNTIL_CLOSE:
                if buf:
                    events.append(Data(bytes(buf)))
                    buf.clear()
                return
            else:
                return


class RequestParser(_Parser):
    """Server side: request bytes in, events out.

    ``feed(data)`` returns the events the new bytes complete, in order, and
    raises :class:`HTTPError` on a request that must be refused (the events
    of the good requests before it are lost with the exception, so a server
    answers those first by feeding per read and handling what it got
    before; see :attr:`pending`). A request that asks to close the
    connection, or to switch protocols, stops the parser: what follows it is
    left in the buffer (:meth:`take_rest`).
    """

    def __init__(self, *, max_line: int = _DEFAULT_MAX_LINE, max_head: int = _DEFAULT_MAX_HEAD,
                 max_headers: int = _DEFAULT_MAX_HEADERS, max_body: int = _DEFAULT_MAX_BODY,
                 head_parser: HeadParser | None = None) -> None:
        super().__init__(max_line, max_head, max_headers, max_body)
        self._head_parser = head_parser
        self._current: Request | None = None
        self.pending: list[object] = []
        """Events parsed before an error was raised (answer them, then the error)."""

    def feed(self, data: bytes | bytearray | memoryview) -> list[object]:
        if self.stopped:
            self._buf += data
            return []
        # heads are cut from an immutable bytes object by position (no
        # memmove per request of a pipelined read); only a partial head or a
        # body in progress lives in the bytearray between reads
        if self._state != _HEAD:          # a body in progress: straight to the bytearray
            self._buf += data
            buf = b""
        elif self._buf:
            self._buf += data
            buf = bytes(self._buf)
            self._buf.clear()
        else:
            buf = data if data.__class__ is bytes else bytes(data)
        pos = 0
        n = len(buf)
        events: list[object] = []
        self.pending = events
        try:
            while not self.stopped:
                if self._state != _HEAD:
                    if pos < n:
                        self._buf += buf[pos:]
                        pos = n
                    self._body_events(events, self._current)  # type: ignore[arg-type]
                    if self._state != _HEAD:
                        break
                    if not self._current.keep_alive:  # type: ignore[union-attr]
                        self.stopped = True
                        break
                    buf = bytes(self._buf)
                    self._buf.clear()
                    pos = 0
                    n = len(buf)
                    continue
                if pos >= n:
                    break
                if buf[pos] == 0x0D:          # RFC 9112 2.2: ignore a few empty lines
                    k = pos
                    while buf.startswith(b"\r\n", k):
                        k += 2
                    if k - pos > 8:
                        raise HTTPError(400, "empty lines before the request line")
                    pos = k
                    if pos >= n:
                        break
                end = buf.find(b"\r\n\r\n", pos)
                if end < 0:
                    self._buf += buf[pos:]
                    pos = n
                    self._check_partial_head()
                    break
                req = self._head(buf, pos, end + 4)
                pos = end + 4
                events.append(req)
                if req.upgrade is not None and req.complete:
                    self.stopped = True
                    break
                if not req.complete:
                    self._current = req
                    self._body_seen = 0
                    if req.chunked:
                        self._state = _CHUNK_SIZE
                    else:
                        cl: int = req.content_length  # type: ignore[assignment]
                        if n - pos >= cl:
                            # the whole body is here: deliver it with the head
                            req.body = buf[pos:pos + cl]
                            pos += cl
                            req.complete = True
                        else:
                            self._state = _LENGTH
                            self._remaining = cl
                    continue
                if not req.keep_alive:
                    self.stopped = True
        finally:
            if pos < n:
                self._buf += buf[pos:]
        self.pending = []
        return events

    def _check_partial_head(self) -> None:
        buf = self._buf
        nl = buf.find(b"\n")
        if nl < 0:
            if len(buf) > self.max_line:
                raise HTTPError(414, f"request line longer than {self.max_line} bytes")
        elif nl == 0 or buf[nl - 1] != 0x0D:
            raise HTTPError(400, "bare LF in the request head")
        if len(buf) > self.max_head:
            raise HTTPError(431, f"request head larger than {self.max_head} bytes")

    def _head(self, buf: bytes, start: int, end: int) -> Request:
        if end - start > self.max_head:
            raise HTTPError(431, f"request head larger than {self.max_head} bytes")
        if self._head_parser is not None:
            r = self._head_parser(buf, start, end, self.max_line)
            if len(r) == 2:
                raise HTTPError(r[0], r[1])
            if len(r[3]) > self.max_headers:
                raise HTTPError(431, f"more than {self.max_headers} header fields")
            req = Request(r[0], r[1], "1.1" if r[2] == 1 else "1.0", r[3])
            self._semantics(req)
            return req
        m = _REQUEST_LINE.match(buf, start, end)
        if m is None:
            line_end = buf.find(b"\r\n", start)
            if line_end - start > self.max_line:
                raise HTTPError(414, f"request line longer than {self.max_line} bytes")
            raise HTTPError(400, "malformed request line")
        if m.end() - start > self.max_line + 2:
            raise HTTPError(414, f"request line longer than {self.max_line} bytes")
        major, minor = m.group(3), m.group(4)
        if major != b"1" or minor not in (b"0", b"1"):
            raise HTTPError(505, f"HTTP/{major.decode()}.{minor.decode()} is not supported")
        headers = self._fields(buf, m.end(), end)
        req = Request(m.group(1).decode("ascii"), m.group(2).decode("ascii"),
                      "1.1" if minor == b"1" else "1.0", headers)
        self._semantics(req)
        return req

    def _semantics(self, req: Request) -> None:
        hosts = 0
        cl: bytes | None = None
        te: list[bytes] | None = None
        connection: list[bytes] = []
        upgrade = None
        for k, v in req.headers:
            if k == b"host":
                hosts += 1
            elif k == b"content-length":
                if cl is not None:
                    raise HTTPError(400, "more than one Content-Length")
                if _DIGITS.fullmatch(v) is None:
                    raise HTTPError(400, f"malformed Content-Length {v[:40]!r}")
                cl = v
            elif k == b"transfer-encoding":
                te = (te or []) + _tokens(v)
            elif k == b"connection":
                connection += _tokens(v)
            elif k == b"expect":
                if v.lower() != b"100-continue":
                    raise HTTPError(417, f"unsupported expectation {v[:40]!r}")
                req.expect_continue = req.version == "1.1"
            elif k == b"upgrade":
                upgrade = v
        if req.version == "1.1" and hosts != 1:
            raise HTTPError(400, "an HTTP/1.1 request needs exactly one Host"
                            if hosts == 0 else "more than one Host")
        if connection:
            if b"close" in connection:
                req.keep_alive = False
            elif req.version == "1.0" and b"keep-alive" in connection:
                req.keep_alive = True
            if upgrade is not None and b"upgrade" in connection:
                req.upgrade = upgrade
        if te is not None:
            if cl is not None:
                raise HTTPError(400, "both Content-Length and Transfer-Encoding")
            if req.version == "1.0":
                raise HTTPError(400, "Transfer-Encoding in an HTTP/1.0 request")
            if te != [b"chunked"]:
                if not te or te[-1] != b"chunked":
                    raise HTTPError(400, "Transfer-Encoding does not end with chunked")
                raise HTTPError(501, f"unsupported transfer coding {b', '.join(te)!r}")
            req.chunked = True
            req.complete = False
        elif cl is not None:
            n = int(cl)
            if n > self.max_body:
                raise HTTPError(413, f"body of {n} bytes, limit {self.max_body}")
            req.content_length = n
            if n:
                req.complete = False


class ResponseParser(_Parser):
    """Client side: response bytes in, events out.

    Call :meth:`expect` with each request's method as it is sent, so the
    parser knows which responses have no body (HEAD, 1xx, 204, 304). Interim
    1xx responses are delivered as :class:`Response` events too.
    """

    def __init__(self, *, max_line: int = _DEFAULT_MAX_LINE, max_head: int = _DEFAULT_MAX_HEAD,
                 max_headers: int = _DEFAULT_MAX_HEADERS, max_body: int = 1 << 30) -> None:
        super().__init__(max_line, max_head, max_headers, max_body)
        self._methods: list[str] = []
        self._current: Response | None = None

    def expect(self, method: str) -> None:
        """A request with this method was sent; its response comes in order."""
        self._methods.append(method)

    def feed(self, data: bytes | bytearray | memoryview) -> list[object]:
        buf = self._buf
        buf += data
        events: list[object] = []
        while not self.stopped:
            if self._state != _HEAD:
                self._body_events(events, self._current)  # type: ignore[arg-type]
                if self._state != _HEAD:
                    break
                continue
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > self.max_head:
                    raise HTTPError(431, "response head too large")
                break
            resp = self._head(buf, end + 4)
            del buf[:end + 4]
            events.append(resp)
            if resp.status == 101:
                self.stopped = True
                break
            if 100 <= resp.status < 200:
                continue
            method = self._methods.pop(0) if self._methods else "GET"
            if not resp.complete and method == "HEAD":
                resp.complete = True
                resp.keep_alive = resp.version == "1.1" or resp.keep_alive
                self._state = _HEAD
            if not resp.complete:
                self._current = resp
                self._body_seen = 0
                if self._state == _LENGTH and len(buf) >= self._remaining:
                    n = self._remaining
                    resp.body = bytes(buf[:n])
                    del buf[:n]
                    resp.complete = True
                    self._state = _HEAD
        return events

    def feed_eof(self) -> list[object]:
        """The server closed: ends a body delimited by the close; raises
        :class:`HTTPError` if a message was cut short."""
        if self._state == _UNTIL_CLOSE:
            self._state = _HEAD
            return [EndOfMessage([])]
        if self._state != _HEAD or self._buf:
            raise HTTPError(502, "connection closed in the middle of a response")
        return []

    def _head(self, buf: bytearray, end: int) -> Response:
        m = _STATUS_LINE.match(buf, 0, end)
        if m is None:
            raise HTTPError(502, "malformed status line")
        if m.group(1) != b"1":
            raise HTTPError(505, "not an HTTP/1.x response")
        headers = self._fields(buf, m.end(), end)
        resp = Response(int(m.group(3)), (m.group(4) or b"").decode("latin-1"),
                        "1.1" if m.group(2) == b"1" else "1.0", headers)
        cl = None
        te: list[bytes] | None = None
        for k, v in headers:
            if k == b"content-length":
                if (cl is not None and cl != v) or _DIGITS.fullmatch(v) is None:
                    raise HTTPError(502, "bad Content-Length in the response")
                cl = v
            elif k == b"transfer-encoding":
                te = (te or []) + _tokens(v)
            elif k == b"connection":
                toks = _tokens(v)
                if b"close" in toks:
                    resp.keep_alive = False
                elif b"keep-alive" in toks:
                    resp.keep_alive = True
        if 100 <= resp.status < 200 or resp.status in (204, 304):
            return resp
        if te is not None:
            if cl is not None or te[-1:] != [b"chunked"]:
                raise HTTPError(502, "response framing is ambiguous")
            self._state = _CHUNK_SIZE
            resp.complete = False
        elif cl is not None:
            n = int(cl)
            if n > self.max_body:
                raise HTTPError(502, f"response body of {n} bytes, limit {self.max_body}")
            if n:
                self._state = _LENGTH
                self._remaining = n
                resp.complete = False
        else:
            self._state = _UNTIL_CLOSE
            resp.complete = False
            resp.keep_alive = False
        return resp


def format_date(t: float | None = None) -> bytes:
    """An IMF-fixdate (RFC 9110 5.6.7) for ``t`` (default: now)."""
    return time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(t)).encode("ascii")


def _check_field(name: bytes, value: bytes) -> None:
    if _TOKEN.fullmatch(name) is None:
        raise ValueError(f"invalid header name {name!r}")
    if _OUT_VALUE.fullmatch(value) is None:
        raise ValueError(f"invalid header value for {name!r}: control characters")


def _b(s: str | bytes) -> bytes:
    return s if isinstance(s, bytes) else s.encode("latin-1")


def encode_head(start_line: bytes, headers: Iterable[tuple[str | bytes, str | bytes]]) -> bytes:
    """A head: ``start_line`` (without CRLF) and the fields, checked (a name
    that is not a token or a value with CR, LF or NUL raises ``ValueError``:
    no header injection)."""
    parts = [start_line, b"\r\n"]
    for name, value in headers:
        n, v = _b(name), _b(value)
        _check_field(n, v)
        parts += (n, b": ", v, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def status_line(status: int, version: str = "1.1") -> bytes:
    """``HTTP/1.1 200 OK`` for ``status``."""
    return b"HTTP/%s %d %s" % (version.encode(), status, REASONS.get(status, b"Unknown"))


def chunk(data: bytes | bytearray | memoryview) -> list[bytes | bytearray | memoryview]:
    """One chunk of a chunked body (empty data gives nothing: an empty
    chunk would end the body)."""
    if not len(data):
        return []
    return [b"%x\r\n" % len(data), data, b"\r\n"]


def last_chunk(trailers: Iterable[tuple[str | bytes, str | bytes]] = ()) -> bytes:
    """The end of a chunked body, with optional trailer fields."""
    parts = [b"0\r\n"]
    for name, value in trailers:
        n, v = _b(name), _b(value)
        _check_field(n, v)
        parts += (n, b": ", v, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)
