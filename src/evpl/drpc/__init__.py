"""drpc: datagram RPC in the style of eRPC (NSDI 2019) on evpl's datagram backends.

* :mod:`evpl.drpc.wire`: the packet header and control payloads (sans-I/O).
* :mod:`evpl.drpc.session`: sessions, request windows, credits, multi-packet
  messages, go-back-N loss recovery, the at-most-once response cache
  (sans-I/O).
* :mod:`evpl.drpc.cc`: Timely congestion control (sans-I/O); packets are
  paced by the engine's timing wheel (``evpl._native.wheel``).
* :class:`Server`, :class:`Client`: the bindings over evpl datagram Binds
  (``udp``, ``io_uring_udp``, and any other datagram backend by name).

See docs/drpc.md.
"""

from evpl.drpc.cc import Timely
from evpl.drpc.client import Call, Client
from evpl.drpc.server import Request, Server
from evpl.drpc.session import (
    CallTimeout,
    DrpcError,
    PeerDead,
    RemoteError,
    SessionClosed,
    SessionRejected,
)

__all__ = [
    "Call",
    "CallTimeout",
    "Client",
    "DrpcError",
    "PeerDead",
    "RemoteError",
    "Request",
    "Server",
    "SessionClosed",
    "SessionRejected",
    "Timely",
]
