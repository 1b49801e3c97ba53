"""``xdp_udp`` over IPv6, against the kernel's own networking across a veth
pair (tests/core/vethnet.py: fd00:<n>::1 on side "a", ::2 on side "b",
added ``nodad``).

evpl binds xdp_udp on side "a"; side "b" is the kernel: Python UDP sockets,
ping, a TCP connection, and raw frames written with an AF_PACKET socket
(bad, zero and partial checksums, truncated lengths, extension headers).
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys

import pytest

import evpl

from .helpers import TIMEOUT, InThread
from .vethnet import Echo, Recorder, VethNet, veth_unavailable_reason

_why = veth_unavailable_reason()
pytestmark = pytest.mark.skipif(_why is not None, reason=f"xdp_udp over veth: {_why}")


@pytest.fixture(scope="module")
def net6():
    """One veth pair for this module, IPv6 neighbour discovery settled."""
    with VethNet() as v:
        v.settle_ipv6()
        yield v


def xbind(loop, net, handler, host=None, side="a", **options):
    with net.inside(side):
        return loop.bind("xdp_udp", (host or net.ip6[side], 0), handler,
                         interface=net.ifname[side], **options)


def peer6(net, side="b", host=None):
    """A kernel UDP socket on ``side``, IPv6."""
    with net.inside(side):
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        if host and host.startswith("fe80"):
            s.bind((host, 0, 0, socket.if_nametoindex(net.ifname[side])))
        else:
            s.bind((host or net.ip6[side], 0))
    s.settimeout(TIMEOUT)
    return s


def xstats(loop):
    return {k[4:]: v for k, v in loop.stats().items() if k.startswith("xdp_")}


def test_round_trips_of_several_sizes(loop, net6):
    echo = Echo()
    b = xbind(loop, net6, echo)
    la = b.local_address
    assert la[0] == net6.ip6["a"] and la[1] > 0
    s = peer6(net6)
    payloads = [os.urandom(n) for n in (0, 1, 17, 100, 1000, 1232, 1452)]

    def client():
        got = []
        for p in payloads:
            s.sendto(p, la[:2])
            got.append(s.recvfrom(2048))
        return got

    t = InThread(loop, client)
    loop.run_until(t.done, timeout=TIMEOUT)
    got = t.get()
    assert [d for d, _ in got] == payloads          # the kernel accepted our checksums
    assert all(a[:2] == la[:2] for _, a in got)
    assert [d for d, _ in echo.got] == payloads
    assert {a for _, a in echo.got} == {s.getsockname()}   # (host, port, 0, 0) as the kernel's
    st = xstats(loop)
    assert st["rx_ipv6"] == len(payloads) and st["tx_ipv6"] == len(payloads)
    assert st["tx_zerocopy"] == len(payloads)       # echoed from the frames they came in
    assert st["rx_bad_checksum"] == 0
    # the kernel peer on veth leaves its UDP checksums to an offload that
    # never runs: partial checksums, verified as such
    assert st["rx_partial_checksum"] == len(payloads)
    s.close()


def test_evpl_sends_first_neighbour_discovery(loop, net6):
    """evpl starts the conversation: the next hop's MAC comes from the
    kernel's IPv6 neighbour table, filled by neighbour discovery on request."""
    net6.run("a", ["ip", "-6", "neigh", "flush", "all"])
    assert "lladdr" not in net6.run("a", ["ip", "-6", "neigh", "show", net6.ip6["b"]]).stdout
    b = xbind(loop, net6, Recorder())
    s = peer6(net6)
    for i in range(10):
        b.sendto(b"v6-from-evpl-%d" % i, s.getsockname())
    t = InThread(loop, lambda: [s.recvfrom(2048) for _ in range(10)])
    loop.run_until(t.done, timeout=TIMEOUT)
    got = t.get()
    assert sorted(d for d, _ in got) == sorted(b"v6-from-evpl-%d" % i for i in range(10))
    assert {a[:2] for _, a in got} == {b.local_address[:2]}
    assert "lladdr" in net6.run("a", ["ip", "-6", "neigh", "show", net6.ip6["b"]]).stdout
    s.close()


def test_any_address_answers_from_global_and_link_local(loop, net6):
    """A Bind on "::" takes datagrams to every IPv6 address of the interface;
    it answers a link-local peer from its link-local address (scope: the
    interface, as the kernel reports it) and a global one from its global
    address."""
    echo = Echo()
    b = xbind(loop, net6, echo, host="::")
    port = b.local_address[1]
    a_ll, b_ll = net6.link_local("a"), net6.link_local("b")
    s_glob = peer6(net6)
    s_ll = peer6(net6, host=b_ll)
    with net6.inside("b"):
        b_index = socket.if_nametoindex(net6.ifname["b"])
    with net6.inside("a"):
        a_index = socket.if_nametoindex(net6.ifname["a"])

    def client():
        s_glob.sendto(b"to-global", (net6.ip6["a"], port))
        g = s_glob.recvfrom(100)
        s_ll.sendto(b"to-link-local", (a_ll, port, 0, b_index))
        ll = s_ll.recvfrom(100)
        return g, ll

    t = InThread(loop, client)
    loop.run_until(t.done, timeout=TIMEOUT)
    (gd, ga), (lld, lla) = t.get()
    assert gd == b"to-global" and ga[:2] == (net6.ip6["a"], port)
    assert lld == b"to-link-local" and lla[:2] == (a_ll, port)
    addrs = dict((d, a) for d, a in echo.got)
    assert addrs[b"to-global"] == (net6.ip6["b"], s_glob.getsockname()[1], 0, 0)
    assert addrs[b"to-link-local"] == (b_ll, s_ll.getsockname()[1], 0, a_index)
    s_glob.close()
    s_ll.close()


def test_over_mtu_send_is_refused(loop, net6):
    b = xbind(loop, net6, Recorder())
    s = peer6(net6)
    with pytest.raises(ValueError, match="MTU 1500 less the IPv6"):
        b.sendto(b"x" * 1453, s.getsockname())
    assert b.queued_bytes == 0
    b.sendto(b"y" * 1452, s.getsockname())
    t = InThread(loop, lambda: s.recvfrom(4096))
    loop.run_until(t.done, timeout=TIMEOUT)
    assert t.get()[0] == b"y" * 1452
    s.close()


def test_ipv4_to_an_ipv6_bind_is_not_sent(loop, net6):
    """An IPv6 Bind has no IPv4 source: a datagram to an IPv4 address is
    dropped and counted, as the kernel refuses it on an IPv6-only socket."""
    b = xbind(loop, net6, Recorder())
    before = loop.stats()["datagram_errors"]
    b.sendto(b"nowhere", (net6.ip["b"], 9))
    loop.run_until(lambda: loop.stats()["datagram_errors"] > before, timeout=TIMEOUT)
    assert b.queued_bytes == 0 and not b.closed


def test_ipv4_and_ipv6_binds_side_by_side(loop, net6):
    rec4, rec6 = Recorder(), Recorder()
    with net6.inside("a"):
        b4 = loop.bind("xdp_udp", ("0.0.0.0", 0), rec4, interface=net6.ifname["a"])
        b6 = loop.bind("xdp_udp", ("::", b4.local_address[1]), rec6,
                       interface=net6.ifname["a"])
    port = b4.local_address[1]
    assert b6.local_address[1] == port
    with net6.inside("b"):
        s4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s6 = peer6(net6)
    s4.sendto(b"four", (net6.ip["a"], port))
    s6.sendto(b"six", (net6.ip6["a"], port))
    loop.run_until(lambda: rec4.got and rec6.got, timeout=TIMEOUT)
    assert [d for d, _ in rec4.got] == [b"four"]
    assert [d for d, _ in rec6.got] == [b"six"]
    s4.close()
    s6.close()


def test_ndp_ping_tcp_and_other_ports_keep_working(loop, net6):
    """The program passes ICMPv6 (neighbour discovery, echo), TCP and other
    UDP ports to the kernel."""
    b = xbind(loop, net6, Echo(), host="::")
    assert net6.xdp_prog("a") == "evpl_xdp_udp"
    net6.run("b", ["ip", "-6", "neigh", "flush", "all"])
    ping = net6.run("b", ["ping", "-6", "-c", "2", "-i", "0.2", "-W", "5", net6.ip6["a"]])
    assert ping.returncode == 0, ping.stdout + ping.stderr
    assert "lladdr" in net6.run("b", ["ip", "-6", "neigh", "show", net6.ip6["a"]]).stdout
    with net6.inside("a"):
        srv = socket.create_server((net6.ip6["a"], 0), family=socket.AF_INET6)
    srv.settimeout(TIMEOUT)
    script = ("import socket,sys; c=socket.create_connection((sys.argv[1], int(sys.argv[2])), 10);"
              "c.sendall(b'tcp6-ok'); print(c.recv(100).decode())")
    proc = net6.popen("b", [sys.executable, "-c", script, net6.ip6["a"],
                            str(srv.getsockname()[1])], stdout=subprocess.PIPE, text=True)
    conn, _ = srv.accept()
    conn.settimeout(TIMEOUT)
    assert conn.recv(100) == b"tcp6-ok"
    conn.sendall(b"back")
    assert proc.communicate(timeout=TIMEOUT)[0].strip() == "back"
    conn.close()
    srv.close()
    with net6.inside("a"):
        k = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        k.bind((net6.ip6["a"], 0))
    k.settimeout(TIMEOUT)
    s = peer6(net6)
    s.sendto(b"for the kernel", k.getsockname()[:2])
    assert k.recvfrom(100)[0] == b"for the kernel"
    k.close()
    s.close()
    assert not b.closed


# ---- raw frames -------------------------------------------------------------

def _sum16(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def _frame6(dmac: bytes, smac: bytes, src: str, dst: str, sport: int, dport: int,
            payload: bytes, *, csum: str = "good", plen_extra: int = 0, ulen_extra: int = 0,
            ext: bytes = b"") -> bytes:
    """Ethernet + IPv6 (+ ``ext``: extension headers, the first next header
    given by ext[0:1] as a pair (type, bytes)) + UDP."""
    ulen = 8 + len(payload)
    saddr, daddr = socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst)
    pseudo = saddr + daddr + struct.pack("!IxxxB", ulen, 17)
    udp = struct.pack("!HHHH", sport, dport, ulen + ulen_extra, 0) + payload
    full = ~_sum16(pseudo + udp) & 0xFFFF or 0xFFFF
    c = {"good": full, "zero": 0, "bad": (full ^ 0x5A5A) or 1,
         "partial": _sum16(pseudo)}[csum]     # what a CHECKSUM_PARTIAL sender leaves
    udp = udp[:6] + struct.pack("!H", c) + udp[8:]
    nexthdr = 17
    if ext:
        nexthdr, ext = ext[0], ext[1:]
    ip = struct.pack("!IHBB16s16s", 6 << 28, len(ext) + len(udp) + plen_extra, nexthdr, 64,
                     saddr, daddr)
    return dmac + smac + b"\x86\xdd" + ip + ext + udp


def _mac(net, side):
    out = net.run(side, ["ip", "-j", "link", "show", "dev", net.ifname[side]]).stdout
    return bytes.fromhex(json.loads(out)[0]["address"].replace(":", ""))


def test_hostile_frames_are_dropped_and_counted(loop, net6):
    rec = Recorder()
    b = xbind(loop, net6, rec)
    port = b.local_address[1]
    with net6.inside("b"):
        raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        raw.bind((net6.ifname["b"], 0))
    dmac, smac = _mac(net6, "a"), _mac(net6, "b")
    src, dst = net6.ip6["b"], net6.ip6["a"]

    def send(payload, **kw):
        raw.send(_frame6(dmac, smac, src, dst, 4000, port, payload, **kw))

    def marker(n):
        send(b"marker-%d" % n)
        loop.run_until(lambda: any(d == b"marker-%d" % n for d, _ in rec.got), timeout=TIMEOUT)

    send(b"bad-checksum", csum="bad")
    send(b"zero-checksum", csum="zero")                 # mandatory over IPv6
    send(b"claims-more-than-it-has", plen_extra=200)    # truncated IPv6 payload
    send(b"udp-longer-than-ip", ulen_extra=50)
    marker(1)
    st = xstats(loop)
    assert st["rx_bad_checksum"] == 2
    assert st["rx_truncated"] == 2
    assert [d for d, _ in rec.got] == [b"marker-1"]
    assert rec.got[0][1] == (src, 4000, 0, 0)
    # a partial checksum (the kernel peer's offload on veth) is accepted
    send(b"partial", csum="partial")
    marker(2)
    assert [d for d, _ in rec.got] == [b"marker-1", b"partial", b"marker-2"]
    assert xstats(loop)["rx_partial_checksum"] >= 1
    # extension headers: the program leaves those to the kernel, whose
    # socket for the port drops them (counted)
    dest_opts = bytes([60]) + bytes([17, 0]) + b"\x01\x04\0\0\0\0"   # Dst Options, PadN
    send(b"after-dest-options", ext=dest_opts)
    frag = bytes([44]) + struct.pack("!BxHI", 17, 0, 0x1234)         # an atomic fragment
    send(b"in-a-fragment-header", ext=frag)
    marker(3)
    assert b"after-dest-options" not in [d for d, _ in rec.got]
    assert b"in-a-fragment-header" not in [d for d, _ in rec.got]
    loop.run_until(lambda: xstats(loop)["kernel_socket_drops"] >= 2, timeout=TIMEOUT)
    # a frame cut inside the IPv6 header never reaches evpl's socket
    raw.send(_frame6(dmac, smac, src, dst, 4000, port, b"")[:14 + 30])
    marker(4)
    assert [d for d, _ in rec.got] == [b"marker-1", b"partial", b"marker-2", b"marker-3",
                                       b"marker-4"]
    raw.close()


def test_connected_bind_over_ipv6(loop, net6):
    """loop.connect("xdp_udp", ...) to a kernel IPv6 socket: send() reaches
    it, only its datagrams come back, a refusal closes the Bind."""
    s = peer6(net6)
    got = Recorder()
    with net6.inside("a"):
        c = loop.connect("xdp_udp", s.getsockname()[:2], got, interface=net6.ifname["a"])
    assert c.peer_address[:2] == s.getsockname()[:2]
    assert c.local_address[0] == net6.ip6["a"]
    c.send(b"hello-v6")
    t = InThread(loop, lambda: s.recvfrom(100))
    loop.run_until(t.done, timeout=TIMEOUT)
    data, addr = t.get()
    assert data == b"hello-v6" and addr[:2] == c.local_address[:2]
    other = peer6(net6)
    other.sendto(b"not from the peer", c.local_address[:2])
    s.sendto(b"from the peer", c.local_address[:2])
    loop.run_until(lambda: got.got, timeout=TIMEOUT)
    assert [d for d, _ in got.got] == [b"from the peer"]
    loop.run_until(lambda: xstats(loop)["rx_not_peer"] >= 1, timeout=TIMEOUT)
    other.close()
    dead = s.getsockname()[:2]
    s.close()

    class Closed(evpl.Handler):
        def __init__(self):
            self.err = []

        def on_closed(self, bind, error):
            self.err.append(error)

    h = Closed()
    with net6.inside("a"):
        c2 = loop.connect("xdp_udp", dead, h, interface=net6.ifname["a"])
    c2.send(b"anyone?")
    loop.run_until(lambda: h.err, timeout=TIMEOUT)
    assert isinstance(h.err[0], evpl.ConnectionRefused)
