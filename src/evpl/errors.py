"""The evpl exception hierarchy.

Every error evpl raises or reports is an :class:`EvplError`.  Errors that come
from the operating system also derive from the matching built-in ``OSError``
subclass, so ``except ConnectionRefusedError`` keeps working for code written
against the standard library.
"""

from __future__ import annotations

import builtins
import errno as _errno
import os

__all__ = [
    "BackendUnavailable",
    "Busy",
    "ConfigError",
    "ConnectionRefused",
    "ConnectionReset",
    "EvplError",
    "FramingError",
    "PoolExhausted",
    "ProtocolError",
    "SendQueueFull",
    "ShardError",
    "TimeoutError",
    "TransportError",
    "Unreachable",
    "transport_error",
]


class EvplError(Exception):
    """Base class of every exception evpl raises."""


class ConfigError(EvplError, ValueError):
    """Bad configuration, rejected when it is given rather than when it bites."""


class BackendUnavailable(EvplError):
    """The requested backend does not work on this machine (the message says why)."""


class FramingError(EvplError):
    """A stream violated its framing: oversized, malformed or truncated message."""


class ProtocolError(EvplError):
    """A peer broke the rules of a protocol spoken over a Bind."""


class SendQueueFull(EvplError):
    """A send would grow a Bind's queue past its hard limit.

    Well-behaved senders stop on ``on_paused`` and resume on ``on_writable``;
    this exception is for callers that ignore those events.
    """


class Busy(EvplError):
    """A bounded queue is full (a loop's call queue, a WorkerPool, a ring
    between shards): try again later, or slow the producer down."""


class ShardError(EvplError):
    """A shard is gone (it exited or was killed) or refused a message."""


class PoolExhausted(EvplError):
    """The buffer pool reached its memory limit and could not serve a request."""


class TransportError(EvplError, OSError):
    """An operating-system error on a Bind (carries ``errno`` and ``strerror``)."""


class ConnectionRefused(TransportError, ConnectionRefusedError):
    """The peer refused the connection."""


class ConnectionReset(TransportError, ConnectionResetError):
    """The peer reset the connection."""


class Unreachable(TransportError):
    """The network or host is unreachable."""


class TimeoutError(TransportError, builtins.TimeoutError):
    """An operation did not complete in time."""


_BY_ERRNO: dict[int, type[TransportError]] = {
    _errno.ECONNREFUSED: ConnectionRefused,
    _errno.ECONNRESET: ConnectionReset,
    _errno.EPIPE: ConnectionReset,
    _errno.ENETUNREACH: Unreachable,
    _errno.EHOSTUNREACH: Unreachable,
    _errno.ETIMEDOUT: TimeoutError,
}


def transport_error(err: int, context: str = "") -> TransportError:
    """Build the :class:`TransportError` subclass that matches ``err``."""
    cls = _BY_ERRNO.get(err, TransportError)
    msg = os.strerror(err)
    if context:
        msg = f"{context}: {msg}"
    return cls(err, msg)
