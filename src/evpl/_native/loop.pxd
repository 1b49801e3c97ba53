# cython: language_level=3
"""The loop core: iteration, timers, deferrals, doorbells, fd watches and the
Drivers it polls and sleeps through (see loop.pyx)."""

from cpython.ref cimport PyObject
from libc.stdint cimport int64_t, uint64_t, uint32_t
from posix.uio cimport iovec
from evpl._native.buffers cimport Pool, Chunk
from evpl._native.sys cimport epoll_event, mmsghdr, sockaddr_in6

cdef enum:
    MAX_EVENTS = 256
    MAX_IOV = 1024
    MAX_MMSG = 64
    READ_BUDGET = 16        # reads per Bind per turn before others get theirs
    READ_MAX = 262144       # bytes per stream read (epoll backends)
    MAX_DRIVERS = 4

# after this long without activity the loop gives idle memory back, once

# A Driver's "has work" check, called without the GIL while the loop spins.
ctypedef int (*ready_fn)(void* ctx) noexcept nogil
# A Driver's hook called without the GIL each time the loop has released it
# to spin or sleep (e.g. to publish results to threads that wait without the
# GIL, so they take a free GIL).
ctypedef void (*released_fn)(void* ctx) noexcept nogil


cdef class LoopCore


# one entry of the timer heap: the order key next to the Timer, so sifting
# compares integers in one array and never touches the Timer objects
cdef struct TimerSlot:
    int64_t deadline
    uint64_t seq
    PyObject* timer         # a reference is held while the slot is in the heap


cdef class _Source:
    """Anything the loop dispatches to: registered in its epoll set, queued
    for a read, flushed at the end of an iteration, or closed with it."""
    cdef bint in_epoll      # registered in the loop's epoll set (LoopCore._ep_add)
    cdef bint rx_queued     # in LoopCore.pending_read
    cdef int fd
    cdef LoopCore loop
    cdef void _event(self, uint32_t events)
    cdef void _read(self)
    cdef int _flush(self) except -1
    cdef void _fail(self, error)
    cdef void _shutdown(self)
    cdef void _report_closed(self)
    cdef void _flush_batch(self)
    cdef unsigned int _spin_prepare(self)
    cdef void _spin_deliver(self, int n, unsigned int vlen, int err)


cdef class Driver(_Source):
    """An I/O mechanism the loop polls while it spins and sleeps through (its
    fd in the loop's epoll set): io_uring today, AF_XDP rings and shared
    memory rings later. Its ``_event`` runs when that fd signals."""
    cdef readonly str name
    cdef int _spin_start(self) except -1
    cdef int _process(self) except -1
    cdef int _before_sleep(self) except -1
    cdef int _submit(self) except -1
    cdef bint _waiting(self)
    cdef int _after_events(self) except -1
    cdef void _close(self)
    cdef void _stats(self, dict d)
    cdef void _trim_idle(self)


cdef class Timer:
    cdef LoopCore loop
    cdef int64_t deadline
    cdef int64_t period
    cdef object fn
    cdef tuple args
    cdef bint cancelled
    cdef bint fired


cdef class LoopCore:
    cdef int epfd
    cdef int wakefd
    cdef int wake_pending
    cdef int sigfd_r            # signal wake-up pipe (signal.set_wakeup_fd)
    cdef int sigfd_w
    cdef char sigbuf[64]
    cdef int n_epoll            # Binds, Listeners and FdWatches in the epoll set
    cdef readonly bint sqpoll   # io_uring rings get an SQPOLL thread
    cdef readonly int sqpoll_cpu
    cdef int stop_flag
    cdef readonly Pool pool
    # receive memory for backends that read into the loop's chunk (epoll)
    cdef Chunk* rx_chunk
    cdef size_t rx_used
    cdef size_t min_space
    cdef size_t asm_threshold
    # scratch arrays for one system call at a time; sends have their own
    # (tx_*): a send may happen while a receive's array is being delivered
    # (Loop.flush from a DatagramSink's dg_take)
    cdef epoll_event* events
    cdef iovec* iov
    cdef mmsghdr* mmsg
    cdef iovec* tx_iov
    cdef mmsghdr* tx_mmsg
    cdef sockaddr_in6* names
    cdef uint64_t dg_ctl[MAX_MMSG * 3]        # UDP_SEGMENT control messages
    cdef unsigned int dg_group[MAX_MMSG]      # datagrams in each sendmmsg message
    cdef uint64_t dg_rctl[MAX_MMSG * 3]       # recvmmsg control space (UDP_GRO)
    cdef int64_t spin_ns
    cdef bint poll_always
    cdef int64_t last_active
    cdef int64_t poll_until     # keep_polling: a hybrid loop spins until then
    cdef int64_t trim_mark      # last_active when idle memory was last given back
    cdef bint running
    cdef bint closed
    cdef list dirty
    cdef list pending_read
    cdef list starved
    cdef size_t starved_mark
    cdef list closing
    cdef list deferred
    cdef TimerSlot* theap       # binary min-heap on (deadline, seq)
    cdef size_t tcount
    cdef size_t tcap
    cdef uint64_t timer_seq
    cdef size_t timers_cancelled
    cdef list doorbells
    cdef set sources
    cdef readonly dict drivers
    cdef list drv_list          # the Drivers, in the order they were added
    cdef ready_fn drv_ready[MAX_DRIVERS]
    cdef void* drv_ctx[MAX_DRIVERS]
    cdef released_fn drv_released[MAX_DRIVERS]
    cdef int ndrv
    cdef readonly object base_on_sent
    cdef readonly object base_handler
    # sources with a read batch to hand over (_flush_batch): the first in
    # batch_one (usually the only one: no list made and freed per
    # iteration), the others in batches
    cdef _Source batch_one
    cdef list batches
    # the socket that received last: the spin reads it directly
    # (_Source._spin_prepare / _spin_deliver), see LoopCore._iterate;
    # spin_miss counts the spins in a row epoll ended for other sources
    cdef _Source spin_src
    cdef int spin_miss
    cdef public object exception_handler
    cdef public size_t zc_threshold
    # counters
    cdef size_t stat_iterations, stat_sleeps, stat_polls, stat_events, stat_bytes_in, stat_bytes_out
    cdef size_t stat_messages_in, stat_datagrams_in, stat_datagrams_out, stat_dgram_errors
    cdef size_t stat_truncated, stat_partial_copies, stat_callback_errors, stat_paused
    cdef size_t stat_accept_errors, stat_starved, stat_timers_fired, stat_zc_sends
    cdef size_t stat_gso_sends, stat_gso_refused, stat_gro_receives, stat_timeouts
    cdef size_t stat_placed      # datagrams a scatter receive put where the sink asked
    cdef size_t stat_idle_trims
    cdef size_t stat_spin_reads # spin rounds that read a socket directly
    cdef size_t stat_spin_hits  # ... and found data (or an error) there
    cdef size_t stat_py_calls   # receive callbacks into Python (data, messages, datagrams, framer)

    cdef int add_driver(self, Driver d, ready_fn ready, void* ctx,
                        released_fn released=*) except -1
    cdef void _released(self) noexcept nogil
    cdef int _ep_add(self, _Source src, int fd, uint32_t events) except -1
    cdef void _ep_del(self, _Source src, bint ctl) noexcept
    cdef int _rx_reserve(self, size_t space) noexcept
    cdef void _starve(self, _Source b)
    cdef void _queue_read(self, _Source b)
    cdef void _wake(self) noexcept
    cdef object _enter(self, bint may_sleep)
    cdef void _leave(self, old_wakeup) except *
    cdef Timer _timer(self, int64_t delay_ns, int64_t period_ns, fn, tuple args)
    cdef Timer _timer_at(self, int64_t deadline, int64_t period_ns, fn, tuple args)
    cdef int64_t _wait_budget(self, int64_t max_wait) except? -2
    cdef int _iterate(self, int64_t max_wait) except -1
    cdef void _after_events(self) except *
    cdef void _add_batch(self, _Source b)
    cdef void _flush_batches(self) except *
    cdef void _run_timers(self) except *
    cdef int _theap_push(self, Timer t) except -1
    cdef Timer _theap_pop(self)
    cdef void _theap_compact(self) noexcept
    cdef void _run_deferred(self) except *
    cdef void _run_closing(self) except *
    cdef void _ring_doorbells(self) except *
    cdef int _drivers_process(self) except -1
    cdef void _trim_idle(self)
    cdef int _drivers_before_sleep(self) except -1


cdef inline void loop_poll_until(LoopCore loop, int64_t until) noexcept:
    """``Loop.keep_polling`` for C callers, with a deadline on the loop's
    clock (CLOCK_MONOTONIC ns): a hybrid loop polls until then."""
    if until > loop.poll_until:
        loop.poll_until = until
