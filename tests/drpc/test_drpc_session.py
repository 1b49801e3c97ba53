"""The two protocol cores against each other, sans-I/O, with a virtual clock:
hypothesis picks which packets are lost, duplicated or delivered late, and
every call must still complete once with the right answer, each handler
having run exactly once. (The real-socket versions are in
test_drpc_rpc.py and test_drpc_faults.py; this one explores orders and
losses no network produces on demand.)"""

from __future__ import annotations

import itertools
import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from evpl.drpc.cc import Timely
from evpl.drpc.session import ClientSession, ServerEndpoint
from evpl.drpc.wire import PacketType, pack_header, parse_header

PEER = ("10.0.0.1", 1)
RTO = 5_000_000


def exchange(seed: int, loss: float, dup: float, late: float, sizes: list[int],
             window: int, credits: int, handler: bool = False
             ) -> tuple[dict[int, bytes], Counter[int], ClientSession]:
    rnd = random.Random(seed)
    wire: list[tuple[str, bytes]] = []        # packets in the network, in order
    held: list[tuple[str, bytes]] = []        # delivered after the next round
    runs: Counter[int] = Counter()

    def to_server(data: object) -> None:
        wire.append(("s", bytes(data)))       # type: ignore[arg-type]

    def paced(item: object, tag: object, when: int) -> None:
        client.send_paced(item, when)         # no pacing here: cc is off

    def to_client(data: object, addr: object) -> None:
        wire.append(("c", bytes(data)))       # type: ignore[arg-type]

    def dispatch(sess, slot, req_type, req_num, body) -> None:
        key = int.from_bytes(bytes(body[:4]), "big")
        runs[key] += 1
        server.respond(sess, slot, req_num, bytes(body)[::-1])

    client = ClientSession(to_server, paced, client_session=7, window=window, credits=credits,
                           max_datagram=28 + 100, rto_ns=RTO, peer_timeout_ns=10**15)
    server = ServerEndpoint(to_client, dispatch, lambda req, exc: None, max_datagram=28 + 100)
    if handler:
        # a dispatch handler the core runs itself (its C path for one-packet
        # requests), answering at once
        def serve(req: object) -> bytes:
            body = bytes(req.body)                # type: ignore[attr-defined]
            runs[int.from_bytes(body[:4], "big")] += 1
            return body[::-1]

        server.handlers[1] = serve
    now = 1
    wire.append(("s", client.connect_packet(now)))
    got: dict[int, bytes] = {}
    for i, n in enumerate(sizes):
        body = i.to_bytes(4, "big") + bytes(rnd.getrandbits(8) for _ in range(n))
        client.submit(1, body, lambda r, e, i=i: got.__setitem__(i, bytes(r)), now)
    for _ in range(20000):
        if len(got) == len(sizes):
            break
        batch, wire[:] = wire[:] + held, []
        held.clear()
        if not batch:
            now += RTO                        # nothing moving: time passes, RTOs fire
            client.tick(now)
            if client.state == "connecting":
                wire.append(("s", client.connect_packet(now)))
            continue
        now += 1000
        # each end reads what reached it this round as one batch (the
        # server's credit returns for it then cover several packets)
        to: dict[str, list[tuple[bytes, object]]] = {"s": [], "c": []}
        for dest, pkt in batch:
            r = rnd.random()
            if r < loss:
                continue
            if r < loss + late:
                held.append((dest, pkt))
                continue
            to[dest] += [(pkt, PEER)] * (2 if rnd.random() < dup else 1)
        if to["s"]:
            server.receive(to["s"], now)
        if to["c"]:
            client.receive(to["c"], now)
        client.tick(now)
    return got, runs, client


@settings(max_examples=150)
@given(seed=st.integers(0, 2**32), loss=st.sampled_from([0.0, 0.1, 0.3]),
       dup=st.sampled_from([0.0, 0.2]), late=st.sampled_from([0.0, 0.2]),
       sizes=st.lists(st.integers(0, 600), min_size=1, max_size=12),
       window=st.integers(1, 4), credits=st.integers(1, 6), handler=st.booleans())
def test_every_call_completes_once_whatever_the_network_does(seed, loss, dup, late, sizes,
                                                             window, credits, handler) -> None:
    got, runs, client = exchange(seed, loss, dup, late, sizes, window, credits, handler)
    assert sorted(got) == list(range(len(sizes)))
    for i, resp in got.items():
        assert resp[-4:] == i.to_bytes(4, "big")[::-1] and len(resp) == sizes[i] + 4
    assert all(runs[i] == 1 for i in range(len(sizes))), runs
    st_ = client.stats()
    assert st_["max_inflight"] <= credits and st_["max_outstanding"] <= window
    assert client.credits == client.credits_total        # every credit came back


def test_malformed_response_packets_are_dropped() -> None:
    """Packets after the first of a multi-packet response (the client's
    inline path): a wrong message size or a short payload is dropped as
    malformed, a number past the expected one as out of order; the real
    packets then complete the call with the right bytes."""
    to_server: list[bytes] = []
    to_client: list[bytes] = []
    client = ClientSession(lambda d: to_server.append(bytes(d)), lambda *a: None,
                           client_session=7, window=1, credits=1, max_datagram=28 + 100,
                           rto_ns=RTO, peer_timeout_ns=10**15)
    def dispatch(sess, slot, req_type, req_num, body) -> None:
        server.respond(sess, slot, req_num, bytes(range(250)))

    server = ServerEndpoint(lambda d, a: to_client.append(bytes(d)), dispatch,
                            lambda req, exc: None, max_datagram=28 + 100)
    got: list[bytes] = []

    def step() -> None:
        batch = [(p, PEER) for p in to_server]
        to_server.clear()
        server.receive(batch, 1)

    to_server.append(client.connect_packet(1))
    step()
    client.receive([(p, PEER) for p in to_client], 1)
    to_client.clear()
    client.submit(1, b"q", lambda r, e: got.append(bytes(r)), 1)
    step()                                     # the request: response packet 0 back
    client.receive([(to_client.pop(0), PEER)], 1)
    step()                                     # one credit: the RFR for packet 1
    good = to_client.pop(0)
    wrong_size = good[:16] + (251).to_bytes(4, "big") + good[20:]
    short = good[:-1]
    ahead = good[:20] + (2).to_bytes(4, "big") + good[24:]
    client.receive([(p, PEER) for p in (wrong_size, short, ahead)], 1)
    st = client.stats()
    assert st["malformed"] == 2 and st["out_of_order"] == 1 and not got
    client.receive([(good, PEER)], 1)
    step()                                     # the RFR for packet 2
    client.receive([(p, PEER) for p in to_client], 1)
    assert got == [bytes(range(250))]


def _paced_pair(credits: int, max_datagram: int) -> tuple[
        ClientSession, ServerEndpoint, Timely, list[bytes], list[tuple[bytes, int]], list[bytes]]:
    """A client with Timely (one request slot) and a server, not connected:
    what the client sends at once goes to ``sent``, what it paces to
    ``wheel`` as ``(packet, when)``, the server's answers to ``to_client``."""
    sent: list[bytes] = []
    wheel: list[tuple[bytes, int]] = []
    to_client: list[bytes] = []

    def pace(item: object, tag: object, when: int) -> None:
        # the packet the pacer will send (send_paced builds it then)
        out: list[bytes] = []
        client.send_now = lambda d: out.append(bytes(d))
        client.send_paced(item, when)
        client.send_now = send_now
        wheel.append((out[0], when))
        tag.queued += 1                       # type: ignore[attr-defined]

    def send_now(data: object) -> None:
        sent.append(bytes(data))              # type: ignore[arg-type]

    cc = Timely(10e9, t_low=50e-6, t_high=1e-3, min_rtt=10e-6, min_rate=1e6)
    client = ClientSession(send_now, pace, client_session=7, window=1,
                           credits=credits, max_datagram=max_datagram, rto_ns=RTO,
                           peer_timeout_ns=10**15, cc=cc)
    server = ServerEndpoint(lambda d, a: to_client.append(bytes(d)),
                            lambda *a: None, lambda req, exc: None, max_datagram=max_datagram)
    return client, server, cc, sent, wheel, to_client


def test_a_slots_packets_leave_in_order_behind_paced_ones() -> None:
    """While a slot has packets in the pacing wheel, its next packets go
    behind them even once the session is uncongested again: one sent at
    once would overtake them, and its answer, out of order, would be
    dropped and cost a retransmission timeout."""
    client, server, cc, sent, wheel, to_client = _paced_pair(credits=2, max_datagram=28 + 100)
    server.handlers[1] = lambda req: bytes(1000)          # 14 packets

    def to_server(now: int) -> None:
        server.receive([(p, PEER) for p in sent], now)
        sent.clear()

    sent.append(client.connect_packet(1))
    to_server(1)
    client.receive([(p, PEER) for p in to_client], 1)
    to_client.clear()
    client.submit(1, b"q", lambda r, e: None, 1_000)
    to_server(1_000)
    # response packet 0 after 5 ms: it lets the client pull packets 1 and 2
    # (at once), and its RTT, above t_high, drops the rate after the batch
    client.receive([(to_client.pop(0), PEER)], 6_000_000)
    assert not client.uncongested and len(sent) == 2 and not wheel
    to_server(6_000_000)
    # packet 1's answer: the RFR for packet 3 leaves now and sets the pace;
    # packet 2's answer right after it: the RFR for packet 4 is paced
    client.receive([(to_client.pop(0), PEER)], 6_000_010)
    assert len(sent) == 1 and not wheel
    client.receive([(to_client.pop(0), PEER)], 6_000_011)
    slot = client.slots[0]
    assert len(sent) == 1 and len(wheel) == 1 and slot.queued == 1
    # packet 3's answer, with the session at the link rate again: the RFR
    # for packet 5 must still queue behind the one in the wheel
    to_server(6_000_012)
    cc.rate = cc.link_rate
    client.cc = cc
    client.receive([(to_client.pop(0), PEER)], 6_000_020)
    assert client.uncongested
    assert not sent and len(wheel) == 2 and slot.queued == 2
    nums = [int.from_bytes(p[20:24], "big") for p, _ in wheel]
    assert nums == [4, 5] and wheel[0][1] <= wheel[1][1]


def test_requests_for_response_are_paced_by_the_answer_they_pull() -> None:
    """Below the link rate the client spaces its packets by what they cost
    the path: a request-for-response by the ``max_datagram`` answer it asks
    for, not by its own 28 bytes (which let a large response arrive at some
    fifty times the session's rate)."""
    client, server, cc, sent, wheel, to_client = _paced_pair(credits=8, max_datagram=1472)
    server.handlers[1] = lambda req: bytes(64 << 10)      # 46 packets
    server.receive([(client.connect_packet(1), PEER)], 1)
    client.receive([(p, PEER) for p in to_client], 1)
    to_client.clear()
    cc.rate = 1e9                           # congested: the client paces
    client.submit(1, b"q", lambda r, e: None, 1_000)
    server.receive([(p, PEER) for p in sent], 1_000)
    sent.clear()
    client.receive([(to_client.pop(0), PEER)], 11_000)   # answer 0, 10 µs RTT
    # answer 0 returns the credits: RFRs for answers 1-8, the first leaves
    # at once, the others wait in the wheel, spaced
    assert len(sent) == 1 and len(wheel) == 7
    assert all(parse_header(p)[0] == PacketType.RFR for p in [*sent, *(p for p, _ in wheel)])
    whens = [11_000, *(when for _, when in wheel)]
    gaps = [b - a for a, b in itertools.pairwise(whens)]
    # (the rate may have grown a little with the sample: allow up to 2 Gbit/s)
    assert min(gaps) >= 1472 * 8e9 / 2e9, gaps


def _connected_pair(window: int = 2, credits: int = 4
                    ) -> tuple[ClientSession, ServerEndpoint, list[bytes], list[bytes]]:
    to_server: list[bytes] = []
    to_client: list[bytes] = []
    client = ClientSession(lambda d: to_server.append(bytes(d)), lambda *a: None,
                           client_session=7, window=window, credits=credits,
                           max_datagram=28 + 100, rto_ns=RTO, peer_timeout_ns=10**15)
    server = ServerEndpoint(lambda d, a: to_client.append(bytes(d)), lambda *a: None,
                            lambda req, exc: None, max_datagram=28 + 100)
    server.handlers[1] = lambda req: bytes(req.body)[::-1]
    server.receive([(client.connect_packet(1), PEER)], 1)
    client.receive([(p, PEER) for p in to_client], 1)
    to_client.clear()
    assert client.state == "connected"
    return client, server, to_server, to_client


def test_credit_returns_count_up_to_their_packet() -> None:
    """A CR says every request packet up to its ``pkt_num`` arrived: the
    server's ranged CR for packets 1.. returns their credits and, its CR
    for packet 0 lost, that one's too; a CR for a packet the client has not
    sent is dropped (out of order) and returns nothing; a late one is a
    duplicate. The request then completes with the right bytes."""
    client, server, to_server, to_client = _connected_pair(window=1, credits=2)
    got: list[bytes] = []
    body = bytes(range(250)) + bytes(150)               # 4 packets of 100 bytes
    client.submit(1, body, lambda r, e: got.append(bytes(r)), 1)
    slot = client.slots[0]
    assert slot.num_tx == 2 and client.credits == 0
    forged = pack_header(PacketType.CR, 1, client.client_session, slot.req_num, 0, 2)
    client.receive([(forged, PEER)], 2)                 # packet 2 was never sent
    assert client.stats()["out_of_order"] == 1 and slot.num_rx == 0 and client.credits == 0
    server.receive([(p, PEER) for p in to_server], 3)   # packets 0 and 1, one batch
    to_server.clear()
    crs = [parse_header(p) for p in to_client]
    assert [(h[0], h[6], h[5]) for h in crs] == [(PacketType.CR, 0, 0), (PacketType.CR, 1, 1)]
    first, ranged = to_client
    to_client.clear()
    client.receive([(ranged, PEER)], 4)                 # the CR for packet 0 was lost
    assert slot.num_rx == 2 and slot.num_tx == 4        # both credits back: 2 and 3 sent
    client.receive([(first, PEER)], 5)
    assert client.stats()["duplicates"] == 1
    _settle(client, server, to_server, to_client, 6)
    assert got == [body[::-1]] and client.credits == client.credits_total


def test_rollbacks_back_off_while_the_server_is_silent() -> None:
    """A server that answers nothing for a second (stopped, not gone: the
    peer timeout is longer) gets a rollback after 5 ms, then after 10, 20,
    40... ms (each rollback without progress doubles the slot's timeout, up
    to 64 times): 8 in that second, not 200. The packets were only late:
    once they arrive the call completes, and the back-off starts over."""
    client, server, to_server, to_client = _connected_pair()
    got: list[bytes] = []
    client.submit(1, bytes(range(200)), lambda r, e: got.append(bytes(r)), 1)  # 2 packets
    late = list(to_server)                     # what the stopped server will read
    to_server.clear()
    slot = client.slots[0]
    for now in range(1_000_000, 1_000_000_001, 1_000_000):     # ticks every ms for 1 s
        client.tick(now)
    assert client.retransmits == 8 and slot.backoff == 6
    assert client.stats()["rto_us"] == RTO / 1000
    server.receive([(p, PEER) for p in late + to_server], 1_000_000_001)
    client.receive([(p, PEER) for p in to_client], 1_000_000_002)
    to_client.clear()
    server.receive([(p, PEER) for p in to_server], 1_000_000_003)
    client.receive([(p, PEER) for p in to_client], 1_000_000_004)
    assert got == [bytes(range(200))[::-1]] and slot.backoff == 0


def _settle(client: ClientSession, server: ServerEndpoint, to_server: list[bytes],
            to_client: list[bytes], now: int) -> list[bytes]:
    """Deliver both ways until nothing is left to deliver (no loss); every
    packet the client sent meanwhile."""
    sent: list[bytes] = []
    while to_server or to_client:
        now += 10
        batch = list(to_server)
        sent += batch
        to_server.clear()
        server.receive([(p, PEER) for p in batch], now)
        batch = list(to_client)
        to_client.clear()
        client.receive([(p, PEER) for p in batch], now)
    return sent


def test_a_timeout_resends_one_packet_and_a_late_answer_resends_nothing() -> None:
    """A timeout while the server is only slow (its answers are late, not
    lost): the client resends the first unanswered packet alone, not the
    window; the original's answer (its echoed send time is older than the
    resend's) then marks the timeout spurious, and nothing more is resent:
    the call goes on from where it was, and the resend's own answer is a
    duplicate."""
    client, server, to_server, to_client = _connected_pair(window=1, credits=4)
    got: list[bytes] = []
    body = bytes(range(250))                    # 3 request packets, 3 response packets
    client.submit(1, body, lambda r, e: got.append(bytes(r)), 1_000)
    first = list(to_server)
    assert [parse_header(p)[6] for p in first] == [0, 1, 2]
    to_server.clear()
    client.tick(1_000 + RTO)
    assert client.retransmits == 1
    assert [parse_header(p)[6] for p in to_server] == [0]      # one packet, not three
    probe = to_server.pop()
    to_server.extend(first)                     # the originals, late
    sent = _settle(client, server, to_server, to_client, 1_000 + RTO)
    assert got == [body[::-1]]
    assert client.stats()["spurious_timeouts"] == 1
    assert [parse_header(p)[0] for p in sent[3:]] == [PacketType.RFR] * 2  # no REQ again
    to_server.append(probe)                     # the resend, late too
    _settle(client, server, to_server, to_client, 2_000 + RTO)
    assert client.duplicates + client.stale == 1 and got == [body[::-1]]


def test_a_timeout_whose_resend_is_answered_goes_back_n() -> None:
    """The first packet was lost: the resend after the timeout is answered
    (the answer echoes its send time), which shows the loss, and the client
    goes back N: the packets after it are sent again at once, before any
    further timeout."""
    client, server, to_server, to_client = _connected_pair(window=1, credits=4)
    got: list[bytes] = []
    body = bytes(range(250))                    # 3 request packets
    client.submit(1, body, lambda r, e: got.append(bytes(r)), 1_000)
    to_server.clear()                           # all three lost
    client.tick(1_000 + RTO)
    assert len(to_server) == 1
    server.receive([(to_server.pop(), PEER)], 1_000 + RTO + 10)
    assert len(to_client) == 1                  # its credit return
    client.receive([(to_client.pop(), PEER)], 1_000 + RTO + 20)
    assert client.stats()["spurious_timeouts"] == 0
    assert [parse_header(p)[6] for p in to_server] == [1, 2]   # the rest, again
    _settle(client, server, to_server, to_client, 1_000 + RTO + 30)
    assert got == [body[::-1]] and client.retransmits == 1


def test_the_rto_follows_a_slow_rtt_with_5_ms_as_its_floor() -> None:
    """The timeout is the larger of rto_ns and srtt + 4 rttvar (RFC 6298's
    estimator): RTT samples of 10-30 ms (a host that deschedules its
    processes for that long) push it past them; fast samples bring it back
    down to rto_ns, never below."""
    client, _, _, _ = _connected_pair()
    assert client.rto() == RTO
    for i in range(20):
        client.sample_rtt(10_000_000 + (i % 3) * 10_000_000, i)
    assert client.rto() > 30_000_000
    for i in range(200):
        client.sample_rtt(50_000, 100 + i)
    assert client.rto() == RTO


def test_a_client_that_did_not_run_does_not_count_that_time() -> None:
    """A client stopped for 20 ms (its Client sees a tick that late and
    calls ``pause``): the server's silence in that time was not heard, so
    the first check after it rolls nothing back; the same silence while
    the client was running is a timeout."""
    client, _, to_server, _ = _connected_pair()
    client.submit(1, b"q", lambda r, e: None, 1_000_000)
    client.pause(20_000_000)
    client.tick(21_500_000)
    assert client.retransmits == 0
    client.tick(27_000_000)                    # 5 ms of silence heard after it
    assert client.retransmits == 1 and len(to_server) == 2


def test_a_paced_packet_is_built_when_it_leaves() -> None:
    """The pacer holds ``(slot, req_num, i)``, not a packet: ``send_paced``
    builds request packet ``i`` when its time comes, stamped with that
    time (the RTT must not count the wait), and sends nothing once the
    call is over (here: the session failed)."""
    items: list[tuple[object, int]] = []

    def pace(item: object, tag: object, when: int) -> None:
        items.append((item, when))
        tag.queued += 1                       # type: ignore[attr-defined]

    client, _server, to_server, _ = _connected_pair(window=1, credits=4)
    client.out = pace
    cc = Timely(10e9, t_low=50e-6, t_high=1e-3, min_rtt=10e-6, min_rate=1e6)
    cc.rate = 1e9
    client.cc = cc
    to_server.clear()
    body = bytes(range(250))                  # 3 packets of up to 100 bytes
    client.submit(1, body, lambda r, e: None, 1_000)
    assert len(to_server) == 1 and [w for _, w in items] == [1_000 + 1024, 1_000 + 2048]
    to_server.clear()
    client.send_paced(items[0][0], 77_000)
    (pkt,) = to_server
    ptype, _rt, _flags, _sess, _req, size, pkt_num, ts = parse_header(pkt)
    assert (ptype, size, pkt_num, ts) == (PacketType.REQ, 250, 1, 77)
    assert pkt[28:] == body[100:200]
    client.fail(RuntimeError("gone"))
    client.send_paced(items[1][0], 80_000)
    assert len(to_server) == 1
