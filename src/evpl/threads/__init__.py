"""Loops in threads: ``LoopThread``, ``ThreadPool`` and the ``WorkerPool``
behind ``Loop.offload`` (see docs/cores.md).

Threads share CPython's GIL: they give parallel waiting and a place for
blocking work. Parallel Python needs processes: ``evpl.shards``.
"""

from evpl.threads.loop_thread import LoopThread, current_loop_thread
from evpl.threads.pool import PoolListener, ThreadPool
from evpl.threads.workers import WorkerPool, default_workers, offload

__all__ = ["LoopThread", "PoolListener", "ThreadPool", "WorkerPool", "current_loop_thread",
           "default_workers", "offload"]
