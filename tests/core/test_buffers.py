"""Buffers and pools: the buffer protocol, ownership, limits, backpressure."""

from __future__ import annotations

import gc
import hashlib
import io
import random
import struct
import subprocess
import sys
import textwrap

import pytest

import evpl

from .helpers import TIMEOUT, InThread, Ticker, check_pool, raw_connect


def small_pool(**kw) -> evpl.Pool:
    kw.setdefault("slab_size", 256 << 10)
    kw.setdefault("buffer_size", 64 << 10)
    return evpl.Pool(**kw)


def test_buffer_protocol():
    pool = small_pool()
    buf = pool.allocate(16)
    assert isinstance(buf, evpl.Buffer)
    assert not buf.readonly
    mv = memoryview(buf)
    assert not mv.readonly and mv.nbytes == 16
    mv[:] = struct.pack(">IIQ", 1, 0xDEADBEEF, 2**63 + 5)
    del mv
    assert len(buf) == 16
    assert bytes(buf) == struct.pack(">IIQ", 1, 0xDEADBEEF, 2**63 + 5)
    assert buf.tobytes() == bytes(buf)
    assert struct.unpack_from(">IIQ", buf) == (1, 0xDEADBEEF, 2**63 + 5)
    assert struct.unpack_from(">I", buf, 4) == (0xDEADBEEF,)
    assert buf[3] == 1 and buf[-1] == 5 and buf[-16] == 0
    with pytest.raises(IndexError):
        buf[16]
    with pytest.raises(IndexError):
        buf[-17]
    assert buf == bytes(buf)
    assert buf != b"other"
    assert bytes(buf[::2]) == bytes(buf)[::2]         # stepped slices copy
    assert bytes(buf[10:4]) == b""
    assert bytearray(buf) == bytes(buf)
    assert hashlib.sha256(buf).digest() == hashlib.sha256(bytes(buf)).digest()
    assert pool.stats()["buffers_in_use"] == 1
    del buf
    check_pool(pool)


def test_slice_shares_memory_and_keeps_chunk_alive():
    pool = small_pool()
    buf = pool.allocate(100)
    memoryview(buf)[:] = bytes(range(100))
    part = buf[10:20]
    assert isinstance(part, evpl.Buffer)
    assert bytes(part) == bytes(range(10, 20))
    memoryview(buf)[10] = 0xAA                     # visible through the slice
    assert part[0] == 0xAA
    memoryview(part)[1] = 0xBB                     # and the other way round
    assert buf[11] == 0xBB
    sub = part[2:]
    del buf, part
    gc.collect()
    assert pool.stats()["buffers_in_use"] == 1     # the slice holds the chunk
    assert bytes(sub) == bytes(range(12, 20))
    view = memoryview(sub)
    del sub
    assert pool.stats()["buffers_in_use"] == 1     # so does a memoryview of it
    assert view.tobytes() == bytes(range(12, 20))
    view.release()
    del view
    check_pool(pool)


def test_pool_counters_return_to_zero():
    pool = small_pool(max_bytes=1 << 20)
    bufs = [pool.allocate(random.randrange(1, 64 << 10)) for _ in range(10)]
    big = pool.allocate(200 << 10)                 # larger than a buffer: heap chunk
    stats = pool.stats()
    assert stats["buffers_in_use"] == 10
    assert stats["heap_in_use"] == 1
    assert stats["slabs"] >= 3
    assert len(big) == 200 << 10
    del bufs, big
    check_pool(pool)
    assert pool.stats()["heap_bytes"] == 0
    assert pool.allocate(0) == b""
    check_pool(pool)


def test_pool_exhaustion():
    pool = small_pool(max_bytes=256 << 10)         # one slab of 4 buffers
    bufs = [pool.allocate(1) for _ in range(4)]
    with pytest.raises(evpl.PoolExhausted):
        pool.allocate(1)
    with pytest.raises(evpl.PoolExhausted):
        pool.allocate(1 << 20)                     # heap chunks count too
    assert pool.stats()["exhausted"] >= 2
    bufs.pop()
    extra = pool.allocate(10)                      # a released buffer is reused
    assert len(extra) == 10
    with pytest.raises(ValueError):
        pool.allocate(-1)
    del bufs, extra
    check_pool(pool)


@pytest.mark.parametrize("kwargs", [
    {"buffer_size": 1000},
    {"buffer_size": 0},
    {"buffer_size": 64 << 10, "slab_size": 100 << 10},
    {"buffer_size": 64 << 10, "slab_size": 32 << 10},
    {"buffer_size": 64 << 10, "slab_size": 256 << 10, "max_bytes": 128 << 10},
], ids=repr)
def test_bad_pool_config(kwargs):
    with pytest.raises(evpl.ConfigError):
        evpl.Pool(**kwargs)


def test_buffer_in_reference_cycle():
    """A Buffer only reachable from a reference cycle is freed by the garbage
    collector without crashing (and goes back to its pool)."""
    code = textwrap.dedent("""
        import gc, evpl
        pool = evpl.Pool(slab_size=1 << 20, buffer_size=1 << 16)
        buf = pool.allocate(10)
        holder = [buf]
        holder.append(holder)
        del buf, holder
        gc.collect()
        assert pool.stats()["buffers_in_use"] == 0, pool.stats()
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert proc.stdout.strip() == "ok"


_POOL_IN_GARBAGE = """
import gc, socket, sys, evpl
pool = evpl.Pool(slab_size=1 << 20, buffer_size=1 << 16)
# the Pool holds no Python object: the collector never clears it, so its
# slabs live until the last Buffer, Bind or loop that uses them is gone
assert not gc.is_tracked(pool)
if sys.argv[1] == "buffers":
    junk = [pool.allocate(10) for _ in range(3)]
else:
    loop = evpl.Loop(pool=pool)
    class Keep(evpl.Handler):
        def __init__(self):
            self.msgs = []
        def on_message(self, bind, msg):
            self.msgs.append(msg)
    keep = Keep()
    listener = loop.listen("tcp", ("127.0.0.1", 0), lambda: keep,
                           framing=evpl.framing.length_prefix(4))
    peer = socket.create_connection(listener.address)
    peer.sendall((5).to_bytes(4, "big") + b"hello")
    loop.run_until(lambda: keep.msgs, timeout=10)
    if sys.argv[1] == "closed-loop":
        loop.close()
    junk = [loop, keep, listener]
    del loop, keep, listener
junk.append(junk)
del pool, junk
gc.collect()
print("ok")
"""


@pytest.mark.parametrize("what", ["buffers", "loop", "closed-loop"])
def test_pool_and_its_buffers_in_one_garbage_cycle(what):
    """A Pool that is garbage together with Buffers of it (and maybe the loop
    that received them): the collector used to clear the Pool first, freeing
    its slabs, and then the Buffers returned their chunks into freed memory
    (a use-after-free that scripts/asan reports)."""
    proc = subprocess.run([sys.executable, "-c", _POOL_IN_GARBAGE, what], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert proc.stdout.strip() == "ok"


def test_received_buffers_are_read_only(loop, stream_backend, address):
    class Keep(evpl.Handler):
        def __init__(self):
            self.bufs = []

        def on_data(self, bind, buf):
            self.bufs.append(buf)

    keep = Keep()
    listener = loop.listen(stream_backend, address(stream_backend), lambda: keep)
    bind = loop.connect(stream_backend, listener.address, evpl.Handler())
    bind.send(b"read only data")
    loop.run_until(lambda: sum(map(len, keep.bufs)) >= 14, timeout=TIMEOUT)
    buf = keep.bufs[0]
    assert buf.readonly
    mv = memoryview(buf)
    assert mv.readonly
    with pytest.raises(TypeError):
        mv[0] = 1
    with pytest.raises((TypeError, BufferError)):
        io.BytesIO(b"x").readinto(buf)            # asks for a writable buffer
    assert buf[:4].readonly
    assert b"".join(bytes(b) for b in keep.bufs) == b"read only data"
    mv.release()
    keep.bufs.clear()


def test_send_pool_buffer(loop, stream_backend, address):
    class Rec(evpl.Handler):
        def __init__(self):
            self.data = bytearray()

        def on_data(self, bind, buf):
            self.data += buf

    rec = Rec()
    listener = loop.listen(stream_backend, address(stream_backend), lambda: rec)
    bind = loop.connect(stream_backend, listener.address, evpl.Handler())
    pool = evpl.default_pool()
    out = pool.allocate(100_000)
    content = random.randbytes(100_000)
    memoryview(out)[:] = content
    bind.send(out)
    bind.send(out[10:20])
    del out
    loop.run_until(lambda: len(rec.data) >= 100_010, timeout=TIMEOUT)
    assert rec.data == content + content[10:20]


@pytest.mark.parametrize("framed", [False, True], ids=["raw", "framed"])
def test_pool_limit_backpressure(make_loop, stream_backend, address, framed):
    """A receiver that holds every Buffer exhausts a small pool: reading stops
    (no crash, nothing lost) and resumes once the Buffers are released."""
    pool = small_pool(max_bytes=256 << 10)         # 4 buffers of 64 KiB
    loop = make_loop(pool=pool)

    class Hoarder(evpl.Handler):
        def __init__(self):
            self.held = []
            self.data = bytearray()
            self.hold = True
            self.closed = []

        def take(self, buf):
            if self.hold:
                self.held.append(buf)
            else:
                self.data += buf

        def on_data(self, bind, buf):
            self.take(buf)

        def on_message(self, bind, msg):
            self.take(msg)

        def on_closed(self, bind, error):
            self.closed.append(error)

        def release(self):
            for b in self.held:
                self.data += b
            self.held.clear()

    payload = random.randbytes(8 << 20)
    hoarder = Hoarder()
    framing = evpl.framing.length_prefix(4) if framed else None
    listener = loop.listen(stream_backend, address(stream_backend), lambda: hoarder,
                           framing=framing)
    if framed:
        msgs = [payload[i:i + 3000] for i in range(0, len(payload), 3000)]
        wire = b"".join(len(m).to_bytes(4, "big") + m for m in msgs)
    else:
        wire = payload
    peer = raw_connect(stream_backend, listener.address)
    with peer:
        sender = InThread(loop, lambda: peer.sendall(wire))
        loop.run_until(lambda: pool.stats()["exhausted"] > 0 and hoarder.held,
                       timeout=TIMEOUT)
        # reading stops: what the hoarder holds stops growing
        ticker = Ticker(loop)
        for _ in range(100):
            held = sum(map(len, hoarder.held))
            loop.run_until(lambda n=ticker.count: ticker.count >= n + 20, timeout=TIMEOUT)
            if sum(map(len, hoarder.held)) == held:
                break
        ticker.cancel()
        assert sum(map(len, hoarder.held)) == held
        assert 0 < held < len(payload)
        assert not hoarder.closed
        assert pool.stats()["buffers_in_use"] <= 4
        hoarder.hold = False
        hoarder.release()
        loop.run_until(lambda: sender.done() and len(hoarder.data) >= len(payload),
                       timeout=TIMEOUT)
        sender.get()
    assert not hoarder.closed
    assert len(hoarder.data) == len(payload)
    assert hoarder.data == payload
