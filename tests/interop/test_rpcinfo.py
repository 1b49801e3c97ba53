"""rpcinfo (libtirpc) against evpl's embedded portmapper, and evpl servers registered
with Debian's rpcbind, each in a private network namespace (port 111)."""

from __future__ import annotations

import re
import shutil
import subprocess
import time

import pytest

PROG = 0x20000123
PROG2 = 0x20000124

# Runs inside the namespace: an evpl rpc2 server for PROG v1 and PROG2 v1..2 on
# tcp and udp, registered with the embedded portmapper (mode "embedded", which
# also serves port 111) or with the rpcbind already running there (mode
# "rpcbind"); then one command per stdin line, until stdin closes.
SCRIPT = r"""
import os, sys
import evpl
from evpl.rpc2 import Server, portmap

mode = sys.argv[1]
PROG, PROG2 = 0x20000123, 0x20000124
RPCBIND = ("127.0.0.1", 111)
loop = evpl.Loop()
server = Server(loop)
server.register(PROG, 1, {})
server.register(PROG2, 1, {})
server.register(PROG2, 2, {})
tcp = server.listen("tcp", ("0.0.0.0", 0)).address[1]
udp = server.bind_udp(("0.0.0.0", 0)).local_address[1]
if mode == "embedded":
    pmap = portmap.PortmapServer(loop)
    pmap.listen(("0.0.0.0", 111))
    pmap.add_server(server, "tcp", tcp)
    pmap.add_server(server, "udp", udp)
else:
    # rpcbind v4 SET for tcp, portmapper v2 SET for udp; over TCP explicitly:
    # rpcbind's local socket is in its own private /run, and the host's (if
    # any) must not be used (test_rpcbind.py covers the local socket)
    for prog, vers in server.registrations:
        assert portmap.register(loop, prog, vers, "tcp", tcp, version=4, address=RPCBIND)
        assert portmap.register(loop, prog, vers, "udp", udp, version=2, address=RPCBIND)
print("ready", tcp, udp, flush=True)

lines = []
def readable():
    data = os.read(0, 4096)
    lines.append(data)
    if not data:
        watch.cancel()
watch = loop.watch_fd(0, on_readable=readable)
while True:
    loop.run_until(lambda: bool(lines))
    data = lines.pop(0)
    if not data:
        break
    if data.strip() == b"unregister":
        ok = [portmap.unregister(loop, PROG, 1, version=4, address=RPCBIND),
              portmap.unregister(loop, PROG2, 1, version=2, address=RPCBIND)]
        print("unregistered", *ok, flush=True)
"""


def _need_tools() -> None:
    if shutil.which("rpcinfo") is None:
        pytest.skip("rpcinfo is not installed (Debian: rpcbind)")


def rpcinfo_p(netns) -> list[tuple[int, int, str, int]]:
    out = netns.run("rpcinfo", "-p", "127.0.0.1").stdout
    rows = []
    for line in out.splitlines()[1:]:
        f = line.split()
        rows.append((int(f[0]), int(f[1]), f[2], int(f[3])))
    return rows


def start_script(netns, interop, mode: str) -> tuple[subprocess.Popen[str], int, int]:
    proc = netns.python(SCRIPT, mode, stdin=subprocess.PIPE)
    line = interop.read_line(proc, 15)
    m = re.fullmatch(r"ready (\d+) (\d+)\n", line)
    assert m, line
    return proc, int(m.group(1)), int(m.group(2))


def check_rpcinfo_reaches(netns) -> None:
    for flag, prog, vers in (("-t", PROG, 1), ("-u", PROG, 1), ("-t", PROG2, 2),
                             ("-u", PROG2, 1)):
        res = netns.run("rpcinfo", flag, "127.0.0.1", str(prog), str(vers))
        assert f"program {prog} version {vers} ready and waiting" in res.stdout, res
    # a version nobody serves: rpcinfo reports the failure
    res = netns.run("rpcinfo", "-t", "127.0.0.1", str(PROG), "5", check=False)
    assert res.returncode != 0


def test_rpcinfo_against_embedded_portmapper(netns, interop) -> None:
    _need_tools()
    proc, tcp, udp = start_script(netns, interop, "embedded")
    rows = rpcinfo_p(netns)
    for proto in ("tcp", "udp"):
        for vers in (2, 3, 4):
            assert (100000, vers, proto, 111) in rows
    assert (PROG, 1, "tcp", tcp) in rows and (PROG, 1, "udp", udp) in rows
    assert (PROG2, 2, "tcp", tcp) in rows and (PROG2, 1, "udp", udp) in rows
    check_rpcinfo_reaches(netns)
    # rpcinfo -T (rpcbind GETADDR with netids) and -s (rpcbind v3/v4 DUMP)
    res = netns.run("rpcinfo", "-T", "tcp", "127.0.0.1", str(PROG), "1")
    assert "ready and waiting" in res.stdout
    res = netns.run("rpcinfo", "-s", "127.0.0.1")
    assert re.search(rf"^\s*{PROG}\s+1\s+(tcp,udp|udp,tcp)\s", res.stdout, re.M), res.stdout
    proc.stdin.close()
    proc.wait(10)
    assert proc.returncode == 0, proc.stderr.read()


def test_rpcinfo_with_debian_rpcbind(netns, interop) -> None:
    _need_tools()
    if shutil.which("rpcbind") is None:
        pytest.skip("rpcbind is not installed (Debian: rpcbind)")
    # rpcbind -f in the namespace, with a private /run so its socket and lock
    # file do not clash with a host rpcbind (or another test's)
    rpcbind = netns.popen("unshare", "-m", "sh", "-c",
                          "mount -t tmpfs tmpfs /run && exec rpcbind -f")
    # rpcbind -f has no readiness signal: ask it until it answers
    deadline = time.monotonic() + 10
    while netns.run("rpcinfo", "-t", "127.0.0.1", "100000", "2",
                    check=False).returncode != 0:
        assert rpcbind.poll() is None, rpcbind.stderr.read()
        assert time.monotonic() < deadline, "rpcbind did not come up"
    proc, tcp, udp = start_script(netns, interop, "rpcbind")
    rows = rpcinfo_p(netns)
    assert (PROG, 1, "tcp", tcp) in rows and (PROG, 1, "udp", udp) in rows
    assert (PROG2, 1, "tcp", tcp) in rows and (PROG2, 2, "udp", udp) in rows
    check_rpcinfo_reaches(netns)
    proc.stdin.write("unregister\n")
    proc.stdin.flush()
    assert interop.read_line(proc, 15) == "unregistered True True\n"
    rows = rpcinfo_p(netns)
    assert not [r for r in rows if r[0] == PROG]
    assert not [r for r in rows if r[0] == PROG2 and r[1] == 1]
    assert (PROG2, 2, "tcp", tcp) in rows
    proc.stdin.close()
    proc.wait(10)
    assert proc.returncode == 0, proc.stderr.read()
