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

from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from cpython.bytes cimport (PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE,
                            PyBytes_CheckExact)
from cpython.list cimport PyList_GET_SIZE, PyList_GET_ITEM
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
            flen = _frame_head(p + off, &hl)
            frames.append(make_buffer(b.pool, b.chunk, b.ptr + off + hl, flen))
            off += hl + flen
        messages.append(frames)
        count += 1
    return count


cdef inline size_t _frame_head(const unsigned char* p, size_t* hl) noexcept:
    """The body length of the frame whose flags byte is at ``p`` (the
    framer checked it); its header length goes to ``hl``."""
    if p[0] & 2:
        hl[0] = 9
        return <size_t>evpl_load_uint(p + 1, 8, 1)
    hl[0] = 2
    return p[1]


def split_env(list units, list messages, list commands):
    """``split`` for REQ and REP: each data message is appended to
    ``messages`` as ``(envelope, body)``: ``envelope`` the wire bytes of its
    frames up to and including the first empty one (the delimiter), exactly
    as received, so a REP's reply sends them back as they are, and a REQ
    compares them with what it sent; ``body`` the list of frame Buffers
    after it. A message without an empty frame gives ``(None, frames)``.
    Returns the number of messages appended."""
    cdef Py_ssize_t i, n = PyList_GET_SIZE(units)
    cdef Buffer b
    cdef const unsigned char* p
    cdef size_t off, total, flen, hl, env_end
    cdef unsigned char fl
    cdef list frames
    cdef object env
    cdef int count = 0
    for i in range(n):
        b = <Buffer>PyList_GET_ITEM(units, i)
        p = <const unsigned char*>b.ptr
        total = <size_t>b.length
        if total == 0 or p[0] == 0xFF or p[0] & 4:
            commands.append(b)
            continue
        off = 0
        env_end = 0
        frames = []
        while off < total:
            fl = p[off]
            flen = _frame_head(p + off, &hl)
            if env_end == 0 and flen == 0 and fl & 1:
                env_end = off + hl          # the delimiter (a last frame is the body)
                frames = []
            else:
                frames.append(make_buffer(b.pool, b.chunk, b.ptr + off + hl, flen))
            off += hl + flen
        if env_end:
            env = PyBytes_FromStringAndSize(<const char*>p, env_end)
            messages.append((env, frames))
        else:
            messages.append((None, frames))
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


cdef inline Py_ssize_t _size(object f) except -1:
    """The byte length of one frame (bytes fast, any buffer otherwise)."""
    cdef Py_buffer pb
    if PyBytes_CheckExact(f):
        return PyBytes_GET_SIZE(f)
    if isinstance(f, str):
        raise TypeError("ZMTP frames are bytes-like, not str (encode it first)")
    PyObject_GetBuffer(f, &pb, PyBUF_SIMPLE)
    n = pb.len
    PyBuffer_Release(&pb)
    return n


cdef inline size_t _put(char* dst, object f, unsigned char more) except? 0:
    """Write one frame (header and body) at ``dst``; its wire length."""
    cdef Py_buffer pb
    cdef size_t hl, ln
    if PyBytes_CheckExact(f):
        ln = <size_t>PyBytes_GET_SIZE(f)
        hl = _hdr(<unsigned char*>dst, ln, more)
        if ln:
            memcpy(dst + hl, PyBytes_AS_STRING(f), ln)
        return hl + ln
    PyObject_GetBuffer(f, &pb, PyBUF_SIMPLE)
    ln = <size_t>pb.len
    hl = _hdr(<unsigned char*>dst, ln, more)
    if ln:
        memcpy(dst + hl, pb.buf, ln)
    PyBuffer_Release(&pb)
    return hl + ln


cdef inline tuple _as_frames(msg):
    if type(msg) is list:                   # the common cases first
        return tuple(<list>msg)
    if type(msg) is tuple:
        return <tuple>msg
    if isinstance(msg, (bytes, bytearray, memoryview, Buffer)):
        return (msg,)
    return tuple(msg)


def encode(frames, bint command=False, bytes head=None):
    """The wire form of one multipart message (``frames``: a sequence of
    buffer-protocol objects; ``command``: one command frame). ``head``:
    frames already in wire form (each with MORE) that go first, such as a
    REQ/REP envelope. A small message comes back as one ``bytes``; a large
    one as a list of pieces (headers and the frames themselves, not copied)
    for ``Bind.sendv``."""
    cdef tuple fr = _as_frames(frames)
    cdef Py_ssize_t i, n = len(fr), ln
    cdef size_t hlen = 0 if head is None else <size_t>PyBytes_GET_SIZE(head)
    cdef size_t total = hlen, off = hlen
    cdef unsigned char flag = 4 if command else 0
    cdef unsigned char h[9]
    cdef size_t hl
    cdef bytes out
    cdef char* dst
    cdef list pieces
    if n == 0:
        raise ValueError("a ZMTP message has at least one frame")
    if command and n != 1:
        raise ValueError("a command is one frame")
    for i in range(n):
        ln = _size(fr[i])
        total += <size_t>ln + (9 if ln >= 256 else 2)
    if total <= COPY_BELOW:
        out = PyBytes_FromStringAndSize(NULL, total)
        dst = PyBytes_AS_STRING(out)
        if hlen:
            memcpy(dst, PyBytes_AS_STRING(head), hlen)
        for i in range(n):
            off += _put(dst + off, fr[i], flag | (1 if i < n - 1 else 0))
        return out
    pieces = [head] if hlen else []
    for i in range(n):
        f = fr[i]
        ln = _size(f)
        hl = _hdr(h, <size_t>ln, flag | (1 if i < n - 1 else 0))
        pieces.append(PyBytes_FromStringAndSize(<char*>h, hl))
        if ln:
            pieces.append(f if isinstance(f, (bytes, Buffer)) else bytes(f))
    return pieces


def encode_many(messages):
    """The wire form of many messages (each a sequence of frames) as one
    ``bytes``: the send side of a batch, one Python call and one send-queue
    entry for all of them (every frame is copied once)."""
    cdef list msgs = [_as_frames(msg) for msg in messages]
    cdef size_t total = 0, off = 0
    cdef Py_ssize_t i, j, m, ln
    cdef tuple fr
    cdef bytes out
    cdef char* dst
    for fr in msgs:
        m = len(fr)
        if m == 0:
            raise ValueError("a ZMTP message has at least one frame")
        for j in range(m):
            ln = _size(fr[j])
            total += <size_t>ln + (9 if ln >= 256 else 2)
    out = PyBytes_FromStringAndSize(NULL, total)
    dst = PyBytes_AS_STRING(out)
    for fr in msgs:
        m = len(fr)
        for j in range(m):
            off += _put(dst + off, fr[j], 1 if j < m - 1 else 0)
    return out
