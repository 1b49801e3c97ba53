"""drpc over ``xdp_udp``: the server's packets (and, in one test, the
client's) go through AF_XDP rings across a veth pair between two network
namespaces (the session's ``veth_net`` fixture, tests/core/vethnet.py): no
kernel UDP socket carries them. Round trips from 0 B to the maximum message
(8 MiB) both ways in MTU-sized (1472-byte) datagrams."""

from __future__ import annotations

import random

import pytest
from core.helpers import TIMEOUT

from evpl.drpc import Client, Server
from evpl.drpc.wire import HEADER_SIZE

ECHO, REVERSE = 1, 2
P = 1472 - HEADER_SIZE
SIZES = [0, 1, 32, P - 1, P, P + 1, 2 * P, 3 * P + 7, 100_000, 1 << 20, 8 << 20]


def xdp_server(loop, net) -> Server:
    with net.inside("a"):
        server = Server(loop, "xdp_udp", (net.ip["a"], 0), interface=net.ifname["a"])
    server.register(ECHO, lambda req: req.body)
    server.register(REVERSE, lambda req: bytes(req.body)[::-1])
    return server


def round_trips(loop, client: Client) -> None:
    rnd = random.Random(15)
    msgs = [rnd.randbytes(n) for n in SIZES]
    calls = [client.call(REVERSE, m) for m in msgs]
    loop.run_until(lambda: all(c.done for c in calls), timeout=TIMEOUT * 12)
    for m, c in zip(msgs, calls, strict=True):
        resp = c.result()
        assert len(resp) == len(m) and bytes(resp) == m[::-1], len(m)
    st = client.stats()
    assert st["completed"] == len(SIZES) + 1 and st["malformed"] == 0 and st["bad_session"] == 0


@pytest.mark.parametrize("client_backend", ["xdp_udp", "udp"])
def test_round_trips_from_empty_to_max_message(loop, veth_net, client_backend) -> None:
    """The server on xdp_udp; the client on xdp_udp too (an unconnected
    Bind: ``local_address=``), or the kernel's UDP stack on the other side."""
    net = veth_net
    server = xdp_server(loop, net)
    with net.inside("b"):
        if client_backend == "xdp_udp":
            client = Client(loop, "xdp_udp", server.address, local_address=(net.ip["b"], 0),
                            interface=net.ifname["b"])
        else:
            client = Client(loop, "udp", server.address)
    try:
        assert client.bind.backend == client_backend and server.bind.backend == "xdp_udp"
        assert bytes(client.wait(client.call(ECHO, b"hi"), TIMEOUT)) == b"hi"
        assert client.stats()["max_datagram"] == 1472
        round_trips(loop, client)
        sst = server.stats()
        assert sst["requests"] == len(SIZES) + 1
        assert sst["credit_returns"] > 0 and sst["rfr"] > 0
        xdp = {k: v for k, v in loop.stats().items() if k.startswith("xdp_")}
        assert xdp, "the xdp_udp backend reported no counters"
    finally:
        client.close()
        server.close()
