"""``Loop.bind("xdp_udp", ...)``: checks and set-up for the AF_XDP backend.

Everything per datagram happens in ``evpl._native.xdp``; this module checks
the address and interface, reserves the port with a kernel UDP socket and
hands the interface's description (from rtnetlink) to the native driver.
``connect`` makes the connected form (the port's kernel socket connected
to the peer), as ``Loop.connect`` does over ``udp``.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from typing import Any

from evpl._native.bind import Bind, Limits
from evpl.core.netlink import Link, Netlink, is_ipv4, is_ipv6
from evpl.errors import BackendUnavailable, ConfigError, transport_error

__all__ = ["bind", "connect"]


ENV_INTERFACE = "EVPL_XDP_INTERFACE"


def unavailable_reason() -> str | None:
    """Why xdp_udp cannot work in this process (not built with libxdp, no
    CAP_NET_ADMIN / CAP_BPF), None if it can given an interface."""
    from evpl._native.xdp import xdp_unavailable_reason

    return xdp_unavailable_reason()


def registry_reason() -> str | None:
    """What ``evpl info`` says: also unavailable while no interface is given
    (``EVPL_XDP_INTERFACE``), since every xdp_udp Bind needs one."""
    why = unavailable_reason()
    if why is None and not os.environ.get(ENV_INTERFACE):
        why = (f"no interface given: pass interface= to Loop.bind (or set {ENV_INTERFACE}); "
               "the backend works on that interface only")
    return why


def bind(loop: Any, backend: str, address: Any, handler: Any, limits: Limits,
         options: dict[str, Any]) -> Bind:
    """An xdp_udp Bind on ``address``, an IPv4 or IPv6 (host, port) of the
    interface given as ``interface=`` (default: ``$EVPL_XDP_INTERFACE``);
    host may be "0.0.0.0" or "::" (any address of the interface, of that
    family: an IPv6 Bind does not take IPv4)."""
    host, port = _address(address)
    nl, link = _interface(options)
    try:
        family = socket.AF_INET6 if is_ipv6(host) else socket.AF_INET
        mine = link.ipv6 if family == socket.AF_INET6 else link.ipv4
        anyaddr = host in ("0.0.0.0", "::")
        if not anyaddr and not any(_same(host, a) for a in mine):
            raise ConfigError(f"{host} is not an address of {link.name} "
                              f"(it has {', '.join(link.ipv4 + link.ipv6) or 'no address'})")
        if not mine:
            raise ConfigError(f"{link.name} has no {_fname(family)} address to send from")
        sock = _port_socket(family)
        sa: tuple[Any, ...] = (host, port)
        if family == socket.AF_INET6:
            sa = (host, port, 0, link.index if _link_local(host) else 0)
        try:
            sock.bind(sa)
        except OSError as exc:
            sock.close()
            raise transport_error(exc.errno or errno.EINVAL, f"bind {address!r}") from None
        key, laddr, lport = _local(sock, link)
    except BaseException:
        nl.close()
        raise
    from evpl._native import xdp

    return xdp.xdp_datagram(loop, sock.detach(), backend, handler, limits, link, nl, key,
                            laddr, lport)


def connect(loop: Any, backend: str, address: Any, handler: Any, limits: Limits,
            options: dict[str, Any]) -> Bind:
    """A connected xdp_udp Bind to ``address`` (an IPv4 or IPv6 (host, port)
    reached through the interface ``interface=``, default
    ``$EVPL_XDP_INTERFACE``), as ``Loop.connect`` makes one over ``udp``:
    ``send`` goes to the peer, only the peer's datagrams are received, and
    ICMP port unreachable closes it with ``ConnectionRefused``. The local
    address and port are the kernel's choice (its route to the peer)."""
    host, port = _address(address)
    if port == 0:
        raise ConfigError(f"cannot connect to port 0 ({address!r})")
    nl, link = _interface(options)
    try:
        family = socket.AF_INET6 if is_ipv6(host) else socket.AF_INET
        if not (link.ipv6 if family == socket.AF_INET6 else link.ipv4):
            raise ConfigError(f"{link.name} has no {_fname(family)} address to send from")
        scope = 0
        if family == socket.AF_INET6:
            scope = address[3] if len(address) > 3 and address[3] else (
                link.index if _link_local(host) else 0)
        try:
            _hop, oif = nl.next_hop(host, scope)
        except OSError as exc:
            raise transport_error(exc.errno or errno.ENETUNREACH,
                                  f"no route to {host}") from None
        if oif != link.index:
            raise ConfigError(f"the route to {host} does not go through {link.name}: "
                              "xdp_udp sends on that interface only")
        sock = _port_socket(family)
        sa: tuple[Any, ...] = (host, port) if family == socket.AF_INET else (host, port, 0, scope)
        try:
            sock.connect(sa)
        except OSError as exc:
            sock.close()
            raise transport_error(exc.errno or errno.EINVAL, f"connect {sa!r}") from None
        peer = sock.getpeername()
        key, laddr, lport = _local(sock, link)
    except BaseException:
        nl.close()
        raise
    from evpl._native import xdp

    return xdp.xdp_datagram(loop, sock.detach(), backend, handler, limits, link, nl, key,
                            laddr, lport, peer)


def _address(address: Any) -> tuple[str, int]:
    if not (isinstance(address, tuple) and len(address) in (2, 4)):
        raise ConfigError(f"xdp_udp addresses are (IP address, port) tuples, got {address!r}")
    host, port = address[0], address[1]
    if not isinstance(host, str) or not (is_ipv4(host) or is_ipv6(host)):
        raise ConfigError(f"xdp_udp takes numeric IPv4 or IPv6 addresses, got {host!r}")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise ConfigError(f"port must be an int in 0..65535, got {port!r}")
    if is_ipv6(host) and ipaddress.IPv6Address(host).ipv4_mapped is not None:
        raise ConfigError(f"{host} is an IPv4-mapped address: use the IPv4 address")
    return host, port


def _interface(options: dict[str, Any]) -> tuple[Netlink, Link]:
    """The netlink socket of this namespace and the interface of the
    ``interface`` option; raises if the backend cannot work here."""
    why = unavailable_reason()
    if why is not None:
        raise BackendUnavailable(f"backend 'xdp_udp' is not available here: {why}")
    interface = options.get("interface") or os.environ.get(ENV_INTERFACE)
    if not interface or not isinstance(interface, str):
        raise ConfigError(f"xdp_udp needs interface= (an interface name), got {interface!r}")
    nl = Netlink()
    try:
        return nl, nl.link(interface)
    except OSError as exc:
        nl.close()
        raise ConfigError(str(exc.strerror)) from None


def _port_socket(family: int) -> socket.socket:
    """The kernel UDP socket that reserves a Bind's port (IPv6: IPv6 only,
    as the Bind takes no IPv4)."""
    sock = socket.socket(family, socket.SOCK_DGRAM)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    return sock


def _local(sock: socket.socket, link: Link) -> tuple[tuple[int, int], bytes, int]:
    """(driver key, packed local address, port in network order as the
    native side reads it) of the port's socket."""
    name = sock.getsockname()
    raw = socket.inet_pton(sock.family, name[0])
    lport = int.from_bytes(name[1].to_bytes(2, "big"), "little")
    netns = os.stat("/proc/thread-self/ns/net").st_ino
    return (netns, link.index), raw, lport


def _same(a: str, b: str) -> bool:
    return ipaddress.ip_address(a) == ipaddress.ip_address(b)


def _link_local(host: str) -> bool:
    return is_ipv6(host) and ipaddress.IPv6Address(host).is_link_local


def _fname(family: int) -> str:
    return "IPv6" if family == socket.AF_INET6 else "IPv4"
