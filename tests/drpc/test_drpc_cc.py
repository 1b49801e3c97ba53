"""Timely (sans-I/O): each branch of the rate update, hyperactive increase,
clamping, and eRPC's bypass while uncongested."""

from __future__ import annotations

import pytest

from evpl.drpc.cc import Timely
from evpl.errors import ConfigError

US = 1e-6


def make(**kw) -> Timely:
    kw.setdefault("link_rate", 10e9)
    kw.setdefault("min_rtt", 10 * US)
    return Timely(**kw)


def test_starts_at_link_rate_and_skips_while_uncongested() -> None:
    t = make()
    assert t.uncongested and t.rate == 10e9
    for i in range(100):
        t.sample(20 * US, i * 1e-3)            # below t_low (50 us) at the link rate
    assert t.skipped == 100 and t.updates == 0 and t.rate == 10e9


def test_above_t_high_decreases_multiplicatively() -> None:
    t = make()
    t.sample(2000 * US, 1.0)                  # 2 ms > t_high (1 ms)
    # 1 - beta * (1 - t_high / rtt) = 1 - 0.26 * 0.5
    assert t.rate == pytest.approx(10e9 * (1 - 0.26 * 0.5))
    assert not t.uncongested and t.decreases == 1


def test_below_t_low_increases_additively_once_congested() -> None:
    t = make()
    t.rate = 1e9
    t.last_update = 1.0
    t.sample(20 * US, 1.0 + 1e-3)             # elapsed >> min_rtt: a full step
    assert t.rate == pytest.approx(1e9 + 5e6)
    assert t.increases == 1


def test_positive_gradient_decreases_negative_gradient_increases() -> None:
    t = make()
    t.rate = 5e9
    t.last_update = 1.0
    t.update(100 * US, 1.001)                 # first sample: no gradient yet
    r0 = t.rate
    t.update(200 * US, 1.002)                 # rising RTT inside [t_low, t_high]
    assert t.rate < r0
    r1 = t.rate
    t.update(150 * US, 1.003)                 # falling: the EWMA is still positive
    t.update(100 * US, 1.004)
    before = t.rate
    t.update(60 * US, 1.005)                  # now the smoothed gradient is negative
    assert t.avg_diff < 0
    assert t.rate > before                    # increased at the last sample
    assert r1 < r0 and t.increases >= 1


def test_hyperactive_increase_after_threshold() -> None:
    t = make(hai_threshold=3, hai_factor=5)
    t.rate = 1e9
    t.last_update = 1.0
    rtt = 900 * US
    steps = []
    for i in range(6):
        rtt -= 50 * US                          # steadily falling, above t_low
        before = t.rate
        t.update(rtt, 1.0 + (i + 1) * 1e-3)
        steps.append(t.rate - before)
    # the first sample has no gradient (an additive step); then negative
    # gradients: single steps until the third in a row, five-fold after
    assert steps[0] == pytest.approx(5e6)
    assert steps[1] == pytest.approx(5e6) and steps[2] == pytest.approx(25e6)
    assert all(s == pytest.approx(25e6) for s in steps[3:])


def test_small_elapsed_scales_the_step() -> None:
    t = make()
    t.rate = 1e9
    t.last_update = 1.0
    t.update(20 * US, 1.0 + 5 * US)           # half of min_rtt since the last update
    assert t.rate == pytest.approx(1e9 + 2.5e6)


def test_rate_stays_within_bounds() -> None:
    t = make(min_rate=100e6)
    for i in range(200):
        t.update(50_000 * US, 1.0 + i * 0.06)   # 50 ms RTTs, one an RTT: keep decreasing
    assert t.rate == 100e6
    for i in range(5000):
        t.update(5 * US, 2.0 + i * 1e-3)
    assert t.rate == 10e9 and t.uncongested


def test_bad_parameters() -> None:
    with pytest.raises(ConfigError):
        Timely(1e9, min_rate=2e9)
    with pytest.raises(ConfigError):
        Timely(1e9, t_low=1e-3, t_high=1e-4)
    with pytest.raises(ConfigError):
        Timely(1e9, beta=1.5)


def test_one_update_cuts_at_most_half() -> None:
    """A gradient steep enough to take the rate to the floor in one update
    (a millisecond's jump over a 10 us min_rtt) halves it instead (eRPC's
    rule)."""
    t = make(alpha=0.5)
    t.rate = 8e9
    t.last_update = 1.0
    t.update(60 * US, 1.001)
    before = t.rate
    t.update(900 * US, 1.002)                 # inside [t_low, t_high], gradient ~ 21
    assert t.rate == pytest.approx(before / 2) and t.decreases == 1


def test_samples_sent_before_a_decrease_do_not_decrease_again() -> None:
    """After a decrease, the samples of packets that left before it (their
    RTT reaches back past it) could not see it: they are held, not cut
    again; a packet sent after it can decrease the rate again."""
    t = make()
    t.sample(3000 * US, 1.0)                  # > t_high: a decrease at t = 1.0
    after_one = t.rate
    assert t.decreases == 1
    for i in range(20):                       # the rest of that flight, sent before 1.0
        t.sample(3000 * US, 1.0 + i * 100 * US)
    assert t.rate == after_one and t.held == 20 and t.decreases == 1
    t.sample(3000 * US, 1.0 + 3100 * US)      # sent at 1.0001: after the decrease
    assert t.rate < after_one and t.decreases == 2


def test_a_stall_costs_one_decrease_and_the_rate_comes_back() -> None:
    """The peer stops for 30 ms (a descheduled process): the packets that
    were in flight are answered when it runs again, in a few read batches
    (one sample each), with RTTs of 30 ms and more. With the kernel-socket
    parameters the client uses, that is one decrease, by less than half, at
    the second batch (the first is one late sample, which alone is not a
    queue), where each batch was one before; and the normal samples after it
    bring the rate back to the link rate within 30 updates (0.1 Gbit/s
    each)."""
    from evpl.drpc.client import KERNEL_TIMELY

    t = Timely(10e9, **KERNEL_TIMELY)
    now = 1.0
    for _ in range(50):                       # 300 us RTTs: uncongested, skipped
        now += 1e-3
        t.sample(300 * US, now)
    assert t.uncongested and t.updates == 0
    sent = now
    now += 30e-3
    for _ in range(4):                        # the stalled flight, 200 us a batch
        now += 200 * US
        t.sample(now - sent, now)
    assert t.decreases == 1 and t.held == 2 and t.rate >= 5e9
    n = 0
    while not t.uncongested and n < 100:
        now += 1e-3
        t.sample(300 * US, now)
        n += 1
    assert t.uncongested and n <= 30 and t.decreases == 1


def test_one_late_sample_is_not_a_queue_two_are() -> None:
    """Against t_low and t_high the RTT counts as the smaller of the last
    two samples: one sample far above t_high among normal ones (the peer
    was off the CPU while one read batch waited) moves nothing but the
    gradient's average; two in a row are a queue and cut the rate."""
    t = make()
    t.rate = 5e9
    now = 1.0
    for _ in range(10):
        now += 1e-3
        t.update(20 * US, now)                # below t_low: additive increase
    before, decreases = t.rate, t.decreases
    now += 1e-3
    t.update(5000 * US, now)                  # 5 ms once
    assert t.rate >= before and t.decreases == decreases
    now += 1e-3
    t.update(20 * US, now)
    assert t.decreases == decreases
    now += 10e-3
    t.update(5000 * US, now)
    now += 10e-3
    t.update(5000 * US, now)                  # twice: a decrease
    assert t.decreases == decreases + 1


def test_one_late_sample_among_normal_ones_is_not_a_trend() -> None:
    """A single sample a few milliseconds late (inside [t_low, t_high])
    among normal ones moves the EWMA of the gradient by its weight (0.02):
    the rate drops by a fraction, not to half, and the next normal samples
    turn the gradient negative again."""
    from evpl.drpc.client import KERNEL_TIMELY

    t = Timely(10e9, **KERNEL_TIMELY)
    t.rate = 5e9                              # congested, so every sample updates
    now = 1.0
    for _ in range(20):
        now += 1e-3
        t.update(700 * US, now)
    before = t.rate
    now += 1e-3
    t.update(2500 * US, now)                  # +1.8 ms once
    assert before * 0.5 < t.rate < before
    now += 1e-3
    t.update(700 * US, now)
    assert t.avg_diff < 0
