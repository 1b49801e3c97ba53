"""evpl: high-performance event-driven networking for Python.

One sockets-like, asynchronous API over very different I/O paths (kernel
sockets over epoll, io_uring; AF_XDP next, behind the same contract),
pooled zero-copy buffers, and framing in the native engine.
"""

from evpl import framing
from evpl._native.bind import Bind, Limits, Listener
from evpl._native.buffers import Buffer, Pool
from evpl._native.loop import Deferral, Doorbell, FdWatch, Timer
from evpl.core.backends import BackendInfo, backends, select
from evpl.core.handler import Handler
from evpl.core.loop import Loop, default_pool
from evpl.errors import (
    BackendUnavailable,
    Busy,
    ConfigError,
    ConnectionRefused,
    ConnectionReset,
    EvplError,
    FramingError,
    PoolExhausted,
    ProtocolError,
    SendQueueFull,
    ShardError,
    TimeoutError,
    TransportError,
    Unreachable,
)

__version__ = "0.1.0"

__all__ = [
    "BackendInfo",
    "BackendUnavailable",
    "Bind",
    "Buffer",
    "Busy",
    "ConfigError",
    "ConnectionRefused",
    "ConnectionReset",
    "Deferral",
    "Doorbell",
    "EvplError",
    "FdWatch",
    "FramingError",
    "Handler",
    "Limits",
    "Listener",
    "Loop",
    "Pool",
    "PoolExhausted",
    "ProtocolError",
    "SendQueueFull",
    "ShardError",
    "TimeoutError",
    "Timer",
    "TransportError",
    "Unreachable",
    "backends",
    "default_pool",
    "framing",
    "select",
]
