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
# (xdp_udp needs an interface: it runs through dgram_net below, not on loopback)
DATAGRAM_BACKENDS = [b.name for b in evpl.backends() if b.available and b.kind == "datagram"
                     and "xdp" not in b.capabilities]

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


# ---- datagram behaviour over every datagram path, xdp_udp included ---------

class DgramNet:
    """Where a datagram behaviour test binds: two sides that can reach each
    other. Kernel-socket backends: both sides are 127.0.0.1. ``xdp_udp``:
    side "a" and side "b" are the two ends of a veth pair in two network
    namespaces (its frames must cross a real interface), and ``peer_socket``
    is the kernel's own UDP stack on side "b"."""

    def __init__(self, backend: str, veth: Any = None, ipv6: bool = False) -> None:
        self.backend = backend
        self.veth = veth
        self.ipv6 = ipv6            # xdp_udp over IPv6 (the veth pair's fd00:: addresses)
        self.max_datagram = 65507 if veth is None else veth.mtu - (48 if ipv6 else 28)

    def host(self, side: str = "a") -> str:
        if self.veth is None:
            return "127.0.0.1"
        return self.veth.ip6[side] if self.ipv6 else self.veth.ip[side]

    def bind(self, loop: evpl.Loop, handler: Any, side: str = "a", **options: Any) -> Any:
        if self.veth is None:
            return loop.bind(self.backend, ("127.0.0.1", 0), handler, **options)
        with self.veth.inside(side):
            return loop.bind(self.backend, (self.host(side), 0), handler,
                             interface=self.veth.ifname[side], **options)

    def connect(self, loop: evpl.Loop, address: Any, handler: Any, side: str = "b",
                **options: Any) -> Any:
        """A connected datagram Bind on ``side`` to ``address``: the same
        call for every backend but the interface xdp_udp needs."""
        if self.veth is None:
            return loop.connect(self.backend, address, handler, **options)
        with self.veth.inside(side):
            return loop.connect(self.backend, address, handler,
                                interface=self.veth.ifname[side], **options)

    def peer_socket(self, side: str = "b") -> Any:
        """A kernel UDP socket bound on ``side`` (blocking)."""
        import socket

        if self.veth is None:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", 0))
            return s
        with self.veth.inside(side):
            s = socket.socket(socket.AF_INET6 if self.ipv6 else socket.AF_INET,
                              socket.SOCK_DGRAM)
            s.bind((self.host(side), 0))
        return s


@pytest.fixture(scope="session")
def veth_net():
    """Two namespaces joined by a veth pair (tests/core/vethnet.py), made once
    per session and removed at its end; skips where that cannot work."""
    from core.vethnet import VethNet, veth_unavailable_reason

    why = veth_unavailable_reason()
    if why:
        pytest.skip(f"xdp_udp over veth: {why}")
    with VethNet() as net:
        net.settle_ipv6()
        yield net


@pytest.fixture(params=[*DATAGRAM_BACKENDS, "xdp_udp", "xdp_udp-ipv6"])
def dgram_net(request) -> DgramNet:
    """Each datagram backend with the two sides it runs between (xdp_udp
    over IPv4 and over IPv6)."""
    if request.param.startswith("xdp_udp"):
        return DgramNet("xdp_udp", request.getfixturevalue("veth_net"),
                        ipv6=request.param.endswith("ipv6"))
    return DgramNet(request.param)
