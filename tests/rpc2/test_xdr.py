"""Tests of evpl.rpc2.xdr: primitives, bounds, and hostile input."""

from __future__ import annotations

import array
import struct
import tracemalloc
from collections.abc import Callable
from enum import IntEnum
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from evpl.errors import ProtocolError
from evpl.rpc2 import xdr
from evpl.rpc2.xdr import EnumMap, Packer, Unpacker, XdrError


class Color(IntEnum):
    RED = 0
    GREEN = 1
    BLUE = 7


COLORS = EnumMap.of(Color)


def test_xdr_error_is_protocol_error() -> None:
    assert issubclass(XdrError, ProtocolError)


@given(i=st.integers(-2**31, 2**31 - 1), u=st.integers(0, 2**32 - 1),
       h=st.integers(-2**63, 2**63 - 1), uh=st.integers(0, 2**64 - 1),
       d=st.floats(allow_nan=False), b=st.booleans())
def test_primitives_round_trip(i: int, u: int, h: int, uh: int, d: float, b: bool) -> None:
    p = Packer()
    p.pack_int(i)
    p.pack_uint(u)
    p.pack_hyper(h)
    p.pack_uhyper(uh)
    p.pack_double(d)
    p.pack_float(1.5)
    p.pack_bool(b)
    p.pack_enum(Color.BLUE, COLORS)
    data = p.get_buffer()
    assert len(data) == 4 + 4 + 8 + 8 + 8 + 4 + 4 + 4
    u_ = Unpacker(data)
    assert (u_.unpack_int(), u_.unpack_uint(), u_.unpack_hyper(), u_.unpack_uhyper()) == (
        i, u, h, uh)
    assert u_.unpack_double() == d
    assert u_.unpack_float() == 1.5
    assert u_.unpack_bool() is b
    assert u_.unpack_enum(COLORS) is Color.BLUE
    u_.done()


def test_known_encodings() -> None:
    p = Packer()
    p.pack_int(-2)
    p.pack_string("abcde")
    p.pack_fopaque(3, b"xyz")
    p.pack_optional(None, p.pack_int)
    p.pack_optional(5, p.pack_int)
    p.pack_array([1, 2], p.pack_uint)
    assert p.get_buffer() == (b"\xff\xff\xff\xfe" b"\0\0\0\5abcde\0\0\0" b"xyz\0"
                              b"\0\0\0\0" b"\0\0\0\1\0\0\0\5" b"\0\0\0\2\0\0\0\1\0\0\0\2")


@pytest.mark.parametrize("method,value", [
    ("pack_int", 2**31), ("pack_uint", -1), ("pack_hyper", 2**63), ("pack_uhyper", -1),
    ("pack_int", "x"), ("pack_bool", 2), ("pack_bool", None),
])
def test_out_of_range_values_are_rejected(method: str, value: object) -> None:
    with pytest.raises(XdrError):
        getattr(Packer(), method)(value)


def test_enum_encode_and_decode_check_membership() -> None:
    with pytest.raises(XdrError):
        Packer().pack_enum(3, COLORS)
    with pytest.raises(XdrError, match="Color"):
        Unpacker(struct.pack(">i", 3)).unpack_enum(COLORS)


def test_bool_decode_rejects_other_values() -> None:
    with pytest.raises(XdrError):
        Unpacker(b"\0\0\0\2").unpack_bool()


def test_bounds_enforced_on_encode() -> None:
    p = Packer()
    with pytest.raises(XdrError):
        p.pack_opaque(b"12345", 4)
    with pytest.raises(XdrError):
        p.pack_string("12345", 4)
    with pytest.raises(XdrError):
        p.pack_array([1, 2, 3], p.pack_int, 2)
    with pytest.raises(XdrError):
        p.pack_fopaque(4, b"123")
    with pytest.raises(XdrError):
        p.pack_farray(2, [1], p.pack_int)
    assert len(p) == 0
    p.pack_opaque(b"1234", 4)  # exactly at the bound is fine


def test_bounds_enforced_on_decode() -> None:
    data = Packer()
    data.pack_opaque(b"12345")
    with pytest.raises(XdrError, match="bound"):
        Unpacker(data.buf).unpack_opaque(4)
    with pytest.raises(XdrError, match="bound"):
        Unpacker(data.buf).unpack_string(4)
    arr = Packer()
    arr.pack_array([1, 2, 3], arr.pack_int)
    u = Unpacker(arr.buf)
    with pytest.raises(XdrError, match="bound"):
        u.unpack_array(u.unpack_int, 2)


def test_huge_length_claim_fails_fast() -> None:
    """A length or count of 2**32 - 1 in 100 bytes is refused before anything
    is built: no element decoded, nothing sized by the claim allocated."""
    hostile = b"\xff\xff\xff\xff" + bytes(96)
    decoded = []

    def item(u: Unpacker) -> Callable[[], int]:
        def unpack() -> int:
            decoded.append(1)
            return u.unpack_int()
        return unpack

    tracemalloc.start()
    try:
        for fn in (xdr.unpack_opaque, xdr.unpack_opaque_view):
            with pytest.raises(XdrError, match="past the end"):
                fn(memoryview(hostile), 0)
        with pytest.raises(XdrError, match="cannot fit"):
            xdr.unpack_count(memoryview(hostile), 0, xdr.UNBOUNDED, 4)
        u = Unpacker(hostile)
        with pytest.raises(XdrError):
            u.unpack_array(item(u))
        u = Unpacker(bytes(8))
        with pytest.raises(XdrError):
            u.unpack_farray(1 << 30, item(u))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert decoded == []
    assert peak < 64 << 10, f"{peak} bytes allocated for a hostile length"


def test_unbounded_array_count_checked_against_element_size() -> None:
    # 10 elements of at least 8 bytes cannot fit in 40 bytes
    data = struct.pack(">I", 10) + bytes(40)
    with pytest.raises(XdrError):
        xdr.unpack_count(memoryview(data), 0, xdr.UNBOUNDED, 8)
    assert xdr.unpack_count(memoryview(data), 0, xdr.UNBOUNDED, 4) == (10, 4)


def test_padding_is_accepted_without_inspection() -> None:
    data = b"\0\0\0\1a\xff\xff\xff"
    assert Unpacker(data).unpack_opaque() == b"a"


def test_any_buffer_object_is_decoded_without_copy() -> None:
    raw = bytearray(struct.pack(">Ii", 3, -1) + b"abc\0")
    raw[:4] = struct.pack(">I", 8)  # opaque<> of 8 bytes: the int and "abc\0"
    for obj in (bytes(raw), raw, memoryview(raw), array.array("I", bytes(raw))):
        u = Unpacker(obj)
        view = u.unpack_opaque_view()
        assert bytes(view) == bytes(raw[4:])
        u.done()
    view, _ = xdr.unpack_opaque_view(memoryview(raw), 0)
    raw[4] = 0x55  # the view shares memory with the input
    assert view[0] == 0x55
    view.release()


@pytest.mark.parametrize("offset", [-1, 5])
def test_unpacker_rejects_bad_offset(offset: int) -> None:
    with pytest.raises(XdrError):
        Unpacker(b"1234", offset)


def _composite() -> bytes:
    p = Packer()
    p.pack_hyper(-5)
    p.pack_string(b"hello world")
    p.pack_array([Color.RED, Color.BLUE], lambda c: p.pack_enum(c, COLORS))
    p.pack_optional(b"xy", p.pack_opaque)
    p.pack_fopaque(5, b"12345")
    p.pack_double(2.5)
    return p.get_buffer()


def _read_composite(data: bytes | memoryview) -> tuple[object, ...]:
    u = Unpacker(data)
    value = (u.unpack_hyper(), u.unpack_string(),
             u.unpack_array(lambda: u.unpack_enum(COLORS)),
             u.unpack_optional(u.unpack_opaque), u.unpack_fopaque(5), u.unpack_double())
    u.done()
    return value


def test_composite_round_trip_and_every_truncation_fails() -> None:
    data = _composite()
    assert _read_composite(data) == (-5, b"hello world", [Color.RED, Color.BLUE], b"xy",
                                     b"12345", 2.5)
    for cut in range(len(data)):
        with pytest.raises(XdrError):
            _read_composite(data[:cut])
    with pytest.raises(XdrError, match="unexpected"):
        _read_composite(data + b"\0\0\0\0")


@given(st.binary(max_size=200))
def test_garbage_raises_only_xdr_error(data: bytes) -> None:
    try:
        _read_composite(data)
    except XdrError:
        pass


@given(st.lists(st.binary(max_size=20), max_size=10), st.integers(0, 12))
def test_opaque_arrays_round_trip(items: list[bytes], bound: int) -> None:
    p = Packer()
    if len(items) > bound:
        with pytest.raises(XdrError):
            p.pack_array(items, p.pack_opaque, bound)
        return
    p.pack_array(items, p.pack_opaque, bound)
    u = Unpacker(p.get_buffer())
    assert u.unpack_array(u.unpack_opaque, bound) == items
    u.done()


def test_prims_helpers() -> None:
    buf = bytearray()
    xdr.pack_prims(buf, "I", [1, 2, 3])
    assert xdr.unpack_prims("I", 4, memoryview(buf), 0, 3) == ([1, 2, 3], 12)
    with pytest.raises(XdrError):
        xdr.unpack_prims("I", 4, memoryview(buf), 4, 3)
    with pytest.raises(XdrError):
        xdr.pack_prims(buf, "I", [-1])


def test_decode_with_requires_whole_buffer() -> None:
    assert xdr.decode_with(xdr.unpack_void, b"") is None
    with pytest.raises(XdrError):
        xdr.decode_void(b"\0")
    assert xdr.encode_with(xdr.pack_void, None) == b""


def test_scatter_buf_refers_to_large_bytes_and_copies_the_rest() -> None:
    """Large immutable payloads stay references (sent next to their header
    without a copy); small or mutable ones are copied; the pieces joined are
    exactly the plain encoding."""
    big = bytes(range(256)) * (xdr.SCATTER_MIN // 256)   # SCATTER_MIN bytes
    small = b"abc"
    fixed = big[:xdr.SCATTER_MIN + 1]
    mutable = bytearray(big)

    def encode(buf: bytearray) -> bytearray:
        xdr.pack_opaque(buf, small)
        xdr.pack_opaque(buf, big)
        xdr.pack_string(buf, "tail")
        xdr.pack_fopaque(buf, fixed, len(fixed))
        xdr.pack_opaque(buf, mutable)
        return buf

    plain = bytes(encode(bytearray()))
    sbuf = encode(xdr.ScatterBuf(b"HEAD"))
    parts = sbuf.parts()
    assert isinstance(parts, tuple)
    assert b"".join(parts) == b"HEAD" + plain
    # the two large bytes payloads are the very objects given, not copies
    assert [p for p in parts if p is big or p is fixed] == [big, fixed]
    assert all(type(p) is bytes for p in parts)
    mutable[0] ^= 0xFF                              # copied: the encoding keeps its bytes
    assert b"".join(parts) == b"HEAD" + plain


def test_scatter_buf_without_large_payloads_is_itself() -> None:
    sbuf = xdr.ScatterBuf()
    xdr.pack_opaque(sbuf, b"x" * (xdr.SCATTER_MIN - 1))
    assert sbuf.parts() is sbuf and sbuf.refs is None


@given(st.binary(max_size=300), st.sampled_from(["bytes", "bytearray", "memoryview", "array"]))
def test_native_counted_encoders_match_the_definition(data: bytes, kind: str) -> None:
    """pack_opaque/pack_string (native) give XDR's definition of a counted
    opaque for any bytes-like input: a length, the bytes, zeros to 4."""
    value: Any = {"bytes": data, "bytearray": bytearray(data), "memoryview": memoryview(data),
                  "array": array.array("B", data)}[kind]
    expected = struct.pack(">I", len(data)) + data + b"\0" * (-len(data) & 3)
    for pack in (xdr.pack_opaque, xdr.pack_string):
        buf = bytearray(b"h")
        pack(buf, value)
        assert bytes(buf) == b"h" + expected


def test_native_counted_encoders_refuse_what_they_cannot_encode() -> None:
    with pytest.raises(XdrError, match="opaque of 5 bytes exceeds its bound 4"):
        xdr.pack_opaque(bytearray(), b"12345", 4)
    with pytest.raises(TypeError):
        xdr.pack_opaque(bytearray(), "text is a string, not opaque data")
    with pytest.raises(TypeError, match="bytearray"):
        xdr.pack_opaque(b"immutable", b"x")
    buf = bytearray()
    xdr.pack_string(buf, "é")                         # str: UTF-8
    assert bytes(buf) == b"\0\0\0\2\xc3\xa9\0\0"
