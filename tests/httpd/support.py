"""Helpers for the HTTP tests: a server on the test's loop, peers in threads."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from core.helpers import TIMEOUT, InThread

import evpl
from evpl.http import Server


class Served:
    """A Server on ``loop`` listening on a free loopback port."""

    def __init__(self, loop: evpl.Loop, app: Any, **kw: Any) -> None:
        backend = kw.pop("backend", "tcp")
        listen_opts = kw.pop("listen_opts", {})
        # the idle and header-read timeouts are under test only where a test
        # sets them; elsewhere a slow machine (a sanitizer build, a loaded CI
        # runner) must not see a connection closed for want of speed
        kw.setdefault("keepalive_timeout", TIMEOUT * 6)
        kw.setdefault("header_timeout", TIMEOUT * 6)
        self.loop = loop
        self.server = Server(loop, app, **kw)
        self.listener = self.server.listen(("127.0.0.1", 0), backend=backend, **listen_opts)
        self.port = self.listener.address[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def run(self, fn: Callable[[], Any], timeout: float = TIMEOUT * 3) -> Any:
        """Run ``fn`` (a blocking peer) in a thread while the loop serves."""
        t = InThread(self.loop, fn)
        self.loop.run_until(t.done, timeout=timeout)
        return t.get()

    def close(self) -> None:
        self.server.close()
        self.loop.run_until(lambda: self.server.connections == 0, timeout=TIMEOUT)


@pytest.fixture
def serve(loop: evpl.Loop) -> Iterator[Callable[..., Served]]:
    """``serve(app, **server_options)`` -> Served; closed at teardown."""
    made: list[Served] = []

    def make(app: Any, **kw: Any) -> Served:
        s = Served(loop, app, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def tool(name: str) -> str:
    """The path of a peer program, or skip saying which package provides it."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    if path is None:
        pkg = {"h2load": "nghttp2-client"}.get(name, name)
        pytest.skip(f"{name} is not installed (Debian package {pkg}; scripts/test installs it)")
    return path


def run(cmd: list[str], timeout: float = TIMEOUT * 3, **kw: Any) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, timeout=timeout, check=False, **kw)
