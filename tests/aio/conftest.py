"""Fixtures for the asyncio loop tests: an evpl asyncio loop per backend,
checked at teardown (nothing reported to the exception handler unless the
test expected it, the loop closed, no pool buffer leaked)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from core.helpers import check_pool

import evpl
import evpl.aio

AIO_BACKENDS = ["epoll"] + (
    ["io_uring"] if any(b.name == "io_uring_tcp" and b.available for b in evpl.backends())
    else [])


class ErrorLog(list):
    """What the loop's exception handler received (context dicts)."""

    def __call__(self, loop: Any, context: dict[str, Any]) -> None:
        self.append(context)


@pytest.fixture(params=AIO_BACKENDS)
def aio_backend(request: Any) -> str:
    return request.param


@pytest.fixture
def aio_loop(aio_backend: str) -> Iterator[evpl.aio.EvplEventLoop]:
    """An evpl asyncio loop (each backend) whose exception handler records
    into ``loop.errors``; a test that expects errors clears them."""
    loop = evpl.aio.new_event_loop(backend=aio_backend)
    errors = ErrorLog()
    loop.set_exception_handler(errors)
    loop.errors = errors  # type: ignore[attr-defined]
    asyncio.set_event_loop(loop)
    try:
        yield loop
    finally:
        asyncio.set_event_loop(None)
        if not loop.is_closed():
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()
        assert not errors, f"the exception handler was called: {errors!r}"
        check_pool(evpl.default_pool())

