"""ONC RPC version 2 messages (RFC 5531) and record marking, without I/O.

Calls and replies are encoded into a ``bytearray`` that the caller may keep
appending to (the generated ``pack_T`` of the arguments or results), so a
whole message is built with one buffer and no extra copy.  Decoding works on
any buffer-protocol object and returns the arguments or results as a
``memoryview`` slice of it (no copy), ready for a generated ``unpack_T``.

Malformed messages raise :class:`~evpl.rpc2.xdr.XdrError` (a
``ProtocolError``); a call with an RPC version other than 2 raises
:class:`RpcVersionError`, which carries the xid so a server can answer
``RPC_MISMATCH``.  Record marking errors raise ``FramingError``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from evpl.errors import FramingError, ProtocolError
from evpl.rpc2._fast import XidTable
from evpl.rpc2.xdr import (
    UINT,
    XdrError,
    as_view,
    pack_opaque,
    pack_string,
    unpack_opaque,
)

__all__ = [
    "AUTH_NONE",
    "DEFAULT_MAX_RECORD",
    "MAX_AUTH_BYTES",
    "RPC_VERSION",
    "AcceptStat",
    "AuthFlavor",
    "AuthStat",
    "AuthSys",
    "Call",
    "MsgType",
    "OpaqueAuth",
    "RecordReader",
    "RejectStat",
    "Reply",
    "ReplyStat",
    "RpcVersionError",
    "XidTable",
    "decode_call",
    "decode_message",
    "decode_reply",
    "encode_accepted",
    "encode_auth_error",
    "encode_call",
    "encode_record",
    "encode_rpc_mismatch",
    "pack_accepted_header",
    "pack_call_header",
    "record_mark",
    "set_record_mark",
]

RPC_VERSION = 2
MAX_AUTH_BYTES = 400
"""Largest opaque_auth body (RFC 5531 section 8.2)."""
MAX_MACHINENAME = 255
MAX_GIDS = 16
LAST_FRAGMENT = 0x80000000
MAX_FRAGMENT = 0x7FFFFFFF
DEFAULT_MAX_RECORD = 4 << 20
"""Default largest record (call or reply) the rpc2 client and server accept on a stream."""


class MsgType(IntEnum):
    CALL = 0
    REPLY = 1


class ReplyStat(IntEnum):
    MSG_ACCEPTED = 0
    MSG_DENIED = 1


class AcceptStat(IntEnum):
    SUCCESS = 0
    PROG_UNAVAIL = 1
    PROG_MISMATCH = 2
    PROC_UNAVAIL = 3
    GARBAGE_ARGS = 4
    SYSTEM_ERR = 5


class RejectStat(IntEnum):
    RPC_MISMATCH = 0
    AUTH_ERROR = 1


class AuthStat(IntEnum):
    AUTH_OK = 0
    AUTH_BADCRED = 1
    AUTH_REJECTEDCRED = 2
    AUTH_BADVERF = 3
    AUTH_REJECTEDVERF = 4
    AUTH_TOOWEAK = 5
    AUTH_INVALIDRESP = 6
    AUTH_FAILED = 7
    AUTH_KERB_GENERIC = 8
    AUTH_TIMEEXPIRE = 9
    AUTH_TKT_FILE = 10
    AUTH_DECODE = 11
    AUTH_NET_ADDR = 12
    RPCSEC_GSS_CREDPROBLEM = 13
    RPCSEC_GSS_CTXPROBLEM = 14


class AuthFlavor(IntEnum):
    AUTH_NONE = 0
    AUTH_SYS = 1
    AUTH_SHORT = 2
    AUTH_DH = 3
    RPCSEC_GSS = 6


class RpcVersionError(ProtocolError):
    """A call asked for an RPC version other than 2; answer with ``encode_rpc_mismatch``."""

    def __init__(self, xid: int, version: int) -> None:
        super().__init__(f"call {xid:#x} uses RPC version {version}, not {RPC_VERSION}")
        self.xid = xid
        self.version = version


@dataclass(frozen=True, slots=True)
class OpaqueAuth:
    """An opaque_auth: a flavor (kept as a plain int, flavors are open-ended) and a body."""

    flavor: int
    body: bytes = b""

    def __post_init__(self) -> None:
        if len(self.body) > MAX_AUTH_BYTES:
            raise XdrError(f"opaque_auth body of {len(self.body)} bytes exceeds "
                           f"{MAX_AUTH_BYTES}")


AUTH_NONE = OpaqueAuth(AuthFlavor.AUTH_NONE)


@dataclass(frozen=True, slots=True)
class AuthSys:
    """AUTH_SYS (AUTH_UNIX) credentials (RFC 5531 appendix A)."""

    stamp: int
    machinename: bytes
    uid: int
    gid: int
    gids: tuple[int, ...] = ()

    def to_auth(self) -> OpaqueAuth:
        """The opaque_auth carrying these credentials."""
        if len(self.gids) > MAX_GIDS:
            raise XdrError(f"AUTH_SYS allows at most {MAX_GIDS} gids, got {len(self.gids)}")
        buf = bytearray()
        try:
            buf += UINT.pack(self.stamp)
            pack_string(buf, self.machinename, MAX_MACHINENAME)
            buf += struct.pack(f">III{len(self.gids)}I", self.uid, self.gid,
                               len(self.gids), *self.gids)
        except struct.error as e:
            raise XdrError(f"cannot encode AUTH_SYS: {e}") from None
        return OpaqueAuth(AuthFlavor.AUTH_SYS, bytes(buf))

    @classmethod
    def from_auth(cls, auth: OpaqueAuth) -> AuthSys:
        """Decode the body of an AUTH_SYS opaque_auth (``XdrError`` if malformed)."""
        if auth.flavor != AuthFlavor.AUTH_SYS:
            raise XdrError(f"flavor {auth.flavor} is not AUTH_SYS")
        mv = memoryview(auth.body)
        try:
            (stamp,) = UINT.unpack_from(mv, 0)
            name, off = unpack_opaque(mv, 4, MAX_MACHINENAME)
            uid, gid, n = struct.unpack_from(">III", mv, off)
            if n > MAX_GIDS:
                raise XdrError(f"AUTH_SYS has {n} gids, at most {MAX_GIDS} allowed")
            gids = struct.unpack_from(f">{n}I", mv, off + 12)
        except struct.error as e:
            raise XdrError(f"truncated AUTH_SYS credentials: {e}") from None
        if off + 12 + 4 * n != len(mv):
            raise XdrError("AUTH_SYS credentials have trailing bytes")
        return cls(stamp, name, uid, gid, gids)


@dataclass(slots=True)
class Call:
    """A decoded call; ``args`` is a view of the encoded arguments (no copy)."""

    xid: int
    prog: int
    vers: int
    proc: int
    cred: OpaqueAuth
    verf: OpaqueAuth
    data: memoryview
    args_offset: int

    @property
    def args(self) -> memoryview:
        """The encoded procedure arguments."""
        return self.data[self.args_offset:]


_EMPTY = memoryview(b"")


@dataclass(slots=True)
class Reply:
    """A decoded reply.

    ``stat`` is MSG_ACCEPTED or MSG_DENIED.  Accepted replies carry ``verf``
    and ``accept_stat``; denied ones ``reject_stat`` and, for AUTH_ERROR,
    ``auth_stat`` (an ``AuthStat`` or, if unknown, an int).  ``mismatch`` is
    ``(low, high)`` for PROG_MISMATCH and RPC_MISMATCH.  ``results`` views
    the encoded results of a SUCCESS reply (empty otherwise).
    """

    xid: int
    stat: ReplyStat
    accept_stat: AcceptStat | None = None
    reject_stat: RejectStat | None = None
    auth_stat: AuthStat | int | None = None
    mismatch: tuple[int, int] | None = None
    verf: OpaqueAuth | None = None
    results: memoryview = _EMPTY

    @property
    def ok(self) -> bool:
        """True for an accepted, successful reply."""
        return self.accept_stat is AcceptStat.SUCCESS


_CALL_HEAD = struct.Struct(">IIIIIIII")  # xid, CALL, rpcvers, prog, vers, proc, flavor, len
_AUTH_HEAD = struct.Struct(">II")
_REPLY_HEAD = struct.Struct(">III")  # xid, REPLY, reply_stat
_ACCEPTED_NONE = struct.Struct(">IIIIII")  # xid, REPLY, ACCEPTED, AUTH_NONE, 0, accept_stat


# plain ints for the per-call paths (enum attribute lookups cost more than the work)
_CALL = int(MsgType.CALL)
_REPLY = int(MsgType.REPLY)
_ACCEPTED = int(ReplyStat.MSG_ACCEPTED)
_SUCCESS = int(AcceptStat.SUCCESS)


def _pack_auth(buf: bytearray, auth: OpaqueAuth) -> None:
    buf += UINT.pack(auth.flavor)
    pack_opaque(buf, auth.body, MAX_AUTH_BYTES)


def _unpack_auth(mv: memoryview, off: int) -> tuple[OpaqueAuth, int]:
    if off + 8 > len(mv):
        raise XdrError(f"truncated opaque_auth at offset {off}")
    (flavor,) = UINT.unpack_from(mv, off)
    body, off = unpack_opaque(mv, off + 4, MAX_AUTH_BYTES)
    return OpaqueAuth(flavor, body), off


def pack_call_header(buf: bytearray, xid: int, prog: int, vers: int, proc: int,
                     cred: OpaqueAuth = AUTH_NONE, verf: OpaqueAuth = AUTH_NONE) -> None:
    """Append a call header; the encoded arguments follow it in ``buf``."""
    try:
        buf += _CALL_HEAD.pack(xid, MsgType.CALL, RPC_VERSION, prog, vers, proc,
                               cred.flavor, len(cred.body))
    except struct.error as e:
        raise XdrError(f"cannot encode call header: {e}") from None
    buf += cred.body
    buf += b"\0" * (-len(cred.body) & 3)
    _pack_auth(buf, verf)


def encode_call(xid: int, prog: int, vers: int, proc: int, args: Any = b"",
                cred: OpaqueAuth = AUTH_NONE, verf: OpaqueAuth = AUTH_NONE) -> bytes:
    """A whole call message: header followed by the encoded ``args``."""
    buf = bytearray()
    pack_call_header(buf, xid, prog, vers, proc, cred, verf)
    buf += args
    return bytes(buf)


def pack_accepted_header(buf: bytearray, xid: int, stat: AcceptStat | int = _SUCCESS,
                         verf: OpaqueAuth = AUTH_NONE) -> None:
    """Append an accepted-reply header; SUCCESS results (or mismatch info) follow it."""
    try:
        if verf is AUTH_NONE:
            buf += _ACCEPTED_NONE.pack(xid, _REPLY, _ACCEPTED, 0, 0, stat)
            return
        buf += _REPLY_HEAD.pack(xid, _REPLY, _ACCEPTED)
    except struct.error as e:
        raise XdrError(f"cannot encode reply header: {e}") from None
    _pack_auth(buf, verf)
    buf += UINT.pack(stat)


def encode_accepted(xid: int, stat: AcceptStat = AcceptStat.SUCCESS, results: Any = b"",
                    *, verf: OpaqueAuth = AUTH_NONE, low: int = 0, high: int = 0) -> bytes:
    """An accepted reply: SUCCESS with ``results``, PROG_MISMATCH with ``low``/``high``,
    or PROG_UNAVAIL / PROC_UNAVAIL / GARBAGE_ARGS / SYSTEM_ERR."""
    buf = bytearray()
    pack_accepted_header(buf, xid, stat, verf)
    if stat == AcceptStat.SUCCESS:
        buf += results
    elif stat == AcceptStat.PROG_MISMATCH:
        buf += struct.pack(">II", low, high)
    return bytes(buf)


def encode_rpc_mismatch(xid: int, low: int = RPC_VERSION, high: int = RPC_VERSION) -> bytes:
    """A denied reply: the RPC version is not supported."""
    return struct.pack(">IIIIII", xid, MsgType.REPLY, ReplyStat.MSG_DENIED,
                       RejectStat.RPC_MISMATCH, low, high)


def encode_auth_error(xid: int, stat: AuthStat | int) -> bytes:
    """A denied reply: authentication failed with ``stat``."""
    return struct.pack(">IIIII", xid, MsgType.REPLY, ReplyStat.MSG_DENIED,
                       RejectStat.AUTH_ERROR, stat)


def decode_call(data: Any) -> Call:
    """Decode a call message (any buffer); the arguments are left encoded in ``Call.args``."""
    mv = as_view(data)
    if len(mv) < _CALL_HEAD.size:
        raise XdrError(f"call of {len(mv)} bytes is shorter than a call header")
    xid, mtype, rpcvers, prog, vers, proc, flavor, n = _CALL_HEAD.unpack_from(mv, 0)
    if mtype != _CALL:
        raise XdrError(f"message {xid:#x} is not a call (type {mtype})")
    if rpcvers != RPC_VERSION:
        raise RpcVersionError(xid, rpcvers)
    if n > MAX_AUTH_BYTES:
        raise XdrError(f"credential body of {n} bytes exceeds {MAX_AUTH_BYTES}")
    off = _CALL_HEAD.size + n + (-n & 3)
    size = len(mv)
    if off > size:
        raise XdrError("truncated credentials")
    if flavor == 0 and n == 0:
        cred = AUTH_NONE                       # the common cases skip the dataclass
    else:
        cred = OpaqueAuth(flavor, bytes(mv[_CALL_HEAD.size:_CALL_HEAD.size + n]))
    if off + 8 <= size and _AUTH_HEAD.unpack_from(mv, off) == (0, 0):
        return Call(xid, prog, vers, proc, cred, AUTH_NONE, mv, off + 8)
    verf, off = _unpack_auth(mv, off)
    return Call(xid, prog, vers, proc, cred, verf, mv, off)


def decode_reply(data: Any) -> Reply:
    """Decode a reply message (any buffer); SUCCESS results stay encoded in ``Reply.results``."""
    mv = as_view(data)
    if len(mv) < 12:
        raise XdrError(f"reply of {len(mv)} bytes is shorter than a reply header")
    xid, mtype, rstat = _REPLY_HEAD.unpack_from(mv, 0)
    if mtype != MsgType.REPLY:
        raise XdrError(f"message {xid:#x} is not a reply (type {mtype})")
    try:
        if rstat == ReplyStat.MSG_ACCEPTED:
            verf, off = _unpack_auth(mv, 12)
            (astat,) = UINT.unpack_from(mv, off)
            off += 4
            try:
                accept = AcceptStat(astat)
            except ValueError:
                raise XdrError(f"reply {xid:#x} has unknown accept_stat {astat}") from None
            reply = Reply(xid, ReplyStat.MSG_ACCEPTED, accept_stat=accept, verf=verf)
            if accept == AcceptStat.SUCCESS:
                reply.results = mv[off:]
            elif accept == AcceptStat.PROG_MISMATCH:
                reply.mismatch = struct.unpack_from(">II", mv, off)
            return reply
        if rstat == ReplyStat.MSG_DENIED:
            (rj,) = UINT.unpack_from(mv, 12)
            if rj == RejectStat.RPC_MISMATCH:
                return Reply(xid, ReplyStat.MSG_DENIED, reject_stat=RejectStat.RPC_MISMATCH,
                             mismatch=struct.unpack_from(">II", mv, 16))
            if rj == RejectStat.AUTH_ERROR:
                (au,) = UINT.unpack_from(mv, 16)
                auth: AuthStat | int = AuthStat(au) if au in AuthStat._value2member_map_ else au
                return Reply(xid, ReplyStat.MSG_DENIED, reject_stat=RejectStat.AUTH_ERROR,
                             auth_stat=auth)
            raise XdrError(f"reply {xid:#x} has unknown reject_stat {rj}")
    except struct.error as e:
        raise XdrError(f"truncated reply {xid:#x}: {e}") from None
    raise XdrError(f"reply {xid:#x} has unknown reply_stat {rstat}")


def decode_message(data: Any) -> Call | Reply:
    """Decode a call or a reply, whichever ``data`` holds."""
    mv = as_view(data)
    if len(mv) < 8:
        raise XdrError(f"message of {len(mv)} bytes is too short")
    (mtype,) = UINT.unpack_from(mv, 4)
    return decode_call(mv) if mtype == MsgType.CALL else decode_reply(mv)


# -- record marking (RFC 5531 section 11) ------------------------------------

def record_mark(length: int, last: bool = True) -> bytes:
    """The 4-byte header of a fragment of ``length`` bytes."""
    if not 0 <= length <= MAX_FRAGMENT:
        raise FramingError(f"fragment length {length} out of range")
    return UINT.pack(length | (LAST_FRAGMENT if last else 0))


def set_record_mark(buf: bytearray) -> None:
    """Fill the 4 bytes reserved at the start of ``buf`` with a last-fragment header.

    Build a message as ``buf = bytearray(4)``, append the call or reply, then
    call this: one buffer, ready to send on a stream.
    """
    n = len(buf) - 4
    if not 0 <= n <= MAX_FRAGMENT:
        raise FramingError(f"record of {n} bytes does not fit in one fragment")
    UINT.pack_into(buf, 0, n | LAST_FRAGMENT)


def encode_record(payload: Any, max_fragment: int = MAX_FRAGMENT) -> list[Any]:
    """Pieces (headers and views of ``payload``) that send it as one record."""
    mv = as_view(payload)
    if not 1 <= max_fragment <= MAX_FRAGMENT:
        raise FramingError(f"max_fragment {max_fragment} out of range")
    pieces: list[Any] = []
    off = 0
    while True:
        chunk = mv[off:off + max_fragment]
        off += len(chunk)
        last = off >= len(mv)
        pieces.append(record_mark(len(chunk), last))
        pieces.append(chunk)
        if last:
            return pieces


class RecordReader:
    """Reassembles records from a byte stream fed in arbitrary chunks.

    ``feed(chunk)`` returns the records completed by that chunk, as
    ``bytes``.  A record whose fragments add up to more than ``max_record``
    bytes raises ``FramingError`` as soon as its header says so, before the
    data arrives; after an error the reader refuses further input.
    """

    __slots__ = ("_broken", "_buf", "_last", "_need", "_record", "max_record")

    def __init__(self, max_record: int = 64 << 20) -> None:
        if max_record < 0:
            raise FramingError("max_record must be >= 0")
        self.max_record = max_record
        self._buf = bytearray()    # bytes received and not consumed yet
        self._record = bytearray()  # fragments of the current record so far
        self._need = -1            # bytes of the current fragment still missing, -1: header
        self._last = False
        self._broken: FramingError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held for records not complete yet."""
        return len(self._buf) + len(self._record)

    def feed(self, chunk: Any) -> list[bytes]:
        """Add stream bytes; return the records they complete."""
        if self._broken is not None:
            raise self._broken
        self._buf += chunk
        return list(self._records())

    def _records(self) -> Iterator[bytes]:
        buf = self._buf
        pos = 0
        try:
            while True:
                if self._need < 0:
                    if len(buf) - pos < 4:
                        break
                    (mark,) = UINT.unpack_from(buf, pos)
                    pos += 4
                    self._last = bool(mark & LAST_FRAGMENT)
                    self._need = mark & MAX_FRAGMENT
                    if len(self._record) + self._need > self.max_record:
                        self._broken = FramingError(
                            f"record of at least {len(self._record) + self._need} bytes "
                            f"exceeds the limit of {self.max_record}")
                        raise self._broken
                take = min(self._need, len(buf) - pos)
                if take == self._need and self._last and not self._record:
                    record = bytes(buf[pos:pos + take])  # common case: one fragment
                else:
                    self._record += buf[pos:pos + take]
                    record = None
                pos += take
                self._need -= take
                if self._need:
                    break
                self._need = -1
                if self._last:
                    if record is None:
                        record = bytes(self._record)
                        self._record.clear()
                    yield record
        finally:
            del buf[:pos]
