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
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.stdint cimport int64_t, uint64_t, uint32_t
from libc.errno cimport errno
from posix.unistd cimport read as c_read, write as c_write

from evpl._native.loop cimport Driver, LoopCore
from evpl._native.sys cimport epoll_event, epoll_ctl, EPOLL_CTL_ADD, EPOLL_CTL_DEL, EPOLLIN

import asyncio as _asyncio
import logging as _logging
import pickle as _pickle
import threading as _threading

from evpl.errors import Busy, ConfigError, EvplError, ShardError

_log = _logging.getLogger("evpl")

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
    ctypedef struct evpl_ring_tx:
        uint64_t tail
        uint64_t head
    void evpl_ring_tx_init(evpl_ring_tx* t, evpl_ring_hdr* r)
    void evpl_ring_publish(evpl_ring_hdr* r, evpl_ring_tx* t)
    uint64_t evpl_ring_unpublished(evpl_ring_hdr* r, evpl_ring_tx* t)
    int evpl_ring_put(evpl_ring_hdr* r, evpl_ring_tx* t, uint64_t size, uint32_t kind,
                      uint64_t id, const void* data, uint32_t length)
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
DEF PUBLISH_BYTES = 4096    # a batch written outside a loop iteration is published at this size

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


@cython.final
@cython.freelist(64)
cdef class ShardFuture:
    """The reply of another shard's ``on_request``. Completed on this
    shard's loop: ``add_done_callback`` functions run there. Do not block
    on it in a callback (the loop would stop); use callbacks, ``await`` it
    in a coroutine on ``evpl.aio.attach(shard.loop)``, or
    ``shard.loop.run_until(fut.done)`` outside a callback. (Native: made
    and completed by the rings with no Python frame.)"""
    cdef bint _done
    cdef bint _ok
    cdef object _value
    cdef object _callbacks          # None, one callable, or a list of them
    cdef int dst

    def done(self) -> bool:
        return self._done

    def result(self):
        """The reply; raises the error if it failed, or ``EvplError`` if it
        is not done yet."""
        if not self._done:
            raise EvplError("the reply has not arrived yet")
        if not self._ok:
            raise self._value
        return self._value

    def exception(self):
        if not self._done:
            raise EvplError("the reply has not arrived yet")
        return None if self._ok else self._value

    def add_done_callback(self, fn) -> None:
        """Call ``fn(future)`` when done (at once if it is)."""
        if self._done:
            fn(self)
        elif self._callbacks is None:
            self._callbacks = fn
        elif type(self._callbacks) is list:
            self._callbacks.append(fn)
        else:
            self._callbacks = [self._callbacks, fn]

    def __await__(self):
        """``await fut`` in a coroutine: the reply, or the error raised.
        Run the coroutines on the shard's own thread with
        ``evpl.aio.attach(shard.loop)``; from another thread's asyncio loop
        it works too (the reply crosses with ``call_soon_threadsafe``)."""
        if not self._done:
            loop = _asyncio.get_running_loop()
            waiter = loop.create_future()
            self.add_done_callback(_Arrived(loop, waiter))
            yield from waiter.__await__()
        return self.result()

    cdef void finish(self, bint ok, value):
        cdef object cbs
        if self._done:
            return
        self._done = True
        self._ok = ok
        self._value = value
        cbs = self._callbacks
        if cbs is None:
            return
        self._callbacks = None
        if type(cbs) is list:
            for fn in <list>cbs:
                _run_callback(fn, self)
        else:
            _run_callback(cbs, self)


cdef inline void _run_callback(fn, ShardFuture fut):
    try:
        fn(fut)
    except Exception:
        _log.exception("a ShardFuture callback raised")


@cython.final
cdef class _Arrived:
    """Wakes an asyncio waiter when a ShardFuture is done: at once on the
    waiter's own thread, through call_soon_threadsafe from another."""
    cdef object loop
    cdef object waiter
    cdef object thread

    def __init__(self, loop, waiter):
        self.loop = loop
        self.waiter = waiter
        self.thread = _threading.get_ident()

    def __call__(self, fut):
        if _threading.get_ident() == self.thread:
            _wake(self.waiter)
        else:
            self.loop.call_soon_threadsafe(_wake, self.waiter)


def _wake(waiter) -> None:
    if not waiter.done():           # (a cancelled await leaves it done)
        waiter.set_result(None)


cdef bytes _describe(exc):
    return f"{type(exc).__name__}: {exc}".encode()


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
    """One shard's end of the rings: ``send_to`` / ``submit_to`` into shard
    k's ring, incoming records dispatched to the user's handlers
    ``on_message(src, payload)`` (or ``on_messages(src, batch)``) and
    ``on_request(src, payload)``, replies to the ``ShardFuture`` in
    ``pending``, all without a Python frame of evpl's. The Shard handles
    the rare paths: ``on_backlog(dst, kind, rid, payload, request)`` (a full
    ring or a shard that is gone), ``on_result(src, rid, pickled, result)``
    (a reply that is not bytes: a Future, a pickled value, another buffer),
    ``on_change()`` (a shard came or went) and ``on_room_cb()``."""
    cdef RingSet rs
    cdef rx_ctx ctx
    cdef evpl_ring_hdr* tx[MAX_SHARDS]
    cdef evpl_ring_tx txs[MAX_SHARDS]   # our private tail and cached head, per ring
    cdef uint64_t publish_bytes         # publish a batch early once it is this large
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
    cdef public object on_change
    cdef public object on_backlog
    cdef public object on_result
    cdef readonly dict pending          # request id -> ShardFuture
    cdef uint64_t rid
    cdef size_t stat_sent, stat_received, stat_full, stat_wakeups, stat_batches

    cdef int _setup(self, LoopCore loop, RingSet rs, int me, list efds) except -1:
        cdef epoll_event ev
        cdef int i
        if len(efds) != rs.n:
            raise ValueError("one eventfd per shard")
        self.loop = loop
        self.rs = rs
        self.me = me
        self.pending = {}
        self.name = "shards"
        self.size = rs.ring_bytes
        self.max_payload = <uint32_t>(rs.ring_bytes // 4)
        self.publish_bytes = min(<uint64_t>rs.ring_bytes // 8, <uint64_t>PUBLISH_BYTES)
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
                evpl_ring_tx_init(&self.txs[i], self.tx[i])
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

    cdef int _put(self, int dst, uint32_t kind, uint64_t rid, payload) except -1:
        """Copy one record into shard ``dst``'s ring; 0 if the ring is full
        (the receiver is asked to say when it has made room)."""
        cdef Py_buffer view
        cdef int ok
        if type(payload) is bytes:
            return self._put_raw(dst, kind, rid, PyBytes_AS_STRING(payload),
                                 PyBytes_GET_SIZE(payload))
        PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
        try:
            ok = self._put_raw(dst, kind, rid, <const char*>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)
        return ok

    cdef int _put_raw(self, int dst, uint32_t kind, uint64_t rid, const char* buf,
                      Py_ssize_t n) except -1:
        cdef evpl_ring_hdr* r = self.tx[dst]
        cdef evpl_ring_tx* t = &self.txs[dst]
        if <size_t>n > self.max_payload:
            raise ValueError(f"payload of {n} bytes is larger than a quarter of "
                             f"the ring ({self.max_payload} bytes; see ring_bytes)")
        if not evpl_ring_put(r, t, self.size, kind, rid, buf, <uint32_t>n):
            self._want_room(dst)
            if not evpl_ring_put(r, t, self.size, kind, rid, buf, <uint32_t>n):
                self.stat_full += 1
                if not self.dirty[dst]:
                    self._mark(dst)      # the receiver must see what is there
                return 0
        self.stat_sent += 1
        if not self.dirty[dst]:
            self._mark(dst)
        elif evpl_ring_unpublished(r, t) >= self.publish_bytes:
            evpl_ring_publish(r, t)     # a long batch: let the receiver start on it
        return 1

    cdef void _want_room(self, int dst) noexcept:
        """The ring to ``dst`` looks full: publish what we wrote and ask the
        receiver to tell us when it has made room (the caller then looks
        once more: it may have made room in between)."""
        cdef evpl_ring_hdr* r = self.tx[dst]
        evpl_ring_publish(r, &self.txs[dst])
        evpl_store(&r.want_room, 1)
        evpl_fence()

    def send(self, int dst, int kind, uint64_t rid, payload) -> bool:
        """Copy one record into shard ``dst``'s ring and publish it at once;
        False if the ring is full (the caller keeps it; the driver's
        ``on_room_cb`` follows)."""
        self._check(dst)
        if not self._put(dst, kind, rid, payload):
            return False
        evpl_ring_publish(self.tx[dst], &self.txs[dst])
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

    cdef object _outgoing(self, int dst, payload, bint pickle, uint32_t* kind):
        """Check ``dst`` for a send, and pickle ``payload`` if asked (marked
        in ``kind``): what goes into the ring."""
        if <unsigned>dst >= <unsigned>self.ctx.n or dst == self.me:
            self._check(dst)
        if self.down[dst]:
            raise ShardError(f"shard {dst} is gone")
        if pickle:
            kind[0] |= KM_PICKLED
            return _pickle.dumps(payload, protocol=_pickle.HIGHEST_PROTOCOL)
        return payload

    def send_to(self, int dst, payload, *, bint pickle=False) -> None:
        """``Shard.send_to``: one message to shard ``dst``, or ``Busy`` if
        its ring is full (or requests to it wait for room: order is kept),
        ``ShardError`` if it is gone."""
        cdef uint32_t kind = KM_MESSAGE
        payload = self._outgoing(dst, payload, pickle, &kind)
        if self.backlogged[dst] or not self._put(dst, kind, 0, payload):
            raise Busy(f"the ring to shard {dst} is full")

    def submit_to(self, int dst, payload, *, bint pickle=False) -> ShardFuture:
        """``Shard.submit_to``: a request to shard ``dst``; the ShardFuture
        gets the reply of its ``on_request``. A full ring (or requests
        already waiting for room) goes to ``on_backlog``, which keeps the
        request or raises ``Busy``; ``ShardError`` if ``dst`` is gone."""
        cdef uint32_t kind = KM_REQUEST
        cdef ShardFuture fut
        cdef uint64_t rid
        payload = self._outgoing(dst, payload, pickle, &kind)
        self.rid += 1
        rid = self.rid
        if self.backlogged[dst] or not self._put(dst, kind, rid, payload):
            self.on_backlog(dst, kind, rid, payload, True)
        fut = ShardFuture.__new__(ShardFuture)
        fut.dst = dst
        self.pending[rid] = fut
        return fut

    def fail_pending(self, int k, error) -> None:
        """Fail every pending request to shard ``k`` with ``error``."""
        cdef ShardFuture fut
        for rid, f in list(self.pending.items()):
            fut = <ShardFuture>f
            if fut.dst == k:
                del self.pending[rid]
                fut.finish(False, error)

    cdef int _reply(self, int src, uint32_t kind, uint64_t rid, payload) except -1:
        """Send a reply, published at once: a reply that ``on_request``
        returned reaches the requester even if this shard dies right after."""
        if self.down[src] or self.backlogged[src] or not self._put(src, kind, rid, payload):
            self.on_backlog(src, kind, rid, payload, False)
        else:
            evpl_ring_publish(self.tx[src], &self.txs[src])
        return 0

    cdef int _request(self, int src, uint64_t rid, bytes data, bint pickled) except -1:
        """Run ``on_request`` and send its reply: bytes (or None) at once,
        anything else through the Shard's ``on_result``."""
        h = self.on_request
        try:
            if h is None:
                raise ShardError(f"shard {self.me} has no on_request handler")
            result = h(src, _pickle.loads(data) if pickled else data)
        except Exception as exc:
            self._reply(src, KM_ERROR, rid, _describe(exc))
            return 0
        if not pickled:
            if result is None:
                result = b""
            if type(result) is bytes:
                self._reply(src, KM_REPLY, rid, result)
                return 0
        self.on_result(src, rid, pickled, result)
        return 0

    def send_many(self, int dst, int kind, payloads, Py_ssize_t start=0) -> int:
        """Copy ``payloads[start:]`` into shard ``dst``'s ring, one record
        each, until it is full; returns how many were written."""
        cdef Py_ssize_t i, n
        cdef list items = payloads if type(payloads) is list else list(payloads)
        self._check(dst)
        n = len(items)
        i = start
        try:
            while i < n and self._put(dst, kind, 0, items[i]):
                i += 1
        finally:
            if i > start:
                evpl_ring_publish(self.tx[dst], &self.txs[dst])    # the batch, at once
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
                    evpl_ring_publish(self.tx[i], &self.txs[i])
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
        cdef object on_message = self.on_message
        cdef object fut
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
                            if on_message is None:
                                raise ShardError(f"shard {self.me} got a message from shard {i} "
                                                 "but has no on_message handler")
                            on_message(i, _pickle.loads(data) if kind & KM_PICKLED else data)
                        continue
                    if batch:           # keep the order of messages and requests
                        on_messages(i, batch)
                        batch = None
                    if kind & 0xff == KM_REQUEST:
                        self._request(i, h.id, data, kind & KM_PICKLED)
                    elif kind & 0xff == KM_REPLY or kind & 0xff == KM_ERROR:
                        fut = self.pending.pop(h.id, None)
                        if fut is None:
                            continue    # failed already (the shard was reported gone)
                        if kind & 0xff == KM_REPLY:
                            (<ShardFuture>fut).finish(
                                True, _pickle.loads(data) if kind & KM_PICKLED else data)
                        else:
                            (<ShardFuture>fut).finish(False, ShardError(
                                f"shard {i} failed the request: "
                                f"{data.decode(errors='replace')}"))
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
        self._submit()              # what was written since the last iteration
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
