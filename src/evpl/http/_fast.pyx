# cython: language_level=3, boundscheck=False, wraparound=False
"""The HTTP/1.1 server's common case, in C.

A keep-alive connection to a native app (``interface="evpl"``) that sends
plain requests (HTTP/1.1, no body, one Host, no Connection, Expect or
Upgrade field) spends its time on what is the same for every such request:
find the end of the head, split it, check its framing fields, make the
Request, call the app, put the Response's bytes on the connection. As
Python that was ~40,000 instructions a request (benchmarks/http_cost.py).

For an adapter (ASGI, WSGI) it does the first half: the first plain
request of a read becomes the connection's exchange and goes to the
adapter, and the plain ones pipelined after it wait in the connection's
backlog, all without the parser's Python frames.

``serve(conn, data)`` does it for the requests at the start of one read
that qualify, answers them with one ``sendv`` and returns how many bytes it
consumed. The first request that is anything else (a body, a field that
changes framing or the connection, a head to refuse, a partial head, a
response that is not a plain ``Response``) and everything after it go to
the Python path (``_Conn._feed``), which has the whole of RFC 9112. So the
rules stay in one place (``wire`` and ``httphead``): this loop only picks
the requests for which those rules come to nothing.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem
from cpython.ref cimport PyObject
from libc.stdio cimport snprintf
from libc.string cimport memcmp, memcpy

from evpl._native.httphead cimport parse_head_c

from evpl.http import wire

cdef object HEAD_STATE = wire._HEAD     # the request parser between messages


cdef extern from "string.h":
    void* memmem(const void* haystack, size_t hlen, const void* needle, size_t nlen) nogil


cdef object Request = None
cdef object Response = None
cdef Py_ssize_t ONE_PIECE = 2048        # bodies up to this size share the head's bytes


def configure(request_cls, response_cls):
    """Set the classes (``wire.Request``, ``server.Response``): the server
    module imports this one, so they are handed over when it is loaded."""
    global Request, Response
    Request = request_cls
    Response = response_cls


cdef bint _name_is(bytes name, const char* s, Py_ssize_t n) noexcept:
    return PyBytes_GET_SIZE(name) == n and memcmp(PyBytes_AS_STRING(name), s, n) == 0


cdef bint _plain(list headers):
    """Exactly one Host, and no field that frames a body or changes the
    connection (for those, wire's checks decide)."""
    cdef int hosts = 0
    cdef bytes name
    cdef Py_ssize_t n
    for item in headers:
        name = <bytes>(<tuple>item)[0]
        n = PyBytes_GET_SIZE(name)
        if n == 4:
            if _name_is(name, "host", 4):
                hosts += 1
        elif n == 6:
            if _name_is(name, "expect", 6):
                return False
        elif n == 7:
            if _name_is(name, "upgrade", 7):
                return False
        elif n == 10:
            if _name_is(name, "connection", 10):
                return False
        elif n == 14:
            if _name_is(name, "content-length", 14):
                return False
        elif n == 17:
            if _name_is(name, "transfer-encoding", 17):
                return False
    return hosts == 1


cdef bytes _encode(bytes line, bytes date, bytes block, bytes body):
    """Status line, Date, the app's fields, Content-Length, the end of the
    head and (if short) the body, as one bytes object."""
    cdef char tail[48]
    cdef Py_ssize_t blen = PyBytes_GET_SIZE(body)
    cdef Py_ssize_t tlen = snprintf(tail, sizeof(tail), "content-length: %zd\r\n\r\n", blen)
    cdef Py_ssize_t a = PyBytes_GET_SIZE(line), b = PyBytes_GET_SIZE(date)
    cdef Py_ssize_t c = PyBytes_GET_SIZE(block)
    cdef Py_ssize_t total = a + b + c + tlen + (blen if blen <= ONE_PIECE else 0)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, total)
    cdef char* p = PyBytes_AS_STRING(out)
    memcpy(p, PyBytes_AS_STRING(line), a)
    p += a
    memcpy(p, PyBytes_AS_STRING(date), b)
    p += b
    memcpy(p, PyBytes_AS_STRING(block), c)
    p += c
    memcpy(p, tail, tlen)
    p += tlen
    if blen <= ONE_PIECE:
        memcpy(p, PyBytes_AS_STRING(body), blen)
    return out


@cython.binding(True)
def on_data(conn, bind, buf):
    """``_Conn.on_data``: a read of a ``plain`` connection (HTTP/1.1,
    sniffed, in limits) goes through ``serve`` and what it leaves to the
    Python parser; any other connection to ``on_data_slow``."""
    if not conn.plain:
        conn.on_data_slow(bind, buf)
        return
    data = bytes(buf)
    del buf             # (the pool buffer goes back at once)
    conn.last = conn.server.loop.now()
    cdef Py_ssize_t done = serve(conn, data)
    if done:
        if done == PyBytes_GET_SIZE(data):
            conn.head_since = 0.0
            if conn.current is None and (conn.write_paused or not conn.bind.reading):
                conn._idle()
            return
        data = data[done:]
    conn._feed(data)


cpdef Py_ssize_t serve(conn, bytes data) except -1:
    """Answer the plain requests at the start of ``data`` (one read of
    ``conn``, a ``server._Conn``); returns the bytes consumed (0 if the
    connection is not in the state the fast path needs)."""
    server = conn.server
    native = server._native
    if (server.access_log or server.draining or conn.current is not None or conn.backlog
            or conn.closing):
        return 0
    parser = conn.parser
    if parser._buf or parser._state != HEAD_STATE or parser.stopped:   # (parser.idle)
        return 0
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data), pos = 0, hlen
    cdef Py_ssize_t max_head = parser.max_head, max_line = parser.max_line
    cdef Py_ssize_t max_headers = parser.max_headers
    cdef const unsigned char* end
    cdef PyObject* got
    cdef tuple r
    cdef list headers
    cdef list out = []
    cdef dict lines = server._status_lines
    cdef dict blocks = server._blocks
    cdef bytes date = server._date
    app = native.app if native is not None else None
    while pos < n and p[pos] != 0x0D:           # (empty lines first: wire's rule)
        end = <const unsigned char*>memmem(p + pos, n - pos, b"\r\n\r\n", 4)
        if end == NULL:
            break
        hlen = end + 4 - (p + pos)
        if hlen > max_head:
            break
        r = parse_head_c(p + pos, hlen, max_line)
        if len(r) != 4 or r[2] != 1:
            break
        headers = <list>r[3]
        if len(headers) > max_headers or not _plain(headers):
            break
        req = Request(r[0], r[1], "1.1", headers)
        pos += hlen
        if native is None:
            # an adapter (ASGI, WSGI) drives one exchange at a time: the
            # first request starts it, the plain ones after it wait in the
            # connection's backlog, parsed (as _handle_events queues them)
            if conn.current is None:
                conn.current = H1Exchange(conn, req)
                server._runner.run(conn.current)
            else:
                conn.backlog.append(req)
                if len(conn.backlog) >= server.max_pipeline:
                    conn.bind.pause_reading()
                    break
            continue
        try:
            resp = app(req)
        except Exception:
            resp = native.failed(req)
        if type(resp) is not Response:
            # a streaming response, an upgrade, a mistake: the Python path
            # (conn.current is set, so what follows waits in its backlog)
            if out:
                conn.bind.sendv(out)
            conn._begin(req, resp)
            return pos
        status = resp.status
        body = resp.body
        got = PyDict_GetItem(lines, status)
        hs = resp.headers
        block = b""
        if hs:
            block = blocks.get(tuple(hs))
        if (got == NULL or block is None or type(body) is not bytes or req.method == "HEAD"
                or status < 200 or status == 204 or status == 304):
            # the general encoder (it also fills the caches for next time)
            if not conn._encode(out, req, resp):
                conn.bind.sendv(out)
                conn._close_after_send()
                return n
            continue
        out.append(_encode(<bytes>got, date, <bytes>block, <bytes>body))
        if PyBytes_GET_SIZE(<bytes>body) > ONE_PIECE:
            out.append(body)
    if out:
        conn.bind.sendv(out)
    return pos


# ---- the HTTP/1.1 exchange (what ASGI, WSGI and streaming responses drive) ----

import logging

cdef object log = logging.getLogger("evpl.http")
cdef tuple _CHUNKED = (b"transfer-encoding", b"chunked")
cdef tuple _CLOSE = (b"connection", b"close")
cdef tuple _KEEP_ALIVE = (b"connection", b"keep-alive")
cdef list _NO_BODY = [(b"content-length", b"0")]


cdef class H1Exchange:
    """An exchange on an HTTP/1.1 connection: ``server.Exchange``'s
    interface (``start``, ``write``, ``end``, ``paused``, ``want_body``,
    ``abort``; ``on_body``/``on_body_end``/``on_disconnect``/``on_writable``
    set by the adapter), compiled: one is made per request that an adapter
    serves, and its calls were Python frames with slot look-ups."""

    cdef public object request, peer, scheme, conn
    cdef public bint started, ended, closed, chunked, head_only, keep_alive
    cdef public object status
    cdef public object on_body, on_body_end, on_writable, on_disconnect
    cdef public list _body_parts

    def __cinit__(self, conn, req):
        self.status = 0
        self.conn = conn
        self.request = req
        self.peer = conn.peer
        self.scheme = "http"
        self._body_parts = []
        self.head_only = req.method == "HEAD"
        self.keep_alive = req.keep_alive

    @property
    def paused(self):
        return self.conn.write_paused

    def abort(self):
        """What was sent goes out, then FIN before the body's end: the
        client sees a short response (chunked without its last chunk, or
        fewer bytes than Content-Length), never a complete one."""
        self.ended = True
        self.closed = True
        self.conn._close_after_send()

    def want_body(self):
        """The app is ready for the request body (sends ``100 Continue``
        to a client that waits for it)."""
        req = self.request
        if req.expect_continue and not req.complete:
            req.expect_continue = False
            self.conn.bind.send(b"HTTP/1.1 100 Continue\r\n\r\n")

    def start(self, status, list headers):
        if self.started or self.closed:
            return
        self.started = True
        self.status = status
        conn = self.conn
        server = conn.server
        req = self.request
        cdef bint has_length = False
        cdef tuple kv
        for kv in headers:
            k = kv[0]
            if k == b"content-length":
                has_length = True
            elif k == b"connection" and b"close" in kv[1].lower():
                self.keep_alive = False
        if server.draining:
            self.keep_alive = False
        cdef list extra = []
        if not has_length and status >= 200 and status != 204 and status != 304:
            if req.version == "1.1":
                self.chunked = not self.head_only
                if self.chunked:
                    extra.append(_CHUNKED)
            else:
                self.keep_alive = False
        if not self.keep_alive:
            extra.append(_CLOSE)
        elif req.version == "1.0":
            extra.append(_KEEP_ALIVE)
        try:
            head = _head(server, status, headers, extra)
        except ValueError as exc:
            log.error("bad response header from the app: %s", exc)
            self.keep_alive = False
            head = _head(server, 500, _NO_BODY, [_CLOSE])
            self.head_only = True
        conn.bind.send(head)

    def write(self, data):
        if self.closed or self.ended or self.head_only or not data:
            return
        if not self.started:
            self.start(200, [])
        if self.chunked:
            self.conn.bind.sendv(wire.chunk(data))
        else:
            self.conn.bind.send(data)

    def end(self, trailers=None):
        if self.ended:
            return
        if not self.started:
            self.start(200, _NO_BODY)
        self.ended = True
        if self.closed:
            return
        if self.chunked:
            try:
                self.conn.bind.send(wire.last_chunk(trailers or ()))
            except ValueError as exc:
                log.error("bad trailer from the app: %s", exc)
                self.conn.bind.send(wire.last_chunk())
        self.conn._exchange_done(self)

    # the transport's side
    def _body(self, data):
        exchange_body(self, data)

    def _body_end(self):
        exchange_body_end(self)


@cython.binding(True)
def exchange_body(ex, data):
    """``Exchange._body``: a piece of the request body, to the adapter's
    ``on_body`` or collected in ``_body_parts``."""
    if ex.on_body is not None:
        ex.on_body(data)
    else:
        ex._body_parts.append(data)


@cython.binding(True)
def exchange_body_end(ex):
    """``Exchange._body_end``: the request body is complete (collected
    pieces become ``request.body``)."""
    if ex._body_parts:
        ex.request.body = b"".join(ex._body_parts)
        ex._body_parts = []
    ex.request.complete = True
    if ex.on_body_end is not None:
        ex.on_body_end()


def head(server, status, list headers, list extra):
    """An HTTP/1.1 response head: status line, Date, the app's header
    fields (checked: no CR/LF injection, no invalid names; from the
    server's caches when seen before), the framing fields ``extra``."""
    return _head(server, status, headers, extra)


cdef bytes _head(server, status, list headers, list extra):
    cdef PyObject* line = PyDict_GetItem(server._status_lines, status)
    cdef list parts = [<object>line if line != NULL else server._status_line(status),
                       server._date]
    cdef PyObject* block
    if headers:
        block = PyDict_GetItem(server._blocks, tuple(headers))
        parts.append(<object>block if block != NULL else server._block(headers))
    cdef tuple kv
    for kv in extra:
        parts += (kv[0], b": ", kv[1], b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)
