# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The send queue: an array of entries that reference the memory to send.

Every backend queues the same way: ``Bind.send`` pushes an entry that holds a
reference to the sent object (a Buffer or bytes is sent from where it lies;
mutable or foreign memory is copied once so the caller may reuse it), a
framed Bind adds the header to the first entry of a message, and the backend
gathers entries into iovecs, retires what the kernel took and releases the
owners. Datagram entries carry their destination; consecutive same-size
datagrams to one peer are grouped into UDP GSO trains.

Byte accounting and watermarks (pause/writable events) belong to the Bind,
which knows the callbacks; the queue only moves entries.
"""

from cpython.ref cimport PyObject, Py_INCREF, Py_DECREF
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_CheckExact
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from cpython.mem cimport PyMem_Realloc, PyMem_Free
from libc.stdint cimport uint64_t
from libc.string cimport memcmp, memcpy, memmove

from evpl._native.buffers cimport Buffer
from evpl._native.framing cimport F_LENGTH, F_FIXED
from evpl._native.sys cimport evpl_load_uint, evpl_store_uint

from evpl.errors import FramingError


cdef TxEntry* txq_slot(TxQueue* q) except NULL:
    """Room for one more entry at the tail (not yet counted)."""
    cdef TxEntry* e
    cdef size_t cap, n
    if q.tail == q.cap:
        if q.head > 0:
            n = q.tail - q.head
            memmove(q.e, &q.e[q.head], n * sizeof(TxEntry))
            q.head = 0
            q.tail = n
        else:
            cap = q.cap * 2 if q.cap else 16
            e = <TxEntry*>PyMem_Realloc(q.e, cap * sizeof(TxEntry))
            if e == NULL:
                raise MemoryError()
            q.e = e
            q.cap = cap
    return &q.e[q.tail]


cdef object txq_memory(object data, const char** ptr, size_t* n):
    """The memory a send of ``data`` goes out from, and its owner: a Buffer
    or bytes where it lies (itself the owner); mutable or foreign memory
    copied once into a bytes, so the caller may reuse it (TypeError for an
    object without the buffer protocol)."""
    cdef Py_buffer view
    if type(data) is Buffer:
        ptr[0] = (<Buffer>data).ptr
        n[0] = (<Buffer>data).length
        return data
    if not PyBytes_CheckExact(data):
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            data = (<char*>view.buf)[:view.len]
        finally:
            PyBuffer_Release(&view)
    ptr[0] = PyBytes_AS_STRING(data)
    n[0] = PyBytes_GET_SIZE(data)
    return data


cdef TxEntry* txq_push(TxQueue* q, object data) except NULL:
    """Append one entry that references (or copies) ``data``."""
    cdef const char* ptr
    cdef size_t n
    owner = txq_memory(data, &ptr, &n)
    return txq_push_ref(q, owner, ptr, n)


cdef TxEntry* txq_push_ref(TxQueue* q, object owner, const char* ptr, size_t n) except NULL:
    """Append an entry for ``n`` bytes at ``ptr``, memory that ``owner``
    keeps valid and unchanged until it is sent (a reference is held): a
    slice of a larger object, sent without a copy or a slice object."""
    cdef TxEntry* e = txq_slot(q)
    e.ptr = <char*>ptr
    e.len = n
    e.owner = <PyObject*>owner
    Py_INCREF(owner)
    e.hdrlen = 0
    q.tail += 1
    return e


# a record mark's last-fragment bit, as a C constant (the literal 0x80000000
# does not fit a C int, so Cython would compute with Python ints)
cdef uint64_t LAST_FRAGMENT = (<uint64_t>1) << 31


cdef int frame_header(Framer f, size_t total, unsigned char* hdr) except -1:
    """Write the framing header of a ``total``-byte message to ``hdr``; its
    length (0 for a fixed-size framer, which only checks the size)."""
    if f.kind == F_FIXED:
        if total != <size_t>f.size:
            raise FramingError(f"message of {total} bytes on a fixed({f.size}) framer")
        return 0
    if total > f.max_message:
        raise FramingError(f"message of {total} bytes exceeds max_message ({f.max_message})")
    if f.kind == F_LENGTH:
        if f.includes_header:
            total += f.size
        if f.size < 8 and total >> (8 * f.size):
            raise FramingError(f"message of {total} bytes does not fit a "
                               f"{f.size}-byte length prefix")
        evpl_store_uint(hdr, f.size, f.big, total)
        return f.size
    if total > 0x7fffffff:
        raise FramingError("record larger than 2 GiB - 1")
    evpl_store_uint(hdr, 4, 1, total | LAST_FRAGMENT)
    return 4


cdef int txq_frame(TxQueue* q, TxEntry* e, Framer f, size_t total) except -1:
    """Put the framing header of a ``total``-byte message (entries from ``e``
    on) into ``e``; on error the message's entries are dropped."""
    try:
        e.hdrlen = frame_header(f, total, e.hdr)
    except FramingError:
        txq_unpush_from(q, e)
        raise
    return 0


cdef Py_ssize_t txq_merge(TxQueue* q, Buffer b, Framer f) except -2:
    """Queue the message in Buffer ``b`` by extending the last entry, when
    its memory follows that entry's in the same chunk: the bytes queued, or
    -1 if it does not follow. On a framed stream (``f``) the header that
    would be sent must also be the one already in front of ``b`` (a received
    message sent on as it came). So a batch of received messages echoed or
    forwarded in order costs one entry and one iovec, not one per message
    and header. The memory stays valid: the entry's owner holds the chunk,
    and only read-only (received) Buffers merge, so no
    byte of it changes before it is sent."""
    cdef TxEntry* last
    cdef int h = 0
    cdef uint64_t want = 0
    if q.tail == q.head or b.length == 0 or b.writable:
        return -1
    last = &q.e[q.tail - 1]
    if (type(<object>last.owner) is not Buffer or (<Buffer>last.owner).chunk != b.chunk
            or (<Buffer>last.owner).writable):
        return -1
    if f is not None:
        # the cases frame_header would refuse take the normal path, to raise
        if <size_t>b.length > f.max_message:
            return -1
        if f.kind == F_FIXED:
            if b.length != f.size:
                return -1
        elif f.kind == F_LENGTH:
            h = f.size
            want = <uint64_t>b.length + (<uint64_t>h if f.includes_header else 0)
        elif b.length <= 0x7fffffff:
            h = 4
            want = <uint64_t>b.length | LAST_FRAGMENT
        else:
            return -1
    if last.ptr + last.len + h != b.ptr:
        return -1
    if h and evpl_load_uint(<unsigned char*>b.ptr - h, h, f.big if f.kind == F_LENGTH else 1) != want:
        return -1
    last.len += h + b.length
    return h + b.length


cdef void txq_unpush_from(TxQueue* q, TxEntry* e) noexcept:
    """Drop the entries from ``e`` to the tail (not yet counted as queued)."""
    cdef size_t i = e - q.e
    cdef size_t j
    for j in range(i, q.tail):
        Py_DECREF(<object>q.e[j].owner)
    q.tail = i


cdef void txq_undo(TxQueue* q, TxMark m) noexcept:
    """Drop what was queued since ``m``: entries pushed, and the extension
    of one merged into."""
    txq_unpush_from(q, &q.e[q.head + m.n])
    if m.n:
        q.e[q.tail - 1].len = m.last_len


cdef void txq_drop(TxQueue* q, list hold) noexcept:
    """Drop every entry; their owners go to ``hold`` if given (zero-copy
    sends keep them alive until the kernel's notification)."""
    cdef size_t i
    for i in range(q.head, q.tail):
        if hold is not None:
            hold.append(<object>q.e[i].owner)
        Py_DECREF(<object>q.e[i].owner)
    q.head = q.tail = q.off = 0


cdef void txq_free(TxQueue* q) noexcept:
    txq_drop(q, None)
    PyMem_Free(q.e)
    q.e = NULL
    q.cap = 0


cdef size_t txq_retire(TxQueue* q, size_t n, list hold) noexcept:
    """Drop ``n`` sent bytes from the head. Owners of fully sent entries are
    released, or moved to ``hold``."""
    cdef size_t left = n + q.off
    cdef TxEntry* e
    while q.head != q.tail:
        e = &q.e[q.head]
        if left < e.len + e.hdrlen:
            break
        left -= e.len + e.hdrlen
        if hold is not None:
            hold.append(<object>e.owner)
        Py_DECREF(<object>e.owner)
        q.head += 1
    q.off = left
    if q.head == q.tail:
        q.head = q.tail = q.off = 0
    return n


cdef int txq_gather(TxQueue* q, iovec* iov, int max_iov, size_t* total,
                    unsigned char* hdrs) noexcept:
    """Fill ``iov`` (at most ``max_iov`` entries) from the queue head,
    framing headers included; the byte count goes to ``total`` if given.

    The headers live in the entries, which move when the queue grows. A
    synchronous writev passes ``hdrs`` NULL; an asynchronous send (the kernel
    reads the iovecs later) passes ``max_iov * 8`` bytes of its own, and the
    headers are copied there."""
    cdef int cnt = 0
    cdef size_t i = q.head, skip = q.off, sum = 0
    cdef TxEntry* e
    while i != q.tail and cnt < max_iov - 1:
        e = &q.e[i]
        if e.hdrlen:
            if skip < e.hdrlen:
                if hdrs != NULL:
                    memcpy(hdrs, e.hdr + skip, e.hdrlen - skip)
                    iov[cnt].iov_base = hdrs
                    hdrs += e.hdrlen - skip
                else:
                    iov[cnt].iov_base = e.hdr + skip
                iov[cnt].iov_len = e.hdrlen - skip
                sum += iov[cnt].iov_len
                cnt += 1
                skip = 0
            else:
                skip -= e.hdrlen
        if e.len > skip:
            iov[cnt].iov_base = e.ptr + skip
            iov[cnt].iov_len = e.len - skip
            sum += iov[cnt].iov_len
            cnt += 1
        skip = 0
        i += 1
    if total != NULL:
        total[0] = sum
    return cnt


cdef int txq_dg_group(TxQueue* q, size_t i, size_t gso_limit) noexcept:
    """How many queued datagrams from e[i] on leave as one UDP GSO send:
    same address, same size (a shorter one may end the train), at most
    GSO_SEGS of them and GSO_BYTES in all. One if the size is at or above
    ``gso_limit`` (0: GSO off; lowered when a path refused a train). A
    datagram's size counts its header piece (``txq_dg_size``)."""
    cdef TxEntry* first = &q.e[i]
    cdef TxEntry* e
    cdef size_t seg = txq_dg_size(first), total = seg, size
    cdef int n = 1
    if seg == 0 or seg >= gso_limit:
        return 1
    while n < GSO_SEGS and i + n != q.tail:
        e = &q.e[i + n]
        size = txq_dg_size(e)
        if (size == 0 or size > seg or total + size > GSO_BYTES or e.salen != first.salen
                or memcmp(&e.sa, &first.sa, e.salen) != 0):
            break
        total += size
        n += 1
        if size < seg:
            break
    return n


cdef size_t txq_dg_retire(TxQueue* q, unsigned int g) noexcept:
    """Drop the first ``g`` datagrams (sent or failed); returns their bytes."""
    cdef TxEntry* e
    cdef unsigned int k
    cdef size_t n = 0
    for k in range(g):
        e = &q.e[q.head]
        n += txq_dg_size(e)
        Py_DECREF(<object>e.owner)
        q.head += 1
    return n
