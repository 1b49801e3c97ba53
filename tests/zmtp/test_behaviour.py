"""Socket semantics against libzmq: round-robin, fair-queueing, filtering
with many subscriptions, high-water marks per type, ROUTER_MANDATORY, REQ's
alternation, reconnect after the peer restarts, heartbeat timeout of a
frozen peer; transports io_uring and inproc; the awaitable API."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
import zmq

import evpl
import evpl.zmtp as ez
from zmtp.zhelpers import POKE, tobytes, until, zrecv


def _zsock(zctx, kind):
    z = zctx.socket(kind)
    POKE.append(z)
    return z


def test_push_round_robin_over_three_pulls(loop, zctx):
    pulls = [_zsock(zctx, zmq.PULL) for _ in range(3)]
    push = ez.Socket(loop, "PUSH")
    for z in pulls:
        push.connect(f"tcp://127.0.0.1:{z.bind_to_random_port('tcp://127.0.0.1')}")
    until(loop, lambda: sum(p.ready for p in push._peers) == 3)
    for i in range(30):
        push.send(b"%d" % i, ez.NOBLOCK)
    counts = [0, 0, 0]

    def all_in():
        for k, z in enumerate(pulls):
            while z.poll(0):
                z.recv()
                counts[k] += 1
        return sum(counts) == 30
    until(loop, all_in)
    assert counts == [10, 10, 10]
    push.close()


def test_pull_fair_queues_three_pushes(loop, zctx):
    got = []
    pull = ez.Socket(loop, "PULL", on_message=lambda m: got.append(bytes(m[0])))
    ep = pull.bind("tcp://127.0.0.1:0")
    pushes = [_zsock(zctx, zmq.PUSH) for _ in range(3)]
    for z in pushes:
        z.connect(ep)
    for k, z in enumerate(pushes):
        for i in range(200):
            z.send(b"%d:%d" % (k, i))
    until(loop, lambda: len(got) == 600)
    for k in range(3):      # each sender's messages in its own order
        mine = [g for g in got if g.startswith(b"%d:" % k)]
        assert mine == [b"%d:%d" % (k, i) for i in range(200)]
    pull.close()


def test_sub_filters_with_thousands_of_subscriptions(loop, zctx):
    got = []
    sub = ez.Socket(loop, "SUB", on_messages=lambda ms: got.extend(tobytes(m) for m in ms))
    for i in range(5000):
        sub.subscribe(b"t%05d." % i)
    pub = _zsock(zctx, zmq.PUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    sub.connect(f"tcp://127.0.0.1:{port}")

    def joined():
        pub.send_multipart([b"t04999.join", b""])
        return bool(got)
    until(loop, joined)
    got.clear()
    for i in range(0, 10000, 7):
        pub.send_multipart([b"t%05d.x" % i, b"%d" % i])
    pub.send_multipart([b"t00000.end", b"end"])
    until(loop, lambda: got and got[-1][1] == b"end")
    want = [[b"t%05d.x" % i, b"%d" % i] for i in range(0, 5000, 7)]
    assert [m for m in got if m[0] != b"t04999.join"][:-1] == want
    sub.close()


def test_pub_drops_at_hwm_push_blocks(loop, zctx):
    # PUB: a peer that cannot keep up loses messages, the sender never waits
    zsub = _zsock(zctx, zmq.SUB)
    zsub.subscribe(b"")
    pub = ez.Socket(loop, "PUB", sndhwm=10, sndbuf=4096)
    ep = pub.bind("tcp://127.0.0.1:0")
    zsub.connect(ep)
    until(loop, lambda: pub._peers and pub._peers[0].subs.all)
    for i in range(20000):
        pub.send_multipart([b"m", b"%d" % i])       # never raises
    peer = pub._peers[0]
    assert len(peer.out) == 10                       # the HWM's worth waits
    n = 0

    def drained():
        nonlocal n
        while zsub.poll(0):
            zsub.recv_multipart()
            n += 1
        return not peer.out and not peer.bind.queued_bytes
    until(loop, drained)
    while zsub.poll(50):
        zsub.recv_multipart()
        n += 1
    assert 10 < n < 20000
    pub.close()
    # PUSH: no peer can take more: Again, and nothing is lost
    push = ez.Socket(loop, "PUSH", sndhwm=5)
    with pytest.raises(ez.Again):
        push.send(b"no peer at all", ez.NOBLOCK)
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()                                    # nobody listens there now (a plain
    # socket: a libzmq one closes later, in its I/O thread, and could still accept)
    ev = []
    push.monitor(lambda e, ep_, d: ev.append(e))
    push.connect(f"tcp://127.0.0.1:{port}")
    for i in range(5):
        push.send(b"%d" % i, ez.NOBLOCK)
    with pytest.raises(ez.Again):
        push.send(b"sixth", ez.NOBLOCK)
    until(loop, lambda: ez.Event.CONNECT_RETRIED in ev)
    pull = _zsock(zctx, zmq.PULL)
    pull.bind(f"tcp://127.0.0.1:{port}")            # the peer comes up: the queue leaves
    assert [zrecv(loop, pull) for _ in range(5)] == [[b"%d" % i] for i in range(5)]
    push.close()


def test_router_mandatory_and_req_alternation(loop, zctx):
    router = ez.Socket(loop, "ROUTER")
    router.send_multipart([b"nobody", b"x"])         # dropped silently
    router.router_mandatory = True
    with pytest.raises(ez.HostUnreachable):
        router.send_multipart([b"nobody", b"x"])
    ep = router.bind("tcp://127.0.0.1:0")
    d = _zsock(zctx, zmq.DEALER)
    d.setsockopt(zmq.IDENTITY, b"dealer-1")
    d.connect(ep)
    d.send(b"hi")
    got = []
    router.on_message = lambda m: got.append(tobytes(m))
    until(loop, lambda: got)
    assert got == [[b"dealer-1", b"hi"]]
    router.send_multipart([b"dealer-1", b"back"])
    assert zrecv(loop, d) == [b"back"]
    router.close()

    rep = _zsock(zctx, zmq.REP)
    port = rep.bind_to_random_port("tcp://127.0.0.1")
    req = ez.Socket(loop, "REQ")
    req.connect(f"tcp://127.0.0.1:{port}")
    req.send(b"one")
    with pytest.raises(ez.StateError):
        req.send(b"two")
    req.req_relaxed = True
    req.req_correlate = True
    req.send(b"three")                               # allowed: the first is abandoned
    assert zrecv(loop, rep) == [b"one"]
    rep.send(b"late answer")                         # REQ drops it: not the current request
    assert zrecv(loop, rep) == [b"three"]
    rep.send(b"answer")
    got2 = []

    def reply():
        try:
            got2.append(tobytes(req.recv_multipart(ez.NOBLOCK)))
        except ez.Again:
            return False
        return True
    until(loop, reply)
    assert got2 == [[b"answer"]]
    req.close()


def test_reconnect_after_peer_restarts(loop, zctx):
    z = _zsock(zctx, zmq.PULL)
    port = z.bind_to_random_port("tcp://127.0.0.1")
    push = ez.Socket(loop, "PUSH", reconnect_ivl=20, reconnect_ivl_max=200)
    ev = []
    push.monitor(lambda e, ep, d: ev.append(e))
    push.connect(f"tcp://127.0.0.1:{port}")
    push.send(b"before", ez.NOBLOCK)
    assert zrecv(loop, z) == [b"before"]
    z.close()
    until(loop, lambda: ez.Event.DISCONNECTED in ev and ez.Event.CONNECT_RETRIED in ev)

    def port_free() -> bool:            # libzmq closes its listener later, in its I/O thread
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", port)) != 0
    until(loop, port_free)
    push.send(b"during", ez.NOBLOCK)                 # queued for the connection to come
    z2 = _zsock(zctx, zmq.PULL)
    z2.bind(f"tcp://127.0.0.1:{port}")
    assert zrecv(loop, z2) == [b"during"]
    assert ev.count(ez.Event.HANDSHAKE_SUCCEEDED) == 2
    push.close()


PEER = textwrap.dedent("""
    import sys, zmq
    ctx = zmq.Context()
    s = ctx.socket(zmq.PULL)
    port = s.bind_to_random_port("tcp://127.0.0.1")
    print(port, flush=True)
    while True:
        s.recv()
""")


def test_heartbeat_timeout_when_peer_freezes(loop):
    proc = subprocess.Popen([sys.executable, "-c", PEER], stdout=subprocess.PIPE)
    try:
        port = int(proc.stdout.readline())
        push = ez.Socket(loop, "PUSH", heartbeat_ivl=100, heartbeat_timeout=600)
        ev = []
        push.monitor(lambda e, ep, d: ev.append((e, d)))
        push.connect(f"tcp://127.0.0.1:{port}")
        until(loop, lambda: any(e is ez.Event.HANDSHAKE_SUCCEEDED for e, _ in ev))
        os.kill(proc.pid, signal.SIGSTOP)
        until(loop, lambda: any(e is ez.Event.DISCONNECTED for e, _ in ev))
        reason = next(d for e, d in ev if e is ez.Event.DISCONNECTED)
        assert str(reason).startswith("heartbeat timeout")
        push.close(linger=0)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait()


@pytest.mark.skipif(not any(b.name == "io_uring_tcp" and b.available for b in evpl.backends()),
                    reason="io_uring is not available on this machine (evpl info says why)")
def test_io_uring_backend_with_libzmq(loop, zctx):
    got = []
    pull = ez.Socket(loop, "PULL", backend="io_uring", on_messages=lambda ms: got.extend(ms))
    ep = pull.bind("tcp://127.0.0.1:0")
    z = _zsock(zctx, zmq.PUSH)
    z.connect(ep)
    for i in range(1000):
        z.send_multipart([b"%d" % i, b"y" * (i % 300)])
    until(loop, lambda: len(got) == 1000)
    assert [tobytes(m) for m in got] == [[b"%d" % i, b"y" * (i % 300)] for i in range(1000)]
    got.clear()
    big = bytes(range(256)) * 8192                   # 2 MiB: assembled across receives
    z.send_multipart([b"big", big, b"end"])
    until(loop, lambda: got)
    assert tobytes(got[0]) == [b"big", big, b"end"]
    got.clear()
    pull.close()


def test_inproc_between_two_loops_of_one_process(make_loop):
    a, b = make_loop(), make_loop()
    got = []
    pull = ez.Socket(b, "PULL", on_message=lambda m: got.append(tobytes(m)))
    pull.bind("inproc://workers")
    push = ez.Socket(a, "PUSH")
    push.connect("inproc://workers")
    push.send_multipart([b"in", b"process"], ez.NOBLOCK)
    for _ in range(10_000):                          # each loop turn waits 1 ms at most
        if got:
            break
        a.run_once(0.001)
        b.run_once(0.001)
    assert got == [[b"in", b"process"]]
    push.close()
    pull.close()


def test_awaitable_recv_and_send(loop, zctx):
    """recv_multipart/send return asyncio awaitables (plain Futures: on the
    evpl.aio loop they need nothing more; here a task drives the evpl loop)."""
    z = _zsock(zctx, zmq.DEALER)
    rep = ez.Socket(loop, "REP")
    ep = rep.bind("tcp://127.0.0.1:0")
    z.connect(ep)

    async def main():
        stop = False

        async def drive():
            while not stop:
                loop.run_once(0.001)
                await asyncio.sleep(0)
        driver = asyncio.ensure_future(drive())
        z.send_multipart([b"", b"question"])
        msg = await asyncio.wait_for(rep.recv_multipart(), 15)
        await rep.send(b"answer")
        z.send_multipart([b"", b"part 1", b"part 2"])
        first = await asyncio.wait_for(rep.recv(), 15)       # frame by frame, as pyzmq
        more = rep.rcvmore
        second = await rep.recv()
        await rep.send(b"two", ez.SNDMORE)
        await rep.send(b"parts")
        stop = True
        await driver
        return tobytes(msg), bytes(first), more, bytes(second), rep.rcvmore
    assert asyncio.run(main()) == ([b"question"], b"part 1", True, b"part 2", False)
    assert zrecv(loop, z) == [b"", b"answer"]
    assert zrecv(loop, z) == [b"", b"two", b"parts"]
    rep.close()


def test_send_messages_batches_keep_round_robin_and_filters(loop, zctx):
    pulls = [_zsock(zctx, zmq.PULL) for _ in range(2)]
    push = ez.Socket(loop, "PUSH")
    for z in pulls:
        push.connect(f"tcp://127.0.0.1:{z.bind_to_random_port('tcp://127.0.0.1')}")
    until(loop, lambda: sum(p.ready for p in push._peers) == 2)
    push.send_messages([[b"%d" % i, b"tail"] for i in range(10)])
    got = [[zrecv(loop, z)[0] for _ in range(5)] for z in pulls]
    assert sorted(got) == [[b"0", b"2", b"4", b"6", b"8"], [b"1", b"3", b"5", b"7", b"9"]]
    push.close()

    pub = ez.Socket(loop, "PUB")
    ep = pub.bind("tcp://127.0.0.1:0")
    sub = _zsock(zctx, zmq.SUB)
    sub.subscribe(b"b")
    sub.connect(ep)
    until(loop, lambda: pub._peers and pub._peers[0].subs.counts)
    pub.send_messages([[b"a1"], [b"b1", b"x"], [b"a2"], [b"b2"]])
    assert [zrecv(loop, sub), zrecv(loop, sub)] == [[b"b1", b"x"], [b"b2"]]
    pub.close()


def test_close_lingers_until_queued_messages_left(loop, zctx):
    z = _zsock(zctx, zmq.PULL)
    port = z.bind_to_random_port("tcp://127.0.0.1")
    push = ez.Socket(loop, "PUSH", sndbuf=64 * 1024)
    push.connect(f"tcp://127.0.0.1:{port}")
    until(loop, lambda: push._peers[0].ready)
    for i in range(500):
        push.send_multipart([b"%d" % i, b"x" * 1000], ez.NOBLOCK)
    peer = push._peers[0]
    assert peer.out                                  # some wait above the engine's queue
    push.close()                                     # linger -1: all of them still leave
    assert [zrecv(loop, z)[0] for _ in range(500)] == [b"%d" % i for i in range(500)]
    until(loop, lambda: peer.bind is None)           # then the connection closed

    dropped = ez.Socket(loop, "PUSH")
    dropped.connect(f"tcp://127.0.0.1:{port}")
    until(loop, lambda: dropped._peers[0].ready)
    dropped.close(linger=0)
    with pytest.raises(ez.ZMTPError):
        dropped.send(b"after close")


def test_xpub_reports_each_topic_once_unless_verbose(loop, zctx):
    for verbose in (False, True):
        xpub = ez.Socket(loop, "XPUB", xpub_verbose=verbose)
        ep = xpub.bind("tcp://127.0.0.1:0")
        subs = [_zsock(zctx, zmq.SUB) for _ in range(2)]
        for z in subs:
            z.subscribe(b"a")
            z.connect(ep)
        seen = []
        xpub.on_message = lambda m, seen=seen: seen.append(tobytes(m))
        until(loop, lambda xpub=xpub: sum(len(p.subs) for p in xpub._peers) == 2)
        assert seen == [[b"\x01a"]] * (2 if verbose else 1)
        for z in subs:
            z.close()
        until(loop, lambda seen=seen: [b"\x00a"] in seen)
        xpub.close()


def test_pub_send_messages_to_a_slow_peer_drops_at_hwm(loop, zctx):
    zsub = _zsock(zctx, zmq.SUB)
    zsub.subscribe(b"")
    pub = ez.Socket(loop, "PUB", sndhwm=7, sndbuf=4096)
    ep = pub.bind("tcp://127.0.0.1:0")
    zsub.connect(ep)
    until(loop, lambda: pub._peers and pub._peers[0].subs.all)
    batch = [[b"m", b"y" * 100]] * 1000
    for _ in range(50):                              # far past every limit: never raises
        pub.send_messages(batch)
    peer = pub._peers[0]
    assert len(peer.out) == 7
    assert peer.bind.queued_bytes < peer.bind.high_water + len(batch) * 110
    pub.close(linger=0)


def test_rcvhwm_holds_the_peer_back_until_the_application_reads(loop, zctx):
    pull = ez.Socket(loop, "PULL", rcvhwm=10)
    ep = pull.bind("tcp://127.0.0.1:0")
    z = _zsock(zctx, zmq.PUSH)
    z.connect(ep)
    for i in range(500):                             # below libzmq's own HWM: never blocks
        z.send(b"%d" % i)
    until(loop, lambda: pull._rx_paused)
    held = len(pull._rxq)
    assert held >= 10
    loop.run_once(0.05)
    assert len(pull._rxq) == held                    # reading stopped: the queue is bounded
    got = []

    def read_all():
        while True:
            try:
                got.append(bytes(pull.recv_multipart(ez.NOBLOCK)[0]))
            except ez.Again:
                return len(got) == 500
    until(loop, read_all)
    assert got == [b"%d" % i for i in range(500)]
    pull.close()


def test_configuration_is_checked_when_given(loop):
    with pytest.raises(evpl.ConfigError, match="socket type"):
        ez.Socket(loop, "BOGUS")
    with pytest.raises(evpl.ConfigError, match="sndhwm"):
        ez.Socket(loop, "PUSH", sndhwm=-1)
    with pytest.raises(evpl.ConfigError, match="unknown option"):
        ez.Socket(loop, "PUSH", sndhwn=10)
    s = ez.Socket(loop, "DEALER", identity="me", hwm=5)
    assert (s.routing_id, s.sndhwm, s.rcvhwm) == (b"me", 5, 5)
    for bad in ("tcp://127.0.0.1", "udp://x:1", "nothing", "tcp://h:99999", "ipc://"):
        with pytest.raises(evpl.ConfigError):
            s.connect(bad)
    with pytest.raises(ez.StateError):
        ez.Socket(loop, "PUSH").recv_multipart(ez.NOBLOCK)
    with pytest.raises(ez.StateError):
        ez.Socket(loop, "PULL").send(b"x")
    with pytest.raises(evpl.ConfigError):
        ez.Socket(loop, "PUB").subscribe(b"x")
    s.close()
    with pytest.raises(ez.ZMTPError):
        s.connect("tcp://127.0.0.1:1")


def test_rep_returns_a_multi_frame_envelope_as_received(loop, zctx):
    """Routing frames before the delimiter (a short and a long one) come
    back in front of the reply exactly; a request without a delimiter is
    dropped and the next one is answered."""
    rep = ez.Socket(loop, "REP")
    rep.on_message = lambda m: rep.send_multipart([b"re:" + bytes(m[0])])
    ep = rep.bind("tcp://127.0.0.1:0")
    d = _zsock(zctx, zmq.DEALER)
    d.connect(ep)
    hop = b"h" * 300
    d.send_multipart([b"no delimiter"])
    d.send_multipart([b"hop1", hop, b"", b"req"])
    assert zrecv(loop, d) == [b"hop1", hop, b"", b"re:req"]
    rep.close()
