# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The io_uring backends: ``io_uring_tcp``, ``io_uring_unix`` (streams) and
``io_uring_udp`` (datagrams).

``UringDriver`` is the loop's io_uring Driver: one ring per loop
(SINGLE_ISSUER | DEFER_TASKRUN where the kernel has it, optionally SQPOLL),
made on first use, with two provided-buffer rings filled from the pool:
group 0, incremental (the kernel packs stream receives one after another in
2 MiB pool buffers), and group 1, fixed slots (one datagram, or with SQPOLL
one stream receive, per slot). Its eventfd sits in the loop's epoll set; while
the loop spins it reads the completion queue directly with the eventfd off.
Requests queued during an iteration go to the kernel in one submit at its end.

Stream Binds keep one multishot receive armed and one sendmsg of the whole
queue (up to 1024 pieces) in flight; datagram Binds a multishot recvmsg and
up to 64 sendmsg requests (one per datagram or GSO train), each owning its
msghdr and data. Received bytes go to the shared reassembler
(``Bind._take``) where the kernel put them.
"""

cimport cython
from cpython.ref cimport PyObject, Py_INCREF, Py_DECREF
from cpython.mem cimport PyMem_Malloc, PyMem_Free
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from libc.errno cimport errno, EBUSY, EMFILE, ENFILE, ENOBUFS, ENOMEM, EOPNOTSUPP
from libc.stdint cimport int64_t, uint64_t, uint32_t, uint16_t
from libc.string cimport memcpy, memset, strcmp
from posix.unistd cimport close as c_close, read as c_read
from posix.uio cimport iovec

from evpl._native.bind cimport Bind, Listener, Limits, S_CONNECTING, S_OPEN, S_CLOSED
from evpl._native.buffers cimport Pool, Chunk, chunk_unref
from evpl._native.framing cimport Framer
from evpl._native.loop cimport LoopCore, Driver, MAX_IOV
from evpl._native.sys cimport *
from evpl._native.txqueue cimport *

import os

from evpl.errors import BackendUnavailable, transport_error

cdef extern from "evpl_uring.h" nogil:
    ctypedef struct evpl_uring:
        pass
    ctypedef struct evpl_cqe:
        uint64_t user_data
        int res
        uint32_t flags
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
    int evpl_uring_cq_ready(evpl_uring* u)
    int evpl_uring_reap(evpl_uring* u, evpl_cqe* out, int max)
    const char* evpl_uring_mode(evpl_uring* u)
    int evpl_uring_wait(evpl_uring* u, long long timeout_ns)
    const char* evpl_uring_probe()
    uint32_t EVPL_CQE_F_BUF_MORE, EVPL_CQE_F_MORE, EVPL_CQE_F_BUFFER, EVPL_CQE_F_NOTIF

cdef extern from "<errno.h>":
    int ECANCELED

cdef enum:
    UR_ENTRIES = 1024
    UR_BUFS = 16            # pool buffers in the incremental stream ring (bgid 0)
    UR_CQES = 256
    UR_DG_CHUNKS = 8        # pool buffers carved into slots (bgid 1)
    UR_DG_PER = 64          # at most this many slots per pool buffer
    UR_DG_SLOT = 65600      # recvmsg_out (16) + sockaddr_in6 (28) + 65507, rounded
    UR_DG_CTL = 44          # sizeof(io_uring_recvmsg_out) + sizeof(sockaddr_in6)
    UR_DG_HDR = 68          # ... + EVPL_GRO_CTL bytes of control: the payload starts here
    UR_DG_INFLIGHT = 64     # sendmsg requests in flight per datagram Bind
    SQPOLL_IDLE_MS = 20     # an SQPOLL thread sleeps after this long without work

# io_uring operations, in the low bits of user_data (objects are 16-aligned)
cdef enum:
    OP_RECV = 1
    OP_SEND = 2
    OP_ACCEPT = 3
    OP_CANCEL = 4
    OP_DGSEND = 5       # user_data = UrDgSend* | OP_DGSEND


cdef struct UrDgSend:
    msghdr mh
    iovec* iov          # n * per entries: iov1 for one datagram, else a heap block
    PyObject** owners   # n data owners (owner1, or in the heap block after iov)
    iovec iov1[2]
    PyObject* owner1
    unsigned char hdr1[TX_HDR]
    int n
    int per             # iovecs per datagram: 2 when they have header pieces
    PyObject* bind
    size_t len
    sockaddr_in6 sa
    uint64_t ctl[3]     # the UDP_SEGMENT control message (EVPL_GSO_CTL bytes)
    int busy


def uring_unavailable_reason():
    """None if io_uring networking works here, else why not."""
    cdef const char* why = evpl_uring_probe()
    return None if why == NULL else why.decode()


cdef int _cq_ready(void* ctx) noexcept nogil:
    return evpl_uring_cq_ready(<evpl_uring*>ctx)


@cython.final
@cython.no_gc_clear
cdef class UringDriver(Driver):
    """One loop's ring, its eventfd and its provided-buffer rings."""
    cdef evpl_uring* ur
    cdef Pool pool
    cdef bint sqpoll
    cdef int evfd
    cdef bint evfd_off          # the eventfd is off while the loop polls
    cdef Chunk** bufs           # incremental ring (bgid 0): pool buffer per bid
    cdef size_t* off            # bytes the kernel used of each
    cdef unsigned short* free_bids
    cdef int nfree
    cdef evpl_cqe* cqes
    cdef bint submit_pending
    cdef list rearm             # receives that ended for lack of buffers
    cdef size_t adds            # refills of the rings so far
    cdef size_t mark            # pool.releases at the last refill attempt
    cdef size_t trim_adds       # adds when the ring's unwritten tails were last dropped
    cdef size_t stat_cqes
    # slot ring (bgid 1), made with the first datagram Bind (or SQPOLL)
    cdef Chunk** dg_bufs
    cdef int* dg_left
    cdef size_t dg_slot
    cdef int dg_per
    cdef int dg_nfree

    def __cinit__(self):
        self.evfd = -1

    def __dealloc__(self):
        self._teardown()

    @property
    def setup_mode(self):
        return None if self.ur == NULL else evpl_uring_mode(self.ur).decode()

    cdef int _setup(self, LoopCore loop) except -1:
        """Create the ring, its eventfd and the incremental buffer ring."""
        cdef int err = 0, i
        cdef epoll_event ev
        self.loop = loop
        self.pool = loop.pool
        self.sqpoll = loop.sqpoll
        self.name = "io_uring"
        self.rearm = []
        self.ur = evpl_uring_new(UR_ENTRIES, loop.sqpoll, loop.sqpoll_cpu, SQPOLL_IDLE_MS, &err)
        if self.ur == NULL:
            what = "io_uring_setup with SQPOLL" if loop.sqpoll else "io_uring_setup"
            raise BackendUnavailable(f"{what} failed: {os.strerror(err)}")
        self.bufs = <Chunk**>PyMem_Malloc(UR_BUFS * sizeof(Chunk*))
        self.off = <size_t*>PyMem_Malloc(UR_BUFS * sizeof(size_t))
        self.free_bids = <unsigned short*>PyMem_Malloc(UR_BUFS * sizeof(unsigned short))
        self.cqes = <evpl_cqe*>PyMem_Malloc(UR_CQES * sizeof(evpl_cqe))
        if not self.bufs or not self.off or not self.free_bids or not self.cqes:
            self._teardown()
            raise MemoryError()
        for i in range(UR_BUFS):
            self.bufs[i] = NULL
            self.free_bids[i] = i
        self.nfree = UR_BUFS
        err = evpl_uring_setup_bufring(self.ur, UR_BUFS, 0, 1)
        if err < 0:
            self._teardown()
            raise OSError(-err, "io_uring provided buffer ring")
        self.evfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if self.evfd < 0 or evpl_uring_register_eventfd(self.ur, self.evfd) < 0:
            self._teardown()
            raise OSError(errno, "io_uring eventfd")
        self.fd = self.evfd
        ev.events = EPOLLIN
        ev.data.ptr = <void*>self
        if epoll_ctl(loop.epfd, EPOLL_CTL_ADD, self.evfd, &ev) < 0:
            self._teardown()
            raise OSError(errno, "epoll_ctl(io_uring eventfd)")
        self._refill()
        if self.sqpoll:
            self._dg_setup()            # stream receives use the slot ring too
        loop.add_driver(self, _cq_ready, <void*>self.ur)
        return 0

    cdef int _dg_setup(self) except -1:
        """The slot ring: pool buffers cut into fixed slots, one datagram each
        (a plain, non-incremental provided buffer ring)."""
        cdef int err, i
        if self.dg_bufs != NULL:
            return 0
        self.dg_slot = min(<size_t>UR_DG_SLOT, self.pool.buffer_size)
        self.dg_per = <int>min(<size_t>UR_DG_PER, self.pool.buffer_size // self.dg_slot)
        self.dg_bufs = <Chunk**>PyMem_Malloc(UR_DG_CHUNKS * sizeof(Chunk*))
        self.dg_left = <int*>PyMem_Malloc(UR_DG_CHUNKS * sizeof(int))
        if not self.dg_bufs or not self.dg_left:
            self._dg_free()
            raise MemoryError()
        for i in range(UR_DG_CHUNKS):
            self.dg_bufs[i] = NULL
            self.dg_left[i] = 0
        self.dg_nfree = UR_DG_CHUNKS
        err = evpl_uring_setup_bufring(self.ur, UR_DG_CHUNKS * UR_DG_PER, 1, 0)
        if err < 0:
            self._dg_free()
            raise OSError(-err, "io_uring datagram buffer ring")
        self._dg_refill()
        return 0

    cdef void _unref_all(self, Chunk** bufs, int n):
        """Drop the ring's hold on the pool buffers of ``bufs[0:n]``."""
        cdef int i
        if bufs != NULL and self.pool is not None:
            for i in range(n):
                if bufs[i] != NULL:
                    chunk_unref(self.pool, bufs[i])

    cdef void _dg_free(self):
        self._unref_all(self.dg_bufs, UR_DG_CHUNKS)
        PyMem_Free(self.dg_bufs)
        self.dg_bufs = NULL
        PyMem_Free(self.dg_left)
        self.dg_left = NULL

    cdef Chunk* _slot(self, unsigned bid, char** p) noexcept:
        """The pool buffer of slot ``bid`` of the slot ring, which a
        completion filled, held for the caller (who unrefs it); the slot's
        address goes to ``p``."""
        cdef unsigned ci = bid // UR_DG_PER
        cdef Chunk* c = self.dg_bufs[ci]
        p[0] = c.data + (bid % UR_DG_PER) * self.dg_slot
        c.refs += 1
        self.dg_left[ci] -= 1
        if self.dg_left[ci] == 0:          # the kernel used its last slot
            chunk_unref(self.pool, c)
            self.dg_bufs[ci] = NULL
            self.dg_nfree += 1
        return c

    cdef int _dg_refill(self):
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

    cdef void _teardown(self):
        if self.ur != NULL:
            evpl_uring_free(self.ur)
            self.ur = NULL
        self._dg_free()
        self._unref_all(self.bufs, UR_BUFS)
        PyMem_Free(self.bufs)
        self.bufs = NULL
        PyMem_Free(self.off)
        self.off = NULL
        PyMem_Free(self.free_bids)
        self.free_bids = NULL
        PyMem_Free(self.cqes)
        self.cqes = NULL
        if self.evfd >= 0:
            c_close(self.evfd)
            self.evfd = -1

    cdef void _buf_done(self, unsigned bid):
        """The kernel finished with incremental buffer ``bid``."""
        cdef Chunk* c = self.bufs[bid]
        self.bufs[bid] = NULL
        self.free_bids[self.nfree] = bid
        self.nfree += 1
        chunk_unref(self.pool, c)

    cdef void _refill(self):
        """Give the kernel fresh pool buffers for every slot it used up."""
        cdef Chunk* c
        cdef unsigned short bid
        cdef int added = 0
        cdef UringBind b
        # the ring may hold at most half the pool, so that joining a message
        # split across two ring buffers always finds memory
        cdef int limit = <int>min(<size_t>UR_BUFS,
                                  max(<size_t>1, self.pool.max_bytes // self.pool.buffer_size // 2))
        # (with SQPOLL nothing reads from this ring: see UringStream._recv)
        while not self.sqpoll and self.nfree > 0 and UR_BUFS - self.nfree < limit:
            c = self.pool.get()
            if c == NULL:
                break
            self.nfree -= 1
            bid = self.free_bids[self.nfree]
            self.bufs[bid] = c
            self.off[bid] = 0
            evpl_uring_buf_add(self.ur, 0, c.data, <unsigned>c.size, bid)
            added += 1
        if added:
            evpl_uring_buf_commit(self.ur, 0)
        if self.dg_nfree:
            added += self._dg_refill()
        if added:
            self.adds += 1
            if self.rearm:
                batch = self.rearm
                self.rearm = []
                for b in batch:
                    if b.state == S_OPEN and not b.reading_paused:
                        b._arm_recv()

    # ---- the Driver overloads ----------------------------------------------

    cdef int _process(self) except -1:
        """Reap and dispatch every completion that is ready."""
        cdef int n, i, total = 0
        cdef uint64_t ud
        cdef uint32_t flags
        cdef int op, res
        cdef UringBind b
        cdef UringStream s
        cdef UringListener li
        if self.ur == NULL:
            return 0
        while True:
            n = evpl_uring_reap(self.ur, self.cqes, UR_CQES)
            for i in range(n):
                ud = self.cqes[i].user_data
                res = self.cqes[i].res
                flags = self.cqes[i].flags
                op = ud & 7
                if op == OP_RECV:
                    b = <UringBind><PyObject*><void*>(ud & ~(<uint64_t>7))
                    b._recv(res, flags)
                    if not flags & EVPL_CQE_F_MORE:
                        Py_DECREF(b)
                elif op == OP_SEND:
                    s = <UringStream><PyObject*><void*>(ud & ~(<uint64_t>7))
                    s._sent(res, flags)
                    if not flags & EVPL_CQE_F_MORE:
                        Py_DECREF(s)
                elif op == OP_DGSEND:
                    _dg_done(self.loop, <UrDgSend*><void*>(ud & ~(<uint64_t>7)), res)
                elif op == OP_ACCEPT:
                    li = <UringListener><PyObject*><void*>(ud & ~(<uint64_t>7))
                    li._accept(res, flags)
                    if not flags & EVPL_CQE_F_MORE:
                        Py_DECREF(li)
            b = None
            s = None
            li = None
            total += n
            if n < UR_CQES:
                break
        self.stat_cqes += total
        if self.nfree or self.dg_nfree:
            self._refill()
        return total

    cdef void _event(self, uint32_t events):
        """The ring's eventfd fired: completion work is waiting. With
        DEFER_TASKRUN it signals when work is queued, before any completion
        is posted: entering the ring (submit and get events) runs it."""
        cdef uint64_t v
        c_read(self.evfd, &v, 8)
        self.submit_pending = False
        evpl_uring_submit(self.ur)
        self._process()

    cdef int _spin_start(self) except -1:
        # the spin reaps the CQ itself: no eventfd signal per completion.
        # Not with SQPOLL: its thread posts completions concurrently, and
        # re-enabling before a sleep could race with it.
        if self.ur != NULL and not self.evfd_off and not self.sqpoll:
            evpl_uring_evfd_enable(self.ur, 0)
            self.evfd_off = True
        return 0

    cdef int _before_sleep(self) except -1:
        """Turn the eventfd back on; true if completions arrived while it was
        off (their eventfd signal was never sent)."""
        if self.ur == NULL or not self.evfd_off:
            return 0
        evpl_uring_evfd_enable(self.ur, 1)
        self.evfd_off = False
        if evpl_uring_cq_ready(self.ur):
            self._process()
            return 1
        return 0

    cdef int _submit(self) except -1:
        if self.submit_pending and self.ur != NULL:
            self.submit_pending = False
            evpl_uring_submit(self.ur)
        return 0

    cdef bint _waiting(self):
        return bool(self.rearm)

    cdef int _after_events(self) except -1:
        if self.rearm and (self.nfree or self.dg_nfree) and self.pool.releases != self.mark:
            self.mark = self.pool.releases
            self._refill()          # buffers came back: the rings can take them
        return 0

    cdef void _close(self):
        """Let cancellations and in-flight sends complete, so every Bind and
        buffer they hold is released, then drop the ring."""
        cdef bint timed_out
        cdef int quiet = 0
        # an SQPOLL thread that is not getting a CPU may take a while to
        # post the last cancellations: wait for 100 ms of quiet, not 10
        cdef int need_quiet = 10 if self.sqpoll else 1
        self.rearm = []
        if self.ur == NULL:
            return
        for _ in range(200):            # at most ~2 s
            timed_out = evpl_uring_wait(self.ur, 10_000_000) < 0
            if self._process() == 0 and timed_out:
                quiet += 1
                if quiet >= need_quiet:
                    break                  # nothing completed for a while
            else:
                quiet = 0
        self._teardown()

    cdef void _trim_idle(self):
        """Drop the pages of the incremental ring's buffers past what the
        kernel has written (it touched them all while they circulated).
        Safe only with DEFER_TASKRUN, where the kernel writes into ring
        buffers only inside this thread's io_uring_enter, and with every
        completion reaped."""
        cdef int bid
        if (self.ur == NULL or self.sqpoll or self.submit_pending or self.adds == self.trim_adds
                or strcmp(evpl_uring_mode(self.ur), b"defer_taskrun") != 0
                or evpl_uring_cq_ready(self.ur)):
            return
        self.trim_adds = self.adds
        for bid in range(UR_BUFS):
            if self.bufs[bid] != NULL:
                self.pool.trim_tail(self.bufs[bid], self.off[bid])

    cdef void _stats(self, dict d):
        d["completions"] = self.stat_cqes
        d["ring_buffers"] = (UR_BUFS - self.nfree) if self.ur != NULL else 0
        d["ring_rearm"] = len(self.rearm)


cdef UringDriver driver_for(LoopCore loop):
    """The loop's io_uring Driver, made on first use."""
    cdef UringDriver d = loop.drivers.get("io_uring")
    if d is None:
        d = UringDriver.__new__(UringDriver)
        d._setup(loop)
    if d.ur == NULL:
        raise BackendUnavailable("this loop's io_uring ring is closed")
    return d


cdef class UringBind(Bind):
    """What io_uring stream and datagram Binds share: the multishot receive."""
    cdef UringDriver drv
    cdef bint recv_armed
    cdef size_t arm_adds        # drv.adds when the receive was armed
    cdef msghdr mh              # stream: the sendmsg's; datagram: the recvmsg template

    cdef int _submit_recv(self) except -1:
        return 0

    cdef void _recv(self, int res, uint32_t flags):
        pass

    cdef int _arm_recv(self) except -1:
        if self.recv_armed or self.state != S_OPEN or self.reading_paused or self.eof:
            return 0
        if self._submit_recv() < 0:
            raise OSError(EBUSY, "io_uring submission queue full")
        Py_INCREF(self)
        self.recv_armed = True
        self.arm_adds = self.drv.adds
        self.drv.submit_pending = True
        return 0

    cdef int _starved(self) except -1:
        """The multishot receive ended with ENOBUFS (the ring was empty).
        Re-arm when buffers are added; at once if some were added since it
        was armed: with SQPOLL the kernel thread may have found the ring
        empty before that refill, and no later refill would wake us."""
        self.loop.stat_starved += 1
        if self.drv.adds != self.arm_adds:
            self._arm_recv()
        else:
            self.drv.rearm.append(self)
        return 0

    cdef void _cancel(self, uint64_t target):
        evpl_uring_cancel(self.drv.ur, target, OP_CANCEL)
        self.drv.submit_pending = True

    cdef void _opened(self):
        self._arm_recv()

    cdef int _arm_reading(self) except -1:
        return self._arm_recv()

    cdef void _disarm_reading(self):
        if self.recv_armed:
            self._cancel((<uint64_t><void*>self) | OP_RECV)

    cdef void _read(self):
        # starved: pool buffers came back, deliver what was kept
        if self.state == S_OPEN and not self.reading_paused:
            self._drain()

    cdef void _close_fd(self):
        # in-flight requests hold the file: shut the socket down now so the
        # peer sees the close even before the cancellations complete
        shutdown(self.fd, SHUT_RDWR)
        self.drv.submit_pending = False
        evpl_uring_submit(self.drv.ur)
        self.loop._ep_del(self, False)
        c_close(self.fd)

    cdef void _event(self, uint32_t events):
        """epoll serves a connecting socket until it is connected."""
        cdef int err = 0
        cdef socklen_t elen = sizeof(err)
        if self.state != S_CONNECTING or not events & (EPOLLOUT | EPOLLERR | EPOLLHUP):
            return
        getsockopt(self.fd, SOL_SOCKET, SO_ERROR, &err, &elen)
        if err:
            self._close(transport_error(err, f"connect to {self._peer!r}"))
            return
        self.loop._ep_del(self, True)      # from now on io_uring serves it
        self._connected()


@cython.final
cdef class UringStream(UringBind):
    """An ``io_uring_tcp`` or ``io_uring_unix`` connection."""
    cdef bint send_inflight
    cdef bint send_zc
    cdef bint no_zc
    cdef iovec* iov
    cdef bytes hdrs             # the framing headers of the send in flight
    cdef list zc_hold

    def __dealloc__(self):
        PyMem_Free(self.iov)
        self.iov = NULL

    cdef int _submit_recv(self) except -1:
        # SQPOLL: the slot ring, see _recv
        return evpl_uring_recv_multishot(self.drv.ur, self.fd, (<uint64_t><void*>self) | OP_RECV,
                                         1 if self.drv.sqpoll else 0)

    cdef bint _send_busy(self):
        return self.send_inflight

    cdef int _send_queued(self) except -1:
        if self.send_inflight:
            return 0
        if not txq_empty(&self.txq):
            self._send()
            return 0
        return 1

    cdef int _send(self) except -1:
        """Hand the queue (up to 1024 pieces) to one io_uring sendmsg."""
        cdef size_t total = 0
        cdef int cnt
        cdef bint zc
        if self.iov == NULL:
            self.iov = <iovec*>PyMem_Malloc(MAX_IOV * sizeof(iovec))
            if self.iov == NULL:
                raise MemoryError()
        if self.hdrs is None:
            # the kernel reads the headers when the send runs, which may be
            # after the queue has grown and moved its entries: a copy of
            # them, in memory of this send's own, is what it reads
            self.hdrs = PyBytes_FromStringAndSize(NULL, MAX_IOV * 8)
        cnt = txq_gather(&self.txq, self.iov, MAX_IOV, &total,
                         <unsigned char*>PyBytes_AS_STRING(self.hdrs))
        memset(&self.mh, 0, sizeof(msghdr))
        self.mh.msg_iov = self.iov
        self.mh.msg_iovlen = cnt
        zc = (self.loop.zc_threshold > 0 and total >= self.loop.zc_threshold
              and not self.no_zc)
        if evpl_uring_sendmsg(self.drv.ur, self.fd, &self.mh,
                              (<uint64_t><void*>self) | OP_SEND, zc) < 0:
            raise OSError(EBUSY, "io_uring submission queue full")
        Py_INCREF(self)
        self.send_inflight = True
        self.send_zc = zc
        self.drv.submit_pending = True
        if zc:
            self.loop.stat_zc_sends += 1
        return 0

    cdef void _sent(self, int res, uint32_t flags):
        """Completion of a sendmsg (or its zero-copy notification)."""
        cdef list hold
        if flags & EVPL_CQE_F_NOTIF:
            # the kernel no longer reads the buffers of the oldest zc send
            if self.zc_hold:
                self.zc_hold.pop(0)
            return
        self.send_inflight = False
        if self.send_zc and flags & EVPL_CQE_F_MORE:
            hold = []
            if self.zc_hold is None:
                self.zc_hold = []
            self.zc_hold.append(hold)
            hold.append(self.hdrs)          # read until the notification too
            self.hdrs = None
        else:
            hold = None
        if self.state == S_CLOSED:
            txq_drop(&self.txq, hold)      # zero-copy: kept until the notification
            return
        if res == -EOPNOTSUPP and self.send_zc:
            # this socket type (AF_UNIX) has no zero-copy send: plain from now on
            self.no_zc = True
            self._send()
            return
        if res < 0:
            if res != -ECANCELED:
                self._close(transport_error(-res, "send"))
            else:
                self._close(None)
            return
        self.loop.stat_bytes_out += res
        self.queued_bytes -= txq_retire(&self.txq, <size_t>res, hold)
        if not txq_empty(&self.txq):
            self._send()
        else:
            self._after_flush()

    cdef void _recv(self, int res, uint32_t flags):
        """Completion of the multishot receive."""
        cdef UringDriver drv = self.drv
        cdef LoopCore loop = self.loop
        cdef unsigned bid
        cdef Chunk* c = NULL
        cdef char* p = NULL
        cdef size_t part0, m0
        if flags & EVPL_CQE_F_BUFFER and drv.sqpoll:
            # An SQPOLL thread may post completions in another order than it
            # consumed an incremental buffer (seen on 6.18: a stream got
            # bytes of another), so there each completion has a whole slot
            # of the slot ring to itself.
            c = drv._slot(flags >> 16, &p)
        elif flags & EVPL_CQE_F_BUFFER:
            bid = flags >> 16
            c = drv.bufs[bid]
            p = c.data + drv.off[bid]
            if res > 0:
                drv.off[bid] += res
            c.refs += 1                 # hold it across the callbacks
            if not flags & EVPL_CQE_F_BUF_MORE:
                drv._buf_done(bid)
        if not flags & EVPL_CQE_F_MORE:
            self.recv_armed = False
        if res > 0 and self.state == S_OPEN and c != NULL:
            loop.stat_bytes_in += res
            part0 = self.part_len
            m0 = loop.stat_messages_in
            self._take(c, p, res)
            if self.idle_ns or self.msg_ns:
                self._timestamps(part0, m0)
        if c != NULL:
            chunk_unref(loop.pool, c)
        if not flags & EVPL_CQE_F_MORE and self.state == S_OPEN:
            if res == 0:
                self._on_eof()
            elif res == -ENOBUFS:
                self._starved()
            elif res < 0 and res != -ECANCELED:
                self._close(transport_error(-res, "receive"))
            elif not self.reading_paused and not self.eof:
                self._arm_recv()

    cdef void _release(self):
        if self.recv_armed:
            self._cancel((<uint64_t><void*>self) | OP_RECV)
        if self.send_inflight:
            # the kernel still reads the queue: the send's completion drops it
            self._cancel((<uint64_t><void*>self) | OP_SEND)
        else:
            txq_drop(&self.txq, None)
        self.queued_bytes = 0
        self._close_fd()


@cython.final
cdef class UringDatagram(UringBind):
    """An ``io_uring_udp`` socket."""
    cdef UrDgSend* dg
    cdef int dg_inflight

    def __dealloc__(self):
        PyMem_Free(self.dg)
        self.dg = NULL

    cdef int _submit_recv(self) except -1:
        # the kernel reads this msghdr for every shot: it lives in the Bind
        memset(&self.mh, 0, sizeof(msghdr))
        self.mh.msg_namelen = sizeof(sockaddr_in6)
        self.mh.msg_controllen = UR_DG_HDR - UR_DG_CTL     # for UDP_GRO
        return evpl_uring_recvmsg_multishot(self.drv.ur, self.fd, &self.mh,
                                            (<uint64_t><void*>self) | OP_RECV, 1)

    cdef bint _send_busy(self):
        return self.dg_inflight > 0

    cdef int _send_queued(self) except -1:
        """One sendmsg per queued datagram, or per GSO train of them (see
        txq_dg_group), at most UR_DG_INFLIGHT in flight; each request owns
        its msghdr, iovecs, address and data owners."""
        cdef UrDgSend* s
        cdef TxEntry* e
        cdef TxQueue* q = &self.txq
        cdef iovec* v
        cdef unsigned char* hdrs
        cdef int i = 0, k, n, per
        if self.dg == NULL:
            self.dg = <UrDgSend*>PyMem_Malloc(UR_DG_INFLIGHT * sizeof(UrDgSend))
            if self.dg == NULL:
                raise MemoryError()
            memset(self.dg, 0, UR_DG_INFLIGHT * sizeof(UrDgSend))
        while not txq_empty(q) and self.dg_inflight < UR_DG_INFLIGHT:
            while self.dg[i].busy:
                i += 1
            s = &self.dg[i]
            e = &q.e[q.head]
            n = txq_dg_group(q, q.head, self.gso_limit)
            memset(&s.mh, 0, sizeof(msghdr))
            per = 1
            for k in range(n):
                if e[k].hdrlen:
                    per = 2
            if n == 1:
                s.iov = s.iov1
                s.owners = &s.owner1
                hdrs = s.hdr1
            else:
                # the kernel reads the headers after this returns, and the
                # entries holding them move when the queue grows: copies
                s.iov = <iovec*>PyMem_Malloc(n * (per * sizeof(iovec) + sizeof(PyObject*)
                                                  + (TX_HDR if per == 2 else 0)))
                if s.iov == NULL:
                    raise MemoryError()
                s.owners = <PyObject**>(s.iov + n * per)
                hdrs = <unsigned char*>(s.owners + n)
                evpl_set_gso(&s.mh, s.ctl, txq_dg_size(e))
            if e.salen:
                memcpy(&s.sa, &e.sa, e.salen)
                s.mh.msg_name = &s.sa
                s.mh.msg_namelen = e.salen
            s.mh.msg_iov = s.iov
            s.mh.msg_iovlen = n * per
            s.len = 0
            v = s.iov
            for k in range(n):
                if per == 2:
                    memcpy(hdrs, e[k].hdr, e[k].hdrlen)
                    v.iov_base = hdrs
                    v.iov_len = e[k].hdrlen
                    hdrs += TX_HDR
                    v += 1
                v.iov_base = e[k].ptr
                v.iov_len = e[k].len
                v += 1
                s.owners[k] = e[k].owner      # the queue's reference moves here
                s.len += txq_dg_size(&e[k])
            if evpl_uring_sendmsg_dgram(self.drv.ur, self.fd, &s.mh,
                                        (<uint64_t><void*>s) | OP_DGSEND) < 0:
                if n > 1:
                    PyMem_Free(s.iov)
                raise OSError(EBUSY, "io_uring submission queue full")
            s.n = n
            s.per = per
            s.bind = <PyObject*>self
            Py_INCREF(self)
            s.busy = 1
            self.dg_inflight += 1
            q.head += n
            self.drv.submit_pending = True
        if txq_empty(q):
            q.head = q.tail = 0
        return 0

    cdef void _recv(self, int res, uint32_t flags):
        """Completion of the multishot recvmsg (one datagram per slot)."""
        cdef LoopCore loop = self.loop
        cdef Chunk* c = NULL
        cdef char* p = NULL
        if flags & EVPL_CQE_F_BUFFER:
            c = self.drv._slot(flags >> 16, &p)
        if not flags & EVPL_CQE_F_MORE:
            self.recv_armed = False
        if res >= UR_DG_HDR and c != NULL and self.state == S_OPEN:
            self._dgram(c, p)
        if c != NULL:
            chunk_unref(loop.pool, c)
        if not flags & EVPL_CQE_F_MORE and self.state == S_OPEN:
            if res == -ENOBUFS:
                self._starved()
            elif res < 0 and res != -ECANCELED:
                self._dgram_error(-res)     # ICMP errors (refused...)
                self._arm_recv()
            elif not self.reading_paused:
                self._arm_recv()

    cdef void _dgram(self, Chunk* c, char* p):
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

    cdef void _sent_one(self, ssize_t r, size_t n) noexcept:
        """Count the outcome of sending one datagram of n bytes."""
        if r >= 0:
            self.loop.stat_datagrams_out += 1
            self.loop.stat_bytes_out += n
        else:
            self.loop.stat_dgram_errors += 1

    cdef void _release(self):
        cdef int i
        if self.recv_armed:
            self._cancel((<uint64_t><void*>self) | OP_RECV)
        txq_drop(&self.txq, None)
        if self.dg_inflight:
            for i in range(UR_DG_INFLIGHT):
                if self.dg[i].busy:
                    self._cancel((<uint64_t><void*>&self.dg[i]) | OP_DGSEND)
        self.queued_bytes = 0
        self._close_fd()


cdef inline size_t _dg_len(UrDgSend* s, int k) noexcept:
    """The size of the k-th datagram of a send (its pieces together)."""
    cdef iovec* v = &s.iov[k * s.per]
    return v[0].iov_len + (v[1].iov_len if s.per == 2 else 0)


cdef void _dg_done(LoopCore loop, UrDgSend* s, int res):
    """Completion of one datagram (or GSO train) sendmsg: count it, release
    its owners. A train the path refuses to segment is sent again one
    datagram at a time, and this Bind stops building such trains."""
    cdef UringDatagram b = <UringDatagram>s.bind
    cdef int k
    s.busy = 0
    b.dg_inflight -= 1
    if b.state != S_CLOSED:
        b.queued_bytes -= s.len
    if res < 0 and s.n > 1 and b.state == S_OPEN and b._gso_refused(-res, _dg_len(s, 0)):
        for k in range(s.n):
            s.mh.msg_iov = &s.iov[k * s.per]
            s.mh.msg_iovlen = s.per
            s.mh.msg_control = NULL
            s.mh.msg_controllen = 0
            b._sent_one(sendmsg(b.fd, &s.mh, MSG_NOSIGNAL | MSG_DONTWAIT), _dg_len(s, k))
    elif res >= 0:
        loop.stat_datagrams_out += s.n
        loop.stat_bytes_out += s.len
        if s.n > 1:
            loop.stat_gso_sends += 1
    elif res != -ECANCELED:
        loop.stat_dgram_errors += s.n - 1      # unreachable, refused, bad address...
        if b.state == S_OPEN:
            b._dgram_error(-res)
        else:
            loop.stat_dgram_errors += 1
    for k in range(s.n):
        Py_DECREF(<object>s.owners[k])
    if s.n > 1:
        PyMem_Free(s.iov)
    s.n = 0
    if b.state == S_OPEN:
        if not txq_empty(&b.txq):
            b._send_queued()
        elif b.dg_inflight == 0:
            b._after_flush()
    Py_DECREF(b)                           # the request's reference


@cython.final
cdef class UringListener(Listener):
    """A listening socket served by a multishot accept."""
    cdef UringDriver drv
    cdef bint armed

    cdef Bind _new_conn(self, int fd, handler):
        cdef UringStream b = UringStream.__new__(UringStream)
        b.drv = self.drv
        b._setup(self.loop, fd, self.backend, True, handler, self.framer, self.limits)
        return b

    cdef int _arm(self) except -1:
        if evpl_uring_accept_multishot(self.drv.ur, self.fd,
                                       (<uint64_t><void*>self) | OP_ACCEPT) < 0:
            raise OSError(EBUSY, "io_uring submission queue full")
        Py_INCREF(self)
        self.armed = True
        self.drv.submit_pending = True
        return 0

    def _rearm(self):
        if self.active and not self.armed:
            self._arm()

    cdef void _accept(self, int res, uint32_t flags):
        if not flags & EVPL_CQE_F_MORE:
            self.armed = False
        if res >= 0:
            if self.active:
                self._accepted(res)
            else:
                c_close(res)
        elif res != -ECANCELED:
            self.loop.stat_accept_errors += 1
        if self.active and not self.armed:
            if res == -EMFILE or res == -ENFILE or res == -ENOBUFS or res == -ENOMEM:
                self.loop.call_later(0.1, self._rearm)     # out of descriptors: back off
            else:
                self._arm()

    cdef void _release(self):
        if self.armed:
            evpl_uring_cancel(self.drv.ur, (<uint64_t><void*>self) | OP_ACCEPT, OP_CANCEL)
            shutdown(self.fd, SHUT_RDWR)
            evpl_uring_submit(self.drv.ur)
        c_close(self.fd)


# ---- adoption: evpl.Loop hands sockets it created to these ----------------

def stream(LoopCore loop, int fd, str backend, handler, Framer framer, Limits limits,
           bint connecting, peer, int connect_errno=0):
    """A Bind for a connected or connecting stream socket (nonblocking);
    epoll watches a connecting one until it is connected."""
    cdef UringStream b = UringStream.__new__(UringStream)
    b.drv = driver_for(loop)
    b._setup(loop, fd, backend, True, handler, framer, limits)
    if connecting:
        loop._ep_add(b, fd, EPOLLOUT | EPOLLET)
    b._adopt_stream(peer, connecting, connect_errno)
    return b


def datagram(LoopCore loop, int fd, str backend, handler, Limits limits, bint gso=False,
             peer=None, bint gro=True):
    """A Bind for a bound datagram socket (see ``evpl._native.epoll.datagram``)."""
    cdef UringDatagram b = UringDatagram.__new__(UringDatagram)
    b.drv = driver_for(loop)
    b.drv._dg_setup()
    b._setup(loop, fd, backend, False, handler, None, limits)
    b._adopt_datagram(gso, peer, b.drv.dg_slot - UR_DG_HDR >= 65535 - 8, gro)
    return b


def listener(LoopCore loop, int fd, str backend, factory, shared, Framer framer, Limits limits,
             bint nodelay, address):
    """A Listener served by a multishot accept."""
    cdef UringListener li = UringListener.__new__(UringListener)
    li.drv = driver_for(loop)
    li._setup(loop, fd, backend, factory, shared, framer, limits, nodelay, address)
    li._arm()
    return li
