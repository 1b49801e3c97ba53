"""asyncio on evpl: a drop-in event loop, like uvloop, on evpl's engine.

Switch a program over with one of::

    evpl.aio.run(main())                                  # like asyncio.run
    with asyncio.Runner(loop_factory=evpl.aio.new_event_loop) as r: r.run(main())
    asyncio.set_event_loop_policy(evpl.aio.EventLoopPolicy())   # every new loop

Loop options are evpl's: ``backend`` ("epoll" or "io_uring", for the stream
sockets asyncio creates), ``poll_mode`` ("hybrid", "event", "always") and
``spin_ns``. See docs/asyncio.md.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Coroutine
from typing import Any, TypeVar

from evpl.aio.datagram import DatagramTransport
from evpl.aio.loop import AttachedEventLoop, EvplEventLoop
from evpl.aio.transports import StreamTransport

__all__ = ["AttachedEventLoop", "DatagramTransport", "EventLoopPolicy", "EvplEventLoop", "Loop",
           "StreamTransport", "attach", "new_event_loop", "run"]

T = TypeVar("T")

Loop = EvplEventLoop


def new_event_loop(**loop_options: Any) -> EvplEventLoop:
    """A new evpl asyncio loop (``loop_options``: backend, poll_mode,
    spin_ns, pool)."""
    return EvplEventLoop(**loop_options)


def attach(loop: Any, *, backend: str = "epoll") -> AttachedEventLoop:
    """An asyncio loop that runs inside the evpl ``Loop`` ``loop``: whoever
    runs ``loop`` runs its callbacks, on the same thread, so evpl handlers
    and coroutines call each other directly (an ASGI app on evpl's HTTP
    server, awaitable RPCs). ``backend`` is that of the stream sockets the
    asyncio loop makes itself (``create_connection``...)."""
    return AttachedEventLoop(loop, backend=backend)


def run(main: Coroutine[Any, Any, T], *, debug: bool | None = None,
        **loop_options: Any) -> T:
    """Run ``main`` on a new evpl loop and close it, as ``asyncio.run`` does
    (cancel what is left, shut down async generators and the default
    executor)."""
    factory = functools.partial(new_event_loop, **loop_options)
    with asyncio.Runner(debug=debug, loop_factory=factory) as runner:
        return runner.run(main)


class EventLoopPolicy(asyncio.DefaultEventLoopPolicy):
    """The default asyncio policy, making evpl loops (with ``loop_options``)."""

    def __init__(self, **loop_options: Any) -> None:
        super().__init__()
        self._loop_options = loop_options

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        return EvplEventLoop(**self._loop_options)
