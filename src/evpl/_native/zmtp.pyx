# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""ZMTP frames on the per-message path (evpl.zmtp's native half).

The engine's ZMTP framer (framing.pxd, ``scan_zmtp``) cuts the byte stream
into whole units: a greeting, one command frame, or every frame of one
multipart message, already checked (flags, sizes, frame count). ``split``
turns a read batch of such units into messages of frame Buffers (slices of
the received memory: no copy) in one call, and ``encode`` builds the wire
form of an outgoing message in one call, so the per-frame work never runs
in Python.
"""

from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from cpython.list cimport PyList_GET_SIZE, PyList_GET_ITEM
from cpython.ref cimport PyObject
from libc.stdint cimport uint64_t
from libc.string cimport memcpy

from evpl._native.buffers cimport Buffer, make_buffer
from evpl._native.sys cimport evpl_load_uint, evpl_store_uint

# a message up to this many bytes is encoded into one bytes object (one
# copy, one send-queue entry); a larger one leaves as header pieces plus its
# frames, referenced, not copied
cdef enum:
    COPY_BELOW = 16384


def split(list units, list messages, list commands):
    """Cut each unit of ``units`` (Buffers the ZMTP framer delivered) into
    frames: a data message becomes a list of frame Buffers appended to
    ``messages``; a command frame or a greeting is appended to ``commands``
    as it is (rare: heartbeats, subscriptions). Returns the number of
    messages appended."""
    cdef Py_ssize_t i, n = PyList_GET_SIZE(units)
    cdef Buffer b
    cdef const unsigned char* p
    cdef size_t off, total, flen, hl
    cdef unsigned char fl
    cdef list frames
    cdef int count = 0
    for i in range(n):
        b = <Buffer>PyList_GET_ITEM(units, i)
        p = <const unsigned char*>b.ptr
        total = <size_t>b.length
        if total == 0 or p[0] == 0xFF or p[0] & 4:
            commands.append(b)
            continue
        off = 0
        if not p[0] & 1:                    # one frame: the common case
            hl = 9 if p[0] & 2 else 2
            messages.append([make_buffer(b.pool, b.chunk, b.ptr + hl, total - hl)])
            count += 1
            continue
        frames = []
        while off < total:
            fl = p[off]
            if fl & 2:
                flen = <size_t>evpl_load_uint(p + off + 1, 8, 1)
                hl = 9
            else:
                flen = p[off + 1]
                hl = 2
            frames.append(make_buffer(b.pool, b.chunk, b.ptr + off + hl, flen))
            off += hl + flen
        messages.append(frames)
        count += 1
    return count


def frames(Buffer b):
    """The frames of one data unit as a list of Buffers (no copy)."""
    cdef list out = []
    split([b], out, [])
    return out[0] if out else []


cdef inline size_t _hdr(unsigned char* h, size_t n, unsigned char more) noexcept:
    if n < 256:
        h[0] = more
        h[1] = <unsigned char>n
        return 2
    h[0] = more | 2
    evpl_store_uint(h + 1, 8, 1, <uint64_t>n)
    return 9


def encode(frames, bint command=False):
    """The wire form of one multipart message (``frames``: a sequence of
    buffer-protocol objects; ``command``: one command frame). A small
    message comes back as one ``bytes``; a large one as a list of pieces
    (headers and the frames themselves, not copied) for ``Bind.sendv``."""
    cdef Py_ssize_t i, n
    cdef size_t total = 0, off = 0
    cdef list views = []
    cdef list pieces
    cdef const unsigned char[::1] v
    cdef unsigned char h[9]
    cdef unsigned char flag
    cdef size_t hl, ln
    cdef bytes out
    cdef char* dst
    if isinstance(frames, (bytes, bytearray, memoryview, Buffer)):
        frames = (frames,)
    for f in frames:
        if isinstance(f, str):
            raise TypeError("ZMTP frames are bytes-like, not str (encode it first)")
        v = memoryview(f).cast("B") if not isinstance(f, bytes) else f
        views.append(v)
        total += <size_t>v.shape[0] + (9 if v.shape[0] >= 256 else 2)
    n = len(views)
    if n == 0:
        raise ValueError("a ZMTP message has at least one frame")
    if command and n != 1:
        raise ValueError("a command is one frame")
    flag = 4 if command else 0
    if total <= COPY_BELOW:
        out = PyBytes_FromStringAndSize(NULL, total)
        dst = PyBytes_AS_STRING(out)
        for i in range(n):
            v = views[i]
            ln = <size_t>v.shape[0]
            hl = _hdr(<unsigned char*>dst + off, ln, flag | (1 if i < n - 1 else 0))
            off += hl
            if ln:
                memcpy(dst + off, &v[0], ln)
            off += ln
        return out
    pieces = []
    i = 0
    for f in frames:
        v = views[i]
        ln = <size_t>v.shape[0]
        hl = _hdr(h, ln, flag | (1 if i < n - 1 else 0))
        pieces.append(PyBytes_FromStringAndSize(<char*>h, hl))
        if ln:
            pieces.append(f if isinstance(f, (bytes, Buffer)) else bytes(f))
        i += 1
    return pieces


def encode_one(data, bint more=False):
    """The wire form of one frame (``encode`` for the single-frame case),
    always one ``bytes`` up to COPY_BELOW, else ``[header, data]``."""
    cdef const unsigned char[::1] v = data if isinstance(data, bytes) else memoryview(data).cast("B")
    cdef size_t ln = <size_t>v.shape[0]
    cdef unsigned char h[9]
    cdef size_t hl = _hdr(h, ln, 1 if more else 0)
    cdef bytes out
    cdef char* dst
    if ln + hl <= COPY_BELOW:
        out = PyBytes_FromStringAndSize(NULL, ln + hl)
        dst = PyBytes_AS_STRING(out)
        memcpy(dst, h, hl)
        if ln:
            memcpy(dst + hl, &v[0], ln)
        return out
    return [PyBytes_FromStringAndSize(<char*>h, hl),
            data if isinstance(data, (bytes, Buffer)) else bytes(data)]


def encode_many(messages):
    """The wire form of many messages (each a sequence of frames) as one
    ``bytes``: the send side of a batch, one Python call and one send-queue
    entry for all of them (every frame is copied once)."""
    cdef size_t total = 0, off = 0, ln
    cdef Py_ssize_t i, n
    cdef list views = []
    cdef list counts = []
    cdef const unsigned char[::1] v
    cdef bytes out
    cdef char* dst
    cdef Py_ssize_t k = 0, m, j
    for msg in messages:
        if isinstance(msg, (bytes, bytearray, memoryview, Buffer)):
            msg = (msg,)
        m = 0
        for f in msg:
            if isinstance(f, str):
                raise TypeError("ZMTP frames are bytes-like, not str (encode it first)")
            v = f if isinstance(f, bytes) else memoryview(f).cast("B")
            views.append(v)
            total += <size_t>v.shape[0] + (9 if v.shape[0] >= 256 else 2)
            m += 1
        if m == 0:
            raise ValueError("a ZMTP message has at least one frame")
        counts.append(m)
    out = PyBytes_FromStringAndSize(NULL, total)
    dst = PyBytes_AS_STRING(out)
    n = len(counts)
    for i in range(n):
        m = counts[i]
        for j in range(m):
            v = views[k]
            k += 1
            ln = <size_t>v.shape[0]
            off += _hdr(<unsigned char*>dst + off, ln, 1 if j < m - 1 else 0)
            if ln:
                memcpy(dst + off, &v[0], ln)
            off += ln
    return out
