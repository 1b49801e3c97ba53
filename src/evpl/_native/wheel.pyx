# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""A pacing timing wheel (Carousel, SIGCOMM 2017; eRPC's rate limiter).

Paced senders (``evpl.drpc`` sessions whose Timely rate is below the link
rate) do not keep a timer each: they put every packet in one wheel of
``nslots`` slots of ``slot_ns`` nanoseconds, at the slot of the time it may
leave. One loop timer, armed for the earliest non-empty slot, sends every
packet whose slot is due, in slot order and within a slot in insertion
order, at the end of the loop iteration's timer phase (so the sends of one
firing leave in the iteration's batch: GSO trains, one ``sendmmsg``).

Insertion is O(1) (a list append); a firing costs one C loop over the due
slots plus one Python call per packet sent (the sender's ``send``). A time
beyond the horizon (``nslots * slot_ns``) is put in the last slot and
counted (``clamped``): pacing then runs late, never drops.

Each entry carries a ``tag`` whose integer attribute ``queued`` the sender
increments when it inserts and the wheel decrements once the packet left;
drpc uses it to see that a request still has packets waiting here and must
not be rolled back by its retransmission timer (eRPC's rule).
"""

cimport cython
from libc.stdint cimport int64_t

from evpl._native.loop cimport LoopCore, Timer
from evpl._native.sys cimport evpl_now_ns


@cython.final
cdef class TimingWheel:
    """``TimingWheel(loop, slot_ns=1000, nslots=8192)``; ``insert(when_ns,
    send, data, tag)`` schedules ``send(data)`` for the slot of ``when_ns``
    (the loop's ``now_ns`` clock)."""
    cdef LoopCore loop
    cdef readonly int64_t slot_ns
    cdef readonly Py_ssize_t nslots
    cdef list slots             # one list of (send, data, tag) per slot, or None
    cdef Py_ssize_t cursor      # the slot whose time is base
    cdef int64_t base           # start time of the cursor slot
    cdef readonly Py_ssize_t queued
    cdef Timer timer
    cdef int64_t timer_at
    cdef readonly size_t inserted
    cdef readonly size_t sent
    cdef readonly size_t clamped
    cdef readonly size_t failed
    cdef readonly size_t firings

    def __init__(self, LoopCore loop, int64_t slot_ns=1000, Py_ssize_t nslots=8192):
        if slot_ns < 1:
            raise ValueError("slot_ns must be >= 1")
        if nslots < 2:
            raise ValueError("nslots must be >= 2")
        self.loop = loop
        self.slot_ns = slot_ns
        self.nslots = nslots
        self.slots = [None] * nslots
        self.base = -1

    cpdef void insert(self, int64_t when_ns, send, data, tag) except *:
        """Send ``data`` with ``send(data)`` once ``when_ns`` is reached;
        ``tag.queued`` is incremented now and decremented once it left."""
        cdef int64_t now, d
        cdef Py_ssize_t k, idx
        cdef list slot
        if self.queued == 0:
            # empty wheel: restart it at the current slot
            now = evpl_now_ns()
            self.base = now - now % self.slot_ns
            self.cursor = 0
        d = when_ns - self.base
        k = 0 if d < 0 else <Py_ssize_t>(d // self.slot_ns)
        if k >= self.nslots:
            k = self.nslots - 1
            self.clamped += 1
        idx = (self.cursor + k) % self.nslots
        slot = <list>self.slots[idx] if self.slots[idx] is not None else None
        if slot is None:
            slot = []
            self.slots[idx] = slot
        slot.append((send, data, tag))
        tag.queued += 1
        self.queued += 1
        self.inserted += 1
        self._arm(self.base + k * self.slot_ns)

    cdef void _arm(self, int64_t at):
        if self.timer is not None and not self.timer.cancelled and not self.timer.fired:
            if self.timer_at <= at:
                return
            self.timer.cancel()
        self.timer_at = at
        self.timer = self.loop._timer(max(<int64_t>0, at - evpl_now_ns()), 0, self._fire, ())

    def _fire(self):
        """The timer: send every packet whose slot time has come."""
        cdef int64_t now = evpl_now_ns()
        cdef list slot
        cdef Py_ssize_t i, n
        self.firings += 1
        self.timer = None
        while self.queued > 0 and self.base <= now:
            obj = self.slots[self.cursor]
            if obj is not None:
                slot = <list>obj
                self.slots[self.cursor] = None
                n = len(slot)
                for i in range(n):
                    send, data, tag = slot[i]
                    self.queued -= 1
                    tag.queued -= 1
                    try:
                        send(data)
                        self.sent += 1
                    except Exception:
                        # the sender closed meanwhile: its own timers deal with it
                        self.failed += 1
            self.cursor = (self.cursor + 1) % self.nslots
            self.base += self.slot_ns
        if self.queued > 0:
            # the next non-empty slot
            i = 0
            while self.slots[(self.cursor + i) % self.nslots] is None:
                i += 1
            self._arm(self.base + i * self.slot_ns)

    def stats(self) -> dict:
        """Counters: packets ``inserted``, ``sent``, ``queued`` now, ``clamped``
        beyond the horizon, ``failed`` sends, timer ``firings``."""
        return {"inserted": self.inserted, "sent": self.sent, "queued": self.queued,
                "clamped": self.clamped, "failed": self.failed, "firings": self.firings}

    def clear(self) -> None:
        """Drop every queued packet (their tags' ``queued`` go back down)."""
        cdef Py_ssize_t i
        for i in range(self.nslots):
            obj = self.slots[i]
            if obj is not None:
                for send, data, tag in <list>obj:
                    tag.queued -= 1
                self.slots[i] = None
        self.queued = 0
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
