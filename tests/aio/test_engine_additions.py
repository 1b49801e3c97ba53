"""The engine additions evpl.aio needs, on every stream backend:
``Bind.shutdown_write`` (half-close after the queue drains),
``Bind.set_write_limits`` (watermarks changed on an open Bind) and
``Loop.flush`` (send without polling)."""

from __future__ import annotations

from typing import Any

import pytest
from core.helpers import raw_listener, recv_all, recv_exactly

import evpl


class Recorder(evpl.Handler):
    def __init__(self) -> None:
        self.data = bytearray()
        self.eof = False
        self.paused = 0
        self.writable = 0
        self.bind: Any = None

    def on_connected(self, bind: Any) -> None:
        self.bind = bind

    def on_data(self, bind: Any, buf: Any) -> None:
        self.data += buf

    def on_eof(self, bind: Any) -> None:
        self.eof = True

    def on_paused(self, bind: Any) -> None:
        self.paused += 1

    def on_writable(self, bind: Any) -> None:
        self.writable += 1


def _connect(loop: Any, backend: str, address: Any) -> tuple[Any, Recorder, Any]:
    srv, addr = raw_listener(backend, address)
    h = Recorder()
    bind = loop.connect(backend, addr, h)
    peer, _ = srv.accept()
    srv.close()
    loop.run_until(lambda: h.bind is not None, timeout=10)
    return bind, h, peer


def test_shutdown_write_after_the_queue(loop: Any, stream_backend: str, address: Any) -> None:
    bind, h, peer = _connect(loop, stream_backend, address)
    with peer:
        payload = b"q" * 3_000_000           # more than the socket buffers take at once
        bind.send(payload)
        bind.shutdown_write()
        with pytest.raises(evpl.EvplError):
            bind.send(b"late")
        got = bytearray()
        peer.setblocking(False)
        while True:                          # read while the loop sends
            loop.run_once(0.01)
            try:
                chunk = peer.recv(1 << 20)
            except BlockingIOError:
                continue
            if not chunk:
                break
            got += chunk
        assert bytes(got) == payload         # everything, then EOF
        peer.setblocking(True)
        peer.sendall(b"reply after our EOF")
        peer.close()
        loop.run_until(lambda: h.eof, timeout=10)
        assert bytes(h.data) == b"reply after our EOF"
        assert not bind.closed
    bind.close()


def test_set_write_limits(loop: Any, stream_backend: str, address: Any) -> None:
    bind, h, peer = _connect(loop, stream_backend, address)
    with peer:
        bind.send(b"x" * 10_000)
        assert h.paused == 0                 # default high water: 1 MiB
        bind.set_write_limits(4096, 0, 1 << 30)
        assert h.paused == 1 and bind.paused # already above: paused at once
        with pytest.raises(ValueError):
            bind.set_write_limits(10, 20, 30)
        loop.flush()
        peer.settimeout(10)
        assert recv_exactly(peer, 10_000) == b"x" * 10_000
        loop.run_until(lambda: h.writable == 1, timeout=10)
    bind.close()


def test_flush_sends_without_polling(loop: Any, stream_backend: str, address: Any) -> None:
    bind, _h, peer = _connect(loop, stream_backend, address)
    with peer:
        bind.send(b"now")
        loop.flush()
        peer.settimeout(10)
        assert recv_exactly(peer, 3) == b"now"
        bind.finish()
        loop.run_until(lambda: bind.closed, timeout=10)
        assert recv_all(peer) == b""
