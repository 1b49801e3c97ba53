"""Framers: turn a byte stream into whole messages inside the engine.

Built-in framers strip their header from received messages and add it to
every ``Bind.send``; a callable framer delivers whole messages as they are on
the wire and sends bytes unchanged.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable
from typing import Literal

from evpl._native.framing import Framer
from evpl.errors import ConfigError

__all__ = ["DEFAULT_MAX_MESSAGE", "Framer", "callable", "fixed", "length_prefix",
           "record_marking", "zmtp"]

DEFAULT_MAX_MESSAGE = 64 << 20
"""Largest message a framer accepts unless told otherwise (64 MiB)."""

_LENGTH, _RECORD, _CALLABLE, _FIXED, _ZMTP = 1, 2, 3, 4, 5


def _max(max_message: int | None) -> int:
    if max_message is None:
        return DEFAULT_MAX_MESSAGE
    if not isinstance(max_message, int) or max_message < 1:
        raise ConfigError(f"max_message must be a positive int, got {max_message!r}")
    return max_message


def length_prefix(
    size: int = 4,
    byteorder: Literal["big", "little"] = "big",
    *,
    includes_header: bool = False,
    max_message: int | None = None,
) -> Framer:
    """Messages preceded by an unsigned ``size``-byte length (1, 2, 4 or 8).

    ``includes_header`` says whether the length counts the header itself.
    """
    if size not in (1, 2, 4, 8):
        raise ConfigError(f"length prefix size must be 1, 2, 4 or 8, got {size!r}")
    if byteorder not in ("big", "little"):
        raise ConfigError(f"byteorder must be 'big' or 'little', got {byteorder!r}")
    limit = _max(max_message)
    if size < 8:
        limit = min(limit, (1 << (8 * size)) - 1 - (size if includes_header else 0))
    return Framer(_LENGTH, size, byteorder == "big", includes_header, limit)


def record_marking(*, max_message: int | None = None) -> Framer:
    """ONC RPC record marking (RFC 5531 section 11): fragments are
    reassembled into one record; ``send`` emits a single last fragment."""
    return Framer(_RECORD, 4, True, False, min(_max(max_message), 0x7FFFFFFF))


def callable(
    fn: Callable[[memoryview], int], *, max_message: int | None = None
) -> Framer:
    """Frame with ``fn(peek) -> n``: the length of the next whole message in
    the buffered bytes ``peek``, 0 for "need more", negative for "bad stream".
    """
    if not builtins.callable(fn):
        raise ConfigError("framing.callable needs a callable")
    return Framer(_CALLABLE, 0, True, False, _max(max_message), fn)


def fixed(size: int) -> Framer:
    """Messages of exactly ``size`` bytes, with no header (a fixed-size
    record protocol): cut in the engine, no Python call per message. ``send``
    checks that each message has that size."""
    if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= DEFAULT_MAX_MESSAGE:
        raise ConfigError(f"fixed message size must be an int in 1..{DEFAULT_MAX_MESSAGE}, "
                          f"got {size!r}")
    return Framer(_FIXED, size, True, False, size)


def zmtp(*, max_message: int | None = None) -> Framer:
    """ZMTP 3.x frames (ZeroMQ, rfc.zeromq.org specs 23 and 37), cut in the
    engine: each delivered message is a 64-byte greeting, one command frame,
    or all the frames of one multipart message, as they are on the wire
    (``evpl.zmtp`` splits them into frames without copying). ``max_message``
    bounds the payload of one multipart message. ``send`` sends bytes as
    they are (the caller encodes the frames)."""
    return Framer(_ZMTP, 0, True, False, _max(max_message))
