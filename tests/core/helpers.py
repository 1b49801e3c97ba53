"""Helpers shared by the core behaviour tests (plain-socket peers, threads)."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import evpl

# generous bound for every run_until: tests never rely on it, it only turns a
# hang into a failure
# bounds for conditions that should be reached quickly; scripts/asan sets
# EVPL_SLOW because AddressSanitizer makes everything ~10x slower
TIMEOUT = 10.0 * (10 if os.environ.get("EVPL_SLOW") else 1)

STREAM_BACKENDS = [b.name for b in evpl.backends() if b.available and b.kind == "stream"]
DATAGRAM_BACKENDS = [b.name for b in evpl.backends() if b.available and b.kind == "datagram"]


def backend_info(name: str) -> evpl.BackendInfo:
    for b in evpl.backends():
        if b.name == name:
            return b
    raise LookupError(name)


def close_loop_clean(loop: evpl.Loop) -> None:
    """Close the loop (which delivers the pending closes and waits for the
    kernel's io_uring completions) and check that no buffer of the default
    pool is still in use."""
    loop.close()
    check_pool(evpl.default_pool())


def check_pool(pool: evpl.Pool) -> None:
    """Nothing leaked: every buffer and heap chunk went back to ``pool``."""
    stats = pool.stats()
    if stats["buffers_in_use"] or stats["heap_in_use"]:
        gc.collect()                # only then: a full collection is slow
        stats = pool.stats()
    assert stats["buffers_in_use"] == 0, f"leaked pool buffers: {stats}"
    assert stats["heap_in_use"] == 0, f"leaked heap chunks: {stats}"


def raw_family(backend: str) -> int:
    """The socket family a plain Python peer uses to talk to ``backend``."""
    caps = backend_info(backend).capabilities
    if "local" in caps:
        return socket.AF_UNIX
    return socket.AF_INET


def raw_connect(backend: str, addr: Any, *, rcvbuf: int | None = None) -> socket.socket:
    """A blocking plain-socket client connected to an evpl listener."""
    family = socket.AF_UNIX if isinstance(addr, str | bytes) else (
        socket.AF_INET6 if ":" in addr[0] else socket.AF_INET)
    s = socket.socket(family, socket.SOCK_STREAM)
    if rcvbuf is not None:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(TIMEOUT)
    s.connect(addr)
    return s


def raw_listener(backend: str, address_factory: Callable[[str], Any],
                 *, rcvbuf: int | None = None) -> tuple[socket.socket, Any]:
    """A plain-socket listener evpl can connect to: (socket, address)."""
    addr = address_factory(backend)
    s = socket.socket(raw_family(backend), socket.SOCK_STREAM)
    if rcvbuf is not None:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.bind(addr)
    s.listen(16)
    s.settimeout(TIMEOUT)
    return s, s.getsockname()


def recv_all(sock: socket.socket) -> bytes:
    """Read until EOF (blocking, bounded by the socket timeout)."""
    chunks = []
    while True:
        data = sock.recv(1 << 20)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        data = sock.recv(min(n, 1 << 20))
        if not data:
            raise EOFError(f"EOF with {n} bytes still expected")
        chunks.append(data)
        n -= len(data)
    return b"".join(chunks)


class InThread:
    """Run ``fn`` in a thread; ring a doorbell of ``loop`` when it is done, so
    ``loop.run_until(t.done)`` wakes up without polling."""

    def __init__(self, loop: evpl.Loop, fn: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.finished = False
        self._bell = loop.doorbell(lambda: None)
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self.result = fn()
        except BaseException as exc:  # reported by get()
            self.error = exc
        finally:
            self.finished = True
            self._bell.ring()

    def done(self) -> bool:
        return self.finished

    def get(self) -> Any:
        self._thread.join(TIMEOUT)
        assert self.finished, "helper thread did not finish"
        self._bell.close()
        if self.error is not None:
            raise self.error
        return self.result


class Ticker:
    """A periodic timer that keeps the loop iterating (for predicates that
    depend on things outside the loop, like a plain socket's kernel state)."""

    def __init__(self, loop: evpl.Loop, period: float = 0.001) -> None:
        self.count = 0
        self.timer = loop.call_every(period, self._tick)

    def _tick(self) -> None:
        self.count += 1

    def cancel(self) -> None:
        self.timer.cancel()


def wait_until(predicate: Callable[[], Any], what: str) -> None:
    """Poll ``predicate`` (kernel state the loop does not report, with the
    loop deliberately not running) until it is true; fail after TIMEOUT."""
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.0002)


_PEER_READER = """
import socket, sys
fd, want, timeout = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
sock = socket.socket(fileno=fd)
sock.settimeout(timeout)
out = sys.stdout.buffer
end = "count"
try:
    while want != 0:
        data = sock.recv(1 << 20 if want < 0 else min(want, 1 << 20))
        if not data:
            end = "eof"
            break
        out.write(data)
        if want > 0:
            want -= len(data)
except ConnectionResetError:
    end = "reset"
out.flush()
sys.stderr.write(end)
"""


class PeerReader:
    """Read a plain socket in a child process: ``nbytes`` bytes, or until EOF
    or a reset when ``nbytes`` is -1.

    The child has its own interpreter, so its progress does not depend on
    winning this process's GIL: a reader thread here needs the GIL after
    every ``recv`` (2 KB at a time from a 4 KiB receive buffer), and a loop
    that keeps the GIL (a callback that runs long, a loop that never
    sleeps) would starve it. The loop learns that the child exited from a
    pidfd watch, so no thread of ours is involved either. Use as a context
    manager: leaving it kills a child that is still running."""

    def __init__(self, loop: evpl.Loop, sock: socket.socket, nbytes: int = -1) -> None:
        self.finished = False
        self._out = tempfile.TemporaryFile()
        fd = sock.fileno()
        self._proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _PEER_READER, str(fd), str(nbytes), str(TIMEOUT)],
            stdout=self._out, stderr=subprocess.PIPE, pass_fds=(fd,))
        self._pidfd = os.pidfd_open(self._proc.pid)
        self._watch = loop.watch_fd(self._pidfd, on_readable=self._exited)

    def _exited(self) -> None:
        self.finished = True
        self._watch.cancel()

    def done(self) -> bool:
        return self.finished

    def get(self) -> tuple[bytes, str]:
        """What the child read, and how it ended: "count", "eof" or "reset"."""
        rc = self._proc.wait(TIMEOUT)
        end = self._proc.stderr.read().decode(errors="replace")
        assert rc == 0, f"peer reader failed (exit {rc}): {end}"
        self._out.seek(0)
        return self._out.read(), end

    def __enter__(self) -> PeerReader:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait(TIMEOUT)
        self._watch.cancel()
        os.close(self._pidfd)
        self._proc.stderr.close()
        self._out.close()


CLONE_NEWNET = 0x40000000


@contextlib.contextmanager
def private_netns() -> Iterator[bool]:
    """Run the block with this thread (and the processes it starts) in a new
    network namespace that has only ``lo``, up. Its ports and TIME_WAIT
    entries are its own: thousands of connections to 127.0.0.1 then do not
    depend on how many ephemeral ports the rest of the machine (other test
    runs, earlier runs of the same test) holds. A socket stays in the
    namespace it was made in: make both ends inside the block. Yields False,
    and stays in the current namespace, where the thread may not make one
    (not root)."""
    libc = ctypes.CDLL(None, use_errno=True)
    old = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        if libc.unshare(CLONE_NEWNET) != 0:
            yield False
            return
        try:
            subprocess.run(["ip", "link", "set", "lo", "up"], check=True, timeout=TIMEOUT,
                           capture_output=True)
            yield True
        finally:
            if libc.setns(old, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back to the test's network namespace")
    finally:
        os.close(old)
