"""io_uring_udp-specific behaviour: many datagrams from many peers through the
slot ring (buffer turnover), truncation, close and finish with sendmsg
requests in flight, pause/resume of the multishot recvmsg.

The generic datagram contract is covered by test_datagram.py.
"""

from __future__ import annotations

import socket

import pytest

import evpl

from .helpers import TIMEOUT

_info = next((b for b in evpl.backends() if b.name == "io_uring_udp"), None)
if _info is None or not _info.available:
    pytest.skip(f"io_uring_udp unavailable: {getattr(_info, 'reason', 'not registered')}",
                allow_module_level=True)

B = "io_uring_udp"


class Rec(evpl.Handler):
    def __init__(self, keep=False):
        self.got = []
        self.keep = keep
        self.closed = []

    def on_datagram(self, bind, buf, addr):
        self.got.append((buf if self.keep else bytes(buf), addr))

    def on_closed(self, bind, error):
        self.closed.append(error)


def test_many_datagrams_from_several_sockets(loop):
    rec = Rec(keep=True)           # keeping the Buffers pins their ring slots' memory
    rx = loop.bind(B, ("127.0.0.1", 0), rec)
    peers = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(6)]
    try:
        for p in peers:
            p.bind(("127.0.0.1", 0))
        expect = {}
        n = 0
        for rnd in range(60):          # 60 * 6 * 8 = 2880 datagrams, many slot buffers
            for k, p in enumerate(peers):
                for j in range(8):
                    data = bytes([k]) + rnd.to_bytes(2, "big") + j.to_bytes(2, "big")
                    data += b"x" * ((rnd * 37 + j * 101) % 1400)
                    p.sendto(data, rx.local_address)
                    expect.setdefault(p.getsockname(), []).append(data)
                    n += 1
            loop.run_until(lambda n=n: len(rec.got) >= n, timeout=TIMEOUT)
        got = {}
        for buf, addr in rec.got:
            got.setdefault(addr, []).append(bytes(buf))
        assert got == expect
        st = loop.stats()
        assert st["datagrams_in"] >= 2880 and st["truncated"] == 0
        rec.got.clear()
    finally:
        for p in peers:
            p.close()


def test_truncation_counted_and_dropped(loop):
    rec = Rec()
    rx = loop.bind(B, ("127.0.0.1", 0), rec, max_datagram=1000)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    try:
        before = loop.stats()["truncated"]
        s.sendto(b"a" * 1001, rx.local_address)
        s.sendto(b"b" * 60000, rx.local_address)
        s.sendto(b"c" * 1000, rx.local_address)
        loop.run_until(lambda: rec.got, timeout=TIMEOUT)
        assert loop.stats()["truncated"] - before == 2
        assert rec.got == [(b"c" * 1000, s.getsockname())]
    finally:
        s.close()


def test_echo_through_uring_both_ways(loop):
    class Echo(evpl.Handler):
        def on_datagram(self, bind, buf, addr):
            bind.sendto(buf, addr)

    srv = loop.bind(B, ("127.0.0.1", 0), Echo())
    rec = Rec()
    cli = loop.bind(B, ("127.0.0.1", 0), rec)
    sent = [bytes([i % 256]) * (1 + i * 7 % 3000) for i in range(1000)]
    for i in range(0, len(sent), 25):      # batches the default SO_RCVBUF holds
        for d in sent[i:i + 25]:
            cli.sendto(d, srv.local_address)
        loop.run_until(lambda i=i: len(rec.got) >= i + 25, timeout=TIMEOUT)
    assert sorted(d for d, _ in rec.got) == sorted(sent)
    assert cli.queued_bytes == 0 and srv.queued_bytes == 0


def test_close_with_sends_in_flight(loop):
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    try:
        rec = Rec()
        tx = loop.bind(B, ("127.0.0.1", 0), rec)
        for _ in range(500):
            tx.sendto(bytearray(b"q" * 1200), sink.getsockname())
        assert tx.queued_bytes == 500 * 1200
        loop.run_once(0)               # submits the first batch (64 in flight)
        tx.close()
        assert tx.queued_bytes == 0
        loop.run_until(lambda: rec.closed, timeout=TIMEOUT)
        assert rec.closed == [None]
        out = loop.stats()["datagrams_out"]
        assert 0 < out <= 500
    finally:
        sink.close()
    # Loop.close (fixture) waits for the cancellations; the pool check follows


def test_finish_waits_for_in_flight_sends(loop):
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    sink.bind(("127.0.0.1", 0))
    sink.settimeout(TIMEOUT)
    try:
        rec = Rec()
        tx = loop.bind(B, ("127.0.0.1", 0), rec)
        for i in range(300):
            tx.sendto(i.to_bytes(4, "big"), sink.getsockname())
        tx.finish()
        loop.run_until(lambda: rec.closed, timeout=TIMEOUT)
        assert rec.closed == [None]
        got = [int.from_bytes(sink.recv(100), "big") for _ in range(300)]
        assert sorted(got) == list(range(300))
    finally:
        sink.close()


def test_pause_resume_keeps_datagrams(loop):
    rec = Rec()
    rx = loop.bind(B, ("127.0.0.1", 0), rec)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.pause_reading()
        for i in range(50):
            s.sendto(b"%d" % i, rx.local_address)
        for _ in range(5):
            loop.run_once(0.01)
        assert rec.got == []
        rx.resume_reading()
        loop.run_until(lambda: len(rec.got) >= 50, timeout=TIMEOUT)
        assert [d for d, _ in rec.got] == [b"%d" % i for i in range(50)]
    finally:
        s.close()
