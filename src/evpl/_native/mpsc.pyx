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
"""

cimport cython
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

cdef extern from "evpl_mpsc.h" nogil:
    ctypedef struct evpl_call:
        evpl_call* next
        void* fn
        void* args
        void* fut
    ctypedef struct evpl_mpsc:
        pass
    evpl_mpsc* evpl_mpsc_new()
    int evpl_mpsc_reserve(evpl_mpsc* q, int64_t cap)
    int evpl_mpsc_push(evpl_mpsc* q, evpl_call* c)
    int evpl_mpsc_ready(evpl_mpsc* q)
    evpl_call* evpl_mpsc_take(evpl_mpsc* q, int64_t* n)
    void evpl_mpsc_set_sleeping(evpl_mpsc* q, int v)
    void evpl_mpsc_clear_rung(evpl_mpsc* q)
    int64_t evpl_mpsc_count(evpl_mpsc* q)


cdef int _ready(void* ctx) noexcept nogil:
    return evpl_mpsc_ready(<evpl_mpsc*>ctx)


cdef inline void _drop(evpl_call* c):
    Py_XDECREF(<PyObject*>c.fn)
    Py_XDECREF(<PyObject*>c.args)
    Py_XDECREF(<PyObject*>c.fut)
    free(c)


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

    def __cinit__(self):
        self.efd = -1

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
        loop.add_driver(self, _ready, <void*>self.q)
        return 0

    # ---- producers (any thread) -------------------------------------------

    cdef int _push(self, fn, tuple args, fut) except -1:
        cdef evpl_call* c
        cdef uint64_t one = 1
        if self.closed_:
            raise EvplError("the loop's call queue is closed (the loop has stopped)")
        if not evpl_mpsc_reserve(self.q, self.capacity):
            self.stat_refused += 1
            raise Busy(f"the loop's call queue is full ({self.capacity} calls waiting)")
        c = <evpl_call*>malloc(sizeof(evpl_call))
        if c == NULL:
            raise MemoryError()
        Py_INCREF(fn)
        Py_INCREF(args)
        c.fn = <void*>fn
        c.args = <void*>args
        if fut is None:
            c.fut = NULL
        else:
            Py_INCREF(fut)
            c.fut = <void*>fut
        if evpl_mpsc_push(self.q, c):
            self.stat_rings += 1
            c_write(self.efd, &one, 8)     # (the GIL is held: close() cannot run meanwhile)
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
        cdef object fn, args, fut
        cdef object escaped = None
        if self.q == NULL or not evpl_mpsc_ready(self.q):
            return 0
        c = evpl_mpsc_take(self.q, &n)
        self.stat_batches += 1
        self.stat_calls += n
        while c != NULL:
            nxt = c.next
            fn = <object>c.fn
            args = <object>c.args
            fut = None if c.fut == NULL else <object>c.fut
            _drop(c)
            c = nxt
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

    def close(self, error=None) -> None:
        """Refuse further calls; calls still queued are dropped and their
        Futures fail with ``error``."""
        cdef int64_t n
        cdef evpl_call* c
        cdef evpl_call* nxt
        if self.closed_:
            return
        self.closed_ = True
        if error is None:
            error = EvplError("the loop stopped before the call ran")
        if self.q != NULL:
            c = evpl_mpsc_take(self.q, &n)
            while c != NULL:
                nxt = c.next
                fut = None if c.fut == NULL else <object>c.fut
                _drop(c)
                c = nxt
                if fut is not None and fut.set_running_or_notify_cancel():
                    fut.set_exception(error)
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
