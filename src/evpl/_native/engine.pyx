# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The evpl native engine: the loop, the epoll socket backends and framing.

Everything per packet or per completion happens here; the Python face
(``evpl.core``) only validates configuration and creates sockets.

Threading: a LoopCore belongs to the thread that runs it. The GIL is released
only around waiting and polling; every touch of Python objects or of the
buffer pool happens with the GIL held. ``Doorbell.ring`` and ``LoopCore.stop``
are the cross-thread entry points (an eventfd plus atomic flags).

Memory: stream and datagram receives land in a loop-wide receive chunk taken
from the Pool. Each read becomes zero-copy Buffer slices of it. A message that
is cut by the end of a read stays where it is; when the same Bind reads next
and nothing else read in between, the next read lands right after it (no
copy), otherwise the partial (shorter than one message) is moved forward.
Messages larger than a quarter of a buffer are assembled in a chunk of their
own, read straight from the socket.
"""

cimport cython
from cpython.ref cimport PyObject, Py_INCREF, Py_DECREF
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_CheckExact
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from cpython.exc cimport PyErr_CheckSignals
from cpython.mem cimport PyMem_Malloc, PyMem_Realloc, PyMem_Free
from libc.errno cimport errno, EAGAIN, EINTR, EINPROGRESS, EMFILE, ENFILE, ENOBUFS, ENOMEM
from libc.stdint cimport int64_t, uint64_t, uint32_t, uint16_t, uint8_t
from libc.string cimport memcpy, memcmp, memmove, memset, strlen
from posix.unistd cimport close as c_close, read as c_read, write as c_write
from posix.uio cimport iovec

from evpl._native.buffers cimport Pool, Buffer, Chunk, make_buffer, chunk_unref
from evpl._native.sys cimport *

cdef extern from "evpl_uring.h" nogil:
    ctypedef struct evpl_uring:
        pass
    ctypedef struct evpl_cqe:
        uint64_t user_data
        int res
        uint32_t flags
    int evpl_uring_built()
    evpl_uring* evpl_uring_new(unsigned entries, int sqpoll, int sqpoll_cpu, unsigned idle_ms,
                               int* err)
    void evpl_uring_free(evpl_uring* u)
    int evpl_uring_register_eventfd(evpl_uring* u, int fd)
    void evpl_uring_evfd_enable(evpl_uring* u, int on)
    int evpl_uring_setup_bufring(evpl_uring* u, unsigned entries, int bgid, int inc)
    void evpl_uring_buf_add(evpl_uring* u, int bgid, void* addr, unsigned len, unsigned short bid)
    void evpl_uring_buf_commit(evpl_uring* u, int bgid)
    int evpl_uring_recv_multishot(evpl_uring* u, int fd, uint64_t ud, int bgid)
    int evpl_uring_recvmsg_multishot(evpl_uring* u, int fd, msghdr* mh, uint64_t ud, int bgid)
    int evpl_uring_sendmsg_dgram(evpl_uring* u, int fd, const msghdr* mh, uint64_t ud)
    int evpl_uring_accept_multishot(evpl_uring* u, int fd, uint64_t ud)
    int evpl_uring_sendmsg(evpl_uring* u, int fd, const msghdr* mh, uint64_t ud, int zc)
    int evpl_uring_cancel(evpl_uring* u, uint64_t target, uint64_t ud)
    int evpl_uring_submit(evpl_uring* u)
    int evpl_uring_pending_sqes(evpl_uring* u)
    int evpl_uring_cq_ready(evpl_uring* u)
    int evpl_uring_reap(evpl_uring* u, evpl_cqe* out, int max)
    const char* evpl_uring_mode(evpl_uring* u)
    int evpl_uring_wait(evpl_uring* u, long long timeout_ns)
    const char* evpl_uring_probe()
    uint32_t EVPL_CQE_F_BUF_MORE, EVPL_CQE_F_MORE, EVPL_CQE_F_BUFFER, EVPL_CQE_F_NOTIF

cdef extern from "<errno.h>":
    int ENOBUFS_ "ENOBUFS"
    int EBUSY_ "EBUSY"
    int EIO_ "EIO"
    int EINVAL_ "EINVAL"
    int EMSGSIZE_ "EMSGSIZE"
    int EOPNOTSUPP_ "EOPNOTSUPP"
    int ECANCELED, ENOENT, EALREADY

import heapq
import logging

from evpl.errors import EvplError, FramingError, SendQueueFull, transport_error

_log = logging.getLogger("evpl")

DEF MAX_EVENTS = 256
DEF MAX_IOV = 1024
DEF MAX_MMSG = 64
DEF READ_BUDGET = 16
DEF UR_ENTRIES = 1024
DEF UR_BUFS = 16
DEF UR_CQES = 256

# io_uring operations, in the low bits of user_data (objects are 16-aligned)
cdef enum:
    OP_RECV = 1
    OP_SEND = 2
    OP_ACCEPT = 3
    OP_CANCEL = 4
    OP_DGSEND = 5       # user_data = UrDgSend* | OP_DGSEND

DEF UR_DG_CHUNKS = 8        # pool buffers carved into datagram slots (bgid 1)
DEF UR_DG_PER = 64          # at most this many slots per pool buffer
DEF UR_DG_SLOT = 65600      # recvmsg_out (16) + sockaddr_in6 (28) + 65507, rounded
DEF UR_DG_CTL = 44          # sizeof(io_uring_recvmsg_out) + sizeof(sockaddr_in6)
DEF UR_DG_HDR = 68          # ... + EVPL_GRO_CTL bytes of control: the payload starts here
DEF UR_DG_INFLIGHT = 64     # sendmsg requests in flight per datagram Bind
DEF SQPOLL_IDLE_MS = 20      # an SQPOLL thread sleeps after this long without work
DEF GSO_SEGS = 64           # datagrams per UDP GSO send (UDP_MAX_SEGMENTS >= 64)
DEF GSO_BYTES = 65507       # payload per UDP GSO send (one IPv4 datagram's worth)


def uring_unavailable_reason():
    """None if io_uring networking works here, else why not."""
    cdef const char* why = evpl_uring_probe()
    return None if why == NULL else why.decode()

# kinds of epoll sources
cdef enum:
    K_BIND = 1
    K_LISTENER = 2
    K_WATCH = 3

# bind states
cdef enum:
    S_CONNECTING = 1
    S_OPEN = 2
    S_CLOSED = 3

# framer kinds (match evpl.framing)
cdef enum:
    F_NONE = 0
    F_LENGTH = 1
    F_RECORD = 2
    F_CALLABLE = 3

# scan results below zero
cdef enum:
    E_OVERSIZE = -1
    E_BAD = -2
    E_FRAGMENTS = -3

DEF MAX_FRAGMENTS = 4096


cdef struct TxEntry:
    PyObject* owner
    char* ptr
    size_t len
    unsigned char hdr[8]
    uint8_t hdrlen
    socklen_t salen
    sockaddr_in6 sa


cdef struct UrDgSend:
    msghdr mh
    iovec* iov          # n entries: &iov1 for one datagram, else a heap block
    PyObject** owners   # n data owners, laid out like iov
    iovec iov1
    PyObject* owner1
    int n
    PyObject* bind
    size_t len
    sockaddr_in6 sa
    uint64_t ctl[3]     # the UDP_SEGMENT control message (EVPL_GSO_CTL bytes)
    int busy


cdef inline object _sa_to_py(sockaddr* sa, socklen_t salen):
    """A Python address (like the socket module's) from a sockaddr."""
    cdef char text[64]
    cdef sockaddr_in* s4
    cdef sockaddr_in6* s6
    cdef sockaddr_un* su
    cdef Py_ssize_t n
    if sa.sa_family == AF_INET:
        s4 = <sockaddr_in*>sa
        inet_ntop(AF_INET, &s4.sin_addr, text, sizeof(text))
        return (text.decode("ascii"), ntohs(s4.sin_port))
    if sa.sa_family == AF_INET6:
        s6 = <sockaddr_in6*>sa
        inet_ntop(AF_INET6, &s6.sin6_addr, text, sizeof(text))
        return (text.decode("ascii"), ntohs(s6.sin6_port), ntohl(s6.sin6_flowinfo),
                s6.sin6_scope_id)
    if sa.sa_family == AF_UNIX:
        su = <sockaddr_un*>sa
        n = <Py_ssize_t>salen - <Py_ssize_t>sizeof(sa_family_t)
        if n <= 0:
            return ""
        if su.sun_path[0] == 0:
            return su.sun_path[:n].decode("utf-8", "surrogateescape")
        return su.sun_path[:strlen(su.sun_path)].decode("utf-8", "surrogateescape")
    return None


cdef int _py_to_sa(object addr, sockaddr_in6* out, socklen_t* outlen) except -1:
    """Fill an IPv4 or IPv6 sockaddr from a (host, port[, flow, scope]) tuple."""
    cdef sockaddr_in* s4 = <sockaddr_in*>out
    cdef bytes host
    cdef int port
    if not isinstance(addr, tuple) or len(addr) < 2:
        raise TypeError(f"address must be a (host, port) tuple, got {addr!r}")
    host = str(addr[0]).encode("ascii")
    port = addr[1]
    if port < 0 or port > 65535:
        raise ValueError(f"port out of range: {port}")
    memset(out, 0, sizeof(sockaddr_in6))
    if inet_pton(AF_INET, host, &s4.sin_addr) == 1:
        s4.sin_family = AF_INET
        s4.sin_port = htons(port)
        outlen[0] = sizeof(sockaddr_in)
        return 0
    if inet_pton(AF_INET6, host, &out.sin6_addr) == 1:
        out.sin6_family = AF_INET6
        out.sin6_port = htons(port)
        if len(addr) > 2:
            out.sin6_flowinfo = htonl(addr[2])
        if len(addr) > 3:
            out.sin6_scope_id = addr[3]
        outlen[0] = sizeof(sockaddr_in6)
        return 0
    raise ValueError(f"not a numeric IP address: {addr[0]!r} (resolve names before sendto)")


cdef class LoopCore


cdef class _Source:
    cdef bint in_epoll      # registered in the loop's epoll set (LoopCore._ep_add)
    """Anything registered with the loop's epoll instance."""
    cdef int kind
    cdef int fd
    cdef LoopCore loop


@cython.final
cdef class Timer:
    """A one-shot or periodic timer; see ``LoopCore.call_later``."""
    cdef LoopCore loop
    cdef int64_t deadline
    cdef int64_t period
    cdef object fn
    cdef tuple args
    cdef bint cancelled
    cdef bint fired

    def cancel(self) -> None:
        """Stop the timer; a cancelled timer never fires again."""
        if not self.cancelled:
            self.cancelled = True
            self.loop.timers_cancelled += 1

    @property
    def active(self) -> bool:
        return not self.cancelled and not (self.fired and self.period == 0)

    @property
    def deadline_ns(self) -> int:
        return self.deadline


@cython.final
cdef class Deferral:
    """A callback that runs once at the end of the loop iteration in which it
    was armed; arming it again before it runs does nothing."""
    cdef LoopCore loop
    cdef object fn
    cdef bint armed

    def __init__(self, LoopCore loop, fn):
        self.loop = loop
        self.fn = fn

    def arm(self) -> None:
        if not self.armed:
            self.armed = True
            self.loop.deferred.append(self)

    @property
    def armed(self) -> bool:
        return self.armed


@cython.final
cdef class Doorbell:
    """Ring from any thread; the callback runs on the loop's thread.

    Rings that arrive before the callback runs are coalesced into one call.
    """
    cdef LoopCore loop
    cdef object fn
    cdef int flag
    cdef bint closed

    def ring(self) -> None:
        if self.closed:
            return
        if evpl_xchg(&self.flag, 1) == 0:
            self.loop._wake()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.loop.doorbells.remove(self)


@cython.final
cdef class FdWatch(_Source):
    """Level-triggered interest in a foreign file descriptor."""
    cdef object on_readable
    cdef object on_writable
    cdef bint active

    cdef int _update(self) except -1:
        cdef epoll_event ev
        ev.events = 0
        if self.on_readable is not None:
            ev.events |= EPOLLIN
        if self.on_writable is not None:
            ev.events |= EPOLLOUT
        ev.data.ptr = <void*>self
        if epoll_ctl(self.loop.epfd, EPOLL_CTL_MOD, self.fd, &ev) < 0:
            raise OSError(errno, "epoll_ctl(MOD) on watched fd")
        return 0

    def modify(self, on_readable=None, on_writable=None) -> None:
        """Replace both callbacks (None removes that interest)."""
        if not self.active:
            raise EvplError("watch is cancelled")
        self.on_readable = on_readable
        self.on_writable = on_writable
        self._update()

    def cancel(self) -> None:
        """Stop watching; the fd itself is left open (it is not ours)."""
        if self.active:
            self.active = False
            self.loop._ep_del(self, True)
            self.loop.sources.discard(self)

    def fileno(self) -> int:
        return self.fd

    cdef void _event(self, uint32_t events):
        if events & (EPOLLIN | EPOLLHUP | EPOLLERR) and self.on_readable is not None:
            try:
                self.on_readable()
            except Exception as exc:
                self.loop._callback_error(exc, None)
        if self.active and events & (EPOLLOUT | EPOLLERR) and self.on_writable is not None:
            try:
                self.on_writable()
            except Exception as exc:
                self.loop._callback_error(exc, None)


cdef class Framer:
    """Engine-side framing parameters (built by ``evpl.framing``)."""
    cdef readonly int kind
    cdef readonly int size
    cdef readonly bint big
    cdef readonly bint includes_header
    cdef readonly size_t max_message
    cdef readonly object fn

    def __init__(self, int kind, int size=4, bint big=True, bint includes_header=False,
                 size_t max_message=64 << 20, fn=None):
        self.kind = kind
        self.size = size
        self.big = big
        self.includes_header = includes_header
        self.max_message = max_message
        self.fn = fn


cdef inline Py_ssize_t _scan_length(Framer f, const unsigned char* p, size_t avail,
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


cdef inline Py_ssize_t _scan_record(Framer f, const unsigned char* p, size_t avail,
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
        if h & 0x80000000:
            payload[0] = total
            nfrag[0] = n
            return <Py_ssize_t>off


@cython.final
@cython.no_gc_clear
cdef class Bind(_Source):
    """One connection or datagram socket, whatever the backend.

    Created by ``Loop.listen`` (accepted), ``Loop.connect`` and ``Loop.bind``.
    """
    cdef readonly str backend
    cdef bint stream
    cdef int state
    cdef readonly object handler
    cdef object cb_connected, cb_data, cb_message, cb_datagram
    cdef object cb_paused, cb_writable, cb_sent, cb_eof, cb_closed
    # framing
    cdef Framer framer
    cdef int fr_kind
    cdef size_t max_message
    # receive state
    cdef Chunk* part_chunk
    cdef char* part_ptr
    cdef size_t part_len
    cdef size_t part_need
    cdef bint part_asm
    cdef bint part_own
    cdef bint rx_ready
    cdef bint rx_queued
    cdef bint reading_paused
    cdef bint eof
    cdef size_t max_datagram
    cdef size_t stride
    # send state
    cdef TxEntry* txq
    cdef size_t tx_cap
    cdef size_t tx_head
    cdef size_t tx_tail
    cdef size_t tx_off
    cdef readonly size_t queued_bytes
    cdef size_t high_water
    cdef size_t low_water
    cdef size_t hard_limit
    cdef readonly bint paused
    cdef bint tx_blocked
    cdef bint dirty
    cdef bint finishing
    # datagram address caches
    cdef object tx_addr
    cdef sockaddr_in6 tx_sa
    cdef socklen_t tx_salen
    cdef object rx_addr
    cdef sockaddr_in6 rx_sa
    cdef socklen_t rx_salen
    cdef object close_error
    cdef object _peer
    # io_uring state
    cdef bint ur
    cdef bint ur_recv_armed
    cdef bint ur_send_inflight
    cdef bint ur_send_zc
    cdef iovec* ur_iov
    cdef msghdr ur_mh
    cdef list ur_zc_hold
    cdef list ur_backlog
    cdef bint eof_pending
    cdef bint no_zc
    cdef object finish_error
    cdef bint ur_draining
    cdef bint hup
    cdef UrDgSend* ur_dg
    cdef int ur_dg_inflight
    cdef size_t ur_arm_adds     # LoopCore.ur_adds when the receive was armed
    cdef size_t gso_limit
    cdef bint gro              # UDP_GRO is on: a receive may be a train of datagrams
    # The pool the partial message's chunk goes back to, held by the Bind
    # itself so that __dealloc__ does not depend on the loop's attributes
    # (when loop, Binds and Buffers are garbage together, e.g. at interpreter
    # exit without Loop.close(), a collector-cleared loop.pool was None).
    cdef Pool pool

    def __dealloc__(self):
        self._drop_queue()
        if self.part_chunk != NULL and self.pool is not None:
            chunk_unref(self.pool, self.part_chunk)
            self.part_chunk = NULL
        if self.txq != NULL:
            PyMem_Free(self.txq)
            self.txq = NULL
        if self.ur_iov != NULL:
            PyMem_Free(self.ur_iov)
            self.ur_iov = NULL
        if self.ur_dg != NULL:
            PyMem_Free(self.ur_dg)
            self.ur_dg = NULL

    # ---- configuration --------------------------------------------------

    cdef void _setup(self, LoopCore loop, int fd, str backend, bint stream, handler,
                     Framer framer, size_t high_water, size_t low_water, size_t hard_limit,
                     size_t max_datagram):
        self.kind = K_BIND
        self.loop = loop
        self.pool = loop.pool
        self.fd = fd
        self.backend = backend
        self.stream = stream
        self.handler = handler
        self.cb_connected = handler.on_connected
        self.cb_data = handler.on_data
        self.cb_message = handler.on_message
        self.cb_datagram = handler.on_datagram
        self.cb_paused = handler.on_paused
        self.cb_writable = handler.on_writable
        self.cb_eof = handler.on_eof
        self.cb_closed = handler.on_closed
        self.cb_sent = handler.on_sent if type(handler).on_sent is not loop.base_on_sent else None
        self.framer = framer
        self.fr_kind = framer.kind if framer is not None else F_NONE
        self.max_message = framer.max_message if framer is not None else 0
        self.high_water = high_water
        self.low_water = low_water
        self.hard_limit = hard_limit
        self.max_datagram = max_datagram
        self.stride = (max_datagram + 63) & ~(<size_t>63)

    # ---- public API ------------------------------------------------------

    def fileno(self) -> int:
        return self.fd

    @property
    def closed(self) -> bool:
        return self.state == S_CLOSED

    @property
    def connected(self) -> bool:
        return self.state == S_OPEN

    @property
    def framed(self) -> bool:
        return self.fr_kind != F_NONE

    @property
    def local_address(self):
        cdef sockaddr_storage ss
        cdef socklen_t n = sizeof(ss)
        if self.state == S_CLOSED or getsockname(self.fd, <sockaddr*>&ss, &n) < 0:
            return None
        return _sa_to_py(<sockaddr*>&ss, n)

    @property
    def peer_address(self):
        cdef sockaddr_storage ss
        cdef socklen_t n = sizeof(ss)
        if self._peer is None and self.state != S_CLOSED:
            if getpeername(self.fd, <sockaddr*>&ss, &n) == 0:
                self._peer = _sa_to_py(<sockaddr*>&ss, n)
        return self._peer

    @property
    def high_water(self) -> int:
        return self.high_water

    def send(self, data) -> None:
        """Queue ``data`` (a message on a framed Bind) for sending at the end
        of this loop iteration. Raises SendQueueFull past the hard limit."""
        cdef TxEntry* e
        self._can_send()
        e = self._push(data)
        if self.fr_kind == F_LENGTH or self.fr_kind == F_RECORD:
            self._frame(e, e.len)
        self._queued(e.len + e.hdrlen)

    def sendv(self, pieces) -> None:
        """Queue several pieces as one message (one header on a framed Bind)."""
        cdef size_t total = 0, start
        cdef TxEntry* e
        self._can_send()
        start = self.tx_tail
        try:
            for p in pieces:
                e = self._push(p)
                total += e.len
        except BaseException:
            if start != self.tx_tail:      # all or nothing: drop the pieces queued
                self._unpush_from(&self.txq[start])
            raise
        if start == self.tx_tail:
            if self.fr_kind != F_LENGTH and self.fr_kind != F_RECORD:
                return
            e = self._push(b"")
        if self.fr_kind == F_LENGTH or self.fr_kind == F_RECORD:
            self._frame(&self.txq[start], total)
        self._queued(total + self.txq[start].hdrlen)

    cdef int _can_send(self) except -1:
        if self.state == S_CLOSED or self.finishing:
            raise EvplError("send on a closed Bind")
        if not self.stream:
            raise EvplError("datagram Bind: use sendto(data, addr)")
        return 0

    def sendto(self, data, addr) -> None:
        """Queue one datagram to ``addr``; sent with the iteration's batch."""
        cdef TxEntry* e
        if self.state == S_CLOSED:
            raise EvplError("sendto on a closed Bind")
        if self.stream:
            raise EvplError("stream Bind: use send(data)")
        cdef sockaddr_in6 sa
        cdef socklen_t salen
        if addr is not self.tx_addr:
            if self.tx_addr is None or addr != self.tx_addr:
                _py_to_sa(addr, &sa, &salen)
                memcpy(&self.tx_sa, &sa, salen)
                self.tx_salen = salen
            self.tx_addr = addr
        e = self._push(data)
        if e.len > 65507:
            self.tx_tail -= 1
            Py_DECREF(<object>e.owner)
            raise ValueError(f"datagram of {e.len} bytes exceeds the UDP maximum (65507)")
        memcpy(&e.sa, &self.tx_sa, self.tx_salen)
        e.salen = self.tx_salen
        self._queued(e.len)

    def close(self) -> None:
        """Close now; queued sends are dropped. ``on_closed(bind, None)``
        follows at the end of the iteration."""
        self._close(None)

    def finish(self) -> None:
        """Close once everything queued has been sent."""
        if self.state == S_CLOSED:
            return
        if self.tx_head == self.tx_tail and self.ur_dg_inflight == 0:
            self._close(None)
        else:
            self.finishing = True
            self._mark_dirty()

    def pause_reading(self) -> None:
        """Stop reading until ``resume_reading`` (data already received in
        the current batch is still delivered)."""
        self.reading_paused = True
        if self.ur_recv_armed and self.state == S_OPEN:
            evpl_uring_cancel(self.loop.ur, (<uint64_t><void*>self) | OP_RECV, OP_CANCEL)
            self.loop.ur_submit = True

    def resume_reading(self) -> None:
        self.reading_paused = False
        if self.state != S_OPEN:
            return
        if self.ur:
            self._ur_drain()
            self._ur_arm_recv()
        elif self.rx_ready:
            self.loop._queue_read(self)

    @property
    def reading(self) -> bool:
        return not self.reading_paused

    def __repr__(self):
        state = {S_CONNECTING: "connecting", S_OPEN: "open", S_CLOSED: "closed"}[self.state]
        return f"<evpl.Bind {self.backend} fd={self.fd} {state} queued={self.queued_bytes}>"

    # ---- send queue -----------------------------------------------------

    cdef TxEntry* _push(self, data) except NULL:
        """Append one entry that references (or copies) ``data``."""
        cdef TxEntry* e
        cdef Buffer b
        cdef Py_buffer view
        cdef size_t cap, n
        if self.tx_tail == self.tx_cap:
            if self.tx_head > 0:
                n = self.tx_tail - self.tx_head
                memmove(self.txq, &self.txq[self.tx_head], n * sizeof(TxEntry))
                self.tx_head = 0
                self.tx_tail = n
            else:
                cap = self.tx_cap * 2 if self.tx_cap else 16
                e = <TxEntry*>PyMem_Realloc(self.txq, cap * sizeof(TxEntry))
                if e == NULL:
                    raise MemoryError()
                self.txq = e
                self.tx_cap = cap
        e = &self.txq[self.tx_tail]
        if type(data) is Buffer:
            b = <Buffer>data
            e.ptr = b.ptr
            e.len = b.length
            e.owner = <PyObject*>data
            Py_INCREF(data)
        elif PyBytes_CheckExact(data):
            e.ptr = PyBytes_AS_STRING(data)
            e.len = PyBytes_GET_SIZE(data)
            e.owner = <PyObject*>data
            Py_INCREF(data)
        else:
            # mutable or foreign memory: copy, so the caller may reuse it
            PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
            try:
                copy = (<char*>view.buf)[:view.len]
            finally:
                PyBuffer_Release(&view)
            e.ptr = PyBytes_AS_STRING(copy)
            e.len = PyBytes_GET_SIZE(copy)
            e.owner = <PyObject*>copy
            Py_INCREF(copy)
        e.hdrlen = 0
        self.tx_tail += 1
        return e

    cdef int _frame(self, TxEntry* e, size_t total) except -1:
        cdef Framer f = self.framer
        if total > f.max_message:
            self._unpush_from(e)
            raise FramingError(
                f"message of {total} bytes exceeds max_message ({f.max_message})")
        if f.kind == F_LENGTH:
            if f.includes_header:
                total += f.size
            if f.size < 8 and total >> (8 * f.size):
                self._unpush_from(e)
                raise FramingError(f"message of {total} bytes does not fit a "
                                   f"{f.size}-byte length prefix")
            evpl_store_uint(e.hdr, f.size, f.big, total)
            e.hdrlen = f.size
        else:
            if total > 0x7fffffff:
                self._unpush_from(e)
                raise FramingError("record larger than 2 GiB - 1")
            evpl_store_uint(e.hdr, 4, 1, total | 0x80000000)
            e.hdrlen = 4
        return 0

    cdef void _unpush_from(self, TxEntry* e):
        cdef size_t i = e - self.txq
        cdef size_t j
        for j in range(i, self.tx_tail):
            Py_DECREF(<object>self.txq[j].owner)
        self.tx_tail = i

    cdef int _queued(self, size_t n) except -1:
        if self.queued_bytes + n > self.hard_limit:
            # undo the entries just pushed: the caller ignored on_paused
            self._unpush_last(n)
            raise SendQueueFull(
                f"send queue would exceed hard_limit ({self.hard_limit} bytes); "
                f"wait for on_writable")
        self.queued_bytes += n
        self._mark_dirty()
        if not self.paused and self.queued_bytes > self.high_water:
            self.paused = True
            self.loop.stat_paused += 1
            try:
                self.cb_paused(self)
            except Exception as exc:
                self.loop._callback_error(exc, self)
        return 0

    cdef void _unpush_last(self, size_t n):
        cdef size_t got = 0
        cdef TxEntry* e
        while got < n and self.tx_tail > self.tx_head:
            e = &self.txq[self.tx_tail - 1]
            got += e.len + e.hdrlen
            Py_DECREF(<object>e.owner)
            self.tx_tail -= 1

    cdef inline void _mark_dirty(self):
        if not self.dirty:
            self.dirty = True
            self.loop.dirty.append(self)

    cdef void _drop_queue(self, list hold=None):
        cdef size_t i
        for i in range(self.tx_head, self.tx_tail):
            if hold is not None:
                hold.append(<object>self.txq[i].owner)
            Py_DECREF(<object>self.txq[i].owner)
        self.tx_head = self.tx_tail = self.tx_off = 0
        self.queued_bytes = 0

    cdef int _flush(self) except -1:
        """Write as much of the queue as the socket takes (writev/sendmmsg,
        or one io_uring sendmsg in flight per Bind)."""
        if self.state != S_OPEN:
            return 0
        if self.ur:
            if not self.stream:
                self._ur_send_dgram()
                return 0
            if self.ur_send_inflight:
                return 0
            if self.tx_head != self.tx_tail:
                self._ur_send()
                return 0
        elif self.tx_head != self.tx_tail and not self.tx_blocked:
            if self.stream:
                self._flush_stream()
            else:
                self._flush_dgram()
        return self._after_flush()

    cdef int _after_flush(self) except -1:
        """Backpressure and drain events once the queue has shrunk."""
        if self.state != S_OPEN:
            return 0
        if self.paused and self.queued_bytes <= self.low_water:
            self.paused = False
            try:
                self.cb_writable(self)
            except Exception as exc:
                self.loop._callback_error(exc, self)
        if self.tx_head == self.tx_tail and self.state == S_OPEN and self.ur_dg_inflight == 0:
            if self.finishing:
                if self.stream:
                    shutdown(self.fd, SHUT_WR)
                self._close(self.finish_error)
            elif self.cb_sent is not None:
                try:
                    self.cb_sent(self)
                except Exception as exc:
                    self.loop._callback_error(exc, self)
        return 0

    cdef void _flush_stream(self):
        cdef iovec* iov = self.loop.iov
        cdef msghdr mh
        cdef int cnt
        cdef ssize_t n
        memset(&mh, 0, sizeof(mh))
        while self.tx_head != self.tx_tail:
            cnt = self._gather(iov, NULL)
            mh.msg_iov = iov
            mh.msg_iovlen = cnt
            n = sendmsg(self.fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT)
            if n < 0:
                if errno == EAGAIN:
                    self.tx_blocked = True
                    return
                if errno == EINTR:
                    continue
                self._close(transport_error(errno, "send"))
                return
            self._retire(n, None)
            if self.tx_head == self.tx_tail:
                return

    cdef void _retire(self, size_t n, list hold):
        """Drop ``n`` sent bytes from the head of the queue. Owners of fully
        sent entries are released, or moved to ``hold`` (zero-copy sends keep
        them until the kernel's notification)."""
        cdef size_t left
        cdef TxEntry* e
        self.loop.stat_bytes_out += n
        self.queued_bytes -= n
        left = n + self.tx_off
        while self.tx_head != self.tx_tail:
            e = &self.txq[self.tx_head]
            if left < e.len + e.hdrlen:
                break
            left -= e.len + e.hdrlen
            if hold is not None:
                hold.append(<object>e.owner)
            Py_DECREF(<object>e.owner)
            self.tx_head += 1
        self.tx_off = left
        if self.tx_head == self.tx_tail:
            self.tx_head = self.tx_tail = self.tx_off = 0

    cdef int _gather(self, iovec* iov, size_t* total):
        """Fill ``iov`` from the queue head (framing headers included)."""
        cdef int cnt = 0
        cdef size_t i = self.tx_head, skip = self.tx_off, sum = 0
        cdef TxEntry* e
        while i != self.tx_tail and cnt < MAX_IOV - 1:
            e = &self.txq[i]
            if e.hdrlen:
                if skip < e.hdrlen:
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

    # ---- io_uring ----------------------------------------------------------

    cdef int _ur_arm_recv(self) except -1:
        if self.ur_recv_armed or self.state != S_OPEN or self.reading_paused or self.eof:
            return 0
        cdef int r
        if self.stream:
            # SQPOLL: the slot ring, see _ur_recv
            r = evpl_uring_recv_multishot(self.loop.ur, self.fd,
                                          (<uint64_t><void*>self) | OP_RECV,
                                          1 if self.loop.sqpoll else 0)
        else:
            # the kernel reads this msghdr for every shot: it lives in the Bind
            memset(&self.ur_mh, 0, sizeof(msghdr))
            self.ur_mh.msg_namelen = sizeof(sockaddr_in6)
            self.ur_mh.msg_controllen = UR_DG_HDR - UR_DG_CTL     # for UDP_GRO
            r = evpl_uring_recvmsg_multishot(self.loop.ur, self.fd, &self.ur_mh,
                                             (<uint64_t><void*>self) | OP_RECV, 1)
        if r < 0:
            raise OSError(EBUSY_, "io_uring submission queue full")
        Py_INCREF(self)
        self.ur_recv_armed = True
        self.ur_arm_adds = self.loop.ur_adds
        self.loop.ur_submit = True
        return 0

    cdef int _ur_starved(self) except -1:
        """The multishot receive ended with ENOBUFS (the ring was empty).
        Re-arm when buffers are added; at once if some were added since it
        was armed: with SQPOLL the kernel thread may have found the ring
        empty before that refill, and no later refill would wake us."""
        if self.loop.ur_adds != self.ur_arm_adds:
            self._ur_arm_recv()
        else:
            self.loop.ur_rearm.append(self)
        return 0

    cdef int _ur_send(self) except -1:
        """Hand the queue (up to 1024 pieces) to one io_uring sendmsg."""
        cdef size_t total = 0
        cdef int cnt
        cdef bint zc
        if self.ur_iov == NULL:
            self.ur_iov = <iovec*>PyMem_Malloc(MAX_IOV * sizeof(iovec))
            if self.ur_iov == NULL:
                raise MemoryError()
        cnt = self._gather(self.ur_iov, &total)
        memset(&self.ur_mh, 0, sizeof(msghdr))
        self.ur_mh.msg_iov = self.ur_iov
        self.ur_mh.msg_iovlen = cnt
        zc = (self.loop.zc_threshold > 0 and total >= self.loop.zc_threshold
              and not self.no_zc)
        if evpl_uring_sendmsg(self.loop.ur, self.fd, &self.ur_mh,
                              (<uint64_t><void*>self) | OP_SEND, zc) < 0:
            raise OSError(EBUSY_, "io_uring submission queue full")
        Py_INCREF(self)
        self.ur_send_inflight = True
        self.ur_send_zc = zc
        self.loop.ur_submit = True
        if zc:
            self.loop.stat_zc_sends += 1
        return 0

    cdef void _ur_sent(self, int res, uint32_t flags):
        """Completion of a sendmsg (or its zero-copy notification)."""
        cdef list hold
        if flags & EVPL_CQE_F_NOTIF:
            # the kernel no longer reads the buffers of the oldest zc send
            if self.ur_zc_hold:
                self.ur_zc_hold.pop(0)
            return
        self.ur_send_inflight = False
        if self.ur_send_zc and flags & EVPL_CQE_F_MORE:
            hold = []
            if self.ur_zc_hold is None:
                self.ur_zc_hold = []
            self.ur_zc_hold.append(hold)
        else:
            hold = None
        if self.state == S_CLOSED:
            self._drop_queue(hold)         # zero-copy: kept until the notification
            return
        if res == -EOPNOTSUPP_ and self.ur_send_zc:
            # this socket type (AF_UNIX) has no zero-copy send: plain from now on
            self.no_zc = True
            self._ur_send()
            return
        if res < 0:
            if res != -ECANCELED:
                self._close(transport_error(-res, "send"))
            else:
                self._close(None)
            return
        self._retire(<size_t>res, hold)
        if self.tx_head != self.tx_tail:
            self._ur_send()
        else:
            self._after_flush()

    cdef int _ur_send_dgram(self) except -1:
        """One sendmsg per queued datagram, or per GSO train of them (see
        _dg_group), at most UR_DG_INFLIGHT in flight; each request owns its
        msghdr, iovecs, address and data owners."""
        cdef UrDgSend* s
        cdef TxEntry* e
        cdef int i = 0, k, n
        if self.ur_dg == NULL:
            self.ur_dg = <UrDgSend*>PyMem_Malloc(UR_DG_INFLIGHT * sizeof(UrDgSend))
            if self.ur_dg == NULL:
                raise MemoryError()
            memset(self.ur_dg, 0, UR_DG_INFLIGHT * sizeof(UrDgSend))
        while self.tx_head != self.tx_tail and self.ur_dg_inflight < UR_DG_INFLIGHT:
            while self.ur_dg[i].busy:
                i += 1
            s = &self.ur_dg[i]
            e = &self.txq[self.tx_head]
            n = self._dg_group(self.tx_head)
            memset(&s.mh, 0, sizeof(msghdr))
            if n == 1:
                s.iov = &s.iov1
                s.owners = &s.owner1
            else:
                s.iov = <iovec*>PyMem_Malloc(n * (sizeof(iovec) + sizeof(PyObject*)))
                if s.iov == NULL:
                    raise MemoryError()
                s.owners = <PyObject**>(s.iov + n)
                evpl_set_gso(&s.mh, s.ctl, e.len)
            memcpy(&s.sa, &e.sa, e.salen)
            s.mh.msg_name = &s.sa
            s.mh.msg_namelen = e.salen
            s.mh.msg_iov = s.iov
            s.mh.msg_iovlen = n
            s.len = 0
            for k in range(n):
                s.iov[k].iov_base = e[k].ptr
                s.iov[k].iov_len = e[k].len
                s.owners[k] = e[k].owner      # the queue's reference moves here
                s.len += e[k].len
            if evpl_uring_sendmsg_dgram(self.loop.ur, self.fd, &s.mh,
                                        (<uint64_t><void*>s) | OP_DGSEND) < 0:
                if n > 1:
                    PyMem_Free(s.iov)
                raise OSError(EBUSY_, "io_uring submission queue full")
            s.n = n
            s.bind = <PyObject*>self
            Py_INCREF(self)
            s.busy = 1
            self.ur_dg_inflight += 1
            self.tx_head += n
            self.loop.ur_submit = True
        if self.tx_head == self.tx_tail:
            self.tx_head = self.tx_tail = 0
        return 0

    cdef void _ur_dgram(self, Chunk* c, char* p):
        """Deliver what one recvmsg shot received, laid out as
        io_uring_recvmsg_out + name + control + payload."""
        cdef LoopCore loop = self.loop
        cdef uint32_t namelen, controllen, payloadlen, oflags
        cdef sockaddr* name = <sockaddr*>(p + 16)
        cdef object addr
        cdef size_t seg = 0
        memcpy(&namelen, p, 4)
        memcpy(&controllen, p + 4, 4)
        memcpy(&payloadlen, p + 8, 4)
        memcpy(&oflags, p + 12, 4)
        if oflags & MSG_TRUNC:
            loop.stat_datagrams_in += 1
            loop.stat_truncated += 1
            return
        if self.gro and controllen:
            seg = evpl_gro_size(p + UR_DG_CTL, min(controllen, <uint32_t>(UR_DG_HDR - UR_DG_CTL)))
        if namelen > sizeof(sockaddr_in6):
            namelen = sizeof(sockaddr_in6)
        addr = self._rx_address(name, namelen)
        self._datagrams(c, p + UR_DG_HDR, payloadlen, seg, addr)

    cdef object _rx_address(self, sockaddr* name, socklen_t namelen):
        """The Python address of a sender (the last one is cached)."""
        if (self.rx_addr is not None and namelen == self.rx_salen
                and memcmp(name, &self.rx_sa, namelen) == 0):
            return self.rx_addr
        addr = _sa_to_py(name, namelen)
        self.rx_addr = addr
        self.rx_salen = namelen
        memcpy(&self.rx_sa, name, namelen)
        return addr

    cdef void _datagrams(self, Chunk* c, char* p, size_t n, size_t seg, addr):
        """Deliver a received datagram, or a train of them that the kernel
        coalesced (UDP GRO: ``seg`` bytes each, the last may be shorter), each
        as its own Buffer. On io_uring a paused Bind keeps them for later."""
        cdef LoopCore loop = self.loop
        cdef size_t off = 0, k
        cdef Buffer buf
        if seg == 0 or seg > n:
            seg = n
        elif seg < n:
            loop.stat_gro_receives += 1
        while True:
            k = min(seg, n - off)
            loop.stat_datagrams_in += 1
            if k > self.max_datagram:
                loop.stat_truncated += 1
            else:
                loop.stat_bytes_in += k
                buf = make_buffer(loop.pool, c, p + off, k)
                if self.ur and (self.reading_paused or self.ur_backlog):
                    if self.ur_backlog is None:
                        self.ur_backlog = []
                    self.ur_backlog.append((buf, addr))
                else:
                    try:
                        self.cb_datagram(self, buf, addr)
                    except Exception as exc:
                        loop._callback_error(exc, self)
                    if self.state != S_OPEN:
                        return
            off += k
            if off >= n:
                return

    cdef void _ur_recv_dgram(self, int res, uint32_t flags):
        """Completion of the multishot recvmsg (one datagram per slot)."""
        cdef LoopCore loop = self.loop
        cdef Chunk* c = NULL
        cdef char* p = NULL
        if flags & EVPL_CQE_F_BUFFER:
            c = loop._ur_slot(flags >> 16, &p)
        if not flags & EVPL_CQE_F_MORE:
            self.ur_recv_armed = False
        if res >= UR_DG_HDR and c != NULL and self.state == S_OPEN:
            self._ur_dgram(c, p)
        if c != NULL:
            chunk_unref(loop.pool, c)
        if not flags & EVPL_CQE_F_MORE and self.state == S_OPEN:
            if res == -ENOBUFS_:
                loop.stat_starved += 1
                self._ur_starved()
            elif res < 0 and res != -ECANCELED:
                loop.stat_dgram_errors += 1     # ICMP errors (refused...): go on
                self._ur_arm_recv()
            elif not self.reading_paused:
                self._ur_arm_recv()

    cdef void _ur_recv(self, int res, uint32_t flags):
        """Completion of the multishot receive."""
        cdef LoopCore loop = self.loop
        cdef unsigned bid
        cdef Chunk* c = NULL
        cdef char* p = NULL
        if not self.stream:
            self._ur_recv_dgram(res, flags)
            return
        if flags & EVPL_CQE_F_BUFFER and loop.sqpoll:
            # An SQPOLL thread may post completions in another order than it
            # consumed an incremental buffer (seen on 6.18: a stream got
            # bytes of another), so there each completion has a whole slot
            # of the slot ring to itself.
            c = loop._ur_slot(flags >> 16, &p)
        elif flags & EVPL_CQE_F_BUFFER:
            bid = flags >> 16
            c = loop.ur_bufs[bid]
            p = c.data + loop.ur_off[bid]
            if res > 0:
                loop.ur_off[bid] += res
            c.refs += 1                 # hold it across the callbacks
            if not flags & EVPL_CQE_F_BUF_MORE:
                loop._ur_buf_done(bid)
        if not flags & EVPL_CQE_F_MORE:
            self.ur_recv_armed = False
        if res > 0 and self.state == S_OPEN and c != NULL:
            loop.stat_bytes_in += res
            self._ur_take(c, p, res)
        if c != NULL:
            chunk_unref(loop.pool, c)
        if not flags & EVPL_CQE_F_MORE and self.state == S_OPEN:
            if res == 0:
                if self.ur_backlog:
                    self.eof_pending = True     # after the kept bytes
                else:
                    self._on_eof()
            elif res == -ENOBUFS_:
                loop.stat_starved += 1
                self._ur_starved()
            elif res < 0 and res != -ECANCELED:
                self._close(transport_error(-res, "receive"))
            elif not self.reading_paused and not self.eof:
                self._ur_arm_recv()

    cdef int _dg_group(self, size_t i) noexcept:
        """How many queued datagrams from txq[i] on leave as one UDP GSO send:
        same address, same size (a shorter one may end the train), at most
        GSO_SEGS of them and GSO_BYTES in all. One if GSO is off or the size
        is at or above what this Bind's path accepted."""
        cdef TxEntry* first = &self.txq[i]
        cdef TxEntry* e
        cdef size_t seg = first.len, total = first.len
        cdef int n = 1
        if seg == 0 or seg >= self.gso_limit:
            return 1
        while n < GSO_SEGS and i + n != self.tx_tail:
            e = &self.txq[i + n]
            if (e.len == 0 or e.len > seg or total + e.len > GSO_BYTES or e.salen != first.salen
                    or memcmp(&e.sa, &first.sa, e.salen) != 0):
                break
            total += e.len
            n += 1
            if e.len < seg:
                break
        return n

    cdef bint _gso_refused(self, int err, size_t seg) noexcept:
        """Whether a failed send of a GSO train failed because of GSO; if so,
        lower this Bind's limit so such trains are not built again (EINVAL,
        EMSGSIZE: the segment exceeds the path MTU; EIO: the device cannot
        checksum, so GSO is off)."""
        if err == EIO_:
            self.gso_limit = 0
        elif err == EINVAL_ or err == EMSGSIZE_:
            self.gso_limit = min(self.gso_limit, seg)
        else:
            return False
        self.loop.stat_gso_refused += 1
        return True

    cdef void _sent_one(self, ssize_t r, size_t n) noexcept:
        """Count the outcome of sending one datagram of n bytes."""
        if r >= 0:
            self.loop.stat_datagrams_out += 1
            self.loop.stat_bytes_out += n
        else:
            self.loop.stat_dgram_errors += 1

    cdef void _flush_dgram(self):
        """Send the queue with sendmmsg: one message per datagram, or per GSO
        train of datagrams to one peer (see _dg_group)."""
        cdef LoopCore loop = self.loop
        cdef mmsghdr* mm = loop.mmsg
        cdef iovec* iov = loop.iov
        cdef unsigned int cnt, k, nio, g, j
        cdef size_t i
        cdef int n
        cdef TxEntry* e
        while self.tx_head != self.tx_tail:
            cnt = 0
            nio = 0
            i = self.tx_head
            while i != self.tx_tail and cnt < MAX_MMSG and nio + GSO_SEGS <= MAX_IOV:
                g = self._dg_group(i)
                e = &self.txq[i]
                memset(&mm[cnt].msg_hdr, 0, sizeof(msghdr))
                for j in range(g):
                    iov[nio + j].iov_base = e[j].ptr
                    iov[nio + j].iov_len = e[j].len
                mm[cnt].msg_hdr.msg_iov = &iov[nio]
                mm[cnt].msg_hdr.msg_iovlen = g
                mm[cnt].msg_hdr.msg_name = &e.sa
                mm[cnt].msg_hdr.msg_namelen = e.salen
                if g > 1:
                    evpl_set_gso(&mm[cnt].msg_hdr, &loop.dg_ctl[cnt * 3], e.len)
                loop.dg_group[cnt] = g
                nio += g
                i += g
                cnt += 1
            n = sendmmsg(self.fd, mm, cnt, MSG_NOSIGNAL | MSG_DONTWAIT)
            if n < 0:
                if errno == EAGAIN or errno == ENOBUFS:
                    self.tx_blocked = True
                    return
                if errno == EINTR:
                    continue
                if loop.dg_group[0] > 1 and self._gso_refused(errno, self.txq[self.tx_head].len):
                    continue                # again, without that train
                # this datagram cannot be sent (unreachable, bad address...):
                # drop it, count it, go on with the rest
                loop.stat_dgram_errors += loop.dg_group[0]
                self._dg_retire(loop.dg_group[0])
                continue
            for k in range(<unsigned int>n):
                g = loop.dg_group[k]
                if g > 1:
                    loop.stat_gso_sends += 1
                loop.stat_datagrams_out += g
                self._dg_retire(g)
        self.tx_head = self.tx_tail = 0

    cdef void _dg_retire(self, unsigned int g):
        """Drop the first g datagrams of the queue (sent or failed)."""
        cdef TxEntry* e
        cdef unsigned int k
        for k in range(g):
            e = &self.txq[self.tx_head]
            self.queued_bytes -= e.len
            self.loop.stat_bytes_out += e.len
            Py_DECREF(<object>e.owner)
            self.tx_head += 1

    # ---- lifecycle ------------------------------------------------------

    cdef void _close(self, error):
        """Close the socket now; on_closed is delivered at iteration end."""
        cdef int i
        if self.state == S_CLOSED:
            return
        self.state = S_CLOSED
        if self._peer is None and self.stream:
            self.peer_address  # remember it for on_closed handlers
        if self.ur_recv_armed:
            evpl_uring_cancel(self.loop.ur, (<uint64_t><void*>self) | OP_RECV, OP_CANCEL)
            self.loop.ur_submit = True
        if self.ur_send_inflight:
            # the kernel still reads the queue: the send's completion drops it
            evpl_uring_cancel(self.loop.ur, (<uint64_t><void*>self) | OP_SEND, OP_CANCEL)
            self.loop.ur_submit = True
            self.queued_bytes = 0
        else:
            self._drop_queue()
        if self.ur_dg_inflight:
            for i in range(UR_DG_INFLIGHT):
                if self.ur_dg[i].busy:
                    evpl_uring_cancel(self.loop.ur, (<uint64_t><void*>&self.ur_dg[i]) | OP_DGSEND,
                                      OP_CANCEL)
            self.loop.ur_submit = True
            self.queued_bytes = 0
        self.ur_backlog = None
        if self.ur:
            # in-flight requests hold the file: shut the socket down now so
            # the peer sees the close even before the cancellations complete
            shutdown(self.fd, SHUT_RDWR)
            self.loop.ur_submit = False
            evpl_uring_submit(self.loop.ur)
        self.loop._ep_del(self, False)          # closing the fd removes it
        c_close(self.fd)
        if self.part_chunk != NULL:
            chunk_unref(self.loop.pool, self.part_chunk)
            self.part_chunk = NULL
        self.part_len = 0
        self.paused = False
        self.close_error = error
        self.loop.closing.append(self)

    cdef void _connected(self):
        self.state = S_OPEN
        try:
            self.cb_connected(self)
        except Exception as exc:
            self.loop._callback_error(exc, self)
        if self.tx_head != self.tx_tail:
            self._mark_dirty()          # sends queued while connecting
        if self.ur and self.state == S_OPEN:
            self._ur_arm_recv()

    cdef void _event(self, uint32_t events):
        cdef int err = 0
        cdef socklen_t elen = sizeof(err)
        if self.state == S_CLOSED:
            return
        if self.state == S_CONNECTING:
            if not events & (EPOLLOUT | EPOLLERR | EPOLLHUP):
                return
            getsockopt(self.fd, SOL_SOCKET, SO_ERROR, &err, &elen)
            if err:
                self._close(transport_error(err, f"connect to {self._peer!r}"))
                return
            if self.ur:
                # connected: from now on io_uring, not epoll, serves this socket
                self.loop._ep_del(self, True)
            self._connected()
            if self.state != S_OPEN or self.ur:
                return
            events |= EPOLLOUT
        if events & EPOLLOUT and self.tx_blocked:
            self.tx_blocked = False
            self._flush()
            if self.state != S_OPEN:
                return
        if events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR):
            self.rx_ready = True
            if events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR):
                # the peer's FIN (or an error) may sit behind the data: a
                # short read no longer means "drained", read until EOF/EAGAIN
                self.hup = True
            if not self.reading_paused:
                self._read()

    cdef void _read(self):
        if self.ur:
            self._ur_drain()
        elif self.stream:
            if self.fr_kind == F_NONE:
                self._read_raw()
            else:
                self._read_framed()
        else:
            self._read_dgram()

    cdef bint _rx_error(self, ssize_t n):
        """Handle a failed or zero read; True if reading must stop."""
        if n == 0:
            self.rx_ready = False
            self._on_eof()
            return True
        if errno == EAGAIN:
            self.rx_ready = False
            return True
        if errno == EINTR:
            return False
        self.rx_ready = False
        self._close(transport_error(errno, "receive"))
        return True

    cdef void _on_eof(self):
        self.eof = True
        if self.part_len:
            self._close(FramingError(
                f"connection closed in the middle of a message ({self.part_len} bytes buffered)"))
            return
        try:
            self.cb_eof(self)
        except Exception as exc:
            self.loop._callback_error(exc, self)

    cdef void _read_raw(self):
        cdef LoopCore loop = self.loop
        cdef int budget = READ_BUDGET
        cdef ssize_t n
        cdef size_t space
        cdef char* p
        cdef Buffer buf
        while budget > 0 and self.state == S_OPEN and not self.reading_paused and not self.eof:
            budget -= 1
            if loop._rx_reserve(loop.min_space) < 0:
                loop._starve(self)
                return
            p = loop.rx_chunk.data + loop.rx_used
            space = loop.rx_chunk.size - loop.rx_used
            n = recv(self.fd, p, space, MSG_DONTWAIT)
            if n <= 0:
                if self._rx_error(n):
                    return
                continue
            loop.rx_used += n
            loop.stat_bytes_in += n
            buf = make_buffer(loop.pool, loop.rx_chunk, p, n)
            try:
                self.cb_data(self, buf)
            except Exception as exc:
                loop._callback_error(exc, self)
            buf = None
            if <size_t>n < space and not self.hup:
                self.rx_ready = False
                return
        if self.rx_ready and self.state == S_OPEN and not self.reading_paused and not self.eof:
            loop._queue_read(self)

    cdef void _set_partial(self, Chunk* c, char* p, size_t n, size_t need):
        c.refs += 1
        if self.part_chunk != NULL:
            chunk_unref(self.loop.pool, self.part_chunk)
        self.part_chunk = c
        self.part_ptr = p
        self.part_len = n
        self.part_need = need
        self.part_asm = False
        self.part_own = False

    cdef void _clear_partial(self):
        if self.part_chunk != NULL:
            chunk_unref(self.loop.pool, self.part_chunk)
            self.part_chunk = NULL
        self.part_len = 0
        self.part_need = 0
        self.part_asm = False
        self.part_own = False

    cdef int _keep_rest(self, Chunk* c, char* p, size_t n, int need, bint own,
                        size_t room):
        """Keep the incomplete tail of a read as the partial message. One that
        is large (or known not to fit in ``room``, the bytes the next read
        can land in after it) moves to a chunk of its own; -1 if the pool had
        none."""
        self._set_partial(c, p, n, need)
        self.part_own = own
        if need > 0 and (<size_t>need >= self.loop.asm_threshold or <size_t>need > room):
            return self._to_assembly(need)
        if need == 0 and n >= self.loop.asm_threshold:
            return self._to_assembly(min(n * 2, self.max_message + 16))
        return 0

    cdef int _to_assembly(self, size_t cap):
        """Move the partial message into a chunk of its own of ``cap`` bytes."""
        cdef Chunk* c = self.loop.pool.get_size(cap)
        if c == NULL:
            return -1
        memcpy(c.data, self.part_ptr, self.part_len)
        if self.part_chunk != NULL:
            chunk_unref(self.loop.pool, self.part_chunk)
        self.part_chunk = c
        self.part_ptr = c.data
        self.part_asm = True
        return 0

    cdef Py_ssize_t _scan(self, Chunk* c, char* p, size_t avail, size_t* hint, size_t* payload,
                          int* nfrag) except? -100:
        cdef Framer f = self.framer
        cdef Py_ssize_t r
        hint[0] = 0
        nfrag[0] = 1
        if self.fr_kind == F_LENGTH:
            r = _scan_length(f, <unsigned char*>p, avail, hint)
            if r > 0:
                payload[0] = r - f.size
            return r
        if self.fr_kind == F_RECORD:
            return _scan_record(f, <unsigned char*>p, avail, hint, payload, nfrag)
        # callable framer: it sees the buffered bytes, returns a length
        peek = make_buffer(self.loop.pool, c, p, avail)
        r = f.fn(memoryview(peek))
        if r > 0 and <size_t>r > f.max_message:
            return E_OVERSIZE
        if r == 0 and avail >= f.max_message:
            return E_OVERSIZE
        if r > 0 and <size_t>r > avail:
            hint[0] = r
            return 0
        payload[0] = r
        return r

    cdef Buffer _message(self, Chunk* c, char* p, Py_ssize_t r, size_t payload, int nfrag):
        """The Buffer for one complete message of ``r`` wire bytes at ``p``."""
        cdef Chunk* dst
        cdef size_t off = 0, got = 0, flen
        cdef Buffer b
        if self.fr_kind == F_LENGTH:
            return make_buffer(self.loop.pool, c, p + self.framer.size, payload)
        if self.fr_kind == F_CALLABLE:
            return make_buffer(self.loop.pool, c, p, r)
        if nfrag == 1:
            return make_buffer(self.loop.pool, c, p + 4, payload)
        dst = self.loop.pool.get_size(payload if payload else 1)
        if dst == NULL:
            return None
        while got < payload:
            flen = <size_t>evpl_load_uint(<unsigned char*>p + off, 4, 1) & 0x7fffffff
            memcpy(dst.data + got, p + off + 4, flen)
            got += flen
            off += 4 + flen
        b = make_buffer(self.loop.pool, dst, dst.data, payload)
        chunk_unref(self.loop.pool, dst)
        return b

    cdef int _deliver(self, Chunk* c, char* base, size_t total, size_t* consumed) except -2:
        """Deliver every whole message in ``base[0:total]``; returns the
        number of bytes needed for the next one (0 if unknown), -1 if the Bind
        was closed."""
        cdef size_t off = 0, hint = 0, payload = 0
        cdef int nfrag = 1
        cdef Py_ssize_t r
        cdef Buffer msg
        while off < total:
            try:
                r = self._scan(c, base + off, total - off, &hint, &payload, &nfrag)
            except Exception as exc:
                self.loop._callback_error(exc, self)
                return -1
            if r == 0:
                break
            if r < 0:
                self._framing_failed(r, total - off, base + off)
                return -1
            msg = self._message(c, base + off, r, payload, nfrag)
            if msg is None:
                self._close(FramingError("buffer pool exhausted while reassembling a record"))
                return -1
            off += r
            self.loop.stat_messages_in += 1
            try:
                self.cb_message(self, msg)
            except Exception as exc:
                self.loop._callback_error(exc, self)
            msg = None
            if self.state != S_OPEN:
                return -1
            hint = 0
        consumed[0] = off
        return <int>min(hint, <size_t>0x7fffffff)

    cdef void _framing_failed(self, Py_ssize_t r, size_t avail, char* p):
        if r == E_OVERSIZE:
            msg = f"message exceeds max_message ({self.max_message} bytes)"
        elif r == E_FRAGMENTS:
            msg = f"record has more than {MAX_FRAGMENTS} fragments"
        elif self.fr_kind == F_CALLABLE:
            msg = f"framing callable reported a bad stream ({r})"
        else:
            msg = "length prefix smaller than its own header"
        # answers to the good messages before the bad one may be queued:
        # read nothing more, send them, then close with the error
        self._clear_partial()
        self.reading_paused = True
        self.eof = True
        if self.ur_recv_armed:
            evpl_uring_cancel(self.loop.ur, (<uint64_t><void*>self) | OP_RECV, OP_CANCEL)
            self.loop.ur_submit = True
        self.finish_error = FramingError(msg)
        if self.tx_head == self.tx_tail and not self.ur_send_inflight:
            self._close(self.finish_error)
        else:
            self.finishing = True
            self._mark_dirty()

    cdef void _read_framed(self):
        cdef LoopCore loop = self.loop
        cdef int budget = READ_BUDGET
        cdef ssize_t n
        cdef size_t space, want, total, consumed, cap
        cdef char* base
        cdef int need
        while budget > 0 and self.state == S_OPEN and not self.reading_paused and not self.eof:
            budget -= 1
            if self.part_asm:
                # a large message read straight into its own chunk
                cap = self.part_chunk.size - <size_t>(self.part_ptr - self.part_chunk.data)
                want = (self.part_need - self.part_len) if self.part_need else cap - self.part_len
                n = recv(self.fd, self.part_ptr + self.part_len, want, MSG_DONTWAIT)
                if n <= 0:
                    if self._rx_error(n):
                        return
                    continue
                loop.stat_bytes_in += n
                self.part_len += n
                if self._after_asm_read() < 0:
                    return
                if <size_t>n < want and not self.hup:
                    self.rx_ready = False
                    return
                continue
            if self.part_len >= loop.asm_threshold:
                # a big partial left behind by an earlier pool shortage
                if self._to_assembly(max(self.part_need, min(self.part_len * 2,
                                                             self.max_message + 16))) < 0:
                    loop._starve(self)
                    return
                continue
            if loop._rx_reserve(loop.min_space + self.part_len) < 0:
                loop._starve(self)
                return
            base = loop.rx_chunk.data + loop.rx_used
            if self.part_len:
                if self.part_chunk == loop.rx_chunk and self.part_ptr + self.part_len == base:
                    base = self.part_ptr          # still contiguous: no copy
                else:
                    memcpy(base, self.part_ptr, self.part_len)
                    loop.rx_used += self.part_len
                    loop.stat_partial_copies += 1
            total = self.part_len
            self._clear_partial()
            space = loop.rx_chunk.size - loop.rx_used
            n = recv(self.fd, loop.rx_chunk.data + loop.rx_used, space, MSG_DONTWAIT)
            if n <= 0:
                if total:
                    self._set_partial(loop.rx_chunk, base, total, 0)
                if self._rx_error(n):
                    return
                continue
            loop.rx_used += n
            loop.stat_bytes_in += n
            total += n
            consumed = 0
            need = self._deliver(loop.rx_chunk, base, total, &consumed)
            if need < 0:
                return
            if consumed < total and self._keep_rest(
                    loop.rx_chunk, base + consumed, total - consumed, need, False,
                    loop.rx_chunk.size - loop.rx_used) < 0:
                loop._starve(self)
                return
            if <size_t>n < space and not self.hup:
                self.rx_ready = False
                return
        if self.rx_ready and self.state == S_OPEN and not self.reading_paused and not self.eof:
            loop._queue_read(self)

    cdef int _after_asm_read(self) except -2:
        """Deliver the assembled message once it is complete; -1 if closed."""
        cdef size_t consumed = 0, left, cap
        cdef int need
        cdef Chunk* c = self.part_chunk
        cdef char* p = self.part_ptr
        cdef size_t total = self.part_len
        if self.part_need and total < self.part_need:
            return 0
        self.part_chunk = NULL           # its reference is now ours
        self.part_len = 0
        self.part_asm = False
        need = self._deliver(c, p, total, &consumed)
        if need < 0:
            chunk_unref(self.loop.pool, c)
            return -1
        left = total - consumed
        if left:
            # still incomplete (unknown length, or a longer record): keep it
            self.part_chunk = c
            self.part_ptr = p + consumed
            self.part_len = left
            self.part_need = need
            self.part_asm = True
            cap = c.size - (<size_t>(self.part_ptr - c.data))
            if (need and <size_t>need > cap) or (not need and left == cap):
                want = max(<size_t>need, min(cap * 2, self.max_message + 16))
                if self._to_assembly(want) < 0:
                    self._close(FramingError("buffer pool exhausted while assembling a message"))
                    return -1
            return 0
        chunk_unref(self.loop.pool, c)
        return 0

    cdef size_t _arrived(self, Chunk* c, char* p, size_t n):
        """Bytes the kernel already placed at ``p`` in chunk ``c`` (io_uring
        provided buffers): deliver whole messages, keep the partial. Returns
        how many trailing bytes could not be taken (pool exhausted, or the
        Bind paused): the caller keeps them for later.

        A message split across two receives is completed by copying just the
        missing bytes after its first part (in a chunk of the Bind's own);
        everything after it is delivered in place again."""
        cdef LoopCore loop = self.loop
        cdef Buffer buf
        cdef size_t total, consumed = 0, k, cap, want
        cdef char* base
        cdef Chunk* bc
        cdef int need
        if self.fr_kind == F_NONE:
            buf = make_buffer(loop.pool, c, p, n)
            try:
                self.cb_data(self, buf)
            except Exception as exc:
                loop._callback_error(exc, self)
            return 0
        while n > 0 and self.state == S_OPEN:
            if self.reading_paused:
                return n
            if self.part_asm:
                cap = self.part_chunk.size - <size_t>(self.part_ptr - self.part_chunk.data)
                k = (self.part_need - self.part_len) if self.part_need else cap - self.part_len
                if k > n:
                    k = n
                memcpy(self.part_ptr + self.part_len, p, k)
                self.part_len += k
                p += k
                n -= k
                if self._after_asm_read() < 0:
                    return 0
                continue
            if self.part_len and not (self.part_chunk == c and self.part_ptr + self.part_len == p):
                # complete the partial: copy only what it still needs
                k = n
                if self.part_need > self.part_len and self.part_need - self.part_len < n:
                    k = self.part_need - self.part_len
                cap = self.part_chunk.size - <size_t>(self.part_ptr - self.part_chunk.data)
                if not (self.part_own and cap - self.part_len >= k):
                    # room for the whole message when its length is known
                    want = max(self.part_len + k, self.part_need)
                    bc = loop.pool.get_size(want)
                    if bc == NULL:
                        # the pool is exhausted, largely by buffers the ring
                        # filled: one message may go past the limit to progress
                        bc = loop.pool.get_heap_forced(
                            want, self.part_chunk.size
                            if self.part_own and self.part_chunk.heap == 2 else 0)
                        if bc == NULL:
                            return n          # retried when buffers come back
                    memcpy(bc.data, self.part_ptr, self.part_len)
                    self._set_partial(bc, bc.data, self.part_len, self.part_need)
                    chunk_unref(loop.pool, bc)        # the partial holds it now
                    self.part_own = True
                memcpy(self.part_ptr + self.part_len, p, k)
                self.part_len += k
                loop.stat_partial_copies += 1
                p += k
                n -= k
                bc = self.part_chunk
                base = self.part_ptr
                total = self.part_len
            elif self.part_len:
                bc = c                         # still contiguous in the same buffer
                base = self.part_ptr
                total = self.part_len + n
                n = 0
            else:
                bc = c
                base = p
                total = n
                n = 0
            bc.refs += 1
            own = self.part_own and bc == self.part_chunk
            self._clear_partial()
            need = self._deliver(bc, base, total, &consumed)
            if need >= 0 and consumed < total:
                # if the pool has no chunk for a large message, the partial
                # stays put and is joined later
                self._keep_rest(bc, base + consumed, total - consumed, need, own,
                                <size_t>-1)
            chunk_unref(loop.pool, bc)
        return 0

    cdef void _ur_take(self, Chunk* c, char* p, size_t n):
        """Deliver received bytes in order, keeping what cannot be taken yet."""
        cdef size_t left
        if self.ur_backlog or self.reading_paused:
            self._ur_keep(c, p, n, False)
            return
        left = self._arrived(c, p, n)
        if left and self.state == S_OPEN:
            self._ur_keep(c, p + (n - left), left, False)

    cdef void _ur_keep(self, Chunk* c, char* p, size_t n, bint front):
        buf = make_buffer(self.loop.pool, c, p, n)
        if self.ur_backlog is None:
            self.ur_backlog = []
        if front:
            self.ur_backlog.insert(0, buf)
        else:
            self.ur_backlog.append(buf)
        if not self.reading_paused:
            self.loop._starve(self)

    cdef void _ur_drain(self):
        """Feed kept bytes through framing once the Bind may take them."""
        cdef Buffer buf
        cdef size_t left
        if self.ur_draining:
            return                    # resumed from a callback of this drain
        self.ur_draining = True
        if not self.stream:
            try:
                while self.ur_backlog and self.state == S_OPEN and not self.reading_paused:
                    item = self.ur_backlog.pop(0)
                    try:
                        self.cb_datagram(self, item[0], item[1])
                    except Exception as exc:
                        self.loop._callback_error(exc, self)
                    item = None
            finally:
                self.ur_draining = False
            return
        try:
            while self.ur_backlog and self.state == S_OPEN and not self.reading_paused:
                buf = self.ur_backlog.pop(0)
                left = self._arrived(buf.chunk, buf.ptr, buf.length)
                if left and self.state == S_OPEN:
                    self._ur_keep(buf.chunk, buf.ptr + (buf.length - left), left, True)
                    return
        finally:
            self.ur_draining = False
        if self.eof_pending and not self.ur_backlog and self.state == S_OPEN:
            self.eof_pending = False
            self._on_eof()

    cdef void _read_dgram(self):
        cdef LoopCore loop = self.loop
        cdef mmsghdr* mm = loop.mmsg
        cdef iovec* iov = loop.iov
        cdef sockaddr_in6* names = loop.names
        cdef unsigned int vlen, i
        cdef int n
        cdef int budget = READ_BUDGET
        cdef size_t stride = self.stride
        cdef size_t seg
        cdef char* base
        cdef object addr
        while budget > 0 and self.state == S_OPEN and not self.reading_paused:
            budget -= 1
            if loop._rx_reserve(stride) < 0:
                loop._starve(self)
                return
            base = loop.rx_chunk.data + loop.rx_used
            vlen = (loop.rx_chunk.size - loop.rx_used) // stride
            if vlen > MAX_MMSG:
                vlen = MAX_MMSG
            for i in range(vlen):
                iov[i].iov_base = base + i * stride
                # with GRO a train may fill the whole slot
                iov[i].iov_len = stride if self.gro else self.max_datagram
                mm[i].msg_hdr.msg_iov = &iov[i]
                mm[i].msg_hdr.msg_iovlen = 1
                mm[i].msg_hdr.msg_name = &names[i]
                mm[i].msg_hdr.msg_namelen = sizeof(sockaddr_in6)
                if self.gro:
                    mm[i].msg_hdr.msg_control = &loop.dg_rctl[i * 3]
                    mm[i].msg_hdr.msg_controllen = EVPL_GRO_CTL
                else:
                    mm[i].msg_hdr.msg_control = NULL
                    mm[i].msg_hdr.msg_controllen = 0
                mm[i].msg_hdr.msg_flags = 0
            n = recvmmsg(self.fd, mm, vlen, MSG_DONTWAIT, NULL)
            if n <= 0:
                if n < 0 and errno == EINTR:
                    continue
                if n < 0 and errno != EAGAIN:
                    # ICMP errors (port unreachable) surface here: count, go on
                    loop.stat_dgram_errors += 1
                    continue
                self.rx_ready = False
                return
            loop.rx_used += (n - 1) * stride + mm[n - 1].msg_len
            for i in range(<unsigned int>n):
                if mm[i].msg_hdr.msg_flags & MSG_TRUNC:
                    loop.stat_datagrams_in += 1
                    loop.stat_truncated += 1
                    continue
                seg = 0
                if self.gro and mm[i].msg_hdr.msg_controllen:
                    seg = evpl_gro_size(&loop.dg_rctl[i * 3], mm[i].msg_hdr.msg_controllen)
                addr = self._rx_address(<sockaddr*>&names[i], mm[i].msg_hdr.msg_namelen)
                self._datagrams(loop.rx_chunk, base + i * stride, mm[i].msg_len, seg, addr)
                if self.state != S_OPEN:
                    return
            if <unsigned int>n < vlen:
                self.rx_ready = False
                return
        if self.rx_ready and self.state == S_OPEN and not self.reading_paused:
            loop._queue_read(self)


cdef void _ur_dg_done(LoopCore loop, UrDgSend* s, int res):
    """Completion of one datagram (or GSO train) sendmsg: count it, release
    its owners. A train the path refuses to segment is sent again one
    datagram at a time, and this Bind stops building such trains."""
    cdef Bind b = <Bind>s.bind
    cdef int k
    s.busy = 0
    b.ur_dg_inflight -= 1
    if b.state != S_CLOSED:
        b.queued_bytes -= s.len
    if res < 0 and s.n > 1 and b.state == S_OPEN and b._gso_refused(-res, s.iov[0].iov_len):
        for k in range(s.n):
            s.mh.msg_iov = &s.iov[k]
            s.mh.msg_iovlen = 1
            s.mh.msg_control = NULL
            s.mh.msg_controllen = 0
            b._sent_one(sendmsg(b.fd, &s.mh, MSG_NOSIGNAL | MSG_DONTWAIT), s.iov[k].iov_len)
    elif res >= 0:
        loop.stat_datagrams_out += s.n
        loop.stat_bytes_out += s.len
        if s.n > 1:
            loop.stat_gso_sends += 1
    elif res != -ECANCELED:
        loop.stat_dgram_errors += s.n      # unreachable, refused, bad address...
    for k in range(s.n):
        Py_DECREF(<object>s.owners[k])
    if s.n > 1:
        PyMem_Free(s.iov)
    s.n = 0
    if b.state == S_OPEN:
        if b.tx_head != b.tx_tail:
            b._ur_send_dgram()
        elif b.ur_dg_inflight == 0:
            b._after_flush()
    Py_DECREF(b)                           # the request's reference


@cython.final
cdef class Listener(_Source):
    """A listening stream socket that accepts connections into Binds."""
    cdef readonly str backend
    cdef object factory
    cdef object shared
    cdef Framer framer
    cdef tuple limits
    cdef bint nodelay
    cdef bint active
    cdef readonly object address
    cdef size_t accepted
    cdef bint ur
    cdef bint ur_armed

    def close(self) -> None:
        """Stop accepting; connections already accepted stay open."""
        if self.active:
            self.active = False
            if self.ur_armed:
                evpl_uring_cancel(self.loop.ur, (<uint64_t><void*>self) | OP_ACCEPT, OP_CANCEL)
                shutdown(self.fd, SHUT_RDWR)
                evpl_uring_submit(self.loop.ur)
            self.loop._ep_del(self, False)
            c_close(self.fd)
            self.loop.sources.discard(self)

    @property
    def closed(self) -> bool:
        return not self.active

    def fileno(self) -> int:
        return self.fd

    def __repr__(self):
        return f"<evpl.Listener {self.backend} {self.address!r}>"

    cdef void _event(self, uint32_t events):
        cdef int fd
        cdef int budget = 64
        while budget > 0 and self.active:
            budget -= 1
            fd = accept4(self.fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)
            if fd < 0:
                if errno == EAGAIN or errno == EINTR:
                    return
                self.loop.stat_accept_errors += 1
                if errno == EMFILE or errno == ENFILE or errno == ENOBUFS or errno == ENOMEM:
                    # out of descriptors: back off instead of spinning on the backlog
                    self.loop._pause_listener(self)
                return
            self._accepted(fd)

    cdef void _accepted(self, int fd):
        cdef int one = 1
        cdef Bind b
        self.accepted += 1
        if self.nodelay:
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one))
        try:
            handler = self.shared if self.shared is not None else self.factory()
            b = self.loop._new_bind(fd, self.backend, True, handler, self.framer, self.limits,
                                    self.ur, False)
        except Exception as exc:
            c_close(fd)
            self.loop._callback_error(exc, None)
            return
        b._connected()
        if b.state == S_OPEN and not b.ur:
            # data may already be waiting: the ET registration will not report it
            b.rx_ready = True
            self.loop._queue_read(b)

    cdef int _ur_arm(self) except -1:
        if evpl_uring_accept_multishot(self.loop.ur, self.fd,
                                       (<uint64_t><void*>self) | OP_ACCEPT) < 0:
            raise OSError(EBUSY_, "io_uring submission queue full")
        Py_INCREF(self)
        self.ur_armed = True
        self.loop.ur_submit = True
        return 0

    cdef void _ur_accept(self, int res, uint32_t flags):
        if not flags & EVPL_CQE_F_MORE:
            self.ur_armed = False
        if res >= 0:
            if self.active:
                self._accepted(res)
            else:
                c_close(res)
        elif res != -ECANCELED:
            self.loop.stat_accept_errors += 1
        if self.active and not self.ur_armed:
            if res == -EMFILE or res == -ENFILE or res == -ENOBUFS_ or res == -ENOMEM:
                self.loop.call_later(0.1, self.loop._rearm_listener, self)
            else:
                self._ur_arm()


@cython.no_gc_clear
cdef class LoopCore:
    """The native event loop. ``evpl.Loop`` adds the Python conveniences.

    Not cleared by the garbage collector (no_gc_clear): its Binds (no_gc_clear
    too) and its own __dealloc__ use ``pool`` and its C state until the very
    end; cycles through a loop are broken at its lists, sets and handlers.
    """
    cdef int epfd
    cdef int wakefd
    cdef int wake_pending
    cdef int n_epoll            # Binds, Listeners and FdWatches in the epoll set
    cdef bint ur_evfd_off       # the ring's eventfd is off while the loop polls
    cdef readonly bint sqpoll   # the ring (made on first use) gets an SQPOLL thread
    cdef int sqpoll_cpu
    cdef int stop_flag
    cdef readonly Pool pool
    cdef Chunk* rx_chunk
    cdef size_t rx_used
    cdef size_t min_space
    cdef size_t asm_threshold
    cdef epoll_event* events
    cdef iovec* iov
    cdef mmsghdr* mmsg
    cdef sockaddr_in6* names
    cdef int64_t spin_ns
    cdef bint poll_always
    cdef int64_t last_active
    cdef bint running
    cdef bint closed
    cdef list dirty
    cdef list pending_read
    cdef list starved
    cdef size_t starved_mark
    cdef list closing
    cdef list deferred
    cdef list timers
    cdef size_t timer_seq
    cdef size_t timers_cancelled
    cdef list doorbells
    cdef set sources
    cdef object base_on_sent
    cdef public object exception_handler
    # counters
    cdef size_t stat_iterations, stat_sleeps, stat_events, stat_bytes_in, stat_bytes_out
    cdef size_t stat_messages_in, stat_datagrams_in, stat_datagrams_out, stat_dgram_errors
    cdef size_t stat_truncated, stat_partial_copies, stat_callback_errors, stat_paused
    cdef size_t stat_accept_errors, stat_starved, stat_timers_fired, stat_zc_sends
    cdef size_t stat_cqes, stat_gso_sends, stat_gso_refused, stat_gro_receives
    cdef uint64_t dg_ctl[MAX_MMSG * 3]        # UDP_SEGMENT control messages
    cdef unsigned int dg_group[MAX_MMSG]      # datagrams in each sendmmsg message
    cdef uint64_t dg_rctl[MAX_MMSG * 3]       # recvmmsg control space (UDP_GRO)
    # io_uring (created on first use)
    cdef evpl_uring* ur
    cdef int ur_evfd
    cdef Chunk** ur_bufs
    cdef size_t* ur_off
    cdef unsigned short* ur_free
    cdef int ur_nfree
    cdef evpl_cqe* cqes
    cdef bint ur_submit
    cdef list ur_rearm
    cdef size_t ur_adds         # refills of the provided buffer rings so far
    cdef size_t ur_mark
    cdef public size_t zc_threshold
    # datagram slot ring (bgid 1), created with the first io_uring_udp Bind
    cdef Chunk** dg_bufs
    cdef int* dg_left
    cdef size_t dg_slot
    cdef int dg_per
    cdef int dg_nfree

    def __cinit__(self):
        self.epfd = -1
        self.wakefd = -1
        self.ur_evfd = -1

    def __init__(self, Pool pool, *, int64_t spin_ns=50_000, bint poll_always=False,
                 base_handler=None, bint sqpoll=False, int sqpoll_cpu=-1):
        cdef epoll_event ev
        self.pool = pool
        self.sqpoll = sqpoll
        self.sqpoll_cpu = sqpoll_cpu
        self.spin_ns = spin_ns
        self.poll_always = poll_always
        self.min_space = min(<size_t>65536, pool.buffer_size // 4)
        self.asm_threshold = pool.buffer_size // 4
        self.dirty = []
        self.pending_read = []
        self.starved = []
        self.closing = []
        self.deferred = []
        self.timers = []
        self.doorbells = []
        self.sources = set()
        self.ur_rearm = []
        self.zc_threshold = 0
        self.base_on_sent = base_handler.on_sent if base_handler is not None else None
        self.events = <epoll_event*>PyMem_Malloc(MAX_EVENTS * sizeof(epoll_event))
        self.iov = <iovec*>PyMem_Malloc(MAX_IOV * sizeof(iovec))
        self.mmsg = <mmsghdr*>PyMem_Malloc(MAX_MMSG * sizeof(mmsghdr))
        self.names = <sockaddr_in6*>PyMem_Malloc(MAX_MMSG * sizeof(sockaddr_in6))
        if not self.events or not self.iov or not self.mmsg or not self.names:
            raise MemoryError()
        memset(self.mmsg, 0, MAX_MMSG * sizeof(mmsghdr))
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            raise OSError(errno, "epoll_create1")
        self.wakefd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if self.wakefd < 0:
            raise OSError(errno, "eventfd")
        ev.events = EPOLLIN
        ev.data.ptr = NULL
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, self.wakefd, &ev) < 0:
            raise OSError(errno, "epoll_ctl(wake)")
        self.last_active = evpl_now_ns()

    def __dealloc__(self):
        if self.rx_chunk != NULL and self.pool is not None:
            chunk_unref(self.pool, self.rx_chunk)
            self.rx_chunk = NULL
        self._ur_teardown()
        if self.epfd >= 0:
            c_close(self.epfd)
        if self.wakefd >= 0:
            c_close(self.wakefd)
        PyMem_Free(self.events)
        PyMem_Free(self.iov)
        PyMem_Free(self.mmsg)
        PyMem_Free(self.names)

    # ---- configuration ---------------------------------------------------

    @property
    def io_uring_setup(self):
        """How this loop's ring was set up (``"defer_taskrun"``,
        ``"coop_taskrun"``, ``"plain"`` or ``"sqpoll"``); None before an
        io_uring backend first used it."""
        if self.ur == NULL:
            return None
        return evpl_uring_mode(self.ur).decode()

    @property
    def spin_ns(self) -> int:
        return self.spin_ns

    @spin_ns.setter
    def spin_ns(self, int64_t value):
        if value < 0:
            raise ValueError("spin_ns must be >= 0")
        self.spin_ns = value

    @property
    def poll_always(self) -> bool:
        return self.poll_always

    @poll_always.setter
    def poll_always(self, bint value):
        self.poll_always = value

    @property
    def running(self) -> bool:
        return self.running

    # ---- receive memory ------------------------------------------------------

    cdef int _ep_add(self, _Source src, int fd, uint32_t events) except -1:
        """Register a Bind, Listener or FdWatch in the epoll set, counted in
        n_epoll (the spin skips epoll_wait while nothing but io_uring and
        doorbells can have work)."""
        cdef epoll_event ev
        ev.events = events
        ev.data.ptr = <void*>src
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, fd, &ev) < 0:
            raise OSError(errno, f"epoll_ctl(ADD) of fd {fd}")
        src.in_epoll = True
        self.n_epoll += 1
        return 0

    cdef void _ep_del(self, _Source src, bint ctl) noexcept:
        """Forget ``src`` in the epoll set; ``ctl``: remove its fd too (not
        needed when the fd is about to be closed)."""
        if src.in_epoll:
            src.in_epoll = False
            self.n_epoll -= 1
            if ctl:
                epoll_ctl(self.epfd, EPOLL_CTL_DEL, src.fd, NULL)

    cdef int _rx_reserve(self, size_t space) noexcept:
        """Make sure the receive chunk has ``space`` free bytes."""
        cdef Chunk* c
        if self.rx_chunk != NULL and self.rx_chunk.size - self.rx_used >= space:
            return 0
        if space > self.pool.buffer_size:
            space = self.pool.buffer_size
            if self.rx_chunk != NULL and self.rx_chunk.size - self.rx_used >= space:
                return 0
        c = self.pool.get()
        if c == NULL:
            return -1
        if self.rx_chunk != NULL:
            chunk_unref(self.pool, self.rx_chunk)
        self.rx_chunk = c
        self.rx_used = 0
        return 0

    cdef void _starve(self, Bind b):
        self.stat_starved += 1
        if b not in self.starved:
            self.starved.append(b)

    cdef void _queue_read(self, Bind b):
        if not b.rx_queued:
            b.rx_queued = True
            self.pending_read.append(b)

    # ---- sources ----------------------------------------------------------

    cdef Bind _new_bind(self, int fd, str backend, bint stream, handler, Framer framer,
                        tuple limits, bint ur, bint connecting):
        cdef Bind b = Bind.__new__(Bind)
        b._setup(self, fd, backend, stream, handler, framer, limits[0], limits[1], limits[2],
                 limits[3])
        b.state = S_CONNECTING
        b.ur = ur
        if ur:
            self._ur_setup()
        if not ur or connecting:
            self._ep_add(b, fd, EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET)
        self.sources.add(b)
        return b

    def _add_stream(self, int fd, str backend, handler, Framer framer, tuple limits,
                    bint connecting, peer, int connect_errno=0, bint uring=False) -> Bind:
        """Adopt a connected or connecting stream socket (nonblocking)."""
        cdef Bind b = self._new_bind(fd, backend, True, handler, framer, limits, uring,
                                     connecting)
        b._peer = peer
        if connect_errno:
            b._close(transport_error(connect_errno, f"connect to {peer!r}"))
        elif not connecting:
            b._connected()
            if b.state == S_OPEN and not uring:
                b.rx_ready = True
                self._queue_read(b)
        return b

    def _add_datagram(self, int fd, str backend, handler, tuple limits,
                      bint uring=False, bint gso=False) -> Bind:
        """Adopt a bound datagram socket (nonblocking); ``gso``: send trains
        of datagrams to one peer with UDP GSO, accept them with UDP GRO (UDP
        sockets only)."""
        cdef Bind b
        cdef int one = 1
        if uring:
            self._ur_setup()
            self._ur_dg_setup()
        b = self._new_bind(fd, backend, False, handler, None, limits, uring, False)
        b.gso_limit = 65536 if gso else 0
        # accept trains (UDP GRO) when every receive slot holds a whole one
        if gso and (self.dg_slot - UR_DG_HDR >= 65535 - 8 if uring else b.stride >= 65536):
            b.gro = setsockopt(fd, IPPROTO_UDP, UDP_GRO, &one, sizeof(one)) == 0
        b.state = S_OPEN
        if uring:
            b._ur_arm_recv()
        else:
            b.rx_ready = True
            self._queue_read(b)
        return b

    def _add_listener(self, int fd, str backend, factory, shared, Framer framer,
                      tuple limits, bint nodelay, address, bint uring=False) -> Listener:
        cdef Listener li = Listener.__new__(Listener)
        li.kind = K_LISTENER
        li.loop = self
        li.fd = fd
        li.backend = backend
        li.factory = factory
        li.shared = shared
        li.framer = framer
        li.limits = limits
        li.nodelay = nodelay
        li.address = address
        li.active = True
        li.ur = uring
        if uring:
            self._ur_setup()
            li._ur_arm()
        else:
            self._ep_add(li, fd, EPOLLIN)
        self.sources.add(li)
        return li

    def _rearm_listener(self, Listener li):
        if li.active and not li.ur_armed:
            li._ur_arm()

    # ---- io_uring ----------------------------------------------------------

    cdef int _ur_setup(self) except -1:
        """Create this loop's ring, its eventfd and its provided buffer ring."""
        cdef int err = 0, i
        cdef epoll_event ev
        if self.ur != NULL:
            return 0
        self.ur = evpl_uring_new(UR_ENTRIES, self.sqpoll, self.sqpoll_cpu, SQPOLL_IDLE_MS, &err)
        if self.ur == NULL:
            from evpl.errors import BackendUnavailable
            what = "io_uring_setup with SQPOLL" if self.sqpoll else "io_uring_setup"
            raise BackendUnavailable(f"{what} failed: {OSError(err, '').strerror}")
        self.ur_bufs = <Chunk**>PyMem_Malloc(UR_BUFS * sizeof(Chunk*))
        self.ur_off = <size_t*>PyMem_Malloc(UR_BUFS * sizeof(size_t))
        self.ur_free = <unsigned short*>PyMem_Malloc(UR_BUFS * sizeof(unsigned short))
        self.cqes = <evpl_cqe*>PyMem_Malloc(UR_CQES * sizeof(evpl_cqe))
        if not self.ur_bufs or not self.ur_off or not self.ur_free or not self.cqes:
            self._ur_teardown()
            raise MemoryError()
        for i in range(UR_BUFS):
            self.ur_bufs[i] = NULL
            self.ur_free[i] = i
        self.ur_nfree = UR_BUFS
        err = evpl_uring_setup_bufring(self.ur, UR_BUFS, 0, 1)
        if err < 0:
            self._ur_teardown()
            raise OSError(-err, "io_uring provided buffer ring")
        self.ur_evfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if self.ur_evfd < 0 or evpl_uring_register_eventfd(self.ur, self.ur_evfd) < 0:
            self._ur_teardown()
            raise OSError(errno, "io_uring eventfd")
        ev.events = EPOLLIN
        ev.data.ptr = <void*>1
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, self.ur_evfd, &ev) < 0:
            self._ur_teardown()
            raise OSError(errno, "epoll_ctl(io_uring eventfd)")
        self._ur_refill()
        if self.sqpoll:
            self._ur_dg_setup()         # stream receives use the slot ring too
        return 0

    cdef int _ur_dg_setup(self) except -1:
        """The datagram slot ring: pool buffers cut into fixed slots, one
        datagram each (a plain, non-incremental provided buffer ring)."""
        cdef int err, i
        if self.dg_bufs != NULL:
            return 0
        self.dg_slot = min(<size_t>UR_DG_SLOT, self.pool.buffer_size)
        self.dg_per = <int>min(<size_t>UR_DG_PER, self.pool.buffer_size // self.dg_slot)
        self.dg_bufs = <Chunk**>PyMem_Malloc(UR_DG_CHUNKS * sizeof(Chunk*))
        self.dg_left = <int*>PyMem_Malloc(UR_DG_CHUNKS * sizeof(int))
        if not self.dg_bufs or not self.dg_left:
            PyMem_Free(self.dg_bufs)
            PyMem_Free(self.dg_left)
            self.dg_bufs = NULL
            self.dg_left = NULL
            raise MemoryError()
        for i in range(UR_DG_CHUNKS):
            self.dg_bufs[i] = NULL
            self.dg_left[i] = 0
        self.dg_nfree = UR_DG_CHUNKS
        err = evpl_uring_setup_bufring(self.ur, UR_DG_CHUNKS * UR_DG_PER, 1, 0)
        if err < 0:
            PyMem_Free(self.dg_bufs)
            PyMem_Free(self.dg_left)
            self.dg_bufs = NULL
            self.dg_left = NULL
            raise OSError(-err, "io_uring datagram buffer ring")
        self._ur_dg_refill()
        return 0

    cdef Chunk* _ur_slot(self, unsigned bid, char** p) noexcept:
        """The pool buffer of slot ``bid`` of the slot ring, which a
        completion filled, held for the caller (who unrefs it); the slot's
        address goes to ``p``."""
        cdef unsigned ci = bid // UR_DG_PER
        cdef Chunk* c = self.dg_bufs[ci]
        p[0] = c.data + (bid % UR_DG_PER) * self.dg_slot
        c.refs += 1
        self._ur_dg_slot_done(ci)
        return c

    cdef void _ur_dg_slot_done(self, unsigned ci):
        """The kernel used one more slot of pool buffer ``ci``."""
        self.dg_left[ci] -= 1
        if self.dg_left[ci] == 0:
            chunk_unref(self.pool, self.dg_bufs[ci])
            self.dg_bufs[ci] = NULL
            self.dg_nfree += 1

    cdef int _ur_dg_refill(self):
        """Carve fresh pool buffers into slots for every buffer used up."""
        cdef Chunk* c
        cdef int ci, k, added = 0
        cdef int limit
        if self.dg_bufs == NULL:
            return 0
        limit = <int>min(<size_t>UR_DG_CHUNKS,
                         max(<size_t>1, self.pool.max_bytes // self.pool.buffer_size // 4))
        for ci in range(UR_DG_CHUNKS):
            if self.dg_bufs[ci] != NULL:
                continue
            if UR_DG_CHUNKS - self.dg_nfree >= limit:
                break
            c = self.pool.get()
            if c == NULL:
                break
            self.dg_bufs[ci] = c
            self.dg_left[ci] = self.dg_per
            self.dg_nfree -= 1
            for k in range(self.dg_per):
                evpl_uring_buf_add(self.ur, 1, c.data + k * self.dg_slot, <unsigned>self.dg_slot,
                                   <unsigned short>(ci * UR_DG_PER + k))
            added += 1
        if added:
            evpl_uring_buf_commit(self.ur, 1)
        return added

    cdef void _ur_teardown(self):
        cdef int i
        if self.ur != NULL:
            evpl_uring_free(self.ur)
            self.ur = NULL
        if self.dg_bufs != NULL:
            for i in range(UR_DG_CHUNKS):
                if self.dg_bufs[i] != NULL and self.pool is not None:
                    chunk_unref(self.pool, self.dg_bufs[i])
            PyMem_Free(self.dg_bufs)
            self.dg_bufs = NULL
            PyMem_Free(self.dg_left)
            self.dg_left = NULL
        if self.ur_bufs != NULL:
            for i in range(UR_BUFS):
                if self.ur_bufs[i] != NULL and self.pool is not None:
                    chunk_unref(self.pool, self.ur_bufs[i])
            PyMem_Free(self.ur_bufs)
            self.ur_bufs = NULL
        PyMem_Free(self.ur_off)
        self.ur_off = NULL
        PyMem_Free(self.ur_free)
        self.ur_free = NULL
        PyMem_Free(self.cqes)
        self.cqes = NULL
        if self.ur_evfd >= 0:
            c_close(self.ur_evfd)
            self.ur_evfd = -1

    cdef void _ur_buf_done(self, unsigned bid):
        """The kernel finished with buffer ``bid``: drop the ring's hold."""
        cdef Chunk* c = self.ur_bufs[bid]
        self.ur_bufs[bid] = NULL
        self.ur_free[self.ur_nfree] = bid
        self.ur_nfree += 1
        chunk_unref(self.pool, c)

    cdef void _ur_refill(self):
        """Give the kernel fresh pool buffers for every slot it used up."""
        cdef Chunk* c
        cdef unsigned short bid
        cdef int added = 0
        cdef Bind b
        # the ring may hold at most half the pool, so that joining a message
        # split across two ring buffers always finds memory
        cdef int limit = <int>min(<size_t>UR_BUFS,
                                  max(<size_t>1, self.pool.max_bytes // self.pool.buffer_size // 2))
        # (with SQPOLL nothing reads from this ring: see _ur_recv)
        while not self.sqpoll and self.ur_nfree > 0 and UR_BUFS - self.ur_nfree < limit:
            c = self.pool.get()
            if c == NULL:
                break
            self.ur_nfree -= 1
            bid = self.ur_free[self.ur_nfree]
            self.ur_bufs[bid] = c
            self.ur_off[bid] = 0
            evpl_uring_buf_add(self.ur, 0, c.data, <unsigned>c.size, bid)
            added += 1
        if added:
            evpl_uring_buf_commit(self.ur, 0)
        if self.dg_nfree:
            added += self._ur_dg_refill()
        if added:
            self.ur_adds += 1
            if self.ur_rearm:
                batch = self.ur_rearm
                self.ur_rearm = []
                for b in batch:
                    if b.state == S_OPEN and not b.reading_paused:
                        b._ur_arm_recv()

    cdef int _ur_process(self) except -1:
        """Reap and dispatch every completion that is ready."""
        cdef int n, i, total = 0
        cdef uint64_t ud
        cdef uint32_t flags
        cdef int op, res
        cdef Bind b
        cdef Listener li
        while True:
            n = evpl_uring_reap(self.ur, self.cqes, UR_CQES)
            for i in range(n):
                ud = self.cqes[i].user_data
                res = self.cqes[i].res
                flags = self.cqes[i].flags
                op = ud & 7
                if op == OP_RECV:
                    b = <Bind><PyObject*><void*>(ud & ~(<uint64_t>7))
                    b._ur_recv(res, flags)
                    if not flags & EVPL_CQE_F_MORE:
                        Py_DECREF(b)
                elif op == OP_SEND:
                    b = <Bind><PyObject*><void*>(ud & ~(<uint64_t>7))
                    b._ur_sent(res, flags)
                    if not flags & EVPL_CQE_F_MORE:
                        Py_DECREF(b)
                elif op == OP_DGSEND:
                    _ur_dg_done(self, <UrDgSend*><void*>(ud & ~(<uint64_t>7)), res)
                elif op == OP_ACCEPT:
                    li = <Listener><PyObject*><void*>(ud & ~(<uint64_t>7))
                    li._ur_accept(res, flags)
                    if not flags & EVPL_CQE_F_MORE:
                        Py_DECREF(li)
            b = None
            li = None
            total += n
            if n < UR_CQES:
                break
        self.stat_cqes += total
        if self.ur_nfree or self.dg_nfree:
            self._ur_refill()
        return total

    cdef int _ur_before_sleep(self) except -1:
        """Turn the ring's eventfd back on before the loop sleeps; true if
        completions arrived while it was off (then the loop must not sleep:
        their eventfd signal was never sent)."""
        if self.ur == NULL or not self.ur_evfd_off:
            return 0
        evpl_uring_evfd_enable(self.ur, 1)
        self.ur_evfd_off = False
        if evpl_uring_cq_ready(self.ur):
            self._ur_process()
            self.last_active = evpl_now_ns()
            return 1
        return 0

    cdef int _ur_poll(self) except -1:
        cdef uint64_t v
        c_read(self.ur_evfd, &v, 8)
        evpl_uring_submit(self.ur)
        self.ur_submit = False
        return self._ur_process()

    cdef void _pause_listener(self, Listener li):
        cdef epoll_event ev
        ev.events = 0
        ev.data.ptr = <void*>li
        epoll_ctl(self.epfd, EPOLL_CTL_MOD, li.fd, &ev)
        self.call_later(0.1, self._resume_listener, li)

    def _resume_listener(self, Listener li):
        cdef epoll_event ev
        if li.active:
            ev.events = EPOLLIN
            ev.data.ptr = <void*>li
            epoll_ctl(self.epfd, EPOLL_CTL_MOD, li.fd, &ev)

    def watch_fd(self, int fd, on_readable=None, on_writable=None) -> FdWatch:
        """Call ``on_readable()`` / ``on_writable()`` (level-triggered) while
        the foreign descriptor ``fd`` is ready. The fd stays the caller's."""
        cdef FdWatch w = FdWatch.__new__(FdWatch)
        w.kind = K_WATCH
        w.loop = self
        w.fd = fd
        w.on_readable = on_readable
        w.on_writable = on_writable
        self._ep_add(w, fd, (EPOLLIN if on_readable is not None else 0) |
                     (EPOLLOUT if on_writable is not None else 0))
        w.active = True
        self.sources.add(w)
        return w

    # ---- timers, deferrals, doorbells -------------------------------------

    def now_ns(self) -> int:
        """Monotonic clock in nanoseconds (the timers' clock)."""
        return evpl_now_ns()

    def now(self) -> float:
        """Monotonic clock in seconds (the timers' clock)."""
        return evpl_now_ns() / 1e9

    cdef Timer _timer(self, int64_t delay_ns, int64_t period_ns, fn, tuple args):
        cdef Timer t = Timer.__new__(Timer)
        if not callable(fn):
            raise TypeError("timer callback must be callable")
        t.loop = self
        t.deadline = evpl_now_ns() + delay_ns
        t.period = period_ns
        t.fn = fn
        t.args = args
        self.timer_seq += 1
        heapq.heappush(self.timers, (t.deadline, self.timer_seq, t))
        return t

    def call_later(self, double delay, fn, *args) -> Timer:
        """Run ``fn(*args)`` once, ``delay`` seconds from now (never early)."""
        if delay < 0:
            delay = 0
        return self._timer(<int64_t>(delay * 1e9), 0, fn, args)

    def call_every(self, double period, fn, *args) -> Timer:
        """Run ``fn(*args)`` every ``period`` seconds, without drift."""
        if period <= 0:
            raise ValueError("period must be > 0")
        return self._timer(<int64_t>(period * 1e9), <int64_t>(period * 1e9), fn, args)

    def defer(self, fn, *args) -> None:
        """Run ``fn(*args)`` once, at the end of the current iteration."""
        self.deferred.append((fn, args))

    def doorbell(self, fn) -> Doorbell:
        """A Doorbell whose ``ring()`` (from any thread) runs ``fn()`` here."""
        cdef Doorbell d = Doorbell.__new__(Doorbell)
        d.loop = self
        d.fn = fn
        self.doorbells.append(d)
        return d

    cdef void _wake(self) noexcept:
        cdef uint64_t one = 1
        if evpl_xchg(&self.wake_pending, 1) == 0:
            c_write(self.wakefd, &one, 8)

    def stop(self) -> None:
        """Make ``run()`` return after the current iteration (any thread)."""
        evpl_store(&self.stop_flag, 1)
        self._wake()

    def _callback_error(self, exc, bind):
        """A user callback raised: report it and close the Bind it came from."""
        self.stat_callback_errors += 1
        handler = self.exception_handler
        if handler is not None:
            try:
                handler(self, exc, bind)
            except Exception:
                _log.exception("evpl exception_handler raised")
        else:
            _log.error("unhandled exception in an evpl callback (bind %r)", bind, exc_info=exc)
        if bind is not None and not bind.closed:
            (<Bind>bind)._close(exc if isinstance(exc, EvplError) else
                                EvplError(f"callback raised {exc!r}"))

    # ---- the iteration ----------------------------------------------------

    cdef int64_t _wait_budget(self, int64_t max_wait) except? -2:
        cdef int64_t wait = max_wait, t
        cdef Timer timer
        if (self.deferred or self.pending_read or self.closing or self.dirty
                or evpl_load(&self.stop_flag)):
            return 0
        while self.timers:
            timer = self.timers[0][2]
            if timer.cancelled:
                heapq.heappop(self.timers)
                self.timers_cancelled -= 1
                continue
            t = timer.deadline - evpl_now_ns()
            if t < 0:
                t = 0
            if wait < 0 or t < wait:
                wait = t
            break
        if (self.starved or self.ur_rearm) and (wait < 0 or wait > 1_000_000):
            wait = 1_000_000
        return wait

    cdef int _iterate(self, int64_t max_wait) except -1:
        cdef int64_t wait, now, spin_end
        cdef int n, i
        cdef bint poll
        cdef bint ur_hit = False
        cdef evpl_uring* ur = self.ur
        cdef _Source src
        if self.ur_submit and self.ur != NULL:
            # io_uring work queued outside an iteration (listen, connect...)
            self.ur_submit = False
            evpl_uring_submit(self.ur)
        wait = self._wait_budget(max_wait)
        now = evpl_now_ns()
        poll = self.poll_always or (self.spin_ns > 0 and now - self.last_active < self.spin_ns)
        if wait != 0 and poll:
            # hybrid: spin without the GIL, then sleep for what is left
            if self.poll_always:
                spin_end = now + 20_000_000
            else:
                spin_end = self.last_active + self.spin_ns
            if wait > 0 and now + wait < spin_end:
                spin_end = now + wait
            if ur != NULL and not self.ur_evfd_off and not self.sqpoll:
                # the spin reaps the CQ itself: no eventfd signal per completion.
                # Not with SQPOLL: its thread posts completions concurrently,
                # and re-enabling before a sleep could race with it.
                evpl_uring_evfd_enable(ur, 0)
                self.ur_evfd_off = True
            n = 0
            with nogil:
                while True:
                    # io_uring completions, without the eventfd round trip
                    if ur != NULL and evpl_uring_cq_ready(ur):
                        ur_hit = True
                        break
                    # epoll only when something can be there: an epoll
                    # source, or a doorbell / stop() (the wake flag says)
                    if ur == NULL or self.n_epoll > 0 or evpl_load(&self.wake_pending):
                        n = evpl_epoll_wait_ns(self.epfd, self.events, MAX_EVENTS, 0)
                        if n != 0:
                            break
                    now = evpl_now_ns()
                    if now >= spin_end:
                        break
            if ur_hit:
                self.last_active = evpl_now_ns()
                self._ur_process()
            elif n == 0 and not self.poll_always:
                wait = self._wait_budget(max_wait)
                if wait != 0 and not self._ur_before_sleep():
                    self.stat_sleeps += 1
                    with nogil:
                        n = evpl_epoll_wait_ns(self.epfd, self.events, MAX_EVENTS, wait)
        else:
            if wait != 0 and self._ur_before_sleep():
                wait = 0
            if wait != 0:
                self.stat_sleeps += 1
            with nogil:
                n = evpl_epoll_wait_ns(self.epfd, self.events, MAX_EVENTS, wait)
        if n < 0:
            if errno != EINTR:
                raise OSError(errno, "epoll_wait")
            n = 0
        if n == 0:
            PyErr_CheckSignals()
        self.stat_iterations += 1
        if n > 0:
            self.last_active = evpl_now_ns()
            self.stat_events += n
        for i in range(n):
            if self.events[i].data.ptr == NULL:
                self._ring_doorbells()
                continue
            if self.events[i].data.ptr == <void*>1:
                self._ur_poll()
                continue
            src = <_Source>self.events[i].data.ptr
            if src.kind == K_BIND:
                (<Bind>src)._event(self.events[i].events)
            elif src.kind == K_LISTENER:
                (<Listener>src)._event(self.events[i].events)
            else:
                (<FdWatch>src)._event(self.events[i].events)
        self._after_events()
        return 0

    cdef void _after_events(self) except *:
        cdef Bind b
        cdef list batch
        cdef int rounds = 0
        if self.pending_read:
            batch = self.pending_read
            self.pending_read = []
            for b in batch:
                b.rx_queued = False
                if b.state == S_OPEN and b.rx_ready and not b.reading_paused:
                    b._read()
        if (self.ur_rearm and (self.ur_nfree or self.dg_nfree)
                and self.pool.releases != self.ur_mark):
            self.ur_mark = self.pool.releases
            self._ur_refill()          # buffers came back: the ring can take them
        if self.starved and self.pool.releases != self.starved_mark:
            self.starved_mark = self.pool.releases
            batch = self.starved
            self.starved = []
            for b in batch:
                if b.state == S_OPEN and not b.reading_paused:
                    b._read()
        if self.timers:
            self._run_timers()
        while rounds < 8 and (self.deferred or self.closing or self.dirty):
            rounds += 1
            if self.deferred:
                self._run_deferred()
            if self.dirty:
                batch = self.dirty
                self.dirty = []
                for b in batch:
                    b.dirty = False
                    b._flush()
            if self.closing:
                self._run_closing()
        if self.ur_submit and self.ur != NULL:
            # sends and re-arms of this iteration go to the kernel in one call
            self.ur_submit = False
            evpl_uring_submit(self.ur)
        if self.dirty or self.closing or self.deferred:
            # callbacks keep producing work: finish it next iteration
            self.last_active = evpl_now_ns()

    cdef void _run_timers(self) except *:
        cdef int64_t now = evpl_now_ns()
        cdef Timer t
        cdef int fired = 0
        while self.timers and fired < 1024:
            t = self.timers[0][2]
            if t.cancelled:
                heapq.heappop(self.timers)
                self.timers_cancelled -= 1
                continue
            if t.deadline > now:
                break
            heapq.heappop(self.timers)
            fired += 1
            self.stat_timers_fired += 1
            t.fired = True
            if t.period:
                t.deadline += t.period
                if t.deadline <= now:        # fell behind: skip missed periods
                    t.deadline = now + t.period - (now - t.deadline) % t.period
                self.timer_seq += 1
                heapq.heappush(self.timers, (t.deadline, self.timer_seq, t))
            try:
                t.fn(*t.args)
            except Exception as exc:
                self._callback_error(exc, None)
        if self.timers_cancelled > 64 and <Py_ssize_t>(self.timers_cancelled * 2) > len(self.timers):
            self.timers = [e for e in self.timers if not (<Timer>e[2]).cancelled]
            heapq.heapify(self.timers)
            self.timers_cancelled = 0

    cdef void _run_deferred(self) except *:
        cdef list batch = self.deferred
        self.deferred = []
        for item in batch:
            try:
                if type(item) is Deferral:
                    (<Deferral>item).armed = False
                    (<Deferral>item).fn()
                else:
                    item[0](*item[1])
            except Exception as exc:
                self._callback_error(exc, None)

    cdef void _run_closing(self) except *:
        cdef list batch = self.closing
        cdef Bind b
        self.closing = []
        for b in batch:
            self.sources.discard(b)
            try:
                b.cb_closed(b, b.close_error)
            except Exception as exc:
                self._callback_error(exc, None)

    cdef void _ring_doorbells(self) except *:
        cdef uint64_t v
        cdef Doorbell d
        c_read(self.wakefd, &v, 8)
        evpl_store(&self.wake_pending, 0)
        for d in list(self.doorbells):
            if evpl_xchg(&d.flag, 0):
                try:
                    d.fn()
                except Exception as exc:
                    self._callback_error(exc, None)

    # ---- running ----------------------------------------------------------

    def run(self) -> None:
        """Run iterations until ``stop()``."""
        if self.running:
            raise EvplError("the loop is already running")
        self.running = True
        evpl_store(&self.stop_flag, 0)
        try:
            while not evpl_load(&self.stop_flag):
                self._iterate(-1)
        finally:
            self.running = False
            evpl_store(&self.stop_flag, 0)

    def run_once(self, timeout=None) -> None:
        """Run one iteration, waiting at most ``timeout`` seconds for events
        (None: until something happens)."""
        if self.running:
            raise EvplError("the loop is already running")
        self.running = True
        try:
            self._iterate(-1 if timeout is None else <int64_t>(max(timeout, 0) * 1e9))
        finally:
            self.running = False

    def run_until(self, predicate, timeout=None) -> None:
        """Run iterations until ``predicate()`` is true. Raises
        ``evpl.errors.TimeoutError`` after ``timeout`` seconds."""
        cdef int64_t deadline = -1, left
        if self.running:
            raise EvplError("the loop is already running")
        if timeout is not None:
            deadline = evpl_now_ns() + <int64_t>(timeout * 1e9)
        self.running = True
        evpl_store(&self.stop_flag, 0)
        try:
            while not predicate():
                if evpl_load(&self.stop_flag):
                    return
                left = -1
                if deadline >= 0:
                    left = deadline - evpl_now_ns()
                    if left <= 0:
                        from evpl.errors import TimeoutError as _Timeout
                        raise _Timeout(110, f"condition not reached within {timeout} s")
                self._iterate(left)
        finally:
            self.running = False
            evpl_store(&self.stop_flag, 0)

    def close(self) -> None:
        """Close every Bind, Listener and watch of this loop and deliver the
        ``on_closed`` callbacks."""
        cdef bint timed_out
        for src in list(self.sources):
            if isinstance(src, Bind):
                (<Bind>src)._close(None)
            elif isinstance(src, Listener):
                src.close()
            else:
                src.cancel()
        for d in list(self.doorbells):
            d.close()
        for t in self.timers:
            (<Timer>t[2]).cancelled = True
        self.timers = []
        self.timers_cancelled = 0
        self._run_closing()
        self.deferred = []
        self.pending_read = []
        self.starved = []
        self.ur_rearm = []
        if self.ur != NULL:
            # let cancellations and in-flight sends complete, so every Bind
            # and buffer they hold is released, then drop the ring
            for _ in range(100):            # at most ~1 s
                timed_out = evpl_uring_wait(self.ur, 10_000_000) < 0
                if self._ur_process() == 0 and timed_out:
                    break                      # nothing completed for 10 ms
            self._ur_teardown()
        if self.rx_chunk != NULL:
            chunk_unref(self.pool, self.rx_chunk)
            self.rx_chunk = NULL

    def stats(self) -> dict:
        """Loop counters (iterations, sleeps, bytes, messages, errors...)."""
        return {
            "iterations": self.stat_iterations,
            "sleeps": self.stat_sleeps,
            "events": self.stat_events,
            "bytes_in": self.stat_bytes_in,
            "bytes_out": self.stat_bytes_out,
            "messages_in": self.stat_messages_in,
            "datagrams_in": self.stat_datagrams_in,
            "datagrams_out": self.stat_datagrams_out,
            "datagram_errors": self.stat_dgram_errors,
            "truncated": self.stat_truncated,
            "partial_copies": self.stat_partial_copies,
            "callback_errors": self.stat_callback_errors,
            "paused": self.stat_paused,
            "accept_errors": self.stat_accept_errors,
            "starved": self.stat_starved,
            "timers_fired": self.stat_timers_fired,
            "zc_sends": self.stat_zc_sends,
            "gso_sends": self.stat_gso_sends,
            "gso_refused": self.stat_gso_refused,
            "gro_receives": self.stat_gro_receives,
            "completions": self.stat_cqes,
            "ring_buffers": (UR_BUFS - self.ur_nfree) if self.ur != NULL else 0,
            "ring_rearm": len(self.ur_rearm),
            "starved_binds": len(self.starved),
            "sources": len(self.sources),
        }
