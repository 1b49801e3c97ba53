"""Helpers for the evpl.zmtp tests: drive an evpl Loop while a pyzmq
(libzmq) peer works in its own I/O thread."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import evpl

TIMEOUT = 15.0 * (10 if os.environ.get("EVPL_SLOW") else 1)


POKE: list[Any] = []
"""pyzmq sockets to poke on every tick: libzmq attaches a new connection
(and sends a SUB's subscriptions on it) only when the application thread
touches the socket."""


def _poke() -> None:
    import zmq
    for z in POKE:
        if not z.closed:
            z.getsockopt(zmq.EVENTS)


def until(loop: evpl.Loop, pred: Callable[[], Any], timeout: float = TIMEOUT) -> None:
    """Run ``loop`` until ``pred()`` is true. The peer may be libzmq, whose
    progress does not wake the evpl loop: a 2 ms tick re-checks ``pred``
    (a poll interval, not a synchronisation sleep) and lets the pyzmq
    sockets in ``POKE`` process their commands; evpl.TimeoutError after
    ``timeout``."""
    tick = loop.call_every(0.002, _poke)
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
