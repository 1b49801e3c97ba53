"""The backend registry: which I/O paths exist, and which work here.

Each backend is named (``"tcp"``, ``"udp"``, ``"unix"``, ...), has a kind
(stream or datagram) and capabilities, and is probed once on first use so
that ``evpl info`` can say why a backend is unavailable on this machine.
Each also names the native module that implements it (``evpl._native.epoll``,
``evpl._native.uring``): ``evpl.Loop`` hands the sockets it creates to that
module's ``stream``, ``datagram`` and ``listener`` functions, which make the
backend's Bind and Listener types (see docs/engine.md, "How to add a
backend").
"""

from __future__ import annotations

import importlib
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from evpl.errors import BackendUnavailable, ConfigError

__all__ = ["BackendInfo", "backends", "get", "native", "select"]

Kind = Literal["stream", "datagram"]


@dataclass(frozen=True)
class BackendInfo:
    """What ``evpl.backends()`` reports for one backend."""

    name: str
    kind: Kind
    family: int
    capabilities: frozenset[str]
    description: str
    available: bool = True
    reason: str = ""


@dataclass
class _Backend:
    name: str
    kind: Kind
    family: int
    capabilities: frozenset[str]
    description: str
    probe: Callable[[], str | None]
    module: str
    _result: BackendInfo | None = field(default=None, repr=False)

    def info(self) -> BackendInfo:
        if self._result is None:
            try:
                why = self.probe()
            except Exception as exc:  # a probe must never break the registry
                why = f"probe failed: {exc!r}"
            self._result = BackendInfo(
                self.name, self.kind, self.family, self.capabilities, self.description,
                available=why is None, reason=why or "",
            )
        return self._result


def _probe_socket(family: int, kind: int) -> Callable[[], str | None]:
    def probe() -> str | None:
        try:
            socket.socket(family, kind).close()
        except OSError as exc:
            return f"cannot create socket: {exc.strerror}"
        return None

    return probe


_REGISTRY: dict[str, _Backend] = {}


def register(backend: _Backend) -> None:
    """Add a backend to the registry (used by backend modules)."""
    _REGISTRY[backend.name] = backend


register(_Backend(
    "tcp", "stream", socket.AF_INET, frozenset({"stream", "epoll", "inet", "inet6"}),
    "TCP over kernel sockets and epoll (writev batching)",
    _probe_socket(socket.AF_INET, socket.SOCK_STREAM), "evpl._native.epoll",
))
register(_Backend(
    "unix", "stream", socket.AF_UNIX, frozenset({"stream", "epoll", "local"}),
    "Unix domain stream sockets over epoll",
    _probe_socket(socket.AF_UNIX, socket.SOCK_STREAM), "evpl._native.epoll",
))
register(_Backend(
    "udp", "datagram", socket.AF_INET, frozenset({"datagram", "epoll", "inet", "inet6",
                                                  "recvmmsg", "sendmmsg", "gso"}),
    "UDP over kernel sockets and epoll (recvmmsg/sendmmsg batching, GSO/GRO trains)",
    _probe_socket(socket.AF_INET, socket.SOCK_DGRAM), "evpl._native.epoll",
))


def _probe_uring(family: int) -> Callable[[], str | None]:
    def probe() -> str | None:
        from evpl._native.uring import uring_unavailable_reason

        try:
            with open("/proc/sys/kernel/io_uring_disabled") as f:
                if f.read().strip() == "2":
                    return "io_uring is disabled (kernel.io_uring_disabled = 2)"
        except OSError:
            pass
        return uring_unavailable_reason() or _probe_socket(family, socket.SOCK_STREAM)()

    return probe


_URING_CAPS = {"stream", "io_uring", "multishot", "provided_buffers", "zero_copy_send"}
register(_Backend(
    "io_uring_tcp", "stream", socket.AF_INET, frozenset(_URING_CAPS | {"inet", "inet6"}),
    "TCP over io_uring: multishot accept/recv into pool buffers, batched sendmsg, SEND_ZC",
    _probe_uring(socket.AF_INET), "evpl._native.uring",
))
register(_Backend(
    "io_uring_udp", "datagram", socket.AF_INET,
    frozenset({"datagram", "io_uring", "multishot", "provided_buffers", "inet", "inet6", "gso"}),
    "UDP over io_uring: multishot recvmsg into pool buffer slots, one sendmsg per datagram "
    "or GSO train",
    _probe_uring(socket.AF_INET), "evpl._native.uring",
))
register(_Backend(
    "io_uring_unix", "stream", socket.AF_UNIX, frozenset(_URING_CAPS | {"local"}),
    "Unix domain stream sockets over io_uring",
    _probe_uring(socket.AF_UNIX), "evpl._native.uring",
))


def _probe_xdp() -> str | None:
    from evpl.core.xdp import registry_reason

    return registry_reason()


register(_Backend(
    "xdp_udp", "datagram", socket.AF_INET,
    frozenset({"datagram", "xdp", "inet", "inet6", "kernel_bypass", "zero_copy_send"}),
    "UDP over AF_XDP (evpl's XDP program, UMEM from a pinned pool, zero-copy receive and "
    "send; loop.bind/connect(..., interface=)); IPv4 and IPv6, datagrams up to the MTU",
    _probe_xdp, "evpl._native.xdp",
))


def backends() -> list[BackendInfo]:
    """Every known backend, available or not (with the reason)."""
    return [b.info() for b in _REGISTRY.values()]


def get(name: str, kind: Kind | None = None) -> BackendInfo:
    """The named backend; raises if unknown, unavailable or of the wrong kind."""
    try:
        info = _REGISTRY[name].info()
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise ConfigError(f"unknown backend {name!r} (known: {known})") from None
    if not info.available:
        raise BackendUnavailable(f"backend {name!r} is not available here: {info.reason}")
    if kind is not None and info.kind != kind:
        raise ConfigError(f"backend {name!r} is a {info.kind} backend; a {kind} one is needed")
    return info


def select(*, stream: bool = True, require: frozenset[str] | set[str] = frozenset()) -> str:
    """The first available backend of the given kind with every capability in
    ``require`` (e.g. ``select(stream=True, require={"zero_copy_send"})``)."""
    kind = "stream" if stream else "datagram"
    for b in backends():
        if b.available and b.kind == kind and set(require) <= b.capabilities:
            return b.name
    raise BackendUnavailable(f"no available {kind} backend offers {sorted(require)}")


def native(name: str) -> Any:
    """The native module that implements backend ``name`` (its ``stream``,
    ``datagram`` and ``listener`` functions adopt sockets into Binds)."""
    return importlib.import_module(_REGISTRY[name].module)
