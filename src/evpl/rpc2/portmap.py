"""Portmapper (program 100000 v2) and rpcbind (v3, v4): a client and an embedded server.

Client side: :class:`PortmapClient` calls a portmapper/rpcbind (the
system's, or any other) asynchronously, returning :class:`~evpl.rpc2.RpcCall`
objects; :func:`register`, :func:`unregister` and :func:`getport` are
blocking conveniences for scripts (they run the loop, so they cannot be
used inside a loop callback)::

    portmap.register(loop, PROG, VERS, "tcp", 5000)   # rpcbind v4 SET, then v2 SET
    ...
    portmap.unregister(loop, PROG, VERS)

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

import os
import time
from collections.abc import Iterable
from typing import Any

from evpl.errors import ConfigError, EvplError
from evpl.rpc2.client import Client, RpcCall
from evpl.rpc2.server import Server
from evpl.rpc2.xdrgen import load_x

__all__ = [
    "IPPROTO_TCP",
    "IPPROTO_UDP",
    "PMAP_PORT",
    "PMAP_PROG",
    "Mapping",
    "PortmapClient",
    "PortmapServer",
    "Rpcb",
    "getport",
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
    """Calls a portmapper / rpcbind at ``address`` (default 127.0.0.1:111).

    Every method returns an :class:`~evpl.rpc2.RpcCall`; ``v2`` methods use
    the portmapper protocol, ``rpcb_*`` ones rpcbind ``version`` 3 or 4.
    """

    def __init__(self, loop: Any, address: Any = ("127.0.0.1", PMAP_PORT), *,
                 backend: str = "tcp", timeout: float = 5.0, **options: Any) -> None:
        self.loop = loop
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


def _owner() -> str:
    return str(os.geteuid())


def register(loop: Any, prog: int, vers: int, protocol: str | int, port: int, *,
             address: Any = ("127.0.0.1", PMAP_PORT), host: str = "0.0.0.0",
             version: int = 4, timeout: float = 5.0) -> bool:
    """Register ``prog``/``vers`` at ``port`` with the portmapper at ``address``.

    ``version`` 4 or 3 uses rpcbind SET (netid ``"tcp"``/``"udp"``, universal
    address built from ``host`` and ``port``); 2 uses portmapper SET.
    Returns the server's answer (False: already registered by someone).
    Blocking: runs the loop; not for use inside a loop callback.
    """
    netid = _netid(protocol)
    with PortmapClient(loop, address, timeout=timeout) as pc:
        if version == 2:
            return bool(pc.wait(pc.set(prog, vers, netid, port)))
        return bool(pc.wait(pc.rpcb_set(prog, vers, netid, uaddr(host, port), _owner(),
                                        version)))


def unregister(loop: Any, prog: int, vers: int, protocol: str | int | None = None, *,
               address: Any = ("127.0.0.1", PMAP_PORT), version: int = 4,
               timeout: float = 5.0) -> bool:
    """Remove the registration(s) of ``prog``/``vers`` (one protocol, or all).

    Blocking like :func:`register`.
    """
    with PortmapClient(loop, address, timeout=timeout) as pc:
        if version == 2:
            return bool(pc.wait(pc.unset(prog, vers)))
        netid = "" if protocol is None else _netid(protocol)
        return bool(pc.wait(pc.rpcb_unset(prog, vers, netid, _owner(), version)))


def getport(loop: Any, prog: int, vers: int, protocol: str | int = "tcp", *,
            address: Any = ("127.0.0.1", PMAP_PORT), timeout: float = 5.0) -> int:
    """The port ``prog``/``vers`` is registered at (0: none), by v2 GETPORT. Blocking."""
    with PortmapClient(loop, address, timeout=timeout) as pc:
        return int(pc.wait(pc.getport(prog, vers, protocol)))


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
