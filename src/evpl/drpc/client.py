"""``evpl.drpc.Client``: one session to a drpc server over a datagram Bind.

::

    client = evpl.drpc.Client(loop, "udp", ("10.0.0.2", 31850))
    client.call(1, b"hello", lambda resp, err: print(bytes(resp)))   # asynchronous
    print(bytes(client.wait(client.call(1, b"again"))))              # scripts

    async def main():                                 # under evpl.aio.run(main())
        client = evpl.drpc.Client(asyncio.get_running_loop(), "udp", addr)
        resp = await client.acall(1, b"hello", timeout=1.0)

The client connects at once (calls made meanwhile wait for the session), keeps
``window`` requests outstanding and ``credits`` packets in flight, cuts
requests into packets and pulls multi-packet responses, retransmits after
``rto`` (go-back-N), paces its packets with Timely and the loop's pacing wheel
once the network shows congestion, and fails every outstanding call with
:class:`~evpl.drpc.PeerDead` when the server sends nothing for
``peer_timeout`` seconds (or at once with ``ConnectionRefused`` when the
server's host says the port is closed).

Its socket is a connected datagram Bind: only the server's packets reach it,
and one read batch reaches the protocol core in one Python call.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
from collections.abc import Callable
from typing import Any

from evpl._native.buffers import Buffer
from evpl._native.wheel import TimingWheel
from evpl.core.completion import Completion
from evpl.core.handler import Handler
from evpl.core.loop import engine_loop, running_aio_loop
from evpl.drpc._fast import Caller, Port
from evpl.drpc.cc import Timely
from evpl.drpc.session import (
    CallTimeout,
    ClientSession,
    PeerDead,
    SessionClosed,
    credits_used,
)
from evpl.drpc.wire import HEADER_SIZE
from evpl.errors import ConfigError, EvplError

__all__ = ["KERNEL_TIMELY", "Call", "Client", "loop_wheel", "message_allocator"]

# Timely for kernel-socket paths. eRPC's constants (T_low 50 us, T_high 1 ms,
# minimum RTT 2 us, 5 Mbit/s steps) assume a NIC driven from user space.
# Through the kernel and a Python peer the floor RTT is tens of microseconds
# (25 times eRPC's) and noisy, and a window of large datagrams alone takes a
# millisecond: the thresholds and the additive step are scaled up alike, and
# the floor rate keeps a paced 64 KB datagram within about one RTO.
KERNEL_TIMELY: dict[str, Any] = {"t_low": 500e-6, "t_high": 5e-3, "min_rtt": 50e-6,
                                 "add_rate": 100e6, "min_rate": 100e6}


class Call(Completion):
    """A call in flight (what :meth:`Client.call` returns without a
    callback): ``done``, ``result()`` (the response, or raises the call's
    error), ``exception()``, ``add_done_callback(fn)``."""

    __slots__ = ()

    def __call__(self, resp: Any, exc: BaseException | None) -> None:
        self._complete(resp, exc)

    def _what(self) -> str:
        return "the drpc call"

    def __repr__(self) -> str:
        state = "pending" if not self.done else ("failed" if self._exc else "done")
        return f"<drpc.Call {state}>"


def message_allocator(pool: Any) -> Callable[[int], Any]:
    """Where multi-packet messages are assembled: a pool Buffer for a large
    one (a quarter of a pool buffer or more, so it does not pin a whole
    buffer for a few kilobytes), a bytearray otherwise."""
    threshold = pool.buffer_size // 4
    allocate = pool.allocate

    def alloc(n: int) -> Any:
        return allocate(n) if n >= threshold else bytearray(n)

    return alloc


def kernel_rcvbuf(bind: Any) -> int:
    """The receive buffer of ``bind``'s socket as the kernel counts it (twice
    what was set, capped by ``net.core.rmem_max``) on ``udp`` and
    ``io_uring_udp``; 0 on other backends (no such kernel buffer)."""
    if bind.backend not in ("udp", "io_uring_udp"):
        return 0
    with socket.socket(fileno=os.dup(bind.fileno())) as sock:
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)


def _numeric(address: Any) -> Any:
    """``address`` with its host as a numeric IP (what received datagrams
    carry): a name is resolved once, now."""
    if not (isinstance(address, tuple) and len(address) >= 2):
        raise ConfigError(f"drpc addresses are (host, port) tuples, got {address!r}")
    try:
        info = socket.getaddrinfo(address[0], address[1], type=socket.SOCK_DGRAM)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot resolve {address[0]!r}: {exc.strerror}") from None
    return info[0][4][:2]


def loop_wheel(loop: Any) -> TimingWheel:
    """The pacing wheel every drpc client of ``loop`` shares (made on first use)."""
    wheel = getattr(loop, "_drpc_wheel", None)
    if wheel is None:
        wheel = TimingWheel(loop, slot_ns=2000, nslots=16384)     # 2 us slots, 32 ms
        loop._drpc_wheel = wheel
    return wheel


class _Handler(Port, Handler):
    """Read batches go to the session through ``Port.on_datagrams`` (C);
    while connecting, ``after`` is the client's ``_after_batch``."""

    __slots__ = ("client",)

    def __init__(self, client: Client) -> None:
        self.client = client

    def on_closed(self, bind: Any, error: EvplError | None) -> None:
        self.client._bind_closed(error)


class Client:
    """A drpc session to ``address`` over ``backend`` (``udp``,
    ``io_uring_udp``, ``xdp_udp``...).

    ``window``, ``credits`` (128; eRPC: 32), ``max_message``,
    ``max_datagram``: what the client asks for (the server may grant less;
    see ``stats()``). ``inflight_bytes`` (1 MiB) caps the credits the
    session uses at that many bytes of datagrams in flight: 16 of 64 KB
    datagrams, whose 2 MiB queued on the path would be delay that Timely
    reads as congestion (128 of 1472 bytes are 184 KB: no cap).
    ``rto``: retransmission timeout in seconds (eRPC: 5 ms); the session
    uses its smoothed RTT plus four deviations when that is longer, and
    doubles a request's timeout per timeout without progress. A timeout
    resends the first unanswered packet; the rest only if its answer shows
    the original lost (docs/drpc.md, loss recovery).
    ``peer_timeout``: seconds without a packet from the server, while calls
    are outstanding or while connecting, after which the session is declared
    dead and its calls fail with :class:`PeerDead`.
    ``cc``: Timely congestion control and pacing (True by default);
    ``link_rate`` (bits/s) is the rate of an uncongested session, and
    ``timely`` passes :class:`~evpl.drpc.cc.Timely` parameters (``t_low``,
    ``t_high``, ``min_rtt``...; defaults: ``KERNEL_TIMELY``, eRPC's
    thresholds scaled to kernel sockets). ``rcvbuf`` defaults to twice
    what ``credits`` packets of ``max_datagram`` bytes take (the kernel caps
    it at ``net.core.rmem_max``); the session uses no more credits than half
    the answers the buffer the kernel granted holds. ``local_address``: use an unconnected
    socket bound there (``Loop.bind``) and ``sendto`` instead of a connected
    one (``Loop.connect``), for a client that must use a given local address
    and port; packets from any other address are dropped. Other
    keyword options go to ``Loop.connect`` (or ``Loop.bind``).
    """

    def __init__(self, loop: Any, backend: str, address: Any, *, window: int = 8,
                 credits: int = 128, max_message: int = 8 << 20, max_datagram: int = 1472,
                 rto: float = 0.005, peer_timeout: float = 1.0, cc: bool = True,
                 link_rate: float = 10e9, timely: dict[str, Any] | None = None,
                 local_address: Any = None, inflight_bytes: int = 1 << 20,
                 **options: Any) -> None:
        loop = engine_loop(loop, "drpc")
        for name, v, lo, hi in (("window", window, 1, 1024), ("credits", credits, 1, 65535),
                                ("inflight_bytes", inflight_bytes, 1, 1 << 40),
                                ("max_message", max_message, 0, 0xFFFFFFFF),
                                ("max_datagram", max_datagram, HEADER_SIZE + 1, 65507)):
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                raise ConfigError(f"{name} must be an int in {lo}..{hi}, got {v!r}")
        if not rto > 0 or not peer_timeout > rto:
            raise ConfigError(f"need 0 < rto ({rto!r}) < peer_timeout ({peer_timeout!r})")
        self.loop = loop
        self.address = address
        self.rto = rto
        self.peer_timeout = peer_timeout
        self._now = loop.now_ns
        self.closed = False
        self._connecting = True
        self._wheel: TimingWheel | None = loop_wheel(loop) if cc else None
        timely_cc = Timely(link_rate, **{**KERNEL_TIMELY, **(timely or {})}) if cc else None
        # the socket first (nothing arrives before the loop runs), then the
        # session; its receive buffer holds a window's worth of answers
        # (each packet in flight can bring one back), else the kernel drops
        # them and the session waits for its retransmission timeout
        used = credits_used(credits, inflight_bytes, max_datagram)
        options.setdefault("rcvbuf", min(max(256 << 10, 2 * used * (max_datagram + 1024)),
                                         16 << 20))
        self._handler = _Handler(self)
        options.setdefault("gro", False)        # on at a batch of two packets (Port)
        if local_address is None:
            self.bind = loop.connect(backend, address, self._handler,
                                     max_datagram=max_datagram, **options)
            self._send = self.bind.send
            peer = None
        else:
            # an unconnected socket at a given local address: sent to with
            # sendto, and the session drops what comes from anywhere but the
            # server
            peer = _numeric(address)
            self.bind = loop.bind(backend, local_address, self._handler,
                                  max_datagram=max_datagram, **options)
            sendto = self.bind.sendto
            self._send = lambda data: sendto(data, peer)
        self.session = ClientSession(
            self._send, self._out, peer=peer, client_session=random.getrandbits(32) or 1,
            window=window, credits=credits, max_message=max_message, max_datagram=max_datagram,
            rto_ns=int(rto * 1e9), peer_timeout_ns=int(peer_timeout * 1e9), cc=timely_cc,
            alloc=message_allocator(loop.pool), inflight_bytes=inflight_bytes)
        self.session.rcvbuf = kernel_rcvbuf(self.bind)
        if local_address is None:
            self.session.send_bind = self.bind      # its send, called in C
        self._submit = self.session.submit
        self._handler.core = self.session
        self._handler.after = self._after_batch
        # ``call``'s common case in C; the rest comes back to the method
        self._caller = Caller()
        self._caller.core = self.session
        self._caller.slow = Client.call.__get__(self, Client)
        self.call = self._caller.call  # type: ignore[method-assign]
        self._started = self._now()
        self._connect_wait = max(rto, 0.01)
        self._send(self.session.connect_packet(self._started))
        self._connect_timer = loop.call_later(self._connect_wait, self._retry_connect)
        self._ticker: Any = None
        self._ticked = 0                    # when _tick last ran (ns)

    def __repr__(self) -> str:
        return (f"<drpc.Client {self.bind.backend} {self.address!r} "
                f"{self.session.state} outstanding={self.session.busy}>")

    # -- calls --

    def call(self, req_type: int, payload: Any = b"",
             callback: Callable[[Any, BaseException | None], Any] | None = None
             ) -> Call | None:
        """Send request ``payload`` (bytes-like, up to ``max_message``) of type
        ``req_type`` (0..255).

        With ``callback``: ``callback(response, None)`` on success (the
        response is an ``evpl.Buffer``; a ``bytearray`` for a multi-packet
        response under a quarter of a pool buffer), ``callback(None, error)``
        on failure;
        returns None. Without: returns a :class:`Call`. Calls beyond the
        window wait in order. The payload is kept (for retransmissions) until
        the call completes; a mutable one is copied first.

        (Each Client's ``call`` attribute is a ``_fast.Caller``'s: C for the
        common case, a callback and a ``bytes``/``Buffer`` payload on a
        busy or fresh session; everything else comes here.)"""
        if type(payload) is not bytes and type(payload) is not Buffer:
            payload = bytes(payload)
        call = None
        if callback is None:
            callback = call = Call()
        now = self._now()
        if self.session.busy == 0 and self.session.stale_session(now):
            self._reconnect(now)
        self._submit(req_type, payload, callback, now)
        if self._ticker is None and not self.closed:
            self._ticked = now
            self._ticker = self.loop.call_every(self.rto / 2, self._tick)
            self._caller.ticking = True
        return call

    def wait(self, call: Call, timeout: float | None = None) -> Any:
        """Run the loop until ``call`` completes; return its response or
        raise its error. For scripts and tests: not from a loop callback."""
        if not call.done:
            if self.loop.running:
                raise EvplError("Client.wait() runs the loop and cannot be called from a "
                                "loop callback; use a callback or Call.add_done_callback()")
            self.loop.run_until(lambda: call.done, timeout)
        return call.result()

    def acall(self, req_type: int, payload: Any = b"", *,
              timeout: float | None = None) -> asyncio.Future[Any]:
        """Send a request as :meth:`call` does and return an ``asyncio.Future``
        of its response, on evpl's asyncio loop (``evpl.aio``) whose engine
        is this client's Loop: ``resp = await client.acall(1, b"hi")``.

        The request leaves at once (as a grpc.aio call or a pyzmq send
        does), so ``await asyncio.gather(*(client.acall(...) ...))``
        pipelines up to the window. Errors are raised by the ``await``:
        :class:`~evpl.drpc.PeerDead` (the server went silent for
        ``peer_timeout``, or never answered the connect),
        :class:`~evpl.drpc.RemoteError` (no handler, or the handler raised),
        :class:`~evpl.drpc.SessionClosed` (the client was closed),
        ``ConnectionRefused`` (the server's port is closed) and, after
        ``timeout`` seconds, :class:`~evpl.drpc.CallTimeout` (a
        ``TimeoutError``; the session lives on).

        Cancelling the future (``task.cancel()``, ``asyncio.wait_for``, a
        timeout) abandons the call: one still waiting for a window slot is
        dropped unsent; one already sent keeps its slot until the server
        answers, and the answer is discarded. The handler may have run (or
        may still run) once, never twice: drpc is at-most-once.

        On any other event loop (plain asyncio, uvloop) nothing would drive
        this client's sockets: that raises ``EvplError`` at once."""
        aloop = running_aio_loop(self.loop, "Client.acall()", "call() and wait()")
        fut: asyncio.Future[Any] = aloop.create_future()
        timer: Any = None

        def done(resp: Any, exc: BaseException | None) -> None:
            if timer is not None:
                timer.cancel()
            if fut.done():
                return                      # cancelled or timed out: discarded
            if exc is None:
                fut.set_result(resp)
            else:
                fut.set_exception(exc)

        def abandoned(f: asyncio.Future[Any]) -> None:
            if f.cancelled():
                if timer is not None:
                    timer.cancel()
                self.session.withdraw(done)

        def expired() -> None:
            if not fut.done():
                self.session.withdraw(done)
                fut.set_exception(CallTimeout(
                    f"no response to the drpc call (type {req_type}) within {timeout:g} s"))

        self.call(req_type, payload, done)
        if not fut.done():
            fut.add_done_callback(abandoned)
            if timeout is not None:
                timer = self.loop.call_later(timeout, expired)
        return fut

    @property
    def connected(self) -> bool:
        """The session is established (False while connecting and once closed)."""
        return self.session.state == "connected"

    @property
    def outstanding(self) -> int:
        """Calls started and not completed (in the window)."""
        return self.session.busy

    def stats(self) -> dict[str, Any]:
        """The session's counters: RTT, Timely rate, credits, retransmissions,
        drops (see ``ClientSession.stats``)."""
        return self.session.stats()

    def close(self) -> None:
        """Close the session: outstanding calls fail with
        :class:`SessionClosed`; the server is told (one DISCONNECT packet)."""
        if self.closed:
            return
        connected = self.session.state == "connected"
        self._stop(SessionClosed("the drpc client was closed"))
        if not self.bind.closed:
            if connected:
                self._send(self.session.disconnect_packet())
            self.bind.finish()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals --

    def _out(self, item: Any, tag: Any, when_ns: int) -> None:
        # built and stamped when it leaves (the RTT must not count pacing)
        self._wheel.insert(when_ns, self.session.send_paced, item, tag)  # type: ignore[union-attr]

    def _tick(self) -> None:
        if self.bind.closed:            # on_closed will stop the client
            return
        now = self._now()
        period = self.rto * 5e8                 # ns: call_every's rto / 2
        late = now - self._ticked - period
        self._ticked = now
        if late > period:
            # this process did not run for a while (stopped, descheduled):
            # the server's silence in that time was not heard, and the
            # answers that came may still be unread, or the packets it
            # answers may have left only now
            self.session.pause(int(late))
        err = self.session.tick(now)
        if err is not None:
            self._stop(err)
        elif (self.session.busy == 0 and not self.session.backlog and not self._connecting
              and self._ticker is not None):
            self._ticker.cancel()
            self._ticker = None
            self._caller.ticking = False

    def _reconnect(self, now: int) -> None:
        """Idle past half the server's session timeout: connect again."""
        self.session.reconnect()
        self._connecting = True
        self._handler.after = self._after_batch
        self._started = now
        self._connect_wait = max(self.rto, 0.01)
        self._send(self.session.connect_packet(now))
        self._connect_timer = self.loop.call_later(self._connect_wait, self._retry_connect)

    def _retry_connect(self) -> None:
        # (a Bind closed in this iteration, by the port's refusal say, has
        # its on_closed still to come: it stops the client with the error)
        if self.closed or not self._connecting or self.bind.closed:
            return
        now = self._now()
        if now - self._started >= self.peer_timeout * 1e9:
            self._stop(PeerDead(f"no answer from the drpc server at {self.address!r} within "
                                f"{self.peer_timeout:g} s (peer_timeout)"))
            return
        self._send(self.session.connect_packet(now))
        self._connect_wait = min(self._connect_wait * 2, 0.25)
        self._connect_timer = self.loop.call_later(self._connect_wait, self._retry_connect)

    def _after_batch(self) -> None:
        """After a read batch while connecting: the answer may have come."""
        if self._connecting and self.session.state != "connecting":
            self._connect_done()

    def _connect_done(self) -> None:
        self._connecting = False
        self._handler.after = None
        self._connect_timer.cancel()
        if self.session.state == "closed":
            self._stop(self.session.error or SessionClosed("the session failed"))

    def _stop(self, error: BaseException) -> None:
        self.closed = True
        self._connecting = False
        self._handler.after = None
        self._connect_timer.cancel()
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
            self._caller.ticking = False
        self.session.fail(error)

    def _bind_closed(self, error: EvplError | None) -> None:
        if not self.closed:
            self._stop(error or SessionClosed("the drpc client's socket was closed"))
