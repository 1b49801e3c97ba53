# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The evpl loop core: wait, poll and dispatch; timers, deferrals, doorbells
and fd watches.

One LoopCore belongs to the thread that runs it. The GIL is released only
around waiting and polling; every touch of Python objects or of the buffer
pool happens with the GIL held. ``Doorbell.ring`` and ``LoopCore.stop`` are
the cross-thread entry points (an eventfd plus atomic flags).

The loop sleeps in epoll. Everything it serves is a ``_Source``: Binds and
Listeners of the epoll backends and FdWatches are registered in the epoll set
themselves; a Driver (io_uring, later AF_XDP and shared-memory rings) puts
one notification fd there and, while the loop spins, is asked through a C
function whether it has work, with no system call and without the GIL.

The hybrid wait: while sources keep reporting activity within ``spin_ns``
the loop polls (Drivers' ready checks and a zero-timeout epoll_wait); after
that it re-arms the Drivers' notifications and sleeps until an event, a
doorbell or the next timer, with nanosecond timeouts (epoll_pwait2).
"""

cimport cython
from cpython.exc cimport PyErr_CheckSignals
from cpython.mem cimport PyMem_Malloc, PyMem_Free, PyMem_Realloc
from cpython.ref cimport PyObject, Py_INCREF, Py_DECREF
from libc.errno cimport errno, EAGAIN, EINTR
from libc.stdint cimport int64_t, uint64_t, uint32_t
from libc.string cimport memset
from posix.unistd cimport close as c_close, read as c_read, write as c_write
from posix.uio cimport iovec

from evpl._native.buffers cimport Pool, Chunk, chunk_unref, pool_trim_wanted
from evpl._native.sys cimport *

import logging

DEF TRIM_IDLE_NS = 1_000_000_000    # idle this long: give memory back, once per idle period

cdef enum:
    # deferred work that defers more (a chain of coroutines, an HTTP
    # connection's pipelined requests) runs this many rounds in one
    # iteration; then sends go out and I/O is polled again
    DEFER_ROUNDS = 16
    # while the spin reads its socket directly and nothing else is in the
    # epoll set, epoll_wait runs once in this many rounds
    SPIN_EPOLL_EVERY = 16
    # a direct read that missed this many spins in a row, each ended by
    # epoll reporting other sources (a server with many connections), stops
    # until epoll reports its socket again
    SPIN_MISS_MAX = 4
import os
import signal
import threading

from evpl.errors import EvplError

_log = logging.getLogger("evpl")


cdef class _Source:
    """Base of everything the loop dispatches to; the methods below are the
    overloads a kind of source fills."""

    cdef void _event(self, uint32_t events):
        """Its fd in the epoll set reported ``events``."""
        pass

    cdef void _read(self):
        """A read queued with ``LoopCore._queue_read`` or ``_starve`` is due."""
        pass

    cdef int _flush(self) except -1:
        """End of iteration: send what was queued (see ``LoopCore.dirty``)."""
        return 0

    cdef void _fail(self, error):
        """A callback of this source raised: close it with ``error``."""
        pass

    cdef void _shutdown(self):
        """``LoopCore.close``: release it now."""
        pass

    cdef void _report_closed(self):
        """Deliver the close to the user (queued in ``LoopCore.closing``)."""
        pass

    cdef void _flush_batch(self):
        """Hand over what was collected in this read batch (queued in
        ``LoopCore.batches``)."""
        pass

    cdef unsigned int _spin_prepare(self):
        """The loop is about to spin with this source as its ``spin_src``:
        fill the loop's ``mmsg`` array for one ``recvmmsg`` and return how
        many messages it offers (0: do not read it while spinning)."""
        return 0

    cdef void _spin_deliver(self, int n, unsigned int vlen, int err):
        """The spin's ``recvmmsg`` of the array ``_spin_prepare`` filled
        returned ``n`` (``err``: its errno when ``n < 0``)."""
        pass


cdef class Driver(_Source):
    """Base of the I/O mechanisms a loop polls (see loop.pxd)."""

    cdef int _spin_start(self) except -1:
        """The loop starts spinning: notifications may be turned off."""
        return 0

    cdef int _process(self) except -1:
        """Dispatch every completion that is ready; returns how many."""
        return 0

    cdef int _before_sleep(self) except -1:
        """Re-arm notifications before the loop sleeps; true if work arrived
        meanwhile (the loop must not sleep then)."""
        return 0

    cdef int _submit(self) except -1:
        """End of iteration: hand the work queued in it to the kernel."""
        return 0

    cdef bint _waiting(self):
        """True while it waits for pool buffers to come back (the loop then
        wakes up at least every millisecond to let it retry)."""
        return False

    cdef int _after_events(self) except -1:
        """After dispatch: e.g. refill buffer rings from buffers released."""
        return 0

    cdef void _close(self):
        """``LoopCore.close``: finish in-flight work and release the kernel
        objects."""
        pass

    cdef void _stats(self, dict d):
        """Add its counters to ``LoopCore.stats()``."""
        pass

    cdef void _trim_idle(self):
        """The loop has been idle a while: give back the pages of pool
        memory it holds but has not written (e.g. buffer ring tails)."""
        pass


cdef inline bint _slot_before(TimerSlot* a, TimerSlot* b) noexcept:
    return a.deadline < b.deadline or (a.deadline == b.deadline and a.seq < b.seq)


cdef inline void _sift_down(TimerSlot* h, size_t n, size_t i, TimerSlot slot) noexcept:
    """Put ``slot`` at ``i`` and move it down the n-entry heap to its place."""
    cdef size_t c
    while True:
        c = 2 * i + 1
        if c >= n:
            break
        if c + 1 < n and _slot_before(&h[c + 1], &h[c]):
            c += 1
        if not _slot_before(&h[c], &slot):
            break
        h[i] = h[c]
        i = c
    h[i] = slot


@cython.final
cdef class Timer:
    """A one-shot or periodic timer; see ``LoopCore.call_later``."""

    def cancel(self) -> None:
        """Stop the timer; a cancelled timer never fires again."""
        if not self.cancelled:
            self.cancelled = True
            if self.period or not self.fired:       # still in the heap
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

    cdef void _shutdown(self):
        self.cancel()

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


@cython.no_gc_clear
cdef class LoopCore:
    """The native event loop. ``evpl.Loop`` adds the Python conveniences.

    Not cleared by the garbage collector (no_gc_clear): its Binds (no_gc_clear
    too) and its own __dealloc__ use ``pool`` and its C state until the very
    end; cycles through a loop are broken at its lists, sets and handlers.
    """

    def __cinit__(self):
        self.epfd = -1
        self.wakefd = -1
        self.sigfd_r = -1
        self.sigfd_w = -1

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
        self.doorbells = []
        self.sources = set()
        self.drivers = {}
        self.drv_list = []
        self.zc_threshold = 0
        self.base_on_sent = base_handler.on_sent if base_handler is not None else None
        self.base_handler = base_handler
        self.batches = []
        self.events = <epoll_event*>PyMem_Malloc(MAX_EVENTS * sizeof(epoll_event))
        self.iov = <iovec*>PyMem_Malloc(MAX_IOV * sizeof(iovec))
        self.mmsg = <mmsghdr*>PyMem_Malloc(MAX_MMSG * sizeof(mmsghdr))
        self.names = <sockaddr_in6*>PyMem_Malloc(MAX_MMSG * sizeof(sockaddr_in6))
        self.tx_iov = <iovec*>PyMem_Malloc(MAX_IOV * sizeof(iovec))
        self.tx_mmsg = <mmsghdr*>PyMem_Malloc(MAX_MMSG * sizeof(mmsghdr))
        if not self.events or not self.iov or not self.mmsg or not self.names or \
                not self.tx_iov or not self.tx_mmsg:
            raise MemoryError()
        memset(self.mmsg, 0, MAX_MMSG * sizeof(mmsghdr))
        memset(self.tx_mmsg, 0, MAX_MMSG * sizeof(mmsghdr))
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
        # signals: while a loop runs on the main thread, Python's C handler
        # writes a byte here (signal.set_wakeup_fd), so a signal that lands
        # while the loop spins or is about to sleep still wakes it
        self.sigfd_r, self.sigfd_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        ev.data.ptr = <void*>1
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, self.sigfd_r, &ev) < 0:
            raise OSError(errno, "epoll_ctl(signal pipe)")
        self.last_active = evpl_now_ns()

    def __dealloc__(self):
        # Drivers release their kernel objects when they are freed
        if self.rx_chunk != NULL and self.pool is not None:
            chunk_unref(self.pool, self.rx_chunk)
            self.rx_chunk = NULL
        if self.epfd >= 0:
            c_close(self.epfd)
        if self.wakefd >= 0:
            c_close(self.wakefd)
        if self.sigfd_r >= 0:
            c_close(self.sigfd_r)
            c_close(self.sigfd_w)
        PyMem_Free(self.events)
        PyMem_Free(self.iov)
        while self.tcount:
            self.tcount -= 1
            Py_DECREF(<object>self.theap[self.tcount].timer)
        PyMem_Free(self.theap)
        PyMem_Free(self.mmsg)
        PyMem_Free(self.names)
        PyMem_Free(self.tx_iov)
        PyMem_Free(self.tx_mmsg)

    # ---- configuration ---------------------------------------------------

    @property
    def io_uring_setup(self):
        """How this loop's ring was set up (``"defer_taskrun"``,
        ``"coop_taskrun"``, ``"plain"`` or ``"sqpoll"``); None before an
        io_uring backend first used it."""
        d = self.drivers.get("io_uring")
        return None if d is None else d.setup_mode

    @property
    def spin_ns(self) -> int:
        return self.spin_ns

    @spin_ns.setter
    def spin_ns(self, int64_t value):
        if value < 0:
            raise ValueError("spin_ns must be >= 0")
        self.spin_ns = value

    def keep_polling(self, int64_t ns) -> None:
        """Expect traffic within ``ns`` nanoseconds from now: a hybrid loop
        keeps polling until then even if that is longer than ``spin_ns``
        since the last activity (no effect with ``spin_ns=0`` or
        ``poll_mode="event"``; ``poll_mode="always"`` polls anyway). For a
        protocol that knows its peer is about to answer: a transfer whose
        next packets the peer sends as it takes the last ones, where a
        sleep would cost a wake-up per gap."""
        loop_poll_until(self, evpl_now_ns() + ns)

    @property
    def poll_always(self) -> bool:
        return self.poll_always

    @poll_always.setter
    def poll_always(self, bint value):
        self.poll_always = value

    @property
    def running(self) -> bool:
        return self.running

    # ---- drivers and sources ------------------------------------------------

    cdef int add_driver(self, Driver d, ready_fn ready, void* ctx,
                        released_fn released=NULL) except -1:
        """Attach a Driver: ``ready(ctx)`` is polled without the GIL while the
        loop spins, ``released(ctx)`` (if given) runs without the GIL each
        time the loop has released it to spin or sleep; ``d`` is found again
        as ``self.drivers[d.name]``."""
        if self.ndrv == MAX_DRIVERS:
            raise EvplError("too many drivers on one loop")
        self.drv_ready[self.ndrv] = ready
        self.drv_ctx[self.ndrv] = ctx
        self.drv_released[self.ndrv] = released
        self.ndrv += 1
        self.drv_list.append(d)
        self.drivers[d.name] = d
        return 0

    cdef int _ep_add(self, _Source src, int fd, uint32_t events) except -1:
        """Register a source in the epoll set, counted in n_epoll (the spin
        skips epoll_wait while nothing but Drivers and doorbells can have
        work)."""
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
        if self.rx_chunk != NULL and self.rx_chunk.refs == 1:
            # nothing received into it is alive any more (no Buffer, no
            # partial message): start again at its beginning, so a stream
            # whose reads are consumed at once keeps landing in the same,
            # cache-hot bytes instead of walking through cold buffers
            self.rx_used = 0
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

    cdef void _starve(self, _Source b):
        """``b`` could not get pool memory: read again when buffers return."""
        self.stat_starved += 1
        if b not in self.starved:
            self.starved.append(b)

    cdef void _queue_read(self, _Source b):
        if not b.rx_queued:
            b.rx_queued = True
            self.pending_read.append(b)

    def watch_fd(self, int fd, on_readable=None, on_writable=None) -> FdWatch:
        """Call ``on_readable()`` / ``on_writable()`` (level-triggered) while
        the foreign descriptor ``fd`` is ready. The fd stays the caller's."""
        cdef FdWatch w = FdWatch.__new__(FdWatch)
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
        return self._timer_at(evpl_now_ns() + delay_ns, period_ns, fn, args)

    cdef Timer _timer_at(self, int64_t deadline, int64_t period_ns, fn, tuple args):
        cdef Timer t = Timer.__new__(Timer)
        if not callable(fn):
            raise TypeError("timer callback must be callable")
        t.loop = self
        t.deadline = deadline
        t.period = period_ns
        t.fn = fn
        t.args = args
        self._theap_push(t)
        return t

    cdef int _theap_push(self, Timer t) except -1:
        cdef TimerSlot slot
        cdef TimerSlot* h
        cdef size_t i, parent, cap
        if self.tcount == self.tcap:
            cap = self.tcap * 2 if self.tcap else 64
            h = <TimerSlot*>PyMem_Realloc(self.theap, cap * sizeof(TimerSlot))
            if h == NULL:
                raise MemoryError()
            self.theap = h
            self.tcap = cap
        self.timer_seq += 1
        slot.deadline = t.deadline
        slot.seq = self.timer_seq
        slot.timer = <PyObject*>t
        Py_INCREF(t)
        h = self.theap
        i = self.tcount
        self.tcount += 1
        while i > 0:
            parent = (i - 1) >> 1
            if not _slot_before(&slot, &h[parent]):
                break
            h[i] = h[parent]
            i = parent
        h[i] = slot
        return 0

    cdef Timer _theap_pop(self):
        """Take the first timer off the heap (the heap's reference is
        handed to the caller)."""
        cdef TimerSlot* h = self.theap
        cdef Timer t = <Timer>h[0].timer
        Py_DECREF(t)
        self.tcount -= 1
        if self.tcount:
            _sift_down(h, self.tcount, 0, h[self.tcount])
        return t

    cdef void _theap_compact(self) noexcept:
        """Drop the cancelled timers and rebuild the heap."""
        cdef TimerSlot* h = self.theap
        cdef size_t i, n = 0
        for i in range(self.tcount):
            if (<Timer>h[i].timer).cancelled:
                Py_DECREF(<object>h[i].timer)
            else:
                h[n] = h[i]
                n += 1
        self.tcount = n
        if n > 1:
            i = n // 2
            while i > 0:
                i -= 1
                _sift_down(h, n, i, h[i])
        self.timers_cancelled = 0

    def call_later(self, double delay, fn, *args) -> Timer:
        """Run ``fn(*args)`` once, ``delay`` seconds from now (never early)."""
        if delay < 0:
            delay = 0
        return self._timer(<int64_t>(delay * 1e9), 0, fn, args)

    def call_at(self, double when, fn, *args) -> Timer:
        """Run ``fn(*args)`` once at time ``when``, in seconds on the
        monotonic clock (``time.monotonic()``'s, which the loop's timers
        use). Timers given the same ``when`` fire together, as asyncio's
        ``call_at`` promises; ``call_later`` measures from each call's own
        now."""
        cdef double ns = when * 1e9
        cdef int64_t deadline
        if ns > 4e18:                   # (far future, or inf: never, in practice)
            deadline = <int64_t>4e18
        elif ns > 0:
            deadline = <int64_t>ns
        else:
            deadline = 0                # (the past, or NaN: now)
        return self._timer_at(deadline, 0, fn, args)

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

    def _callback_error(self, exc, source):
        """A user callback raised: report it and close the Bind it came from."""
        self.stat_callback_errors += 1
        handler = self.exception_handler
        if handler is not None:
            try:
                handler(self, exc, source)
            except Exception:
                _log.exception("evpl exception_handler raised")
        else:
            _log.error("unhandled exception in an evpl callback (bind %r)", source, exc_info=exc)
        if source is not None:
            (<_Source>source)._fail(exc if isinstance(exc, EvplError) else
                                    EvplError(f"callback raised {exc!r}"))

    # ---- the iteration ----------------------------------------------------

    cdef int64_t _wait_budget(self, int64_t max_wait) except? -2:
        cdef int64_t wait = max_wait, t
        cdef Timer timer
        cdef Driver d
        if (self.deferred or self.pending_read or self.closing or self.dirty
                or evpl_load(&self.stop_flag)):
            return 0
        while self.tcount:
            timer = <Timer>self.theap[0].timer
            if timer.cancelled:
                self._theap_pop()
                self.timers_cancelled -= 1
                continue
            t = timer.deadline - evpl_now_ns()
            if t < 0:
                t = 0
            if wait < 0 or t < wait:
                wait = t
            break
        if self.trim_mark != self.last_active:
            # wake up once when the loop has been idle for TRIM_IDLE_NS
            t = self.last_active + TRIM_IDLE_NS - evpl_now_ns()
            if t < 0:
                t = 0
            if wait < 0 or t < wait:
                wait = t
        if wait < 0 or wait > 1_000_000:
            waiting = bool(self.starved)
            for d in self.drv_list:
                waiting = waiting or d._waiting()
            if waiting:
                wait = 1_000_000
        return wait

    cdef void _trim_idle(self):
        """Idle for TRIM_IDLE_NS: return the pool's idle pages beyond its
        ``keep_bytes`` and the Drivers' unwritten ring memory, once."""
        cdef Driver d
        self.trim_mark = self.last_active
        self.stat_idle_trims += 1
        if pool_trim_wanted(self.pool):
            self.pool.trim_idle(self.pool.keep_bytes)
        for d in self.drv_list:
            d._trim_idle()

    cdef int _drivers_process(self) except -1:
        cdef Driver d
        cdef int n = 0
        for d in self.drv_list:
            n += d._process()
        return n

    cdef int _drivers_before_sleep(self) except -1:
        """Re-arm every Driver's notification; true if one found work."""
        cdef Driver d
        cdef int hit = 0
        for d in self.drv_list:
            if d._before_sleep():
                hit = 1
        if hit:
            self.last_active = evpl_now_ns()
        return hit

    cdef void _released(self) noexcept nogil:
        cdef int k
        for k in range(self.ndrv):
            if self.drv_released[k] != NULL:
                self.drv_released[k](self.drv_ctx[k])

    cdef int _iterate(self, int64_t max_wait) except -1:
        cdef int64_t wait, now, spin_end
        cdef int n, i, k
        cdef bint poll
        cdef bint drv_hit = False
        cdef int ndrv = self.ndrv
        cdef Driver d
        cdef _Source src
        cdef unsigned int spin_vlen = 0
        cdef int spin_fd = -1, spin_n = -1, spin_err = 0, ep_every = 1
        cdef bint spin_hit = False
        for d in self.drv_list:
            d._submit()             # work queued outside an iteration (listen, connect...)
        wait = self._wait_budget(max_wait)
        now = evpl_now_ns()
        poll = self.poll_always or (self.spin_ns > 0 and (now - self.last_active < self.spin_ns
                                                          or now < self.poll_until))
        if wait != 0 and poll:
            # hybrid: spin without the GIL, then sleep for what is left
            if self.poll_always:
                spin_end = now + 20_000_000
            else:
                spin_end = self.last_active + self.spin_ns
                if spin_end < self.poll_until:
                    spin_end = self.poll_until
            if wait > 0 and now + wait < spin_end:
                spin_end = now + wait
            for d in self.drv_list:
                d._spin_start()
            n = 0
            # the socket that received last is read directly while
            # spinning: a datagram or stream data found costs one recvmmsg,
            # not an epoll_wait that reports it and then the read.
            # epoll_wait still runs each round while other epoll sources
            # exist, else every SPIN_EPOLL_EVERY rounds (signals, the
            # source's errors)
            src = self.spin_src
            if src is not None and self.spin_miss < SPIN_MISS_MAX:
                spin_vlen = src._spin_prepare()
                spin_fd = src.fd
                if spin_vlen and self.n_epoll <= 1:
                    ep_every = SPIN_EPOLL_EVERY
            with nogil:
                self._released()
                while True:
                    self.stat_polls += 1
                    # Drivers' completions, without their notification round trip
                    for k in range(ndrv):
                        if self.drv_ready[k](self.drv_ctx[k]):
                            drv_hit = True
                    if drv_hit:
                        break
                    if spin_vlen:
                        self.stat_spin_reads += 1
                        spin_n = recvmmsg(spin_fd, self.mmsg, spin_vlen, MSG_DONTWAIT, NULL)
                        if spin_n >= 0 or errno != EAGAIN:
                            spin_err = errno
                            spin_hit = True
                            break
                    # epoll only when something can be there: a doorbell /
                    # stop() (the wake flag says), or an epoll source (in
                    # the rounds ep_every picks)
                    if evpl_load(&self.wake_pending) or (
                            (ndrv == 0 or self.n_epoll > 0)
                            and self.stat_polls % ep_every == 0):
                        n = evpl_epoll_wait_ns(self.epfd, self.events, MAX_EVENTS, 0)
                        if n != 0:
                            break
                    now = evpl_now_ns()
                    if now >= spin_end:
                        break
            if drv_hit:
                self.last_active = evpl_now_ns()
                self._drivers_process()
            elif spin_hit:
                self.last_active = evpl_now_ns()
                self.stat_spin_hits += 1
                self.spin_miss = 0
                src._spin_deliver(spin_n, spin_vlen, spin_err)
            elif n > 0 and src is not None:
                # epoll ended the spin: a direct read that was not (or
                # would not have been) the one to find it counts a miss
                k = 0
                for i in range(n):
                    if self.events[i].data.ptr == <void*>src:
                        k = 1
                self.spin_miss = 0 if k else self.spin_miss + 1
            elif n == 0 and not self.poll_always:
                wait = self._wait_budget(max_wait)
                if wait != 0 and not self._drivers_before_sleep():
                    self.stat_sleeps += 1
                    with nogil:
                        self._released()
                        n = evpl_epoll_wait_ns(self.epfd, self.events, MAX_EVENTS, wait)
        else:
            if wait != 0 and self._drivers_before_sleep():
                wait = 0
            if wait != 0:
                self.stat_sleeps += 1
            with nogil:
                self._released()
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
            elif self.events[i].data.ptr == <void*>1:
                while c_read(self.sigfd_r, self.sigbuf, sizeof(self.sigbuf)) > 0:
                    pass
                PyErr_CheckSignals()        # runs the handlers; raises what they raise
            else:
                (<_Source>self.events[i].data.ptr)._event(self.events[i].events)
        if (n == 0 and self.trim_mark != self.last_active
                and evpl_now_ns() - self.last_active >= TRIM_IDLE_NS):
            self._trim_idle()
        self._after_events()
        return 0

    cdef void _after_events(self) except *:
        cdef _Source b
        cdef Driver d
        cdef list batch
        cdef int rounds = 0
        cdef bint sent = False
        if self.batch_one is not None:
            self._flush_batches()
        if self.pending_read:
            batch = self.pending_read
            self.pending_read = []
            for b in batch:
                b.rx_queued = False
                b._read()
            if self.batch_one is not None:
                self._flush_batches()
        for d in self.drv_list:
            d._after_events()
        if self.starved and self.pool.releases != self.starved_mark:
            self.starved_mark = self.pool.releases
            batch = self.starved
            self.starved = []
            for b in batch:
                b._read()
            if self.batch_one is not None:
                self._flush_batches()
        if self.tcount:
            if self.closing:
                # closes this iteration's I/O found are reported before the
                # timers run: a protocol's timer (a retry, a keep-alive) then
                # finds its Bind already handled by on_closed, not closed
                # behind its back and unreported
                self._run_closing()
            self._run_timers()
        while rounds < DEFER_ROUNDS and (self.deferred or self.closing or self.dirty):
            rounds += 1
            if self.deferred:
                self._run_deferred()
                if self.deferred and rounds < DEFER_ROUNDS:
                    # callbacks that schedule more (an HTTP connection's
                    # pipelined requests, one coroutine after the other):
                    # let them settle, then send what they all queued at once
                    continue
            if self.dirty:
                batch = self.dirty
                self.dirty = []
                for b in batch:
                    b._flush()
                sent = True
            if self.closing:
                self._run_closing()
        for d in self.drv_list:
            d._submit()             # this iteration's sends and re-arms, in one call
        if sent or self.dirty or self.closing or self.deferred:
            # sending is traffic too (a peer that was just sent a request
            # answers within the spin window, which starts again here, not
            # only at the last receive); callbacks that keep producing work
            # finish it next iteration
            self.last_active = evpl_now_ns()

    cdef void _add_batch(self, _Source b):
        """``b`` has a read batch to hand over at the end of this read."""
        if self.batch_one is None:
            self.batch_one = b
        else:
            self.batches.append(b)

    cdef void _flush_batches(self) except *:
        cdef _Source b = self.batch_one
        cdef list more
        self.batch_one = None           # (batches made meanwhile: next time)
        b._flush_batch()
        if self.batches:
            more = self.batches
            self.batches = []
            for b in more:
                b._flush_batch()

    cdef void _run_timers(self) except *:
        cdef int64_t now = evpl_now_ns()
        cdef Timer t
        cdef int fired = 0
        while self.tcount and fired < 1024:
            if self.theap[0].deadline > now:
                break
            t = self._theap_pop()
            if t.cancelled:
                self.timers_cancelled -= 1
                continue
            fired += 1
            self.stat_timers_fired += 1
            t.fired = True
            if t.period:
                t.deadline += t.period
                if t.deadline <= now:        # fell behind: skip missed periods
                    t.deadline = now + t.period - (now - t.deadline) % t.period
                self._theap_push(t)
            try:
                t.fn(*t.args)
            except Exception as exc:
                self._callback_error(exc, None)
        if self.timers_cancelled > 64 and self.timers_cancelled * 2 > self.tcount:
            self._theap_compact()

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
        cdef _Source b
        self.closing = []
        for b in batch:
            self.sources.discard(b)
            b._report_closed()

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

    cdef object _enter(self, bint may_sleep):
        """Mark the loop running; on the main thread, route signal wake-ups
        to this loop's pipe if it may sleep (a wait of 0 cannot miss one,
        and setting the wake-up fd costs system calls). Returns what
        ``_leave`` restores."""
        if self.running:
            raise EvplError("the loop is already running")
        self.running = True
        if may_sleep and threading.current_thread() is threading.main_thread():
            try:
                return signal.set_wakeup_fd(self.sigfd_w, warn_on_full_buffer=False)
            except ValueError:
                pass
        return None

    cdef void _leave(self, old_wakeup) except *:
        self.running = False
        if old_wakeup is not None:
            signal.set_wakeup_fd(old_wakeup)

    def run(self) -> None:
        """Run iterations until ``stop()``."""
        old = self._enter(True)
        evpl_store(&self.stop_flag, 0)
        try:
            while not evpl_load(&self.stop_flag):
                self._iterate(-1)
        finally:
            self._leave(old)
            evpl_store(&self.stop_flag, 0)

    def flush(self) -> None:
        """Send what is queued now (every Bind with sends pending) without
        polling for events or running timers: for a caller that must not
        deliver more I/O but must not sit on output either (an asyncio loop
        that was told to stop)."""
        cdef _Source b
        cdef Driver d
        cdef list batch
        cdef int rounds = 0
        while self.dirty and rounds < 8:
            rounds += 1
            batch = self.dirty
            self.dirty = []
            for b in batch:
                b._flush()
        for d in self.drv_list:
            d._submit()

    def run_once(self, timeout=None) -> None:
        """Run one iteration, waiting at most ``timeout`` seconds for events
        (None: until something happens)."""
        old = self._enter(timeout is None or timeout > 0)
        try:
            self._iterate(-1 if timeout is None else <int64_t>(max(timeout, 0) * 1e9))
        finally:
            self._leave(old)

    def enter(self):
        """Mark the loop running for a caller that runs iterations itself
        with :meth:`iterate` (evpl.aio's ``run_forever``): the signal
        wake-up routing is set once here, not per iteration. Returns the
        token :meth:`leave` takes."""
        return self._enter(True)

    def leave(self, token) -> None:
        """End what :meth:`enter` began."""
        self._leave(token)

    def iterate(self, timeout=None) -> None:
        """One iteration between :meth:`enter` and :meth:`leave`, waiting at
        most ``timeout`` seconds for events (None: until something happens)."""
        if not self.running:
            raise EvplError("iterate() runs only between enter() and leave()")
        self._iterate(-1 if timeout is None else <int64_t>(max(timeout, 0) * 1e9))

    def run_until(self, predicate, timeout=None) -> None:
        """Run iterations until ``predicate()`` is true. Raises
        ``evpl.errors.TimeoutError`` after ``timeout`` seconds."""
        cdef int64_t deadline = -1, left
        if timeout is not None:
            deadline = evpl_now_ns() + <int64_t>(timeout * 1e9)
        old = self._enter(True)
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
            self._leave(old)
            evpl_store(&self.stop_flag, 0)

    def close(self) -> None:
        """Close every Bind, Listener and watch of this loop and deliver the
        ``on_closed`` callbacks."""
        cdef _Source src
        cdef Driver d
        for src in list(self.sources):
            src._shutdown()
        for db in list(self.doorbells):
            db.close()
        while self.tcount:
            self._theap_pop().cancelled = True
        self.timers_cancelled = 0
        self._run_closing()
        self.deferred = []
        self.pending_read = []
        self.starved = []
        self.batch_one = None
        self.batches = []
        self.spin_src = None
        for d in self.drv_list:
            d._close()
        self.ndrv = 0               # a later Bind makes a new one
        self.drv_list = []
        self.drivers = {}
        if self.rx_chunk != NULL:
            chunk_unref(self.pool, self.rx_chunk)
            self.rx_chunk = NULL

    def stats(self) -> dict:
        """Loop counters (iterations, sleeps, bytes, messages, errors...)."""
        cdef Driver d
        s = {
            "iterations": self.stat_iterations,
            "sleeps": self.stat_sleeps,
            "polls": self.stat_polls,
            "spin_reads": self.stat_spin_reads,
            "spin_hits": self.stat_spin_hits,
            "events": self.stat_events,
            "bytes_in": self.stat_bytes_in,
            "bytes_out": self.stat_bytes_out,
            "messages_in": self.stat_messages_in,
            "receive_calls": self.stat_py_calls,
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
            "timeouts": self.stat_timeouts,
            "idle_trims": self.stat_idle_trims,
            "zc_sends": self.stat_zc_sends,
            "gso_sends": self.stat_gso_sends,
            "gso_refused": self.stat_gso_refused,
            "gro_receives": self.stat_gro_receives,
            "placed": self.stat_placed,
            "completions": 0,
            "ring_buffers": 0,
            "ring_rearm": 0,
            "starved_binds": len(self.starved),
            "sources": len(self.sources),
        }
        for d in self.drv_list:
            d._stats(s)
        return s


# ---- the garbage collector sees the timer heap --------------------------
#
# The heap holds its Timers in a C array, where the cyclic garbage collector
# does not look; a Timer refers back to its loop (and often its callback
# does too: ``loop.call_later(1, loop.stop)``), so a Loop dropped with
# timers pending would never be freed. Cython makes LoopCore's tp_traverse
# for its object fields; these wrap it to visit the heap's Timers as well,
# and give the collector a tp_clear that lets go of them.

cdef extern from "Python.h":
    ctypedef int (*visitproc)(PyObject*, void*)
    ctypedef int (*traverseproc)(PyObject*, visitproc, void*)
    ctypedef int (*inquiry)(PyObject*)
    ctypedef struct PyTypeObject:
        traverseproc tp_traverse
        inquiry tp_clear

cdef traverseproc _cy_traverse = (<PyTypeObject*>LoopCore).tp_traverse
cdef inquiry _cy_clear = (<PyTypeObject*>LoopCore).tp_clear


cdef int _loop_traverse(PyObject* o, visitproc visit, void* arg) noexcept:
    cdef int r = _cy_traverse(o, visit, arg)
    cdef size_t i
    cdef TimerSlot* h = (<LoopCore>o).theap
    if r:
        return r
    for i in range((<LoopCore>o).tcount):
        r = visit(h[i].timer, arg)
        if r:
            return r
    return 0


cdef int _loop_clear(PyObject* o) noexcept:
    cdef LoopCore self = <LoopCore>o
    cdef PyObject* t
    while self.tcount:
        self.tcount -= 1
        t = self.theap[self.tcount].timer
        (<Timer>t).cancelled = True
        Py_DECREF(<object>t)
    # the spin's read target, a cache: a Bind holds its loop, so keeping it
    # here makes a cycle of two objects the collector may not clear
    self.spin_src = None
    # LoopCore is no_gc_clear (its fields stay for __dealloc__): Cython made
    # no tp_clear of its own, and the heap and the spin's target are all
    # this one clears
    return _cy_clear(o) if _cy_clear != NULL else 0


(<PyTypeObject*>LoopCore).tp_traverse = _loop_traverse
(<PyTypeObject*>LoopCore).tp_clear = _loop_clear
