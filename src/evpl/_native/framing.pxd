# cython: language_level=3
"""Framers: where one message ends in a byte stream (see framing.pyx)."""

from libc.stdint cimport uint32_t, uint64_t
from evpl._native.sys cimport evpl_load_uint

# framer kinds (match evpl.framing)
cdef enum:
    F_NONE = 0
    F_LENGTH = 1
    F_RECORD = 2
    F_CALLABLE = 3
    F_FIXED = 4
    F_ZMTP = 5

# scan results below zero
cdef enum:
    E_OVERSIZE = -1
    E_BAD = -2
    E_FRAGMENTS = -3

cdef enum:
    MAX_FRAGMENTS = 4096
    ZMTP_MAX_FRAMES = 65536     # frames in one ZMTP multipart message
    ZMTP_GREETING = 64


cdef class Framer:
    cdef readonly int kind
    cdef readonly int size
    cdef readonly bint big
    cdef readonly bint includes_header
    cdef readonly size_t max_message
    cdef readonly object fn


cdef inline Py_ssize_t scan_length(Framer f, const unsigned char* p, size_t avail,
                                   size_t* hint) noexcept:
    """Length prefix: total wire length of the next message, 0 = need more
    (``hint`` = bytes needed in total when known), < 0 = bad stream."""
    cdef uint64_t v
    cdef size_t hs = f.size
    if avail < hs:
        hint[0] = hs
        return 0
    v = evpl_load_uint(p, f.size, f.big)
    if f.includes_header:
        if v < hs:
            return E_BAD
        v -= hs
    if v > f.max_message:
        return E_OVERSIZE
    if avail < hs + v:
        hint[0] = hs + v
        return 0
    return <Py_ssize_t>(hs + v)


cdef inline Py_ssize_t scan_record(Framer f, const unsigned char* p, size_t avail,
                                   size_t* hint, size_t* payload, int* nfrag) noexcept:
    """ONC RPC record marking: walk fragments up to the last one."""
    cdef size_t off = 0, total = 0, flen
    cdef uint32_t h
    cdef int n = 0
    while True:
        if avail - off < 4:
            hint[0] = off + 4
            return 0
        h = <uint32_t>evpl_load_uint(p + off, 4, 1)
        flen = h & 0x7fffffff
        total += flen
        n += 1
        if total > f.max_message:
            return E_OVERSIZE
        if n > MAX_FRAGMENTS:
            return E_FRAGMENTS
        if avail - off - 4 < flen:
            hint[0] = off + 4 + flen
            return 0
        off += 4 + flen
        if h >> 31:                     # the last fragment (C arithmetic: 0x80000000 is no C int)
            payload[0] = total
            nfrag[0] = n
            return <Py_ssize_t>off


cdef inline Py_ssize_t scan_zmtp(Framer f, const unsigned char* p, size_t avail,
                                 size_t* hint, int* nframes) noexcept:
    """ZMTP 3.x (spec 23/37): the wire length of the next whole unit, which
    is a 64-byte greeting (first byte 0xFF, never a valid frame flags byte),
    one command frame, or every frame of a multipart message up to the one
    without MORE. Frames stay on the wire as they are: the caller cuts them.
    ``max_message`` bounds the payload of the whole message."""
    cdef size_t off = 0, total = 0, flen, hl
    cdef unsigned char fl
    cdef uint64_t v
    cdef int n = 0
    if avail == 0:
        hint[0] = 2
        return 0
    if p[0] == 0xFF:
        if avail < ZMTP_GREETING:
            hint[0] = ZMTP_GREETING
            return 0
        nframes[0] = 0
        return ZMTP_GREETING
    while True:
        if avail - off < 2:
            hint[0] = off + 2
            return 0
        fl = p[off]
        if fl & 0xF8:
            return E_BAD                    # reserved flag bits set
        if fl & 4 and (fl & 1 or n):
            return E_BAD                    # a command is one frame of its own
        if fl & 2:
            if avail - off < 9:
                hint[0] = off + 9
                return 0
            v = evpl_load_uint(p + off + 1, 8, 1)
            if v > f.max_message:
                return E_OVERSIZE
            flen = <size_t>v
            hl = 9
        else:
            flen = p[off + 1]
            hl = 2
        total += flen
        n += 1
        if total > f.max_message:
            return E_OVERSIZE
        if n > ZMTP_MAX_FRAMES:
            return E_FRAGMENTS
        if avail - off - hl < flen:
            hint[0] = off + hl + flen
            return 0
        off += hl + flen
        if not fl & 1:
            nframes[0] = n
            return <Py_ssize_t>off
