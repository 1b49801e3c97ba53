"""``LoopThread``: a thread that owns and runs one ``evpl.Loop``.

Other threads reach the loop through its native call queue
(``evpl._native.mpsc``): ``call`` and ``call_soon`` push with one atomic
operation, the loop runs every queued call once per iteration, and its
eventfd is written at most once per batch, only when the loop may be asleep.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from evpl._native.mpsc import CallQueue, call_queue
from evpl.core.loop import Loop
from evpl.errors import ConfigError, EvplError

__all__ = ["LoopThread", "current_loop_thread"]

_log = logging.getLogger("evpl")
_local = threading.local()


def current_loop_thread() -> LoopThread | None:
    """The LoopThread whose loop runs on the calling thread, if any."""
    return getattr(_local, "loop_thread", None)


def check_cpu(cpu: Any) -> int:
    """``cpu`` if this process may run on it, else ConfigError."""
    allowed = os.sched_getaffinity(0)
    if not isinstance(cpu, int) or isinstance(cpu, bool) or cpu not in allowed:
        raise ConfigError(f"cpu must be one of the CPUs this process may use "
                          f"{sorted(allowed)}, got {cpu!r}")
    return cpu


class LoopThread:
    """A thread running a Loop of its own (see docs/cores.md).

    ``cpu`` pins the thread to that CPU (before the loop and its buffer pool
    are made, so the pool's memory is first touched there). ``queue_size``
    bounds the cross-thread call queue (``evpl.Busy`` beyond it).
    ``wait_spin_ns`` is how long ``call_wait`` spins (without the GIL)
    before its caller sleeps.
    ``loop_options`` go to ``evpl.Loop`` (``spin_ns``, ``poll_mode``,
    ``pool``...); without ``pool`` the thread makes a Pool of its own.
    Unlike a Loop, a LoopThread does not spin by default (``spin_ns=0``):
    threads share the GIL and the CPUs, and a thread that polls takes a
    CPU from the threads that run Python (docs/cores.md).

    Threads share the GIL: a LoopThread gives parallel waiting (many loops
    block in the kernel at once) and a place for blocking work, not parallel
    Python. For that, use ``evpl.shards``.
    """

    def __init__(self, name: str | None = None, cpu: int | None = None, *,
                 queue_size: int = 1 << 20, wait_spin_ns: int = 100_000,
                 **loop_options: Any) -> None:
        if cpu is not None:
            check_cpu(cpu)
        if not isinstance(queue_size, int) or queue_size < 1:
            raise ConfigError(f"queue_size must be a positive int, got {queue_size!r}")
        if not isinstance(wait_spin_ns, int) or wait_spin_ns < 0:
            raise ConfigError(f"wait_spin_ns must be an int >= 0, got {wait_spin_ns!r}")
        if "poll_mode" not in loop_options:
            loop_options.setdefault("spin_ns", 0)
        Loop(**{k: v for k, v in loop_options.items() if k != "pool"}).close()   # check options now
        self.name = name or f"evpl-loop-{id(self):x}"
        self.cpu = cpu
        self._queue_size = queue_size
        self._wait_spin_ns = wait_spin_ns
        self._options = loop_options
        self._loop: Loop | None = None
        self._queue: CallQueue | None = None
        self._thread: threading.Thread | None = None
        self._running = threading.Event()
        self._error: BaseException | None = None
        self.connections = 0        # live connections handed to it by a ThreadPool acceptor

    # ---- life cycle ---------------------------------------------------------

    def start(self) -> LoopThread:
        """Start the thread; returns once its loop is running."""
        if self._thread is not None:
            raise EvplError(f"{self.name} was already started")
        self._thread = threading.Thread(target=self._main, name=self.name, daemon=True)
        self._thread.start()
        self._running.wait()
        if self._queue is None:
            raise EvplError(f"{self.name} could not start its loop") from self._error
        return self

    def _main(self) -> None:
        try:
            if self.cpu is not None:
                os.sched_setaffinity(0, {self.cpu})     # this thread only
            options = dict(self._options)
            if "pool" not in options:
                from evpl._native.buffers import Pool
                options["pool"] = Pool()
            loop = Loop(**options)
            self._queue = call_queue(loop, self._queue_size)
            self._queue.wait_spin_ns = self._wait_spin_ns
            self._loop = loop
            # calls go straight to the native queue: no Python frame
            self.call_soon = self._queue.call_soon  # type: ignore[method-assign]
            self.call_wait = self._queue.call_wait  # type: ignore[method-assign]
        except BaseException as exc:
            self._error = exc
            _log.exception("%s: the loop could not be created", self.name)
            self._running.set()
            return
        _local.loop_thread = self
        loop.defer(self._running.set)
        try:
            loop.run()
            if self._queue.fatal is not None:
                raise self._queue.fatal
        except BaseException as exc:
            self._error = exc
            _log.error("%s: the loop died", self.name, exc_info=exc)
        finally:
            err = EvplError(f"{self.name} stopped before the call ran")
            if self._error is not None:
                err.__cause__ = self._error
            self._queue.close(err)
            try:
                loop.close()
            except BaseException:
                _log.exception("%s: closing the loop raised", self.name)
            self._running.set()

    def stop(self, timeout: float | None = None) -> bool:
        """Stop the loop (calls already queued still run; later ones fail),
        close it and wait up to ``timeout`` seconds for the thread. True if
        the thread has ended."""
        if self._thread is None:
            return True
        if self._loop is not None:
            self._loop.stop()
        if threading.current_thread() is self._thread:
            return False            # called on the loop: it stops after this iteration
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the thread to end (after ``stop``, or after its loop died)."""
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> LoopThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- state ----------------------------------------------------------

    @property
    def alive(self) -> bool:
        """The thread runs and its loop has not died."""
        return self._thread is not None and self._thread.is_alive() and self._error is None

    @property
    def error(self) -> BaseException | None:
        """What killed the loop, if something did."""
        return self._error

    @property
    def loop(self) -> Loop:
        """The thread's Loop: touch it only from that thread (use ``call``)."""
        if self._loop is None:
            raise EvplError(f"{self.name} is not started")
        return self._loop

    @property
    def queue(self) -> CallQueue:
        """The loop's cross-thread call queue."""
        if self._queue is None:
            raise EvplError(f"{self.name} is not started")
        return self._queue

    @property
    def pending(self) -> int:
        """Calls queued and not yet taken by the loop (a load measure)."""
        return self._queue.pending if self._queue is not None else 0

    # ---- calls ----------------------------------------------------------

    def call(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
        """Run ``fn(*args)`` on the loop's thread; the Future gets its result
        or exception (which is also logged). Raises ``evpl.Busy`` when the
        call queue is full."""
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self.queue.call_future(fut, fn, *args)
        return fut

    def call_wait(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the loop's thread, wait for it and return its
        result (or raise its exception): ``call(fn, *args).result()``
        without a Future, and much faster when the loop polls. The caller
        waits without the GIL, spinning up to ``wait_spin_ns`` before it
        sleeps, so neither thread ever waits for the GIL the other holds
        (docs/cores.md). Not on the loop's own thread (EvplError)."""
        return self.queue.call_wait(fn, *args)

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the loop's thread, one way: no Future (an
        exception goes to the loop's exception handler)."""
        self.queue.call_args(fn, args)

    def __repr__(self) -> str:
        state = "alive" if self.alive else ("died" if self._error else "stopped")
        return f"<evpl.LoopThread {self.name} {state} cpu={self.cpu}>"
