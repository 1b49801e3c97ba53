"""The Loop: timers, deferrals, doorbells, fd watches, run modes, errors, config."""

from __future__ import annotations

import os
import random
import statistics
import threading
import time

import pytest

import evpl

from .helpers import TIMEOUT, Ticker

# ---------------------------------------------------------------- timers


def test_timers_fire_in_deadline_order_never_early(loop):
    fired = []
    timers = []
    delays = random.sample(range(0, 40_000, 500), 60)       # µs, in random order
    for d in delays:
        earliest = loop.now_ns() + d * 1000
        i = len(timers)
        timers.append((d, earliest, loop.call_later(
            d / 1e6, lambda i=i: fired.append((i, loop.now_ns())))))
    loop.run_until(lambda: len(fired) == len(delays), timeout=TIMEOUT)
    # the order is the deadlines' order (as scheduled: a slow machine may take
    # longer than 500 µs between two call_later calls, so compare deadlines)
    deadlines = [timers[i][2].deadline_ns for i, _ in fired]
    assert deadlines == sorted(deadlines)
    assert sorted(i for i, _ in fired) == list(range(len(delays)))
    for i, now in fired:
        d, earliest, timer = timers[i]
        assert timer.deadline_ns >= earliest
        assert now >= timer.deadline_ns, f"timer of {d} µs fired {timer.deadline_ns - now} ns early"
        assert not timer.active


def test_many_timers_with_cancellations_and_periodic_ones(loop):
    """The timer heap under load: thousands of timers, most cancelled (the
    heap is compacted), periodic ones among them; the rest fire once each,
    in deadline order, and a cancelled one never fires."""
    rng = random.Random(11)
    fired: list[int] = []
    timers = [loop.call_later(rng.randint(0, 20_000) / 1e6, fired.append, i)
              for i in range(5000)]
    cancelled = set(rng.sample(range(5000), 3500))
    for i in cancelled:
        timers[i].cancel()
    ticks: list[int] = []
    periodic = loop.call_every(0.001, lambda: ticks.append(1))
    loop.run_until(lambda: len(fired) == 1500 and len(ticks) >= 5, timeout=TIMEOUT)
    periodic.cancel()
    assert sorted(fired) == sorted(set(range(5000)) - cancelled)
    deadlines = [timers[i].deadline_ns for i in fired]
    assert deadlines == sorted(deadlines)
    assert not any(t.active for t in timers)
    # the loop stays usable: a new timer after the churn fires
    late = loop.call_later(0, fired.append, -1)
    loop.run_until(lambda: not late.active, timeout=TIMEOUT)
    assert fired[-1] == -1


def test_a_dropped_loop_with_pending_timers_is_collected():
    """Timers sit in a C heap the garbage collector is shown (a Timer and
    its callback refer back to the loop): a Loop dropped without close(),
    timers pending, is freed."""
    import gc
    import weakref

    loop = evpl.Loop()
    loop.call_later(10, loop.stop)
    loop.call_every(1, lambda: None)
    kept = loop.call_later(10, print)
    ref = weakref.ref(loop)
    del loop, kept                           # the heap's Timers keep it in a cycle
    gc.collect()
    assert ref() is None


def test_timer_cancel(loop):
    fired = []
    t1 = loop.call_later(0.001, fired.append, 1)
    t2 = loop.call_later(0.002, fired.append, 2)
    t3 = loop.call_later(0.003, fired.append, 3)
    assert t2.active
    t2.cancel()
    t2.cancel()                                  # idempotent
    assert not t2.active
    loop.run_until(lambda: 3 in fired, timeout=TIMEOUT)
    assert fired == [1, 3]
    assert not t1.active and not t3.active       # one-shot timers are done
    # a timer cancelled from inside another timer's callback does not fire
    later = loop.call_later(0.002, fired.append, "late")
    loop.call_later(0.001, later.cancel)
    done = loop.call_later(0.004, fired.append, "done")
    loop.run_until(lambda: not done.active, timeout=TIMEOUT)
    assert fired == [1, 3, "done"]


def test_call_every(loop):
    period = 0.002
    times = []
    start = loop.now_ns()

    def tick():
        times.append(loop.now_ns())
        if len(times) == 10:
            timer.cancel()

    timer = loop.call_every(period, tick)
    loop.run_until(lambda: not timer.active, timeout=TIMEOUT)
    # nothing after cancel: run a little longer with another timer
    end = loop.call_later(3 * period, lambda: None)
    loop.run_until(lambda: not end.active, timeout=TIMEOUT)
    assert len(times) == 10
    for k, t in enumerate(times, 1):
        assert t >= start + k * int(period * 1e9), f"tick {k} early"
    with pytest.raises(ValueError):
        loop.call_every(0, tick)


def test_timer_precision_while_sleeping(make_loop):
    """A 2 ms timer in a sleeping loop: the loop sleeps once for it (no
    spin, and no wake-up before the deadline that would go round again: the
    sleep has nanosecond resolution), and the timer never fires early. How
    late it fires is the host's business (steal time on a VM is invisible
    to the thread), so no bound on it here."""
    loop = make_loop(poll_mode="event")
    early = []
    rounds = []
    for _ in range(7):
        before = loop.stats()
        deadline = loop.now_ns() + 2_000_000
        t = loop.call_later(2e-3, lambda dl=deadline: early.append(loop.now_ns() < dl))
        loop.run_until(lambda t=t: not t.active, timeout=TIMEOUT)
        after = loop.stats()
        rounds.append((after["sleeps"] - before["sleeps"],
                       after["iterations"] - before["iterations"]))
    assert early == [False] * 7
    # medians: a round in which the thread lost the CPU for 2 ms before
    # run_until finds its timer already due and needs no sleep
    assert statistics.median(sleeps for sleeps, _ in rounds) >= 1, rounds
    assert statistics.median(iters for _, iters in rounds) == 1, rounds


@pytest.mark.parametrize("mode", ["event", "hybrid", "always"])
def test_polls_counts_spin_rounds(make_loop, mode):
    """``stats()["polls"]`` counts the spin's rounds: a loop that spins
    until its 5 ms timer (hybrid with a spin window longer than that, or
    always) polls many times; one in event mode never does."""
    loop = make_loop(poll_mode=mode, spin_ns=10_000_000_000)
    t = loop.call_later(5e-3, lambda: None)
    loop.run_until(lambda: not t.active, timeout=TIMEOUT)
    polls = loop.stats()["polls"]
    if mode == "event":
        assert polls == 0
    else:
        assert polls > 1


def test_a_send_starts_the_spin_window_again(make_loop):
    """Hybrid mode polls while traffic flows, and sending is traffic: after
    an iteration that sent, the loop spins (a peer that was just asked
    answers within the window) instead of going to sleep, even when it has
    received nothing for longer than ``spin_ns``."""
    import socket

    loop = make_loop(poll_mode="hybrid", spin_ns=200_000_000)
    peer = socket.create_server(("127.0.0.1", 0))
    try:
        bind = loop.connect("tcp", peer.getsockname(), evpl.Handler())
        conn, _ = peer.accept()
        loop.run_until(lambda: bind.connected, timeout=TIMEOUT)
        loop.run_once(0.25)                 # idle for longer than spin_ns
        polls = loop.stats()["polls"]
        loop.run_once(0.001)
        assert loop.stats()["polls"] == polls       # idle: it sleeps, no spin
        spun = False
        for _ in range(5):
            # the window is 200 ms from the send: a host that stalls this
            # thread for longer between two lines tries again (an idle loop
            # never spins, however often it is tried: it received nothing)
            bind.send(b"request")
            loop.run_once(0)                # the iteration's end sends it
            assert conn.recv(64) == b"request"
            polls = loop.stats()["polls"]
            loop.run_once(0.001)
            if loop.stats()["polls"] > polls:       # it spun for the answer
                spun = True
                break
        assert spun
        conn.close()
    finally:
        peer.close()


def test_timer_args_and_errors(loop):
    got = []
    loop.call_later(0, lambda *a: got.append(a), 1, "two")
    loop.call_later(0, lambda: 1 / 0)
    loop.call_later(0.001, got.append, "after")
    loop.run_until(lambda: "after" in got, timeout=TIMEOUT)
    assert got == [(1, "two"), "after"]
    assert len(loop.callback_errors) == 1
    exc, bind = loop.callback_errors[0]
    assert isinstance(exc, ZeroDivisionError) and bind is None
    loop.callback_errors.clear()
    with pytest.raises(TypeError):
        loop.call_later(0, "not callable")


# ---------------------------------------------------------------- deferrals


def test_timers_at_the_same_time_fire_together(loop):
    """call_at takes an absolute time on the monotonic clock: timers given
    the same one fire in the same iteration, in the order they were made
    (asyncio's nested timeouts rely on it); call_later measures from each
    call's own now."""
    when = time.monotonic() + 0.005
    fired: list[tuple[int, int]] = []
    for k in range(5):
        loop.call_at(when, lambda k=k: fired.append((k, loop.stats()["iterations"])))
    loop.run_until(lambda: len(fired) == 5, timeout=TIMEOUT)
    assert [k for k, _ in fired] == [0, 1, 2, 3, 4]
    assert len({it for _, it in fired}) == 1
    assert time.monotonic() >= when


def test_defer_runs_at_end_of_iteration(loop):
    order = []

    def a():
        order.append("a")
        loop.defer(order.append, "deferred")

    loop.call_later(0, a)
    loop.call_later(0, order.append, "b")
    loop.run_until(lambda: "deferred" in order, timeout=TIMEOUT)
    assert order == ["a", "b", "deferred"]


def test_sends_of_a_deferred_chain_leave_together(loop, tmp_path):
    """Deferred work that defers more (pipelined requests answered one
    after the other) runs round after round in one iteration, and what the
    rounds queued is sent once they settle: each round sees the bytes of
    the rounds before still queued. A longer chain is cut after a bounded
    number of rounds, so I/O is polled again."""
    path = str(tmp_path / "chain.sock")
    loop.listen("unix", path, lambda: evpl.Handler())
    bind = loop.connect("unix", path, evpl.Handler())
    loop.run_until(lambda: bind.connected, timeout=TIMEOUT)
    seen: list[tuple[int, int]] = []

    def step(k: int) -> None:
        seen.append((loop.stats()["iterations"], bind.queued_bytes))
        bind.send(b"x")
        if k < 40:
            loop.defer(step, k + 1)

    loop.defer(step, 1)
    loop.run_until(lambda: len(seen) == 40, timeout=TIMEOUT)
    first = seen[0][0]
    in_first = [q for it, q in seen if it == first]
    assert 1 < len(in_first) < 40            # bounded, not the whole chain
    assert in_first == list(range(len(in_first)))   # nothing sent between rounds


def test_defer_from_outside_callbacks(loop):
    ran = []
    loop.defer(ran.append, 1)
    loop.defer(ran.append, 2)
    assert ran == []
    loop.run_once(0)
    assert ran == [1, 2]


def test_deferral_arm_is_idempotent(loop):
    calls = []
    d = evpl.Deferral(loop, lambda: calls.append(loop.stats()["iterations"]))
    d.arm()
    d.arm()
    assert d.armed
    loop.run_once(0)
    assert len(calls) == 1
    assert not d.armed
    d.arm()
    d.arm()
    loop.run_once(0)
    assert len(calls) == 2
    assert calls[0] != calls[1]

    # armed from a callback, several times in one iteration: once
    def many():
        for _ in range(5):
            d.arm()

    loop.call_later(0, many)
    loop.call_later(0, many)
    loop.run_until(lambda: len(calls) >= 3, timeout=TIMEOUT)
    loop.run_once(0)
    assert len(calls) == 3


# ---------------------------------------------------------------- doorbells


def test_doorbells_from_threads(loop):
    threads, rings_each = 8, 2000
    lock = threading.Lock()
    rung = 0
    calls = 0
    last_seen = 0

    def on_ring():
        nonlocal calls, last_seen
        calls += 1
        with lock:
            last_seen = rung

    bell = loop.doorbell(on_ring)
    start = threading.Barrier(threads)

    def ringer():
        nonlocal rung
        start.wait()
        for _ in range(rings_each):
            with lock:
                rung += 1
            bell.ring()

    workers = [threading.Thread(target=ringer) for _ in range(threads)]
    for w in workers:
        w.start()
    total = threads * rings_each
    loop.run_until(lambda: last_seen == total, timeout=TIMEOUT)
    for w in workers:
        w.join(TIMEOUT)
    assert 1 <= calls <= total
    assert last_seen == total
    bell.close()
    bell.ring()                          # ringing a closed doorbell is a no-op
    loop.run_once(0)
    assert last_seen == total


def test_doorbell_rung_on_loop_thread(loop):
    calls = []
    bell = loop.doorbell(lambda: calls.append(1))
    bell.ring()
    bell.ring()
    loop.run_until(lambda: calls, timeout=TIMEOUT)
    loop.run_once(0)
    assert calls == [1]


def test_stop_from_another_thread(loop):
    started = threading.Event()
    watchdog_fired = []
    loop.call_later(0, started.set)
    watchdog = loop.call_later(TIMEOUT, lambda: (watchdog_fired.append(1), loop.stop()))

    def stopper():
        started.wait(TIMEOUT)
        loop.stop()

    t = threading.Thread(target=stopper)
    t.start()
    loop.run()
    t.join(TIMEOUT)
    watchdog.cancel()
    assert started.is_set()
    assert not watchdog_fired
    assert not loop.running


def test_stop_from_callback_and_rerun(loop):
    n = []
    loop.call_later(0, lambda: (n.append(1), loop.stop()))
    loop.run()
    assert n == [1]
    loop.call_later(0, lambda: (n.append(2), loop.stop()))
    loop.run()                           # a stopped loop can run again
    assert n == [1, 2]


def test_nested_run_is_refused(loop):
    errors = []

    def nested():
        try:
            loop.run_once(0)
        except evpl.EvplError as exc:
            errors.append(exc)

    loop.call_later(0, nested)
    loop.run_until(lambda: errors, timeout=TIMEOUT)
    assert isinstance(errors[0], evpl.EvplError)


# ---------------------------------------------------------------- fd watches


def test_watch_fd_pipe(loop):
    r, w = os.pipe()
    try:
        got = bytearray()
        readable = []

        def on_readable():
            readable.append(1)
            got.extend(os.read(r, 100))

        watch = loop.watch_fd(r, on_readable=on_readable)
        assert watch.fileno() == r
        os.write(w, b"hello")
        loop.run_until(lambda: got == b"hello", timeout=TIMEOUT)
        # level triggered: unread data keeps reporting
        watch.modify(on_readable=lambda: readable.append(2))
        os.write(w, b"!")
        loop.run_until(lambda: readable.count(2) >= 3, timeout=TIMEOUT)
        assert os.read(r, 100) == b"!"

        writable = []
        wwatch = loop.watch_fd(w, on_writable=lambda: writable.append(1))
        loop.run_until(lambda: writable, timeout=TIMEOUT)
        wwatch.cancel()

        watch.cancel()
        watch.cancel()                   # idempotent
        with pytest.raises(evpl.EvplError):
            watch.modify(on_readable=on_readable)
        n_read, n_write = len(readable), len(writable)
        os.write(w, b"ignored")
        ticker = Ticker(loop)
        loop.run_until(lambda: ticker.count >= 5, timeout=TIMEOUT)
        ticker.cancel()
        assert len(readable) == n_read and len(writable) == n_write
        assert os.read(r, 100) == b"ignored"   # the fd is still ours and open
    finally:
        os.close(r)
        os.close(w)


def test_watch_fd_bad_fd(loop):
    with pytest.raises(OSError):
        loop.watch_fd(987654, on_readable=lambda: None)


# ---------------------------------------------------------------- run modes


def test_run_until_timeout(loop):
    t0 = time.monotonic()
    with pytest.raises(evpl.TimeoutError) as info:
        loop.run_until(lambda: False, timeout=0.05)
    assert time.monotonic() - t0 >= 0.05
    assert isinstance(info.value, TimeoutError)          # the builtin, too
    assert isinstance(info.value, evpl.EvplError)
    assert not loop.running


def test_run_until_true_immediately(loop):
    loop.run_until(lambda: True, timeout=0)


def test_now(loop):
    a, b = loop.now_ns(), loop.now()
    assert isinstance(a, int) and isinstance(b, float)
    assert abs(b - a / 1e9) < 1.0
    assert loop.now_ns() >= a


@pytest.mark.parametrize("mode", ["event", "hybrid"])
def test_idle_cpu(make_loop, mode):
    """An idle loop sleeps: well under 2% of a core over half a second."""
    loop = make_loop(poll_mode=mode)
    assert loop.poll_mode == mode
    done = []
    loop.call_later(0.5, done.append, 1)
    wall0, cpu0 = time.monotonic(), time.thread_time()
    loop.run_until(lambda: done, timeout=TIMEOUT)
    wall, cpu = time.monotonic() - wall0, time.thread_time() - cpu0
    stats = loop.stats()
    assert wall >= 0.5
    # one sleep until the timer: a few iterations, however fast the machine
    assert stats["sleeps"] >= 1 and stats["iterations"] <= 3, stats
    assert cpu < 0.02 * wall, f"{cpu * 1000:.1f} ms CPU over {wall * 1000:.0f} ms idle"


@pytest.mark.parametrize("mode", ["always", "hybrid", "event"])
def test_poll_modes_deliver(make_loop, stream_backend, address, mode):
    loop = make_loop(poll_mode=mode, spin_ns=1_000_000)
    assert loop.poll_mode == mode

    class Echo(evpl.Handler):
        def on_data(self, bind, buf):
            bind.send(buf)

    class Client(evpl.Handler):
        def __init__(self):
            self.data = bytearray()

        def on_data(self, bind, buf):
            self.data += buf

    listener = loop.listen(stream_backend, address(stream_backend), Echo)
    client = Client()
    bind = loop.connect(stream_backend, listener.address, client)
    for i in range(200):                       # ping-pong
        msg = b"ping %d;" % i
        bind.send(msg)
        want = len(client.data) + len(msg)
        loop.run_until(lambda w=want: len(client.data) >= w, timeout=TIMEOUT)
    assert client.data == b"".join(b"ping %d;" % i for i in range(200))
    fired = []
    loop.call_later(0.001, fired.append, 1)
    loop.run_until(lambda: fired, timeout=TIMEOUT)


# ---------------------------------------------------------------- callback errors


def test_callback_exception_closes_bind(loop, stream_backend, address):
    class Bad(evpl.Handler):
        def __init__(self):
            self.closed = []

        def on_data(self, bind, buf):
            raise RuntimeError("boom")

        def on_closed(self, bind, error):
            self.closed.append(error)

    bad = Bad()
    listener = loop.listen(stream_backend, address(stream_backend), lambda: bad)

    class Client(evpl.Handler):
        def __init__(self):
            self.closed = []

        def on_closed(self, bind, error):
            self.closed.append(error)

    client = Client()
    bind = loop.connect(stream_backend, listener.address, client)
    bind.send(b"trigger")
    loop.run_until(lambda: bad.closed and client.closed, timeout=TIMEOUT)
    assert len(loop.callback_errors) == 1
    exc, where = loop.callback_errors[0]
    assert isinstance(exc, RuntimeError) and str(exc) == "boom"
    assert isinstance(where, evpl.Bind) and where.closed
    assert len(bad.closed) == 1 and isinstance(bad.closed[0], evpl.EvplError)
    assert loop.stats()["callback_errors"] == 1
    loop.callback_errors.clear()
    # the loop itself goes on
    ran = []
    loop.call_later(0, ran.append, 1)
    loop.run_until(lambda: ran, timeout=TIMEOUT)


def test_exception_in_on_closed_is_reported(loop, stream_backend, address):
    class Bad(evpl.Handler):
        def on_closed(self, bind, error):
            raise KeyError("closed")

    listener = loop.listen(stream_backend, address(stream_backend), evpl.Handler)
    bind = loop.connect(stream_backend, listener.address, Bad())
    bind.close()
    loop.run_until(lambda: loop.callback_errors, timeout=TIMEOUT)
    assert isinstance(loop.callback_errors[0][0], KeyError)
    loop.callback_errors.clear()


def test_handler_factory_must_return_handler(loop, stream_backend, address):
    with pytest.raises(evpl.ConfigError):
        loop.connect(stream_backend, address(stream_backend), lambda: object())
    with pytest.raises(evpl.ConfigError):
        loop.listen(stream_backend, address(stream_backend), 42)


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize("kwargs", [
    {"poll_mode": "x"},
    {"spin_ns": -1},
    {"spin_ns": 1.5},
], ids=repr)
def test_bad_loop_config(kwargs):
    with pytest.raises(evpl.ConfigError):
        evpl.Loop(**kwargs)


def test_config_error_is_value_error():
    assert issubclass(evpl.ConfigError, ValueError)
    assert issubclass(evpl.ConfigError, evpl.EvplError)


@pytest.mark.parametrize("options", [
    {"bogus": 1},
    {"low_water": 2 << 20, "high_water": 1 << 20},
    {"high_water": 1 << 20, "hard_limit": 1000},
    {"high_water": -1},
    {"hard_limit": "big"},
    {"low_water": 1.5},
    {"max_datagram": 0},
    {"max_datagram": 70000},
], ids=repr)
def test_bad_bind_options(loop, stream_backend, datagram_backend, address, options):
    with pytest.raises(evpl.ConfigError):
        loop.listen(stream_backend, address(stream_backend), evpl.Handler, **options)
    with pytest.raises(evpl.ConfigError):
        loop.connect(stream_backend, address(stream_backend), evpl.Handler(), **options)
    with pytest.raises(evpl.ConfigError):
        loop.bind(datagram_backend, address(datagram_backend), evpl.Handler(), **options)
    assert loop.stats()["sources"] == 0        # nothing was left half-made


def test_non_int_high_water_is_config_error(loop, stream_backend, address):
    with pytest.raises(evpl.ConfigError):
        loop.listen(stream_backend, address(stream_backend), evpl.Handler, high_water="big")


@pytest.mark.parametrize("make", [
    lambda: evpl.framing.length_prefix(3),
    lambda: evpl.framing.length_prefix(0),
    lambda: evpl.framing.length_prefix(4, "middle"),
    lambda: evpl.framing.length_prefix(4, max_message=0),
    lambda: evpl.framing.length_prefix(4, max_message=-5),
    lambda: evpl.framing.length_prefix(4, max_message=1.5),
    lambda: evpl.framing.record_marking(max_message=0),
    lambda: evpl.framing.callable("not callable"),
    lambda: evpl.framing.callable(lambda p: 0, max_message=0),
], ids=range(9))
def test_bad_framing_args(make):
    with pytest.raises(evpl.ConfigError):
        make()


def test_framing_must_be_a_framer(loop, stream_backend, address):
    with pytest.raises(evpl.ConfigError):
        loop.listen(stream_backend, address(stream_backend), evpl.Handler,
                    framing=lambda p: 0)


def test_unknown_and_wrong_kind_backends(loop, stream_backend, datagram_backend, address):
    with pytest.raises(evpl.ConfigError):
        loop.listen("no-such-backend", ("127.0.0.1", 0), evpl.Handler)
    with pytest.raises(evpl.ConfigError):
        loop.connect("no-such-backend", ("127.0.0.1", 1), evpl.Handler())
    with pytest.raises(evpl.ConfigError):
        loop.listen(datagram_backend, address(datagram_backend), evpl.Handler)
    with pytest.raises(evpl.ConfigError):
        loop.bind(stream_backend, address(stream_backend), evpl.Handler())


def test_bad_addresses(loop, stream_backend, address):
    good = address(stream_backend)
    bad = ("127.0.0.1", 0) if isinstance(good, str) else "/some/path"
    with pytest.raises(evpl.ConfigError):
        loop.listen(stream_backend, bad, evpl.Handler)
    if isinstance(good, tuple):
        with pytest.raises(evpl.ConfigError):
            loop.listen(stream_backend, ("127.0.0.1", 70000), evpl.Handler)
        with pytest.raises(evpl.ConfigError):
            loop.listen(stream_backend, ("no.such.host.invalid", 0), evpl.Handler)


def test_listen_on_busy_address(loop, stream_backend, address):
    listener = loop.listen(stream_backend, address(stream_backend), evpl.Handler)
    with pytest.raises(evpl.TransportError):
        loop.listen(stream_backend, listener.address, evpl.Handler)


def test_listen_replaces_only_a_stale_unix_socket(make_loop, tmp_path):
    """A socket file whose server is gone is reused; anything else is not."""
    path = str(tmp_path / "s.sock")
    first = make_loop()
    first.listen("unix", path, evpl.Handler)
    first.close()                              # leaves the file behind
    second = make_loop()
    second.listen("unix", path, evpl.Handler)  # stale: replaced
    regular = tmp_path / "plain-file"
    regular.write_bytes(b"keep me")
    with pytest.raises(evpl.TransportError):
        second.listen("unix", str(regular), evpl.Handler)
    assert regular.read_bytes() == b"keep me"


def test_backends_registry():
    infos = evpl.backends()
    names = [b.name for b in infos]
    assert len(names) == len(set(names))
    for b in infos:
        assert b.kind in ("stream", "datagram")
        assert b.available or b.reason
    assert evpl.select(stream=True) in names
    with pytest.raises(evpl.BackendUnavailable):
        evpl.select(stream=True, require={"no-such-capability"})


@pytest.mark.parametrize("mode", ["event", "hybrid"])
def test_keep_polling_spins_past_spin_ns(make_loop, mode):
    """``keep_polling(ns)``: a protocol that expects its peer within ``ns``
    keeps a hybrid loop polling that long, however short ``spin_ns`` is
    (here 1 µs: without it the loop would sleep until its timer); an event
    loop still sleeps."""
    loop = make_loop(poll_mode=mode, spin_ns=1_000)
    loop.run_once(0.002)                    # idle for longer than spin_ns
    before = loop.stats()
    loop.keep_polling(60_000_000_000)       # a minute: far past the 5 ms timer
    t = loop.call_later(5e-3, lambda: None)
    loop.run_until(lambda: not t.active, timeout=TIMEOUT)
    after = loop.stats()
    if mode == "event":
        assert after["sleeps"] > before["sleeps"]
        assert after["polls"] == before["polls"]
    else:
        assert after["sleeps"] == before["sleeps"]
        assert after["polls"] > before["polls"]


def test_keep_polling_in_the_past_changes_nothing(make_loop):
    """A deadline already past (0 or negative ns) leaves a hybrid loop as it
    was: idle, it sleeps."""
    loop = make_loop(poll_mode="hybrid", spin_ns=1_000)
    loop.run_once(0.002)
    loop.keep_polling(0)
    loop.keep_polling(-1_000_000)
    before = loop.stats()
    loop.run_once(0.002)
    after = loop.stats()
    assert after["sleeps"] == before["sleeps"] + 1
    assert after["polls"] == before["polls"]
