"""ZeroMQ (ZMTP 3.1) sockets on evpl's engine, wire-compatible with libzmq.

``evpl.zmtp.Socket(loop, "PULL")`` is a ZeroMQ socket whose peers may be any
libzmq program (pyzmq, czmq, ...) or another evpl.zmtp socket. See
docs/zmtp.md for the API, the options and how it maps to pyzmq.
"""

from evpl.zmtp.mechanisms import (
    AuthenticationError,
    HandshakeError,
    curve_keypair,
    curve_public,
)
from evpl.zmtp.sockets import (
    NOBLOCK,
    SNDMORE,
    SOCKET_TYPES,
    Again,
    Event,
    HostUnreachable,
    Socket,
    StateError,
    ZapRequest,
    ZMTPError,
)
from evpl.zmtp.wire import z85_decode, z85_encode

__all__ = [
    "NOBLOCK",
    "SNDMORE",
    "SOCKET_TYPES",
    "Again",
    "AuthenticationError",
    "Event",
    "HandshakeError",
    "HostUnreachable",
    "Socket",
    "StateError",
    "ZMTPError",
    "ZapRequest",
    "curve_keypair",
    "curve_public",
    "z85_decode",
    "z85_encode",
]
