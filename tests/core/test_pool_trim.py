"""Pool memory that is no longer needed goes back to the kernel (issue 8, section 5).

Residency is measured independently of the pool with mincore(2) (through
ctypes) on the buffers' own addresses, and once with the process RSS.
"""

from __future__ import annotations

import ctypes
import mmap
import random
import re
from pathlib import Path

import pytest

import evpl

from .helpers import TIMEOUT, InThread, check_pool, raw_connect

PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]


def address(buf: evpl.Buffer) -> int:
    """Where a writable Buffer's memory starts."""
    return ctypes.addressof(ctypes.c_char.from_buffer(memoryview(buf)))


def resident(addr: int, size: int) -> int:
    """Bytes of [addr, addr + size) resident now (addr page-aligned)."""
    npages = (size + PAGE - 1) // PAGE
    vec = ctypes.create_string_buffer(npages)
    if _libc.mincore(addr, npages * PAGE, vec) != 0:
        raise OSError(ctypes.get_errno(), "mincore")
    return sum(b & 1 for b in vec.raw) * PAGE


def vm_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def touched(pool: evpl.Pool, n: int) -> tuple[list[evpl.Buffer], list[int]]:
    """``n`` whole buffers, every page written, and their addresses."""
    bufs = [pool.allocate(pool.buffer_size) for _ in range(n)]
    fill = b"\xa5" * pool.buffer_size
    for b in bufs:
        memoryview(b)[:] = fill
    return bufs, [address(b) for b in bufs]


def release(bufs: list) -> None:
    """Drop the buffers first to last: the last one is then the most recently
    released (``del bufs`` would release them last to first)."""
    for i in range(len(bufs)):
        bufs[i] = None
    bufs.clear()


def test_trim_gives_idle_pages_back():
    bs = 256 << 10
    pool = evpl.Pool(slab_size=32 * bs, buffer_size=bs, keep_bytes=0, trim_above=None)
    bufs, addrs = touched(pool, 32)
    assert all(resident(a, bs) == bs for a in addrs)
    st = pool.stats()
    assert st["resident_bytes"] == 32 * bs and st["idle_resident_bytes"] == 0
    assert st["bytes_in_use"] == 32 * bs
    release(bufs)
    st = pool.stats()
    # released buffers keep their pages until trimmed (that was the bug)
    assert st["idle_warm_bytes"] == 32 * bs
    assert st["idle_resident_bytes"] == 32 * bs
    assert sum(resident(a, bs) for a in addrs) == 32 * bs

    assert pool.trim(keep_bytes=4 * bs) == 28 * bs
    st = pool.stats()
    assert st["idle_warm_bytes"] == 4 * bs and st["idle_clean_bytes"] == 28 * bs
    assert st["trimmed_bytes"] == 28 * bs
    assert st["resident_bytes"] == st["idle_resident_bytes"] == 4 * bs
    # the kept ones are the most recently released (LIFO: the last four)
    assert [resident(a, bs) for a in addrs] == [0] * 28 + [bs] * 4
    assert pool.trim(keep_bytes=4 * bs) == 0        # nothing more to give back
    assert pool.trim(0) == 4 * bs
    assert pool.stats()["resident_bytes"] == 0
    assert sum(resident(a, bs) for a in addrs) == 0
    assert pool.stats()["slabs"] == 1              # the slab stays mapped
    check_pool(pool)


def test_trim_drops_process_rss():
    """The same seen from outside: VmRSS falls by about what was trimmed."""
    bs = 2 << 20
    pool = evpl.Pool(slab_size=32 * bs, buffer_size=bs, keep_bytes=0, trim_above=None)
    bufs, _ = touched(pool, 32)                      # 64 MiB
    release(bufs)
    before = vm_rss()
    assert pool.trim() == 64 << 20
    after = vm_rss()
    assert before - after > 48 << 20, (before, after)


def test_warm_buffers_are_reused_before_trimmed_ones():
    bs = 64 << 10
    pool = evpl.Pool(slab_size=16 * bs, buffer_size=bs, keep_bytes=0, trim_above=None)
    bufs, addrs = touched(pool, 16)
    release(bufs)
    pool.trim(keep_bytes=3 * bs)
    kept = set(addrs[-3:])
    again = [pool.allocate(bs) for _ in range(3)]
    assert {address(b) for b in again} == kept       # warm first ...
    assert all(bytes(b) == b"\xa5" * bs for b in again)
    clean = pool.allocate(bs)                        # ... then a trimmed one: zeroed pages
    assert address(clean) in set(addrs[:-3])
    assert bytes(clean) == bytes(bs)
    assert pool.stats()["idle_warm_bytes"] == 0
    del again, clean
    check_pool(pool)


def test_trim_leaves_buffers_in_use_alone():
    bs = 64 << 10
    pool = evpl.Pool(slab_size=16 * bs, buffer_size=bs, keep_bytes=0, trim_above=None)
    bufs, addrs = touched(pool, 16)
    held = bufs[::2]
    content = random.randbytes(bs)
    for i in range(len(held)):
        memoryview(held[i])[:] = content
    release(bufs)
    assert pool.trim(0) == 8 * bs
    assert [bytes(b) for b in held] == [content] * 8
    assert all(resident(a, bs) == bs for a in addrs[::2])
    assert all(resident(a, bs) == 0 for a in addrs[1::2])
    st = pool.stats()
    assert st["resident_bytes"] == 8 * bs and st["idle_resident_bytes"] == 0
    del held
    check_pool(pool)


def test_trim_above_bounds_idle_memory_without_a_trim_call():
    bs = 64 << 10
    pool = evpl.Pool(slab_size=32 * bs, buffer_size=bs, keep_bytes=2 * bs, trim_above=6 * bs)
    assert pool.trim_above == 6 * bs and pool.keep_bytes == 2 * bs
    bufs, addrs = touched(pool, 32)
    for i in range(len(bufs)):
        bufs[i] = None                               # released one by one, in order
        st = pool.stats()
        assert st["idle_warm_bytes"] <= 6 * bs
        assert st["idle_resident_bytes"] <= 6 * bs
    assert pool.stats()["trimmed_bytes"] == 26 * bs
    # the six released last stay warm
    assert [resident(a, bs) for a in addrs] == [0] * 26 + [bs] * 6
    assert pool.trim() == 4 * bs                     # down to keep_bytes
    assert pool.stats()["resident_bytes"] == 2 * bs
    check_pool(pool)


def test_received_pages_are_trimmed(make_loop, stream_backend, address):
    """Buffers the kernel wrote received bytes into (a read into the loop's
    receive chunk, or an io_uring provided buffer ring) are resident while
    held; released and trimmed, their pages go back."""
    bs = 64 << 10
    pool = evpl.Pool(slab_size=64 * bs, buffer_size=bs, keep_bytes=0, trim_above=None)
    loop = make_loop(pool=pool)

    class Keep(evpl.Handler):
        def __init__(self):
            self.held = []
            self.n = 0

        def on_data(self, bind, buf):
            self.held.append(buf)
            self.n += len(buf)

    keep = Keep()
    listener = loop.listen(stream_backend, address(stream_backend), lambda: keep)
    payload = random.randbytes(3 << 20)
    peer = raw_connect(stream_backend, listener.address)
    with peer:
        sender = InThread(loop, lambda: peer.sendall(payload))
        loop.run_until(lambda: sender.done() and keep.n >= len(payload), timeout=TIMEOUT)
        sender.get()
    assert b"".join(bytes(b) for b in keep.held) == payload
    held_resident = pool.stats()["resident_bytes"]
    assert held_resident >= 3 << 20
    keep.held.clear()
    st = pool.stats()
    assert st["idle_resident_bytes"] >= (3 << 20) - 2 * bs   # released, still resident
    pool.trim(0)
    st = pool.stats()
    assert st["idle_resident_bytes"] == 0
    # what stays is in buffers still in use (the receive chunk, the ring's buffers)
    assert st["resident_bytes"] <= st["buffers_in_use"] * bs
    assert held_resident - st["resident_bytes"] >= (3 << 20) - 2 * bs


def test_trim_tail_keeps_what_was_written():
    """``trim_tail`` (for buffers the kernel fills from an offset on, e.g.
    the io_uring ring's at an idle point): the pages from the offset, rounded
    up to a page, go; the bytes before it stay."""
    bs = 64 << 10
    pool = evpl.Pool(slab_size=16 * bs, buffer_size=bs, keep_bytes=0, trim_above=None)
    buf = pool.allocate(bs)
    content = random.randbytes(bs)
    memoryview(buf)[:] = content
    a = address(buf)
    assert pool._trim_tail(buf, PAGE + 100) == bs - 2 * PAGE
    assert resident(a, bs) == 2 * PAGE
    assert bytes(buf[:2 * PAGE]) == content[:2 * PAGE]
    assert bytes(buf[2 * PAGE:]) == bytes(bs - 2 * PAGE)   # zeroed pages on next touch
    assert pool._trim_tail(buf, bs) == 0
    assert pool.stats()["trimmed_bytes"] == bs - 2 * PAGE
    other = evpl.Pool(slab_size=16 * bs, buffer_size=bs)
    with pytest.raises(ValueError):
        other._trim_tail(buf, 0)
    del buf
    check_pool(pool)


def test_pinned_is_read_only():
    pool = evpl.Pool(slab_size=1 << 20, buffer_size=64 << 10)
    assert not pool.pinned
    with pytest.raises(AttributeError):
        pool.pinned = True                           # only a backend (Cython) sets it


@pytest.mark.parametrize("kwargs", [
    {"keep_bytes": 4 << 20, "trim_above": 1 << 20},
    {"trim_above": -1},
    {"trim_above": 1.5},
    {"trim_above": True},
], ids=repr)
def test_bad_trim_config(kwargs):
    with pytest.raises(evpl.ConfigError):
        evpl.Pool(**kwargs)


def test_trim_arguments():
    pool = evpl.Pool(slab_size=1 << 20, buffer_size=64 << 10, trim_above=None)
    assert pool.trim_above is None
    with pytest.raises(ValueError):
        pool.trim(-1)
    with pytest.raises(TypeError):
        pool.trim("0")
    assert pool.trim() == 0 and pool.trim(0) == 0    # nothing idle yet


def test_docs_list_the_real_stats_keys():
    """docs/api.md's table of Pool.stats() keys is the set stats() returns."""
    api = (Path(__file__).resolve().parents[2] / "docs" / "api.md").read_text()
    section = api.split("\n## Buffers", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `(\w+)` \|", section, re.MULTILINE))
    assert documented == set(evpl.Pool().stats()), documented ^ set(evpl.Pool().stats())


def test_default_pool_bounds():
    pool = evpl.Pool()
    assert pool.keep_bytes == 8 << 20
    assert pool.trim_above == 64 << 20


def test_idle_loop_gives_ring_and_pool_memory_back(make_loop, stream_backend, address):
    """After a burst, a loop left idle gives back (once, by itself, about a
    second later) the idle pool buffers beyond keep_bytes and the unwritten
    parts of the buffers an io_uring ring still holds."""
    bs = 256 << 10
    pool = evpl.Pool(slab_size=64 * bs, buffer_size=bs, keep_bytes=0, trim_above=None)
    loop = make_loop(pool=pool)

    class Count(evpl.Handler):
        n = 0

        def on_data(self, bind, buf):
            Count.n += len(buf)

    listener = loop.listen(stream_backend, address(stream_backend), Count)
    payload = random.randbytes(8 << 20)
    with raw_connect(stream_backend, listener.address) as peer:
        sender = InThread(loop, lambda: peer.sendall(payload))
        loop.run_until(lambda: sender.done() and Count.n >= len(payload), timeout=TIMEOUT)
        sender.get()
        before = loop.stats()["idle_trims"]
        # nothing else happens: the loop wakes up by itself to give memory back
        loop.run_until(lambda: loop.stats()["idle_trims"] > before, timeout=TIMEOUT)
        st = pool.stats()
        assert st["idle_resident_bytes"] == 0
        # at most the kernel-written parts of the buffers still in use stay
        assert st["resident_bytes"] <= 2 * bs + (bs if "io_uring" in stream_backend else 0)
