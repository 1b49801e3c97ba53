# cython: language_level=3, boundscheck=False, wraparound=False
"""The rpc2 server's batch fast path, in C.

A read batch of calls is what a busy connection hands the server
(``on_messages``), and per call the Python version of this loop cost more
than the handler it ran: ~4,000 instructions of bytecode for the header
unpack, the dispatch-table lookups, the attribute stores of the current call
and the reply head. Here the call header (RFC 5531) is read straight from the
received Buffer, the tables are walked with dict lookups, and a ``void``
result's reply is a 24-byte ``bytes`` the engine sends without a copy.

Everything that is not the common case (another RPC version, a credential
flavour other than AUTH_NONE or an AUTH_SYS body seen before, a non-null
verifier, an unknown program/version/procedure, a handler that takes its
context, arguments that do not decode) goes to the server's general
``dispatch``, which answers every error; this module never writes an error
reply itself.
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE, PyByteArray_Resize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem
from cpython.ref cimport PyObject
from cpython.unicode cimport PyUnicode_AsUTF8String
from libc.stdint cimport uint32_t
from libc.string cimport memcpy, memset

from evpl.errors import ProtocolError

cdef uint32_t AUTH_NONE_FLAVOR = 0
cdef uint32_t AUTH_SYS_FLAVOR = 1
cdef Py_ssize_t MAX_AUTH = 400          # RFC 5531: an opaque_auth body is at most 400 bytes


cdef inline uint32_t be32(const unsigned char* p) noexcept:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline void put32(char* p, uint32_t v) noexcept:
    p[0] = <char>(v >> 24)
    p[1] = <char>(v >> 16)
    p[2] = <char>(v >> 8)
    p[3] = <char>v


# -- XDR's counted opaque and string encoders ---------------------------------
# (evpl.rpc2.xdr's pack_opaque and pack_string: in C, because a reply that
# carries data spends more on the Python frame of its encoder than on the copy)

cdef object XdrError = None             # set by configure(): xdr imports this module
cdef object ScatterBufType = None
cdef Py_ssize_t scatter_min = 0


def configure(xdr_error, scatter_buf, Py_ssize_t scatter_minimum):
    """Hand over xdr's error type and ScatterBuf (xdr imports this module,
    so this module cannot import them back)."""
    global XdrError, ScatterBufType, scatter_min
    XdrError = xdr_error
    ScatterBufType = scatter_buf
    scatter_min = scatter_minimum


cdef char* _grow(object buf, Py_ssize_t n) except NULL:
    """Append ``n`` bytes to ``buf`` (a bytearray); where they start."""
    cdef Py_ssize_t old = PyByteArray_GET_SIZE(buf)
    PyByteArray_Resize(buf, old + n)
    return PyByteArray_AS_STRING(buf) + old


cdef int _pack_counted(object buf, data, unsigned long long maxlen, str what) except -1:
    cdef Py_buffer view
    cdef Py_ssize_t n, pad
    cdef char* q
    if not isinstance(buf, bytearray):     # a ScatterBuf is one too
        raise TypeError(f"XDR encodes into a bytearray, not {type(buf).__name__}")
    if type(data) is bytes:
        n = PyBytes_GET_SIZE(data)
        if <unsigned long long>n > maxlen:
            raise XdrError(f"{what} of {n} bytes exceeds its bound {maxlen}")
        pad = -n & 3
        if n >= scatter_min and type(buf) is ScatterBufType:
            put32(_grow(buf, 4), <uint32_t>n)
            buf.refer(data)             # sent by reference, next to the head
            memset(_grow(buf, pad), 0, pad)
            return 0
        q = _grow(buf, 4 + n + pad)
        put32(q, <uint32_t>n)
        memcpy(q + 4, PyBytes_AS_STRING(data), n)
        memset(q + 4 + n, 0, pad)
        return 0
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        n = view.len
        if <unsigned long long>n > maxlen:
            raise XdrError(f"{what} of {n} bytes exceeds its bound {maxlen}")
        pad = -n & 3
        q = _grow(buf, 4 + n + pad)
        put32(q, <uint32_t>n)
        memcpy(q + 4, view.buf, n)
        memset(q + 4 + n, 0, pad)
    finally:
        PyBuffer_Release(&view)
    return 0


def pack_opaque(buf, data, unsigned long long maxlen=0xFFFFFFFF):
    """Encode ``opaque<maxlen>`` from any bytes-like object."""
    _pack_counted(buf, data, maxlen, "opaque")


def pack_string(buf, s, unsigned long long maxlen=0xFFFFFFFF):
    """Encode ``string<maxlen>`` from ``str`` (UTF-8) or a bytes-like object."""
    if isinstance(s, str):
        s = PyUnicode_AsUTF8String(s)
    _pack_counted(buf, s, maxlen, "string")


# -- the client's call table, call message and reply head ----------------------

@cython.final
cdef class XidTable:
    """Client-side xids: allocates unused ones and matches replies to pending calls.

    ``add(value)`` returns a fresh xid remembered with ``value``;
    ``pop(xid)`` returns the value for a reply's xid, or ``None`` for a
    reply nobody waits for (late, duplicated or forged). (In C: the client
    asks it two or three times per call.)
    """

    cdef uint32_t _next
    cdef dict _pending

    def __init__(self, unsigned long long start=1):
        self._next = <uint32_t>(start & 0xFFFFFFFF)
        self._pending = {}

    def __len__(self):
        return len(self._pending)

    def add(self, value):
        """Remember ``value`` under a new xid and return the xid."""
        cdef uint32_t xid = self._next
        if len(self._pending) >= 0xFFFFFFFF:
            raise ProtocolError("every xid is in use")
        while xid in self._pending:
            xid += 1                                # (wraps: uint32)
        self._next = xid + 1
        self._pending[xid] = value
        return xid

    def pop(self, xid):
        """The value waiting for ``xid`` (now forgotten), or ``None``."""
        return self._pending.pop(xid, None)

    def get(self, xid):
        """The value waiting for ``xid`` (kept), or ``None``."""
        return self._pending.get(xid)

    def pending(self):
        """The xids still waiting for a reply."""
        return list(self._pending)


def call_message(uint32_t xid, uint32_t prog, uint32_t vers, uint32_t proc, bytes auth,
                 args):
    """A call message in one ``bytes``: xid, CALL, RPC version 2, prog,
    vers, proc, then ``auth`` (the encoded credentials and verifier, made
    once per client) and ``args`` (already encoded, any bytes-like)."""
    cdef Py_buffer view
    cdef Py_ssize_t na = PyBytes_GET_SIZE(auth)
    cdef object out
    cdef char* q
    PyObject_GetBuffer(args, &view, PyBUF_SIMPLE)
    try:
        out = PyBytes_FromStringAndSize(NULL, 24 + na + view.len)
        q = PyBytes_AS_STRING(out)
        put32(q, xid)
        put32(q + 4, 0)
        put32(q + 8, 2)
        put32(q + 12, prog)
        put32(q + 16, vers)
        put32(q + 20, proc)
        memcpy(q + 24, PyBytes_AS_STRING(auth), na)
        memcpy(q + 24 + na, view.buf, view.len)
    finally:
        PyBuffer_Release(&view)
    return out


def success_xid(msg):
    """The xid of ``msg`` if it is what nearly every reply is (REPLY,
    MSG_ACCEPTED, a null verifier, SUCCESS: its results start at byte 24),
    else -1 (the client decodes it in full then)."""
    cdef Py_buffer view
    cdef const unsigned char* p
    cdef long long xid = -1
    PyObject_GetBuffer(msg, &view, PyBUF_SIMPLE)
    p = <const unsigned char*>view.buf
    if (view.len >= 24 and be32(p + 4) == 1 and be32(p + 8) == 0 and be32(p + 12) == 0
            and be32(p + 16) == 0 and be32(p + 20) == 0):
        xid = be32(p)
    PyBuffer_Release(&view)
    return xid


# -- the batch loop ------------------------------------------------------------

cdef object _reply_bytes(uint32_t xid, Py_ssize_t extra):
    """A ``bytes`` of 24 + ``extra`` bytes starting with the head of an
    accepted reply with a null verifier: xid, REPLY, MSG_ACCEPTED,
    AUTH_NONE, 0, SUCCESS (the ``extra`` bytes are the caller's to fill)."""
    cdef object out = PyBytes_FromStringAndSize(NULL, 24 + extra)
    cdef char* h = PyBytes_AS_STRING(out)
    put32(h, xid)
    put32(h + 4, 1)
    memset(h + 8, 0, 16)
    return out


cdef object _raw_reply(uint32_t xid, object result):
    """The reply of a raw procedure: the head and the encoded result
    (bytes-like, or None for no result) as one message, the result copied
    after the head, or a large ``bytes`` result left a reference next to it."""
    cdef Py_buffer view
    cdef object out
    if result is None:
        return _reply_bytes(xid, 0)
    if type(result) is bytes and PyBytes_GET_SIZE(result) >= scatter_min:
        return (_reply_bytes(xid, 0), result)
    PyObject_GetBuffer(result, &view, PyBUF_SIMPLE)
    try:
        out = _reply_bytes(xid, view.len)
        memcpy(PyBytes_AS_STRING(out) + 24, view.buf, view.len)
    finally:
        PyBuffer_Release(&view)
    return out


@cython.final
cdef class Proc:
    """How to run one procedure: decode the arguments, call, encode the result.
    ``with_ctx``: the handler takes the CallContext first (served by
    ``dispatch``); ``raw``: it takes the undecoded arguments (a memoryview)
    and returns the encoded result."""

    cdef public object fn
    cdef public object unpack_args
    cdef public object pack_result
    cdef public bint with_ctx
    cdef public bint raw

    def __init__(self, fn, unpack_args, pack_result, bint with_ctx, bint raw=False):
        self.fn = fn
        self.unpack_args = unpack_args
        self.pack_result = pack_result
        self.with_ctx = with_ctx
        self.raw = raw


@cython.final
cdef class BatchCall:
    """The call being served by the fast path: what a CallContext would
    hold, made into one only if the handler asks (``current_call()``), so the
    common call creates no context object and the ContextVar is set once per
    batch instead of twice per call."""

    cdef public object conn
    cdef public object peer
    cdef public object cred
    cdef public object ctx
    cdef public object pack
    cdef public uint32_t xid
    cdef public uint32_t prog
    cdef public uint32_t vers
    cdef public uint32_t proc
    cdef object ctx_type

    def __init__(self, conn, peer, ctx_type):
        self.conn = conn
        self.peer = peer
        self.ctx_type = ctx_type

    def context(self):
        """The CallContext of this call (made on first use)."""
        if self.ctx is None:
            self.ctx = self.ctx_type(self.conn, self.xid, self.prog, self.vers, self.proc,
                                     self.cred, self.peer, self.pack, None)
        return self.ctx


@cython.final
cdef class FastPath:
    """One server's view for the fast path: its dispatch tables (the dicts
    themselves, so registrations show at once) and the few objects it
    compares with or calls."""

    cdef dict programs
    cdef dict authsys
    cdef object dispatch
    cdef object handler_raised
    cdef object auth_none
    cdef object unpack_noargs
    cdef object pack_void
    cdef object defer
    cdef object scatter_buf
    cdef object fallback_errors
    cdef dict stats

    def __init__(self, dict programs, dict authsys, dispatch, handler_raised, auth_none,
                 unpack_noargs, pack_void, defer, scatter_buf, tuple fallback_errors,
                 dict stats):
        self.stats = stats
        self.programs = programs
        self.authsys = authsys
        self.dispatch = dispatch
        self.handler_raised = handler_raised
        self.auth_none = auth_none
        self.unpack_noargs = unpack_noargs
        self.pack_void = pack_void
        self.defer = defer
        self.scatter_buf = scatter_buf
        self.fallback_errors = fallback_errors

    cdef Proc _lookup(self, uint32_t prog, uint32_t vers, uint32_t procno):
        """The procedure, or None if any level of the table lacks it."""
        cdef PyObject* p = PyDict_GetItem(self.programs, prog)
        if p == NULL:
            return None
        p = PyDict_GetItem(<dict>p, vers)
        if p == NULL:
            return None
        p = PyDict_GetItem(<dict>p, procno)
        if p == NULL:
            return None
        return <Proc>p

    def serve(self, conn, list msgs, BatchCall cur, list replies):
        """Serve ``msgs`` (whole call records of one connection) in order;
        immediate replies go to ``replies``. False if ``dispatch`` found a
        call header unparseable (the connection must close)."""
        cdef Py_buffer view
        cdef const unsigned char* p
        cdef Py_ssize_t n, alen, off
        cdef uint32_t xid, prog, vers, procno
        cdef Proc proc
        cdef object cred, args, result, pack, ctx, head
        cdef PyObject* found
        for msg in msgs:
            proc = None
            PyObject_GetBuffer(msg, &view, PyBUF_SIMPLE)
            try:
                p = <const unsigned char*>view.buf
                n = view.len
                # xid, CALL (0), rpcvers 2, prog, vers, proc, cred flavor, cred length
                if n >= 40 and be32(p + 4) == 0 and be32(p + 8) == 2:
                    xid = be32(p)
                    prog = be32(p + 12)
                    vers = be32(p + 16)
                    procno = be32(p + 20)
                    alen = be32(p + 28)
                    off = -1
                    if be32(p + 24) == AUTH_NONE_FLAVOR and alen == 0:
                        cred = self.auth_none
                        off = 32
                    elif be32(p + 24) == AUTH_SYS_FLAVOR and alen <= MAX_AUTH \
                            and n >= 32 + alen + (-alen & 3) + 8:
                        found = PyDict_GetItem(
                            self.authsys, PyBytes_FromStringAndSize(<char*>p + 32, alen))
                        if found != NULL:
                            cred = <object>found
                            off = 32 + alen + (-alen & 3)
                    # a null verifier
                    if off >= 0 and be32(p + off) == 0 and be32(p + off + 4) == 0:
                        proc = self._lookup(prog, vers, procno)
                        if proc is not None and proc.with_ctx:
                            proc = None
            finally:
                PyBuffer_Release(&view)
            if proc is not None:
                off += 8
                if proc.raw:
                    args = (memoryview(msg)[off:],)
                elif proc.unpack_args is self.unpack_noargs:
                    args = ()
                else:
                    try:
                        args = proc.unpack_args(memoryview(msg), off)[0]
                    except self.fallback_errors:
                        proc = None
            if proc is None:
                self.stats["calls"] -= 1           # dispatch counts it
                conn.in_flight += 1                # its reply (send_reply) takes it off
                if not self.dispatch(conn, msg, conn.peer, None):
                    conn.in_flight -= 1
                    return False
                continue
            cur.xid = xid
            cur.prog = prog
            cur.vers = vers
            cur.proc = procno
            cur.cred = cred
            pack = cur.pack = proc.pack_result
            cur.ctx = None
            try:
                result = proc.fn(*args)
            except Exception:
                conn.in_flight += 1
                self.handler_raised(cur.context())
                continue
            ctx = cur.ctx
            if ctx is not None or result is self.defer:
                # the handler took its context (current_call()): it decides;
                # the call is in flight until ctx replies
                conn.in_flight += 1
                ctx = cur.context()
                if result is self.defer or ctx.deferred:
                    ctx.deferred = True
                else:
                    ctx.reply(result)
                continue
            if proc.raw:
                try:
                    replies.append(_raw_reply(xid, result))
                except TypeError:
                    conn.in_flight += 1
                    cur.context().reply(result)    # logs, answers SYSTEM_ERR
                continue
            head = _reply_bytes(xid, 0)
            if pack is self.pack_void:
                replies.append(head)               # sent as it is, no copy
                continue
            buf = self.scatter_buf(head)
            try:
                pack(buf, result)
            except Exception:
                conn.in_flight += 1
                cur.context().reply(result)        # logs, answers SYSTEM_ERR
                continue
            # an immediate reply, never in flight; a large payload stays a
            # reference (parts()), sent next to its header
            replies.append(buf if buf.refs is None else buf.parts())
        return True
