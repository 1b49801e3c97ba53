"""The exceptions of :mod:`evpl.rpc2`, shared by the client, the server and portmap.

A client raises them from :meth:`~evpl.rpc2.RpcCall.result` when a call
fails; a server handler raises :class:`GarbageArgs`, :class:`ProcUnavail`,
:class:`ProgUnavail`, :class:`SystemErr` or :class:`AuthError` to answer with
that error.  They live here rather than in ``client.py`` so the server (and
anything else) can use them without depending on the client.  The public
names are also exported by :mod:`evpl.rpc2` (where they are documented) and,
for older code, by :mod:`evpl.rpc2.client`.

Hierarchy::

    EvplError
    +-- ProtocolError
    |   +-- RpcError                  the server answered with an error
    |       +-- ProgUnavail, ProgMismatch, ProcUnavail, GarbageArgs, SystemErr
    |       +-- RpcMismatch, AuthError
    +-- TransportError
    |   +-- evpl.TimeoutError
    |       +-- RpcTimeout            no reply within the call's timeout
    +-- ClientClosed                  the client (or its connection) is gone
"""

from __future__ import annotations

import errno

from evpl.errors import EvplError, ProtocolError
from evpl.errors import TimeoutError as EvplTimeoutError
from evpl.rpc2.wire import AcceptStat, AuthStat, RejectStat, Reply

__all__ = [
    "AuthError",
    "ClientClosed",
    "GarbageArgs",
    "ProcUnavail",
    "ProgMismatch",
    "ProgUnavail",
    "RpcError",
    "RpcMismatch",
    "RpcTimeout",
    "SystemErr",
    "reply_error",
]


class RpcError(ProtocolError):
    """The server answered a call with an error (base class)."""


class ProgUnavail(RpcError):
    """PROG_UNAVAIL: the server does not serve the program."""


class ProgMismatch(RpcError):
    """PROG_MISMATCH: the program exists, not in this version; ``low``..``high`` do."""

    def __init__(self, low: int, high: int, message: str | None = None) -> None:
        super().__init__(message or f"program version not served (server has {low}..{high})")
        self.low = low
        self.high = high


class ProcUnavail(RpcError):
    """PROC_UNAVAIL: the program version has no such procedure."""


class GarbageArgs(RpcError):
    """GARBAGE_ARGS: the server could not decode the arguments."""


class SystemErr(RpcError):
    """SYSTEM_ERR: the server failed while executing the call."""


class RpcMismatch(RpcError):
    """MSG_DENIED / RPC_MISMATCH: the server speaks RPC versions ``low``..``high``."""

    def __init__(self, low: int, high: int, message: str | None = None) -> None:
        super().__init__(message or f"RPC version not supported (server has {low}..{high})")
        self.low = low
        self.high = high


class AuthError(RpcError):
    """MSG_DENIED / AUTH_ERROR with ``stat`` (an :class:`AuthStat` or an unknown int)."""

    def __init__(self, stat: AuthStat | int, message: str | None = None) -> None:
        name = stat.name if isinstance(stat, AuthStat) else str(stat)
        super().__init__(message or f"authentication failed: {name}")
        self.stat = stat


class RpcTimeout(EvplTimeoutError):
    """No reply arrived within the call's timeout."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ETIMEDOUT, message)


class ClientClosed(EvplError):
    """The client was closed (or its connection was) before the call completed."""


_ACCEPT_ERRORS: dict[AcceptStat, type[RpcError]] = {
    AcceptStat.PROG_UNAVAIL: ProgUnavail,
    AcceptStat.PROC_UNAVAIL: ProcUnavail,
    AcceptStat.GARBAGE_ARGS: GarbageArgs,
    AcceptStat.SYSTEM_ERR: SystemErr,
}


def reply_error(reply: Reply) -> RpcError:
    """The exception that an unsuccessful :class:`~evpl.rpc2.wire.Reply` stands for."""
    if reply.reject_stat is RejectStat.RPC_MISMATCH:
        low, high = reply.mismatch or (0, 0)
        return RpcMismatch(low, high)
    if reply.reject_stat is RejectStat.AUTH_ERROR:
        return AuthError(reply.auth_stat if reply.auth_stat is not None else 0)
    if reply.accept_stat is AcceptStat.PROG_MISMATCH:
        low, high = reply.mismatch or (0, 0)
        return ProgMismatch(low, high)
    assert reply.accept_stat is not None
    cls = _ACCEPT_ERRORS.get(reply.accept_stat, RpcError)
    return cls(f"call {reply.xid:#x} failed: {reply.accept_stat.name}")
