"""Shared fixtures for the evpl test suite.

Every behaviour test runs against every backend that ``evpl.backends()``
reports as available, so a new backend (io_uring, AF_XDP...) is tested by the
same tests without editing them.
"""

from __future__ import annotations

import itertools
import os
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import pytest
from core.helpers import check_pool
from hypothesis import HealthCheck, settings

import evpl

# No wall-clock limits on property tests: hypothesis's default 200 ms deadline
# per example (and its too_slow health check) fail a correct test on a busy or
# slow machine. Tests that set their own settings inherit this.
settings.register_profile("evpl", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("evpl")

STREAM_BACKENDS = [b.name for b in evpl.backends() if b.available and b.kind == "stream"]
DATAGRAM_BACKENDS = [b.name for b in evpl.backends() if b.available and b.kind == "datagram"]

_names = itertools.count()


def backend_info(name: str) -> evpl.BackendInfo:
    for b in evpl.backends():
        if b.name == name:
            return b
    raise LookupError(name)


def _short_dir(tmp_path: Any) -> str:
    """A directory whose socket paths fit in sun_path (108 bytes)."""
    path = str(tmp_path)
    if len(path) > 80:
        path = tempfile.mkdtemp(prefix="evpl-", dir="/tmp")
    return path


class LoopErrors(list):
    """Callback exceptions a loop reported: (exc, bind) pairs.

    The traceback is kept as text (``.tracebacks``) and dropped from the
    exception: it references the callback's frame and so the received Buffers,
    which must not end up in reference cycles (see test_buffers.py,
    test_buffer_in_reference_cycle).
    """

    def __init__(self) -> None:
        super().__init__()
        self.tracebacks: list[str] = []

    def __call__(self, loop: Any, exc: BaseException, bind: Any) -> None:
        self.tracebacks.append("".join(traceback.format_exception(exc)))
        self.append((exc.with_traceback(None), bind))

    def clear(self) -> None:
        super().clear()
        self.tracebacks.clear()


class Loops:
    """Creates Loops and checks at teardown that each one is clean."""

    def __init__(self) -> None:
        self.loops: list[evpl.Loop] = []
        self.pools: list[evpl.Pool] = []

    def make(self, **kwargs: Any) -> evpl.Loop:
        if os.environ.get("EVPL_TEST_SQPOLL"):
            # scripts/test runs the io_uring behaviour tests again this way
            kwargs.setdefault("sqpoll", True)
        loop = evpl.Loop(**kwargs)
        loop.callback_errors = LoopErrors()  # type: ignore[attr-defined]
        loop.exception_handler = loop.callback_errors  # type: ignore[attr-defined]
        self.loops.append(loop)
        if kwargs.get("pool") is not None:
            self.pools.append(kwargs["pool"])
        return loop

    def finish(self) -> None:
        errors = []
        for loop in self.loops:
            loop.close()
            errors.extend(loop.callback_errors)  # type: ignore[attr-defined]
        tracebacks = [t for loop in self.loops for t in loop.callback_errors.tracebacks]
        self.loops.clear()
        assert not errors, "callback exceptions were reported:\n" + "\n".join(tracebacks)
        for pool in [evpl.default_pool(), *self.pools]:
            check_pool(pool)


@pytest.fixture
def make_loop():
    """Factory for extra Loops (own pool, poll mode...), checked like ``loop``."""
    loops = Loops()
    yield loops.make
    loops.finish()


@pytest.fixture
def loop(make_loop):
    """An evpl.Loop whose callback exceptions are recorded in
    ``loop.callback_errors`` (a test that expects some must clear them)."""
    return make_loop()


@pytest.fixture(params=STREAM_BACKENDS)
def stream_backend(request) -> str:
    return request.param


@pytest.fixture(params=DATAGRAM_BACKENDS)
def datagram_backend(request) -> str:
    return request.param


@pytest.fixture
def address(tmp_path) -> Callable[[str], Any]:
    """``address(backend)``: a fresh address to listen/bind on for ``backend``."""
    base = _short_dir(tmp_path)

    def make(backend: str) -> Any:
        caps = backend_info(backend).capabilities
        if "local" in caps:
            return os.path.join(base, f"s{next(_names)}.sock")
        if "inet" in caps:
            return ("127.0.0.1", 0)
        pytest.skip(f"no address recipe for backend {backend!r} ({sorted(caps)})")

    return make
