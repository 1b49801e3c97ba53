"""evpl.zmtp against pyzmq (libzmq): every compatible socket pair, evpl on
either side, evpl binding or connecting, over tcp and ipc."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import zmq

import evpl.zmtp as ez
from zmtp.zhelpers import POKE, tobytes, until

_n = itertools.count()


class Side:
    """One end of a conversation: an evpl.zmtp socket or a pyzmq socket,
    with the same send/recv used by the scripts below."""

    def __init__(self, loop: Any, zctx: Any, kind: str, stype: str) -> None:
        self.loop = loop
        self.kind = kind
        self.ident = b"router-" + kind.encode()
        if kind == "evpl":
            self.s = ez.Socket(loop, stype)
            if stype == "ROUTER":       # ROUTER to ROUTER: known identities, no silent drops
                self.s.routing_id = self.ident
                self.s.router_mandatory = True
        else:
            self.s = zctx.socket(getattr(zmq, stype))
            self.s.linger = 0
            if stype == "ROUTER":
                self.s.setsockopt(zmq.ROUTING_ID, self.ident)
                self.s.setsockopt(zmq.ROUTER_MANDATORY, 1)
            POKE.append(self.s)

    def bind(self, endpoint: str) -> str:
        if self.kind == "evpl":
            return self.s.bind(endpoint)
        self.s.bind(endpoint)
        return self.s.getsockopt_string(zmq.LAST_ENDPOINT)

    def connect(self, endpoint: str) -> None:
        self.s.connect(endpoint)

    def send(self, frames: list[bytes]) -> None:
        # never block: a libzmq peer may wait for the evpl side to connect
        if not self._try_send(frames):
            until(self.loop, lambda: self._try_send(frames))

    def _try_send(self, frames: list[bytes]) -> bool:
        try:
            self.s.send_multipart(frames, ez.NOBLOCK if self.kind == "evpl" else zmq.NOBLOCK)
        except (ez.Again, zmq.Again, ez.HostUnreachable):
            return False                # not connected yet (a ROUTER's peer): retry
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            return False
        return True

    def recv(self) -> list[bytes]:
        got: list[list[bytes]] = []
        flag = ez.NOBLOCK if self.kind == "evpl" else zmq.NOBLOCK
        again = ez.Again if self.kind == "evpl" else zmq.Again

        def ready() -> bool:
            try:
                got.append(tobytes(self.s.recv_multipart(flag)))
            except again:
                return False
            return True
        until(self.loop, ready)
        return got[0]

    def subscribe(self, topic: bytes) -> None:
        self.s.subscribe(topic)

    def close(self) -> None:
        self.s.close(linger=0) if self.kind == "evpl" else self.s.close()


def converse(a: Side, b: Side, ta: str, tb: str) -> None:
    """The script of one socket pair: ``a`` has type ``ta``, ``b`` ``tb``."""
    big = bytes(range(256)) * 300          # long frames too
    for i in range(3):
        q = [b"q%d" % i, big[: i * 1000]]
        r = [b"r%d" % i, b""]
        if (ta, tb) == ("PUSH", "PULL"):
            a.send(q)
            assert b.recv() == q
        elif (ta, tb) == ("REQ", "REP"):
            a.send(q)
            assert b.recv() == q
            b.send(r)
            assert a.recv() == r
        elif (ta, tb) == ("REQ", "ROUTER"):
            a.send(q)
            got = b.recv()
            assert got[1:] == [b"", *q]
            b.send([got[0], b"", *r])
            assert a.recv() == r
        elif (ta, tb) == ("DEALER", "REP"):
            a.send([b"", *q])
            assert b.recv() == q
            b.send(r)
            assert a.recv() == [b"", *r]
        elif (ta, tb) == ("DEALER", "ROUTER"):
            a.send(q)
            got = b.recv()
            assert got[1:] == q
            b.send([got[0], *r])
            assert a.recv() == r
        elif (ta, tb) == ("ROUTER", "ROUTER"):
            a.send([b.ident, *q])
            assert b.recv() == [a.ident, *q]
            b.send([a.ident, *r])
            assert a.recv() == [b.ident, *r]
        elif (ta, tb) in (("DEALER", "DEALER"), ("PAIR", "PAIR")):
            a.send(q)
            assert b.recv() == q
            b.send(r)
            assert a.recv() == r
        elif (ta, tb) in (("PUB", "SUB"), ("XPUB", "SUB"), ("PUB", "XSUB"), ("XPUB", "XSUB")):
            if i == 0:
                if tb == "SUB":
                    b.subscribe(b"q")
                else:
                    b.send([b"\x01q"])
                if ta == "XPUB":
                    assert a.recv() == [b"\x01q"]
                # the subscription travels while we publish: send until one arrives
                got: list[list[bytes]] = []

                def published(q: list[bytes] = q, got: list[list[bytes]] = got) -> bool:
                    a.send([b"x-filtered", b"no"])
                    a.send(q)
                    try:
                        got.append(tobytes(b.s.recv_multipart(
                            ez.NOBLOCK if b.kind == "evpl" else zmq.NOBLOCK)))
                    except (ez.Again, zmq.Again):
                        return False
                    return True
                until(a.loop, published)
                assert got[0] == q
                continue
            a.send([b"x-filtered", b"no"])
            a.send(q)
            got2 = b.recv()
            while got2 == [b"q0", b""]:     # stragglers of the join loop
                got2 = b.recv()
            assert got2 == q
        else:
            raise AssertionError(f"no script for {ta}/{tb}")


PAIRS = [("PUSH", "PULL"), ("REQ", "REP"), ("REQ", "ROUTER"), ("DEALER", "REP"),
         ("DEALER", "ROUTER"), ("DEALER", "DEALER"), ("ROUTER", "ROUTER"), ("PAIR", "PAIR"),
         ("PUB", "SUB"), ("XPUB", "SUB"), ("PUB", "XSUB"), ("XPUB", "XSUB")]


@pytest.mark.parametrize("transport", ["tcp", "ipc"])
@pytest.mark.parametrize("evpl_binds", [True, False], ids=["evpl-binds", "evpl-connects"])
@pytest.mark.parametrize("evpl_is", ["a", "b"])
@pytest.mark.parametrize("pair", PAIRS, ids=["-".join(p) for p in PAIRS])
def test_pair_with_libzmq(loop, zctx, ipc_dir, pair, evpl_is, evpl_binds, transport):
    ta, tb = pair
    a = Side(loop, zctx, "evpl" if evpl_is == "a" else "zmq", ta)
    b = Side(loop, zctx, "evpl" if evpl_is == "b" else "zmq", tb)
    ev, z = (a, b) if evpl_is == "a" else (b, a)
    binder, connecter = (ev, z) if evpl_binds else (z, ev)
    if transport == "tcp":
        ep = binder.bind("tcp://127.0.0.1:0" if binder.kind == "evpl" else "tcp://127.0.0.1:*")
    else:
        ep = binder.bind(f"ipc://{ipc_dir}/z{next(_n)}.sock")
    connecter.connect(ep)
    try:
        converse(a, b, ta, tb)
    finally:
        a.close()
        b.close()
