"""Helpers for the evpl.zmtp tests: drive an evpl Loop while a pyzmq
(libzmq) peer works in its own I/O thread."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import evpl

TIMEOUT = 15.0 * (10 if os.environ.get("EVPL_SLOW") else 1)


def until(loop: evpl.Loop, pred: Callable[[], Any], timeout: float = TIMEOUT) -> None:
    """Run ``loop`` until ``pred()`` is true. The peer may be libzmq, whose
    progress does not wake the evpl loop: a 2 ms tick re-checks ``pred``
    (a poll interval, not a synchronisation sleep); evpl.TimeoutError after
    ``timeout``."""
    tick = loop.call_every(0.002, lambda: None)
    try:
        loop.run_until(pred, timeout)
    finally:
        tick.cancel()


def zrecv(loop: evpl.Loop, zsock: Any, timeout: float = TIMEOUT) -> list[bytes]:
    """Receive one multipart message on a pyzmq socket while running ``loop``."""
    import zmq
    got: list[list[bytes]] = []

    def ready() -> bool:
        if not got:
            try:
                got.append(zsock.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return False
        return True
    until(loop, ready, timeout)
    return got[0]


def tobytes(msg: list[Any]) -> list[bytes]:
    return [bytes(f) for f in msg]
