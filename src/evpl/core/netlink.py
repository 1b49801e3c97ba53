"""Just enough rtnetlink for the ``xdp_udp`` backend.

An AF_XDP Bind writes whole Ethernet frames, so it needs what the kernel's
IP stack would otherwise know: the interface's MAC address, MTU, receive
queues and IPv4 and IPv6 addresses, the route to a destination (its next
hop), and the next hop's MAC address from the kernel's neighbour table (ARP
for IPv4, neighbour discovery for IPv6). Resolving stays the kernel's job:
when the table has no usable entry, :meth:`Netlink.solicit` asks the kernel
to resolve it (``NTF_USE``), as its own UDP stack would.

A :class:`Netlink` answers for the network namespace it was created in
(its socket's), whichever namespace the calling thread is in later.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from dataclasses import dataclass

__all__ = ["Link", "Netlink", "NetlinkError"]

NETLINK_ROUTE = 0
RTM_GETLINK, RTM_NEWNEIGH, RTM_GETNEIGH, RTM_GETADDR, RTM_GETROUTE = 18, 28, 30, 22, 26
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP, NLM_F_REPLACE, NLM_F_CREATE = 0x1, 0x4, 0x300, 0x100, 0x400
NLMSG_ERROR, NLMSG_DONE = 2, 3
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_NUM_RX_QUEUES = 1, 3, 4, 32
IFA_ADDRESS, IFA_LOCAL = 1, 2
IFA_F_TENTATIVE, IFA_F_DADFAILED = 0x40, 0x08
RTA_DST, RTA_OIF, RTA_GATEWAY = 1, 4, 5
NDA_DST, NDA_LLADDR = 1, 2
NTF_USE = 0x01
NUD_PERMANENT = 0x80
# neighbour states whose link-layer address may be used
NUD_USABLE = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80  # REACHABLE STALE DELAY PROBE NOARP PERMANENT


class NetlinkError(OSError):
    """The kernel refused a netlink request."""


@dataclass(frozen=True)
class Link:
    """An interface as the xdp_udp backend needs it."""

    name: str
    index: int
    mac: bytes
    mtu: int
    rx_queues: int
    ipv4: tuple[str, ...]
    ipv6: tuple[str, ...] = ()      # usable ones (not tentative), global ones first


def _attrs(data: bytes, off: int) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    while off + 4 <= len(data):
        alen, atype = struct.unpack_from("=HH", data, off)
        if alen < 4:
            break
        out[atype & 0x3FFF] = data[off + 4:off + alen]
        off += (alen + 3) & ~3
    return out


def _attr(atype: int, value: bytes) -> bytes:
    a = struct.pack("=HH", 4 + len(value), atype) + value
    return a + b"\0" * (-len(a) % 4)


class Netlink:
    """An rtnetlink socket of the current network namespace."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                   NETLINK_ROUTE)
        self._sock.settimeout(5.0)
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    def _request(self, mtype: int, flags: int, body: bytes) -> list[tuple[int, bytes]]:
        """Send one request; the replies as (type, payload), until DONE or the
        ACK/answer. Raises NetlinkError for an error reply."""
        self._seq += 1
        seq = self._seq
        msg = struct.pack("=IHHII", 16 + len(body), mtype, NLM_F_REQUEST | flags, seq, 0) + body
        self._sock.send(msg)
        out: list[tuple[int, bytes]] = []
        while True:
            data = self._sock.recv(1 << 16)
            off = 0
            while off + 16 <= len(data):
                mlen, rtype, _flags, rseq, _pid = struct.unpack_from("=IHHII", data, off)
                if mlen < 16:
                    return out
                payload = data[off + 16:off + mlen]
                off += (mlen + 3) & ~3
                if rseq != seq:
                    continue
                if rtype == NLMSG_DONE:
                    return out
                if rtype == NLMSG_ERROR:
                    err = -struct.unpack_from("=i", payload)[0]
                    if err:
                        raise NetlinkError(err, os.strerror(err))
                    return out
                out.append((rtype, payload))
                if not flags & NLM_F_DUMP:
                    return out

    def link(self, name: str) -> Link:
        """The interface ``name`` (OSError ENODEV if there is none)."""
        body = struct.pack("=BxHiII", socket.AF_UNSPEC, 0, 0, 0, 0)
        body += _attr(IFLA_IFNAME, name.encode() + b"\0")
        try:
            replies = self._request(RTM_GETLINK, 0, body)
        except NetlinkError as exc:
            raise OSError(exc.errno, f"no interface {name!r} in this network namespace") from None
        _typ, payload = replies[0]
        index = struct.unpack_from("=i", payload, 4)[0]
        a = _attrs(payload, 16)
        mtu = struct.unpack("=I", a[IFLA_MTU])[0] if IFLA_MTU in a else 1500
        nrx = struct.unpack("=I", a[IFLA_NUM_RX_QUEUES])[0] if IFLA_NUM_RX_QUEUES in a else 1
        return Link(name, index, a.get(IFLA_ADDRESS, b"\0" * 6), mtu, max(1, nrx),
                    self.ipv4(index), self.ipv6(index))

    def ipv4(self, index: int) -> tuple[str, ...]:
        """The IPv4 addresses of interface ``index``."""
        body = struct.pack("=BBBBI", socket.AF_INET, 0, 0, 0, 0)
        out = []
        for _typ, payload in self._request(RTM_GETADDR, NLM_F_DUMP, body):
            if struct.unpack_from("=I", payload, 4)[0] != index:
                continue
            a = _attrs(payload, 8)
            if IFA_LOCAL in a:
                out.append(socket.inet_ntoa(a[IFA_LOCAL]))
        return tuple(out)

    def ipv6(self, index: int) -> tuple[str, ...]:
        """The IPv6 addresses of interface ``index`` that can be used as a
        source (not tentative, DAD not failed): global ones first, then the
        link-local ones."""
        body = struct.pack("=BBBBI", socket.AF_INET6, 0, 0, 0, 0)
        glob, local = [], []
        try:
            replies = self._request(RTM_GETADDR, NLM_F_DUMP, body)
        except NetlinkError:
            return ()                       # a kernel without IPv6
        for _typ, payload in replies:
            flags, _scope, aindex = struct.unpack_from("=BBI", payload, 2)
            if aindex != index or flags & (IFA_F_TENTATIVE | IFA_F_DADFAILED):
                continue
            a = _attrs(payload, 8)
            raw = a.get(IFA_LOCAL) or a.get(IFA_ADDRESS)
            if raw and len(raw) == 16:
                addr = ipaddress.IPv6Address(raw)
                (local if addr.is_link_local else glob).append(str(addr))
        return tuple(glob + local)

    def next_hop(self, dst: str, oif: int = 0) -> tuple[str, int]:
        """(next hop address, output interface index) of the route to
        ``dst`` (IPv4 or IPv6); ``oif``: the interface a link-local IPv6
        destination is on."""
        family, raw = _family(dst)
        body = struct.pack("=BBBBBBBBI", family, 8 * len(raw), 0, 0, 0, 0, 0, 0, 0)
        body += _attr(RTA_DST, raw)
        if oif:
            body += _attr(RTA_OIF, struct.pack("=i", oif))
        replies = self._request(RTM_GETROUTE, 0, body)
        a = _attrs(replies[0][1], 12)
        gw = socket.inet_ntop(family, a[RTA_GATEWAY]) if RTA_GATEWAY in a else dst
        oif = struct.unpack("=i", a[RTA_OIF])[0] if RTA_OIF in a else 0
        return gw, oif

    def neighbour(self, ip: str, index: int) -> bytes | None:
        """The MAC address of ``ip`` (IPv4 or IPv6) on interface ``index``
        if the kernel's neighbour table has a usable entry, else None."""
        family, raw = _family(ip)
        body = struct.pack("=BxxxiHBB", family, index, 0, 0, 0)
        body += _attr(NDA_DST, raw)
        try:
            replies = self._request(RTM_GETNEIGH, 0, body)
        except NetlinkError:
            return None                     # no entry
        if not replies:
            return None
        payload = replies[0][1]
        state = struct.unpack_from("=H", payload, 8)[0]
        lladdr = _attrs(payload, 12).get(NDA_LLADDR)
        if not state & NUD_USABLE or not lladdr or len(lladdr) != 6:
            return None
        return lladdr

    def solicit(self, ip: str, index: int) -> None:
        """Ask the kernel to resolve ``ip`` on interface ``index`` (ARP, or
        an IPv6 neighbour solicitation)."""
        # as `ip neigh replace IP dev DEV use` does: with NTF_USE the state
        # given is not applied, but the kernel wants one
        family, raw = _family(ip)
        body = struct.pack("=BxxxiHBB", family, index, NUD_PERMANENT, NTF_USE, 0)
        body += _attr(NDA_DST, raw)
        try:
            self._request(RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_REPLACE | NLM_F_ACK, body)
        except NetlinkError:
            pass                            # the next lookup tells


def _family(ip: str) -> tuple[int, bytes]:
    """(address family, packed address) of a numeric IPv4 or IPv6 address."""
    if ":" in ip:
        return socket.AF_INET6, socket.inet_pton(socket.AF_INET6, ip)
    return socket.AF_INET, socket.inet_aton(ip)


def is_ipv6(host: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address)
    except ValueError:
        return False


def is_ipv4(host: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(host), ipaddress.IPv4Address)
    except ValueError:
        return False
