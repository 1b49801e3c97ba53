"""The socket options pyzmq users rely on, against libzmq (pyzmq) over tcp
and ipc: CONFLATE, IMMEDIATE, PROBE_ROUTER, ROUTER_HANDOVER,
XPUB_VERBOSE/VERBOSER, XPUB_MANUAL and ZAP_DOMAIN (the authenticator's
request)."""

from __future__ import annotations

import socket

import pytest
import zmq

import evpl
import evpl.zmtp as ez
from zmtp.zhelpers import POKE, tobytes, until, zrecv

TRANSPORTS = ["tcp", "ipc"]


def _zsock(zctx, kind, **opts):
    z = zctx.socket(kind)
    for k, v in opts.items():
        setattr(z, k, v)
    POKE.append(z)
    return z


def _evpl_ep(kind: str, ipc_dir: str, name: str) -> str:
    return "tcp://127.0.0.1:0" if kind == "tcp" else f"ipc://{ipc_dir}/{name}"


def _zbind(z, kind: str, ipc_dir: str, name: str) -> str:
    if kind == "tcp":
        return f"tcp://127.0.0.1:{z.bind_to_random_port('tcp://127.0.0.1')}"
    ep = f"ipc://{ipc_dir}/{name}"
    z.bind(ep)
    return ep


def _nobody(kind: str, ipc_dir: str, name: str) -> str:
    """An endpoint nothing listens on (yet)."""
    if kind == "ipc":
        return f"ipc://{ipc_dir}/{name}"
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return f"tcp://127.0.0.1:{port}"


def _ready_peers(sock: ez.Socket) -> int:
    return sum(p.ready for p in sock._peers)


# ---- CONFLATE ----------------------------------------------------------------

@pytest.mark.parametrize("kind", TRANSPORTS)
@pytest.mark.parametrize("stype", ["PULL", "SUB", "DEALER"])
def test_conflate_receiver_keeps_only_the_last_message(loop, zctx, ipc_dir, kind, stype):
    s = ez.Socket(loop, stype, conflate=True, routing_id=b"dealer-1" if stype == "DEALER"
                  else b"")
    peer_type = {"PULL": zmq.PUSH, "SUB": zmq.PUB, "DEALER": zmq.ROUTER}[stype]
    z = _zsock(zctx, peer_type, sndhwm=0)       # libzmq never blocks the test
    if stype == "SUB":
        s.subscribe(b"")
    if stype == "DEALER":
        z.router_mandatory = True
    s.connect(_zbind(z, kind, ipc_dir, "conflate"))
    until(loop, lambda: _ready_peers(s) == 1)

    def send(frames):
        z.send_multipart([b"dealer-1", *frames] if stype == "DEALER" else frames)

    if stype != "PULL":             # the peer must know us first (subscription, identity)
        def joined():
            try:
                send([b"join"])
            except zmq.ZMQError:
                return False
            return bool(s._conflated)
        until(loop, joined)
        assert [bytes(f) for f in s.recv_multipart(ez.NOBLOCK)] == [b"join"]
    for i in range(500):
        send([b"%d" % i])
    send([b"last", b"two frames"])
    until(loop, lambda: any(len(m) == 2 for m in s._conflated.values()))
    assert tobytes(s.recv_multipart(ez.NOBLOCK)) == [b"last", b"two frames"]
    with pytest.raises(ez.Again):
        s.recv_multipart(ez.NOBLOCK)
    s.close()


def test_conflate_callback_gets_the_last_message_of_each_batch(loop, zctx):
    batches = []
    pull = ez.Socket(loop, "PULL", conflate=True, on_messages=batches.append)
    ep = pull.bind("tcp://127.0.0.1:0")
    z = _zsock(zctx, zmq.PUSH, sndhwm=0)
    z.connect(ep)
    until(loop, lambda: _ready_peers(pull) == 1)
    for i in range(2000):
        z.send(b"%d" % i)
    until(loop, lambda: batches and bytes(batches[-1][0][0]) == b"1999")
    assert all(len(b) == 1 for b in batches)
    got = [int(bytes(b[0][0])) for b in batches]
    assert got == sorted(set(got))              # newer and newer, never an old one
    pull.close()


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_conflate_push_keeps_only_the_last_message_to_send(loop, zctx, ipc_dir, kind):
    push = ez.Socket(loop, "PUSH", conflate=True, sndhwm=2, reconnect_ivl=20)
    ep = _nobody(kind, ipc_dir, "conflate-push")
    push.connect(ep)
    for i in range(10):                             # past sndhwm: conflate ignores it
        push.send(b"%d" % i, ez.NOBLOCK)
    assert [[bytes(f) for f in m] for m in push._peers[0].out] == [[b"9"]]
    pull = _zsock(zctx, zmq.PULL)
    pull.bind(ep)
    assert zrecv(loop, pull) == [b"9"]
    push.send(b"after", ez.NOBLOCK)
    assert zrecv(loop, pull) == [b"after"]          # nothing older was kept in between
    push.close()


def test_conflate_pub_keeps_only_the_last_message_for_a_slow_peer(loop, zctx):
    zsub = _zsock(zctx, zmq.SUB)
    zsub.subscribe(b"")
    pub = ez.Socket(loop, "PUB", conflate=True, sndbuf=4096)
    ep = pub.bind("tcp://127.0.0.1:0")
    zsub.connect(ep)
    until(loop, lambda: pub._peers and pub._peers[0].subs.all)
    for i in range(20000):
        pub.send_multipart([b"m", b"%d" % i])
    peer = pub._peers[0]
    assert [[bytes(f) for f in m] for m in peer.out] == [[b"m", b"19999"]]
    last = []

    def drained():
        while zsub.poll(0):
            last[:] = zsub.recv_multipart()
        return last == [b"m", b"19999"]
    until(loop, drained)
    pub.close()


# ---- IMMEDIATE ---------------------------------------------------------------

@pytest.mark.parametrize("kind", TRANSPORTS)
@pytest.mark.parametrize("immediate", [True, False])
def test_immediate_queues_only_to_completed_connections(loop, zctx, ipc_dir, kind, immediate):
    push = ez.Socket(loop, "PUSH", immediate=immediate, sndhwm=100)
    push.connect(_nobody(kind, ipc_dir, "immediate-dead"))
    if immediate:
        with pytest.raises(ez.Again):               # no completed connection at all
            push.send(b"nobody", ez.NOBLOCK)
    pull = _zsock(zctx, zmq.PULL)
    push.connect(_zbind(pull, kind, ipc_dir, "immediate-live"))
    until(loop, lambda: _ready_peers(push) == 1)
    for i in range(10):
        push.send(b"%d" % i, ez.NOBLOCK)
    if immediate:
        assert [zrecv(loop, pull) for _ in range(10)] == [[b"%d" % i] for i in range(10)]
    else:                                           # round-robin: half wait for the dead one
        dead = next(p for p in push._peers if not p.ready)
        assert len(dead.out) == 5
        assert [zrecv(loop, pull) for _ in range(5)] == [[b"%d" % i] for i in range(1, 10, 2)]
    pull.close(linger=0)
    until(loop, lambda: _ready_peers(push) == 0)
    if immediate:       # the lost connection takes nothing: sending waits for a new one
        with pytest.raises(ez.Again):
            push.send(b"gone", ez.NOBLOCK)
        assert not push._peers
    else:
        push.send(b"kept", ez.NOBLOCK)              # queued for the endpoints
    push.close(linger=0)


# ---- PROBE_ROUTER ------------------------------------------------------------

@pytest.mark.parametrize("kind", TRANSPORTS)
@pytest.mark.parametrize("stype", ["DEALER", "REQ", "ROUTER"])
def test_probe_router_sends_an_empty_message_on_connect(loop, zctx, ipc_dir, kind, stype):
    router = _zsock(zctx, zmq.ROUTER)
    ep = _zbind(router, kind, ipc_dir, "probe")
    s = ez.Socket(loop, stype, probe_router=True, routing_id=b"prober")
    s.connect(ep)
    assert zrecv(loop, router) == [b"prober", b""]
    if stype == "REQ":                              # the probe leaves REQ's state alone
        s.send(b"request")
        assert zrecv(loop, router) == [b"prober", b"", b"request"]
    s.close()


# ---- ROUTER_HANDOVER -----------------------------------------------------------

@pytest.mark.parametrize("kind", TRANSPORTS)
@pytest.mark.parametrize("handover", [False, True])
def test_router_handover(loop, zctx, ipc_dir, kind, handover):
    got = []
    router = ez.Socket(loop, "ROUTER", router_handover=handover,
                       on_message=lambda m: got.append(tobytes(m)))
    ev = []
    router.monitor(lambda e, ep_, d: ev.append((e, d)))
    ep = router.bind(_evpl_ep(kind, ipc_dir, "handover"))
    # reconnect_ivl -1: a peer whose connection is taken over stays away
    first = _zsock(zctx, zmq.DEALER, routing_id=b"A", reconnect_ivl=-1)
    first.connect(ep)
    first.send(b"one")
    until(loop, lambda: [b"A", b"one"] in got)
    second = _zsock(zctx, zmq.DEALER, routing_id=b"A", reconnect_ivl=-1)
    second.connect(ep)
    second.send(b"two")
    if not handover:
        # the identity is taken: the new peer waits, unread; "A" is still the first
        until(loop, lambda: len(router._pending_ids) == 1)
        router.send_multipart([b"A", b"to first"])
        assert zrecv(loop, first) == [b"to first"]
        assert [b"A", b"two"] not in got
        first.close()                               # the identity is free: the second gets it
    until(loop, lambda: [b"A", b"two"] in got)
    if handover:
        until(loop, lambda: any(e is ez.Event.DISCONNECTED and "router_handover" in str(d)
                                for e, d in ev))
    router.send_multipart([b"A", b"to second"])
    assert zrecv(loop, second) == [b"to second"]
    router.close()


# ---- XPUB_VERBOSE / XPUB_VERBOSER / XPUB_MANUAL ----------------------------------

@pytest.mark.parametrize("kind", TRANSPORTS)
@pytest.mark.parametrize("verbose,verboser", [(False, False), (True, False), (True, True)])
def test_xpub_verbose_and_verboser(loop, zctx, ipc_dir, kind, verbose, verboser):
    seen = []
    xpub = ez.Socket(loop, "XPUB", xpub_verbose=verbose, xpub_verboser=verboser,
                     on_message=lambda m: seen.append(bytes(m[0])))
    ep = xpub.bind(_evpl_ep(kind, ipc_dir, "xpub"))
    subs = [_zsock(zctx, zmq.SUB) for _ in range(2)]
    for z in subs:
        z.subscribe(b"a")
        z.connect(ep)

    def count():
        return sum(p.subs.counts.get(b"a", 0) for p in xpub._peers)
    until(loop, lambda: count() == 2)
    assert seen == [b"\x01a"] * (2 if verbose else 1)
    seen.clear()
    subs[0].unsubscribe(b"a")
    until(loop, lambda: count() == 1)
    assert seen == ([b"\x00a"] if verboser else [])   # a cancel that is not the last
    subs[1].unsubscribe(b"a")
    until(loop, lambda: count() == 0)
    assert seen == [b"\x00a"] * (2 if verboser else 1)
    xpub.close()


@pytest.mark.parametrize("kind", TRANSPORTS)
@pytest.mark.parametrize("manual", [False, True])
def test_xpub_receives_what_an_xsub_sends_besides_subscriptions(loop, zctx, ipc_dir, kind,
                                                                 manual):
    """libzmq's XSUB may send any message upstream; an XPUB gets the ones
    that are not subscriptions, multipart and in order with the
    subscription notifications (a PUB drops them)."""
    xpub = ez.Socket(loop, "XPUB", xpub_manual=manual)
    ep = xpub.bind(_evpl_ep(kind, ipc_dir, "xsub-up"))
    xsub = _zsock(zctx, zmq.XSUB)
    xsub.connect(ep)
    xsub.send(b"\x01a")
    xsub.send_multipart([b"hello", b"", b"world"])
    xsub.send(b"\x02not a subscription")
    xsub.send(b"\x01b")
    got: list[list[bytes]] = []

    def four() -> bool:
        while len(got) < 4:
            try:
                got.append(tobytes(xpub.recv_multipart(ez.NOBLOCK)))
            except ez.Again:
                return False
        return True
    until(loop, four)
    assert got == [
        [b"\x01a"], [b"hello", b"", b"world"], [b"\x02not a subscription"], [b"\x01b"]]
    if manual:
        xpub.subscribe(b"b")        # answers the last request, not the messages between
        until(loop, lambda: any(p.subs.counts.get(b"b") for p in xpub._peers))
    xpub.close()


def test_libzmq_xpub_receives_what_an_evpl_xsub_sends(loop, zctx, ipc_dir):
    xpub = _zsock(zctx, zmq.XPUB)
    ep = _zbind(xpub, "tcp", ipc_dir, "xpub-up")
    xsub = ez.Socket(loop, "XSUB")
    xsub.connect(ep)
    xsub.send(b"\x01t")
    xsub.send_multipart([b"up", b"stream"])
    assert zrecv(loop, xpub) == [b"\x01t"]
    assert zrecv(loop, xpub) == [b"up", b"stream"]
    xsub.close()


@pytest.mark.parametrize("kind", TRANSPORTS)
@pytest.mark.parametrize("mode", ["callback", "recv"])
def test_xpub_manual_subscriptions_are_the_applications(loop, zctx, ipc_dir, kind, mode):
    seen = []

    def decide(msg):
        req = bytes(msg[0])
        seen.append(req)
        if req == b"\x01allowed":
            xpub.subscribe(b"allowed")              # applied to the peer that asked
        elif req == b"\x01rewrite":
            xpub.subscribe(b"x.")                   # a different topic for that peer
        # b"\x01blocked": not applied
    xpub = ez.Socket(loop, "XPUB", xpub_manual=True,
                     on_message=decide if mode == "callback" else None)
    ep = xpub.bind(_evpl_ep(kind, ipc_dir, "manual"))
    with pytest.raises(ez.StateError):
        xpub.subscribe(b"no request yet")
    s1 = _zsock(zctx, zmq.SUB)
    s1.subscribe(b"allowed")
    s1.subscribe(b"blocked")
    s2 = _zsock(zctx, zmq.XSUB)                     # no local filter: sees the rewrite
    s1.connect(ep)
    until(loop, lambda: _ready_peers(xpub) == 1)      # one at a time: their order is known
    s2.connect(ep)
    s2.send(b"\x01rewrite")

    def requests(n=3):
        while mode == "recv":
            try:
                decide(xpub.recv_multipart(ez.NOBLOCK))
            except ez.Again:
                break
        return len(seen) == n
    until(loop, requests)
    assert sorted(seen) == [b"\x01allowed", b"\x01blocked", b"\x01rewrite"]
    assert all(not p.subs.counts.get(b"blocked") for p in xpub._peers)
    for topic in (b"blocked", b"rewrite", b"x.1", b"allowed"):
        xpub.send_multipart([topic, b"data"])
    assert zrecv(loop, s1) == [b"allowed", b"data"]   # "blocked" went nowhere
    assert zrecv(loop, s2) == [b"x.1", b"data"]       # not "rewrite": its request was rewritten
    seen.clear()
    s1.close()                  # a peer that goes: each request it made is reported cancelled
    until(loop, lambda: requests(2))
    assert sorted(seen[:2]) == [b"\x00allowed", b"\x00blocked"]
    xpub.close()


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_xpub_welcome_message_reaches_each_new_subscriber(loop, zctx, ipc_dir, kind):
    xpub = ez.Socket(loop, "XPUB", xpub_welcome_msg=b"welcome")
    ep = xpub.bind(_evpl_ep(kind, ipc_dir, "welcome"))
    subs = [_zsock(zctx, zmq.SUB) for _ in range(2)]
    for z in subs:
        z.subscribe(b"welcome")                     # before connecting, as libzmq says
        z.subscribe(b"data")
        z.connect(ep)
    for z in subs:
        assert zrecv(loop, z) == [b"welcome"]
    until(loop, lambda: sum(len(p.subs) for p in xpub._peers) == 4)
    xpub.send_multipart([b"data", b"1"])
    for z in subs:
        assert zrecv(loop, z) == [b"data", b"1"]    # once each, nothing else before it
    xpub.close()


# ---- ZAP_DOMAIN: the authenticator's request ---------------------------------------

@pytest.mark.parametrize("kind", TRANSPORTS)
def test_zap_domain_reaches_the_authenticator(loop, zctx, ipc_dir, kind):
    asked = []

    def auth(mechanism, credentials, request):
        asked.append(request)
        return credentials == (b"admin", b"secret")
    got = []
    pull = ez.Socket(loop, "PULL", plain_server=True, zap_domain="global", authenticator=auth,
                     on_message=lambda m: got.append(tobytes(m)))
    ep = pull.bind(_evpl_ep(kind, ipc_dir, "zap"))
    z = _zsock(zctx, zmq.PUSH, plain_username=b"admin", plain_password=b"secret")
    z.connect(ep)
    z.send(b"in")
    until(loop, lambda: got)
    assert got == [[b"in"]]
    r = asked[0]
    assert (r.domain, r.mechanism, r.credentials) == ("global", "PLAIN", (b"admin", b"secret"))
    assert r.address == ("127.0.0.1" if kind == "tcp" else r.address)
    assert isinstance(r.address, str)
    pull.close()


def test_zap_domain_makes_null_connections_ask_the_authenticator(loop, zctx):
    asked = []

    def refuse(mechanism, credentials, request):
        asked.append(request)
        return False
    pull = ez.Socket(loop, "PULL", zap_domain=b"dom", authenticator=refuse)
    ev = []
    pull.monitor(lambda e, ep_, d: ev.append(e))
    ep = pull.bind("tcp://127.0.0.1:0")
    z = _zsock(zctx, zmq.PUSH)
    z.connect(ep)
    until(loop, lambda: ez.Event.HANDSHAKE_FAILED_AUTH in ev)
    assert asked[0].mechanism == "NULL" and asked[0].domain == "dom"
    assert asked[0].credentials == ()
    pull.close()
    # without a domain NULL asks nobody (libzmq's rule), and a two-argument
    # authenticator still works
    calls = []
    got = []
    pull = ez.Socket(loop, "PULL", authenticator=lambda m, c: calls.append(m) or False,
                     on_message=lambda m: got.append(tobytes(m)))
    ep = pull.bind("tcp://127.0.0.1:0")
    z2 = _zsock(zctx, zmq.PUSH)
    z2.connect(ep)
    z2.send(b"open")
    until(loop, lambda: got)
    assert got == [[b"open"]] and calls == []
    pull.close()


def test_option_values_are_checked(loop):
    with pytest.raises(evpl.ConfigError):
        ez.Socket(loop, "PULL", conflate=1)
    with pytest.raises(evpl.ConfigError):
        ez.Socket(loop, "PULL", zap_domain="x" * 300)
    s = ez.Socket(loop, "PUB", conflate=True)
    assert s.conflate and s._conflate_out and not s._conflate_in
    s.close()
    s = ez.Socket(loop, "REQ", conflate=True)       # not a conflate type: ignored, as libzmq
    assert not s._conflate_out and not s._conflate_in
    s.close()
