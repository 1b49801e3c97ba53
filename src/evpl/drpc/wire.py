"""drpc packets: the header codec and the control payloads (sans-I/O).

Every drpc packet is one datagram: a 28-byte header, then a payload.  All
fields are big-endian (network order)::

    offset size field
    0      1    magic      0xD7 (drpc, version 1)
    1      1    type       PacketType
    2      1    req_type   the request type (handler number), 0 for control packets
    3      1    flags      RESP: FLAG_ERROR (the payload is an error text),
                           FLAG_NO_RTT (answered late: ts is no RTT sample);
                           CONNECT_OK: FLAG_RFR_RANGE (the server answers
                           ranged RFRs); CONNECT: FLAG_CR_RANGE (the
                           client takes ranged credit returns)
    4      4    session    the RECEIVER's session number
    8      8    req_num    request number; req_num % window is the request slot
    16     4    msg_size   size of the whole message (REQ and RESP); in an
                           RFR the number of packets asked for, from pkt_num
                           on (0 or 1: one; more only to a server whose
                           CONNECT_OK had FLAG_RFR_RANGE); in a CR the number
                           of request packets it returns credits for, ending
                           at pkt_num (0 or 1: one; more only to a client
                           whose CONNECT had FLAG_CR_RANGE); else 0
    20     4    pkt_num    packet number within the message (REQ, RESP), the
                           response packet asked for (RFR), or the last
                           request packet acknowledged (CR: every packet of
                           the request up to it has arrived)
    24     4    ts         the client's clock in microseconds (mod 2**32) when
                           it sent a REQ or RFR; the server echoes it in the CR
                           or RESP that answers, which gives the client an RTT

A message of ``msg_size`` bytes travels as ``packets(msg_size, payload)``
packets; packet ``k`` carries bytes ``[k * payload, (k + 1) * payload)``
(a zero-byte message is one packet with an empty payload).  docs/drpc.md
describes the exchange.

This module imports nothing from evpl but ``evpl.errors``: it can be fuzzed
and tested without a socket.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from evpl.errors import ProtocolError

__all__ = [
    "FLAG_CR_RANGE",
    "FLAG_ERROR",
    "FLAG_NO_RTT",
    "FLAG_RFR_RANGE",
    "HEADER",
    "HEADER_SIZE",
    "MAGIC",
    "MAX_REQ_TYPE",
    "Connect",
    "ConnectOk",
    "ConnectReject",
    "PacketType",
    "RejectReason",
    "check_data_packet",
    "pack_header",
    "packets",
    "parse_header",
]

MAGIC = 0xD7
HEADER = struct.Struct(">BBBBIQIII")
HEADER_SIZE = HEADER.size          # 28
MAX_REQ_TYPE = 255
FLAG_ERROR = 0x01                  # RESP: the payload is a UTF-8 error text
FLAG_NO_RTT = 0x02                 # RESP: answered late (ts is no RTT sample)
FLAG_RFR_RANGE = 0x04              # CONNECT_OK: an RFR may ask for several packets
FLAG_CR_RANGE = 0x08               # CONNECT: a CR may return several packets' credits
U32 = 0xFFFFFFFF


class PacketType(IntEnum):
    """What a packet is (header byte 1)."""

    REQ = 1             # client -> server: a request packet
    RESP = 2            # server -> client: a response packet
    RFR = 3             # client -> server: request for response packets pkt_num.. (msg_size)
    CR = 4              # server -> client: credit return for request packet pkt_num
    CONNECT = 5         # client -> server: open a session (payload: Connect)
    CONNECT_OK = 6      # server -> client: the session (payload: ConnectOk)
    CONNECT_REJECT = 7  # server -> client: refused (payload: ConnectReject)
    DISCONNECT = 8      # client -> server: close the session
    DISCONNECT_OK = 9   # server -> client: closed (also for an unknown session)


def pack_header(ptype: int, req_type: int, session: int, req_num: int, msg_size: int = 0,
                pkt_num: int = 0, ts: int = 0, flags: int = 0) -> bytes:
    """The 28 header bytes (raises ``struct.error`` for out-of-range fields)."""
    return HEADER.pack(MAGIC, ptype, req_type, flags, session, req_num, msg_size, pkt_num,
                       ts & U32)


def parse_header(data: object) -> tuple[int, int, int, int, int, int, int, int]:
    """``(type, req_type, flags, session, req_num, msg_size, pkt_num, ts)`` of a
    packet; ``ProtocolError`` if it is shorter than a header, has the wrong
    magic, or an unknown type."""
    try:
        magic, ptype, req_type, flags, session, req_num, msg_size, pkt_num, ts = \
            HEADER.unpack_from(data)  # type: ignore[arg-type]
    except struct.error:
        raise ProtocolError(f"drpc packet shorter than its {HEADER_SIZE}-byte header") from None
    if magic != MAGIC:
        raise ProtocolError(f"not a drpc packet (magic {magic:#04x})")
    if not PacketType.REQ <= ptype <= PacketType.DISCONNECT_OK:
        raise ProtocolError(f"unknown drpc packet type {ptype}")
    return ptype, req_type, flags, session, req_num, msg_size, pkt_num, ts


def packets(msg_size: int, payload: int) -> int:
    """How many packets carry a message of ``msg_size`` bytes when each
    carries at most ``payload`` bytes (at least one)."""
    return max(1, -(-msg_size // payload))


def check_data_packet(msg_size: int, pkt_num: int, length: int, payload: int,
                      max_message: int) -> str | None:
    """Why a REQ or RESP packet with this header and ``length`` payload bytes
    is malformed, or ``None``: the message fits ``max_message``, the packet
    number is within the message, and the payload is exactly the part of the
    message that packet carries."""
    if msg_size > max_message:
        return f"message of {msg_size} bytes exceeds the maximum ({max_message})"
    n = packets(msg_size, payload)
    if pkt_num >= n:
        return f"packet {pkt_num} of a {n}-packet message"
    want = min(payload, msg_size - pkt_num * payload)
    if length != want:
        return f"packet {pkt_num} carries {length} bytes, {want} expected"
    return None


# -- control payloads -----------------------------------------------------------

_CONNECT = struct.Struct(">IIHHHH")
_CONNECT_OK = struct.Struct(">IIHHHH")


@dataclass(frozen=True)
class Connect:
    """CONNECT payload: the client's session number (the server puts it in
    every packet it sends to the client), the largest message and datagram
    it accepts, and the window and credits it asks for. The header's
    req_num is a nonce the answer echoes."""

    client_session: int
    max_message: int
    max_datagram: int
    window: int
    credits: int

    def pack(self) -> bytes:
        return _CONNECT.pack(self.client_session, self.max_message, self.max_datagram,
                             self.window, self.credits, 0)

    @classmethod
    def unpack(cls, data: object) -> Connect:
        try:
            cs, mm, md, w, c, _ = _CONNECT.unpack_from(data)  # type: ignore[arg-type]
        except struct.error:
            raise ProtocolError("truncated CONNECT payload") from None
        return cls(cs, mm, md, w, c)


@dataclass(frozen=True)
class ConnectOk:
    """CONNECT_OK payload: the server's session number (the client puts it in
    every packet it sends) and the session's limits, which the client must
    respect: request window, credits (packets in flight), largest message
    (both directions) and datagram size (header included); and after how
    many seconds of silence the server forgets the session (0: never), so
    that a client idle that long connects again before its next call."""

    server_session: int
    max_message: int
    max_datagram: int
    window: int
    credits: int
    session_timeout: int = 0

    def pack(self) -> bytes:
        return _CONNECT_OK.pack(self.server_session, self.max_message, self.max_datagram,
                                self.window, self.credits, min(self.session_timeout, 0xFFFF))

    @classmethod
    def unpack(cls, data: object) -> ConnectOk:
        try:
            ss, mm, md, w, c, t = _CONNECT_OK.unpack_from(data)  # type: ignore[arg-type]
        except struct.error:
            raise ProtocolError("truncated CONNECT_OK payload") from None
        if w < 1 or c < 1 or md <= HEADER_SIZE:
            raise ProtocolError(f"CONNECT_OK with unusable limits (window {w}, credits {c}, "
                                f"datagram {md})")
        return cls(ss, mm, md, w, c, t)


class RejectReason(IntEnum):
    """Why a server refused a session."""

    TOO_MANY_SESSIONS = 1
    BAD_PARAMETERS = 2
    SHUTTING_DOWN = 3


@dataclass(frozen=True)
class ConnectReject:
    """CONNECT_REJECT payload: a reason code and a text for people."""

    reason: int
    text: str

    def pack(self) -> bytes:
        return struct.pack(">H", self.reason) + self.text.encode()[:512]

    @classmethod
    def unpack(cls, data: object) -> ConnectReject:
        mv = memoryview(data)  # type: ignore[arg-type]
        if len(mv) < 2:
            raise ProtocolError("truncated CONNECT_REJECT payload")
        (reason,) = struct.unpack_from(">H", mv)
        return cls(reason, bytes(mv[2:]).decode("utf-8", "replace"))
