"""The compiled paths of evpl.aio keep asyncio's semantics: handles are
asyncio's classes (made at their slot offsets, reused only when nothing
holds them), call_soon takes asyncio's arguments, callbacks run in their
contexts, errors reach the exception handler, a SystemExit/KeyboardInterrupt
from an engine callback leaves run_forever after the iteration and the loop
stays usable, a replaced ``_run_once`` is honoured, and the loop methods
futures and tasks call (get_debug, time, create_future, create_task) are
asyncio's in behaviour."""

from __future__ import annotations

import asyncio
import contextvars
import socket
import time
from typing import Any

import pytest

from aio.helpers import run

VAR: contextvars.ContextVar[str] = contextvars.ContextVar("VAR", default="unset")


def test_handles_are_asyncios(aio_loop: Any) -> None:
    seen: list[Any] = []
    h = aio_loop.call_soon(seen.append, 1)
    assert type(h) is asyncio.Handle
    assert "append" in repr(h)
    cancelled = aio_loop.call_soon(seen.append, "never")
    cancelled.cancel()
    assert cancelled.cancelled() and "cancelled" in repr(cancelled)
    t = aio_loop.call_later(0.001, seen.append, 2)
    assert isinstance(t, asyncio.TimerHandle)
    assert t.when() >= aio_loop.time()
    aio_loop.call_later(0.01, aio_loop.stop)
    aio_loop.run_forever()
    assert seen == [1, 2]
    assert not h.cancelled()


def test_handles_still_referenced_are_not_reused(aio_loop: Any) -> None:
    """A Handle that ran is reused by a later call_soon only when nothing
    holds it: one the caller keeps keeps its fields and is never handed
    out again; one with only a weak reference to it is freed (the weak
    reference dies), not reused under it."""
    import weakref

    seen: list[Any] = []
    kept = aio_loop.call_soon(seen.append, "kept")
    weak_target = aio_loop.call_soon(seen.append, "weak")
    ref = weakref.ref(weak_target)
    del weak_target
    for i in range(100):            # handles nobody keeps: reused among themselves
        aio_loop.call_soon(seen.append, i)
    aio_loop.call_soon(aio_loop.stop)
    aio_loop.run_forever()
    later = [aio_loop.call_soon(seen.append, "later") for _ in range(100)]
    assert kept not in later and ref() is None
    assert kept._callback == seen.append and kept._args == ("kept",)
    aio_loop.call_soon(aio_loop.stop)
    aio_loop.run_forever()
    assert seen == ["kept", "weak", *range(100), *["later"] * 100]


def test_call_soon_arguments(aio_loop: Any) -> None:
    """call_soon (a C method) takes asyncio's arguments and refuses others
    as asyncio's does."""
    import inspect

    assert str(inspect.signature(aio_loop.call_soon)) == "(callback, /, *args, context=None)"
    with pytest.raises(TypeError, match="callback"):
        aio_loop.call_soon()
    with pytest.raises(TypeError, match="unexpected keyword argument 'ctx'"):
        aio_loop.call_soon(print, ctx=None)
    got: list[Any] = []
    ctx = contextvars.copy_context()
    ctx.run(VAR.set, "kw")
    aio_loop.call_soon(lambda *a: got.append((a, VAR.get())), 1, 2, context=ctx)
    aio_loop.call_soon(lambda *a: got.append((a, VAR.get())), context=None)
    aio_loop.call_soon(aio_loop.stop)
    aio_loop.run_forever()
    assert got == [((1, 2), "kw"), ((), "unset")]


def test_callbacks_run_in_their_context(aio_loop: Any) -> None:
    got: list[str] = []
    ctx = contextvars.copy_context()
    ctx.run(VAR.set, "in ctx")
    aio_loop.call_soon(lambda: got.append(VAR.get()), context=ctx)
    aio_loop.call_soon(lambda: got.append(VAR.get()))
    aio_loop.call_later(0, lambda: got.append(VAR.get()), context=ctx)
    aio_loop.call_later(0.005, aio_loop.stop)
    aio_loop.run_forever()
    assert got == ["in ctx", "unset", "in ctx"]
    assert VAR.get() == "unset"


def test_callback_errors_reach_the_exception_handler(aio_loop: Any) -> None:
    def boom() -> None:
        raise ValueError("callback bug")

    aio_loop.call_soon(boom)
    aio_loop.call_later(0, boom)
    aio_loop.call_later(0.005, aio_loop.stop)
    aio_loop.run_forever()
    errors = list(aio_loop.errors)
    aio_loop.errors.clear()
    assert [type(e["exception"]) for e in errors] == [ValueError, ValueError]
    assert all(e["message"].startswith("Exception in callback") for e in errors)
    assert all("handle" in e for e in errors)


def test_keyboard_interrupt_from_data_received_leaves_run_forever(aio_loop: Any) -> None:
    """An engine callback (data_received) raising KeyboardInterrupt: it is
    raised from run_until_complete once the iteration is over, and the loop
    runs again afterwards."""
    class Interrupting(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            raise KeyboardInterrupt

    async def serve() -> tuple[Any, int]:
        srv = await aio_loop.create_server(Interrupting, "127.0.0.1", 0)
        return srv, srv.sockets[0].getsockname()[1]

    srv, port = run(aio_loop, serve())
    c = socket.create_connection(("127.0.0.1", port))
    try:
        c.sendall(b"x")
        with pytest.raises(KeyboardInterrupt):
            aio_loop.run_until_complete(asyncio.sleep(30))
        assert not aio_loop.is_running()
        # usable again: a timer fires, run_until_complete returns normally
        assert run(aio_loop, asyncio.sleep(0.001, "again")) == "again"
    finally:
        c.close()
        srv.close()
        run(aio_loop, srv.wait_closed())


def test_a_replaced_run_once_is_honoured(aio_loop: Any) -> None:
    calls = [0]
    original = aio_loop._run_once

    def counting() -> None:
        calls[0] += 1
        original()

    aio_loop._run_once = counting
    try:
        assert run(aio_loop, asyncio.sleep(0.001, "done")) == "done"
    finally:
        del aio_loop._run_once
    assert calls[0] >= 2


def test_loop_methods_futures_and_tasks_call(aio_loop: Any) -> None:
    assert aio_loop.get_debug() is False
    t0 = time.monotonic()
    assert t0 <= aio_loop.time() <= time.monotonic()
    fut = aio_loop.create_future()
    assert isinstance(fut, asyncio.Future) and fut.get_loop() is aio_loop

    async def named() -> str:
        return asyncio.current_task().get_name()  # type: ignore[union-attr]

    ctx = contextvars.copy_context()
    ctx.run(VAR.set, "task ctx")

    async def var() -> str:
        return VAR.get()

    task = aio_loop.create_task(named(), name="the-name")
    assert run(aio_loop, task) == "the-name"
    assert run(aio_loop, aio_loop.create_task(var(), context=ctx)) == "task ctx"
    made: list[Any] = []

    def factory(loop: Any, coro: Any, **kw: Any) -> Any:
        t = asyncio.Task(coro, loop=loop, **kw)
        made.append(t)
        return t

    aio_loop.set_task_factory(factory)
    try:
        t2 = aio_loop.create_task(named(), name="from-factory")
        assert made == [t2]
        assert run(aio_loop, t2) == "from-factory"
    finally:
        aio_loop.set_task_factory(None)
    aio_loop.set_debug(True)
    try:
        dbg = aio_loop.create_future()
        assert dbg._source_traceback          # debug mode: asyncio's own paths
        h = aio_loop.call_soon(lambda: None)
        assert h._source_traceback
        run(aio_loop, asyncio.sleep(0))
    finally:
        aio_loop.set_debug(False)


def test_closed_loop_refuses(aio_loop: Any) -> None:
    aio_loop.close()
    with pytest.raises(RuntimeError, match="closed"):
        aio_loop.call_soon(print)
    with pytest.raises(RuntimeError, match="closed"):
        aio_loop.call_later(1, print)
    coro = asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="closed"):
        aio_loop.create_task(coro)
    coro.close()
