"""Wall-clock cost of one asyncio Task, the least an ASGI request costs on
asyncio whatever the server (an ASGI app runs as a Task: Starlette and
FastAPI, through anyio, need ``asyncio.current_task()``).

    taskset -c 0 python benchmarks/asyncio_task.py

Tasks of an empty coroutine, 64 made per loop iteration (as 64 connections'
requests would be): on evpl's asyncio loop attached to an evpl Loop (what
``evpl.http``'s ASGI interface runs on), and made and gathered on uvloop.
Median of 5 runs of 200,000 Tasks. benchmarks/http_cost.py counts the same
in instructions.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from asyncio import Task

import evpl
from evpl.aio import attach

N = 200_000
BATCH = 64


async def nothing() -> None:
    pass


def on_evpl() -> float:
    loop = evpl.Loop()
    aloop = attach(loop)
    t0 = time.perf_counter()
    for _ in range(N // BATCH):
        for _ in range(BATCH):
            Task(nothing(), loop=aloop, name="x")
        loop.run_once(0)
    dt = time.perf_counter() - t0
    aloop.close()
    loop.close()
    return dt / (N // BATCH * BATCH) * 1e6


def on_uvloop() -> float:
    import uvloop

    loop = uvloop.new_event_loop()

    async def main() -> float:
        t0 = time.perf_counter()
        for _ in range(N // BATCH):
            await asyncio.gather(*[Task(nothing(), loop=loop, name="x") for _ in range(BATCH)])
        return (time.perf_counter() - t0) / (N // BATCH * BATCH) * 1e6

    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


def main() -> None:
    print(f"evpl attached loop: {statistics.median(on_evpl() for _ in range(5)):.2f} µs "
          "per Task made and run")
    try:
        us = statistics.median(on_uvloop() for _ in range(5))
    except ImportError:
        print("uvloop: not installed (pip install uvloop)")
        return
    print(f"uvloop: {us:.2f} µs per Task made and gathered")


if __name__ == "__main__":
    main()
