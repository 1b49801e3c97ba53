"""evpl.shards with real processes, shared memory rings and sockets.

Shards report what they saw through files (their exit status alone says
little); every wait is on a process, a pipe or a socket, never a sleep."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile

import pytest
from core.helpers import TIMEOUT

import evpl
from evpl import shards


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _report(path, shard, **data) -> None:
    with open(os.path.join(path, f"shard{shard.id}.json"), "w") as f:
        json.dump(data, f)


def _read(path, i) -> dict:
    with open(os.path.join(path, f"shard{i}.json")) as f:
        return json.load(f)


def _finish(shard, path, **data) -> None:
    """Close the shard's loop, check its pool is empty, report, stop."""
    shard.loop.close()
    stats = shard.loop.pool.stats()
    _report(path, shard, buffers_in_use=stats["buffers_in_use"],
            heap_in_use=stats["heap_in_use"], **data)
    shard.stop()


@pytest.mark.parametrize("n", [2, 4])
def test_messages_every_direction(n, tmp_path):
    """Each shard sends N requests and N one-way messages to every other
    through small rings (so rings fill up and requests wait): none lost,
    duplicated or reordered per pair, every reply matches its request."""
    N = 3000
    path = str(tmp_path)

    def main(shard):
        others = [k for k in range(shard.count) if k != shard.id]
        next_req = dict.fromkeys(others, 0)
        next_msg = dict.fromkeys(others, 0)
        errors = []

        def on_request(src, payload):
            s, seq = struct.unpack("!II", payload[:8])
            if s != src or seq != next_req[src]:
                errors.append(f"request {s}:{seq} from {src}, expected {next_req[src]}")
            next_req[src] = seq + 1
            return b"re:" + payload

        def on_message(src, payload):
            s, seq = struct.unpack("!II", payload[:8])
            if s != src or seq != next_msg[src]:
                errors.append(f"message {s}:{seq} from {src}, expected {next_msg[src]}")
            next_msg[src] = seq + 1

        shard.on_request = on_request
        shard.on_message = on_message
        futures = []
        for k in others:
            for seq in range(N):
                payload = struct.pack("!II", shard.id, seq) + bytes(56)
                futures.append((payload, shard.submit_to(k, payload)))
        sent = dict.fromkeys(others, 0)

        def pump():
            for k in others:
                while sent[k] < N:
                    try:
                        shard.send_to(k, struct.pack("!II", shard.id, sent[k]) + bytes(56))
                    except evpl.Busy:
                        break
                    sent[k] += 1
            if any(v < N for v in sent.values()):
                shard.loop.call_later(0, pump)

        pump()

        def done():
            return (all(f.done() for _, f in futures)
                    and all(next_req[k] == N and next_msg[k] == N and sent[k] == N
                            for k in others)
                    and not any(shard._backlog))

        shard.loop.run_until(done, timeout=TIMEOUT * 3)
        bad = [p.hex() for p, f in futures if f.result() != b"re:" + p]
        stats = shard.loop.stats()
        _finish(shard, path, errors=errors, bad=bad, replies=len(futures),
                requests=sum(next_req.values()), messages=sum(next_msg.values()),
                full=stats["shard_ring_full"])

    statuses = shards.run(main, n, ring_bytes=16384)
    assert statuses == [0] * n
    full = 0
    for i in range(n):
        r = _read(path, i)
        assert r["errors"] == [] and r["bad"] == []
        assert r["replies"] == r["requests"] == r["messages"] == N * (n - 1)
        assert r["buffers_in_use"] == 0 and r["heap_in_use"] == 0
        full += r["full"]
    assert full > 0                 # the rings did fill up: backpressure was exercised


def test_ring_full(tmp_path):
    """A receiver that does not run: send_to raises Busy once its ring is
    full, submit_to waits instead (up to max_backlog, then Busy); when the
    receiver runs, everything arrives, in order."""
    path = str(tmp_path)
    gate_r, gate_w = os.pipe()

    def main(shard):
        if shard.id == 1:
            os.close(gate_w)
            os.read(gate_r, 1)          # shard 0 says: start consuming now
            got = []
            shard.on_message = lambda src, p: got.append(("m", bytes(p)))
            shard.on_request = lambda src, p: got.append(("r", bytes(p))) or p
            shard.loop.run_until(lambda: len(got) == expected(), timeout=TIMEOUT)
            _finish(shard, path, got=[f"{k}{p.decode()}" for k, p in got])
            return
        os.close(gate_r)
        sent = 0
        try:
            while True:
                shard.send_to(1, str(sent).encode())
                sent += 1
        except evpl.Busy:
            pass
        futures = [shard.submit_to(1, f"q{i}".encode()) for i in range(4)]
        try:
            shard.submit_to(1, b"too many")
            over = False
        except evpl.Busy:
            over = True
        with open(os.path.join(path, "sent"), "w") as f:
            f.write(str(sent))
        os.write(gate_w, b"x")
        shard.loop.run_until(lambda: all(f.done() for f in futures), timeout=TIMEOUT)
        _finish(shard, path, sent=sent, over=over,
                replies=[f.result().decode() for f in futures])

    def expected():
        with open(os.path.join(path, "sent")) as f:
            return int(f.read()) + 4

    statuses = shards.run(main, 2, ring_bytes=4096, max_backlog=4)
    os.close(gate_r)
    os.close(gate_w)
    assert statuses == [0, 0]
    r0, r1 = _read(path, 0), _read(path, 1)
    assert r0["sent"] > 0 and r0["over"] is True
    assert r0["replies"] == ["q0", "q1", "q2", "q3"]
    assert r1["got"] == [f"m{i}" for i in range(r0["sent"])] + [f"rq{i}" for i in range(4)]


def test_shard_killed_mid_traffic(tmp_path):
    """Shard 1 dies by SIGKILL while shard 0 has requests in flight to it:
    they fail with ShardError, run() returns, no process is left."""
    path = str(tmp_path)

    def main(shard):
        if shard.id == 1:
            count = [0]

            def on_request(src, payload):
                count[0] += 1
                if count[0] == 100:
                    os.kill(os.getpid(), signal.SIGKILL)
                return payload
            shard.on_request = on_request
            return
        futures = [shard.submit_to(1, b"x" * 64) for _ in range(1000)]
        shard.loop.run_until(lambda: all(f.done() for f in futures), timeout=TIMEOUT * 3)
        failed = [f for f in futures if f.exception() is not None]
        kinds = sorted({type(f.exception()).__name__ for f in failed})
        _finish(shard, path, ok=len(futures) - len(failed), failed=len(failed), kinds=kinds,
                alive=shard.alive(1))

    group = shards.start(main, 2, ring_bytes=8192)
    pids = list(group.pids)
    statuses = group.wait(TIMEOUT * 6)
    assert statuses == [0, -signal.SIGKILL]
    assert group.failed == [(1, -signal.SIGKILL)]
    assert all(_gone(p) for p in pids)
    r = _read(path, 0)
    assert r["kinds"] == ["ShardError"]
    assert r["failed"] > 0 and r["ok"] >= 99 and r["ok"] + r["failed"] == 1000
    assert r["alive"] is False


def test_batched_messages(tmp_path):
    """send_many and on_messages: the batch API carries every message once,
    in order, through a ring much smaller than the traffic."""
    path = str(tmp_path)
    N = 50_000

    def main(shard):
        if shard.id == 1:
            got = []
            shard.on_messages = lambda src, batch: got.extend(batch)
            shard.loop.run_until(lambda: len(got) == N, timeout=TIMEOUT * 3)
            ok = got == [b"%d" % i for i in range(N)]
            _finish(shard, path, ok=ok)
            return
        payloads = [b"%d" % i for i in range(N)]
        sent = 0
        while sent < N:
            n = shard.send_many(1, payloads[sent:sent + 1000])
            sent += n
            if n == 0:
                shard.loop.run_once(0)
        _finish(shard, path, sent=sent)

    assert shards.run(main, 2, ring_bytes=8192) == [0, 0]
    assert _read(path, 1)["ok"] is True and _read(path, 0)["sent"] == N


def test_await_replies_in_coroutines(tmp_path):
    """A shard's coroutines (evpl.aio attached to its loop) await
    submit_to's futures: replies in order, a failing handler's error
    raised at the await, and a cancelled await does not break the rest."""
    path = str(tmp_path)

    def main(shard):
        if shard.id == 1:
            done = []

            def on_request(src, payload):
                if bytes(payload) == b"boom":
                    raise ValueError("no")
                return bytes(payload).upper()

            shard.on_request = on_request
            shard.on_message = lambda src, payload: done.append(1)
            shard.loop.run_until(lambda: done, timeout=TIMEOUT * 3)
            _finish(shard, path)
            return
        import asyncio

        import evpl.aio

        aloop = evpl.aio.attach(shard.loop)

        async def client():
            replies = [await shard.submit_to(1, b"r%d" % i) for i in range(200)]
            try:
                await shard.submit_to(1, b"boom")
                error = None
            except evpl.EvplError as exc:
                error = type(exc).__name__
            slow = asyncio.ensure_future(_await(shard.submit_to(1, b"late")))
            slow.cancel()
            cancelled = False
            try:
                await slow
            except asyncio.CancelledError:
                cancelled = True
            after = await shard.submit_to(1, b"after")
            return replies, error, cancelled, after

        task = aloop.create_task(client())
        shard.loop.run_until(task.done, timeout=TIMEOUT * 3)
        replies, error, cancelled, after = task.result()
        shard.send_to(1, b"done")
        shard.loop.run_until(lambda: not any(shard._backlog), timeout=TIMEOUT)
        aloop.close()
        _finish(shard, path, ok=replies == [b"R%d" % i for i in range(200)],
                error=error, cancelled=cancelled, after=after.decode())

    assert shards.run(main, 2) == [0, 0]
    r = _read(path, 0)
    assert r["ok"] is True and r["cancelled"] is True and r["after"] == "AFTER"
    assert r["error"] == "ShardError", r["error"]


def test_request_and_reply_forms(tmp_path):
    """Every form a request and its reply can take goes through the native
    path or the Shard's fallback and arrives intact: bytes, bytearray and
    memoryview payloads, None (empty), bytes-like and Future replies (from
    loop.offload), pickled objects both ways, a handler that raises, a reply
    of the wrong type, a shard without handlers; one-way messages of every
    buffer type; and a batch sent outside a loop iteration, larger than the
    early-publish size, in order."""
    path = str(tmp_path)
    BIG = 5000          # records of 72 bytes: several early publishes

    def main(shard):
        if shard.id == 1:
            got = []
            offloaded = []
            from evpl.threads import WorkerPool
            workers = WorkerPool(1)

            def on_request(src, payload):
                kind = bytes(payload[:4]) if isinstance(payload, (bytes, bytearray)) else None
                if payload == {"obj": [1, 2]}:
                    return {"echo": payload}
                if kind == b"none":
                    return None
                if kind == b"barr":
                    return bytearray(payload[4:])
                if kind == b"view":
                    return memoryview(bytes(payload[4:]))
                if kind == b"futr":
                    offloaded.append(shard.loop.offload(bytes.upper, bytes(payload[4:]),
                                                        workers=workers))
                    return offloaded[-1]
                if kind == b"fail":
                    raise KeyError("nope")
                if kind == b"type":
                    return 42
                return bytes(payload)

            shard.on_request = on_request
            shard.on_message = lambda src, payload: got.append(bytes(payload))
            # (and until the offloaded reply went out: the worker may finish
            # after the last message arrived)
            shard.loop.run_until(lambda: len(got) >= BIG + 3 and offloaded
                                 and offloaded[0].done(), timeout=TIMEOUT * 3)
            workers.close()
            _finish(shard, path, got=[g.hex() for g in got[:3]],
                    order=got[3:] == [b"%08d" % i + bytes(64) for i in range(BIG)])
            return
        if shard.id == 2:
            return          # no handlers: requests to it fail, messages are reported
        fut = {
            "bytes": shard.submit_to(1, b"plain"),
            "bytearray_in": shard.submit_to(1, bytearray(b"array")),
            "memoryview_in": shard.submit_to(1, memoryview(b"xxmview-in")[2:]),
            "none": shard.submit_to(1, b"none"),
            "barr": shard.submit_to(1, b"barrBA"),
            "view": shard.submit_to(1, b"viewMV"),
            "futr": shard.submit_to(1, b"futrlower"),
            "fail": shard.submit_to(1, b"fail"),
            "type": shard.submit_to(1, b"type"),
            "pickled": shard.submit_to(1, {"obj": [1, 2]}, pickle=True),
            "no_handler": shard.submit_to(2, b"anyone?"),
        }
        shard.send_to(1, b"m1")
        shard.send_to(1, bytearray(b"m2"))
        shard.send_to(1, memoryview(b"m3"))
        for i in range(BIG):            # outside a loop iteration: published early
            while True:
                try:
                    shard.send_to(1, b"%08d" % i + bytes(64))
                    break
                except evpl.Busy:
                    shard.loop.run_once(0)
        shard.loop.run_until(lambda: all(f.done() for f in fut.values()), timeout=TIMEOUT * 3)
        out = {}
        for name, f in fut.items():
            exc = f.exception()
            out[name] = (f"{type(exc).__name__}: {exc}" if exc is not None
                         else f.result() if name == "pickled" else bytes(f.result()).decode())
        _finish(shard, path, out=out, pending=shard.pending)
        shard.stop_group()

    assert shards.run(main, 3, ring_bytes=65536) == [0, 0, 0]
    r0, r1 = _read(path, 0), _read(path, 1)
    out = r0["out"]
    assert out["bytes"] == "plain" and out["bytearray_in"] == "array"
    assert out["memoryview_in"] == "mview-in" and out["none"] == ""
    assert out["barr"] == "BA" and out["view"] == "MV" and out["futr"] == "LOWER"
    assert out["pickled"] == {"echo": {"obj": [1, 2]}}
    assert out["fail"].startswith("ShardError") and "KeyError" in out["fail"]
    assert out["type"].startswith("ShardError") and "bad reply int" in out["type"]
    assert out["no_handler"].startswith("ShardError") and "no on_request" in out["no_handler"]
    assert r0["pending"] == 0
    assert r1["got"] == [b"m1".hex(), b"m2".hex(), b"m3".hex()] and r1["order"] is True
    assert r0["buffers_in_use"] == r1["buffers_in_use"] == 0


async def _await(fut):
    return await fut


def test_stop_group():
    """One shard ends the whole group; the others exit cleanly."""
    def main(shard):
        if shard.id == 2:
            shard.loop.call_later(0, shard.stop_group)

    assert shards.run(main, 3) == [0, 0, 0]


def test_at_stop_runs_after_the_loop_stopped_and_may_run_it_again(tmp_path):
    """Shard.at_stop: once a shard's loop stopped (stop_group here), its
    callbacks run in order, may run the loop again (a graceful drain: a
    timer set before the stop fires), and one that raises does not keep
    the next from running or the shard from exiting 0."""
    path = str(tmp_path)

    def main(shard):
        done = []

        def drain():
            shard.loop.call_later(0.01, lambda: done.append("timer"))
            shard.loop.run_until(lambda: done, timeout=TIMEOUT)

        def fail():
            raise RuntimeError("an at_stop callback that fails")

        shard.at_stop(drain)
        shard.at_stop(fail)
        shard.at_stop(lambda: _report(path, shard, done=done))
        if shard.id == 1:
            shard.loop.call_later(0, shard.stop_group)

    assert shards.run(main, 2) == [0, 0]
    assert _read(path, 0)["done"] == ["timer"] and _read(path, 1)["done"] == ["timer"]


@pytest.mark.parametrize("grace", [0, -1, "10", True])
def test_bad_grace_is_refused(grace):
    with pytest.raises(evpl.ConfigError):
        shards.run(lambda shard: None, 1, grace=grace)


def test_main_raises_stops_the_others(tmp_path):
    def main(shard):
        if shard.id == 1:
            raise ValueError("shard 1 cannot start")

    statuses = shards.run(main, 2)
    assert statuses == [0, 1]


def test_restart(tmp_path):
    """restart=True: a shard that fails is started again (its generation
    grows) and the group keeps running until stopped."""
    path = str(tmp_path)
    marker = os.path.join(path, "crashed")

    def main(shard):
        if shard.id == 1 and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(7)
        if shard.id == 1:
            # the restarted shard reaches shard 0, which took it back
            fut = shard.submit_to(0, b"ping")
            shard.loop.run_until(fut.done, timeout=TIMEOUT)
            _report(path, shard, restarted=True, reply=fut.result().decode())
        else:
            shard.on_request = lambda src, p: b"pong"

    group = shards.start(main, 2, restart=True, max_restarts=2)
    # the restarted shard reports once its main ran
    while not os.path.exists(os.path.join(path, "shard1.json")):
        group.wait(0.05)            # reaps/restarts while waiting (no process sleeps on us)
    group.stop()
    assert group.wait(TIMEOUT) == [0, 0]
    assert group.failed == [(1, 7)] and group.restarts == [0, 1]
    assert _read(path, 1) == {"restarted": True, "reply": "pong"}


class WhoAmI(evpl.Handler):
    def __init__(self, shard):
        self.shard = shard

    def on_connected(self, bind):
        bind.send(bytes([self.shard.id]))


def _ids(address, count, cpu=None) -> list[int]:
    ids = []
    old = os.sched_getaffinity(0)
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    try:
        socks = [socket.create_connection(address, timeout=TIMEOUT) for _ in range(count)]
        for s in socks:
            ids.append(s.recv(1)[0])
            s.close()
    finally:
        os.sched_setaffinity(0, old)
    return ids


def test_shards_share_a_port():
    def main(shard):
        shard.listen("who", lambda: WhoAmI(shard))

    with shards.start(main, 2, listen={"who": ("tcp", ("127.0.0.1", 0))}) as group:
        ids = _ids(group.addresses["who"], 64)
        group.stop()
        assert group.wait(TIMEOUT) == [0, 0]
    assert set(ids) == {0, 1}           # 64 connections all to one shard: 2**-63


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="steering needs 2 CPUs")
def test_steering_to_the_cpu_that_received():
    """steer=True: a connection from a client on CPU c (loopback delivers on
    the sender's CPU) goes to the shard pinned to c."""
    cpus = sorted(os.sched_getaffinity(0))[:2]

    def main(shard):
        shard.listen("who", lambda: WhoAmI(shard))

    with shards.start(main, 2, cpus=cpus, steer=True,
                      listen={"who": ("tcp", ("127.0.0.1", 0))}) as group:
        for shard_id, cpu in enumerate(cpus):
            assert set(_ids(group.addresses["who"], 8, cpu)) == {shard_id}
        group.stop()
        assert group.wait(TIMEOUT) == [0, 0]


def _sigterm_parent(*args: str, timeout: float) -> tuple[int, str, str, list[int]]:
    """Run run_shards.py with ``args``, SIGTERM it once both shards are up;
    its exit status, stdout and stderr, and the shards' pids (none is left
    running, whatever happened)."""
    script = os.path.join(os.path.dirname(__file__), "run_shards.py")
    proc = subprocess.Popen([sys.executable, script, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    pids: list[int] = []
    try:
        for _ in range(2):
            pids.append(int(proc.stdout.readline().split()[1]))
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in pids:            # a failed run leaves no shard behind either
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)
    return proc.returncode, out, err, pids


def test_sigterm_to_the_parent():
    # (a shard that did not stop is killed after the 10 s grace: the
    # parent then prints its status, and its log says which)
    code, out, err, pids = _sigterm_parent(timeout=3 * TIMEOUT)
    assert code == 0 and "statuses [0, 0]" in out, (out, err)
    assert all(_gone(p) for p in pids)


def test_shards_that_ignore_sigterm_are_killed_after_the_grace():
    """SIGTERM to the parent of shards that block SIGTERM: they are killed
    once the grace period (0.5 s here) is over, wherever the signal finds
    the parent (still starting them, or already waiting: a wait without a
    timeout, which PEP 475 resumes as it was, hung there, since no shard
    exits to end it), and the parent exits."""
    code, out, err, pids = _sigterm_parent("hybrid", "stubborn", timeout=TIMEOUT)
    assert code == 0 and "statuses [-9, -9]" in out, (out, err)
    assert "still running [0, 1] after SIGTERM" in err
    assert all(_gone(p) for p in pids)


@pytest.mark.parametrize("mode", ["event", "hybrid", "always"])
def test_shards_stop_when_the_parent_is_killed(mode):
    """A parent killed outright (no SIGTERM handler runs) leaves no shard
    behind, in every poll mode: each shard watches the parent's pidfd (in
    its epoll set, or on a timer when it polls) and stops."""
    script = os.path.join(os.path.dirname(__file__), "run_shards.py")
    proc = subprocess.Popen([sys.executable, script, mode], stdout=subprocess.PIPE, text=True)
    pids: list[int] = []
    fds: list[int] = []
    try:
        for _ in range(2):
            pids.append(int(proc.stdout.readline().split()[1]))
        fds = [os.pidfd_open(pid) for pid in pids]
        proc.kill()
        proc.wait(TIMEOUT)
        for fd in fds:                   # readable once that shard has exited
            r, _, _ = select.select([fd], [], [], TIMEOUT)
            assert r == [fd]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in pids:
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)
        for fd in fds:
            os.close(fd)


@pytest.mark.skipif(shutil.which("strace") is None,
                    reason="needs strace (scripts/test installs it)")
def test_a_polling_shard_makes_no_system_call():
    """Shard 1 in poll mode answers 2000 round trips from shard 0 (also
    polling) without one system call: it finds the requests by reading the
    ring, and shard 0 is not asleep, so nobody writes an eventfd. strace
    counts shard 1's calls while the round trips run."""
    script = os.path.join(os.path.dirname(__file__), "poll_shards.py")
    proc = subprocess.Popen([sys.executable, script, "2000"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    tracer = None
    try:
        pids = [int(p) for p in proc.stdout.readline().split()[1:]]
        with tempfile.NamedTemporaryFile("r", suffix=".strace") as out:
            tracer = subprocess.Popen(["strace", "-c", "-o", out.name, "-p", str(pids[1])],
                                      stderr=subprocess.PIPE, text=True)
            line = tracer.stderr.readline()     # "strace: Process N attached"
            if "attached" not in line:
                tracer.wait(TIMEOUT)
                pytest.skip(f"strace cannot attach here: {line.strip()}")
            proc.stdin.write("go\n")
            proc.stdin.flush()
            assert proc.stdout.readline().split() == ["done", "2000"]
            tracer.send_signal(signal.SIGINT)       # detach: writes the summary
            tracer.wait(TIMEOUT)
            summary = out.read()
        proc.stdin.write("stop\n")
        proc.stdin.flush()
        assert proc.stdout.readline().split() == ["statuses", "[0,", "0]"]
        proc.wait(TIMEOUT)
    finally:
        if tracer is not None and tracer.poll() is None:
            tracer.kill()
            tracer.wait()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    calls = {}
    for row in summary.splitlines():
        # rows: % time, seconds, usecs/call, calls, [errors,] syscall (the
        # header row, which strace prints once it saw any call, is skipped)
        cols = row.split()
        if (len(cols) >= 5 and cols[-1].isidentifier() and cols[-1] != "total"
                and cols[3].isdigit()):
            calls[cols[-1]] = int(cols[3])
    # only the 10 Hz look at the parent's pidfd may show (select), nothing per message
    assert not {k: v for k, v in calls.items() if k not in ("select", "pselect6")}, summary
    assert sum(calls.values()) < 2000, summary


def test_bad_arguments():
    with pytest.raises(evpl.ConfigError):
        shards.run(lambda s: None, 0)
    with pytest.raises(evpl.ConfigError):
        shards.run(lambda s: None, 2, cpus=[10_000])
    with pytest.raises(evpl.ConfigError):
        shards.run(lambda s: None, 1, ring_bytes=1000)
    with pytest.raises(evpl.ConfigError):
        shards.run("not callable", 1)
