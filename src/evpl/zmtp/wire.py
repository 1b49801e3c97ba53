"""ZMTP 3.x wire format, sans I/O (rfc.zeromq.org specs 23 and 37; Z85, spec 32).

Bytes in, events out; events in, bytes out. Nothing here touches a socket:
the socket layer (sockets.py) feeds it what the engine's ZMTP framer cut,
and the tests feed it hostile bytes directly.

The stream of one connection is: a 64-byte greeting each way, then frames.
A frame is a flags byte (bit 0 MORE, bit 1 LONG, bit 2 COMMAND, the rest
zero), a size (one byte, or eight bytes big-endian when LONG) and the body.
A command is one frame whose body is a name (one length byte, then ASCII)
and the command's data.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from evpl.errors import ProtocolError

__all__ = [
    "FLAG_COMMAND",
    "FLAG_LONG",
    "FLAG_MORE",
    "GREETING_SIZE",
    "Command",
    "Decoder",
    "Greeting",
    "Message",
    "cancel",
    "decode_metadata",
    "encode_command",
    "encode_frame",
    "encode_greeting",
    "encode_message",
    "encode_metadata",
    "error",
    "parse_command",
    "parse_greeting",
    "ping",
    "pong",
    "ready",
    "subscribe",
    "z85_decode",
    "z85_encode",
]

FLAG_MORE = 0x01
FLAG_LONG = 0x02
FLAG_COMMAND = 0x04
GREETING_SIZE = 64
SIGNATURE = b"\xff" + b"\x00" * 7 + b"\x01\x7f"
"""What libzmq sends: 0xFF, padding (a ZMTP 1.0 length of 1), 0x7F."""
VERSION = (3, 1)


@dataclass(frozen=True)
class Greeting:
    """The peer's greeting: version, security mechanism, its as-server bit."""

    major: int
    minor: int
    mechanism: str
    as_server: bool

    @property
    def zmtp31(self) -> bool:
        """True for a 3.1 (or later 3.x) peer: subscriptions travel as
        SUBSCRIBE/CANCEL commands; a 3.0 peer gets 0x01/0x00 messages."""
        return (self.major, self.minor) >= (3, 1)


@dataclass(frozen=True)
class Command:
    """One command frame: ``name`` (e.g. ``"READY"``) and its data."""

    name: str
    data: bytes


@dataclass
class Message:
    """One multipart message: its frames, in order."""

    frames: list[bytes] = field(default_factory=list)


# ---- greeting -----------------------------------------------------------------

def encode_greeting(mechanism: str = "NULL", as_server: bool = False,
                    version: tuple[int, int] = VERSION) -> bytes:
    """The 64-byte greeting this peer sends first (the whole of it at once:
    a 3.x peer reads it in any number of pieces)."""
    mech = mechanism.encode("ascii")
    if not 0 < len(mech) <= 20 or not mech.isalnum() or mech.upper() != mech:
        raise ValueError(f"bad mechanism name {mechanism!r}")
    return (SIGNATURE + bytes(version) + mech.ljust(20, b"\x00")
            + (b"\x01" if as_server else b"\x00") + b"\x00" * 31)


def parse_greeting(data: bytes | memoryview) -> Greeting:
    """Check and decode a peer's 64-byte greeting. A ZMTP 1.0/2.0 peer, a
    bad signature or a garbled mechanism name is a ``ProtocolError``; a
    higher 3.x minor (or a higher major) is accepted and spoken to as 3.1."""
    g = bytes(data)
    if len(g) != GREETING_SIZE:
        raise ProtocolError(f"ZMTP greeting must be {GREETING_SIZE} bytes, got {len(g)}")
    if g[0] != 0xFF or g[9] != 0x7F:
        raise ProtocolError("not a ZMTP 3 greeting (bad signature)")
    major, minor = g[10], g[11]
    if major < 3:
        raise ProtocolError(f"ZMTP {major}.{minor} peer: only ZMTP 3.x is spoken")
    raw = g[12:32]
    name = raw.rstrip(b"\x00")
    if not name or b"\x00" in name or not name.isalnum() or name.upper() != name:
        raise ProtocolError(f"bad mechanism name in greeting: {raw!r}")
    if g[32] > 1:
        raise ProtocolError(f"bad as-server byte {g[32]} in greeting")
    return Greeting(major, minor, name.decode("ascii"), g[32] == 1)


# ---- frames and commands -----------------------------------------------------

def encode_frame(body: bytes, more: bool = False, command: bool = False) -> bytes:
    """One frame: flags, size (short or long form) and body."""
    n = len(body)
    flags = (FLAG_MORE if more else 0) | (FLAG_COMMAND if command else 0)
    if n < 256:
        return bytes((flags, n)) + bytes(body)
    return struct.pack(">BQ", flags | FLAG_LONG, n) + bytes(body)


def encode_message(frames: list[bytes]) -> bytes:
    """A multipart message: MORE on every frame but the last."""
    if not frames:
        raise ValueError("a ZMTP message has at least one frame")
    last = len(frames) - 1
    return b"".join(encode_frame(f, i < last) for i, f in enumerate(frames))


def encode_command(name: str, data: bytes = b"") -> bytes:
    """A command frame: name length, name, data."""
    n = name.encode("ascii")
    if not 0 < len(n) < 256:
        raise ValueError(f"bad command name {name!r}")
    return encode_frame(bytes((len(n),)) + n + bytes(data), command=True)


def parse_command(body: bytes | memoryview) -> Command:
    """Decode a command frame's body into its name and data."""
    b = bytes(body)
    if b[1:5] == b"RROR" and len(b) >= 6 and b[0] != 5 and len(b) == 6 + b[5]:
        # libzmq 4.3 (at least 4.3.5) sends the ERROR a ZAP refusal causes
        # without its name-length byte (seen on the wire: "^RROR\x03400"):
        # read it as the ERROR it is
        return Command("ERROR", b[5:])
    if not b or len(b) < 1 + b[0] or b[0] == 0:
        raise ProtocolError("malformed command frame (bad name length)")
    try:
        name = b[1:1 + b[0]].decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError("malformed command frame (name is not ASCII)") from None
    return Command(name, b[1 + b[0]:])


def encode_metadata(props: dict[str, bytes]) -> bytes:
    """Metadata (READY, INITIATE): name length, name, 4-byte value length, value."""
    out = []
    for k, v in props.items():
        kb = k.encode("ascii")
        if not 0 < len(kb) < 256:
            raise ValueError(f"bad metadata name {k!r}")
        out.append(bytes((len(kb),)) + kb + struct.pack(">I", len(v)) + bytes(v))
    return b"".join(out)


def decode_metadata(data: bytes | memoryview) -> dict[str, bytes]:
    """Decode metadata; names are case-insensitive (returned as spelled,
    looked up with ``str.lower`` by the caller). Truncation is a
    ``ProtocolError``."""
    d = bytes(data)
    out: dict[str, bytes] = {}
    i = 0
    while i < len(d):
        n = d[i]
        if n == 0 or i + 1 + n + 4 > len(d):
            raise ProtocolError("malformed metadata (truncated property name)")
        try:
            name = d[i + 1:i + 1 + n].decode("ascii")
        except UnicodeDecodeError:
            raise ProtocolError("malformed metadata (name is not ASCII)") from None
        i += 1 + n
        (vlen,) = struct.unpack_from(">I", d, i)
        i += 4
        if i + vlen > len(d):
            raise ProtocolError("malformed metadata (truncated property value)")
        out[name] = d[i:i + vlen]
        i += vlen
    return out


def ready(props: dict[str, bytes]) -> bytes:
    """The READY command (NULL and PLAIN) with ``props`` as metadata."""
    return encode_command("READY", encode_metadata(props))


def error(reason: str) -> bytes:
    """The ERROR command: a reason of at most 255 bytes."""
    r = reason.encode("utf-8")[:255]
    return encode_command("ERROR", bytes((len(r),)) + r)


def ping(ttl_s: float = 0.0, context: bytes = b"") -> bytes:
    """PING (3.1): the TTL in tenths of a second, and up to 16 bytes the
    peer echoes in its PONG."""
    ttl = max(0, min(0xFFFF, int(ttl_s * 10)))
    return encode_command("PING", struct.pack(">H", ttl) + context[:16])


def pong(context: bytes = b"") -> bytes:
    """PONG: the context of the PING it answers."""
    return encode_command("PONG", context[:16])


def subscribe(topic: bytes, zmtp31: bool = True) -> bytes:
    """A subscription: the SUBSCRIBE command for a 3.1 peer, a 0x01-prefixed
    message for a 3.0 peer."""
    if zmtp31:
        return encode_command("SUBSCRIBE", topic)
    return encode_frame(b"\x01" + bytes(topic))


def cancel(topic: bytes, zmtp31: bool = True) -> bytes:
    """A cancelled subscription: CANCEL for 3.1, a 0x00-prefixed message for 3.0."""
    if zmtp31:
        return encode_command("CANCEL", topic)
    return encode_frame(b"\x00" + bytes(topic))


# ---- incremental decoder ------------------------------------------------------

class Decoder:
    """Bytes in, events out, for one direction of one connection: first a
    ``Greeting``, then ``Command`` and ``Message`` events. A pure-Python
    reference of what the engine's ZMTP framer does (used for fuzzing and
    where no engine is involved); ``max_message`` bounds one message's
    payload, ``max_frames`` its frame count. A violation raises
    ``ProtocolError`` and the decoder stays failed."""

    def __init__(self, *, max_message: int = 64 << 20, max_frames: int = 65536) -> None:
        self.max_message = max_message
        self.max_frames = max_frames
        self._buf = bytearray()
        self._greeted = False
        self._frames: list[bytes] = []
        self._size = 0
        self._failed: ProtocolError | None = None

    def _fail(self, why: str) -> ProtocolError:
        self._failed = ProtocolError(why)
        return self._failed

    def feed(self, data: bytes | memoryview) -> list[Greeting | Command | Message]:
        """Take more bytes; return every event they complete."""
        if self._failed is not None:
            raise self._failed
        self._buf += data
        out: list[Greeting | Command | Message] = []
        buf = self._buf
        pos = 0
        if not self._greeted:
            if len(buf) < GREETING_SIZE:
                if buf and buf[0] != 0xFF:
                    raise self._fail("not a ZMTP 3 greeting (bad signature)")
                return out
            try:
                out.append(parse_greeting(buf[:GREETING_SIZE]))
            except ProtocolError as exc:
                self._failed = exc
                raise
            self._greeted = True
            pos = GREETING_SIZE
        while True:
            if len(buf) - pos < 2:
                break
            flags = buf[pos]
            if flags & 0xF8:
                raise self._fail(f"reserved frame flag bits set (0x{flags:02x})")
            if flags & FLAG_COMMAND and (flags & FLAG_MORE or self._frames):
                raise self._fail("a command frame inside a multipart message")
            if flags & FLAG_LONG:
                if len(buf) - pos < 9:
                    break
                (size,) = struct.unpack_from(">Q", buf, pos + 1)
                hl = 9
            else:
                size = buf[pos + 1]
                hl = 2
            if size > self.max_message or self._size + size > self.max_message:
                raise self._fail(f"frame of {size} bytes exceeds max_message "
                                 f"({self.max_message})")
            if len(buf) - pos - hl < size:
                break
            body = bytes(buf[pos + hl:pos + hl + size])
            pos += hl + size
            if flags & FLAG_COMMAND:
                try:
                    out.append(parse_command(body))
                except ProtocolError as exc:
                    self._failed = exc
                    raise
                continue
            self._frames.append(body)
            self._size += size
            if len(self._frames) > self.max_frames:
                raise self._fail(f"message has more than {self.max_frames} frames")
            if not flags & FLAG_MORE:
                out.append(Message(self._frames))
                self._frames = []
                self._size = 0
        del buf[:pos]
        return out


# ---- Z85 (spec 32) ---------------------------------------------------------------

_Z85 = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"
_Z85_INDEX = {c: i for i, c in enumerate(_Z85)}


def z85_encode(data: bytes) -> bytes:
    """Z85-encode ``data`` (its length a multiple of 4): 5 characters per 4 bytes."""
    if len(data) % 4:
        raise ValueError("Z85 encodes a multiple of 4 bytes")
    out = bytearray()
    for (v,) in struct.iter_unpack(">I", data):
        chunk = bytearray(5)
        for i in range(4, -1, -1):
            v, r = divmod(v, 85)
            chunk[i] = _Z85[r]
        out += chunk
    return bytes(out)


def z85_decode(text: str | bytes) -> bytes:
    """Decode Z85 text (its length a multiple of 5); bad input is a ValueError."""
    t = text.encode("ascii") if isinstance(text, str) else bytes(text)
    if len(t) % 5:
        raise ValueError("Z85 text length must be a multiple of 5")
    out = bytearray()
    for i in range(0, len(t), 5):
        v = 0
        for c in t[i:i + 5]:
            d = _Z85_INDEX.get(c)
            if d is None:
                raise ValueError(f"not a Z85 character: {chr(c)!r}")
            v = v * 85 + d
        if v > 0xFFFFFFFF:
            raise ValueError("Z85 group out of range")
        out += struct.pack(">I", v)
    return bytes(out)
