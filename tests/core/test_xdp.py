"""``xdp_udp`` against the kernel's own networking, across a veth pair.

evpl binds xdp_udp on side "a" of a veth pair (tests/core/vethnet.py); side
"b" is the kernel: Python UDP sockets, socat, ping, a TCP connection, and
raw frames written with an AF_PACKET socket (bad checksums, truncated
headers, other ports). The generic datagram behaviour suite also runs on
xdp_udp (test_datagram.py, test_batch.py through ``dgram_net``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys

import pytest

import evpl
from evpl._native import xdp as native_xdp

from .helpers import TIMEOUT, InThread, Ticker
from .vethnet import Echo, Recorder, VethNet, veth_unavailable_reason

_why = veth_unavailable_reason()
pytestmark = pytest.mark.skipif(_why is not None, reason=f"xdp_udp over veth: {_why}")


@pytest.fixture
def net():
    """A veth pair of this test's own (some tests attach programs by hand)."""
    with VethNet() as v:
        yield v


def xbind(loop, net, handler, side="a", **options):
    with net.inside(side):
        return loop.bind("xdp_udp", (net.ip[side], 0), handler, interface=net.ifname[side],
                         **options)


def peer(net, side="b", rcvbuf=None):
    """A kernel UDP socket on ``side``."""
    with net.inside(side):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        if rcvbuf:
            s.setsockopt(socket.SOL_SOCKET, 33, rcvbuf)     # SO_RCVBUFFORCE (root)
        s.bind((net.ip[side], 0))
    s.settimeout(TIMEOUT)
    return s


def xstats(loop):
    return {k[4:]: v for k, v in loop.stats().items() if k.startswith("xdp_")}


def test_kernel_peer_both_directions(loop, net):
    echo = Echo()
    b = xbind(loop, net, echo)
    assert b.local_address[0] == net.ip["a"]
    s = peer(net)
    payloads = [os.urandom(n) for n in (0, 1, 17, 100, 1000, 1472)]

    def client():
        got = []
        for p in payloads:
            s.sendto(p, b.local_address)
            got.append(s.recvfrom(2048))
        return got

    t = InThread(loop, client)
    loop.run_until(t.done, timeout=TIMEOUT)
    got = t.get()
    assert [d for d, _ in got] == payloads          # the kernel accepted our checksums
    assert all(a == b.local_address for _, a in got)
    assert [d for d, _ in echo.got] == payloads
    assert {a for _, a in echo.got} == {s.getsockname()}
    st = xstats(loop)
    assert st["mode"] in ("copy", "zerocopy") and st["attach"] in ("native", "generic")
    assert st["rx_frames"] >= len(payloads) and st["tx_frames"] >= len(payloads)
    # the kernel peer on veth leaves UDP checksums to an offload (partial)
    assert st["rx_partial_checksum"] + st["rx_no_checksum"] + st["rx_frames"] > 0
    assert st["tx_zerocopy"] == len(payloads)       # echoed from the frames they came in
    s.close()


def test_evpl_sends_first_to_a_kernel_socket(loop, net):
    """evpl starts the conversation: the next hop's MAC comes from the
    kernel's neighbour table, which the kernel fills by ARP on request."""
    net.run("a", ["ip", "neigh", "flush", "all"])
    rec = Recorder()
    b = xbind(loop, net, rec)
    s = peer(net)
    for i in range(20):
        b.sendto(b"from-evpl-%d" % i, s.getsockname())
    t = InThread(loop, lambda: [s.recvfrom(2048) for _ in range(20)])
    loop.run_until(t.done, timeout=TIMEOUT)
    got = t.get()
    assert sorted(d for d, _ in got) == sorted(b"from-evpl-%d" % i for i in range(20))
    assert {a for _, a in got} == {b.local_address}
    neigh = net.run("a", ["ip", "neigh", "show", net.ip["b"]]).stdout
    assert "lladdr" in neigh
    s.close()


def test_socat_peer(loop, net):
    echo = Echo()
    b = xbind(loop, net, echo)
    host, port = b.local_address
    proc = net.popen("b", ["socat", "-T", "5", "-", f"UDP:{host}:{port}"],
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    proc.stdin.write(b"hello through socat\n")
    proc.stdin.flush()
    t = InThread(loop, lambda: proc.stdout.readline())
    loop.run_until(t.done, timeout=TIMEOUT)
    assert t.get() == b"hello through socat\n"
    proc.kill()
    proc.wait(TIMEOUT)
    assert echo.got[0][0] == b"hello through socat\n"


def test_arp_ping_and_tcp_keep_working(loop, net):
    """The program passes everything but bound UDP ports to the kernel."""
    b = xbind(loop, net, Echo())
    assert net.xdp_prog("a") == "evpl_xdp_udp"
    net.run("b", ["ip", "neigh", "flush", "all"])
    ping = net.run("b", ["ping", "-c", "2", "-i", "0.2", "-W", "5", net.ip["a"]])
    assert ping.returncode == 0, ping.stdout + ping.stderr
    with net.inside("a"):
        srv = socket.create_server((net.ip["a"], 0))
    srv.settimeout(TIMEOUT)
    script = ("import socket,sys; c=socket.create_connection((sys.argv[1], int(sys.argv[2])), 10);"
              "c.sendall(b'tcp-ok'); print(c.recv(100).decode())")
    proc = net.popen("b", [sys.executable, "-c", script, net.ip["a"], str(srv.getsockname()[1])],
                     stdout=subprocess.PIPE, text=True)
    conn, _ = srv.accept()
    conn.settimeout(TIMEOUT)
    assert conn.recv(100) == b"tcp-ok"
    conn.sendall(b"back")
    assert proc.communicate(timeout=TIMEOUT)[0].strip() == "back"
    conn.close()
    srv.close()
    # a UDP port evpl did not bind still reaches the kernel's socket
    with net.inside("a"):
        k = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        k.bind((net.ip["a"], 0))
    k.settimeout(TIMEOUT)
    s = peer(net)
    s.sendto(b"for the kernel", k.getsockname())
    assert k.recvfrom(100)[0] == b"for the kernel"
    k.close()
    s.close()
    assert not b.closed


# ---- raw frames -------------------------------------------------------------

def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _frame(dmac: bytes, smac: bytes, src: str, dst: str, sport: int, dport: int,
           payload: bytes, *, udp_csum: str = "good", ip_csum_ok: bool = True,
           tot_extra: int = 0) -> bytes:
    ulen = 8 + len(payload)
    saddr, daddr = socket.inet_aton(src), socket.inet_aton(dst)
    pseudo = saddr + daddr + struct.pack("!BBH", 0, 17, ulen)
    udp = struct.pack("!HHHH", sport, dport, ulen, 0) + payload
    c = {"good": _csum(pseudo + udp) or 0xFFFF, "zero": 0,
         "bad": (_csum(pseudo + udp) ^ 0x5A5A) or 1}[udp_csum]
    udp = udp[:6] + struct.pack("!H", c) + udp[8:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + ulen + tot_extra, 1, 0x4000, 64, 17, 0,
                     saddr, daddr)
    ipc = _csum(ip) if ip_csum_ok else (_csum(ip) ^ 0x0101)
    ip = ip[:10] + struct.pack("!H", ipc) + ip[12:]
    return dmac + smac + b"\x08\x00" + ip + udp


def _mac(net, side):
    out = net.run(side, ["ip", "-j", "link", "show", "dev", net.ifname[side]]).stdout
    return bytes.fromhex(json.loads(out)[0]["address"].replace(":", ""))


def test_bad_frames_are_dropped_and_counted(loop, net):
    rec = Recorder()
    b = xbind(loop, net, rec)
    port = b.local_address[1]
    with net.inside("b"):
        raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        raw.bind((net.ifname["b"], 0))
    dmac, smac = _mac(net, "a"), _mac(net, "b")
    src, dst = net.ip["b"], net.ip["a"]

    def send(payload, **kw):
        raw.send(_frame(dmac, smac, src, dst, 4000, port, payload, **kw))

    send(b"bad-udp-checksum", udp_csum="bad")
    send(b"bad-ip-checksum", ip_csum_ok=False)
    send(b"claims-more-than-it-has", tot_extra=200)     # truncated
    send(b"good")                                       # a marker after the bad ones
    loop.run_until(lambda: rec.got, timeout=TIMEOUT)
    assert rec.got == [(b"good", (src, 4000))]
    st = xstats(loop)
    assert st["rx_bad_checksum"] == 2
    assert st["rx_truncated"] == 1
    # no checksum at all is allowed over IPv4
    send(b"no-checksum", udp_csum="zero")
    loop.run_until(lambda: len(rec.got) >= 2, timeout=TIMEOUT)
    assert rec.got[1] == (b"no-checksum", (src, 4000))
    assert xstats(loop)["rx_no_checksum"] == 1
    # a frame cut inside the UDP header never reaches evpl's socket: the
    # program passes it to the kernel, which drops it; evpl keeps working
    raw.send(_frame(dmac, smac, src, dst, 4000, port, b"")[:14 + 20 + 4])
    send(b"still-alive")
    loop.run_until(lambda: len(rec.got) >= 3, timeout=TIMEOUT)
    assert rec.got[2][0] == b"still-alive"
    assert len(rec.got) == 3
    raw.close()


def test_over_mtu_send_is_refused(loop, net):
    b = xbind(loop, net, Recorder())
    s = peer(net)
    with pytest.raises(ValueError, match="MTU 1500"):
        b.sendto(b"x" * 1473, s.getsockname())
    assert b.queued_bytes == 0
    b.sendto(b"y" * 1472, s.getsockname())
    t = InThread(loop, lambda: s.recvfrom(4096))
    loop.run_until(t.done, timeout=TIMEOUT)
    assert t.get()[0] == b"y" * 1472
    s.close()


def test_header_pieces_are_copied_into_the_frame(loop, net):
    """A datagram sent as a header and data (drpc's packets) leaves as one
    frame holding both; the MTU check counts the header."""
    b = xbind(loop, net, Recorder())
    s = peer(net)
    with pytest.raises(ValueError, match="MTU 1500"):
        b.sendto(b"x" * 1460, s.getsockname(), header=b"h" * 13)
    payloads = [(b"%02d:" % i + b"h" * i, os.urandom(1472 - 3 - 2 * i)) for i in range(12)]
    for hdr, data in payloads:
        b.sendto(data, s.getsockname(), header=hdr)
    t = InThread(loop, lambda: [s.recvfrom(2048)[0] for _ in payloads])
    loop.run_until(t.done, timeout=TIMEOUT)
    assert t.get() == [h + d for h, d in payloads]
    assert b.queued_bytes == 0
    s.close()


def test_bind_errors(loop, net):
    with pytest.raises(evpl.ConfigError, match="interface"):
        loop.bind("xdp_udp", (net.ip["a"], 0), Recorder())
    with pytest.raises(evpl.ConfigError, match="not an address"):
        with net.inside("a"):
            loop.bind("xdp_udp", ("10.255.255.1", 0), Recorder(), interface=net.ifname["a"])
    with pytest.raises(evpl.ConfigError, match="numeric IPv4 or IPv6"):
        loop.bind("xdp_udp", ("localhost", 0), Recorder(), interface=net.ifname["a"])
    with pytest.raises(evpl.ConfigError, match="not an address"):
        with net.inside("a"):
            loop.bind("xdp_udp", ("::1", 0), Recorder(), interface=net.ifname["a"])
    with pytest.raises(evpl.ConfigError, match="IPv4-mapped"):
        loop.bind("xdp_udp", ("::ffff:10.0.0.1", 0), Recorder(), interface=net.ifname["a"])
    with pytest.raises(evpl.ConfigError, match="no interface"):
        with net.inside("a"):
            loop.bind("xdp_udp", (net.ip["a"], 0), Recorder(), interface="evx-xdp-none")
    with pytest.raises(evpl.ConfigError, match="xdp_udp option"):
        loop.bind("udp", ("127.0.0.1", 0), Recorder(), interface="lo")


def test_connect_errors(loop, net):
    iface = net.ifname["a"]
    with pytest.raises(evpl.ConfigError, match="port 0"):
        loop.connect("xdp_udp", (net.ip["b"], 0), Recorder(), interface=iface)
    with pytest.raises(evpl.ConfigError, match="does not go through"):
        with net.inside("a"):
            loop.connect("xdp_udp", ("127.0.0.1", 9), Recorder(), interface=iface)
    with pytest.raises(evpl.ConfigError, match="no framing"):
        loop.connect("xdp_udp", (net.ip["b"], 9), Recorder(), interface=iface,
                     framing=evpl.framing.length_prefix())
    with pytest.raises(evpl.ConfigError, match="xdp_udp option"):
        loop.connect("udp", ("127.0.0.1", 9), Recorder(), interface="lo")
    assert net.xdp_prog("a") is None            # nothing was attached on the way


def test_client_code_unchanged_with_the_interface_in_the_environment(loop, net, monkeypatch):
    """With EVPL_XDP_INTERFACE set, a udp client's calls work as they are
    on xdp_udp: only the backend's name differs."""
    s = peer(net)

    def client(backend):
        rec = Recorder()
        return loop.connect(backend, s.getsockname(), rec), rec

    monkeypatch.setenv("EVPL_XDP_INTERFACE", net.ifname["a"])
    with net.inside("a"):
        c, rec = client("xdp_udp")
    c.send(b"ping")
    t = InThread(loop, lambda: s.recvfrom(100))
    loop.run_until(t.done, timeout=TIMEOUT)
    data, addr = t.get()
    assert data == b"ping" and addr == c.local_address
    s.sendto(b"pong", addr)
    loop.run_until(lambda: rec.got, timeout=TIMEOUT)
    assert rec.got == [(b"pong", s.getsockname())]
    assert xstats(loop)["tx_frames"] == 1 and xstats(loop)["rx_frames"] == 1
    s.close()


def test_detached_after_close(loop, net):
    b = xbind(loop, net, Recorder())
    b2 = xbind(loop, net, Recorder())
    assert net.xdp_prog("a") == "evpl_xdp_udp"
    b.close()
    loop.run_once(0)
    assert net.xdp_prog("a") == "evpl_xdp_udp"         # b2 still uses it
    b2.close()
    loop.run_once(0)
    assert net.xdp_prog("a") is None
    b3 = xbind(loop, net, Recorder())                   # and it comes back
    assert net.xdp_prog("a") == "evpl_xdp_udp"
    loop.close()
    assert net.xdp_prog("a") is None
    assert b3.closed


_CHILD = """
import sys, evpl
loop = evpl.Loop()
b = loop.bind("xdp_udp", (sys.argv[1], 0), evpl.Handler(), interface=sys.argv[2])
print(b.local_address[1], flush=True)
loop.run()
"""


def test_sigkill_leaves_nothing_attached(loop, net):
    proc = net.popen("a", [sys.executable, "-c", _CHILD, net.ip["a"], net.ifname["a"]],
                     stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip().isdigit()
        assert net.xdp_prog("a") == "evpl_xdp_udp"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(TIMEOUT)
    # the program was attached through a bpf_link owned by the process:
    # the kernel detached it when the process died
    assert net.xdp_prog("a") is None
    echo = Echo()
    b = xbind(loop, net, echo)
    assert xstats(loop)["stale_detached"] is False
    s = peer(net)
    s.sendto(b"after the crash", b.local_address)
    loop.run_until(lambda: echo.got, timeout=TIMEOUT)
    s.close()


def test_stale_program_is_detached_on_start(loop, net, tmp_path):
    """A program of evpl's attached the old way (netlink, no owner) is
    removed when the next Bind starts; anybody else's program is left alone."""
    obj = tmp_path / "evpl_xdp.o"
    obj.write_bytes(native_xdp.program_object())
    r = net.run("a", ["ip", "link", "set", "dev", net.ifname["a"], "xdpgeneric", "obj",
                      str(obj), "sec", "xdp"])
    assert r.returncode == 0, r.stderr
    assert net.xdp_prog("a") == "evpl_xdp_udp"
    echo = Echo()
    b = xbind(loop, net, echo)
    assert xstats(loop)["stale_detached"] is True
    s = peer(net)
    s.sendto(b"fresh", b.local_address)
    loop.run_until(lambda: echo.got, timeout=TIMEOUT)
    b.close()
    loop.run_once(0)
    assert net.xdp_prog("a") is None
    s.close()


def test_foreign_program_is_not_replaced(loop, net, tmp_path):
    src = tmp_path / "other.c"
    src.write_text('#include <linux/bpf.h>\n#define SEC(n) __attribute__((section(n), used))\n'
                   'SEC("xdp") int someone_else(struct xdp_md *c) { return XDP_PASS; }\n'
                   'char _license[] SEC("license") = "GPL";\n')
    obj = tmp_path / "other.o"
    arch = os.uname().machine
    cc = subprocess.run(["clang", "-O2", "-target", "bpf", f"-I/usr/include/{arch}-linux-gnu",
                         "-c", str(src), "-o", str(obj)], capture_output=True, text=True)
    if cc.returncode != 0:
        pytest.skip(f"cannot build a test XDP program: {cc.stderr.strip()[:200]}")
    r = net.run("a", ["ip", "link", "set", "dev", net.ifname["a"], "xdpgeneric", "obj",
                      str(obj), "sec", "xdp"])
    assert r.returncode == 0, r.stderr
    with pytest.raises(evpl.BackendUnavailable, match="does not replace"):
        xbind(loop, net, Recorder())
    assert net.xdp_prog("a") == "someone_else"


def test_poll_mode(make_loop, net):
    loop = make_loop(poll_mode="always")
    echo = Echo()
    b = xbind(loop, net, echo)
    s = peer(net)

    def client():
        out = []
        for i in range(50):
            s.sendto(b"poll-%d" % i, b.local_address)
            out.append(s.recvfrom(100)[0])
        return out

    t = InThread(loop, client)
    loop.run_until(t.done, timeout=TIMEOUT)
    assert t.get() == [b"poll-%d" % i for i in range(50)]
    assert xstats(loop)["busy_poll"] is True
    s.close()


def test_a_send_burst_waits_for_frames_and_ring_room(loop, net):
    """More datagrams than send frames in one iteration: the rest wait
    (backpressure) and all leave, none is dropped."""
    b = xbind(loop, net, Recorder())
    s = peer(net, rcvbuf=64 << 20)
    n = 3000
    sent = [b"%05d" % i + b"." * 200 for i in range(n)]
    for d in sent:
        b.sendto(d, s.getsockname())
    loop.run_until(lambda: b.queued_bytes == 0, timeout=TIMEOUT)
    t = InThread(loop, lambda: [s.recvfrom(300)[0] for _ in range(n)])
    loop.run_until(t.done, timeout=TIMEOUT)
    assert t.get() == sent
    st = xstats(loop)
    assert st["tx_frames"] == n and st["tx_copied"] == n
    s.close()


def test_a_burst_leaves_in_one_wakeup(loop, net):
    """Copy mode: one sendto may send the whole TX ring
    (XDP_MAX_TX_SKB_BUDGET), not the kernel's default 32 frames, so 500
    datagrams queued in one iteration take one or two wakeups, not 16."""
    b = xbind(loop, net, Recorder())
    if xstats(loop)["tx_budget"] <= 32:
        pytest.skip("the TX budget is 32 (a kernel without XDP_MAX_TX_SKB_BUDGET, before Linux "
                    "6.17, or EVPL_XDP_TX_BUDGET=32)")
    s = peer(net, rcvbuf=16 << 20)
    b.sendto(b"first", s.getsockname())         # the neighbour is resolved before the burst
    loop.run_until(lambda: b.queued_bytes == 0, timeout=TIMEOUT)
    assert s.recvfrom(100)[0] == b"first"
    before = xstats(loop)["tx_wakeups"]
    sent = [b"%04d" % i + b"." * 60 for i in range(500)]
    for d in sent:
        b.sendto(d, s.getsockname())
    loop.run_until(lambda: b.queued_bytes == 0, timeout=TIMEOUT)
    t = InThread(loop, lambda: [s.recvfrom(100)[0] for _ in range(500)])
    loop.run_until(t.done, timeout=TIMEOUT)
    assert t.get() == sent
    assert xstats(loop)["tx_wakeups"] - before <= 2
    s.close()


def test_kept_buffers_exhaust_the_umem_then_traffic_resumes(loop, net):
    """Buffers a handler keeps pin UMEM; when none is left the kernel drops
    (and counts) new frames, what was delivered stays intact, and traffic
    flows again once the Buffers are dropped."""

    class Keep(evpl.Handler):
        def __init__(self):
            self.bufs = []

        def on_datagram(self, bind, buf, addr):
            self.bufs.append(buf)

    keep = Keep()
    b = xbind(loop, net, keep)
    host, port = b.local_address
    script = ("import socket,sys; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
              "for i in range(int(sys.argv[3])): s.sendto(b'%06d' % i, (sys.argv[1], "
              "int(sys.argv[2])))\n")
    proc = net.popen("b", [sys.executable, "-c", script, host, str(port), "30000"])
    ticker = Ticker(loop)
    loop.run_until(lambda: proc.poll() is not None, timeout=TIMEOUT * 3)
    loop.run_until(lambda: ticker.count > 20, timeout=TIMEOUT)
    ticker.cancel()
    st = xstats(loop)
    assert st["fill_starved"] > 0
    assert st["kernel_fill_ring_empty"] + st["kernel_rx_dropped"] > 0
    values = [bytes(x) for x in keep.bufs]
    keep.bufs.clear()                   # the UMEM comes back
    assert 0 < len(values) < 30000
    assert len(set(values)) == len(values)
    assert all(v.isdigit() and len(v) == 6 for v in values)     # intact
    starved = xstats(loop)["kernel_fill_ring_empty"]
    loop.run_once(0)                    # its iteration refills the fill ring
    s = peer(net)
    for i in range(5):
        s.sendto(b"again-%d" % i, b.local_address)
    loop.run_until(lambda: len(keep.bufs) >= 5, timeout=TIMEOUT)
    assert sorted(bytes(x) for x in keep.bufs) == [b"again-%d" % i for i in range(5)]
    assert xstats(loop)["kernel_fill_ring_empty"] == starved
    keep.bufs.clear()
    s.close()


def test_several_receive_queues(loop):
    with VethNet(rx_queues=2) as net:
        echo = Echo()
        b = xbind(loop, net, echo)
        assert xstats(loop)["queues"] == 2
        socks = [peer(net) for _ in range(8)]

        def client():
            for i, s in enumerate(socks):
                s.sendto(b"q%d" % i, b.local_address)
            return [s.recvfrom(100)[0] for s in socks]

        t = InThread(loop, client)
        loop.run_until(t.done, timeout=TIMEOUT)
        assert t.get() == [b"q%d" % i for i in range(8)]
        for s in socks:
            s.close()
        loop.close()


def _info(env_interface: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "EVPL_XDP_INTERFACE"}
    if env_interface:
        env["EVPL_XDP_INTERFACE"] = env_interface
    out = subprocess.run([sys.executable, "-m", "evpl.cli", "info", "--json"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return {r["name"]: r for r in json.loads(out.stdout)}["xdp_udp"]


def test_info_says_an_interface_is_needed():
    row = _info(None)
    assert row["available"] is False
    assert "interface" in row["reason"]
    assert _info("eth0")["available"] is True


def test_sockperf_flood(loop, net):
    """A kernel sender flooding (sockperf throughput): every datagram that
    reaches evpl has a valid (partial) checksum and lands in on_datagram."""
    import shutil

    if shutil.which("sockperf") is None:
        pytest.skip("sockperf is not installed")
    count = [0]

    class Count(evpl.Handler):
        def on_datagram(self, bind, buf, addr):
            count[0] += 1

    b = xbind(loop, net, Count())
    host, port = b.local_address
    proc = net.popen("b", ["sockperf", "throughput", "-i", host, "-p", str(port), "-m", "64",
                           "-t", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    loop.run_until(lambda: proc.poll() is not None, timeout=TIMEOUT * 3)
    ticker = Ticker(loop)
    loop.run_until(lambda: ticker.count >= 10, timeout=TIMEOUT)
    ticker.cancel()
    st = xstats(loop)
    assert count[0] > 1000
    assert st["rx_bad_checksum"] == 0 and st["rx_truncated"] == 0
    assert loop.stats()["datagrams_in"] == count[0]
