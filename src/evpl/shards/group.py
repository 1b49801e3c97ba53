"""Starting, watching and stopping a group of shard processes."""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import select
import signal
import socket
import struct
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from evpl import numa
from evpl._native import rings as _rings
from evpl.core import backends as _backends
from evpl.core.loop import Loop, _sockaddr
from evpl.errors import ConfigError, transport_error

__all__ = ["ShardGroup", "run", "start"]

_log = logging.getLogger("evpl")

_PARENT_CHECK_S = 0.1   # a polling shard looks at its parent's pidfd this often
# the parent's waits for its shards return at least this often: a stop()
# from a signal handler during a select (which PEP 475 resumes with the
# timeout it began with) then gets its grace period enforced
_WAIT_SLICE_S = 0.25


def _readable(fd: int) -> bool:
    """``fd`` is readable now (a pidfd: its process has exited)."""
    return bool(select.select([fd], [], [], 0)[0])

SO_ATTACH_REUSEPORT_CBPF = 51
_SKF_AD_CPU = -0x1000 + 36          # SKF_AD_OFF + SKF_AD_CPU


def _steering_program(cpus: Sequence[int]) -> bytes:
    """Classic BPF for SO_ATTACH_REUSEPORT_CBPF: return the index (in the
    reuseport group, i.e. the shard id) of the shard pinned to the CPU that
    runs the program, the CPU that received the connection; CPUs without a
    shard fall back to ``cpu % n``."""
    def ins(code: int, jt: int, jf: int, k: int) -> bytes:
        return struct.pack("HBBI", code, jt, jf, k & 0xFFFFFFFF)
    n = len(cpus)
    prog = [ins(0x20, 0, 0, _SKF_AD_CPU)]             # ld  [cpu]
    for i, cpu in enumerate(cpus):
        prog.append(ins(0x15, 0, 1, cpu))             # jeq #cpu, next, skip
        prog.append(ins(0x06, 0, 0, i))               # ret #i
    prog.append(ins(0x94, 0, 0, n))                   # mod #n
    prog.append(ins(0x16, 0, 0, 0))                   # ret a
    return b"".join(prog)


def _attach_steering(sock: socket.socket, cpus: Sequence[int]) -> None:
    code = _steering_program(cpus)
    buf = ctypes.create_string_buffer(code, len(code))
    fprog = struct.pack("HL", len(code) // 8, ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)


class ShardGroup:
    """A running group of shards (``evpl.shards.start``): ``pids``,
    ``cpus``, ``addresses`` (the bound address of each named listener),
    ``wait()``, ``stop()``, ``kill()``; a context manager that stops and
    waits on exit."""

    def __init__(self, main: Callable[[Any], Any], n: int, cpus: list[int], restart: bool,
                 max_restarts: int, ring_bytes: int, max_backlog: int,
                 listen: dict[str, tuple[str, Any]], steer: bool, bind_memory: bool,
                 loop_options: dict[str, Any]) -> None:
        self.main = main
        self.n = n
        self.cpus = cpus
        self.restart = restart
        self.max_restarts = max_restarts
        self._max_backlog = max_backlog
        self._bind_memory = bind_memory
        self._loop_options = loop_options
        self.pids: list[int | None] = [None] * n
        self.statuses: list[int | None] = [None] * n
        self.restarts = [0] * n
        self.failed: list[tuple[int, int]] = []      # (shard, exit status) of shards that failed
        self.addresses: dict[str, Any] = {}
        self._pidfds: dict[int, int] = {}            # pidfd -> shard
        self._stopping = False
        self._kill_at: float | None = None
        self._term = False                           # (in a shard) SIGTERM arrived
        self._shard: Any = None                      # (in a shard) its Shard
        self._sockets: dict[str, tuple[str, list[socket.socket]]] = {}
        self._memfd = os.memfd_create("evpl-shards", os.MFD_CLOEXEC)
        self._efds: list[int] = []
        self._ready_r, self._ready_w = os.pipe2(os.O_CLOEXEC)
        self._parent_pid = os.getpid()  # set again at each fork
        try:
            self.rings = _rings.RingSet(self._memfd, n, ring_bytes, True)
            self._efds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(n)]
            for name, (backend, address) in listen.items():
                self._listen(name, backend, address, steer)
        except BaseException:
            self._close_fds()
            raise

    def _listen(self, name: str, backend: str, address: Any, steer: bool) -> None:
        """n SO_REUSEPORT sockets on one address, made here in shard order
        so that shard i's socket is index i of the kernel's group."""
        info = _backends.get(backend, "stream")
        if info.family == socket.AF_UNIX:
            raise ConfigError(f"{backend}: unix sockets have no SO_REUSEPORT groups; "
                              "shards need a TCP listener")
        family, sa = _sockaddr(info, address, socket.SOCK_STREAM)
        socks: list[socket.socket] = []
        self._sockets[name] = (info.name, socks)
        for i in range(self.n):
            s = socket.socket(family, socket.SOCK_STREAM)
            socks.append(s)
            try:
                s.setblocking(False)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                s.bind(sa)
                s.listen(1024)
            except OSError as exc:
                raise transport_error(exc.errno or errno.EINVAL, f"listen {sa!r}") from None
            if i == 0:
                sa = s.getsockname()
                self.addresses[name] = sa
                if steer:
                    try:
                        _attach_steering(s, self.cpus)
                    except OSError as exc:
                        raise ConfigError(f"steer=True: SO_ATTACH_REUSEPORT_CBPF failed: "
                                          f"{exc.strerror}") from None

    # ---- processes ----------------------------------------------------------

    def _fork(self, i: int) -> None:
        self.rings.set_state(i, _rings.STARTING)
        # a SIGTERM sent before the child installed its handler waits
        # (blocked) instead of killing it half started
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        self._parent_pid = os.getpid()
        try:
            pid = os.fork()
            if pid == 0:
                self._child(i)          # never returns
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        self.pids[i] = pid
        self._pidfds[os.pidfd_open(pid)] = i

    def _child(self, i: int) -> None:
        code = 1
        try:
            self._term = False
            self._shard = None

            def terminate(signum: int, frame: Any) -> None:
                self._term = True
                if self._shard is not None:
                    self._shard.stop()

            signal.signal(signal.SIGINT, signal.SIG_IGN)   # the parent stops us with SIGTERM
            signal.signal(signal.SIGTERM, terminate)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
            os.close(self._ready_r)
            for fd in self._pidfds:
                os.close(fd)
            code = self._shard_main(i)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)

    def _shard_main(self, i: int) -> int:
        from evpl._native.buffers import Pool
        from evpl.shards.shard import Shard
        cpu = self.cpus[i]
        os.sched_setaffinity(0, {cpu})
        if self._bind_memory:
            why = numa.bind_memory(numa.node_of(cpu))
            if why:
                _log.debug("shard %d: memory not bound to its node: %s", i, why)
        sockets: dict[str, tuple[str, socket.socket]] = {}
        for name, (backend, socks) in self._sockets.items():
            for k, s in enumerate(socks):
                if k == i:
                    sockets[name] = (backend, s)
                else:
                    s.close()
        options = dict(self._loop_options)
        options.setdefault("pool", Pool())          # allocated after pinning: local memory
        loop = Loop(**options)
        rs = _rings.RingSet(self._memfd, self.n, self.rings.ring_bytes)
        shard = self._shard = Shard(i, self.n, loop, cpu, rs, list(self._efds), sockets,
                                    self._max_backlog)
        if self._term:
            shard.stop()
        # a parent that dies without stopping us (SIGKILL, a crash) must not
        # leave shards running (and holding its listeners and files): its
        # pidfd becomes readable when it exits
        try:
            parent = os.pidfd_open(self._parent_pid)
        except ProcessLookupError:
            return 1
        def orphaned() -> None:
            _log.warning("shard %d: the parent process died; stopping", i)
            shard.stop()
        if loop.poll_mode == "event":
            loop.watch_fd(parent, on_readable=orphaned)
        else:
            # a polling loop calls epoll_wait while it spins only if an fd
            # of its own is in the epoll set: look at the pidfd on a timer
            # instead, so that polling the rings costs no system call
            loop.call_every(_PARENT_CHECK_S, lambda: _readable(parent) and orphaned())
        rs.set_state(i, _rings.RUNNING, os.getpid())
        self.main(shard)
        if self._ready_w >= 0:          # (a restarted shard has nobody waiting)
            os.write(self._ready_w, bytes([i]))
        if not shard.stopping:
            # run() clears a stop() that came before it: a SIGTERM handled
            # between this check and run() is seen by this deferred call
            loop.defer(lambda: shard.stopping and loop.stop())
            loop.run()
        for fn in shard._at_stop:
            try:
                fn()
            except Exception:
                _log.exception("shard %d: an at_stop callback raised", i)
        loop.close()
        os.close(parent)
        return 0

    def _start(self) -> None:
        """Fork every shard; return once each has run its ``main`` (or the
        group gave up: a shard failed and was not restarted)."""
        ready: set[int] = set()
        try:
            for i in range(self.n):
                if self._stopping:
                    break               # SIGTERM while starting (run's handler)
                self._fork(i)
            # the parent no longer needs the listening sockets, except to restart
            if not self.restart:
                self._close_sockets()
            while len(ready) < self.n and self.running and not self._stopping:
                r, _, _ = select.select([self._ready_r, *self._pidfds], [], [], _WAIT_SLICE_S)
                if self._ready_r in r:
                    ready.update(os.read(self._ready_r, 64))
                for fd in r:
                    if fd in self._pidfds:
                        self._reap(fd)
        finally:
            os.close(self._ready_w)     # shards restarted later report to nobody
            self._ready_w = -1

    @property
    def running(self) -> int:
        """Shards still running."""
        return len(self._pidfds)

    def _reap(self, pidfd: int) -> None:
        i = self._pidfds.pop(pidfd)
        os.close(pidfd)
        pid = self.pids[i]
        assert pid is not None
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        self.statuses[i] = code
        self.rings.set_state(i, _rings.GONE)
        self.rings.bump_epoch()
        for k, efd in enumerate(self._efds):
            if k != i:
                self.rings.wake(k, efd)
        if code != 0 and not self._stopping:
            self.failed.append((i, code))
            _log.error("shard %d (pid %d) exited with status %d", i, pid, code)
            if self.restart and self.restarts[i] < self.max_restarts:
                self.restarts[i] += 1
                _log.warning("restarting shard %d (%d of %d)", i, self.restarts[i],
                             self.max_restarts)
                self._fork(i)
                self.rings.bump_epoch()
                for k, efd in enumerate(self._efds):
                    if k != i:
                        self.rings.wake(k, efd)
                return
            self.stop()

    def stop(self, grace: float = 10.0) -> None:
        """Ask every shard to stop (SIGTERM); ``wait`` kills those still
        running ``grace`` seconds later."""
        self._stopping = True
        if self._kill_at is None:
            self._kill_at = time.monotonic() + grace
        for pidfd, _i in list(self._pidfds.items()):
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """SIGKILL every shard still running and reap it."""
        self._stopping = True
        for pidfd in list(self._pidfds):
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._reap(pidfd)

    def wait(self, timeout: float | None = None) -> list[int | None]:
        """Wait until every shard has exited (or ``timeout`` seconds);
        returns the exit statuses by shard (negative: killed by that
        signal; None: still running after ``timeout``)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while self._pidfds:
                now = time.monotonic()
                limits = [t for t in (deadline, self._kill_at, now + _WAIT_SLICE_S)
                          if t is not None]
                r, _, _ = select.select(list(self._pidfds), [], [], max(0.0, min(limits) - now))
                for fd in r:
                    if fd in self._pidfds:
                        self._reap(fd)
                now = time.monotonic()
                if self._kill_at is not None and now >= self._kill_at and self._pidfds:
                    _log.error("shards still running %s after SIGTERM: killing them",
                               sorted(self._pidfds.values()))
                    self.kill()
                if deadline is not None and now >= deadline:
                    break
        finally:
            if not self._pidfds:
                self._close_fds()
        return list(self.statuses)

    def _close_sockets(self) -> None:
        for _, socks in self._sockets.values():
            for s in socks:
                s.close()
        self._sockets = {}

    def _close_fds(self) -> None:
        self._close_sockets()
        for fd in [self._memfd, self._ready_r, self._ready_w, *self._efds]:
            if fd >= 0:
                os.close(fd)
        self._memfd = self._ready_r = self._ready_w = -1
        self._efds = []

    def __enter__(self) -> ShardGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pidfds:
            self.stop()
            self.wait()


def _check_main(main: Any, n: Any, cpus: Any) -> tuple[int, list[int]]:
    if not callable(main):
        raise ConfigError(f"main must be callable, got {main!r}")
    allowed = os.sched_getaffinity(0)
    if cpus is not None:
        cpus = list(cpus)
        bad = [c for c in cpus if not isinstance(c, int) or c not in allowed]
        if bad or not cpus:
            raise ConfigError(f"cpus must be CPUs this process may use {sorted(allowed)}, "
                              f"got {cpus!r}")
    if n is None:
        n = len(cpus) if cpus is not None else len(allowed)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"n must be a positive int, got {n!r}")
    return n, numa.placement(n, cpus)


def _group(main: Callable[[Any], Any], n: int | None, cpus: Sequence[int] | None,
           restart: bool = False, max_restarts: int = 5, ring_bytes: int = 1 << 20,
           max_backlog: int = 65536, listen: dict[str, tuple[str, Any]] | None = None,
           steer: bool = False, bind_memory: bool = True,
           **loop_options: Any) -> ShardGroup:
    n, placed = _check_main(main, n, cpus)
    if listen is not None and not isinstance(listen, dict):
        raise ConfigError("listen must be a dict: name -> (backend, address)")
    if not isinstance(max_restarts, int) or max_restarts < 0:
        raise ConfigError(f"max_restarts must be an int >= 0, got {max_restarts!r}")
    if not isinstance(max_backlog, int) or max_backlog < 0:
        raise ConfigError(f"max_backlog must be an int >= 0, got {max_backlog!r}")
    Loop(**{k: v for k, v in loop_options.items() if k != "pool"}).close()   # check options now
    return ShardGroup(main, n, placed, restart, max_restarts, ring_bytes, max_backlog,
                      listen or {}, steer, bind_memory, loop_options)


def _launch(group: ShardGroup) -> ShardGroup:
    try:
        group._start()
    except BaseException:
        group.kill()
        group._close_fds()
        raise
    return group


def start(main: Callable[[Any], Any], n: int | None = None, cpus: Sequence[int] | None = None,
          **options: Any) -> ShardGroup:
    """Start ``n`` shard processes (default: one per CPU this process may
    use), each pinned to its CPU (placed node by node), and call
    ``main(shard)`` in each; returns once every ``main`` has returned (the
    shards' loops then run until stopped). The options are ``run``'s.
    Signals are the caller's business here (``run`` handles them).
    """
    return _launch(_group(main, n, cpus, **options))


def run(main: Callable[[Any], Any], n: int | None = None, cpus: Sequence[int] | None = None,
        *, grace: float = 10.0, **options: Any) -> list[int | None]:
    """Run ``main(shard)`` in ``n`` processes, one per CPU, and return their
    exit statuses once all have exited (negative: killed by that signal).

    ``cpus``: the CPUs to use (default: the affinity mask), placed node by
    node. ``listen={"name": (backend, address)}``: a listener every shard
    shares (``shard.listen("name", handler)``), one SO_REUSEPORT socket per
    shard; ``steer=True`` sends each connection to the shard pinned to the
    CPU that received it (SO_ATTACH_REUSEPORT_CBPF). ``restart=True``
    restarts a shard that fails (up to ``max_restarts`` times); otherwise a
    failed shard stops the others. ``ring_bytes``: the size of each ring
    between two shards (a power of two; payloads up to a quarter of it);
    ``max_backlog``: requests per destination that may wait for room in a
    full ring. ``bind_memory``: each shard prefers its CPU's NUMA node for
    its memory. SIGINT and SIGTERM stop every shard cleanly: a shard still
    running ``grace`` seconds later (in its ``Shard.at_stop`` callbacks) is
    killed. The remaining options go to each shard's ``evpl.Loop``.
    """
    if not isinstance(grace, int | float) or isinstance(grace, bool) or grace <= 0:
        raise ConfigError(f"grace must be a positive number of seconds, got {grace!r}")
    group = _group(main, n, cpus, **options)
    previous = {}

    def stop(signum: int, frame: Any) -> None:
        group.stop(grace)

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, stop)
    try:
        _launch(group)
        return group.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if group.running:
            group.kill()
        group._close_fds()
