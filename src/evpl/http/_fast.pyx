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

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem
from cpython.ref cimport PyObject
from libc.stdio cimport snprintf
from libc.string cimport memcmp, memcpy

from evpl._native.httphead cimport parse_head_c


cdef extern from "string.h":
    void* memmem(const void* haystack, size_t hlen, const void* needle, size_t nlen) nogil


cdef object Request = None
cdef object Response = None
cdef object H1Exchange = None
cdef Py_ssize_t ONE_PIECE = 2048        # bodies up to this size share the head's bytes


def configure(request_cls, response_cls, exchange_cls):
    """Set the classes (``wire.Request``, ``server.Response``,
    ``server._H1Exchange``): the server module imports this one, so they
    are handed over when it is loaded."""
    global Request, Response, H1Exchange
    Request = request_cls
    Response = response_cls
    H1Exchange = exchange_cls


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


def serve(conn, bytes data):
    """Answer the plain requests at the start of ``data`` (one read of
    ``conn``, a ``server._Conn``); returns the bytes consumed (0 if the
    connection is not in the state the fast path needs)."""
    server = conn.server
    native = server._native
    if (server.access_log or server.draining or conn.current is not None or conn.backlog
            or conn.closing):
        return 0
    parser = conn.parser
    if not parser.idle or parser.stopped:
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
