"""The engine's pacing wheel: packets leave in slot order, never before their
time, beyond the horizon they are clamped (and counted), and the tags'
``queued`` counts follow them."""

from __future__ import annotations

import pytest
from core.helpers import TIMEOUT

from evpl._native.wheel import TimingWheel


class Tag:
    def __init__(self) -> None:
        self.queued = 0


def test_packets_leave_in_time_order_and_not_early(loop) -> None:
    wheel = TimingWheel(loop, slot_ns=10_000, nslots=1024)
    sent: list[tuple[int, int]] = []         # (when it was due, when it left)
    tag = Tag()
    now = loop.now_ns()
    dues = [now + d * 1000 for d in (900, 50, 3000, 400, 50, 1200)]
    for i, due in enumerate(dues):
        wheel.insert(due, lambda d, due=due: sent.append((due, loop.now_ns(), d)), i, tag)
    assert tag.queued == len(dues) and wheel.queued == len(dues)
    loop.run_until(lambda: len(sent) == len(dues), timeout=TIMEOUT)
    assert [s[0] for s in sent] == sorted(dues)            # by slot; ties keep order
    assert [s[2] for s in sent][:2] == [1, 4]
    # never before the start of the packet's slot (at most one slot early)
    assert all(left >= due - 10_000 for due, left, _ in sent)
    assert tag.queued == 0 and wheel.queued == 0
    assert wheel.stats()["sent"] == len(dues)


def test_beyond_the_horizon_is_clamped(loop) -> None:
    wheel = TimingWheel(loop, slot_ns=1000, nslots=16)      # a 16 us horizon
    tag = Tag()
    sent: list[int] = []
    wheel.insert(loop.now_ns() + 10_000_000, sent.append, 1, tag)
    assert wheel.stats()["clamped"] == 1
    loop.run_until(lambda: sent, timeout=TIMEOUT)
    assert sent == [1] and tag.queued == 0


def test_failed_send_is_counted_and_clear_drops(loop) -> None:
    wheel = TimingWheel(loop)
    tag = Tag()

    def refuse(data: object) -> None:
        raise RuntimeError("closed")

    wheel.insert(0, refuse, b"x", tag)
    loop.run_until(lambda: wheel.queued == 0, timeout=TIMEOUT)
    assert wheel.stats()["failed"] == 1 and tag.queued == 0
    wheel.insert(loop.now_ns() + 10**9, refuse, b"y", tag)
    assert tag.queued == 1
    wheel.clear()
    assert tag.queued == 0 and wheel.queued == 0


def test_bad_parameters(loop) -> None:
    with pytest.raises(ValueError):
        TimingWheel(loop, slot_ns=0)
    with pytest.raises(ValueError):
        TimingWheel(loop, nslots=1)
