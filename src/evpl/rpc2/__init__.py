"""ONC RPC version 2 (RFC 5531) and XDR (RFC 4506) for evpl.

* :mod:`evpl.rpc2.xdr`, :mod:`evpl.rpc2.wire`: the sans-I/O core (XDR codecs,
  call and reply messages, record marking).
* :mod:`evpl.rpc2.xdrgen`: the ``.x`` compiler (``load_x``, ``compile_x``).
* :mod:`evpl.rpc2.errors`: the exceptions (also exported here).
* :class:`Server`, :class:`Client`: bindings over evpl Binds (stream backends
  with record marking, UDP with retransmission and a duplicate request cache).
* :mod:`evpl.rpc2.portmap`: portmapper/rpcbind client and an embedded portmapper.

See docs/rpc2.md.
"""

from evpl.rpc2.client import Client, RpcCall
from evpl.rpc2.errors import (
    AuthError,
    ClientClosed,
    GarbageArgs,
    ProcUnavail,
    ProgMismatch,
    ProgUnavail,
    RpcError,
    RpcMismatch,
    RpcTimeout,
    SystemErr,
)
from evpl.rpc2.server import DEFER, CallContext, Server, current_call
from evpl.rpc2.wire import AUTH_NONE, AcceptStat, AuthFlavor, AuthStat, AuthSys, OpaqueAuth
from evpl.rpc2.xdrgen import compile_x, load_x

__all__ = [
    "AUTH_NONE",
    "DEFER",
    "AcceptStat",
    "AuthError",
    "AuthFlavor",
    "AuthStat",
    "AuthSys",
    "CallContext",
    "Client",
    "ClientClosed",
    "GarbageArgs",
    "OpaqueAuth",
    "ProcUnavail",
    "ProgMismatch",
    "ProgUnavail",
    "RpcCall",
    "RpcError",
    "RpcMismatch",
    "RpcTimeout",
    "Server",
    "SystemErr",
    "compile_x",
    "current_call",
    "load_x",
]
