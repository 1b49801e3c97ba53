"""Delegation: ``Loop.offload(fn, *args)`` runs blocking or CPU-heavy work
on a bounded ``WorkerPool`` and completes its Future back on the loop's
thread.

Results travel through the loop's native call queue, so completions that
finish while the loop is busy are taken together in one batch and cost at
most one wake-up. The Future is completed by the loop itself: its done
callbacks run on the loop's thread, where they may touch Binds.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import queue
import threading
from collections.abc import Callable
from typing import Any, Literal

from evpl._native.loop import LoopCore
from evpl._native.mpsc import CallQueue, call_queue
from evpl.errors import Busy, ConfigError, EvplError

__all__ = ["WorkerPool", "default_workers", "offload"]

_log = logging.getLogger("evpl")
_STOP = object()


class WorkerPool:
    """``workers`` threads taking jobs from a queue that holds at most
    ``max_queued`` jobs not yet started (``evpl.Busy`` or a paused Bind
    beyond that, see ``Loop.offload``). Default: as many workers as CPUs.

    Workers run Python under the GIL: they help with work that blocks (file
    I/O, a blocking client library, a C extension that releases the GIL such
    as hashlib or zlib on large inputs), not with pure-Python CPU work."""

    def __init__(self, workers: int | None = None, max_queued: int = 1024,
                 name: str = "evpl-worker") -> None:
        if workers is None:
            workers = len(os.sched_getaffinity(0))
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
            raise ConfigError(f"workers must be a positive int, got {workers!r}")
        if not isinstance(max_queued, int) or isinstance(max_queued, bool) or max_queued < 1:
            raise ConfigError(f"max_queued must be a positive int, got {max_queued!r}")
        self.max_queued = max_queued
        self._jobs: queue.Queue[Any] = queue.Queue(max_queued)
        self._lock = threading.Lock()
        self._waiting: dict[CallQueue, _Parked] = {}    # loops with paused Binds
        self._closed = False
        self.completed = 0
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()

    @property
    def workers(self) -> int:
        return len(self._threads)

    @property
    def queued(self) -> int:
        """Jobs waiting for a worker."""
        return self._jobs.qsize()

    def _work(self) -> None:
        jobs = self._jobs
        while True:
            job = jobs.get()
            if self._waiting:
                self._room()
            if job is _STOP:
                return
            fut, fn, args, calls = job
            try:
                result = fn(*args)
            except BaseException as exc:
                outcome: tuple[Any, ...] = (fut, False, exc)
            else:
                outcome = (fut, True, result)
            try:
                calls.call_args(_complete, outcome)
            except EvplError:
                # the loop is gone (its queue closed): nobody can take the result
                if fut.set_running_or_notify_cancel():
                    fut.set_exception(EvplError("the loop stopped before the job finished"))
            # an idle worker keeps nothing of its last job alive (its
            # arguments may hold pool buffers, its result a large object)
            job = fut = fn = args = calls = outcome = result = None

    def _room(self) -> None:
        """A job left the queue: tell loops with paused Binds there is room."""
        with self._lock:
            waiting = list(self._waiting.items())
            self._waiting.clear()
        for calls, parked in waiting:
            try:
                calls.call_args(parked.retry, ())
            except EvplError:
                pass

    def submit(self, calls: CallQueue, fn: Callable[..., Any], args: tuple[Any, ...],
               fut: concurrent.futures.Future[Any]) -> bool:
        """Queue a job whose outcome completes ``fut`` through ``calls``
        (a loop's queue); False if the queue is full."""
        if self._closed:
            raise EvplError("the WorkerPool is closed")
        try:
            self._jobs.put_nowait((fut, fn, args, calls))
        except queue.Full:
            return False
        return True

    def _park(self, calls: CallQueue, parked: _Parked) -> None:
        with self._lock:
            self._waiting[calls] = parked
        if not self._jobs.full():
            self._room()            # a worker took a job while we parked

    def close(self, wait: bool = True, cancel: bool = False) -> None:
        """Let the workers finish the queued jobs and end (``wait``: join
        them). ``cancel``: drop the jobs no worker has started instead (their
        Futures are cancelled, on this thread; call it on the loop's)."""
        if self._closed:
            return
        self._closed = True
        while cancel:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not _STOP:
                job[0].cancel()
        for _ in self._threads:
            self._jobs.put(_STOP)
        if wait:
            for t in self._threads:
                t.join()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _complete(fut: concurrent.futures.Future[Any], ok: bool, value: Any) -> None:
    """On the loop's thread: complete the Future (its callbacks run here)."""
    if not fut.set_running_or_notify_cancel():
        return
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)


class _Parked:
    """A loop's jobs that found the WorkerPool full with ``on_full="pause"``,
    and the Binds paused for them (touched on the loop's thread only)."""

    def __init__(self, workers: WorkerPool, calls: CallQueue) -> None:
        self.key = (id(workers), id(calls))
        self.workers = workers
        self.calls = calls
        self.jobs: list[tuple[Any, ...]] = []
        self.binds: list[Any] = []

    def retry(self) -> None:
        if self.workers._closed:
            # the pool closed while these waited for room: they never run
            for fut, _fn, _args in self.jobs:
                fut.cancel()
            self.jobs.clear()
        while self.jobs:
            fut, fn, args = self.jobs[0]
            if not self.workers.submit(self.calls, fn, args, fut):
                self.workers._park(self.calls, self)
                return
            self.jobs.pop(0)
        if _parked.get(self.key) is self:
            del _parked[self.key]           # nothing waits: hold no loop
        binds, self.binds = self.binds, []
        for b in binds:
            if not b.closed:
                b.resume_reading()


_default: WorkerPool | None = None
_parked: dict[tuple[int, int], _Parked] = {}


def _forget_after_fork() -> None:
    """A forked child (a shard) has none of its parent's worker threads."""
    global _default
    _default = None
    _parked.clear()


os.register_at_fork(after_in_child=_forget_after_fork)


def default_workers() -> WorkerPool:
    """The process-wide WorkerPool ``Loop.offload`` uses unless given one
    (made on first use: one worker per CPU, 1024 queued jobs)."""
    global _default
    if _default is None or _default._closed:
        _default = WorkerPool()
    return _default


def offload(loop: LoopCore, fn: Callable[..., Any], *args: Any,
            workers: WorkerPool | None = None,
            on_full: Literal["raise", "pause"] = "raise",
            bind: Any = None) -> concurrent.futures.Future[Any]:
    """Run ``fn(*args)`` on a worker thread; the returned Future is completed
    on ``loop``'s thread (call this on that thread). See ``Loop.offload``."""
    if on_full not in ("raise", "pause"):
        raise ConfigError(f"on_full must be 'raise' or 'pause', got {on_full!r}")
    if on_full == "pause" and bind is None:
        raise ConfigError("on_full='pause' needs the bind= whose reading is paused")
    pool = workers if workers is not None else default_workers()
    calls = call_queue(loop)
    fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
    key = (id(pool), id(calls))
    parked = _parked.get(key)
    if parked is not None and parked.calls is not calls:
        parked = None
    if (parked is None or not parked.jobs) and pool.submit(calls, fn, args, fut):
        return fut
    if on_full == "raise":
        raise Busy(f"the WorkerPool is full ({pool.max_queued} jobs queued)")
    if parked is None:
        parked = _parked[key] = _Parked(pool, calls)
    parked.jobs.append((fut, fn, args))
    if bind.reading:
        bind.pause_reading()
        parked.binds.append(bind)
    if len(parked.jobs) == 1:
        pool._park(calls, parked)
    return fut
