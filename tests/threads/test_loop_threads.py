"""LoopThread, ThreadPool and Loop.offload with real threads and sockets.

Every wait is on an Event, a Future or a socket: no sleeps, no timing."""

from __future__ import annotations

import concurrent.futures
import gc
import logging
import os
import socket
import struct
import threading

import pytest
from core.helpers import STREAM_BACKENDS, TIMEOUT, backend_info, check_pool

import evpl
from evpl.threads import LoopThread, ThreadPool, WorkerPool

FRAMING = evpl.framing.length_prefix(4, "big")


def _fds() -> dict[str, str]:
    """This process's sockets, eventfds, epoll and pidfds (fd -> what)."""
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            what = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if what.startswith(("socket:", "anon_inode:")):
            out[fd] = what
    return out


@pytest.fixture
def no_leaks():
    """The test leaves no thread and no file descriptor behind."""
    threads = set(threading.enumerate())
    fds = _fds()
    yield
    gc.collect()                # stopped loops close their epoll fd when they are freed
    extra = [t for t in threading.enumerate() if t not in threads and t.is_alive()
             and not t.name.startswith("evpl-worker")]
    assert not extra, f"threads left running: {extra}"
    leaked = {fd: what for fd, what in _fds().items() if fds.get(fd) != what}
    assert not leaked, f"fds left open: {leaked}"


def _address(backend: str, tmp_path) -> object:
    if "local" in backend_info(backend).capabilities:
        return str(tmp_path / f"{backend}.sock")
    return ("127.0.0.1", 0)


def _family(backend: str) -> int:
    return socket.AF_UNIX if "local" in backend_info(backend).capabilities else socket.AF_INET


# ---- LoopThread ---------------------------------------------------------------

def test_start_call_stop(no_leaks):
    lt = LoopThread("evpl-test-lt")
    assert not lt.alive
    lt.start()
    try:
        assert lt.alive
        assert lt.loop.running                  # start() returned once the loop runs
        fut = lt.call(lambda a, b: (threading.get_ident(), a + b), 2, 3)
        assert isinstance(fut, concurrent.futures.Future)
        ident, value = fut.result(TIMEOUT)
        assert value == 5
        assert ident == lt._thread.ident and ident != threading.get_ident()
    finally:
        assert lt.stop(TIMEOUT)
    assert not lt.alive
    with pytest.raises(evpl.EvplError):
        lt.call(int)


def test_call_exception_on_future_and_logged(caplog):
    with LoopThread() as lt:
        def boom():
            raise KeyError("boom")
        with caplog.at_level(logging.ERROR, logger="evpl"):
            fut = lt.call(boom)
            assert isinstance(fut.exception(TIMEOUT), KeyError)
        assert any("raised" in r.getMessage() for r in caplog.records)
        assert lt.alive                         # an ordinary exception does not kill it
        assert lt.call(int, "7").result(TIMEOUT) == 7


def test_dead_thread_is_visible(caplog):
    lt = LoopThread().start()
    with caplog.at_level(logging.ERROR, logger="evpl"):
        fut = lt.call(lambda: (_ for _ in ()).throw(SystemExit(3)))
        assert isinstance(fut.exception(TIMEOUT), SystemExit)
        lt.join(TIMEOUT)
    assert not lt.alive
    assert isinstance(lt.error, SystemExit)
    assert any("died" in r.getMessage() for r in caplog.records)
    with pytest.raises(evpl.EvplError):
        lt.call(int)


def test_calls_queued_at_stop_fail_cleanly(no_leaks):
    lt = LoopThread().start()
    release = threading.Event()
    started = threading.Event()
    lt.call_soon(lambda: (started.set(), release.wait(TIMEOUT)))
    assert started.wait(TIMEOUT)
    lt.loop.stop()                              # the loop stops after this iteration
    later = lt.call(int)                        # queued behind the stop
    release.set()
    lt.join(TIMEOUT)
    # it either ran in the last batch or failed when the queue closed: never lost
    try:
        assert later.result(TIMEOUT) == 0
    except evpl.EvplError:
        pass
    assert later.done()


def test_cpu_pinning(no_leaks):
    cpu = max(os.sched_getaffinity(0))
    with LoopThread(cpu=cpu) as lt:
        assert lt.call(os.sched_getaffinity, 0).result(TIMEOUT) == {cpu}
    with pytest.raises(evpl.ConfigError):
        LoopThread(cpu=10_000)


def test_million_calls_none_lost_or_repeated(no_leaks):
    """1M calls from 4 producer threads: each runs once, each producer's in order."""
    producers, per = 4, 250_000
    seen = [[] for _ in range(producers)]
    done = threading.Event()
    count = [0]

    def record(p, i):
        seen[p].append(i)
        count[0] += 1
        if count[0] == producers * per:
            done.set()

    with LoopThread() as lt:
        def produce(p):
            call = lt.call_soon
            for i in range(per):
                call(record, p, i)
        threads = [threading.Thread(target=produce, args=(p,)) for p in range(producers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert done.wait(TIMEOUT * 6)
        stats = lt.call(lt.loop.stats).result(TIMEOUT)
    for p in range(producers):
        assert seen[p] == list(range(per))
    assert stats["calls"] >= producers * per
    # batched: far fewer wake-ups and batches than calls
    assert stats["call_wakeups"] <= stats["call_batches"] < producers * per


def test_bounded_call_queue(no_leaks):
    with LoopThread(queue_size=8) as lt:
        release, started = threading.Event(), threading.Event()
        lt.call_soon(lambda: (started.set(), release.wait(TIMEOUT)))
        assert started.wait(TIMEOUT)            # the loop is inside that call
        futs = [lt.call(int, str(i)) for i in range(8)]
        with pytest.raises(evpl.Busy):
            lt.call(int)
        release.set()
        assert [f.result(TIMEOUT) for f in futs] == list(range(8))
        assert lt.call(lt.loop.stats).result(TIMEOUT)["calls_refused"] == 1


@pytest.mark.parametrize("options", [{}, {"spin_ns": 50_000}, {"poll_mode": "always"}],
                         ids=["event", "hybrid", "polling"])
@pytest.mark.parametrize("wait_spin_ns", [0, 100_000], ids=["sleep", "spin"])
def test_call_wait(options, wait_spin_ns, no_leaks):
    """call_wait returns the result or raises the exception, from several
    threads at once, none lost, in every loop mode, whether the caller
    spins or sleeps."""
    threads_n, per = 4, 2000
    ran = [[] for _ in range(threads_n)]
    results: list[list[int]] = [[] for _ in range(threads_n)]
    with LoopThread(wait_spin_ns=wait_spin_ns, **options) as lt:
        assert lt.call_wait(lambda a, b: a + b, 2, 3) == 5
        assert lt.call_wait(threading.get_ident) == lt._thread.ident
        with pytest.raises(KeyError, match="boom"):
            lt.call_wait(lambda: {}["boom"])
        assert lt.alive

        def record(p, i):
            ran[p].append(i)
            return i * 2

        def produce(p):
            wait = lt.call_wait
            results[p] = [wait(record, p, i) for i in range(per)]
        threads = [threading.Thread(target=produce, args=(p,)) for p in range(threads_n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # on the loop's own thread it would wait for itself: refused
        def on_the_loop():
            try:
                lt.call_wait(int)
            except evpl.EvplError as exc:
                return str(exc)
        assert "own thread" in lt.call_wait(on_the_loop)
    for p in range(threads_n):
        assert ran[p] == list(range(per))
        assert results[p] == [2 * i for i in range(per)]


def test_call_wait_on_a_closed_queue(no_leaks):
    """A caller waiting in call_wait when the queue closes gets the error."""
    lt = LoopThread().start()
    release, started = threading.Event(), threading.Event()
    lt.call_soon(lambda: (started.set(), release.wait(TIMEOUT)))
    assert started.wait(TIMEOUT)                # the loop is busy in that call
    outcome: list[object] = []

    def waiter():
        try:
            outcome.append(lt.call_wait(int, "1"))
        except BaseException as exc:
            outcome.append(exc)
    t = threading.Thread(target=waiter)
    t.start()
    while lt.pending == 0 and t.is_alive():     # queued behind the busy call
        threading.Event().wait(0.001)
    lt.queue.close(evpl.EvplError("closed under the caller"))
    t.join(TIMEOUT)
    assert not t.is_alive()
    # from close(), or (had close() run between its check and its push) from
    # the caller itself, when it found the queue closed
    assert isinstance(outcome[0], evpl.EvplError) and "closed" in str(outcome[0])
    release.set()
    assert lt.stop(TIMEOUT)
    with pytest.raises(evpl.EvplError):
        lt.call_wait(int)


def test_call_wait_interrupted_by_a_signal(no_leaks):
    """A signal handler that raises interrupts a waiting call_wait; the call,
    still queued, is then dropped (never run), and the loop goes on."""
    import signal

    class Interrupted(Exception):
        pass

    def handler(signum, frame):
        raise Interrupted()
    old = signal.signal(signal.SIGUSR1, handler)
    main = threading.get_ident()
    ran = []
    release, started = threading.Event(), threading.Event()
    try:
        with LoopThread(wait_spin_ns=0) as lt:
            def block():
                started.set()
                while lt.pending == 0:          # until our call_wait is queued
                    threading.Event().wait(0.001)
                signal.pthread_kill(main, signal.SIGUSR1)
                release.wait(TIMEOUT)
            lt.call_soon(block)
            assert started.wait(TIMEOUT)        # the loop is in block, not in a batch with us
            with pytest.raises(Interrupted):
                lt.call_wait(ran.append, 1)
            release.set()
            assert lt.call_wait(len, "abc") == 3
            assert ran == []
    finally:
        signal.signal(signal.SIGUSR1, old)


# ---- ThreadPool -----------------------------------------------------------------

class Echo(evpl.Handler):
    def on_messages(self, bind, msgs):
        bind.send_messages(msgs)


class WhoAmI(evpl.Handler):
    def on_connected(self, bind):
        bind.send(struct.pack("!Q", threading.get_ident()))


def _recv_exact(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        assert chunk, "peer closed"
        data += chunk
    return data


def _echo_round(s: socket.socket, payload: bytes) -> None:
    s.sendall(struct.pack("!I", len(payload)) + payload)
    n = struct.unpack("!I", _recv_exact(s, 4))[0]
    assert _recv_exact(s, n) == payload


@pytest.mark.parametrize("mode", ["auto", "acceptor"])
@pytest.mark.parametrize("backend", STREAM_BACKENDS)
def test_pool_echo_across_loops(backend, mode, tmp_path, no_leaks):
    """Many connections over every stream backend, spread over 2 loops,
    each echoing framed messages of several sizes."""
    with ThreadPool(2) as pool:
        li = pool.listen(backend, _address(backend, tmp_path), Echo, mode=mode,
                         framing=FRAMING)
        socks = []
        for _ in range(24):
            s = socket.socket(_family(backend))
            s.settimeout(TIMEOUT)
            s.connect(li.address)
            socks.append(s)
        for round_ in range(3):
            for i, s in enumerate(socks):
                _echo_round(s, bytes([i]) * (1 + round_ * 7000 + i))
        for s in socks:
            s.close()
        per_loop = li.accepted
        assert sum(per_loop) == 24
        assert all(n > 0 for n in per_loop), per_loop     # both loops served connections
    for lt in pool.threads:                                 # stopped: loops closed
        check_pool(lt.loop.pool)


class Flood(evpl.Handler):
    """Sends TOTAL bytes as fast as the send queue allows, pausing on
    on_paused and going on at on_writable; then finishes."""
    TOTAL = 16 << 20
    CHUNK = bytes(64 << 10)
    paused = threading.Event()

    def on_connected(self, bind):
        self.sent = 0
        self.pauses = 0
        self.push(bind)

    def push(self, bind):
        while self.sent < self.TOTAL and not bind.paused:
            bind.send(self.CHUNK)
            self.sent += len(self.CHUNK)
        if self.sent >= self.TOTAL:
            bind.finish()

    def on_paused(self, bind):
        self.pauses += 1
        Flood.paused.set()

    def on_writable(self, bind):
        self.push(bind)


@pytest.mark.parametrize("backend", STREAM_BACKENDS)
def test_pool_backpressure(backend, tmp_path, no_leaks):
    """A client that does not read: the loop's send queue pauses the handler
    (on_paused); once the client reads, every byte arrives, in full."""
    Flood.paused = threading.Event()
    with ThreadPool(2) as pool:
        li = pool.listen(backend, _address(backend, tmp_path), Flood, mode="acceptor",
                         high_water=256 << 10)
        s = socket.socket(_family(backend))
        s.settimeout(TIMEOUT)
        s.connect(li.address)
        assert Flood.paused.wait(TIMEOUT)   # nothing read yet: the queue filled up
        got = 0
        while True:
            data = s.recv(1 << 20)
            if not data:
                break
            got += len(data)
        s.close()
        assert got == Flood.TOTAL
    for lt in pool.threads:
        check_pool(lt.loop.pool)


def test_reuseport_spreads_over_loops(no_leaks):
    with ThreadPool(2) as pool:
        li = pool.listen("tcp", ("127.0.0.1", 0), WhoAmI, mode="reuseport")
        idents = []
        socks = []
        for _ in range(64):
            s = socket.create_connection(li.address, timeout=TIMEOUT)
            socks.append(s)
            idents.append(struct.unpack("!Q", _recv_exact(s, 8))[0])
        loop_idents = {lt._thread.ident for lt in pool.threads}
        assert set(idents) <= loop_idents
        counts = [idents.count(i) for i in loop_idents]
        # the kernel hashes connections over the group: all 64 on one socket
        # has probability 2**-63
        assert all(c > 0 for c in counts), counts
        assert li.accepted == [idents.count(lt._thread.ident) for lt in pool.threads]
        assert [lt.connections for lt in pool.threads] == li.accepted
        for s in socks:
            s.close()


def test_acceptor_hands_to_least_loaded(tmp_path, no_leaks):
    """Connections held open: the acceptor alternates, exactly."""
    with ThreadPool(2) as pool:
        li = pool.listen("unix", str(tmp_path / "a.sock"), WhoAmI)
        assert li.mode == "acceptor"
        socks, idents = [], []
        for _ in range(10):
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(TIMEOUT)
            s.connect(li.address)
            socks.append(s)
            idents.append(struct.unpack("!Q", _recv_exact(s, 8))[0])
        assert li.accepted == [5, 5]
        assert len(set(idents)) == 2
        for s in socks:
            s.close()
    with ThreadPool(1) as pool, pytest.raises(evpl.ConfigError):
        pool.listen("unix", str(tmp_path / "b.sock"), WhoAmI, mode="reuseport")


def test_submit_runs_on_a_pool_loop(no_leaks):
    with ThreadPool(2) as pool:
        idents = {lt._thread.ident for lt in pool.threads}
        results = [pool.submit(threading.get_ident).result(TIMEOUT) for _ in range(10)]
        assert set(results) <= idents
        assert pool.call_all(lambda: 1) == [1, 1]


# ---- offload --------------------------------------------------------------------

def test_offload_result_on_loop_thread(no_leaks):
    with LoopThread() as lt, WorkerPool(2, max_queued=4) as workers:
        seen = {}
        got = concurrent.futures.Future()

        def start():
            fut = lt.loop.offload(lambda x: (threading.get_ident(), x * 2), 21, workers=workers)
            fut.add_done_callback(lambda f: (seen.update(cb=threading.get_ident()),
                                             got.set_result(f.result())))

        lt.call_soon(start)
        worker_ident, value = got.result(TIMEOUT)
        assert value == 42
        assert seen["cb"] == lt._thread.ident       # delivered on the loop's thread
        assert worker_ident != lt._thread.ident


def test_offload_worker_raises(no_leaks):
    with LoopThread() as lt, WorkerPool(1) as workers:
        def bad():
            raise ZeroDivisionError("no")
        fut = lt.call(lambda: lt.loop.offload(bad, workers=workers)).result(TIMEOUT)
        assert isinstance(fut.exception(TIMEOUT), ZeroDivisionError)


def test_offload_full_raises_busy(no_leaks):
    with LoopThread() as lt, WorkerPool(1, max_queued=2) as workers:
        release, started = threading.Event(), threading.Event()

        def block():
            started.set()
            release.wait(TIMEOUT)
            return "first"

        def fill():
            futs = [lt.loop.offload(block, workers=workers)]
            started.wait(TIMEOUT)               # the worker took it: the queue is empty
            futs += [lt.loop.offload(str, i, workers=workers) for i in range(2)]
            with pytest.raises(evpl.Busy):
                lt.loop.offload(str, 99, workers=workers)
            return futs

        futs = lt.call(fill).result(TIMEOUT)
        release.set()
        assert [f.result(TIMEOUT) for f in futs] == ["first", "0", "1"]


def test_close_cancels_the_jobs_not_started(no_leaks):
    """``close(cancel=True)``: queued jobs never run, their Futures are
    cancelled; the running one finishes."""
    with LoopThread() as lt:
        workers = WorkerPool(1, max_queued=4)
        release, started = threading.Event(), threading.Event()
        ran = []

        def block():
            started.set()
            release.wait(TIMEOUT)
            return "first"

        def fill():
            first = lt.loop.offload(block, workers=workers)
            assert started.wait(TIMEOUT)
            rest = [lt.loop.offload(ran.append, i, workers=workers) for i in range(3)]
            workers.close(wait=False, cancel=True)
            return first, rest

        first, rest = lt.call(fill).result(TIMEOUT)
        assert all(f.cancelled() for f in rest)
        release.set()
        assert first.result(TIMEOUT) == "first"
        for t in workers._threads:
            t.join(TIMEOUT)
        assert ran == []


def test_offload_full_pauses_the_bind(no_leaks):
    """on_full='pause': the 4th request pauses reading; when room comes back
    the Bind resumes and every request is answered, in order."""
    release, started, fourth = threading.Event(), threading.Event(), threading.Event()
    workers = WorkerPool(1, max_queued=2)
    state = {}

    def work(data):
        if data == b"0":
            started.set()
            release.wait(TIMEOUT)
        return b"r" + data

    class Offloading(evpl.Handler):
        def on_message(self, bind, msg):
            data = bytes(msg)
            fut = bind_loop().offload(work, data, workers=workers, on_full="pause", bind=bind)
            fut.add_done_callback(lambda f: bind.send(f.result()))
            if data == b"3":
                state["reading_after_4th"] = bind.reading
                fourth.set()

    with ThreadPool(1) as pool:
        def bind_loop():
            return pool.threads[0].loop
        li = pool.listen("tcp", ("127.0.0.1", 0), Offloading, framing=FRAMING)
        s = socket.create_connection(li.address, timeout=TIMEOUT)
        s.sendall(b"".join(struct.pack("!I", 1) + str(i).encode() for i in range(1)))
        assert started.wait(TIMEOUT)            # job 0 holds the only worker
        s.sendall(b"".join(struct.pack("!I", 1) + str(i).encode() for i in range(1, 4)))
        assert fourth.wait(TIMEOUT)
        assert state["reading_after_4th"] is False      # paused for lack of room
        release.set()
        replies = []
        for _ in range(4):
            n = struct.unpack("!I", _recv_exact(s, 4))[0]
            replies.append(_recv_exact(s, n))
        assert replies == [b"r0", b"r1", b"r2", b"r3"]
        # reading resumed: one more round trip works
        _echo_like = b"4"
        s.sendall(struct.pack("!I", 1) + _echo_like)
        n = struct.unpack("!I", _recv_exact(s, 4))[0]
        assert _recv_exact(s, n) == b"r4"
        s.close()
    workers.close()
