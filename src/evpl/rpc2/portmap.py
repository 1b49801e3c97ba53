"""Portmapper (program 100000 v2) and rpcbind (v3, v4): a client and an embedded server.

Client side: :class:`PortmapClient` calls a portmapper/rpcbind (the
system's, or any other) asynchronously, returning :class:`~evpl.rpc2.RpcCall`
objects; :func:`register`, :func:`unregister` and :func:`getport` are
blocking conveniences for scripts (they run the loop, so they cannot be
used inside a loop callback)::

    portmap.register(loop, PROG, VERS, "tcp", 5000)   # rpcbind v4 SET
    ...
    portmap.unregister(loop, PROG, VERS)

By default they talk to this host's rpcbind the way libtirpc does: over its
local socket (:data:`RPCBIND_SOCKET`) when it exists, where rpcbind knows
the caller's uid, else over TCP to 127.0.0.1:111, where every caller is
"unknown" to it and may not unset entries that others (a libtirpc server
running as root: "superuser") registered.  rpcbind refuses to SET a
program/version/transport that is registered already at another address,
so a server restarting after a crash unregisters first (as rpcgen's
generated servers do).  A refused SET or UNSET returns False and logs why,
and what to do, on the ``evpl.rpc2.portmap`` logger.

Server side: :class:`PortmapServer` is a small portmapper for hosts without
rpcbind (or for tests in a network namespace): it answers v2 NULL, SET,
UNSET, GETPORT, DUMP and v3/v4 SET, UNSET, GETADDR, DUMP, GETTIME (and v4
GETVERSADDR) over TCP and UDP, so ``rpcinfo -p HOST`` and ``rpcinfo -t HOST
PROG VERS`` work against it.  :meth:`PortmapServer.add_server` registers
every program of an :class:`~evpl.rpc2.Server`.

Universal addresses (RFC 1833): ``"h1.h2.h3.h4.p1.p2"`` for IPv4, the port
being ``p1 * 256 + p2``; see :func:`uaddr` and :func:`parse_uaddr`.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from evpl.errors import ConfigError, EvplError, TransportError
from evpl.rpc2.client import Client, RpcCall
from evpl.rpc2.errors import RpcError
from evpl.rpc2.server import Server
from evpl.rpc2.xdrgen import load_x

__all__ = [
    "IPPROTO_TCP",
    "IPPROTO_UDP",
    "PMAP_PORT",
    "PMAP_PROG",
    "RPCBIND_SOCKET",
    "Mapping",
    "PortmapClient",
    "PortmapServer",
    "Rpcb",
    "getport",
    "local_rpcbind",
    "parse_uaddr",
    "register",
    "uaddr",
    "unregister",
]

PORTMAP_X = r"""
const PMAP_PORT = 111;
const IPPROTO_TCP = 6;
const IPPROTO_UDP = 17;

struct mapping {
    unsigned int prog;
    unsigned int vers;
    unsigned int prot;
    unsigned int port;
};
struct pmaplist {
    mapping map;
    pmaplist *next;
};
typedef pmaplist *pmaplist_ptr;

struct rpcb {
    unsigned int r_prog;
    unsigned int r_vers;
    string r_netid<>;
    string r_addr<>;
    string r_owner<>;
};
struct rp__list {
    rpcb rpcb_map;
    struct rp__list *rpcb_next;
};
typedef rp__list *rpcblist_ptr;

program PMAP_PROG {
    version PMAP_VERS {
        void PMAPPROC_NULL(void) = 0;
        bool PMAPPROC_SET(mapping) = 1;
        bool PMAPPROC_UNSET(mapping) = 2;
        unsigned int PMAPPROC_GETPORT(mapping) = 3;
        pmaplist_ptr PMAPPROC_DUMP(void) = 4;
    } = 2;
    version RPCBVERS {
        bool RPCBPROC_SET(rpcb) = 1;
        bool RPCBPROC_UNSET(rpcb) = 2;
        string RPCBPROC_GETADDR(rpcb) = 3;
        rpcblist_ptr RPCBPROC_DUMP(void) = 4;
        unsigned int RPCBPROC_GETTIME(void) = 6;
    } = 3;
    version RPCBVERS4 {
        bool RPCBPROC_SET(rpcb) = 1;
        bool RPCBPROC_UNSET(rpcb) = 2;
        string RPCBPROC_GETADDR(rpcb) = 3;
        rpcblist_ptr RPCBPROC_DUMP(void) = 4;
        unsigned int RPCBPROC_GETTIME(void) = 6;
        string RPCBPROC_GETVERSADDR(rpcb) = 9;
    } = 4;
} = 100000;
"""

RPCBIND_SOCKET = "/run/rpcbind.sock"
"""rpcbind's local (unix) socket, where it sees the caller's uid (libtirpc's
``_PATH_RPCBINDSOCK``; ``/var/run`` is ``/run`` on current systems)."""

_log = logging.getLogger("evpl.rpc2.portmap")

pm: Any = load_x(PORTMAP_X, name="evpl.rpc2._portmap_x")
"""The compiled portmap/rpcbind types and stubs (``pm.mapping``, ``pm.rpcb``...)."""

PMAP_PROG: int = pm.PMAP_PROG
PMAP_PORT: int = pm.PMAP_PORT
IPPROTO_TCP: int = pm.IPPROTO_TCP
IPPROTO_UDP: int = pm.IPPROTO_UDP
Mapping = pm.mapping
Rpcb = pm.rpcb

_NETID_PROT = {"tcp": IPPROTO_TCP, "udp": IPPROTO_UDP}
_PROT_NETID = {v: k for k, v in _NETID_PROT.items()}


def _netid(protocol: str | int) -> str:
    if isinstance(protocol, int):
        if protocol not in _PROT_NETID:
            raise ConfigError(f"protocol must be 6 (tcp) or 17 (udp), got {protocol}")
        return _PROT_NETID[protocol]
    if protocol not in _NETID_PROT:
        raise ConfigError(f"protocol must be 'tcp' or 'udp', got {protocol!r}")
    return protocol


def uaddr(host: str, port: int) -> str:
    """The universal address of an IPv4 ``host`` and ``port``: ``"127.0.0.1.8.1"``."""
    if not 0 <= port <= 0xFFFF:
        raise ConfigError(f"port out of range: {port}")
    return f"{host}.{port >> 8}.{port & 0xFF}"


def parse_uaddr(addr: str | bytes) -> tuple[str, int]:
    """``(host, port)`` of a universal address (``ConfigError`` if malformed)."""
    text = addr.decode("ascii", "replace") if isinstance(addr, bytes) else addr
    host, _, rest = text.rpartition(".")
    host, _, hi = host.rpartition(".")
    try:
        port = int(hi) * 256 + int(rest)
    except ValueError:
        raise ConfigError(f"not a universal address: {text!r}") from None
    if not host or not 0 <= port <= 0xFFFF:
        raise ConfigError(f"not a universal address: {text!r}")
    return host, port


# -- client --------------------------------------------------------------------

class PortmapClient:
    """Calls a portmapper / rpcbind at ``address``.

    ``address`` ``None`` (the default) is this host's rpcbind, as libtirpc
    finds it: its local socket :data:`RPCBIND_SOCKET` if that exists, else
    TCP to 127.0.0.1:111 (see :func:`local_rpcbind`).  A ``str`` is a unix
    socket path, a ``(host, port)`` tuple a TCP address (``backend="udp"``
    for UDP).  Over the local socket rpcbind knows the caller's uid and
    records it as the owner of what it registers ("superuser" for root);
    over the network every caller is "unknown", which may not unset entries
    of another owner.

    Every method returns an :class:`~evpl.rpc2.RpcCall`; ``v2`` methods use
    the portmapper protocol, ``rpcb_*`` ones rpcbind ``version`` 3 or 4.
    """

    def __init__(self, loop: Any, address: str | tuple[str, int] | None = None, *,
                 backend: str | None = None, timeout: float = 5.0, **options: Any) -> None:
        if address is None:
            default_backend, address = local_rpcbind()
            backend = backend or default_backend
        elif backend is None:
            backend = "unix" if isinstance(address, str | bytes) else "tcp"
        self.loop = loop
        self.backend = backend
        self.address = address
        self.client = Client(loop, backend, address, timeout=timeout, **options)
        self.v2 = pm.PMAP_VERSClient(self.client)
        self.v3 = pm.RPCBVERSClient(self.client)
        self.v4 = pm.RPCBVERS4Client(self.client)

    def __enter__(self) -> PortmapClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection."""
        self.client.close()

    def wait(self, rpc: RpcCall, timeout: float | None = None) -> Any:
        """Run the loop until ``rpc`` completes (see :meth:`Client.wait`)."""
        return self.client.wait(rpc, timeout)

    # portmapper v2
    def null(self) -> RpcCall:
        """PMAPPROC_NULL."""
        return self.v2.PMAPPROC_NULL()

    def set(self, prog: int, vers: int, protocol: str | int, port: int) -> RpcCall:
        """PMAPPROC_SET: result True if registered."""
        prot = _NETID_PROT[_netid(protocol)]
        return self.v2.PMAPPROC_SET(pm.mapping(prog, vers, prot, port))

    def unset(self, prog: int, vers: int) -> RpcCall:
        """PMAPPROC_UNSET (every protocol): result True if something was removed."""
        return self.v2.PMAPPROC_UNSET(pm.mapping(prog, vers, 0, 0))

    def getport(self, prog: int, vers: int, protocol: str | int) -> RpcCall:
        """PMAPPROC_GETPORT: result the port, 0 if not registered."""
        prot = _NETID_PROT[_netid(protocol)]
        return self.v2.PMAPPROC_GETPORT(pm.mapping(prog, vers, prot, 0))

    def dump(self) -> RpcCall:
        """PMAPPROC_DUMP: result a list of :data:`Mapping`."""
        rpc = RpcCall(PMAP_PROG, 2, pm.PMAPPROC_DUMP, bytes)
        inner = self.v2.PMAPPROC_DUMP()
        inner.add_done_callback(
            lambda c: rpc._set([e.map for e in c.result()], None) if c.exception() is None
            else rpc._set(None, c.exception()))
        rpc.xid = inner.xid
        return rpc

    # rpcbind v3 / v4
    def _rpcb(self, version: int) -> Any:
        if version == 3:
            return self.v3
        if version == 4:
            return self.v4
        raise ConfigError(f"rpcbind version must be 3 or 4, got {version}")

    def rpcb_set(self, prog: int, vers: int, netid: str, addr: str, owner: str = "",
                 version: int = 4) -> RpcCall:
        """RPCBPROC_SET of ``addr`` (a universal address): result True if registered."""
        return self._rpcb(version).RPCBPROC_SET(pm.rpcb(prog, vers, netid, addr, owner))

    def rpcb_unset(self, prog: int, vers: int, netid: str = "", owner: str = "",
                   version: int = 4) -> RpcCall:
        """RPCBPROC_UNSET (``netid`` empty: every transport)."""
        return self._rpcb(version).RPCBPROC_UNSET(pm.rpcb(prog, vers, netid, "", owner))

    def getaddr(self, prog: int, vers: int, netid: str = "tcp", version: int = 4) -> RpcCall:
        """RPCBPROC_GETADDR: result the universal address (bytes), empty if none."""
        return self._rpcb(version).RPCBPROC_GETADDR(pm.rpcb(prog, vers, netid, "", ""))

    def rpcb_dump(self, version: int = 4) -> RpcCall:
        """RPCBPROC_DUMP: result a list of ``rp__list`` (``.rpcb_map`` is an :data:`Rpcb`)."""
        return self._rpcb(version).RPCBPROC_DUMP()


def local_rpcbind() -> tuple[str, Any]:
    """``(backend, address)`` of this host's rpcbind, chosen as libtirpc does:
    the local socket :data:`RPCBIND_SOCKET` when it exists (rpcbind then
    knows the caller's uid), else TCP to 127.0.0.1:111."""
    try:
        if stat.S_ISSOCK(os.stat(RPCBIND_SOCKET).st_mode):
            return "unix", RPCBIND_SOCKET
    except OSError:
        pass
    return "tcp", ("127.0.0.1", PMAP_PORT)


def _owner() -> str:
    """The r_owner we send; rpcbind ignores it and records who it sees calling."""
    return str(os.geteuid())


def _caller_as_seen(backend: str) -> str:
    """The owner rpcbind records for us: the uid it reads from a local socket
    ("superuser" for root), "unknown" over the network."""
    if backend != "unix":
        return "unknown"
    uid = os.geteuid()
    return "superuser" if uid == 0 else str(uid)


def _with_rpcbind(loop: Any, address: str | tuple[str, int] | None, timeout: float,
                  fn: Callable[[PortmapClient], Any]) -> Any:
    """Run ``fn(client)`` against ``address`` (``None``: :func:`local_rpcbind`).

    Like libtirpc, when the local socket was chosen by default but cannot be
    connected to (a socket file left by a stopped rpcbind), try TCP to
    127.0.0.1:111 instead."""
    chosen = address is None
    backend, target = local_rpcbind() if chosen else (None, address)
    try:
        with PortmapClient(loop, target, backend=backend, timeout=timeout) as pc:
            return fn(pc)
    except TransportError as exc:
        if not chosen or backend != "unix" or exc.errno not in (errno.ECONNREFUSED,
                                                                 errno.ENOENT):
            raise
        _log.debug("rpc2: rpcbind's local socket %s does not answer (%s); trying "
                   "127.0.0.1:%d over TCP", target, exc, PMAP_PORT)
    with PortmapClient(loop, ("127.0.0.1", PMAP_PORT), timeout=timeout) as pc:
        return fn(pc)


class _Found(NamedTuple):
    netid: str
    addr: str
    owner: str


def _registered(pc: PortmapClient, prog: int, vers: int, netid: str) -> list[_Found] | None:
    """What the portmapper has for ``prog``/``vers`` (one netid, or all if empty),
    to explain a refusal; ``None`` if it cannot be asked."""
    try:
        found = [_Found(_text(m.r_netid), _text(m.r_addr), _text(m.r_owner))
                 for m in (e.rpcb_map for e in pc.wait(pc.rpcb_dump(4)))
                 if m.r_prog == prog and m.r_vers == vers]
    except RpcError:  # a portmapper without rpcbind v4: v2 has no owners
        try:
            found = [_Found(_PROT_NETID.get(m.prot, str(m.prot)), uaddr("0.0.0.0", m.port), "")
                     for m in pc.wait(pc.dump()) if m.prog == prog and m.vers == vers]
        except EvplError:
            return None
    except EvplError:
        return None
    return [f for f in found if not netid or f.netid == netid]


def _where(pc: PortmapClient) -> str:
    if pc.backend == "unix":
        return f"rpcbind (local socket {pc.address})"
    return f"the portmapper at {pc.address!r} ({pc.backend})"


def _unset_hint(pc: PortmapClient, owner: str) -> str:
    """Why we may not be able to unset an entry of ``owner``, and what to do."""
    me = _caller_as_seen(pc.backend)
    if not owner or me in ("superuser", owner):
        return ""
    rule = f" rpcbind lets only the entry's owner ({owner!r}) or root unset it"
    if owner == "unknown":  # registered over the network; we are a non-root uid
        return (f"{rule}, and you are uid {os.geteuid()} on its local socket: unset it "
                f"as root, or over TCP (address=('127.0.0.1', {PMAP_PORT})) where every "
                f"caller is 'unknown'.")
    who = "root" if owner == "superuser" else f"root (or as uid {owner})"
    if pc.backend != "unix":
        return (f"{rule}, and tells callers apart only on its local socket "
                f"{RPCBIND_SOCKET}: over {pc.backend} every caller is 'unknown'.  Run this "
                f"as {who} on the rpcbind host and leave address= at its default, so that "
                f"the local socket is used.")
    return f"{rule}, and you are uid {os.geteuid()}: run this as {who}."


def _explain_set(pc: PortmapClient, prog: int, vers: int, netid: str, addr: str) -> str:
    what = f"program {prog} version {vers} on {netid} at {addr}"
    found = _registered(pc, prog, vers, netid)
    if found is None:
        return f"{_where(pc)} refused to register {what} (and could not be asked why)."
    if not found:
        return (f"{_where(pc)} refused to register {what} though it has no entry for it: "
                f"rpcbind accepts SET and UNSET only from its own host (loopback or "
                f"{RPCBIND_SOCKET}).")
    e = found[0]
    owner = f" (owner {e.owner!r})" if e.owner else ""
    return (f"{_where(pc)} refused to register {what}: it already maps it to {e.addr}"
            f"{owner}, and keeps the first registration until it is unset.  If that "
            f"server is gone (it exited without unregistering), unregister first with "
            f"portmap.unregister(loop, {prog}, {vers}), as rpcgen servers do when they "
            f"start.{_unset_hint(pc, e.owner)}")


def register(loop: Any, prog: int, vers: int, protocol: str | int, port: int, *,
             address: str | tuple[str, int] | None = None, host: str = "0.0.0.0", version: int = 4,
             timeout: float = 5.0) -> bool:
    """Register ``prog``/``vers`` at ``port`` with the portmapper at ``address``.

    ``address`` ``None``: this host's rpcbind, over its local socket if it
    exists (see :func:`local_rpcbind`); a path or a ``(host, port)`` as for
    :class:`PortmapClient`.  ``version`` 4 or 3 uses rpcbind SET (netid
    ``"tcp"``/``"udp"``, universal address built from ``host`` and
    ``port``); 2 uses portmapper SET.  Returns the portmapper's answer:
    True if registered (or already registered at this same address), False
    if refused; a refusal is logged on ``evpl.rpc2.portmap`` (WARNING) with
    what is registered instead, by whom, and how to replace it.
    Blocking: runs the loop; not for use inside a loop callback.
    """
    netid = _netid(protocol)

    def run(pc: PortmapClient) -> bool:
        if version == 2:
            ok = bool(pc.wait(pc.set(prog, vers, netid, port)))
            addr = uaddr("0.0.0.0", port)
        else:
            addr = uaddr(host, port)
            ok = bool(pc.wait(pc.rpcb_set(prog, vers, netid, addr, _owner(), version)))
        if not ok:
            _log.warning("%s", _explain_set(pc, prog, vers, netid, addr))
        return ok

    return bool(_with_rpcbind(loop, address, timeout, run))


def unregister(loop: Any, prog: int, vers: int, protocol: str | int | None = None, *,
               address: str | tuple[str, int] | None = None, version: int = 4,
               timeout: float = 5.0) -> bool:
    """Remove the registration(s) of ``prog``/``vers`` (one protocol, or all;
    portmapper ``version`` 2 always removes all).

    Returns the portmapper's answer: True if the registrations are gone
    (rpcbind also answers True when there were none), False if refused
    (rpcbind lets only an entry's owner or root unset it, and knows the
    caller only on its local socket; the embedded :class:`PortmapServer`
    answers False when there was nothing to remove).  A refusal is logged
    on ``evpl.rpc2.portmap`` (WARNING) with the owner and what to do.
    ``address`` and blocking as for :func:`register`.
    """
    netid = "" if protocol is None or version == 2 else _netid(protocol)

    def run(pc: PortmapClient) -> bool:
        if version == 2:
            ok = bool(pc.wait(pc.unset(prog, vers)))
        else:
            ok = bool(pc.wait(pc.rpcb_unset(prog, vers, netid, _owner(), version)))
        if not ok:
            found = _registered(pc, prog, vers, netid)
            if found:
                owners = sorted({f.owner for f in found})
                entries = ", ".join(f"{f.netid} {f.addr}" for f in found)
                _log.warning("%s refused to unregister program %d version %d (%s, owner "
                             "%s).%s", _where(pc), prog, vers, entries,
                             " and ".join(repr(o) for o in owners),
                             "".join(_unset_hint(pc, o) for o in owners[:1]))
            else:
                _log.debug("rpc2: program %d version %d was not registered with %s",
                           prog, vers, _where(pc))
        return ok

    return bool(_with_rpcbind(loop, address, timeout, run))


def getport(loop: Any, prog: int, vers: int, protocol: str | int = "tcp", *,
            address: str | tuple[str, int] | None = None, timeout: float = 5.0) -> int:
    """The port ``prog``/``vers`` is registered at (0: none), by v2 GETPORT.

    ``address`` as for :func:`register`.  Blocking.
    """
    return int(_with_rpcbind(loop, address, timeout,
                             lambda pc: pc.wait(pc.getport(prog, vers, protocol))))


# -- embedded server -----------------------------------------------------------

class _Entry:
    __slots__ = ("addr", "netid", "owner", "prog", "vers")

    def __init__(self, prog: int, vers: int, netid: str, addr: str, owner: str) -> None:
        self.prog = prog
        self.vers = vers
        self.netid = netid
        self.addr = addr
        self.owner = owner


def _text(s: Any) -> str:
    return s.decode("utf-8", "replace") if isinstance(s, bytes | bytearray) else str(s)


class _Registry:
    """Registrations keyed by (prog, vers, netid), in registration order."""

    def __init__(self) -> None:
        self.entries: dict[tuple[int, int, str], _Entry] = {}

    def set(self, prog: int, vers: int, netid: str, addr: str, owner: str) -> bool:
        key = (prog, vers, netid)
        if key in self.entries:
            return False
        self.entries[key] = _Entry(prog, vers, netid, addr, owner)
        return True

    def unset(self, prog: int, vers: int, netid: str = "") -> bool:
        keys = [k for k in self.entries if k[0] == prog and k[1] == vers
                and (not netid or k[2] == netid)]
        for k in keys:
            del self.entries[k]
        return bool(keys)

    def get(self, prog: int, vers: int, netid: str) -> _Entry | None:
        return self.entries.get((prog, vers, netid))


class _Pmap2(pm.PMAP_VERSServer):  # type: ignore[misc,name-defined]
    def __init__(self, reg: _Registry) -> None:
        self.reg = reg

    def PMAPPROC_NULL(self) -> None:
        return None

    def PMAPPROC_SET(self, m: Any) -> bool:
        netid = _PROT_NETID.get(m.prot)
        if netid is None or not 0 < m.port <= 0xFFFF:
            return False
        return self.reg.set(m.prog, m.vers, netid, uaddr("0.0.0.0", m.port), "")

    def PMAPPROC_UNSET(self, m: Any) -> bool:
        return self.reg.unset(m.prog, m.vers)

    def PMAPPROC_GETPORT(self, m: Any) -> int:
        netid = _PROT_NETID.get(m.prot)
        e = self.reg.get(m.prog, m.vers, netid) if netid else None
        if e is None:
            return 0
        try:
            return parse_uaddr(e.addr)[1]
        except ConfigError:
            return 0

    def PMAPPROC_DUMP(self) -> list[Any]:
        out = []
        for e in self.reg.entries.values():
            prot = _NETID_PROT.get(e.netid)
            if prot is None:
                continue
            try:
                port = parse_uaddr(e.addr)[1]
            except ConfigError:
                continue
            out.append(pm.pmaplist(pm.mapping(e.prog, e.vers, prot, port)))
        return out


def _local_host(ctx: Any) -> str:
    """The address the caller reached us at, for answering with a usable uaddr."""
    bind = getattr(ctx._conn, "bind", None)
    try:
        host = bind.local_address[0] if bind is not None else ""
    except (AttributeError, TypeError, IndexError, EvplError):
        host = ""
    if not host or host in ("0.0.0.0", "::") or ":" in host:
        return "127.0.0.1"
    return host


class _Rpcb(pm.RPCBVERS4Server):  # type: ignore[misc,name-defined]
    def __init__(self, reg: _Registry) -> None:
        self.reg = reg

    def RPCBPROC_SET(self, r: Any) -> bool:
        try:
            parse_uaddr(r.r_addr)
        except ConfigError:
            return False
        return self.reg.set(r.r_prog, r.r_vers, _text(r.r_netid), _text(r.r_addr),
                            _text(r.r_owner))

    def RPCBPROC_UNSET(self, r: Any) -> bool:
        return self.reg.unset(r.r_prog, r.r_vers, _text(r.r_netid))

    def RPCBPROC_GETADDR(self, ctx: Any, r: Any) -> bytes:
        e = self.reg.get(r.r_prog, r.r_vers, _text(r.r_netid))
        if e is None:
            return b""
        host, port = parse_uaddr(e.addr)
        if host in ("0.0.0.0", "::"):
            host = _local_host(ctx)
        return uaddr(host, port).encode()

    def RPCBPROC_GETVERSADDR(self, ctx: Any, r: Any) -> bytes:
        return self.RPCBPROC_GETADDR(ctx, r)

    def RPCBPROC_DUMP(self) -> list[Any]:
        return [pm.rp__list(pm.rpcb(e.prog, e.vers, e.netid, e.addr, e.owner))
                for e in self.reg.entries.values()]

    def RPCBPROC_GETTIME(self) -> int:
        return int(time.time()) & 0xFFFFFFFF


class PortmapServer:
    """An embedded portmapper / rpcbind (v2, v3, v4) on ``loop``.

    ``listen(address)`` serves TCP and UDP on ``address`` (default all
    interfaces, port 111, which needs privileges: use a network namespace)
    and registers the portmapper itself, as rpcbind does.  ``set``/``unset``
    and ``add_server`` register programs directly.
    """

    def __init__(self, loop: Any) -> None:
        self.loop = loop
        self.registry = _Registry()
        self.server = Server(loop, max_record=64 << 10)
        self.server.register(PMAP_PROG, 2, _Pmap2(self.registry))
        rpcb = _Rpcb(self.registry)
        self.server.register(PMAP_PROG, 3, rpcb)
        self.server.register(PMAP_PROG, 4, rpcb)
        self.port = 0

    def listen(self, address: Any = ("0.0.0.0", PMAP_PORT), *,
               protocols: Iterable[str] = ("tcp", "udp")) -> int:
        """Serve on ``address`` (TCP and UDP on the same port); returns the port."""
        host, port = address
        protocols = list(protocols)
        if "tcp" in protocols:
            listener = self.server.listen("tcp", (host, port))
            port = listener.address[1]
        if "udp" in protocols:
            port = self.server.bind_udp((host, port)).local_address[1]
        self.port = port
        for proto in protocols:
            for vers in (2, 3, 4):
                self.set(PMAP_PROG, vers, proto, port, owner="superuser")
        return port

    def set(self, prog: int, vers: int, protocol: str | int, port: int, *,
            host: str = "0.0.0.0", owner: str = "") -> bool:
        """Register ``prog``/``vers`` at ``port`` (False if already registered)."""
        return self.registry.set(prog, vers, _netid(protocol), uaddr(host, port), owner)

    def unset(self, prog: int, vers: int, protocol: str | int | None = None) -> bool:
        """Remove a registration (one protocol or all)."""
        return self.registry.unset(prog, vers, "" if protocol is None else _netid(protocol))

    def add_server(self, server: Server, protocol: str | int, port: int) -> None:
        """Register every (prog, vers) ``server`` serves, at ``port``."""
        for prog, vers in server.registrations:
            self.set(prog, vers, protocol, port)

    def close(self) -> None:
        """Stop serving."""
        self.server.close()
