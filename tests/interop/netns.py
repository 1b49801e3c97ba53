"""Network namespaces for interop tests (root only).

Servers that claim well-known ports (rpcbind on 111, nfs-ganesha on 2049, ...)
run inside a namespace the test creates, so they never collide with the host
or with each other::

    with NetNS("evpl-nfs") as ns:
        ns.popen(["rpcbind", "-f"])
        ns.run(["rpcinfo", "-p"], check=True)

``NetNS`` creates a uniquely named namespace (``ip netns add PREFIX-<hex>``),
brings ``lo`` up, runs commands in it, and on exit kills every process it
started (and anything else still left in the namespace) and deletes it.

With ``private_run=True`` (the default) commands also get a private mount
namespace with an empty tmpfs on ``/run``: daemons such as rpcbind put unix
sockets and lock files there (``/run/rpcbind.sock``), and RPC libraries talk
to ``/run/rpcbind.sock`` before trying the network, so without this a daemon
in the namespace would steal the host's socket path, or register with the
host's rpcbind.  Every command of one ``NetNS`` shares that mount namespace
(it is held by a small ``sleep`` process), so the daemons inside see each
other's sockets.  Other paths (``/tmp``, ``/etc``, ...) are shared with the
host.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["NetNS", "NetNSError", "netns_unavailable_reason", "wait_for"]


class NetNSError(RuntimeError):
    """A namespace could not be created or a command in it failed to start."""


def netns_unavailable_reason() -> str | None:
    """Why ``NetNS`` cannot work here (``None`` if it can): for ``pytest.skip``."""
    if os.geteuid() != 0:
        return f"network namespaces need root (euid is {os.geteuid()})"
    for tool in ("ip", "nsenter", "unshare"):
        if shutil.which(tool) is None:
            return f"{tool!r} is not installed"
    return None


def loss_unavailable_reason() -> str | None:
    """Why a loss test (a namespace plus iptables dropping packets) cannot
    run here, ``None`` if it can: for ``pytest.skip``."""
    reason = netns_unavailable_reason()
    if reason:
        return reason
    if shutil.which("iptables") is None:
        return "iptables is not installed (Debian: apt-get install iptables)"
    return None


def wait_for(predicate: Any, timeout: float, interval: float = 0.05,
             what: str = "condition") -> Any:
    """Poll ``predicate()`` until it returns a true value (returned) or ``timeout``
    seconds pass (``TimeoutError``)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


class NetNS:
    """A temporary network namespace; use as a context manager (or call ``close``)."""

    def __init__(self, prefix: str = "evpl", *, private_run: bool = True) -> None:
        self.name = f"{prefix}-{secrets.token_hex(4)}"
        self.private_run = private_run
        self._procs: list[subprocess.Popen[Any]] = []
        self._holder: subprocess.Popen[Any] | None = None
        self._created = False
        self._closed = False

    # -- lifecycle --------------------------------------------------------

    def __enter__(self) -> NetNS:
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        """Create the namespace, bring ``lo`` up, start the mount-namespace holder."""
        r = subprocess.run(["ip", "netns", "add", self.name], capture_output=True, text=True)
        if r.returncode != 0:
            raise NetNSError(f"ip netns add {self.name}: {r.stderr.strip()}")
        self._created = True
        r = subprocess.run(["ip", "-n", self.name, "link", "set", "lo", "up"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise NetNSError(f"ip -n {self.name} link set lo up: {r.stderr.strip()}")
        if self.private_run:
            # `ip netns exec` already gives a slave mount namespace; unshare again
            # with private propagation, mount an empty /run, then park.
            script = ("mount -t tmpfs -o mode=0755,size=16m evpl-netns-run /run"
                      " && echo ready && exec sleep 1000000")
            self._holder = subprocess.Popen(
                ["ip", "netns", "exec", self.name, "unshare", "--mount",
                 "--propagation", "private", "sh", "-c", script],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True, start_new_session=True)
            line = self._holder.stdout.readline() if self._holder.stdout else ""
            if line.strip() != "ready":
                err = self._holder.stderr.read() if self._holder.stderr else ""
                raise NetNSError(f"cannot set up a private /run in {self.name}: "
                                 f"{line.strip()} {err.strip()}")

    def close(self) -> None:
        """Kill every process started here (and any left in the namespace), delete it."""
        if self._closed:
            return
        self._closed = True
        for p in reversed(self._procs):
            _terminate(p)
        if self._created:
            # Anything else still inside (children the daemons forked).
            r = subprocess.run(["ip", "netns", "pids", self.name],
                               capture_output=True, text=True)
            holder_pid = self._holder.pid if self._holder else None
            for tok in r.stdout.split():
                if tok.isdigit() and int(tok) != holder_pid:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(tok), signal.SIGKILL)
        if self._holder is not None:
            _terminate(self._holder)
            for pipe in (self._holder.stdout, self._holder.stderr):
                if pipe is not None:
                    pipe.close()
        if self._created:
            for _ in range(50):
                r = subprocess.run(["ip", "netns", "delete", self.name],
                                   capture_output=True, text=True)
                if r.returncode == 0 or not os.path.exists(f"/run/netns/{self.name}"):
                    break
                time.sleep(0.05)

    # -- running commands --------------------------------------------------

    def wrap(self, cmd: Sequence[str]) -> list[str]:
        """The argv that runs ``cmd`` inside the namespace."""
        if self._holder is not None:
            return ["nsenter", f"--target={self._holder.pid}", "--net", "--mount", "--",
                    *cmd]
        return ["ip", "netns", "exec", self.name, *cmd]

    def run(self, cmd: Sequence[str], *, timeout: float = 30.0,
            **kw: Any) -> subprocess.CompletedProcess[Any]:
        """``subprocess.run`` inside the namespace (default ``timeout`` 30 s;
        output is captured as text unless told otherwise)."""
        if "stdout" not in kw and "stderr" not in kw and "capture_output" not in kw:
            kw["capture_output"] = True
        kw.setdefault("text", True)
        kw.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.run(self.wrap(cmd), timeout=timeout, **kw)

    def popen(self, cmd: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """``subprocess.Popen`` inside the namespace, in a new session; the process
        is killed when the namespace is closed."""
        if self._closed:
            raise NetNSError(f"namespace {self.name} is closed")
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("start_new_session", True)
        p = subprocess.Popen(self.wrap(cmd), **kw)
        self._procs.append(p)
        return p

    def terminate(self, proc: subprocess.Popen[Any], timeout: float = 5.0) -> int | None:
        """Stop one process started by ``popen`` (SIGTERM, then SIGKILL)."""
        _terminate(proc, timeout)
        return proc.returncode

    def port_open(self, port: int, host: str = "127.0.0.1") -> bool:
        """Whether a TCP connect to ``host:port`` inside the namespace succeeds."""
        code = ("import socket,sys\n"
                "s=socket.socket(); s.settimeout(0.5)\n"
                f"sys.exit(s.connect_ex(({host!r},{int(port)})) != 0)\n")
        try:
            r = self.run(["python3", "-c", code], timeout=5)
        except subprocess.TimeoutExpired:
            return False
        return r.returncode == 0

    def wait_port(self, port: int, timeout: float = 15.0, host: str = "127.0.0.1",
                  proc: subprocess.Popen[Any] | None = None) -> None:
        """Poll until ``host:port`` accepts TCP connections inside the namespace;
        ``TimeoutError`` after ``timeout`` seconds, ``NetNSError`` if ``proc``
        exits first."""
        def ready() -> bool:
            if proc is not None and proc.poll() is not None:
                raise NetNSError(f"process {proc.args!r} exited with status "
                                 f"{proc.returncode} before port {port} opened")
            return self.port_open(port, host)
        wait_for(ready, timeout, interval=0.1, what=f"TCP port {port} in {self.name}")


def _terminate(p: subprocess.Popen[Any], timeout: float = 5.0) -> None:
    if p.poll() is not None:
        return
    # Each popen() process leads its own session: signal the whole group, so
    # wrappers (ip netns exec, sh) and what they started go too.
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, sig)
        try:
            p.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
