"""The two protocol cores against each other, sans-I/O, with a virtual clock:
hypothesis picks which packets are lost, duplicated or delivered late, and
every call must still complete once with the right answer, each handler
having run exactly once. (The real-socket versions are in
test_drpc_rpc.py and test_drpc_faults.py; this one explores orders and
losses no network produces on demand.)"""

from __future__ import annotations

import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from evpl.drpc.session import ClientSession, ServerEndpoint

PEER = ("10.0.0.1", 1)
RTO = 5_000_000


def exchange(seed: int, loss: float, dup: float, late: float, sizes: list[int],
             window: int, credits: int) -> tuple[dict[int, bytes], Counter[int], ClientSession]:
    rnd = random.Random(seed)
    wire: list[tuple[str, bytes]] = []        # packets in the network, in order
    held: list[tuple[str, bytes]] = []        # delivered after the next round
    runs: Counter[int] = Counter()

    def to_server(data: object) -> None:
        wire.append(("s", bytes(data)))       # type: ignore[arg-type]

    def paced(data: object, tag: object, when: int) -> None:
        to_server(data)                       # no pacing here: cc is off

    def to_client(data: object, addr: object) -> None:
        wire.append(("c", bytes(data)))       # type: ignore[arg-type]

    def dispatch(sess, slot, req_type, req_num, body) -> None:
        key = int.from_bytes(bytes(body[:4]), "big")
        runs[key] += 1
        server.respond(sess, slot, req_num, bytes(body)[::-1])

    client = ClientSession(to_server, paced, client_session=7, window=window, credits=credits,
                           max_datagram=28 + 100, rto_ns=RTO, peer_timeout_ns=10**15)
    server = ServerEndpoint(to_client, dispatch, lambda req, exc: None, max_datagram=28 + 100)
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
        for dest, pkt in batch:
            r = rnd.random()
            if r < loss:
                continue
            if r < loss + late:
                held.append((dest, pkt))
                continue
            copies = 2 if rnd.random() < dup else 1
            for _ in range(copies):
                if dest == "s":
                    server.receive([(pkt, PEER)], now)
                else:
                    client.receive([(pkt, PEER)], now)
        client.tick(now)
    return got, runs, client


@settings(max_examples=150)
@given(seed=st.integers(0, 2**32), loss=st.sampled_from([0.0, 0.1, 0.3]),
       dup=st.sampled_from([0.0, 0.2]), late=st.sampled_from([0.0, 0.2]),
       sizes=st.lists(st.integers(0, 600), min_size=1, max_size=12),
       window=st.integers(1, 4), credits=st.integers(1, 6))
def test_every_call_completes_once_whatever_the_network_does(seed, loss, dup, late, sizes,
                                                             window, credits) -> None:
    got, runs, client = exchange(seed, loss, dup, late, sizes, window, credits)
    assert sorted(got) == list(range(len(sizes)))
    for i, resp in got.items():
        assert resp[-4:] == i.to_bytes(4, "big")[::-1] and len(resp) == sizes[i] + 4
    assert all(runs[i] == 1 for i in range(len(sizes))), runs
    st_ = client.stats()
    assert st_["max_inflight"] <= credits and st_["max_outstanding"] <= window
    assert client.credits == client.credits_total        # every credit came back
