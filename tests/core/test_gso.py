"""UDP GSO: datagrams queued for one peer leave as trains, and the receiver
sees exactly the datagrams that were queued, in order.

The receivers here are plain kernel sockets, so what is checked is what any
UDP peer would get. The fallback test runs in a fresh network namespace
whose loopback has a small MTU, where the kernel refuses trains of large
datagrams (EINVAL) and evpl must send them one by one instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

import evpl

from .helpers import TIMEOUT


def receiver(family: int = 2) -> tuple:
    import socket
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    s.settimeout(TIMEOUT)
    return s, s.getsockname()


def send_all(loop, bind, items) -> None:
    """Queue every (payload, addr) in one iteration, then run until sent."""
    before = loop.stats()["datagrams_out"]
    for payload, addr in items:
        bind.sendto(payload, addr)
    loop.run_until(lambda: loop.stats()["datagrams_out"] - before >= len(items), timeout=TIMEOUT)


def test_trains_arrive_as_the_datagrams_queued(loop, datagram_backend):
    a, addr_a = receiver()
    b, addr_b = receiver()
    bind = loop.bind(datagram_backend, ("127.0.0.1", 0), evpl.Handler())
    # equal sizes (a train), a shorter one that ends it, a longer one that
    # starts another, two peers interleaved, and more than 64 in a row
    sizes = [100] * 10 + [40] + [100] * 3 + [300] * 150 + [7, 7, 0, 7]
    items = []
    for i, n in enumerate(sizes):
        payload = (b"%05d" % i + bytes([i % 251]) * n)[:n]
        items.append((payload, addr_a))
        if i % 50 == 0:
            items.append((payload, addr_b))
    send_all(loop, bind, items)
    got_a = [a.recv(70000) for _ in range(len(sizes))]
    got_b = [b.recv(70000) for _ in range(len([i for i in range(len(sizes)) if i % 50 == 0]))]
    assert got_a == [p for p, addr in items if addr == addr_a]
    assert got_b == [p for p, addr in items if addr == addr_b]
    stats = loop.stats()
    assert stats["gso_sends"] >= 3
    assert stats["datagrams_out"] == len(items)
    assert stats["datagram_errors"] == 0
    a.close()
    b.close()


def test_trains_over_ipv6(loop, datagram_backend):
    import socket
    r, addr = receiver(socket.AF_INET6)
    bind = loop.bind(datagram_backend, ("::1", 0), evpl.Handler())
    payloads = [bytes([i]) * 1000 for i in range(40)]
    send_all(loop, bind, [(p, addr) for p in payloads])
    assert [r.recv(2000) for _ in payloads] == payloads
    assert loop.stats()["gso_sends"] >= 1
    r.close()


def test_header_pieces_join_their_data_in_trains(loop, datagram_backend):
    """``sendto(data, addr, header=h)`` sends one datagram ``h + data``; a
    train may mix datagrams with and without a header piece as long as
    their whole sizes match, and the receiver cannot tell them apart."""
    r, addr = receiver()
    bind = loop.bind(datagram_backend, ("127.0.0.1", 0), evpl.Handler())
    big = bytes(range(256)) * 40
    items = []
    for i in range(100):
        hdr = b"%04d:" % i + b"h" * (i % 20)            # 5..24 bytes
        off = i * 50
        data = big[off:off + 300 - len(hdr)]            # 300 B in all: one train
        items.append((hdr, data) if i % 3 else (b"", hdr + data))
    items += [(b"tail", b"-short"), (b"H" * 32, b""), (b"", b"")]
    before = loop.stats()["datagrams_out"]
    for hdr, data in items:
        if hdr:
            bind.sendto(data, addr, header=hdr)
        else:
            bind.sendto(data, addr)
    assert bind.queued_bytes == sum(len(h) + len(d) for h, d in items)
    loop.run_until(lambda: loop.stats()["datagrams_out"] - before >= len(items),
                   timeout=TIMEOUT)
    assert [r.recv(70000) for _ in items] == [h + d for h, d in items]
    assert bind.queued_bytes == 0
    stats = loop.stats()
    assert stats["gso_sends"] >= 2 and stats["datagram_errors"] == 0
    r.close()


def test_header_piece_checks(loop, datagram_backend):
    r, addr = receiver()
    bind = loop.bind(datagram_backend, ("127.0.0.1", 0), evpl.Handler())
    with pytest.raises(ValueError, match="at most 32"):
        bind.sendto(b"x", addr, header=b"h" * 33)
    with pytest.raises(ValueError, match="exceeds the UDP maximum"):
        bind.sendto(b"x" * 65500, addr, header=b"h" * 8)
    assert bind.queued_bytes == 0
    with pytest.raises(evpl.EvplError, match="use sendto"):
        bind.send(b"x", header=b"h")
    with pytest.raises(TypeError):
        bind.sendto(3, addr, header=b"h")               # not 3 zero bytes
    with pytest.raises(TypeError):
        bind.sendto(b"x", addr, header="text")
    # mutable memory is copied when queued; a Buffer is sent where it lies
    data = bytearray(b"before")
    bind.sendto(data, addr, header=b"1:")
    data[:] = b"after!"
    buf = loop.pool.allocate(5)
    memoryview(buf)[:] = b"pool!"
    bind.sendto(buf, addr, header=b"2:")
    del buf
    loop.run_until(lambda: bind.queued_bytes == 0, timeout=TIMEOUT)
    assert [r.recv(100), r.recv(100)] == [b"1:before", b"2:pool!"]
    # a connected Bind: send() takes the header too
    conn = loop.connect(datagram_backend, addr, evpl.Handler())
    conn.send(memoryview(b"data"), header=bytearray(b"head:"))
    loop.run_until(lambda: conn.queued_bytes == 0, timeout=TIMEOUT)
    assert r.recv(100) == b"head:data"
    listener = loop.listen("tcp", ("127.0.0.1", 0), evpl.Handler())
    stream = loop.connect("tcp", listener.address, evpl.Handler())
    with pytest.raises(evpl.EvplError, match="header= is for datagram Binds"):
        stream.send(b"x", header=b"h")
    r.close()


def test_gso_off(loop, datagram_backend):
    r, addr = receiver()
    bind = loop.bind(datagram_backend, ("127.0.0.1", 0), evpl.Handler(), gso=False)
    payloads = [bytes([i]) * 64 for i in range(32)]
    send_all(loop, bind, [(p, addr) for p in payloads])
    assert [r.recv(100) for _ in payloads] == payloads
    assert loop.stats()["gso_sends"] == 0
    r.close()


def test_gso_option_checked(loop):
    with pytest.raises(evpl.ConfigError, match="gso must be a bool"):
        loop.bind("udp", ("127.0.0.1", 0), evpl.Handler(), gso="yes")
    with pytest.raises(evpl.ConfigError, match="gro must be a bool"):
        loop.bind("udp", ("127.0.0.1", 0), evpl.Handler(), gro=1)


FALLBACK = textwrap.dedent("""
    import socket, subprocess, sys
    import evpl
    subprocess.run(["ip", "link", "set", "lo", "up", "mtu", "1400"], check=True)
    backend = sys.argv[1]
    r = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    r.bind(("127.0.0.1", 0))
    r.settimeout(10)
    with evpl.Loop() as loop:
        bind = loop.bind(backend, ("127.0.0.1", 0), evpl.Handler())
        # 2000 B datagrams do not fit a 1400 B MTU: a train of them is
        # refused, one at a time they go out as IP fragments
        payloads = [bytes([i]) * 2000 for i in range(8)] + [bytes([9]) * 100] * 8
        for round in (1, 2):
            for i, p in enumerate(payloads):
                if i % 2:               # half of them in two pieces
                    bind.sendto(p[7:], r.getsockname(), header=p[:7])
                else:
                    bind.sendto(p, r.getsockname())
            loop.run_until(lambda: loop.stats()["datagrams_out"] >= round * len(payloads),
                           timeout=10)
            got = [r.recv(4000) for _ in payloads]
            # on io_uring the refused train is sent again after the next train
            # was already sent: UDP order is not promised, every datagram is
            assert sorted(got) == sorted(payloads), [len(g) for g in got]
            stats = loop.stats()
            assert stats["datagrams_out"] == round * len(payloads), stats
            assert stats["datagram_errors"] == 0, stats
            # the small ones still go as a train, in both rounds; the big
            # ones were refused once, and not tried as a train again
            assert stats["gso_sends"] == round, stats
            assert stats["gso_refused"] == 1, stats
    print("ok")
""")


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="needs root and unshare(1) for a private network namespace")
def test_refused_train_is_sent_datagram_by_datagram(datagram_backend):
    proc = subprocess.run(["unshare", "--net", sys.executable, "-c", FALLBACK, datagram_backend],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


# ---------------------------------------------------------------- GRO


class Collect(evpl.Handler):
    def __init__(self):
        self.got: list[tuple[bytes, object]] = []

    def on_datagram(self, bind, buf, addr):
        self.got.append((bytes(buf), addr))


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_trains_received_as_datagrams(make_loop, datagram_backend, host):
    """An evpl sender's trains arrive at an evpl receiver as one buffer each
    (UDP GRO) and are delivered datagram by datagram, intact and in order."""
    loop = make_loop()
    rec = Collect()
    rx = loop.bind(datagram_backend, (host, 0), rec)
    tx = loop.bind(datagram_backend, (host, 0), evpl.Handler())
    payloads = [b"%04d" % i + bytes([i % 256]) * 96 for i in range(150)] + [b"tail"]
    for p in payloads:
        tx.sendto(p, rx.local_address)
    loop.run_until(lambda: len(rec.got) >= len(payloads), timeout=TIMEOUT)
    assert [p for p, _ in rec.got] == payloads
    assert {a for _, a in rec.got} == {tx.local_address}
    stats = loop.stats()
    assert stats["gso_sends"] >= 2 and stats["gro_receives"] >= 2
    assert stats["datagrams_in"] == len(payloads)
    assert stats["truncated"] == 0


def test_trains_from_a_kernel_socket(loop, datagram_backend):
    """A plain socket sending with UDP_SEGMENT: same datagrams at evpl."""
    import socket
    import struct
    rec = Collect()
    rx = loop.bind(datagram_backend, ("127.0.0.1", 0), rec)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    seg = 1000
    data = bytes(range(256)) * 20                 # 5120 bytes: 5 of 1000 and one of 120
    s.sendmsg([data], [(socket.IPPROTO_UDP, 103, struct.pack("H", seg))], 0, rx.local_address)
    loop.run_until(lambda: len(rec.got) >= 6, timeout=TIMEOUT)
    assert [p for p, _ in rec.got] == [data[i:i + seg] for i in range(0, len(data), seg)]
    assert loop.stats()["gro_receives"] == 1
    s.close()


def test_gro_off_until_set(loop, datagram_backend):
    """``gro=False``: the kernel cuts a train into datagrams (none arrives
    whole) until ``Bind.gro`` is set; after that one receive takes it. The
    datagrams are the same either way, and clearing it works too."""
    data = bytes(range(256)) * 20                 # 5 of 1000 bytes and one of 120
    want = [data[i:i + 1000] for i in range(0, len(data), 1000)]
    rec = Collect()
    rx = loop.bind(datagram_backend, ("127.0.0.1", 0), rec, gro=False)
    assert rx.gro is False
    _kernel_train(1000, data, rx.local_address)
    loop.run_until(lambda: len(rec.got) >= 6, timeout=TIMEOUT)
    assert loop.stats()["gro_receives"] == 0
    rx.gro = True
    assert rx.gro is True
    _kernel_train(1000, data, rx.local_address)
    loop.run_until(lambda: len(rec.got) >= 12, timeout=TIMEOUT)
    assert loop.stats()["gro_receives"] == 1
    rx.gro = False
    _kernel_train(1000, data, rx.local_address)
    loop.run_until(lambda: len(rec.got) >= 18, timeout=TIMEOUT)
    assert loop.stats()["gro_receives"] == 1
    assert [p for p, _ in rec.got] == want * 3


def test_gro_cannot_be_set_without_room_for_a_train(loop, datagram_backend):
    """A Bind made with ``gso=False`` (or whose slots cannot hold a train)
    has no GRO to turn on: setting it says so instead of switching the
    kernel to trains the receive could not hold."""
    rx = loop.bind(datagram_backend, ("127.0.0.1", 0), evpl.Handler(), gso=False)
    assert rx.gro is False
    with pytest.raises(evpl.EvplError, match="cannot take UDP GRO trains"):
        rx.gro = True
    rx.gro = False                                # (nothing to clear)
    assert rx.gro is False


def test_no_gro_without_room_for_a_train(make_loop, datagram_backend):
    """When a receive slot could not hold a whole train (pool buffers
    smaller than 64 KiB on epoll; smaller than 65600 bytes on io_uring,
    whose slots are cut from them) GRO stays off and the kernel delivers
    the datagrams one by one."""
    size = 64 << 10 if datagram_backend.startswith("io_uring") else 32 << 10
    loop = make_loop(pool=evpl.Pool(slab_size=1 << 20, buffer_size=size))
    rec = Collect()
    rx = loop.bind(datagram_backend, ("127.0.0.1", 0), rec, max_datagram=2000)
    tx = loop.bind(datagram_backend, ("127.0.0.1", 0), evpl.Handler(), max_datagram=2000)
    payloads = [bytes([i]) * 500 for i in range(40)]
    for p in payloads:
        tx.sendto(p, rx.local_address)
    loop.run_until(lambda: len(rec.got) >= len(payloads), timeout=TIMEOUT)
    assert [p for p, _ in rec.got] == payloads
    assert loop.stats()["gro_receives"] == 0


def _kernel_train(seg: int, data: bytes, addr) -> None:
    """Send ``data`` as one UDP_SEGMENT train of ``seg``-byte datagrams from
    a plain kernel socket."""
    import socket
    import struct
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.sendmsg([data], [(socket.IPPROTO_UDP, 103, struct.pack("H", seg))], 0, addr)
    s.close()


def test_gro_with_a_small_max_datagram(loop):
    """On epoll GRO does not depend on max_datagram: a Bind that accepts
    1472-byte datagrams still takes a train in one receive (the slot is 64
    KiB), and each datagram of a train is held to max_datagram."""
    rec = Collect()
    rx = loop.bind("udp", ("127.0.0.1", 0), rec, max_datagram=1472)
    data = bytes(range(256)) * 20
    _kernel_train(1000, data, rx.local_address)
    loop.run_until(lambda: len(rec.got) >= 6, timeout=TIMEOUT)
    assert [p for p, _ in rec.got] == [data[i:i + 1000] for i in range(0, len(data), 1000)]
    assert loop.stats()["gro_receives"] == 1
    # datagrams over the limit are dropped and counted, the one under it delivered
    _kernel_train(1500, bytes(3100), rx.local_address)
    loop.run_until(lambda: loop.stats()["datagrams_in"] >= 9, timeout=TIMEOUT)
    assert loop.stats()["truncated"] == 2
    assert [len(p) for p, _ in rec.got[6:]] == [100]
    # so is a lone datagram over the limit (it fits the 64 KiB slot whole)
    import socket
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.sendto(bytes(40000), rx.local_address)
    s.sendto(b"after", rx.local_address)
    s.close()
    loop.run_until(lambda: len(rec.got) >= 8, timeout=TIMEOUT)
    assert loop.stats()["truncated"] == 3
    assert [p for p, _ in rec.got[7:]] == [b"after"]


def test_separate_datagrams_share_a_pool_buffer(make_loop):
    """GRO's 64 KiB receive slots do not cost a slot's worth of pool memory
    per datagram: short datagrams received in one batch are packed together,
    so 100 of them held by the application take one pool buffer (unpacked
    they would take four: 32 slots of 64 KiB per 2 MiB buffer)."""
    import socket
    loop = make_loop()

    class Hold(evpl.Handler):
        def __init__(self):
            self.got: list = []

        def on_datagram(self, bind, buf, addr):
            self.got.append(buf)

    rec = Hold()
    rx = loop.bind("udp", ("127.0.0.1", 0), rec, max_datagram=1472)
    senders = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(100)]
    in_use = loop.pool.stats()["buffers_in_use"]
    for i, s in enumerate(senders):      # 100 sources: nothing to coalesce
        s.sendto(b"%03d" % i * 30, rx.local_address)
    loop.run_until(lambda: len(rec.got) >= 100, timeout=TIMEOUT)
    assert sorted(bytes(b) for b in rec.got) == sorted(b"%03d" % i * 30 for i in range(100))
    assert loop.stats()["gro_receives"] == 0
    assert loop.pool.stats()["buffers_in_use"] - in_use <= 1
    for s in senders:
        s.close()


def test_max_datagram_must_fit_a_pool_buffer(make_loop, datagram_backend):
    """Each datagram is received into one pool buffer: a max_datagram that
    no buffer holds is refused when the Bind is made (it used to make a Bind
    that could never read and starved silently)."""
    loop = make_loop(pool=evpl.Pool(slab_size=1 << 20, buffer_size=32 << 10))
    with pytest.raises(evpl.ConfigError, match="does not fit one buffer"):
        loop.bind(datagram_backend, ("127.0.0.1", 0), evpl.Handler())
    with pytest.raises(evpl.ConfigError, match="does not fit one buffer"):
        loop.connect(datagram_backend, ("127.0.0.1", 9), evpl.Handler(), max_datagram=40000)
    rx = loop.bind(datagram_backend, ("127.0.0.1", 0), Collect(), max_datagram=32 << 10)
    assert rx.local_address[1] > 0
