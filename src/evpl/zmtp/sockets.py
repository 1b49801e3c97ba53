"""ZeroMQ sockets on evpl's engine (specs 28-31 over ZMTP 3.1, spec 37).

A :class:`Socket` is one ZeroMQ socket: it binds and connects any number of
``tcp://``, ``ipc://`` and ``inproc://`` endpoints, keeps one *peer* per
connection, and routes messages between the application and its peers the
way its type says (round-robin, fair-queueing, identities, subscriptions).

The per-message path: the engine's ZMTP framer cuts whole multipart
messages, a read batch reaches the peer in one ``on_messages`` call,
``evpl._native.zmtp.split`` turns it into lists of frame Buffers (no copy)
and the socket hands the batch to the application's callback (or queues it
for ``recv_multipart``). Sending encodes a message in one native call and
queues it on the peer's Bind; the engine writes every queued message of an
iteration in one system call.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import itertools
import os
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import evpl
from evpl._native import zmtp as _nz
from evpl.errors import ConfigError, EvplError, ProtocolError
from evpl.zmtp import wire
from evpl.zmtp.mechanisms import AuthenticationError, Mechanism, make_mechanism

__all__ = [
    "NOBLOCK",
    "SNDMORE",
    "Again",
    "Event",
    "HostUnreachable",
    "Socket",
    "StateError",
    "ZMTPError",
    "ZapRequest",
]

NOBLOCK = 1
"""``flags`` for send/recv: never wait (raise :class:`Again` instead)."""
SNDMORE = 2
"""``flags`` for send: more frames of this message follow."""

SOCKET_TYPES = ("PAIR", "PUB", "SUB", "REQ", "REP", "DEALER", "ROUTER", "PULL", "PUSH",
                "XPUB", "XSUB")
COMPATIBLE = {
    "REQ": {"REP", "ROUTER"}, "REP": {"REQ", "DEALER"},
    "DEALER": {"REP", "DEALER", "ROUTER"}, "ROUTER": {"REQ", "DEALER", "ROUTER"},
    "PUB": {"SUB", "XSUB"}, "XPUB": {"SUB", "XSUB"}, "SUB": {"PUB", "XPUB"},
    "XSUB": {"PUB", "XPUB"}, "PUSH": {"PULL"}, "PULL": {"PUSH"}, "PAIR": {"PAIR"},
}
_CONFLATE_TYPES = {"PULL", "PUSH", "SUB", "PUB", "DEALER"}   # libzmq's list
_PROBE_TYPES = {"ROUTER", "DEALER", "REQ"}
_CAN_RECV = {"PAIR", "SUB", "REQ", "REP", "DEALER", "ROUTER", "PULL", "XPUB", "XSUB"}


class ZMTPError(EvplError):
    """Base of the errors a ZeroMQ socket raises."""


class Again(ZMTPError):
    """The operation would have to wait (no peer can take the message now,
    or nothing to receive); pyzmq's ``zmq.Again``."""


class StateError(ZMTPError):
    """The socket's state forbids this now (REQ sending twice, REP replying
    without a request); pyzmq's EFSM."""


class HostUnreachable(ZMTPError):
    """ROUTER with ``router_mandatory``: no peer has that identity."""


class Event(enum.IntEnum):
    """Monitor events (the values of libzmq's ZMQ_EVENT_* constants)."""

    CONNECTED = 1
    CONNECT_DELAYED = 2
    CONNECT_RETRIED = 4
    LISTENING = 8
    BIND_FAILED = 16
    ACCEPTED = 32
    CLOSED = 128
    DISCONNECTED = 512
    HANDSHAKE_FAILED_NO_DETAIL = 2048
    HANDSHAKE_SUCCEEDED = 4096
    HANDSHAKE_FAILED_PROTOCOL = 8192
    HANDSHAKE_FAILED_AUTH = 16384


# option name -> (default, check); times are in milliseconds, as in libzmq
_OPTIONS: dict[str, tuple[Any, Callable[[Any], bool]]] = {
    "sndhwm": (1000, lambda v: isinstance(v, int) and v >= 0),
    "rcvhwm": (1000, lambda v: isinstance(v, int) and v >= 0),
    "linger": (-1, lambda v: isinstance(v, int) and v >= -1),
    "reconnect_ivl": (100, lambda v: isinstance(v, int) and v >= -1),
    "reconnect_ivl_max": (0, lambda v: isinstance(v, int) and v >= 0),
    "heartbeat_ivl": (0, lambda v: isinstance(v, int) and v >= 0),
    "heartbeat_ttl": (0, lambda v: isinstance(v, int) and 0 <= v <= 6553500),
    "heartbeat_timeout": (-1, lambda v: isinstance(v, int) and v >= -1),
    "handshake_ivl": (30000, lambda v: isinstance(v, int) and v >= 0),
    "maxmsgsize": (-1, lambda v: isinstance(v, int) and v >= -1),
    "routing_id": (b"", lambda v: isinstance(v, bytes) and len(v) <= 255
                   and not v.startswith(b"\x00")),
    "router_mandatory": (False, lambda v: isinstance(v, bool)),
    "req_relaxed": (False, lambda v: isinstance(v, bool)),
    "req_correlate": (False, lambda v: isinstance(v, bool)),
    "xpub_verbose": (False, lambda v: isinstance(v, bool)),
    "xpub_verboser": (False, lambda v: isinstance(v, bool)),
    "xpub_manual": (False, lambda v: isinstance(v, bool)),
    "xpub_welcome_msg": (None, lambda v: v is None or isinstance(v, bytes)),
    "conflate": (False, lambda v: isinstance(v, bool)),
    "immediate": (False, lambda v: isinstance(v, bool)),
    "probe_router": (False, lambda v: isinstance(v, bool)),
    "router_handover": (False, lambda v: isinstance(v, bool)),
    "zap_domain": ("", lambda v: isinstance(v, str) and len(v.encode()) <= 255),
    "sndbuf": (1 << 20, lambda v: isinstance(v, int) and v > 0),
    "max_subscriptions": (1 << 16, lambda v: isinstance(v, int) and v > 0),
    "plain_server": (False, lambda v: isinstance(v, bool)),
    "plain_username": (None, lambda v: v is None or isinstance(v, bytes)),
    "plain_password": (None, lambda v: v is None or isinstance(v, bytes)),
    "curve_server": (False, lambda v: isinstance(v, bool)),
    "curve_publickey": (None, lambda v: v is None or isinstance(v, bytes | str)),
    "curve_secretkey": (None, lambda v: v is None or isinstance(v, bytes | str)),
    "curve_serverkey": (None, lambda v: v is None or isinstance(v, bytes | str)),
    "authenticator": (None, lambda v: v is None or callable(v)),
}
_ALIASES = {"identity": "routing_id"}


class ZapRequest(NamedTuple):
    """What an authenticator that takes a third argument is given about the
    peer (the fields of an RFC 27 ZAP request that evpl knows): the socket's
    ``zap_domain``, the peer's address (``"127.0.0.1"``; the socket path, or
    ``""``, for ipc), the mechanism and its credentials."""

    domain: str
    address: str
    mechanism: str
    credentials: tuple[bytes, ...]


def _takes_request(fn: Callable[..., Any]) -> bool:
    """Whether authenticator ``fn`` accepts a third positional argument
    (the :class:`ZapRequest`)."""
    try:
        inspect.signature(fn).bind(None, None, None)
    except (TypeError, ValueError):     # ValueError: no signature (some builtins)
        return False
    return True


class _Done:
    """What ``send`` returns when the message was queued at once: awaiting it
    finishes immediately (so ``await sock.send(...)`` reads as in pyzmq's
    asyncio API), and a caller that does not await pays nothing."""

    __slots__ = ()

    def __await__(self) -> Any:
        return iter(())

    def done(self) -> bool:
        return True


DONE = _Done()


class _Prefixes:
    """A set of subscription prefixes (with counts) and the distinct lengths
    they have: a topic matches if one of its prefixes of those lengths is in
    the set, so thousands of subscriptions cost one dict lookup per distinct
    length, not one comparison per subscription."""

    __slots__ = ("all", "counts", "lengths")

    def __init__(self) -> None:
        self.counts: dict[bytes, int] = {}
        self.lengths: list[int] = []
        self.all = False

    def __len__(self) -> int:
        return len(self.counts)

    def add(self, topic: bytes) -> bool:
        """Count a subscription; True if the prefix is new."""
        n = self.counts.get(topic, 0)
        self.counts[topic] = n + 1
        if n == 0:
            self._relength()
            return True
        return False

    def remove(self, topic: bytes) -> bool:
        """Drop one count; True if the prefix is gone."""
        n = self.counts.get(topic, 0)
        if n == 0:
            return False
        if n == 1:
            del self.counts[topic]
            self._relength()
            return True
        self.counts[topic] = n - 1
        return False

    def _relength(self) -> None:
        self.all = b"" in self.counts
        self.lengths = sorted({len(t) for t in self.counts})

    def match(self, topic: bytes) -> bool:
        if self.all:
            return True
        counts = self.counts
        n = len(topic)
        for ln in self.lengths:
            if ln > n:
                return False
            if topic[:ln] in counts:
                return True
        return False


def _parse_endpoint(endpoint: str) -> tuple[str, Any]:
    """``tcp://host:port`` -> ("tcp", (host, port)); ``ipc://path`` and
    ``inproc://name`` -> ("ipc", path). ``*`` as host binds every address,
    ``*`` or 0 as port picks a free one; ``ipc://@name`` is the abstract
    namespace; inproc is an abstract unix socket private to this process."""
    if not isinstance(endpoint, str) or "://" not in endpoint:
        raise ConfigError(f"endpoint must look like tcp://host:port, ipc://path or "
                          f"inproc://name, got {endpoint!r}")
    scheme, rest = endpoint.split("://", 1)
    if scheme == "tcp":
        host, sep, port = rest.rpartition(":")
        if not sep or not host:
            raise ConfigError(f"tcp endpoint needs host:port, got {endpoint!r}")
        if host == "*":
            host = "0.0.0.0"
        host = host.strip("[]")
        if port == "*":
            port = "0"
        if not port.isdigit() or int(port) > 65535:
            raise ConfigError(f"bad tcp port in {endpoint!r}")
        return "tcp", (host, int(port))
    if scheme == "ipc":
        if not rest:
            raise ConfigError("ipc endpoint needs a path")
        return "ipc", "\0" + rest[1:] if rest.startswith("@") else rest
    if scheme == "inproc":
        if not rest:
            raise ConfigError("inproc endpoint needs a name")
        return "ipc", f"\0evpl-inproc-{os.getpid()}-{rest}"
    raise ConfigError(f"unsupported transport {scheme!r} (tcp, ipc, inproc)")


_ids = itertools.count(1)


class _Peer(evpl.Handler):
    """One connection to a peer socket (a pipe, in libzmq's words): the
    greeting and handshake, then its messages both ways."""

    def __init__(self, sock: Socket, endpoint: str, connector: _Connector | None) -> None:
        self.sock = sock
        self.endpoint = endpoint
        self.connector = connector
        self.bind: evpl.Bind | None = None
        self.out: deque[Any] = deque()
        self.subs = _Prefixes()
        self.identity = b""
        self.connected = False
        self.manual: dict[bytes, int] = {}     # XPUB manual: the peer's own requests
        self.held: list[list[Any]] | None = None   # ROUTER: read while its identity is taken
        self._reset()

    def _reset(self) -> None:
        self.state = 0              # 0 greeting, 1 handshake, 2 ready, 3 closed
        self.greeting: wire.Greeting | None = None
        self.mech: Mechanism | None = None
        self.zmtp31 = True
        self.curve = False
        self.peer_type = ""
        self.props: dict[str, bytes] = {}
        self.ping_timer: Any = None
        self.hs_timer: Any = None
        self.ttl_timer: Any = None          # the peer's PING TTL, when it sent one
        self.ttl = 0.0
        self.last_rx = 0.0
        self.failure: str | None = None
        self.subs = _Prefixes()
        self.curve_frames: list[bytes] = []     # a CURVE message's frames so far

    @property
    def ready(self) -> bool:
        return self.state == 2

    def full(self) -> bool:
        b = self.bind
        if self.state == 2 and b is not None and not b.paused and not self.out:
            return False
        return len(self.out) >= self.sock._hwm_out and not self.sock._conflate_out

    # -- sending
    def put(self, frames: Sequence[Any], wire_: Any = None) -> None:
        """Send one message now, or queue its frames (the caller checked
        ``full``); they are encoded when they leave, so a message queued
        before a CURVE handshake is boxed like the rest. ``wire_``: its
        encoding when the caller has it (PUB encodes once for all peers)."""
        b = self.bind
        if self.state == 2 and b is not None and not b.paused and not self.out:
            if wire_ is None:
                wire_ = self.encode(frames)
            if type(wire_) is bytes:
                b.send(wire_)
            else:
                b.sendv(wire_)
        else:
            if self.sock._conflate_out:
                self.out.clear()        # conflate: only the last message waits
            self.out.append(frames)

    def put_env(self, env: bytes, frames: Sequence[Any]) -> None:
        """Send (or queue) a message whose envelope ``env`` is already in
        wire form (REQ's delimiter, a REP's received envelope)."""
        b = self.bind
        if self.state == 2 and b is not None and not b.paused and not self.out \
                and not self.curve:
            w = _nz.encode(frames, False, env)
            if type(w) is bytes:
                b.send(w)
            else:
                b.sendv(w)
        else:
            self.put(_unwire(env) + list(frames))

    def put_now(self, wire_: Any) -> None:
        b = self.bind
        if b is not None and not b.closed:
            if type(wire_) is bytes:
                b.send(wire_)
            else:
                b.sendv(wire_)

    def encode(self, frames: Sequence[Any]) -> Any:
        if self.curve:
            return self.mech.encode_frames(frames)  # type: ignore[union-attr]
        return _nz.encode(frames)

    def _flush(self) -> None:
        b = self.bind
        out = self.out
        while out and b is not None and not b.paused and self.state == 2:
            w = self.encode(out.popleft())
            if type(w) is bytes:
                b.send(w)
            else:
                b.sendv(w)
        if not out:
            if self.sock.closed:
                if b is not None and not b.closed:
                    b.finish()          # lingering: the last queued message left
                return
            self.sock._peer_writable(self)

    def _raw(self, data: bytes) -> None:
        if self.bind is not None and not self.bind.closed:
            self.bind.send(data)

    def command(self, data: bytes) -> None:
        """Send a command frame (wrapped in MESSAGE after a CURVE handshake)."""
        if self.curve and self.state == 2:
            self.put_now(self.mech.encode_frames([_body(data)], command=True))  # type: ignore
        else:
            self._raw(data)

    # -- engine callbacks
    def on_connected(self, bind: evpl.Bind) -> None:
        s = self.sock
        self.bind = bind
        self._reset()
        self.connected = True
        mech_name, as_server = s._mechanism
        props = {"Socket-Type": s.socket_type.encode()}
        if s._opts["routing_id"]:
            props["Identity"] = s._opts["routing_id"]
        opts = s._opts
        if opts["authenticator"] is not None:
            opts = dict(opts, authenticator=self._authenticator(mech_name))
        try:
            self.mech = make_mechanism(mech_name, props, as_server, opts)
        except ValueError as exc:
            self._fail(str(exc), Event.HANDSHAKE_FAILED_NO_DETAIL)
            return
        bind.send(wire.encode_greeting(mech_name, as_server))
        s._event(Event.CONNECTED if self.connector else Event.ACCEPTED, self.endpoint,
                 bind.fileno())
        try:
            start = self.mech.start()
        except AuthenticationError as exc:      # NULL with a ZAP domain, refused
            self._fail(str(exc), Event.HANDSHAKE_FAILED_AUTH, tell=True)
            return
        for c in start:
            bind.send(c)
        hs = s._opts["handshake_ivl"]
        if hs:
            self.hs_timer = s.loop.call_later(hs / 1000, self._handshake_timeout)

    def _authenticator(self, mech_name: str) -> Callable[[str, tuple[bytes, ...]], bool] | None:
        """The socket's authenticator as the mechanism calls it: given a
        :class:`ZapRequest` (domain, peer address) when it takes a third
        argument. NULL asks it only when ``zap_domain`` is set, as libzmq
        asks ZAP."""
        s = self.sock
        fn = s._opts["authenticator"]
        domain = s._opts["zap_domain"]
        if mech_name == "NULL" and not domain:
            return None
        if not _takes_request(fn):
            return fn  # type: ignore[no-any-return]
        peer = self.bind.peer_address if self.bind is not None else None
        address = peer[0] if isinstance(peer, tuple) else (peer or "")
        if isinstance(address, bytes):
            address = address.decode("utf-8", "replace")

        def ask(mechanism: str, credentials: tuple[bytes, ...]) -> bool:
            return bool(fn(mechanism, credentials,
                           ZapRequest(domain, str(address), mechanism, credentials)))
        return ask

    def _handshake_timeout(self) -> None:
        self.hs_timer = None
        if self.state < 2:
            self._fail("handshake timed out", Event.HANDSHAKE_FAILED_NO_DETAIL)

    def _fail(self, reason: str, event: Event, tell: bool = False) -> None:
        """The handshake or the stream failed: report, say why (ERROR) when
        the peer deserves an answer, and close."""
        if self.state == 3:
            return
        self.failure = reason
        if event is not Event.DISCONNECTED:
            self.sock._event(event, self.endpoint, reason)
        b = self.bind
        if b is not None and not b.closed:
            if tell:
                b.send(wire.error(reason))
                b.finish()
            else:
                b.close()

    def on_messages(self, bind: evpl.Bind, units: list[Any]) -> None:
        if self.ttl_timer is not None:
            self.last_rx = self.sock.loop.now()
        if self.state == 2:
            if self.curve:
                self._curve_units(units)
                return
            msgs: list[Any] = []
            cmds: list[Any] = []
            sock = self.sock
            sock._split(units, msgs, cmds)
            if cmds:
                self._commands(cmds)
            if msgs and self.state == 2:
                sock._incoming(self, msgs)
            return
        i = 0
        n = len(units)
        try:
            while i < n and self.state < 2:
                self._handshake(units[i])
                i += 1
        except (ProtocolError, ValueError) as exc:
            auth = isinstance(exc, AuthenticationError)
            self._fail(str(exc), Event.HANDSHAKE_FAILED_AUTH if auth
                       else Event.HANDSHAKE_FAILED_PROTOCOL,
                       tell=auth and self.mech is not None and self.mech.as_server)
            return
        if i < n and self.state == 2:
            self.on_messages(bind, units[i:] if i else units)

    def _handshake(self, unit: Any) -> None:
        data = bytes(unit)
        if self.state == 0:
            if data[0] != 0xFF:
                raise ProtocolError("expected a ZMTP greeting")
            g = wire.parse_greeting(data)
            mech_name = self.sock._mechanism[0]
            if g.mechanism != mech_name:
                raise ProtocolError(f"peer speaks {g.mechanism}, this socket {mech_name}")
            self.greeting = g
            self.zmtp31 = g.zmtp31
            self.state = 1
            return
        if data[0] == 0xFF or not data[0] & wire.FLAG_COMMAND:
            raise ProtocolError("expected a handshake command")
        cmd = wire.parse_command(_body(data))
        mech = self.mech
        assert mech is not None
        for r in mech.on_command(cmd):
            self._raw(r)
        if mech.done:
            self._ready(mech)

    def _ready(self, mech: Mechanism) -> None:
        props = {k.lower(): v for k, v in mech.peer_props.items()}
        ptype = props.get("socket-type", b"").decode("ascii", "replace")
        s = self.sock
        if ptype not in COMPATIBLE[s.socket_type]:
            raise ProtocolError(f"{s.socket_type} socket cannot talk to a {ptype or '?'} peer")
        self.peer_type = ptype
        self.props = props
        self.curve = mech.encrypts
        self.state = 2
        if self.hs_timer is not None:
            self.hs_timer.cancel()
            self.hs_timer = None
        hb = s._opts["heartbeat_ivl"]
        if hb:
            self.ping_timer = s.loop.call_every(hb / 1000, self._ping)
        if self.connector is not None:
            self.connector.succeeded()
        if s._opts["probe_router"] and s.socket_type in _PROBE_TYPES:
            self.put_now(self.encode([b""]))   # an empty message says "a new peer"
        s._attach(self)
        s._event(Event.HANDSHAKE_SUCCEEDED, self.endpoint, ptype)
        if self.state == 2:
            self._flush()

    def _ping(self) -> None:
        if self.state == 2 and self.bind is not None and not self.bind.paused:
            self.command(wire.ping(self.sock._opts["heartbeat_ttl"] / 1000))

    def _commands(self, cmds: list[Any]) -> None:
        """Commands after the handshake, in order."""
        try:
            for unit in cmds:
                data = bytes(unit)
                if data[0] == 0xFF:
                    raise ProtocolError("a second greeting")
                self._command(wire.parse_command(_body(data)))
        except ProtocolError as exc:
            self._fail(str(exc), Event.HANDSHAKE_FAILED_PROTOCOL)

    def _curve_units(self, units: list[Any]) -> None:
        """After a CURVE handshake every frame is a MESSAGE (libzmq sends
        them as data frames, MORE as in the message): open each, gather the
        frames of a message, run the commands that travel inside."""
        msgs: list[list[Any]] = []
        frames = self.curve_frames
        mech = self.mech
        try:
            for unit in units:
                data = bytes(unit)
                if data[0] == 0xFF:
                    raise ProtocolError("a second greeting")
                if data[0] & wire.FLAG_COMMAND:
                    bodies = [_body(data)]
                else:
                    bodies = [bytes(f) for f in _nz.frames(unit)]
                for body in bodies:
                    cmd = wire.parse_command(body)
                    if cmd.name != "MESSAGE":
                        self._command(cmd)
                        continue
                    flags, frame = mech.decode_frame(cmd.data)  # type: ignore[union-attr]
                    if flags & 2:
                        if frames:
                            raise ProtocolError("CURVE command inside a message")
                        self._command(wire.parse_command(frame))
                        continue
                    frames.append(frame)
                    if len(frames) > 65536:
                        raise ProtocolError("CURVE message of more than 65536 frames")
                    if not flags & 1:
                        msgs.append(frames)
                        frames = self.curve_frames = []
        except ProtocolError as exc:
            self._fail(str(exc), Event.HANDSHAKE_FAILED_PROTOCOL)
            return
        if msgs and self.state == 2:
            s = self.sock
            s._incoming(self, [_env_split(m) for m in msgs] if s._split is _nz.split_env
                        else msgs)

    def _command(self, cmd: wire.Command) -> None:
        name = cmd.name
        if name == "PING":
            if len(cmd.data) < 2:
                raise ProtocolError("malformed PING")
            ttl = int.from_bytes(cmd.data[:2], "big") / 10
            if ttl and ttl != self.ttl:
                self._watch_ttl(ttl)
            b = self.bind
            if b is not None and not b.paused:       # a PING flood gets no PONG flood
                self.command(wire.pong(cmd.data[2:18]))
        elif name == "PONG":
            pass
        elif name in ("SUBSCRIBE", "CANCEL"):
            self.sock._subscription(self, name == "SUBSCRIBE", cmd.data)
        elif name == "ERROR":
            d = cmd.data
            raise ProtocolError("peer sent ERROR: " + d[1:1 + d[0]].decode("utf-8", "replace")
                                if d else "peer sent ERROR")
        else:
            raise ProtocolError(f"unexpected command {name!r}")

    def _watch_ttl(self, ttl: float) -> None:
        """The peer's PING says: no traffic for ``ttl`` seconds means it is
        gone (spec 37). A timer checks at a tenth of it."""
        loop = self.sock.loop
        self.ttl = ttl
        self.last_rx = loop.now()
        if self.ttl_timer is not None:
            self.ttl_timer.cancel()
        self.ttl_timer = loop.call_every(max(ttl / 10, 0.01), self._check_ttl)

    def _check_ttl(self) -> None:
        if self.sock.loop.now() - self.last_rx > self.ttl:
            self.failure = f"heartbeat TTL: nothing received for {self.ttl:g} s"
            self._fail(self.failure, Event.DISCONNECTED)

    def on_paused(self, bind: evpl.Bind) -> None:
        pass

    def on_writable(self, bind: evpl.Bind) -> None:
        self._flush()

    def on_closed(self, bind: evpl.Bind, error: EvplError | None) -> None:
        was = self.state
        self.state = 3
        for t in (self.ping_timer, self.hs_timer, self.ttl_timer):
            if t is not None:
                t.cancel()
        self.ping_timer = self.hs_timer = self.ttl_timer = None
        s = self.sock
        if 0 <= was < 2 and self.failure is None and error is not None and self.connected:
            s._event(Event.HANDSHAKE_FAILED_PROTOCOL, self.endpoint, str(error))
        if isinstance(error, evpl.TimeoutError) and s._opts["heartbeat_ivl"]:
            self.failure = f"heartbeat timeout: {error.strerror}"
        if self.connected:
            s._event(Event.DISCONNECTED, self.endpoint, self.failure or
                     (str(error) if error else None))
        s._detach(self)
        self.bind = None
        self.connected = False
        if self.connector is not None:
            self.connector.lost(error)


def _unwire(env: bytes) -> list[bytes]:
    """The frames of an envelope in wire form."""
    out = []
    i = 0
    while i < len(env):
        if env[i] & wire.FLAG_LONG:
            n = int.from_bytes(env[i + 1:i + 9], "big")
            h = 9
        else:
            n = env[i + 1]
            h = 2
        out.append(env[i + h:i + h + n])
        i += h + n
    return out


def _env_wire(frames: Sequence[Any]) -> bytes:
    """Envelope frames in wire form, each with MORE."""
    out = []
    for f in frames:
        f = bytes(f)
        n = len(f)
        out.append((bytes((1, n)) if n < 256 else b"\x03" + n.to_bytes(8, "big")) + f)
    return b"".join(out)


def _env_split(m: list[Any]) -> tuple[bytes | None, list[Any]]:
    """``split_env``'s form of a message already cut into frames (CURVE)."""
    for i in range(len(m) - 1):
        if len(m[i]) == 0:
            return _env_wire(m[:i + 1]), m[i + 1:]
    return None, m


def _body(data: bytes) -> bytes:
    return data[9:] if data[0] & wire.FLAG_LONG else data[2:]


class _Connector:
    """An endpoint this socket connects to: one peer that reconnects with
    exponential backoff (``reconnect_ivl`` doubling up to
    ``reconnect_ivl_max``) for as long as the socket keeps the endpoint."""

    def __init__(self, sock: Socket, endpoint: str, kind: str, address: Any) -> None:
        self.sock = sock
        self.endpoint = endpoint
        self.kind = kind
        self.address = address
        self.peer = _Peer(sock, endpoint, self)
        self.ivl = sock._opts["reconnect_ivl"]
        self.timer: Any = None
        self.active = True

    def start(self) -> None:
        self.timer = None
        if not self.active:
            return
        s = self.sock
        try:
            s.loop.connect(s._backend(self.kind), self.address, self.peer,
                           framing=s._framing(), **s._bind_options())
        except EvplError as exc:
            self.lost(exc)

    def succeeded(self) -> None:
        self.ivl = self.sock._opts["reconnect_ivl"]

    def lost(self, error: Any) -> None:
        s = self.sock
        if not self.active or s.closed:
            return
        base = s._opts["reconnect_ivl"]
        if base < 0:
            return                      # reconnection switched off
        delay = self.ivl
        ivl_max = s._opts["reconnect_ivl_max"]
        if ivl_max > base:
            self.ivl = min(self.ivl * 2, ivl_max)
        s._event(Event.CONNECT_RETRIED, self.endpoint, delay)
        self.timer = s.loop.call_later(delay / 1000, self.start)

    def stop(self) -> None:
        self.active = False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        b = self.peer.bind
        if b is not None and not b.closed:
            b.close()


class Socket:
    """A ZeroMQ socket of ``socket_type`` on ``loop`` (see docs/zmtp.md).

    ``on_message(frames)`` is called with each received message (a list of
    frame Buffers); ``on_messages(messages)`` with every message of one
    read batch (the fast path); without either, messages queue (up to
    ``rcvhwm``, then the peers are held back by TCP) for
    ``recv_multipart()``. ``backend`` picks the engine I/O path
    (``"epoll"`` or ``"io_uring"``). Options are keyword arguments or
    attributes with libzmq's names (``sock.sndhwm = 1000``; times in ms).
    """

    def __init__(self, loop: evpl.Loop, socket_type: str, *,
                 on_message: Callable[[list[Any]], Any] | None = None,
                 on_messages: Callable[[list[list[Any]]], Any] | None = None,
                 backend: str = "epoll", **options: Any) -> None:
        st = socket_type.upper() if isinstance(socket_type, str) else socket_type
        if st not in SOCKET_TYPES:
            raise ConfigError(f"unknown socket type {socket_type!r}; one of {SOCKET_TYPES}")
        if backend not in ("epoll", "io_uring"):
            raise ConfigError(f"backend must be 'epoll' or 'io_uring', got {backend!r}")
        self._opts = {k: v[0] for k, v in _OPTIONS.items()}
        self.loop = loop
        self.socket_type = st
        self.backend = backend
        self.on_message = on_message
        self.on_messages = on_messages
        self.closed = False
        self.last_endpoint = ""
        self._peers: list[_Peer] = []           # handshaken, in attach order
        self._rr = 0
        self._by_id: dict[bytes, _Peer] = {}
        self._listeners: dict[str, Any] = {}
        self._connectors: dict[str, _Connector] = {}
        self._accepted: set[_Peer] = set()
        self._monitor: Callable[[Event, str, Any], Any] | None = None
        self._rxq: deque[list[Any]] = deque()
        self._rx_frames: deque[Any] = deque()
        self._waiters: deque[asyncio.Future[Any]] = deque()
        self._send_waiters: deque[tuple[asyncio.Future[Any], list[Any]]] = deque()
        self._rx_paused = False
        self._tx_parts: list[Any] = []
        self._subs = _Prefixes()                # SUB/XSUB: what this socket wants
        self._xpub_seen = _Prefixes()           # XPUB: subscriptions across peers
        # REQ/REP state
        self._req_peer: _Peer | None = None
        self._req_id = 0
        self._rep_queue: deque[tuple[_Peer, bytes, list[Any]]] = deque()
        self._rep_current: tuple[_Peer, bytes] | None = None
        self._rep_delivering = False
        self._hwm_out = 1000
        self._conflate_in = self._conflate_out = False
        self._conflated: dict[_Peer, list[Any]] = {}    # conflate: each peer's last message
        self._pending_ids: list[_Peer] = []     # ROUTER: peers whose identity is taken
        # XPUB manual: the peer of each queued message (None: not a subscription)
        self._sub_from: deque[_Peer | None] = deque()
        self._last_sub_peer: _Peer | None = None
        # the per-message path, chosen once: REQ and REP cut the envelope
        # natively (split_env) and have their own receive step
        self._kind = 1 if st == "REQ" else 2 if st == "REP" else 0
        self._split = _nz.split_env if self._kind else _nz.split
        self._incoming = (self._incoming_req if st == "REQ" else
                          self._incoming_rep if st == "REP" else self._incoming_any)
        self._req_relaxed = self._req_correlate = False
        self._req_env = b""
        for k, v in options.items():
            self.set(k, v)

    # -- options (each is also a property: see _option below)
    def set(self, name: str, value: Any) -> None:
        """Set option ``name`` (libzmq's name, lower case; ``identity`` is
        ``routing_id``, ``hwm`` both HWMs); checked when given."""
        key = _ALIASES.get(name, name)
        if key == "hwm":
            self.set("sndhwm", value)
            self.set("rcvhwm", value)
            return
        if key not in _OPTIONS:
            raise ConfigError(f"unknown option {name!r}; one of {sorted(_OPTIONS)}")
        if isinstance(value, str) and key in ("routing_id", "plain_username", "plain_password",
                                              "xpub_welcome_msg"):
            value = value.encode()
        if isinstance(value, bytes) and key == "zap_domain":
            value = value.decode("utf-8", "replace")
        if not _OPTIONS[key][1](value):
            raise ConfigError(f"bad value for option {name}: {value!r}")
        self._opts[key] = value
        if key == "sndhwm":
            self._hwm_out = value or (1 << 62)
        elif key == "req_relaxed":
            self._req_relaxed = value
        elif key == "req_correlate":
            self._req_correlate = value
        elif key == "conflate":
            on = value and self.socket_type in _CONFLATE_TYPES
            self._conflate_in = on and self.socket_type in _CAN_RECV
            self._conflate_out = on and self.socket_type not in ("PULL", "SUB")

    def get(self, name: str) -> Any:
        """The value of option ``name``."""
        key = _ALIASES.get(name, name)
        if key not in _OPTIONS:
            raise ConfigError(f"unknown option {name!r}")
        return self._opts[key]

    @property
    def _mechanism(self) -> tuple[str, bool]:
        o = self._opts
        if o["curve_server"] or o["curve_serverkey"] is not None:
            return "CURVE", o["curve_server"]
        if o["plain_server"] or o["plain_username"] is not None:
            return "PLAIN", o["plain_server"]
        return "NULL", False

    def _backend(self, kind: str) -> str:
        io = "io_uring_" if self.backend == "io_uring" else ""
        return io + ("tcp" if kind == "tcp" else "unix")

    def _framing(self) -> evpl.Framer:
        m = self._opts["maxmsgsize"]
        return evpl.framing.zmtp(max_message=m if m > 0 else None)

    def _bind_options(self) -> dict[str, Any]:
        o = self._opts
        opts: dict[str, Any] = {"high_water": o["sndbuf"]}
        if o["heartbeat_ivl"]:
            t = o["heartbeat_timeout"]
            opts["idle_timeout"] = (t if t >= 0 else o["heartbeat_ivl"]) / 1000
        return opts

    def monitor(self, fn: Callable[[Event, str, Any], Any] | None) -> None:
        """Call ``fn(event, endpoint, detail)`` for each life-cycle event
        (``Event``: connected, accepted, handshake succeeded/failed with the
        reason, disconnected, connect retried with the delay...); ``None``
        stops it."""
        self._monitor = fn

    def _event(self, event: Event, endpoint: str, detail: Any) -> None:
        if self._monitor is not None:
            self._monitor(event, endpoint, detail)

    # -- endpoints
    def bind(self, endpoint: str) -> str:
        """Listen on ``endpoint``; returns the endpoint as bound (with the
        port chosen for ``tcp://host:0`` or ``tcp://host:*``), also in
        ``last_endpoint``."""
        self._check_open()
        kind, addr = _parse_endpoint(endpoint)
        try:
            lst = self.loop.listen(self._backend(kind), addr, self._accept,
                                   framing=self._framing(), **self._bind_options())
        except EvplError as exc:
            self._event(Event.BIND_FAILED, endpoint, str(exc))
            raise
        if kind == "tcp":
            host, port = lst.address[0], lst.address[1]
            real = f"tcp://{host}:{port}" if ":" not in host else f"tcp://[{host}]:{port}"
        else:
            real = endpoint
        self._listeners[real] = lst
        self.last_endpoint = real
        self._event(Event.LISTENING, real, None)
        return real

    def _accept(self) -> _Peer:
        p = _Peer(self, self.last_endpoint, None)
        self._accepted.add(p)
        return p

    def unbind(self, endpoint: str) -> None:
        """Stop listening on ``endpoint`` (connections already made stay)."""
        lst = self._listeners.pop(endpoint, None)
        if lst is None:
            raise ConfigError(f"not bound to {endpoint!r}")
        lst.close()

    def connect(self, endpoint: str) -> None:
        """Connect to ``endpoint`` (and keep reconnecting to it). Messages
        for it queue (up to ``sndhwm``) until the connection is up."""
        self._check_open()
        kind, addr = _parse_endpoint(endpoint)
        if endpoint in self._connectors:
            raise ConfigError(f"already connected to {endpoint!r}")
        c = _Connector(self, endpoint, kind, addr)
        self._connectors[endpoint] = c
        if (self.socket_type in ("PUSH", "DEALER", "REQ", "PAIR", "XSUB")
                and not self._opts["immediate"]):
            self._peers.append(c.peer)          # messages may queue before it is up
        c.start()

    def disconnect(self, endpoint: str) -> None:
        """Stop connecting to ``endpoint`` and close its connection."""
        c = self._connectors.pop(endpoint, None)
        if c is None:
            raise ConfigError(f"not connected to {endpoint!r}")
        c.stop()
        self._drop_peer(c.peer)

    def close(self, linger: int | None = None) -> None:
        """Close the socket: listeners at once; each connection after its
        queued messages left (``linger`` ms at most; -1 waits as long as it
        takes, 0 drops them)."""
        if self.closed:
            return
        self.closed = True
        ln = self._opts["linger"] if linger is None else linger
        for lst in self._listeners.values():
            lst.close()
        self._listeners.clear()
        peers = [c.peer for c in self._connectors.values()] + list(self._accepted)
        for c in self._connectors.values():
            c.active = False
            if c.timer is not None:
                c.timer.cancel()
        binds = []
        for p in peers:
            b = p.bind
            if b is None or b.closed:
                continue
            if ln == 0 or p.state != 2:
                b.close()
                continue
            p._flush()                  # finishes the Bind once its queue left
            binds.append(b)
        if binds and ln > 0:
            self.loop.call_later(ln / 1000, _close_all, binds)
        for fut in self._waiters:
            if not fut.done():
                fut.set_exception(ZMTPError("socket closed"))
        self._waiters.clear()
        for fut, _ in self._send_waiters:
            if not fut.done():
                fut.set_exception(ZMTPError("socket closed"))
        self._send_waiters.clear()
        self._event(Event.CLOSED, "", None)

    def _check_open(self) -> None:
        if self.closed:
            raise ZMTPError("socket is closed")

    # -- peers
    def _attach(self, p: _Peer) -> None:
        st = self.socket_type
        if st == "ROUTER" and not self._identify(p):
            return
        if p not in self._peers:
            if st == "PAIR" and any(q.ready for q in self._peers if q is not p):
                p._fail("PAIR already has a peer", Event.HANDSHAKE_FAILED_PROTOCOL)
                return
            self._peers.append(p)
        if st in ("SUB", "XSUB"):
            for t in self._subs.counts:
                p.command(wire.subscribe(t, p.zmtp31))
        elif st == "XPUB" and self._opts["xpub_welcome_msg"]:
            # sent whatever the peer subscribed: a SUB that subscribed to it
            # before connecting gets it (libzmq's ZMQ_XPUB_WELCOME_MSG)
            p.put_now(p.encode([self._opts["xpub_welcome_msg"]]))

    def _identify(self, p: _Peer) -> bool:
        """ROUTER: give ``p`` its identity (the peer's routing_id, else a
        generated one). An identity another peer holds: with
        ``router_handover`` the new peer takes it and the old connection is
        closed; without, the new peer waits, not read, until the identity is
        free (libzmq keeps it anonymous the same way)."""
        ident = p.props.get("identity", b"")
        if not ident:
            ident = b"\x00" + next(_ids).to_bytes(4, "big")
        else:
            old = self._by_id.get(ident)
            if old is not None and old is not p:
                if not self._opts["router_handover"]:
                    if p not in self._pending_ids:
                        self._pending_ids.append(p)
                        p.held = []
                        if p.bind is not None:
                            p.bind.pause_reading()
                    return False
                old.identity = b""
                del self._by_id[ident]
                old.failure = "identity taken over by a new peer (router_handover)"
                if old.bind is not None and not old.bind.closed:
                    old.bind.close()
        p.identity = ident
        self._by_id[ident] = p
        return True

    def _detach(self, p: _Peer) -> None:
        self._accepted.discard(p)
        if p in self._pending_ids:
            self._pending_ids.remove(p)
        freed = p.identity if p.identity and self._by_id.get(p.identity) is p else b""
        if p.connector is None or not p.connector.active or self._opts["immediate"]:
            self._drop_peer(p)
        else:
            if freed:
                self._by_id.pop(freed, None)
            self._unsubscribe_peer(p)
        if freed:
            for q in self._pending_ids:
                if q.props.get("identity") == freed and q.state == 2:
                    self._pending_ids.remove(q)
                    held, q.held = q.held, None
                    self._attach(q)
                    if held:
                        self._incoming(q, held)
                    if q.bind is not None and not self._rx_paused:
                        q.bind.resume_reading()
                    break
        if self._req_peer is p:
            self._req_peer = None
        if self._rep_queue:
            self._rep_queue = deque(r for r in self._rep_queue if r[0] is not p)

    def _drop_peer(self, p: _Peer) -> None:
        if p in self._peers:
            self._peers.remove(p)
        if p.identity and self._by_id.get(p.identity) is p:
            del self._by_id[p.identity]
        self._unsubscribe_peer(p)
        p.out.clear()

    def _unsubscribe_peer(self, p: _Peer) -> None:
        if self.socket_type == "XPUB":
            if self._opts["xpub_manual"]:
                # every subscription the peer asked for is reported cancelled
                for t, n in list(p.manual.items()):
                    for _ in range(n):
                        self._incoming_sub(p, b"\x00" + t)
            else:
                for t, n in list(p.subs.counts.items()):
                    for _ in range(n):
                        if self._xpub_seen.remove(t) or self._opts["xpub_verboser"]:
                            self._incoming_sub(p, b"\x00" + t)
        p.subs = _Prefixes()
        p.manual = {}

    def _peer_writable(self, p: _Peer) -> None:
        while self._send_waiters:
            fut, frames = self._send_waiters[0]
            if fut.done():
                self._send_waiters.popleft()
                continue
            try:
                self.send_multipart(frames, NOBLOCK)
            except Again:
                return
            except Exception as exc:
                self._send_waiters.popleft()
                fut.set_exception(exc)
                continue
            self._send_waiters.popleft()
            fut.set_result(None)

    # -- subscriptions
    def _subscription(self, p: _Peer, on: bool, topic: bytes) -> None:
        st = self.socket_type
        if st not in ("PUB", "XPUB"):
            return                          # other types ignore them (spec 37)
        opts = self._opts
        if st == "XPUB" and opts["xpub_manual"]:
            # manual: nothing is applied; the application decides (subscribe()
            # after receiving the request applies to the peer that sent it)
            m = p.manual
            if on:
                if len(m) >= opts["max_subscriptions"] and topic not in m:
                    raise ProtocolError("too many subscriptions from one peer")
                m[topic] = m.get(topic, 0) + 1
            elif m.get(topic, 0) > 1:
                m[topic] -= 1
            else:
                m.pop(topic, None)
            self._incoming_sub(p, (b"\x01" if on else b"\x00") + topic)
            return
        if on:
            if len(p.subs) >= opts["max_subscriptions"] and topic not in p.subs.counts:
                raise ProtocolError("too many subscriptions from one peer")
            p.subs.add(topic)
            if st == "XPUB" and (self._xpub_seen.add(topic) or opts["xpub_verbose"]):
                self._incoming_sub(p, b"\x01" + topic)
        elif st == "XPUB":
            if not p.subs.counts.get(topic):
                return                      # the peer had no such subscription
            p.subs.remove(topic)
            # xpub_verbose reports every subscribe; a cancel only when the last
            # one goes, every one with xpub_verboser (libzmq's ZMQ_XPUB_VERBOSER)
            if self._xpub_seen.remove(topic) or opts["xpub_verboser"]:
                self._incoming_sub(p, b"\x00" + topic)
        else:
            p.subs.remove(topic)

    def _incoming_sub(self, p: _Peer, msg: bytes) -> None:
        if self._opts["xpub_manual"]:
            if self.on_message is None and self.on_messages is None:
                self._sub_from.append(p)    # recv() sets the peer when it returns this
            else:
                self._last_sub_peer = p
        self._consume([[msg]])

    def _incoming_user(self, msgs: list[list[Any]]) -> None:
        """XPUB: messages an XSUB sent that are not subscriptions."""
        if self._opts["xpub_manual"] and self.on_message is None and self.on_messages is None:
            self._sub_from.extend([None] * len(msgs))   # no subscriber to remember
        self._consume(msgs)

    def subscribe(self, topic: bytes | str) -> None:
        """SUB/XSUB: receive messages whose first frame starts with ``topic``.
        XPUB with ``xpub_manual``: send ``topic`` to the peer whose
        subscription request was received last."""
        self._subs_change(True, topic)

    def unsubscribe(self, topic: bytes | str) -> None:
        """SUB/XSUB: cancel one ``subscribe`` of ``topic`` (XPUB with
        ``xpub_manual``: for the peer whose request was received last)."""
        self._subs_change(False, topic)

    def _subs_change(self, on: bool, topic: bytes | str) -> None:
        t = topic.encode() if isinstance(topic, str) else bytes(topic)
        if self.socket_type == "XPUB" and self._opts["xpub_manual"]:
            p = self._last_sub_peer
            if p is None:
                raise StateError("XPUB manual: no subscription request received yet")
            if on:
                p.subs.add(t)
            else:
                p.subs.remove(t)
            return
        if self.socket_type not in ("SUB", "XSUB"):
            raise ConfigError("subscribe/unsubscribe is for SUB and XSUB sockets "
                              "(and XPUB with xpub_manual)")
        changed = self._subs.add(t) if on else self._subs.remove(t)
        if changed:
            for p in self._peers:
                if p.ready:
                    p.command(wire.subscribe(t, p.zmtp31) if on else wire.cancel(t, p.zmtp31))

    # -- receiving
    def _incoming_any(self, p: _Peer, msgs: list[list[Any]]) -> None:
        st = self.socket_type
        if st in ("PULL", "DEALER", "PAIR", "XSUB"):
            if self._conflate_in:
                self._conflate(p, msgs[-1])
            else:
                self._consume(msgs)
        elif st == "SUB":
            subs = self._subs
            if not subs.all:
                msgs = [m for m in msgs if subs.match(bytes(m[0][:subs.lengths[-1]])
                                                      if subs.lengths else b"")]
            if msgs:
                if self._conflate_in:
                    self._conflate(p, msgs[-1])
                else:
                    self._consume(msgs)
        elif st == "ROUTER":
            if p.held is not None:
                p.held.extend(msgs)         # its identity is taken: kept for later
                return
            ident = p.identity
            for m in msgs:
                m.insert(0, ident)
            self._consume(msgs)
        elif st in ("PUB", "XPUB"):
            # 3.0 subscriptions travel as messages; any other message from an
            # XSUB reaches an XPUB's application, in order with the
            # subscription notifications (libzmq does the same; PUB drops them)
            user: list[list[Any]] = []
            for m in msgs:
                if len(m) == 1 and len(m[0]) and m[0][0] in (0, 1):
                    if user:
                        self._incoming_user(user)
                        user = []
                    try:
                        self._subscription(p, m[0][0] == 1, bytes(m[0][1:]))
                    except ProtocolError as exc:
                        p._fail(str(exc), Event.HANDSHAKE_FAILED_PROTOCOL)
                        return
                elif st == "XPUB":
                    user.append(m)
            if user:
                self._incoming_user(user)
        # PUSH receives nothing: messages from a PULL peer are dropped

    def _incoming_req(self, p: _Peer, msgs: list[tuple[bytes | None, list[Any]]]) -> None:
        """REQ: the reply from the peer asked, with the envelope it was sent
        (the delimiter; with req_correlate the request id too); anything
        else is dropped."""
        for env, body in msgs:
            if self._req_peer is not p:
                continue                    # not the peer asked: dropped
            if env != self._req_env and (env is None or _unwire(env) != _unwire(self._req_env)):
                continue                    # not the envelope sent (stale, or malformed)
            self._req_peer = None
            cb = self.on_message
            if cb is not None:
                cb(body)
            else:
                self._consume([body])

    def _incoming_rep(self, p: _Peer, msgs: list[tuple[bytes | None, list[Any]]]) -> None:
        """REP: requests queue with their envelope (a request without a
        delimiter is malformed: dropped) and are handed out one at a time."""
        q = self._rep_queue
        cb = self.on_message
        if len(msgs) == 1 and cb is not None and not q and self._rep_current is None \
                and not self._rep_delivering:
            env, body = msgs[0]             # the common case: one request, nothing waiting
            if env is not None:
                self._rep_current = (p, env)
                self._rep_delivering = True
                try:
                    cb(body)
                finally:
                    self._rep_delivering = False
                if q and self._rep_current is None:
                    self._rep_pump()
            return
        for env, body in msgs:
            if env is not None:
                q.append((p, env, body))
        if self._rep_current is None:
            self._rep_pump()

    def _rep_pump(self) -> None:
        """Deliver the next request once the previous one was answered."""
        if self._rep_delivering:
            return
        self._rep_delivering = True
        q = self._rep_queue
        try:
            while self._rep_current is None and q:
                p, env, body = q.popleft()
                self._rep_current = (p, env)
                cb = self.on_message
                if cb is not None:
                    cb(body)
                    continue
                self._consume([body])
                if self.on_messages is None:
                    break
        finally:
            self._rep_delivering = False

    def _conflate(self, p: _Peer, m: list[Any]) -> None:
        """conflate: only the newest message of a peer is kept (a callback
        gets the last message of each read batch)."""
        if self.on_messages is not None or self.on_message is not None:
            self._consume([m])
            return
        w = self._waiters
        while w:
            fut = w.popleft()
            if not fut.done():
                fut.set_result(m)
                return
        self._conflated.pop(p, None)
        self._conflated[p] = m              # a fresh message goes to the end

    def _took_sub_from(self) -> None:
        """XPUB manual: the message leaving the queue was a subscription
        request from this peer, which ``subscribe()`` then answers."""
        if self._sub_from:
            p = self._sub_from.popleft()
            if p is not None:
                self._last_sub_peer = p

    def _pop(self) -> list[Any] | None:
        """The next queued message for recv, or None."""
        if self._rxq:
            m = self._rxq.popleft()
            self._took_sub_from()
            self._took()
            return m
        if self._conflated:
            return self._conflated.pop(next(iter(self._conflated)))
        return None

    def _consume(self, msgs: list[list[Any]]) -> None:
        cb = self.on_messages
        if cb is not None:
            cb(msgs)
            return
        cb1 = self.on_message
        if cb1 is not None:
            for m in msgs:
                cb1(m)
            return
        q = self._rxq
        q.extend(msgs)
        w = self._waiters
        while w and q:
            fut = w.popleft()
            if not fut.done():
                self._took_sub_from()
                fut.set_result(q.popleft())
        if len(q) >= (self._opts["rcvhwm"] or 1 << 62) and not self._rx_paused:
            self._rx_paused = True
            for p in self._all_peers():
                if p.bind is not None and not p.bind.closed:
                    p.bind.pause_reading()

    def _all_peers(self) -> list[_Peer]:
        return [c.peer for c in self._connectors.values()] + list(self._accepted)

    def _took(self) -> None:
        if self._rx_paused and len(self._rxq) < max(1, (self._opts["rcvhwm"] or 2) // 2):
            self._rx_paused = False
            for p in self._all_peers():
                if p.bind is not None and not p.bind.closed:
                    p.bind.resume_reading()
        if self.socket_type == "REP" and self._rep_current is None:
            self._rep_pump()

    def recv_multipart(self, flags: int = 0) -> Any:
        """The next message as a list of frame Buffers. ``flags=NOBLOCK``:
        now or ``Again``; otherwise an awaitable (an asyncio Future of the
        running loop) that completes with it."""
        self._check_recv()
        if self._rx_frames:
            raise StateError("recv() left frames of a message: finish it with recv()")
        m = self._pop()
        if m is not None:
            if flags & NOBLOCK:
                return m
            fut = asyncio.get_running_loop().create_future()
            fut.set_result(m)
            return fut
        if flags & NOBLOCK:
            raise Again("no message to receive")
        fut = asyncio.get_running_loop().create_future()
        fut.add_done_callback(lambda _f: self._took())
        self._waiters.append(fut)
        return fut

    def recv(self, flags: int = 0) -> Any:
        """The next frame (pyzmq's recv: the frames of a multipart message
        one call each; ``rcvmore`` says whether more follow)."""
        self._check_recv()
        if not self._rx_frames:
            m = self._pop()
            if m is None:
                if flags & NOBLOCK:
                    raise Again("no message to receive")
                fut = asyncio.get_running_loop().create_future()

                def done(f: asyncio.Future[Any]) -> None:
                    if f.cancelled() or f.exception() is not None:
                        return
                    self._took()
                self._waiters.append(fut)
                out = asyncio.get_running_loop().create_future()

                def split(f: asyncio.Future[Any]) -> None:
                    if f.cancelled():
                        out.cancel()
                    elif f.exception() is not None:
                        out.set_exception(f.exception())  # type: ignore[arg-type]
                    else:
                        m = f.result()
                        self._rx_frames.extend(m[1:])
                        out.set_result(m[0])
                fut.add_done_callback(split)
                fut.add_done_callback(done)
                return out
            self._rx_frames.extend(m)
        f = self._rx_frames.popleft()
        if flags & NOBLOCK:
            return f
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(f)
        return fut

    @property
    def rcvmore(self) -> bool:
        """More frames of the message ``recv`` is returning follow."""
        return bool(self._rx_frames)

    def _check_recv(self) -> None:
        self._check_open()
        if self.socket_type not in _CAN_RECV:
            raise StateError(f"a {self.socket_type} socket does not receive")
        if self.on_message is not None or self.on_messages is not None:
            raise StateError("messages go to the on_message(s) callback on this socket")

    # -- sending
    def send(self, data: Any, flags: int = 0, *, more: bool = False) -> Any:
        """Send one frame; with ``SNDMORE`` (or ``more=True``) it waits for
        the frames that follow, the last one sends the message."""
        if flags & SNDMORE or more:
            self._tx_parts.append(data)
            return DONE
        if self._tx_parts:
            parts = self._tx_parts
            self._tx_parts = []
            parts.append(data)
            return self.send_multipart(parts, flags)
        return self.send_multipart((data,), flags)

    def send_multipart(self, frames: Sequence[Any], flags: int = 0) -> Any:
        """Send one message. Queued now: returns an awaitable that is already
        done. No peer can take it (high-water mark, no peer yet) on a type
        that blocks (PUSH, DEALER, REQ, PAIR): ``NOBLOCK`` raises ``Again``;
        otherwise it is an asyncio Future that completes once the message is
        queued (needs a running asyncio loop, else ``Again``)."""
        if self.closed:
            raise ZMTPError("socket is closed")
        k = self._kind
        if k:
            # REQ and REP, the common case inline (one Python call per
            # message): the peer is up, has room and nothing waits before it
            if k == 2:
                cur = self._rep_current
                if cur is not None and not self._rep_queue:
                    p = cur[0]
                    b = p.bind
                    if p.state == 2 and not p.out and not p.curve and not b.paused:
                        self._rep_current = None
                        w = _nz.encode(frames, False, cur[1])   # behind the envelope
                        if type(w) is bytes:
                            b.send(w)
                        else:
                            b.sendv(w)
                        return DONE
                return self._send_rep(frames)
            peers = self._peers
            n = len(peers)
            if n and self._req_peer is None and not self._req_correlate:
                i = self._rr % n
                p = peers[i]
                b = p.bind
                if p.state == 2 and not p.out and not p.curve and not b.paused:
                    self._rr = i + 1
                    w = _nz.encode(frames, False, b"\x01\x00")  # the delimiter first
                    if type(w) is bytes:
                        b.send(w)
                    else:
                        b.sendv(w)
                    self._req_peer = p
                    self._req_env = b"\x01\x00"
                    return DONE
            return self._send_req(frames, flags)
        st = self.socket_type
        if st == "PUB" or st == "XPUB":
            self._publish(frames)
            return DONE
        if st in ("PUSH", "DEALER", "PAIR"):
            peers = self._peers
            n = len(peers)
            if n:
                # the common case, inline: the next peer is up and has room
                i = self._rr % n
                p = peers[i]
                b = p.bind
                if p.state == 2 and not p.out and not b.paused and not p.curve:
                    self._rr = i + 1
                    w = _nz.encode(frames)
                    if type(w) is bytes:
                        b.send(w)
                    else:
                        b.sendv(w)
                    return DONE
            for _ in range(n):
                i = self._rr % n
                self._rr = i + 1
                p = peers[i]
                if not p.full():
                    p.put(frames)
                    return DONE
            return self._blocked(frames, flags)
        if st == "ROUTER":
            return self._send_router(frames)
        if st == "XSUB":
            self._send_xsub(frames)
            return DONE
        raise StateError(f"a {st} socket does not send")

    def send_messages(self, messages: Iterable[Sequence[Any]]) -> None:
        """Send many messages in one call: the batch counterpart of
        ``on_messages``. On PUSH, DEALER and PAIR (round-robin kept message
        by message) and on PUB/XPUB, the messages for one peer are encoded
        together into one buffer and queued as one entry. A message no peer
        can take raises ``Again`` (those before it were sent)."""
        msgs = messages if isinstance(messages, list) else list(messages)
        st = self.socket_type
        if st in ("PUSH", "DEALER", "PAIR"):
            peers = self._peers
            n = len(peers)
            ready = [p for p in peers if p.state == 2 and not p.out and not p.curve
                     and not p.bind.paused]
            if n and len(ready) == n:
                start = self._rr % n
                parts = [(peers[(start + k) % n], _nz.encode_many(msgs[k::n] if n > 1 else msgs))
                         for k in range(min(n, len(msgs)))]
                if all(_fits(p.bind, len(w)) for p, w in parts):
                    self._rr = start + len(msgs)
                    for p, w in parts:
                        p.bind.send(w)
                    return
        elif st in ("PUB", "XPUB"):
            every: bytes | None = None      # the whole batch, encoded once for all
            for p in self._peers:
                if p.state != 2:
                    continue
                b = p.bind
                subs = p.subs
                if not p.curve and not p.out and b is not None and not b.paused:
                    if subs.all:
                        if every is None:
                            every = _nz.encode_many(msgs)
                        w = every
                    else:
                        mine = [m for m in msgs if subs.match(m[0] if type(m[0]) is bytes
                                                              else bytes(m[0]))]
                        w = _nz.encode_many(mine) if mine else b""
                    if _fits(b, len(w)):
                        if w:
                            b.send(w)
                        continue
                for m in msgs:              # a slow peer: queue up to its HWM, drop the rest
                    if subs.match(m[0] if type(m[0]) is bytes else bytes(m[0])):
                        if p.full():
                            break
                        p.put(m)
            return
        for m in msgs:
            self.send_multipart(m, NOBLOCK)

    def _blocked(self, frames: Sequence[Any], flags: int) -> Any:
        if flags & NOBLOCK:
            raise Again("no peer can take the message now (high-water mark or no peer)")
        try:
            aloop = asyncio.get_running_loop()
        except RuntimeError:
            raise Again("no peer can take the message now; without an asyncio loop "
                        "to wait on, send with NOBLOCK and retry") from None
        fut = aloop.create_future()
        self._send_waiters.append((fut, list(frames)))
        return fut

    def _publish(self, frames: Sequence[Any]) -> None:
        topic = frames[0] if type(frames[0]) is bytes else bytes(frames[0])
        wire_ = None
        for p in self._peers:
            if p.state == 2 and p.subs.match(topic):
                if p.full():
                    continue                # PUB drops for a peer at its HWM
                if p.curve:
                    p.put(frames)
                else:
                    if wire_ is None:
                        wire_ = _nz.encode(frames)
                    p.put(frames, wire_)

    def _send_req(self, frames: Sequence[Any], flags: int) -> Any:
        if self._req_peer is not None and not self._req_relaxed:
            raise StateError("REQ: receive the reply before sending again")
        peers = self._peers
        n = len(peers)
        for _ in range(n):
            i = self._rr % n
            self._rr = i + 1
            p = peers[i]
            if not p.full():
                if self._req_correlate:
                    self._req_id = (self._req_id + 1) & 0xFFFFFFFF
                    env = b"\x01\x04" + self._req_id.to_bytes(4, "big") + b"\x01\x00"
                else:
                    env = b"\x01\x00"             # the empty delimiter frame, MORE
                p.put_env(env, frames)
                self._req_peer = p
                self._req_env = env
                return DONE
        return self._blocked(frames, flags)

    def _send_rep(self, frames: Sequence[Any]) -> Any:
        cur = self._rep_current
        if cur is None:
            raise StateError("REP: no request to answer")
        self._rep_current = None
        p, env = cur
        if (p.state == 2 or p.connector is not None) and not p.full():
            p.put_env(env, frames)      # a gone peer's reply is dropped
        if self._rep_queue and not self._rep_delivering:
            self._rep_pump()
        return DONE

    def _send_router(self, frames: Sequence[Any]) -> Any:
        if len(frames) < 2:
            raise ValueError("ROUTER: a message is the peer's identity, then at least one frame")
        ident = bytes(frames[0])
        p = self._by_id.get(ident)
        if p is None or p.state != 2:
            if self._opts["router_mandatory"]:
                raise HostUnreachable(f"no peer with identity {ident!r}")
            return DONE
        if p.full():
            if self._opts["router_mandatory"]:
                raise Again(f"peer {ident!r} is at its high-water mark")
            return DONE
        p.put(frames[1:])
        return DONE

    def _send_xsub(self, frames: Sequence[Any]) -> None:
        first = bytes(frames[0]) if len(frames) == 1 else b""
        if first[:1] in (b"\x00", b"\x01"):
            self._subs_change(first[0] == 1, first[1:])
            return
        for p in self._peers:       # connecting ones queue it (libzmq's pipes do)
            if p.state != 3 and not p.full():
                p.put(frames)

    def __repr__(self) -> str:
        return (f"<evpl.zmtp.Socket {self.socket_type} peers={len(self._peers)} "
                f"{'closed' if self.closed else 'open'}>")


def _option(name: str) -> property:
    def fget(self: Socket) -> Any:
        return self._opts[name]

    def fset(self: Socket, value: Any) -> None:
        self.set(name, value)
    return property(fget, fset, doc=f"Socket option {name} (libzmq's ZMQ_{name.upper()}).")


for _name in _OPTIONS:
    setattr(Socket, _name, _option(_name))
Socket.identity = _option("routing_id")  # type: ignore[attr-defined]
Socket.hwm = property(lambda self: self._opts["sndhwm"],  # type: ignore[attr-defined]
                      lambda self, v: self.set("hwm", v), doc="sndhwm and rcvhwm at once")


def _fits(b: evpl.Bind, n: int) -> bool:
    """``n`` more bytes stay under the Bind's hard limit (16 x its high-water
    mark, the engine's default, which peers' Binds keep)."""
    return b.queued_bytes + n <= 16 * b.high_water


def _close_all(binds: list[evpl.Bind]) -> None:
    for b in binds:
        if not b.closed:
            b.close()
