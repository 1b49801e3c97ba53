"""drpc when the server's host stalls: the server process is stopped
(SIGSTOP) for many retransmission timeouts while calls are in flight, then
continued, as a shared host deschedules a process.

Nothing is lost, only late: every call must complete once with the right
bytes, each handler having run once, and the client must not have resent
its window every ``rto`` through the stall (its timeout backs off), nor
the window at all: each timeout resends one packet, and the late
originals' answers show the timeouts spurious.
"""

from __future__ import annotations

import math
import os
import random
import signal

import pytest
from core.helpers import TIMEOUT
from drpc_server_script import counters, server_process

from evpl.drpc import Client

ECHO = 2                                    # drpc_server_script.py's echo
pytestmark = pytest.mark.timeout(120)


def test_stopped_server_costs_a_few_rollbacks_and_no_call(loop, datagram_backend) -> None:
    with server_process(datagram_backend) as (server, port):
        client = Client(loop, datagram_backend, ("127.0.0.1", port), peer_timeout=60.0)
        assert bytes(client.wait(client.call(ECHO, b"up"), TIMEOUT)) == b"up"
        rnd = random.Random(3)
        # one- and multi-packet requests (and responses): 24 calls, the
        # window's 8 in flight when the server stops
        bodies = [rnd.randbytes(n) for n in (32, 5000, 20000) * 8]
        answers: list[tuple[int, bytes | None, BaseException | None]] = []
        for i, body in enumerate(bodies):
            client.call(ECHO, body, lambda r, e, i=i: answers.append(
                (i, None if r is None else bytes(r), e)))
        os.kill(server.pid, signal.SIGSTOP)
        try:
            # stopped for 60 of the client's own timeouts (at least 0.3 s):
            # many timeouts whatever the host's speed
            stall = max(0.3, 60 * client.session.rto() / 1e9)
            stalled: list[bool] = []
            loop.call_later(stall, lambda: stalled.append(True))
            loop.run_until(lambda: stalled, timeout=stall + TIMEOUT)
            rollbacks = [slot.retransmits for slot in client.session.slots]
        finally:
            os.kill(server.pid, signal.SIGCONT)
        loop.run_until(lambda: len(answers) == len(bodies), timeout=TIMEOUT)
        st = client.stats()
        client.close()
        served = counters(server)
    # every call completed once, with its own bytes; no handler ran twice
    assert sorted(i for i, _, _ in answers) == list(range(len(bodies)))
    assert all(e is None and r == bodies[i] for i, r, e in answers)
    assert served["requests"] == len(bodies) + 1
    # the stall outlasted the timeout (the slots rolled back, and the server
    # saw the repeats), but each slot's timeout doubled per rollback: k
    # rollbacks take at least rto * (2**(k-1) - 1) after the first, with
    # rto >= 5 ms, where a fixed timeout made one every 5 ms (60 or more)
    bound = 1 + math.log2(stall / 0.005 + 1)
    print(f"\nserver stopped {stall * 1e3:.0f} ms: rollbacks per slot {rollbacks} "
          f"(bound {bound:.1f}); spurious {st['spurious_timeouts']}, client duplicates "
          f"{st['duplicates']}, server duplicates "
          f"{served['duplicates']}, resent from the cache {served['retransmitted_responses']}; "
          f"retransmits {st['retransmits']}, stale {st['stale']}")
    assert max(rollbacks) >= 1 and served["duplicates"] > 0
    assert max(rollbacks) <= bound
    # each timeout resent one packet, which is answered once at most: no
    # window came back twice
    assert st["spurious_timeouts"] >= 1
    assert st["duplicates"] + st["stale"] <= st["retransmits"], st
