"""Timely congestion control (Mittal et al., SIGCOMM 2015), as eRPC runs it.

Sans-I/O: :meth:`Timely.update` takes an RTT sample and the time, and moves
the session's sending rate; the caller paces its packets at :attr:`Timely.rate`.

The rate follows the RTT's *gradient*, smoothed by an EWMA and normalised by
the minimum RTT:

* RTT below ``t_low``: additive increase (the network is not queueing);
* RTT above ``t_high``: multiplicative decrease in proportion to how far
  above ``t_high`` it is;
* in between, a negative gradient (queues draining) increases additively,
  by ``hai_factor`` steps once it has been negative ``hai_threshold`` times
  in a row (hyperactive increase), and a positive gradient decreases the
  rate multiplicatively, in proportion to the gradient.

Every change is scaled by the time since the previous update over the
minimum RTT (at most 1), so the rate moves at the same speed whatever the
number of samples, and kept within ``[min_rate, link_rate]``.

Three rules keep a delay spike from sinking the rate (a host that
deschedules a process for milliseconds makes every packet in flight look
late at once, with no queue anywhere):

* the RTT compared with ``t_low`` and ``t_high`` is the smaller of the last
  two samples: a queue builds and drains over several samples, a peer off
  the CPU makes one sample late, so one late sample alone changes nothing
  (the gradient still takes it, weighted by ``alpha``);
* one update cuts the rate to half at most (eRPC's rule; the gradient
  branch alone could take it to the floor on a single sample, since a
  millisecond's jump over a 50 µs ``min_rtt`` is a gradient of 20);
* a sample decreases the rate only if its packet left after the last
  decrease: the packets sent before it could not see it, so their delays
  say nothing new (at most one decrease per RTT, as a window-based sender
  halves once per window). Such samples are counted as ``held``.

eRPC's common-case optimisation: a session at the link rate whose RTT is
below ``t_low`` is uncongested, so :meth:`Timely.sample` skips the update
and the caller skips pacing (:attr:`Timely.uncongested`).
"""

from __future__ import annotations

from evpl.errors import ConfigError

__all__ = ["Timely"]


class Timely:
    """One session's Timely state. Rates in bits per second, times in seconds.

    Defaults are eRPC's (``t_low`` 50 µs, ``t_high`` 1 ms, EWMA weight
    0.02, 5 Mbit/s additive step, hyperactive increase after 5 negative
    gradients) with a gentler ``beta`` (0.26; eRPC's is 0.8) and
    ``min_rtt`` and ``link_rate`` left to the user (kernel UDP sockets have
    a larger floor RTT than a DPDK NIC). The EWMA weight of 0.02 (also what
    Timely's authors recommend) averages the gradient over some fifty
    samples: with a weight near one half, one late sample among normal ones
    was a gradient steep enough to halve the rate.
    """

    __slots__ = (
        "add_rate",
        "alpha",
        "avg_diff",
        "beta",
        "decreases",
        "hai_factor",
        "hai_threshold",
        "held",
        "increases",
        "last_decrease",
        "last_update",
        "link_rate",
        "min_rate",
        "min_rtt",
        "neg_count",
        "prev_rtt",
        "rate",
        "skipped",
        "t_high",
        "t_low",
        "updates",
    )

    def __init__(self, link_rate: float = 10e9, *, t_low: float = 50e-6, t_high: float = 1e-3,
                 min_rtt: float = 10e-6, alpha: float = 0.02, beta: float = 0.26,
                 add_rate: float = 5e6, hai_threshold: int = 5, hai_factor: int = 5,
                 min_rate: float = 15e6) -> None:
        if not 0 < min_rate <= link_rate:
            raise ConfigError(f"need 0 < min_rate ({min_rate}) <= link_rate ({link_rate})")
        if not 0 <= t_low < t_high:
            raise ConfigError(f"need 0 <= t_low ({t_low}) < t_high ({t_high})")
        if min_rtt <= 0 or not 0 < alpha <= 1 or not 0 < beta < 1 or add_rate <= 0:
            raise ConfigError("need min_rtt > 0, 0 < alpha <= 1, 0 < beta < 1, add_rate > 0")
        if hai_threshold < 1 or hai_factor < 1:
            raise ConfigError("need hai_threshold >= 1 and hai_factor >= 1")
        self.link_rate = float(link_rate)
        self.min_rate = float(min_rate)
        self.t_low = t_low
        self.t_high = t_high
        self.min_rtt = min_rtt
        self.alpha = alpha
        self.beta = beta
        self.add_rate = add_rate
        self.hai_threshold = hai_threshold
        self.hai_factor = hai_factor
        self.rate = self.link_rate
        self.prev_rtt = 0.0
        self.avg_diff = 0.0
        self.neg_count = 0
        self.last_update = 0.0
        self.updates = 0
        self.skipped = 0
        self.increases = 0
        self.decreases = 0
        self.held = 0
        self.last_decrease = 0.0

    @property
    def uncongested(self) -> bool:
        """At the link rate: the sender need not pace."""
        return self.rate >= self.link_rate

    def sample(self, rtt: float, now: float) -> None:
        """An RTT sample: skipped while uncongested (at the link rate and
        below ``t_low``), else :meth:`update`."""
        if rtt < self.t_low and self.rate >= self.link_rate:
            self.skipped += 1
            self.prev_rtt = rtt
            return
        self.update(rtt, now)

    def update(self, rtt: float, now: float) -> float:
        """Move the rate for one RTT sample taken at ``now`` (of a packet
        sent at ``now - rtt``); returns it."""
        self.updates += 1
        prev = self.prev_rtt or rtt
        self.prev_rtt = rtt
        self.avg_diff = (1 - self.alpha) * self.avg_diff + self.alpha * (rtt - prev)
        gradient = self.avg_diff / self.min_rtt
        elapsed = now - self.last_update if self.last_update else self.min_rtt
        self.last_update = now
        scale = min(max(elapsed, 0.0) / self.min_rtt, 1.0)
        # the RTT's level, against the thresholds: the smaller of the last
        # two samples, so that one late sample alone (a descheduled peer)
        # is not read as a queue, which cannot vanish between two samples
        level = rtt if rtt < prev else prev
        rate = self.rate
        if level < self.t_low:
            self.neg_count = 0
            rate += self.add_rate * scale
        elif level <= self.t_high and gradient <= 0:
            self.neg_count += 1
            steps = self.hai_factor if self.neg_count >= self.hai_threshold else 1
            rate += steps * self.add_rate * scale
        else:
            self.neg_count = 0
            if now - rtt < self.last_decrease:
                self.held += 1              # sent before the last decrease took effect
                return rate
            if level > self.t_high:
                rate *= 1 - self.beta * (1 - self.t_high / level) * scale
            else:
                rate *= 1 - self.beta * gradient * scale
            rate = max(rate, 0.5 * self.rate)
            self.last_decrease = now
        rate = min(max(rate, self.min_rate), self.link_rate)
        if rate > self.rate:
            self.increases += 1
        elif rate < self.rate:
            self.decreases += 1
        self.rate = rate
        return rate

    def stats(self) -> dict[str, float]:
        """Rate, last RTT and update counters (``held``: decreases not
        made, the sample's packet having left before the last one)."""
        return {"rate": self.rate, "rtt": self.prev_rtt, "updates": self.updates,
                "skipped": self.skipped, "increases": self.increases,
                "decreases": self.decreases, "held": self.held}
