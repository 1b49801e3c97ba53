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
