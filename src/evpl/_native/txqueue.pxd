# cython: language_level=3
"""The send queue every Bind carries (see txqueue.pyx)."""

from cpython.ref cimport PyObject
from libc.stdint cimport uint8_t
from posix.uio cimport iovec
from evpl._native.sys cimport socklen_t, sockaddr_in6
from evpl._native.framing cimport Framer
from evpl._native.buffers cimport Buffer

cdef enum:
    GSO_SEGS = 64           # datagrams per UDP GSO send (UDP_MAX_SEGMENTS >= 64)
    GSO_BYTES = 65507       # payload per UDP GSO send (one IPv4 datagram's worth)
    TX_HDR = 32             # header bytes an entry carries: a stream's framing
                            # (at most 8), or a datagram's first part (txq_push_ref)


cdef struct TxEntry:
    PyObject* owner         # the object whose memory is sent (a reference is held)
    char* ptr
    size_t len
    unsigned char hdr[TX_HDR]   # header sent before ptr[0:len] (framing, or a
                                # datagram's own header: one datagram, two pieces)
    uint8_t hdrlen
    socklen_t salen         # datagrams: the destination
    sockaddr_in6 sa


cdef struct TxQueue:
    TxEntry* e
    size_t cap
    size_t head             # first entry not fully sent
    size_t tail             # one past the last entry
    size_t off              # bytes of e[head] (header included) already sent


cdef struct TxMark:
    # Where a send call started, to undo it (all or nothing) or find its first
    # entry. Counted from head, because a push may move the entries down.
    size_t n                # entries queued at the mark
    size_t last_len         # the last of them's length then (txq_merge extends it)


cdef object txq_memory(object data, const char** ptr, size_t* n)
cdef TxEntry* txq_push(TxQueue* q, object data) except NULL
cdef TxEntry* txq_push_ref(TxQueue* q, object owner, const char* ptr, size_t n) except NULL
cdef Py_ssize_t txq_merge(TxQueue* q, Buffer b, Framer f) except -2
cdef int txq_frame(TxQueue* q, TxEntry* e, Framer f, size_t total) except -1
cdef void txq_unpush_from(TxQueue* q, TxEntry* e) noexcept
cdef void txq_undo(TxQueue* q, TxMark m) noexcept
cdef void txq_drop(TxQueue* q, list hold) noexcept
cdef void txq_free(TxQueue* q) noexcept
cdef size_t txq_retire(TxQueue* q, size_t n, list hold) noexcept
cdef int txq_gather(TxQueue* q, iovec* iov, int max_iov, size_t* total,
                    unsigned char* hdrs) noexcept
cdef int txq_dg_group(TxQueue* q, size_t i, size_t gso_limit) noexcept
cdef size_t txq_dg_retire(TxQueue* q, unsigned int g) noexcept


cdef inline bint txq_empty(TxQueue* q) noexcept:
    return q.head == q.tail


cdef inline TxMark txq_mark(TxQueue* q) noexcept:
    cdef TxMark m
    m.n = q.tail - q.head
    m.last_len = q.e[q.tail - 1].len if m.n else 0
    return m


cdef inline TxEntry* txq_since(TxQueue* q, TxMark m) noexcept:
    """The first entry pushed since ``m`` (the tail if none was)."""
    return &q.e[q.head + m.n]


cdef inline bint txq_changed(TxQueue* q, TxMark m) noexcept:
    """Something was queued since ``m`` (an entry pushed, or one extended)."""
    return q.tail - q.head != m.n or (m.n and q.e[q.tail - 1].len != m.last_len)


cdef inline size_t txq_dg_size(TxEntry* e) noexcept:
    """A queued datagram's size: its header piece, then its data."""
    return e.hdrlen + e.len
