"""drpc over real sockets on every datagram backend: round trips from 0 bytes
to the maximum message both ways, many sessions with the window and credit
limits held (asserted from the stats), late and out-of-order responses,
background handlers, errors, a dead or refusing server, hostile packets."""

from __future__ import annotations

import random
import socket
import struct
from typing import Any

import pytest
from core.helpers import TIMEOUT

import evpl
from evpl.drpc import (
    Client,
    PeerDead,
    RemoteError,
    Server,
    SessionClosed,
    SessionRejected,
)
from evpl.drpc.session import socket_credits
from evpl.drpc.wire import (
    FLAG_CR_RANGE,
    FLAG_RFR_RANGE,
    HEADER_SIZE,
    MAGIC,
    Connect,
    PacketType,
    pack_header,
    parse_header,
)

ECHO, REVERSE, LATE, SLOW, BOOM, BIG = 1, 2, 3, 4, 5, 6


def serve(loop: evpl.Loop, backend: str, **kw) -> Server:
    server = Server(loop, backend, ("127.0.0.1", 0), **kw)
    server.register(ECHO, lambda req: req.body)
    server.register(REVERSE, lambda req: bytes(req.body)[::-1])
    return server


def raw_peer(loop: evpl.Loop) -> tuple[socket.socket, list[bytes], Any]:
    """A plain UDP socket that ``loop`` watches (a hand-made drpc peer):
    what it receives is appended to the list; cancel the watch, then close."""
    raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    raw.bind(("127.0.0.1", 0))
    raw.setblocking(False)
    replies: list[bytes] = []
    watch = loop.watch_fd(raw.fileno(), on_readable=lambda: replies.append(raw.recv(2048)))
    return raw, replies, watch


def run_calls(loop: evpl.Loop, client: Client, calls: list[tuple[int, bytes]]
              ) -> list[tuple[object, BaseException | None]]:
    results: list[tuple[object, BaseException | None] | None] = [None] * len(calls)

    def done(i: int):
        def cb(resp, err):
            results[i] = (bytes(resp) if resp is not None else None, err)
        return cb

    for i, (t, payload) in enumerate(calls):
        client.call(t, payload, done(i))
    loop.run_until(lambda: all(r is not None for r in results), timeout=TIMEOUT * 6)
    return results  # type: ignore[return-value]


def test_round_trips_from_empty_to_max_message(loop, datagram_backend) -> None:
    server = serve(loop, datagram_backend, max_message=1 << 20)
    client = Client(loop, datagram_backend, server.address, max_message=1 << 20)
    p = 1472 - HEADER_SIZE
    rnd = random.Random(1)
    sizes = [0, 1, 32, p - 1, p, p + 1, 2 * p, 3 * p + 7, 100_000, 1 << 20]
    calls = [(REVERSE, rnd.randbytes(n)) for n in sizes]
    results = run_calls(loop, client, calls)
    assert [r for r, _ in results] == [c[1][::-1] for c in calls]
    assert all(e is None for _, e in results)
    st = client.stats()
    assert st["completed"] == len(sizes) and st["malformed"] == 0 and st["bad_session"] == 0
    # the multi-packet messages went in credit returns and requests for response
    assert server.stats()["credit_returns"] > 0 and server.stats()["rfr"] > 0
    assert server.stats()["requests"] == len(sizes)
    # the packets of multi-packet requests were taken by the C path, which
    # counts the credit returns it sends apart from session.py's
    assert server._endpoint.credit_returns > 0
    with pytest.raises(ValueError, match="exceeds max_message"):
        client.call(ECHO, bytes((1 << 20) + 1))
    client.close()
    server.close()


def test_eight_megabytes_both_ways_with_jumbo_datagrams(loop, datagram_backend) -> None:
    """The issue's maximum (eRPC: 8 MB) in packets of 9000 bytes."""
    server = serve(loop, datagram_backend, max_datagram=9000)
    client = Client(loop, datagram_backend, server.address, max_datagram=9000)
    assert client.wait(client.call(ECHO, b"hi"), TIMEOUT) == b"hi"
    assert client.stats()["max_datagram"] == 9000
    msg = random.Random(2).randbytes(8 << 20)
    resp = client.wait(client.call(REVERSE, msg), TIMEOUT * 6)
    assert len(resp) == len(msg) and bytes(resp) == msg[::-1]
    del resp
    client.close()
    server.close()


def test_ranged_rfrs(loop, datagram_backend) -> None:
    """A client whose server's CONNECT_OK carried FLAG_RFR_RANGE asks for a
    multi-packet response's packets several at a time (one RFR per read
    batch, or per 16 credits back: 44 with 128 credits, a 64 KB train of
    1472-byte packets); one whose server did not, one RFR per packet. The
    bytes are the same."""
    body = random.Random(3).randbytes(1 << 20)
    n = -(-len(body) // (1472 - HEADER_SIZE))           # packets per response
    rfrs = {}
    for ranged, credits in ((True, 32), (True, 128), (False, 32)):
        server = serve(loop, datagram_backend, max_message=1 << 21, credits=credits)
        server._endpoint.rfr_range = ranged
        server.register(BIG, lambda req: body)
        client = Client(loop, datagram_backend, server.address, max_message=1 << 21,
                        credits=credits)
        for _ in range(3):
            assert bytes(client.wait(client.call(BIG, b""), TIMEOUT)) == body
        assert client.session.rfr_range is ranged
        assert client.session.rfr_batch == (44 if credits == 128 else 16)
        rfr = rfrs[ranged, credits] = server.stats()["rfr"]
        if ranged:
            assert rfr < 3 * (n - 1) // 2, rfr
        else:
            assert rfr >= 3 * (n - 1), rfr      # (more if a packet was asked again)
        client.close()
        server.close()
    print(f"\nRFRs for three 1 MiB responses: {rfrs}")


def test_a_ranged_rfr_gets_at_most_the_credits(loop, datagram_backend) -> None:
    """An RFR asking for 2**32 - 1 packets is answered with the session's
    credits' worth, in order, and nothing after them."""
    server = serve(loop, datagram_backend)
    server.register(BIG, lambda req: bytes(100 * 1444))
    raw, replies, watch = raw_peer(loop)
    try:
        raw.sendto(pack_header(PacketType.CONNECT, 0, 0, 42) +
                   Connect(77, 1 << 20, 1472, 8, 32).pack(), server.address)
        loop.run_until(lambda: replies, timeout=TIMEOUT)
        ok = replies.pop()
        assert ok[3] & FLAG_RFR_RANGE
        (mine,) = struct.unpack_from(">I", ok, HEADER_SIZE)
        raw.sendto(pack_header(PacketType.REQ, BIG, mine, 0, 0, 0), server.address)
        loop.run_until(lambda: replies, timeout=TIMEOUT)
        assert parse_header(replies.pop())[6] == 0             # the first packet
        raw.sendto(pack_header(PacketType.RFR, BIG, mine, 0, 0xFFFFFFFF, 1), server.address)
        # then a request whose answer comes after anything the RFR caused
        raw.sendto(pack_header(PacketType.REQ, ECHO, mine, 1, 3, 0) + b"end", server.address)
        loop.run_until(lambda: replies and replies[-1].endswith(b"end"), timeout=TIMEOUT)
    finally:
        watch.cancel()
        raw.close()
    heads = [parse_header(r) for r in replies[:-1]]
    assert [h[4] for h in heads] == [0] * 32                   # request 0...
    assert [h[6] for h in heads] == list(range(1, 33))         # ...packets 1..32
    server.close()


def test_gro_turns_on_at_the_first_batch_of_two(loop, datagram_backend) -> None:
    """drpc's Binds start with the kernel's UDP GRO off (every received
    packet pays for it, and one call at a time never receives a train) and
    turn it on at the first read batch of two packets or more: calls in
    parallel or a multi-packet message, which the peer sends as GSO trains.
    From then on those trains arrive whole. ``gro=True`` keeps it on
    throughout."""
    server = serve(loop, datagram_backend, max_message=1 << 21)
    server.register(BIG, lambda req: len(req.body).to_bytes(4, "big"))
    # (no retransmission however slow the machine: one would bring a
    # duplicate alongside an answer, a batch of two)
    client = Client(loop, datagram_backend, server.address, max_message=1 << 21, rto=10.0,
                    peer_timeout=60.0)
    for i in range(20):                           # one at a time
        assert bytes(client.wait(client.call(ECHO, b"%d" % i), TIMEOUT)) == b"%d" % i
    assert (server.bind.gro, client.bind.gro) == (False, False)
    body = random.Random(7).randbytes(1 << 20)
    assert bytes(client.wait(client.call(BIG, body), TIMEOUT)) == len(body).to_bytes(4, "big")
    assert server.bind.gro
    assert bytes(client.wait(client.call(REVERSE, body), TIMEOUT)) == body[::-1]
    assert client.bind.gro
    before = loop.stats()["gro_receives"]
    assert bytes(client.wait(client.call(REVERSE, body), TIMEOUT)) == body[::-1]
    assert loop.stats()["gro_receives"] > before
    client.close()
    server.close()
    # eight calls in flight: trains of requests and of responses
    server = serve(loop, datagram_backend)
    client = Client(loop, datagram_backend, server.address)
    calls = [(ECHO, b"%d" % i) for i in range(8)] * 4
    assert [r for r, _ in run_calls(loop, client, calls)] == [c[1] for c in calls]
    assert (server.bind.gro, client.bind.gro) == (True, True)
    client.close()
    server.close()
    server = serve(loop, datagram_backend, gro=True)
    client = Client(loop, datagram_backend, server.address, gro=True)
    assert client.wait(client.call(ECHO, b"hi"), TIMEOUT) == b"hi"
    assert (server.bind.gro, client.bind.gro) == (True, True)
    client.close()
    server.close()


def test_ranged_credit_returns(loop, datagram_backend) -> None:
    """A client's CONNECT carries FLAG_CR_RANGE: a server that honours it
    returns a multi-packet request's credits several packets at a time
    (one CR per read batch, or per half the credits); one that does not,
    one CR per packet. The server gets the same bytes either way."""
    body = random.Random(5).randbytes(1 << 20)
    n = -(-len(body) // (1472 - HEADER_SIZE))           # packets per request
    crs = {}
    for ranged in (True, False):
        server = serve(loop, datagram_backend, max_message=1 << 21)
        server._endpoint.cr_range = ranged
        server.register(BIG, lambda req: bytes(req.body)[-64:] + len(req.body).to_bytes(4, "big"))
        client = Client(loop, datagram_backend, server.address, max_message=1 << 21)
        for _ in range(3):
            resp = client.wait(client.call(BIG, body), TIMEOUT)
            assert bytes(resp) == body[-64:] + len(body).to_bytes(4, "big")
        (sess,) = server._endpoint.sessions.values()
        assert sess.cr_range is ranged
        cr = crs[ranged] = server.stats()["credit_returns"]
        if ranged:
            assert cr < 3 * (n - 1) // 4, cr
        else:
            assert cr >= 3 * (n - 1), cr        # (more if a packet came twice)
        client.close()
        server.close()
    print(f"\nCRs for three 1 MiB requests: {crs}")


@pytest.mark.parametrize("flags", [0, FLAG_CR_RANGE])
def test_a_ranged_credit_return_leaves_before_the_response(loop, datagram_backend,
                                                           flags) -> None:
    """A hand-made client sends a four-packet request at once. Without
    FLAG_CR_RANGE in its CONNECT it gets a CR for packets 0, 1 and 2; with
    it, a CR for packet 0 (taken alone, as a new request) and one for
    packets 1-2 (msg_size 2, pkt_num 2), ahead of the response."""
    server = serve(loop, datagram_backend)
    payload = 1472 - HEADER_SIZE
    body = random.Random(6).randbytes(3 * payload) + b"end"         # four packets
    size = len(body)
    raw, replies, watch = raw_peer(loop)
    try:
        raw.sendto(pack_header(PacketType.CONNECT, 0, 0, 42, flags=flags) +
                   Connect(77, 1 << 20, 1472, 8, 32).pack(), server.address)
        loop.run_until(lambda: replies, timeout=TIMEOUT)
        (mine,) = struct.unpack_from(">I", replies.pop(), HEADER_SIZE)
        for k in range(4):      # all queued before the server reads: one batch
            raw.sendto(pack_header(PacketType.REQ, REVERSE, mine, 0, size, k) +
                       body[k * payload:(k + 1) * payload], server.address)
        loop.run_until(lambda: replies and parse_header(replies[-1])[0] == PacketType.RESP,
                       timeout=TIMEOUT)
    finally:
        watch.cancel()
        raw.close()
    heads = [parse_header(r) for r in replies]
    crs = [(h[6], h[5]) for h in heads if h[0] == PacketType.CR]
    assert heads[-1][0] == PacketType.RESP and heads[-1][4] == 0 and heads[-1][5] == size
    if flags:
        assert crs == [(0, 0), (2, 2)]
    else:
        assert crs == [(0, 0), (1, 0), (2, 0)]
    server.close()


def test_single_packet_bodies_are_buffers_of_the_packet(loop, datagram_backend) -> None:
    seen = []
    server = Server(loop, datagram_backend, ("127.0.0.1", 0))
    server.register(ECHO, lambda req: seen.append(type(req.body)) or req.body)
    client = Client(loop, datagram_backend, server.address)
    resp = client.wait(client.call(ECHO, b"zero copy"), TIMEOUT)
    assert type(resp) is evpl.Buffer and bytes(resp) == b"zero copy"
    assert seen == [evpl.Buffer]
    del resp
    client.close()
    server.close()


def test_many_sessions_respect_window_and_credits(loop, datagram_backend) -> None:
    server = serve(loop, datagram_backend)
    clients = [Client(loop, datagram_backend, server.address, window=4, credits=6)
               for _ in range(24)]
    rnd = random.Random(3)
    expected = {}
    got = {}
    for ci, c in enumerate(clients):
        for k in range(60):
            payload = rnd.randbytes(rnd.choice([8, 32, 3000, 9000]))
            expected[ci, k] = payload[::-1]
            c.call(REVERSE, payload, lambda r, e, key=(ci, k): got.__setitem__(key, (r, e)))
    assert sum(c.stats()["backlog"] for c in clients) > 0       # beyond the window: queued
    loop.run_until(lambda: len(got) == len(expected), timeout=TIMEOUT * 6)
    assert all(e is None for _, e in got.values())
    assert all(bytes(got[k][0]) == v for k, v in expected.items())
    for c in clients:
        st = c.stats()
        assert st["window"] == 4 and st["credits"] == 6
        assert st["max_outstanding"] == 4                        # the window was used...
        assert st["max_inflight"] <= 6                           # ...and credits never exceeded
    assert max(c.stats()["max_inflight"] for c in clients) == 6
    assert server.stats()["sessions"] == 24
    got.clear()
    for c in clients:
        c.close()
    loop.run_until(lambda: server.stats()["sessions"] == 0, timeout=TIMEOUT)
    assert server.stats()["sessions_closed"] == 24
    server.close()


def test_thousands_of_requests_in_flight(loop, datagram_backend) -> None:
    """64 sessions with 40 calls each submitted at once (2560 in flight,
    512 of them in the windows): every response correct."""
    server = serve(loop, datagram_backend)
    clients = [Client(loop, datagram_backend, server.address) for _ in range(64)]
    got: dict[tuple[int, int], bytes | None] = {}
    for ci, c in enumerate(clients):
        for k in range(40):
            c.call(ECHO, b"%d/%d" % (ci, k),
                   lambda r, e, key=(ci, k): got.__setitem__(key, bytes(r) if e is None
                                                           else None))
    assert sum(c.outstanding for c in clients) + sum(c.stats()["backlog"] for c in clients) \
        == 64 * 40
    loop.run_until(lambda: len(got) == 64 * 40, timeout=TIMEOUT * 6)
    assert all(v == b"%d/%d" % k for k, v in got.items())
    assert server.stats()["requests"] >= 64 * 40
    for c in clients:
        c.close()
    server.close()


def test_late_and_out_of_order_responses(loop, datagram_backend) -> None:
    pending: list = []
    server = serve(loop, datagram_backend)
    server.register(LATE, lambda req: pending.append(req))     # respond later
    client = Client(loop, datagram_backend, server.address)
    calls = [client.call(LATE, struct.pack(">I", i) * (1 + i * 500)) for i in range(8)]
    loop.run_until(lambda: len(pending) == 8, timeout=TIMEOUT)
    assert not any(c.done for c in calls)
    order = [5, 2, 7, 0, 1, 6, 3, 4]
    for k, i in enumerate(order):
        loop.call_later(0.002 * k, lambda i=i: pending[i].respond(b"late:" + pending[i].body))
    loop.run_until(lambda: all(c.done for c in calls), timeout=TIMEOUT)
    for i, c in enumerate(calls):
        assert bytes(c.result()) == b"late:" + struct.pack(">I", i) * (1 + i * 500)
    assert pending[0].respond(b"again") is False                # answered already
    pending.clear()
    client.close()
    server.close()


def test_background_handlers(loop, datagram_backend) -> None:
    import threading

    threads = set()

    def slow(req):
        threads.add(threading.current_thread().name)
        return bytes(req.body) * 2

    def boom(req):
        raise KeyError("nope")

    server = serve(loop, datagram_backend, workers=2)
    server.register(SLOW, slow, background=True)
    server.register(BOOM, boom, background=True)
    client = Client(loop, datagram_backend, server.address)
    calls = [client.call(SLOW, b"%d" % i) for i in range(20)]
    bad = client.call(BOOM, b"")
    loop.run_until(lambda: bad.done and all(c.done for c in calls), timeout=TIMEOUT)
    assert [bytes(c.result()) for c in calls] == [b"%d" % i * 2 for i in range(20)]
    assert all(t.startswith("drpc-worker") for t in threads)
    with pytest.raises(RemoteError, match="KeyError"):
        bad.result()
    client.close()
    server.close()


def test_background_handlers_on_a_full_pool_pause_the_server(loop, datagram_backend) -> None:
    """Background handlers run through ``Loop.offload``: with the pool's one
    worker held and its queue full, the server stops reading (the requests
    already read wait their turn); once the worker is free every call is
    answered, each handler run once, and the caller's pool stays open."""
    import threading

    from evpl.threads import WorkerPool

    release = threading.Event()
    ran: list[bytes] = []

    def slow(req):
        body = bytes(req.body)
        ran.append(body)
        if body == b"block":
            release.wait(TIMEOUT)
        return body * 2

    workers = WorkerPool(1, max_queued=2)
    server = serve(loop, datagram_backend, workers=workers)
    server.register(SLOW, slow, background=True)
    client = Client(loop, datagram_backend, server.address)
    bodies = [b"block"] + [b"%d" % i for i in range(5)]
    calls = [client.call(SLOW, b) for b in bodies]
    # one running, two queued: the rest cannot be queued, so reading stops
    loop.run_until(lambda: not server.bind.reading, timeout=TIMEOUT)
    release.set()
    loop.run_until(lambda: all(c.done for c in calls), timeout=TIMEOUT)
    assert [bytes(c.result()) for c in calls] == [b * 2 for b in bodies]
    assert sorted(ran) == sorted(bodies)                # once each
    assert server.bind.reading
    client.close()
    server.close()
    fut = loop.offload(str, 7, workers=workers)     # not the server's to close
    loop.run_until(fut.done, timeout=TIMEOUT)
    assert fut.result() == "7"
    workers.close()


def test_handler_errors_and_unknown_types(loop, datagram_backend) -> None:
    server = serve(loop, datagram_backend)
    server.register(BOOM, lambda req: 1 / 0)
    client = Client(loop, datagram_backend, server.address)
    with pytest.raises(RemoteError, match="ZeroDivisionError"):
        client.wait(client.call(BOOM, b"x"), TIMEOUT)
    with pytest.raises(RemoteError, match="no handler for request type 99"):
        client.wait(client.call(99, b"x"), TIMEOUT)
    assert bytes(client.wait(client.call(ECHO, b"still fine"), TIMEOUT)) == b"still fine"
    assert server.stats()["handler_errors"] == 1
    client.close()
    server.close()


def test_requests_kept_while_reading_is_paused(loop, datagram_backend) -> None:
    """A handler that pauses its Bind's reading: the requests already read
    in the same batch are kept by the Bind and served, once each, when
    reading resumes (they reach the endpoint through ``on_datagrams``, the
    batch path, instead of one by one in C)."""
    server = Server(loop, datagram_backend, ("127.0.0.1", 0))
    runs: list[bytes] = []

    def pausing(req):
        runs.append(bytes(req.body))
        if len(runs) == 1:
            server.bind.pause_reading()
            loop.call_later(0.01, server.bind.resume_reading)
        return req.body

    server.register(ECHO, pausing)
    client = Client(loop, datagram_backend, server.address)
    assert bytes(client.wait(client.call(ECHO, b"up"), TIMEOUT)) == b"up"
    runs.clear()
    before = loop.stats()["receive_calls"]
    payloads = [b"%d" % i * 10 for i in range(8)]     # one window, sent in one iteration
    results = run_calls(loop, client, [(ECHO, p) for p in payloads])
    assert results == [(p, None) for p in payloads]
    assert sorted(runs) == sorted(payloads)
    # the seven kept requests came back as one batch (drpc's own datagrams
    # otherwise make no Python receive call)
    assert loop.stats()["receive_calls"] - before == 1
    client.close()
    server.close()


def test_flush_from_a_handler_leaves_the_read_batch_intact(loop, datagram_backend) -> None:
    """A handler that sends on its own and flushes the loop while the rest
    of its read batch waits to be handed over: the requests after it are
    served intact (sends have their own system-call arrays; they shared the
    receive's once, and the flush overwrote the batch's later entries)."""
    server = Server(loop, datagram_backend, ("127.0.0.1", 0))
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    runs: list[bytes] = []

    def flushing(req):
        runs.append(bytes(req.body))
        if len(runs) == 1:
            # datagrams of different sizes: one sendmmsg message each
            for k in range(8):
                server.bind.sendto(b"n" * (100 + k), sink.getsockname())
            loop.flush()
        return req.body

    server.register(ECHO, flushing)
    client = Client(loop, datagram_backend, server.address)
    try:
        assert bytes(client.wait(client.call(ECHO, b"up"), TIMEOUT)) == b"up"
        runs.clear()
        before = server.stats()
        # one window of requests of different sizes, sent in one iteration:
        # separate datagrams (no GRO train), read in one batch
        payloads = [b"%d" % i * (10 + i) for i in range(8)]
        results = run_calls(loop, client, [(ECHO, p) for p in payloads])
        assert results == [(p, None) for p in payloads]
        assert sorted(runs) == sorted(payloads)
        after = server.stats()
        # before the fix the later entries were the flushed datagrams: seven
        # packets of "n"s read as garbage, the requests served only after
        # the client's retransmission
        for counter in ("bad_magic", "malformed", "bad_type", "bad_session"):
            assert after[counter] == before[counter], counter
        assert after["requests"] - before["requests"] == 8
        sink.settimeout(TIMEOUT)
        assert sorted(len(sink.recv(200)) for _ in range(8)) == [100 + k for k in range(8)]
    finally:
        sink.close()
        client.close()
        server.close()


def test_answers_leave_during_a_long_read_batch(loop) -> None:
    """A read batch of 32 requests: the first 16 answers are sent while the
    rest are still being served (the engine flushes a sink's Bind every 16
    queued datagrams), so the client can work on them meanwhile; before,
    all 32 left at the end of the batch. (udp: there a flush is a
    ``sendmmsg``; io_uring submits its sends at the end of the iteration.)"""
    server = Server(loop, "udp", ("127.0.0.1", 0), window=32)
    seen: list[int] = []

    def echo(req):
        seen.append(loop.stats()["datagrams_out"])
        return req.body

    server.register(ECHO, echo)
    client = Client(loop, "udp", server.address, window=32)
    try:
        assert bytes(client.wait(client.call(ECHO, b"up"), TIMEOUT)) == b"up"
        seen.clear()
        # different sizes: separate datagrams, all in the server's socket
        # before it reads (one sendmmsg of the client's)
        payloads = [b"p" * (10 + i) for i in range(32)]
        results = run_calls(loop, client, [(ECHO, p) for p in payloads])
        assert results == [(p, None) for p in payloads]
        assert len(seen) == 32
        assert seen[15] == seen[0]                  # nothing sent before 16 were queued
        assert seen[16] - seen[0] == 16             # then those 16, before the 17th ran
    finally:
        client.close()
        server.close()


def test_dead_server_fails_outstanding_calls(loop, datagram_backend) -> None:
    """A server that stops answering (hung: it reads nothing more) fails
    the session's outstanding calls with PeerDead within peer_timeout."""
    server = serve(loop, datagram_backend)
    client = Client(loop, datagram_backend, server.address, peer_timeout=0.3)
    t0 = loop.now()             # before the server's last packet, which starts the timeout
    assert bytes(client.wait(client.call(ECHO, b"up"), TIMEOUT)) == b"up"
    server.bind.pause_reading()
    calls = [client.call(ECHO, b"x" * 5000) for _ in range(12)]     # 8 out, 4 queued
    loop.run_until(lambda: all(c.done for c in calls), timeout=TIMEOUT)
    assert loop.now() - t0 >= 0.3
    for c in calls:
        with pytest.raises(PeerDead, match="no packet from the server"):
            c.result()
    assert client.stats()["retransmits"] > 0
    with pytest.raises(PeerDead):                                     # later calls too
        client.wait(client.call(ECHO, b"again"), TIMEOUT)
    client.close()
    server.close()


def test_nobody_there(loop, datagram_backend) -> None:
    """A port that swallows packets: the connect fails with PeerDead; a
    closed port: ConnectionRefused at once."""
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    try:
        client = Client(loop, datagram_backend, sink.getsockname(), peer_timeout=0.2)
        with pytest.raises(PeerDead, match="no answer"):
            client.wait(client.call(ECHO, b"x"), TIMEOUT)
        assert not client.connected
        client.close()
    finally:
        port = sink.getsockname()
        sink.close()
    client = Client(loop, datagram_backend, port, peer_timeout=5)
    with pytest.raises(evpl.ConnectionRefused):
        client.wait(client.call(ECHO, b"x"), TIMEOUT)
    client.close()


def test_refusal_and_connect_retry_in_the_same_iteration(loop, datagram_backend) -> None:
    """The port's refusal closes the Bind while the connect's retry timer is
    due in the same loop iteration (the loop did not run for a while, as on
    a slow or stalled host): the timer does not send on the closed Bind;
    the call fails with ConnectionRefused and no callback raises."""
    import time
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    port = sink.getsockname()
    sink.close()
    client = Client(loop, datagram_backend, port, peer_timeout=5, rto=0.001)
    call = client.call(ECHO, b"x")
    loop.run_once(0)              # the connect packet leaves; the refusal comes back
    time.sleep(0.05)              # not a synchronisation: the retry (10 ms) is overdue
    with pytest.raises(evpl.ConnectionRefused):
        client.wait(call, TIMEOUT)
    client.close()


def test_closed_client_and_rejected_session(loop, datagram_backend) -> None:
    server = serve(loop, datagram_backend, max_sessions=1)
    a = Client(loop, datagram_backend, server.address)
    assert bytes(a.wait(a.call(ECHO, b"a"), TIMEOUT)) == b"a"
    b = Client(loop, datagram_backend, server.address)
    with pytest.raises(SessionRejected, match="max_sessions"):
        b.wait(b.call(ECHO, b"b"), TIMEOUT)
    call = a.call(ECHO, b"never")
    a.close()
    with pytest.raises(SessionClosed):
        call.result()
    with pytest.raises(SessionClosed):
        a.wait(a.call(ECHO, b"after"), TIMEOUT)
    b.close()
    server.close()


def test_hostile_packets_are_dropped_and_counted(loop, datagram_backend) -> None:
    server = serve(loop, datagram_backend, max_message=1 << 16)
    client = Client(loop, datagram_backend, server.address)
    assert bytes(client.wait(client.call(ECHO, b"ok"), TIMEOUT)) == b"ok"
    sid = server.sessions()[0]["session"]
    raw, replies, watch = raw_peer(loop)
    try:
        def req(session: int, req_num: int, size: int, pkt: int, body: bytes,
                ptype: int = PacketType.REQ) -> bytes:
            return pack_header(ptype, ECHO, session, req_num, size, pkt) + body

        # a session of our own, to send in-session garbage from a valid peer
        raw.sendto(pack_header(PacketType.CONNECT, 0, 0, 42) +
                   Connect(77, 1 << 16, 1472, 8, 32).pack(), server.address)
        loop.run_until(lambda: replies, timeout=TIMEOUT)
        (mine,) = struct.unpack_from(">I", replies.pop(), HEADER_SIZE)
        hostile = [
            b"\xd7\x01\x00",                                        # truncated
            bytes(40),                                              # bad magic
            bytes([MAGIC, 99]) + bytes(40),                         # unknown type
            pack_header(PacketType.CR, 0, mine, 0),                 # a server-bound CR
            req(sid, 0, 2, 0, b"hi"),                               # someone else's session
            req(0x12345678, 0, 2, 0, b"hi"),                        # no such session
            req(mine, 1000, 2, 0, b"hi"),                           # out of the window
            req(mine, 0, 1 << 30, 0, b"x" * 1444),                  # oversize claim
            req(mine, 0, 10, 0, b"short"),                          # wrong payload length
            req(mine, 1, 5000, 3, b"x" * 1444),                     # starts mid-message
            req(mine, 2, 0, 0, b"", PacketType.RFR),                # RFR for nothing
        ]
        for pkt in hostile:
            raw.sendto(pkt, server.address)
        # then one valid request on our session, answered after all of the above
        raw.sendto(req(mine, 3, 5, 0, b"valid"), server.address)
        loop.run_until(lambda: replies, timeout=TIMEOUT)
        reply = replies.pop()
    finally:
        watch.cancel()
        raw.close()
    assert reply[HEADER_SIZE:] == b"valid" and reply[1] == PacketType.RESP
    st = server.stats()
    assert st["truncated"] == 1 and st["bad_magic"] == 1
    assert st["bad_type"] == 2                          # unknown type, CR to the server
    assert st["bad_session"] == 2
    assert st["out_of_window"] == 2                     # req 1000, the RFR
    assert st["malformed"] == 2                         # oversize claim, wrong length
    assert st["out_of_order"] == 1
    # hostile packets at the client: from the server's socket (the only
    # address a connected client reads), with a wrong session or garbage
    for pkt in (b"\x00", pack_header(PacketType.RESP, 0, 1, 0, 1, 0) + b"x",
                pack_header(PacketType.RESP, 0, client.session.client_session, 5, 1, 0) + b"x",
                pack_header(PacketType.REQ, 0, client.session.client_session, 0)):
        server.bind.sendto(pkt, client.bind.local_address)
    assert bytes(client.wait(client.call(ECHO, b"still ok"), TIMEOUT)) == b"still ok"
    cst = client.stats()
    assert cst["malformed"] == 1 and cst["bad_session"] == 1
    assert cst["stale"] == 1 and cst["bad_type"] == 1
    client.close()
    server.close()


def test_bad_configuration(loop) -> None:
    with pytest.raises(evpl.ConfigError, match="window"):
        Server(loop, "udp", ("127.0.0.1", 0), window=0)
    with pytest.raises(evpl.ConfigError, match="max_datagram"):
        Client(loop, "udp", ("127.0.0.1", 9), max_datagram=20)
    with pytest.raises(evpl.ConfigError, match="rto"):
        Client(loop, "udp", ("127.0.0.1", 9), rto=2, peer_timeout=1)
    with pytest.raises(evpl.ConfigError, match="datagram one is needed"):
        Server(loop, "tcp", ("127.0.0.1", 0))
    server = Server(loop, "udp", ("127.0.0.1", 0))
    server.register(1, lambda r: b"")
    with pytest.raises(evpl.ConfigError, match="already"):
        server.register(1, lambda r: b"")
    with pytest.raises(evpl.ConfigError, match=r"0\.\.255"):
        server.register(256, lambda r: b"")
    server.close()


def test_unconnected_client_socket(loop, datagram_backend) -> None:
    """``local_address=``: the client sends with sendto from a bound socket
    (the mode for backends without connected datagram Binds, e.g. xdp_udp)
    and drops what comes from anywhere but the server."""
    server = serve(loop, datagram_backend)
    client = Client(loop, datagram_backend, ("localhost", server.address[1]),
                    local_address=("127.0.0.1", 0))
    msg = random.Random(4).randbytes(5000)
    assert bytes(client.wait(client.call(REVERSE, msg), TIMEOUT)) == msg[::-1]
    foreign = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        foreign.sendto(pack_header(PacketType.RESP, 0, client.session.client_session, 0, 1, 0)
                       + b"x", client.bind.local_address)
    finally:
        foreign.close()
    loop.run_until(lambda: client.stats()["bad_session"] == 1, timeout=TIMEOUT)
    assert bytes(client.wait(client.call(ECHO, b"fine"), TIMEOUT)) == b"fine"
    assert client.stats()["stale"] == 0
    client.close()
    server.close()


def test_idle_client_connects_again_after_the_server_forgot_it(loop, datagram_backend) -> None:
    """The server forgets sessions silent for session_timeout and tells
    clients that timeout: a client idle for half of it connects again
    before its next call, which then succeeds."""
    server = serve(loop, datagram_backend, session_timeout=1.0)
    client = Client(loop, datagram_backend, server.address)
    assert bytes(client.wait(client.call(ECHO, b"one"), TIMEOUT)) == b"one"
    loop.run_until(lambda: server.stats()["sessions_expired"] == 1, timeout=TIMEOUT)
    assert server.stats()["sessions"] == 0
    assert bytes(client.wait(client.call(ECHO, b"two"), TIMEOUT)) == b"two"
    assert client.stats()["reconnects"] == 1 and server.stats()["sessions"] == 1
    client.close()
    server.close()


def test_request_on_a_forgotten_session_is_not_served(loop, datagram_backend) -> None:
    """A request that names a session the server has forgotten (expired),
    from that session's own client, is dropped and counted as bad_session:
    the server's C path remembers the last session it served, and must not
    serve a closed one from that memory."""
    server = serve(loop, datagram_backend, session_timeout=1.0)
    client = Client(loop, datagram_backend, server.address)
    assert bytes(client.wait(client.call(ECHO, b"one"), TIMEOUT)) == b"one"
    number = server.sessions()[0]["session"]
    loop.run_until(lambda: server.stats()["sessions_expired"] == 1, timeout=TIMEOUT)
    before = server.stats()
    # the next request of the old session, as its client would have sent it
    client.bind.send(pack_header(PacketType.REQ, ECHO, number, 1, 3) + b"two")
    loop.run_until(lambda: server.stats()["bad_session"] > before["bad_session"],
                   timeout=TIMEOUT)
    after = server.stats()
    assert after["bad_session"] == before["bad_session"] + 1
    assert after["requests"] == before["requests"] and after["responses"] == before["responses"]
    client.close()
    server.close()


def test_full_send_queue_drops_packets_not_the_server(loop, datagram_backend) -> None:
    """A server whose send queue is at its hard limit drops response
    packets (counted; the client pulls them again) instead of failing its
    socket with SendQueueFull: with a 200 KB limit, 32 credits of 64 KB
    packets cannot all be queued, and every large response still arrives."""
    server = serve(loop, datagram_backend, max_datagram=65507, high_water=65536,
                   hard_limit=200_000)
    # (peer_timeout: the test is not about a dead server; under valgrind a
    # server with dropped packets to resend can be silent for over a second)
    client = Client(loop, datagram_backend, server.address, max_datagram=65507,
                    peer_timeout=TIMEOUT)
    msgs = [random.Random(i).randbytes(4 << 20) for i in range(3)]
    for m in msgs:
        resp = client.wait(client.call(REVERSE, m), TIMEOUT * 6)
        assert bytes(resp) == m[::-1]
    assert not server.bind.closed
    assert not loop.callback_errors
    client.close()
    server.close()


def test_large_response_packets_land_in_the_message(loop, datagram_backend) -> None:
    """With 64 KB datagrams and one call pulling a response, the epoll udp
    backend receives each response packet after the first straight into
    the message Buffer (its header in the receive buffer, its payload at
    its place: the loop's ``placed`` counter), with no copy after the
    kernel's; io_uring_udp copies as before. The bytes are the same."""
    server = serve(loop, datagram_backend, max_datagram=65507)
    client = Client(loop, datagram_backend, server.address, max_datagram=65507)
    msgs = [random.Random(i).randbytes((2 << 20) + i) for i in range(3)]
    before = loop.stats()["placed"]
    for m in msgs:
        resp = client.wait(client.call(REVERSE, m), TIMEOUT * 6)
        assert bytes(resp) == m[::-1]
    placed = loop.stats()["placed"] - before
    packets = -(-len(msgs[0]) // (65507 - HEADER_SIZE))
    if datagram_backend == "udp":
        assert 0 < placed <= len(msgs) * (packets - 1)
    else:
        assert placed == 0
    client.close()
    server.close()


def test_credits_are_capped_at_inflight_bytes(loop) -> None:
    """A session keeps at most ``inflight_bytes`` (1 MiB) of datagrams in
    flight: 16 credits of 64 KB datagrams, fewer than granted; 1472-byte
    datagrams keep all granted; a larger cap uses every credit granted. The
    server grants what it offers (``credits``, here 32) and no more than
    its socket's receive buffer holds (read back from the kernel: it
    depends on ``net.core.rmem_max``). The cap holds in flight
    (``max_inflight``) and the responses are exact."""
    server = serve(loop, "udp", max_datagram=65507, credits=32, rcvbuf=16 << 20)
    rcvbuf = server.stats()["rcvbuf"]
    assert rcvbuf > 0
    cases = [(65507, None, 16), (65507, 4 << 20, 64), (65507, 100_000, 1), (1472, None, 712)]
    for dgram, cap, by_bytes in cases:
        extra = {} if cap is None else {"inflight_bytes": cap}
        client = Client(loop, "udp", server.address, max_datagram=dgram, credits=32,
                        rcvbuf=16 << 20, **extra)
        m = random.Random(dgram).randbytes(3 << 20)
        assert bytes(client.wait(client.call(REVERSE, m), TIMEOUT * 6)) == m[::-1]
        st = client.stats()
        # what the server grants, what the bytes allow, what the client's
        # own socket holds (both buffers depend on net.core.rmem_max)
        credits = min(32, socket_credits(rcvbuf, dgram), by_bytes,
                      socket_credits(st["rcvbuf"], dgram))
        assert st["credits"] == credits, (dgram, cap, st["credits"])
        assert 1 <= st["max_inflight"] <= credits
        client.close()
    with pytest.raises(evpl.ConfigError):
        Client(loop, "udp", server.address, inflight_bytes=0)
    server.close()


def _udp_drops(port: int) -> int:
    """The kernel's drop counter of the IPv4 UDP socket bound to ``port``."""
    with open("/proc/net/udp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if int(fields[1].split(":")[1], 16) == port:
                return int(fields[-1])
    raise AssertionError(f"no UDP socket on port {port}")


def test_credits_fit_the_servers_receive_buffer(loop, datagram_backend) -> None:
    """A server whose socket has a small receive buffer (64 KiB, which the
    kernel counts as 128 KiB) grants a client asking for 128 credits of
    1472-byte datagrams only what half of it holds (28); 1 MiB both ways
    then arrives exact and the server's socket drops nothing."""
    server = serve(loop, datagram_backend, max_message=1 << 21, rcvbuf=64 << 10)
    rcvbuf = server.stats()["rcvbuf"]
    assert rcvbuf == 128 << 10
    client = Client(loop, datagram_backend, server.address, max_message=1 << 21, credits=128)
    body = random.Random(9).randbytes(1 << 20)
    for _ in range(3):
        assert bytes(client.wait(client.call(REVERSE, body), TIMEOUT)) == body[::-1]
    assert client.stats()["credits"] == socket_credits(rcvbuf, 1472) == 28
    assert server.sessions()[0]["credits"] == 28
    assert _udp_drops(server.address[1]) == 0
    client.close()
    server.close()


def test_credits_fit_the_clients_receive_buffer(loop, datagram_backend) -> None:
    """A client whose socket has a small receive buffer (208 KiB, a stock
    ``rmem_max``, counted as 416 KiB) keeps no more 64 KB datagrams in
    flight than half the answers it holds (3), whatever the server grants:
    1 MiB both ways arrives exact and the client's socket drops nothing."""
    server = serve(loop, datagram_backend, max_message=1 << 21, max_datagram=65507)
    client = Client(loop, datagram_backend, server.address, max_message=1 << 21,
                    max_datagram=65507, rcvbuf=208 << 10)
    body = random.Random(10).randbytes(1 << 20)
    for _ in range(3):
        assert bytes(client.wait(client.call(REVERSE, body), TIMEOUT)) == body[::-1]
    st = client.stats()
    assert st["rcvbuf"] == 416 << 10
    assert st["credits"] == socket_credits(416 << 10, 65507) == 3
    assert st["max_inflight"] <= 3
    assert _udp_drops(client.bind.local_address[1]) == 0
    client.close()
    server.close()


def test_paced_packets_are_built_when_they_leave(loop, datagram_backend) -> None:
    """With Timely held below the link rate (every RTT above ``t_high``)
    the client paces every packet through the loop's timing wheel: multi-
    packet requests in bytes and in a Buffer, and the RFRs of multi-packet
    responses. The wheel holds references, not packets: each packet is
    built when it leaves. Both ways the bytes are exact."""
    server = serve(loop, datagram_backend)
    slow = {"t_low": 0.0, "t_high": 1e-9, "min_rate": 50e6}
    client = Client(loop, datagram_backend, server.address, link_rate=1e9, timely=slow)
    sess = client.session
    sess.cc.rate = 100e6                    # congested from the start
    sess.cc = sess.cc
    assert not sess.uncongested
    rnd = random.Random(5)
    m = rnd.randbytes(300_000)
    buf = loop.pool.allocate(100_000)
    body = rnd.randbytes(100_000)
    memoryview(buf)[:] = body
    calls = [client.call(REVERSE, m), client.call(ECHO, buf), client.call(ECHO, b"small")]
    del buf                                 # the call holds it until done
    got = [bytes(client.wait(c, TIMEOUT * 6)) for c in calls]
    assert got == [m[::-1], body, b"small"]
    wheel = loop._drpc_wheel
    # 279 request packets and 276 RFRs (1444-byte payloads), all paced
    # but the few sent at once
    assert wheel.sent > 400 and wheel.failed == 0, wheel.stats()
    assert not sess.uncongested
    client.close()
    server.close()
