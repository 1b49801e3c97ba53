"""``Loop.bind("xdp_udp", ...)``: checks and set-up for the AF_XDP backend.

Everything per datagram happens in ``evpl._native.xdp``; this module checks
the address and interface, reserves the port with a kernel UDP socket and
hands the interface's description (from rtnetlink) to the native driver.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Any

from evpl._native.bind import Bind, Limits
from evpl.core.netlink import Netlink, is_ipv4
from evpl.errors import BackendUnavailable, ConfigError, transport_error

__all__ = ["bind"]


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
    """An xdp_udp Bind on ``address``, an IPv4 (host, port) of the interface
    given as ``interface=`` (default: ``$EVPL_XDP_INTERFACE``); host may be
    "0.0.0.0" (any address of the interface)."""
    from evpl._native import xdp

    if not (isinstance(address, tuple) and len(address) == 2):
        raise ConfigError(f"xdp_udp addresses are (IPv4 address, port) tuples, got {address!r}")
    host, port = address
    if not isinstance(host, str) or not is_ipv4(host):
        raise ConfigError(f"xdp_udp binds numeric IPv4 addresses, got {host!r}")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise ConfigError(f"port must be an int in 0..65535, got {port!r}")
    why = unavailable_reason()
    if why is not None:
        raise BackendUnavailable(f"backend 'xdp_udp' is not available here: {why}")
    interface = options.get("interface") or os.environ.get(ENV_INTERFACE)
    if not interface or not isinstance(interface, str):
        raise ConfigError(f"xdp_udp needs interface= (an interface name), got {interface!r}")
    nl = Netlink()
    try:
        try:
            link = nl.link(interface)
        except OSError as exc:
            raise ConfigError(str(exc.strerror)) from None
        if host != "0.0.0.0" and host not in link.ipv4:
            raise ConfigError(f"{host} is not an address of {interface} "
                              f"(it has {', '.join(link.ipv4) or 'no IPv4 address'})")
        if not link.ipv4:
            raise ConfigError(f"{interface} has no IPv4 address to send from")
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise transport_error(exc.errno or errno.EINVAL, f"bind {address!r}") from None
        bound_port = sock.getsockname()[1]
        netns = os.stat("/proc/thread-self/ns/net").st_ino
        laddr = int.from_bytes(socket.inet_aton(host), "little")
        lport = int.from_bytes(bound_port.to_bytes(2, "big"), "little")
    except BaseException:
        nl.close()
        raise
    return xdp.xdp_datagram(loop, sock.detach(), backend, handler, limits, link, nl,
                            (netns, link.index), laddr, lport)
