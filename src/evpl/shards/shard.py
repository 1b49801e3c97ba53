"""The ``Shard`` a shard's ``main`` gets: its id, the group's size, its
loop, cross-shard messages and listeners shared with the other shards."""

from __future__ import annotations

import logging
import pickle
import socket
from collections import deque
from collections.abc import Callable
from typing import Any

from evpl._native import rings as _rings
from evpl.core import backends as _backends
from evpl.core.loop import Loop, _framer, _handler, _limits
from evpl.errors import Busy, ConfigError, ShardError

__all__ = ["Shard", "ShardFuture"]

_log = logging.getLogger("evpl")

#: The reply of another shard's ``on_request`` (native, see rings.pyx):
#: ``done()``, ``result()``, ``exception()``, ``add_done_callback(fn)``
#: (run on the shard's loop) and ``await``.
ShardFuture = _rings.ShardFuture


class Shard:
    """One shard: ``id`` (0..count-1), ``count``, ``loop``, ``cpu``.

    Set ``on_request = fn(src, payload)`` to answer ``submit_to`` from other
    shards (return a bytes-like reply, or a Future of one, e.g. from
    ``loop.offload``) and ``on_message = fn(src, payload)`` for ``send_to``.
    Payloads are bytes-like and copied once into the ring; with
    ``pickle=True`` any picklable object travels (and so does its reply).
    """

    def __init__(self, shard_id: int, count: int, loop: Loop, cpu: int | None,
                 ring_set: _rings.RingSet, efds: list[int],
                 sockets: dict[str, tuple[str, socket.socket]], max_backlog: int) -> None:
        self.id = shard_id
        self.count = count
        self.loop = loop
        self.cpu = cpu
        self._rs = ring_set
        self._sockets = sockets
        self._max_backlog = max_backlog
        self._backlog: list[deque[tuple[int, int, Any]]] = [deque() for _ in range(count)]
        self._down: set[int] = set()
        self._generation = [ring_set.generation(i) for i in range(count)]
        self.stopping = False
        self._at_stop: list[Callable[[], Any]] = []
        rings = self._rings = _rings.shard_rings(loop, ring_set, shard_id, efds)
        rings.on_change = self._change
        rings.on_room_cb = self._room
        rings.on_backlog = self._enqueue
        rings.on_result = self._result
        # messages and requests go straight to the native methods: no
        # Python frame per message (the handlers are called from the rings)
        self.send_to = rings.send_to  # type: ignore[method-assign]
        self.submit_to = rings.submit_to  # type: ignore[method-assign]
        self._change()

    # ---- sending --------------------------------------------------------

    def _check(self, k: int) -> None:
        if not isinstance(k, int) or not 0 <= k < self.count or k == self.id:
            raise ValueError(f"no other shard {k!r} (this is shard {self.id} of {self.count})")
        if k in self._down:
            raise ShardError(f"shard {k} is gone")

    def send_to(self, k: int, payload: Any, *, pickle: bool = False) -> None:
        """One-way message to shard ``k`` (its ``on_message``). Raises
        ``evpl.Busy`` if the ring to ``k`` is full, ``ShardError`` if ``k``
        is gone. (A started Shard replaces this method with the native one
        it describes: no Python frame per message.)"""
        self._rings.send_to(k, payload, pickle=pickle)

    def send_many(self, k: int, payloads: Any, *, pickle: bool = False) -> int:
        """One-way messages to shard ``k``, as many of ``payloads`` (a list)
        as its ring takes now, in one native call; returns how many were
        sent (the caller keeps the rest and retries, e.g. on the next loop
        iteration). Raises ``ShardError`` if ``k`` is gone."""
        self._check(k)
        kind = _rings.K_MESSAGE
        if pickle:
            payloads, kind = [_dumps(p) for p in payloads], kind | _rings.K_PICKLED
        if self._backlog[k]:
            return 0
        return self._rings.send_many(k, kind, payloads)

    @property
    def on_messages(self) -> Callable[[int, list[Any]], Any] | None:
        """``fn(src, payloads)``: every one-way message of one ring batch
        from shard ``src`` in one call (instead of ``on_message`` per
        message), as a handler's ``on_messages`` does for a Bind."""
        return self._rings.on_messages

    @on_messages.setter
    def on_messages(self, fn: Callable[[int, list[Any]], Any] | None) -> None:
        self._rings.on_messages = fn

    def submit_to(self, k: int, payload: Any, *, pickle: bool = False) -> ShardFuture:
        """Send a request to shard ``k``; the future gets the reply of its
        ``on_request``. A full ring delays the request (up to
        ``max_backlog`` of them per shard, then ``evpl.Busy``); a shard that
        dies fails every pending future to it with ``ShardError``. (A
        started Shard replaces this method with the native one it
        describes.)"""
        return self._rings.submit_to(k, payload, pickle=pickle)

    @property
    def on_request(self) -> Callable[[int, Any], Any] | None:
        """``fn(src, payload)`` answers ``submit_to`` from shard ``src``:
        return a bytes-like reply (None: empty), or a Future of one (e.g.
        from ``loop.offload``); an exception becomes the caller's
        ``ShardError``. Called from the rings: no evpl frame in between."""
        return self._rings.on_request

    @on_request.setter
    def on_request(self, fn: Callable[[int, Any], Any] | None) -> None:
        self._rings.on_request = fn

    @property
    def on_message(self) -> Callable[[int, Any], Any] | None:
        """``fn(src, payload)`` for each ``send_to`` message from shard
        ``src`` (unless ``on_messages`` is set). Called from the rings."""
        return self._rings.on_message

    @on_message.setter
    def on_message(self, fn: Callable[[int, Any], Any] | None) -> None:
        self._rings.on_message = fn

    def _enqueue(self, k: int, kind: int, rid: int, payload: Any, request: bool) -> None:
        """The rings could not send now (the ring to ``k`` is full, or
        records already wait for room, or ``k`` is gone): keep the record
        in order, or raise ``Busy`` for a request beyond ``max_backlog``."""
        backlog = self._backlog[k]
        if request:
            if len(backlog) >= self._max_backlog:
                if backlog:
                    raise Busy(f"{len(backlog)} requests to shard {k} wait for room in its ring")
                raise Busy(f"the ring to shard {k} is full")
        elif k in self._down:
            if self._rs.state(k) == _rings.GONE:
                return          # (a restarted shard may ask before we saw it come back)
            if not backlog and self._rings.send(k, kind, rid, payload):
                return
        backlog.append((kind, rid, bytes(payload)))
        self._rings.set_backlogged(k, True)

    def _room(self) -> None:
        """A ring we wait on has room: send what waits, in order."""
        for k, backlog in enumerate(self._backlog):
            send = self._rings.send
            if not backlog:
                continue
            while backlog:
                kind, rid, payload = backlog[0]
                if not send(k, kind, rid, payload):
                    break
                backlog.popleft()
            if not backlog:
                self._rings.set_backlogged(k, False)

    # ---- receiving --------------------------------------------------------

    def _result(self, src: int, rid: int, pickled: bool, result: Any) -> None:
        """A reply the rings do not send themselves: a Future (reply when
        it is done), a pickled request's value, a buffer other than bytes."""
        if hasattr(result, "add_done_callback") and hasattr(result, "exception"):
            result.add_done_callback(lambda f: self._reply_future(src, rid, pickled, f))
        else:
            self._reply_value(src, rid, pickled, result)

    def _reply_future(self, src: int, rid: int, pickled: bool, fut: Any) -> None:
        exc = fut.exception()
        if exc is not None:
            self._send_reply(src, _rings.K_ERROR, rid, _describe(exc))
        else:
            self._reply_value(src, rid, pickled, fut.result())

    def _reply_value(self, src: int, rid: int, pickled: bool, value: Any) -> None:
        try:
            if pickled:
                value, kind = _dumps(value), _rings.K_REPLY | _rings.K_PICKLED
            else:
                kind = _rings.K_REPLY
                if value is None:
                    value = b""
                memoryview(value)       # bytes-like, or a clear error for the caller
        except Exception as exc:
            self._send_reply(src, _rings.K_ERROR, rid,
                             _describe(ShardError(f"bad reply {type(value).__name__}: {exc}")))
            return
        self._send_reply(src, kind, rid, value)

    def _send_reply(self, k: int, kind: int, rid: int, payload: Any) -> None:
        if k in self._down or self._backlog[k] or not self._rings.send(k, kind, rid, payload):
            self._enqueue(k, kind, rid, payload, False)

    def _change(self) -> None:
        """A shard came or went (the parent says), or the group stops."""
        rs = self._rs
        if rs.stop_requested:
            self.stop()
        for k in range(self.count):
            if k == self.id:
                continue
            gone = rs.state(k) == _rings.GONE
            generation = rs.generation(k)
            if gone and k not in self._down:
                self._down.add(k)
                self._rings.set_down(k, True)
                self._backlog[k].clear()
                self._rings.set_backlogged(k, False)
                self._rings.fail_pending(k, ShardError(f"shard {k} is gone"))
            elif not gone and k in self._down and generation != self._generation[k]:
                self._down.discard(k)           # restarted
                self._rings.set_down(k, False)
            self._generation[k] = generation

    # ---- the rest -------------------------------------------------------

    def alive(self, k: int) -> bool:
        """Shard ``k`` is running as far as this shard knows."""
        return k == self.id or k not in self._down

    @property
    def pending(self) -> int:
        """Requests sent and not answered yet."""
        return len(self._rings.pending)

    def listen(self, name: str, handler: Any, *, framing: Any = None,
               **options: Any) -> Any:
        """Accept connections on the group's listener ``name`` (see
        ``evpl.shards.run(listen=...)``): every shard has its own
        SO_REUSEPORT socket of the group, so each accepts its own
        connections, and with ``steer=True`` the kernel picks the shard of
        the CPU that received the connection."""
        if name not in self._sockets:
            raise ConfigError(f"no listener {name!r} in this group "
                              f"(have: {', '.join(sorted(self._sockets)) or 'none'})")
        backend, sock = self._sockets.pop(name)
        info = _backends.get(backend, "stream")
        limits = _limits(options, framing is not None)
        factory, shared = _handler(handler)
        nodelay = bool(options.get("nodelay", True)) and sock.family != socket.AF_UNIX
        address = sock.getsockname()
        return _backends.native(info.name).listener(self.loop, sock.detach(), info.name,
                                                    factory, shared, _framer(framing), limits,
                                                    nodelay, address)

    def at_stop(self, fn: Callable[[], Any]) -> None:
        """Call ``fn()`` once this shard's loop has stopped (SIGTERM to the
        group, ``stop``, ``stop_group``) and before the loop closes: the
        place for a graceful shutdown that runs the loop again to finish
        what is in flight (``evpl.http.Server.shutdown``). The group
        SIGKILLs a shard still running ``grace`` seconds after it asked it
        to stop (``shards.run(..., grace=)``). Callbacks run in the order
        they were added; one that raises is logged and the others run."""
        self._at_stop.append(fn)

    def stop(self) -> None:
        """Stop this shard's loop: its process exits with status 0 (after
        its ``at_stop`` callbacks). Stopping twice is stopping once: a
        second request (another SIGTERM, the group's stop seen again when
        another shard exits) must not cut short an ``at_stop`` callback
        that runs the loop again."""
        if self.stopping:
            return
        self.stopping = True
        self.loop.stop()

    def stop_group(self) -> None:
        """Stop every shard of the group, this one included (each exits
        with status 0 after its current loop iteration)."""
        self._rings.stop_group()
        self.stop()

    def __repr__(self) -> str:
        return f"<evpl.Shard {self.id}/{self.count} cpu={self.cpu}>"


def _dumps(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def _describe(exc: BaseException) -> bytes:
    return f"{type(exc).__name__}: {exc}".encode()
