# cython: language_level=3, boundscheck=False, wraparound=False
"""Cross-thread calls into a loop: a native multi-producer queue (evpl_mpsc.h)
polled by the loop as a Driver.

Any thread pushes a call with one compare-and-swap; the loop takes every
queued call with one exchange, once per iteration (and whenever it spins),
and runs them in push order. The loop's eventfd is written only when the
loop may be sleeping, and then once per batch: the first producer after the
loop last read it rings, the others see the ring pending and skip the
system call. A polling loop costs producers no system call at all.

The queue is bounded (``capacity``): a push beyond it raises ``evpl.Busy``.

``call_wait`` is the synchronous form, built so that no hand-off of the GIL
ever finds the other thread already waiting for it (CPython then wakes it
with a futex, which costs a cross-core wake-up): the caller releases the GIL
*before* it pushes, so the loop takes a free GIL; the loop publishes the
result only after it has released the GIL again (``_released``, called by
the loop without the GIL), while the caller spins on it without the GIL (a
bounded spin, then a futex sleep), so the caller too takes a free GIL.
"""

cimport cython
from cpython.exc cimport PyErr_CheckSignals
from cpython.ref cimport PyObject, Py_INCREF, Py_XDECREF
from libc.stdint cimport int64_t, uint64_t, uint32_t
from libc.stdlib cimport malloc, free
from libc.errno cimport errno
from posix.unistd cimport close as c_close, read as c_read, write as c_write

from evpl._native.loop cimport Driver, LoopCore
from evpl._native.sys cimport (epoll_event, epoll_ctl, EPOLL_CTL_ADD, EPOLL_CTL_DEL, EPOLLIN,
                               eventfd, EFD_NONBLOCK, EFD_CLOEXEC)

import logging

from evpl.errors import Busy, EvplError

_log = logging.getLogger("evpl")

cdef extern from "Python.h":
    unsigned long PyThread_get_thread_ident()

cdef extern from "evpl_mpsc.h" nogil:
    enum:
        EVPL_W_PENDING
    ctypedef struct evpl_waiter:
        uint32_t state
        int failed
        void* result
        evpl_waiter* next
    ctypedef struct evpl_call:
        evpl_call* next
        void* fn
        void* args
        void* fut
        evpl_waiter* waiter
    ctypedef struct evpl_mpsc:
        pass
    evpl_mpsc* evpl_mpsc_new()
    int evpl_mpsc_reserve(evpl_mpsc* q, int64_t cap)
    void evpl_mpsc_unreserve(evpl_mpsc* q)
    int evpl_mpsc_push(evpl_mpsc* q, evpl_call* c)
    int evpl_mpsc_ready(evpl_mpsc* q)
    evpl_call* evpl_mpsc_take(evpl_mpsc* q, int64_t* n)
    void evpl_mpsc_set_sleeping(evpl_mpsc* q, int v)
    void evpl_mpsc_clear_rung(evpl_mpsc* q)
    int64_t evpl_mpsc_count(evpl_mpsc* q)
    void evpl_mpsc_publish(evpl_mpsc* q)
    void evpl_mpsc_keep(evpl_mpsc* q, evpl_waiter* w)
    void evpl_waiter_complete(evpl_mpsc* q, evpl_waiter* w)
    evpl_waiter* evpl_mpsc_take_abandoned(evpl_mpsc* q)
    int evpl_waiter_wait(evpl_waiter* w, int64_t spin_ns, int64_t sleep_ns)
    int evpl_waiter_abandon(evpl_waiter* w)
    int evpl_waiter_abandoned(evpl_waiter* w)

# a caller of call_wait that sleeps wakes up this often to run signal
# handlers (KeyboardInterrupt) and to notice a queue closed under it
DEF WAIT_SLICE_NS = 100_000_000


cdef int _ready(void* ctx) noexcept nogil:
    return evpl_mpsc_ready(<evpl_mpsc*>ctx)


cdef void _released(void* ctx) noexcept nogil:
    evpl_mpsc_publish(<evpl_mpsc*>ctx)


cdef inline void _drop(evpl_call* c):
    Py_XDECREF(<PyObject*>c.fn)
    Py_XDECREF(<PyObject*>c.args)
    Py_XDECREF(<PyObject*>c.fut)
    free(c)


cdef inline void _discard(evpl_waiter* w):
    Py_XDECREF(<PyObject*>w.result)
    free(w)


cdef object _waiter_result(evpl_waiter* w):
    """The published result of a call_wait (w is freed): returned, or
    raised if it is an exception."""
    cdef object result = <object>w.result
    cdef int failed = w.failed
    _discard(w)
    if failed:
        raise result
    return result


cdef inline void _store(evpl_waiter* w, object result, int failed):
    """The loop's side: the result for a waiter (published separately)."""
    Py_INCREF(result)
    w.result = <void*>result
    w.failed = failed


cdef void _free_abandoned(evpl_mpsc* q):
    cdef evpl_waiter* w = evpl_mpsc_take_abandoned(q)
    cdef evpl_waiter* nxt
    while w != NULL:
        nxt = w.next
        _discard(w)
        w = nxt


@cython.final
@cython.no_gc_clear
cdef class CallQueue(Driver):
    """The queue of calls into one loop (``call_queue(loop)`` makes or finds
    it). ``call_soon`` and ``call`` may be used from any thread."""
    cdef evpl_mpsc* q
    cdef int efd
    cdef readonly int64_t capacity
    cdef bint closed_
    cdef object closed_error
    cdef size_t stat_calls, stat_batches, stat_rings, stat_refused
    cdef readonly object fatal      # a BaseException a call raised (it stopped the loop)
    cdef public int64_t wait_spin_ns    # call_wait spins this long before it sleeps
    cdef unsigned long owner        # the thread that ran the last batch

    def __cinit__(self):
        self.efd = -1
        self.wait_spin_ns = 200_000

    def __dealloc__(self):
        cdef int64_t n
        cdef evpl_call* c
        cdef evpl_call* nxt
        if self.q != NULL:
            c = evpl_mpsc_take(self.q, &n)
            while c != NULL:
                nxt = c.next
                _drop(c)
                c = nxt
            _free_abandoned(self.q)
            free(self.q)
            self.q = NULL
        if self.efd >= 0:
            c_close(self.efd)

    cdef int _setup(self, LoopCore loop, int64_t capacity) except -1:
        cdef epoll_event ev
        self.loop = loop
        self.name = "calls"
        self.capacity = capacity
        self.q = evpl_mpsc_new()
        if self.q == NULL:
            raise MemoryError()
        self.efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if self.efd < 0:
            raise OSError(errno, "eventfd")
        self.fd = self.efd
        ev.events = EPOLLIN
        ev.data.ptr = <void*>self
        if epoll_ctl(loop.epfd, EPOLL_CTL_ADD, self.efd, &ev) < 0:
            raise OSError(errno, "epoll_ctl(call queue eventfd)")
        loop.add_driver(self, _ready, <void*>self.q, _released)
        return 0

    # ---- producers (any thread) -------------------------------------------

    cdef evpl_call* _make(self, fn, tuple args, fut) except NULL:
        """A call node holding references to fn, args and fut (a slot in the
        queue is reserved for it)."""
        cdef evpl_call* c
        if self.closed_:
            raise EvplError("the loop's call queue is closed (the loop has stopped)")
        if not evpl_mpsc_reserve(self.q, self.capacity):
            self.stat_refused += 1
            raise Busy(f"the loop's call queue is full ({self.capacity} calls waiting)")
        c = <evpl_call*>malloc(sizeof(evpl_call))
        if c == NULL:
            evpl_mpsc_unreserve(self.q)
            raise MemoryError()
        Py_INCREF(fn)
        Py_INCREF(args)
        c.fn = <void*>fn
        c.args = <void*>args
        c.waiter = NULL
        if fut is None:
            c.fut = NULL
        else:
            Py_INCREF(fut)
            c.fut = <void*>fut
        return c

    cdef int _ring(self) except -1:
        cdef uint64_t one = 1
        self.stat_rings += 1
        if not self.closed_:
            c_write(self.efd, &one, 8)     # (the GIL is held: close() cannot run meanwhile)
        return 0

    cdef int _push(self, fn, tuple args, fut) except -1:
        cdef evpl_call* c = self._make(fn, args, fut)
        if evpl_mpsc_push(self.q, c):
            self._ring()
        return 0

    def call_soon(self, fn, *args) -> None:
        """Run ``fn(*args)`` on the loop's thread, soon; nothing comes back
        (an exception goes to the loop's exception handler)."""
        self._push(fn, args, None)

    def call_future(self, fut, fn, *args) -> None:
        """Run ``fn(*args)`` on the loop's thread and put its result or
        exception on the ``concurrent.futures.Future`` ``fut``."""
        self._push(fn, args, fut)

    def call_args(self, fn, tuple args) -> None:
        """``call_soon(fn, *args)`` with the arguments as a tuple."""
        self._push(fn, args, None)

    def call_wait(self, fn, *args):
        """Run ``fn(*args)`` on the loop's thread and return its result (or
        raise its exception): ``call_future(...)`` and ``result()`` without a
        Future. The caller waits without the GIL, spinning up to
        ``wait_spin_ns``, then sleeping; it never takes the GIL from the loop
        in the middle of a batch (see the module's docstring)."""
        cdef evpl_call* c
        cdef evpl_waiter* w
        cdef int must_ring, done
        cdef int64_t spin = self.wait_spin_ns
        cdef object result
        if self.owner != 0 and self.owner == PyThread_get_thread_ident():
            raise EvplError("call_wait on the loop's own thread would wait forever")
        w = <evpl_waiter*>malloc(sizeof(evpl_waiter))
        if w == NULL:
            raise MemoryError()
        w.state = EVPL_W_PENDING
        w.failed = 0
        w.result = NULL
        w.next = NULL
        try:
            c = self._make(fn, args, None)
        except BaseException:
            free(w)
            raise
        c.waiter = w
        with nogil:
            # pushed without the GIL: a polling loop that sees it takes a
            # free GIL
            must_ring = evpl_mpsc_push(self.q, c)
            if must_ring:
                with gil:
                    self._ring()
            done = evpl_waiter_wait(w, spin, WAIT_SLICE_NS)
        while not done:
            if self.closed_:
                # closed between our check and our push: fail what is left
                self._fail_queued(EvplError("the loop's call queue is closed"))
            try:
                PyErr_CheckSignals()    # KeyboardInterrupt, in the main thread
            except BaseException:
                if not evpl_waiter_abandon(w):
                    _discard(w)         # published meanwhile (else the loop frees w)
                raise
            with nogil:
                done = evpl_waiter_wait(w, 0, WAIT_SLICE_NS)
        return _waiter_result(w)

    @property
    def pending(self) -> int:
        """Calls queued and not yet taken by the loop."""
        return evpl_mpsc_count(self.q) if self.q != NULL else 0

    @property
    def closed(self) -> bool:
        return self.closed_

    # ---- the loop's side ----------------------------------------------------

    cdef int _run(self) except -1:
        """Run every queued call, oldest first; returns how many."""
        cdef int64_t n
        cdef evpl_call* c
        cdef evpl_call* nxt
        cdef evpl_waiter* w
        cdef object fn, args, fut
        cdef object escaped = None
        if self.q == NULL:
            return 0
        _free_abandoned(self.q)
        if not evpl_mpsc_ready(self.q):
            return 0
        self.owner = PyThread_get_thread_ident()
        c = evpl_mpsc_take(self.q, &n)
        self.stat_batches += 1
        self.stat_calls += n
        while c != NULL:
            nxt = c.next
            fn = <object>c.fn
            args = <object>c.args
            fut = None if c.fut == NULL else <object>c.fut
            w = c.waiter
            _drop(c)
            c = nxt
            if w != NULL:
                if evpl_waiter_abandoned(w):
                    free(w)             # its caller gave up before it ran
                    continue
                try:
                    result = fn(*args)
                except BaseException as exc:
                    _store(w, exc, 1)
                    if not isinstance(exc, Exception):
                        escaped = exc
                else:
                    _store(w, result, 0)
                evpl_mpsc_keep(self.q, w)   # published once the GIL is released
                continue
            if fut is None:
                try:
                    fn(*args)
                except Exception as exc:
                    self.loop._callback_error(exc, None)
                except BaseException as exc:
                    escaped = exc
                continue
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args)
            except BaseException as exc:
                _log.error("a call run on the loop's thread raised", exc_info=exc)
                fut.set_exception(exc)
                if not isinstance(exc, Exception):
                    escaped = exc
            else:
                fut.set_result(result)
        if escaped is not None:
            # KeyboardInterrupt, SystemExit...: the loop stops after the
            # batch, and its owner finds why in ``fatal``
            self.fatal = escaped
            self.loop.stop()
        return <int>n

    cdef void _event(self, uint32_t events):
        cdef uint64_t v
        c_read(self.efd, &v, 8)
        evpl_mpsc_clear_rung(self.q)
        try:
            self._run()
        except Exception as exc:
            self.loop._callback_error(exc, None)

    cdef int _spin_start(self) except -1:
        evpl_mpsc_set_sleeping(self.q, 0)
        return 0

    cdef int _process(self) except -1:
        return self._run()

    cdef int _before_sleep(self) except -1:
        evpl_mpsc_set_sleeping(self.q, 1)
        if evpl_mpsc_ready(self.q):
            self._run()
            return 1
        return 0

    cdef int _after_events(self) except -1:
        # once per iteration, whatever else the loop did
        self._run()
        return 0

    cdef void _close(self):
        self.close(EvplError("the loop was closed before the call ran"))

    cdef int _fail_queued(self, error) except -1:
        """Drop every queued call: Futures and waiting callers get ``error``."""
        cdef int64_t n
        cdef evpl_call* c
        cdef evpl_call* nxt
        cdef evpl_waiter* w
        if self.q == NULL:
            return 0
        c = evpl_mpsc_take(self.q, &n)
        while c != NULL:
            nxt = c.next
            fut = None if c.fut == NULL else <object>c.fut
            w = c.waiter
            _drop(c)
            c = nxt
            if w != NULL:
                _store(w, error, 1)
                evpl_waiter_complete(self.q, w)
            elif fut is not None and fut.set_running_or_notify_cancel():
                fut.set_exception(error)
        _free_abandoned(self.q)
        return 0

    def close(self, error=None) -> None:
        """Refuse further calls; calls still queued are dropped and their
        Futures (and callers of ``call_wait``) fail with ``error``."""
        if self.closed_:
            return
        self.closed_ = True
        if error is None:
            error = EvplError("the loop stopped before the call ran")
        self._fail_queued(error)
        if self.q != NULL:
            evpl_mpsc_publish(self.q)       # results kept and not yet published
            _free_abandoned(self.q)
        if self.efd >= 0:
            if self.loop is not None:
                epoll_ctl(self.loop.epfd, EPOLL_CTL_DEL, self.efd, NULL)
            c_close(self.efd)
            self.efd = -1

    cdef void _stats(self, dict d):
        d["calls"] = self.stat_calls
        d["call_batches"] = self.stat_batches
        d["call_wakeups"] = self.stat_rings
        d["calls_refused"] = self.stat_refused


def call_queue(LoopCore loop, int64_t capacity=1 << 20) -> CallQueue:
    """The loop's CallQueue, made on first use (call it on the loop's thread,
    or before the loop runs). ``capacity`` bounds it (first use only)."""
    cdef CallQueue q = loop.drivers.get("calls")
    if q is None or q.closed_:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        q = CallQueue.__new__(CallQueue)
        q._setup(loop, capacity)
    return q
