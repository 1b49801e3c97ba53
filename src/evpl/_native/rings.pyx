# cython: language_level=3, boundscheck=False, wraparound=False
"""Shared-memory rings between shards (evpl_rings.h): the native side of
``evpl.shards``.

``RingSet`` maps the memfd that holds, for n shards, one control block per
shard and one single-producer/single-consumer ring per ordered pair.
``ShardRings`` is the Driver of one shard's loop: it writes records into its
outgoing rings and polls its incoming rings like any backend (without the
GIL while the loop spins). A receiver that may sleep sets its ``sleeping``
flag; a sender writes the receiver's eventfd only then, once per batch (the
``rung`` flag), so a polling receiver costs no system call (io_uring's
SQ_NEED_WAKEUP and AF_XDP's need-wakeup flag work the same way).
"""

cimport cython
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport int64_t, uint64_t, uint32_t
from libc.errno cimport errno
from posix.unistd cimport read as c_read, write as c_write

from evpl._native.loop cimport Driver, LoopCore
from evpl._native.sys cimport epoll_event, epoll_ctl, EPOLL_CTL_ADD, EPOLL_CTL_DEL, EPOLLIN

import pickle as _pickle

from evpl.errors import Busy, ConfigError, ShardError

cdef extern from "<sys/mman.h>" nogil:
    void* mmap(void* addr, size_t length, int prot, int flags, int fd, long offset)
    int munmap(void* addr, size_t length)
    int PROT_READ, PROT_WRITE, MAP_SHARED
    void* MAP_FAILED

cdef extern from "evpl_rings.h" nogil:
    ctypedef struct evpl_ring_hdr:
        uint64_t head
        uint64_t tail
        int want_room
    ctypedef struct evpl_shard_ctl:
        int sleeping
        int rung
        int room
        int state
        int pid
        int generation
    ctypedef struct evpl_rings_hdr:
        uint64_t magic
        uint64_t ring_bytes
        int n
        int epoch
        int stop
    ctypedef struct evpl_rec:
        uint32_t len
        uint32_t kind
        uint64_t id
    uint64_t EVPL_RINGS_MAGIC
    size_t evpl_rings_size(int n, uint64_t ring_bytes)
    evpl_shard_ctl* evpl_rings_ctl(void* base, int i)
    evpl_ring_hdr* evpl_rings_ring(void* base, int n, uint64_t ring_bytes, int src, int dst)
    int evpl_ring_put(evpl_ring_hdr* r, uint64_t size, uint32_t kind, uint64_t id,
                      const void* data, uint32_t length)
    int evpl_ring_ready(evpl_ring_hdr* r)
    evpl_rec* evpl_ring_next(evpl_ring_hdr* r, uint64_t size, uint64_t* pos, uint64_t tail)

cdef extern from "evpl_helpers.h" nogil:
    int evpl_xchg(int* p, int v)
    int evpl_load(int* p)
    void evpl_store(int* p, int v)

cdef extern from *:
    """
    static inline uint64_t evpl_load_u64(uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void evpl_store_u64(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    static inline void evpl_fence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
    static inline int evpl_add(int *p, int v) { return __atomic_add_fetch(p, v, __ATOMIC_SEQ_CST); }
    """
    uint64_t evpl_load_u64(uint64_t* p) nogil
    void evpl_store_u64(uint64_t* p, uint64_t v) nogil
    void evpl_fence() nogil
    int evpl_add(int* p, int v) nogil

DEF MAX_SHARDS = 64

# record kinds; PICKLED marks a payload the receiver unpickles
K_MESSAGE = 1
K_REQUEST = 2
K_REPLY = 3
K_ERROR = 4
K_PICKLED = 0x100
cdef enum:
    KM_MESSAGE = 1
    KM_REQUEST = 2
    KM_REPLY = 3
    KM_ERROR = 4
    KM_PICKLED = 0x100

# shard states in the control block
STARTING = 0
RUNNING = 1
GONE = 2


@cython.final
cdef class RingSet:
    """The shared memory of a group of ``n`` shards: made by the parent
    (``create``) before it forks, mapped again by each shard."""
    cdef char* base
    cdef size_t size
    cdef readonly int n
    cdef readonly uint64_t ring_bytes
    cdef readonly int fd

    def __cinit__(self):
        self.fd = -1

    def __init__(self, int fd, int n, uint64_t ring_bytes, bint init=False):
        if not 1 <= n <= MAX_SHARDS:
            raise ConfigError(f"shards: n must be in 1..{MAX_SHARDS}, got {n}")
        if ring_bytes < 4096 or ring_bytes & (ring_bytes - 1):
            raise ConfigError(f"ring_bytes must be a power of two >= 4096, got {ring_bytes}")
        self.n = n
        self.ring_bytes = ring_bytes
        self.size = evpl_rings_size(n, ring_bytes)
        self.fd = fd
        if init:
            import os
            os.ftruncate(fd, self.size)
        p = mmap(NULL, self.size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        if p == MAP_FAILED:
            raise OSError(errno, "mmap of the shard rings")
        self.base = <char*>p
        cdef evpl_rings_hdr* h = <evpl_rings_hdr*>self.base
        if init:
            h.magic = EVPL_RINGS_MAGIC
            h.ring_bytes = ring_bytes
            h.n = n
        elif h.magic != EVPL_RINGS_MAGIC or h.n != n or h.ring_bytes != ring_bytes:
            raise ShardError("the shard rings' shared memory does not match this group")

    def __dealloc__(self):
        if self.base != NULL:
            munmap(self.base, self.size)

    @property
    def epoch(self) -> int:
        return evpl_load(&(<evpl_rings_hdr*>self.base).epoch)

    @property
    def stop_requested(self) -> bool:
        """A shard asked the whole group to stop (``Shard.stop_group``)."""
        return bool(evpl_load(&(<evpl_rings_hdr*>self.base).stop))

    def bump_epoch(self) -> None:
        """A shard came or went: every shard's driver looks at the states."""
        evpl_add(&(<evpl_rings_hdr*>self.base).epoch, 1)

    def state(self, int i) -> int:
        self._check(i)
        return evpl_load(&evpl_rings_ctl(self.base, i).state)

    def set_state(self, int i, int state, int pid=0) -> None:
        self._check(i)
        cdef evpl_shard_ctl* c = evpl_rings_ctl(self.base, i)
        if pid:
            c.pid = pid
        if state == STARTING:
            c.generation += 1       # a new process: the others take it back
        evpl_store(&c.state, state)

    def generation(self, int i) -> int:
        self._check(i)
        return evpl_rings_ctl(self.base, i).generation

    def wake(self, int i, int efd) -> None:
        """Write shard ``i``'s eventfd (its state changed)."""
        cdef uint64_t one = 1
        self._check(i)
        evpl_store(&evpl_rings_ctl(self.base, i).rung, 1)
        c_write(efd, &one, 8)

    def backlog(self, int src, int dst) -> int:
        """Bytes written by ``src`` and not yet taken by ``dst``."""
        self._check(src)
        self._check(dst)
        cdef evpl_ring_hdr* r = evpl_rings_ring(self.base, self.n, self.ring_bytes, src, dst)
        return evpl_load_u64(&r.tail) - evpl_load_u64(&r.head)

    cdef void _check(self, int i) except *:
        if not 0 <= i < self.n:
            raise ValueError(f"no shard {i} (the group has {self.n})")


cdef struct rx_ctx:
    int n
    int me
    evpl_ring_hdr* rx[MAX_SHARDS]
    evpl_shard_ctl* ctl
    int* epoch
    int seen_epoch


cdef int _ready(void* p) noexcept nogil:
    cdef rx_ctx* c = <rx_ctx*>p
    cdef int i
    for i in range(c.n):
        if c.rx[i] != NULL and evpl_ring_ready(c.rx[i]):
            return 1
    if evpl_load(&c.ctl.room) or evpl_load(c.epoch) != c.seen_epoch:
        return 1
    return 0


@cython.final
@cython.no_gc_clear
cdef class ShardRings(Driver):
    """One shard's end of the rings: ``send`` into shard k's ring, incoming
    records dispatched to the handlers ``on_message(src, payload)``,
    ``on_request(src, rid, payload, pickled)``, ``on_reply(src, rid, ok,
    payload)`` and ``on_change()`` (a shard came or went)."""
    cdef RingSet rs
    cdef rx_ctx ctx
    cdef evpl_ring_hdr* tx[MAX_SHARDS]
    cdef int efds[MAX_SHARDS]
    cdef bint dirty[MAX_SHARDS]
    cdef bint down[MAX_SHARDS]          # gone, as far as this shard knows
    cdef bint backlogged[MAX_SHARDS]    # requests or replies wait for room (Python side)
    cdef int ndirty
    cdef readonly int me
    cdef uint64_t size
    cdef uint32_t max_payload
    cdef public object on_message
    cdef public object on_messages   # if set: one call per ring batch of one-way messages
    cdef public object on_request
    cdef public object on_reply
    cdef public object on_change
    cdef size_t stat_sent, stat_received, stat_full, stat_wakeups, stat_batches

    cdef int _setup(self, LoopCore loop, RingSet rs, int me, list efds) except -1:
        cdef epoll_event ev
        cdef int i
        if len(efds) != rs.n:
            raise ValueError("one eventfd per shard")
        self.loop = loop
        self.rs = rs
        self.me = me
        self.name = "shards"
        self.size = rs.ring_bytes
        self.max_payload = <uint32_t>(rs.ring_bytes // 4)
        self.ctx.n = rs.n
        self.ctx.me = me
        self.ctx.ctl = evpl_rings_ctl(rs.base, me)
        self.ctx.epoch = &(<evpl_rings_hdr*>rs.base).epoch
        self.ctx.seen_epoch = evpl_load(self.ctx.epoch)
        for i in range(rs.n):
            self.efds[i] = efds[i]
            self.dirty[i] = False
            self.down[i] = False
            self.backlogged[i] = False
            if i == me:
                self.ctx.rx[i] = NULL
                self.tx[i] = NULL
            else:
                self.ctx.rx[i] = evpl_rings_ring(rs.base, rs.n, rs.ring_bytes, i, me)
                self.tx[i] = evpl_rings_ring(rs.base, rs.n, rs.ring_bytes, me, i)
        self.fd = efds[me]
        ev.events = EPOLLIN
        ev.data.ptr = <void*>self
        if epoll_ctl(loop.epfd, EPOLL_CTL_ADD, self.fd, &ev) < 0:
            raise OSError(errno, "epoll_ctl(shard eventfd)")
        loop.add_driver(self, _ready, <void*>&self.ctx)
        return 0

    @property
    def max_payload(self) -> int:
        return self.max_payload

    # ---- sending --------------------------------------------------------

    cpdef bint send(self, int dst, int kind, uint64_t rid, payload) except -1:
        """Copy one record into shard ``dst``'s ring; False if the ring is
        full (the caller keeps it; the driver's ``on_room`` retry follows)."""
        cdef Py_buffer view
        cdef int ok
        cdef evpl_ring_hdr* r
        if not 0 <= dst < self.ctx.n or dst == self.me:
            raise ValueError(f"no other shard {dst} (this is shard {self.me} of {self.ctx.n})")
        r = self.tx[dst]
        PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
        try:
            if <size_t>view.len > self.max_payload:
                raise ValueError(f"payload of {view.len} bytes is larger than a quarter of "
                                 f"the ring ({self.max_payload} bytes; see ring_bytes)")
            ok = evpl_ring_put(r, self.size, kind, rid, view.buf, <uint32_t>view.len)
        finally:
            PyBuffer_Release(&view)
        if not ok:
            # ask the receiver to tell us when it made room, then look again
            evpl_store(&r.want_room, 1)
            evpl_fence()
            PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
            try:
                ok = evpl_ring_put(r, self.size, kind, rid, view.buf, <uint32_t>view.len)
            finally:
                PyBuffer_Release(&view)
            if not ok:
                self.stat_full += 1
                if not self.ndirty or not self.dirty[dst]:
                    self._mark(dst)      # the receiver must see what is there
                return False
        self.stat_sent += 1
        if not self.dirty[dst]:
            self._mark(dst)
        return True

    def set_down(self, int k, bint down) -> None:
        self._check(k)
        self.down[k] = down

    def set_backlogged(self, int k, bint backlogged) -> None:
        self._check(k)
        self.backlogged[k] = backlogged

    cdef int _check(self, int k) except -1:
        if not 0 <= k < self.ctx.n or k == self.me:
            raise ValueError(f"no other shard {k} (this is shard {self.me} of {self.ctx.n})")
        return 0

    def send_to(self, int dst, payload, *, bint pickle=False) -> None:
        """``Shard.send_to``: one message to shard ``dst``, or ``Busy`` if
        its ring is full (or requests to it wait for room: order is kept),
        ``ShardError`` if it is gone."""
        cdef int kind = KM_MESSAGE
        self._check(dst)
        if self.down[dst]:
            raise ShardError(f"shard {dst} is gone")
        if pickle:
            payload = _pickle.dumps(payload, protocol=_pickle.HIGHEST_PROTOCOL)
            kind |= KM_PICKLED
        if self.backlogged[dst] or not self.send(dst, kind, 0, payload):
            raise Busy(f"the ring to shard {dst} is full")

    def send_many(self, int dst, int kind, payloads, Py_ssize_t start=0) -> int:
        """Copy ``payloads[start:]`` into shard ``dst``'s ring, one record
        each, until it is full; returns how many were written."""
        cdef Py_buffer view
        cdef int ok
        cdef Py_ssize_t i, n
        cdef evpl_ring_hdr* r
        cdef list items = payloads if type(payloads) is list else list(payloads)
        if not 0 <= dst < self.ctx.n or dst == self.me:
            raise ValueError(f"no other shard {dst} (this is shard {self.me} of {self.ctx.n})")
        r = self.tx[dst]
        n = len(items)
        i = start
        while i < n:
            PyObject_GetBuffer(items[i], &view, PyBUF_SIMPLE)
            try:
                if <size_t>view.len > self.max_payload:
                    raise ValueError(f"payload of {view.len} bytes is larger than a quarter "
                                     f"of the ring ({self.max_payload} bytes)")
                ok = evpl_ring_put(r, self.size, kind, 0, view.buf, <uint32_t>view.len)
                if not ok:
                    evpl_store(&r.want_room, 1)
                    evpl_fence()
                    ok = evpl_ring_put(r, self.size, kind, 0, view.buf, <uint32_t>view.len)
            finally:
                PyBuffer_Release(&view)
            if not ok:
                self.stat_full += 1
                break
            i += 1
        self.stat_sent += i - start
        if i > start and not self.dirty[dst]:
            self._mark(dst)
        return i - start

    cdef inline void _mark(self, int dst):
        self.dirty[dst] = True
        self.ndirty += 1

    def stop_group(self) -> None:
        """Ask every shard of the group to stop: set the flag, bump the
        epoch and wake them all."""
        cdef int i
        cdef uint64_t one = 1
        evpl_store(&(<evpl_rings_hdr*>self.rs.base).stop, 1)
        evpl_add(&(<evpl_rings_hdr*>self.rs.base).epoch, 1)
        for i in range(self.ctx.n):
            if i != self.me:
                evpl_store(&evpl_rings_ctl(self.rs.base, i).rung, 1)
                c_write(self.efds[i], &one, 8)

    cdef void _wake(self, int i) noexcept:
        """Shard i may be asleep: write its eventfd, once until it reads it."""
        cdef evpl_shard_ctl* c = evpl_rings_ctl(self.rs.base, i)
        cdef uint64_t one = 1
        evpl_fence()
        if evpl_load(&c.sleeping) and evpl_xchg(&c.rung, 1) == 0:
            self.stat_wakeups += 1
            c_write(self.efds[i], &one, 8)

    cdef int _submit(self) except -1:
        """End of iteration: wake the receivers of this iteration's records."""
        cdef int i
        if self.ndirty:
            for i in range(self.ctx.n):
                if self.dirty[i]:
                    self.dirty[i] = False
                    self._wake(i)
            self.ndirty = 0
        return 0

    # ---- receiving --------------------------------------------------------

    cdef int _run(self) except -1:
        cdef int i, total = 0
        cdef uint64_t pos, tail
        cdef evpl_ring_hdr* r
        cdef evpl_rec* h
        cdef evpl_shard_ctl* peer
        cdef bytes data
        cdef uint32_t kind
        cdef list batch = None
        cdef object on_messages = self.on_messages
        cdef int epoch = evpl_load(self.ctx.epoch)
        if evpl_xchg(&self.ctx.ctl.room, 0):
            self._room()
        for i in range(self.ctx.n):
            r = self.ctx.rx[i]
            if r == NULL or not evpl_ring_ready(r):
                continue
            pos = r.head
            tail = evpl_load_u64(&r.tail)
            self.stat_batches += 1
            try:
                while True:
                    h = evpl_ring_next(r, self.size, &pos, tail)
                    if h == NULL:
                        break
                    if h.len > self.max_payload:
                        raise ShardError(f"shard {i} wrote a corrupt record ({h.len} bytes)")
                    data = PyBytes_FromStringAndSize(<char*>(h + 1), h.len)
                    kind = h.kind
                    total += 1
                    if kind & 0xff == KM_MESSAGE:
                        if on_messages is not None:
                            if batch is None:
                                batch = []
                            batch.append(_pickle.loads(data) if kind & KM_PICKLED else data)
                        else:
                            self.on_message(i, _pickle.loads(data) if kind & KM_PICKLED else data)
                        continue
                    if batch:           # keep the order of messages and requests
                        on_messages(i, batch)
                        batch = None
                    if kind & 0xff == KM_REQUEST:
                        self.on_request(i, h.id, data, bool(kind & KM_PICKLED))
                    elif kind & 0xff == KM_REPLY:
                        self.on_reply(i, h.id, True,
                                      _pickle.loads(data) if kind & KM_PICKLED else data)
                    elif kind & 0xff == KM_ERROR:
                        self.on_reply(i, h.id, False, data)
                if batch:
                    on_messages(i, batch)
                    batch = None
            finally:
                # everything up to pos is consumed, even if a handler raised
                evpl_store_u64(&r.head, pos)
                if evpl_load(&r.want_room) and evpl_xchg(&r.want_room, 0):
                    peer = evpl_rings_ctl(self.rs.base, i)
                    evpl_store(&peer.room, 1)
                    self._wake(i)
        self.stat_received += total
        if epoch != self.ctx.seen_epoch:
            # after the rings: what a shard wrote before it died is delivered
            # before its pending requests fail
            self.ctx.seen_epoch = epoch
            if self.on_change is not None:
                self.on_change()
        return total

    cdef void _room(self):
        if self.on_room_cb is not None:
            self.on_room_cb()

    cdef public object on_room_cb

    cdef void _event(self, uint32_t events):
        cdef uint64_t v
        c_read(self.fd, &v, 8)
        evpl_store(&self.ctx.ctl.rung, 0)
        try:
            self._run()
        except Exception as exc:
            self.loop._callback_error(exc, None)

    cdef int _spin_start(self) except -1:
        evpl_store(&self.ctx.ctl.sleeping, 0)
        return 0

    cdef int _process(self) except -1:
        try:
            return self._run()
        except Exception as exc:
            self.loop._callback_error(exc, None)
            return 1

    cdef int _before_sleep(self) except -1:
        evpl_store(&self.ctx.ctl.sleeping, 1)
        evpl_fence()
        if _ready(&self.ctx):
            self._process()
            return 1
        return 0

    cdef int _after_events(self) except -1:
        if _ready(&self.ctx):
            self._process()
        return 0

    cdef void _close(self):
        if self.fd >= 0 and self.loop is not None:
            epoll_ctl(self.loop.epfd, EPOLL_CTL_DEL, self.fd, NULL)
            self.fd = -1

    cdef void _stats(self, dict d):
        d["shard_sent"] = self.stat_sent
        d["shard_received"] = self.stat_received
        d["shard_ring_full"] = self.stat_full
        d["shard_wakeups"] = self.stat_wakeups
        d["shard_batches"] = self.stat_batches


def shard_rings(LoopCore loop, RingSet rs, int me, list efds) -> ShardRings:
    """Attach shard ``me``'s end of the rings ``rs`` to ``loop``; ``efds``:
    every shard's eventfd (inherited from the parent)."""
    cdef ShardRings d = ShardRings.__new__(ShardRings)
    if not 0 <= me < rs.n:
        raise ValueError(f"no shard {me}")
    d._setup(loop, rs, me, efds)
    return d
