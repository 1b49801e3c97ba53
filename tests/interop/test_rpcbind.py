"""evpl.rpc2.portmap against Debian's rpcbind: registering over rpcbind's local
socket as libtirpc does, replacing the entries a killed libtirpc/rpcgen server left
behind, and the explanations logged when rpcbind refuses a SET or an UNSET.

rpcbind, the rpcgen server and the evpl scripts run in a network namespace with a
private /run (tests/interop/netns.py), so rpcbind owns port 111 and
/run/rpcbind.sock there and nothing touches the host's.  Needs root.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from netns import NetNS, netns_unavailable_reason, wait_for  # noqa: E402

PROG = 0x20000123  # calc.x's CALC_PROG, served by the rpcgen server too
SOCK = "/run/rpcbind.sock"
pytestmark = pytest.mark.timeout(90)


def _skip_reason() -> str | None:
    reason = netns_unavailable_reason()
    if reason:
        return reason
    for tool in ("rpcbind", "rpcinfo", "setpriv"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian: rpcbind, util-linux)"
    return None


_REASON = _skip_reason()
if _REASON:
    pytestmark = [pytestmark, pytest.mark.skip(reason=_REASON)]

# Runs inside the namespace: an evpl server for PROG v1 on TCP and UDP, which
# prints its ports, then runs the step named on each line of stdin and prints
# one JSON object per step with the warnings evpl.rpc2.portmap logged during
# it, until stdin closes.  The loop runs (and serves) between steps.
SCRIPT = r"""
import json, logging, os, sys
import evpl
from evpl.rpc2 import Server, portmap

PROG = 0x20000123
TCP = ("127.0.0.1", 111)
warnings = []

class Collect(logging.Handler):
    def emit(self, record):
        warnings.append(record.getMessage())

logging.getLogger("evpl.rpc2.portmap").addHandler(Collect(logging.WARNING))
loop = evpl.Loop()
server = Server(loop)
server.register(PROG, 1, {})
tcp = server.listen("tcp", ("0.0.0.0", 0)).address[1]
udp = server.bind_udp(("0.0.0.0", 0)).local_address[1]

def step(name, value):
    print(json.dumps({"step": name, "value": value, "warnings": warnings}), flush=True)
    warnings.clear()

steps = {
    "set_tcp": lambda: portmap.register(loop, PROG, 1, "tcp", tcp, address=TCP),
    "unset_tcp": lambda: portmap.unregister(loop, PROG, 1, address=TCP),
    "set_local": lambda: portmap.register(loop, PROG, 1, "tcp", tcp),
    "unset_local": lambda: portmap.unregister(loop, PROG, 1),
    "set_both": lambda: [portmap.register(loop, PROG, 1, "tcp", tcp),
                         portmap.register(loop, PROG, 1, "udp", udp, version=2)],
    "getport": lambda: [portmap.getport(loop, PROG, 1, "tcp"),
                        portmap.getport(loop, PROG, 1, "udp")],
}
step("ports", [tcp, udp, os.geteuid()])

pending = bytearray()
eof = []
def readable():
    data = os.read(0, 4096)
    pending.extend(data)
    if not data:
        eof.append(True)
        watch.cancel()
watch = loop.watch_fd(0, on_readable=readable)
while True:
    loop.run_until(lambda: b"\n" in pending or bool(eof))
    if b"\n" not in pending:
        break
    line, _, rest = bytes(pending).partition(b"\n")
    pending[:] = rest
    name = line.decode().strip()
    step(name, steps[name]())
"""


def python_env() -> dict[str, str]:
    """The environment for a script that imports evpl from wherever this test does."""
    import evpl
    env = dict(os.environ)
    src = str(Path(evpl.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    return env


class Rpcbind:
    """rpcbind -f in a fresh namespace; ``script(...)`` starts the evpl script."""

    def __init__(self, ns: NetNS) -> None:
        self.ns = ns
        self.proc = ns.popen(["rpcbind", "-f"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
        # rpcbind -f has no readiness signal: wait for its port and its socket
        ns.wait_port(111, timeout=15, proc=self.proc)
        wait_for(lambda: ns.run(["test", "-S", SOCK]).returncode == 0, 10,
                 what=f"{SOCK} in the namespace")

    def entries(self) -> list[tuple[int, int, str, str, str]]:
        """rpcbind's table, by ``rpcinfo`` (rpcbind v4 DUMP): prog, vers, netid,
        address, owner."""
        res = self.ns.run(["rpcinfo", "127.0.0.1"], timeout=10)
        assert res.returncode == 0, res.stderr
        rows = []
        for line in res.stdout.splitlines()[1:]:
            f = line.split()
            rows.append((int(f[0]), int(f[1]), f[2], f[3], f[5]))
        return [r for r in rows if r[0] == PROG]

    def script(self, *, uid: int | None = None) -> subprocess.Popen[str]:
        env = python_env()
        cmd = [sys.executable, "-c", SCRIPT]
        if uid is not None:
            cmd = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *cmd]
        return self.ns.popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env, cwd="/")


def run_step(interop: Any, proc: subprocess.Popen[str], name: str) -> dict[str, Any]:
    """Have the evpl script run step ``name``; its JSON answer."""
    if name != "ports":
        assert proc.stdin is not None
        proc.stdin.write(name + "\n")
        proc.stdin.flush()
    try:
        line = interop.read_line(proc, 20)
    except AssertionError:
        assert proc.stderr is not None
        err = proc.stderr.read() if proc.poll() is not None else "(still running)"
        raise AssertionError(f"the evpl script printed no line for {name!r}: {err}") from None
    out = json.loads(line)
    assert out["step"] == name, out
    return out


def finish(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None and proc.stderr is not None
    proc.stdin.close()
    assert proc.wait(15) == 0, proc.stderr.read()


@pytest.fixture
def rpcbind() -> Iterator[Rpcbind]:
    with NetNS("evpl-rpcb") as ns:
        yield Rpcbind(ns)


@pytest.fixture
def stale_entries(rpcbind: Rpcbind, rpcgen_calc: Any) -> list[tuple[int, int, str, str, str]]:
    """CALC registered by rpcgen's generated server (libtirpc, as root: owner
    "superuser"), which is then killed: its entries stay in rpcbind."""
    srv = rpcbind.ns.popen([str(rpcgen_calc.registering_server)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for(lambda: len(rpcbind.entries()) == 2 or srv.poll() is not None, 15,
             what="the rpcgen server's registrations")
    assert srv.poll() is None, srv.stderr.read() if srv.stderr else ""
    os.killpg(srv.pid, signal.SIGKILL)
    srv.wait(10)
    entries = rpcbind.entries()
    assert sorted(e[2] for e in entries) == ["tcp", "udp"]
    assert {e[4] for e in entries} == {"superuser"}
    return entries


def test_replace_entries_left_by_a_libtirpc_server(rpcbind: Rpcbind, stale_entries: Any,
                                                   interop: Any) -> None:
    stale_tcp = next(e[3] for e in stale_entries if e[2] == "tcp")
    proc = rpcbind.script()
    tcp, udp, _ = run_step(interop, proc, "ports")["value"]

    # over TCP rpcbind sees an "unknown" caller: SET and UNSET are refused, and
    # the log says what is there, whose it is, and what to do
    out = run_step(interop, proc, "set_tcp")
    assert out["value"] is False
    [msg] = out["warnings"]
    assert "refused to register program 536871203 version 1 on tcp" in msg
    assert f"already maps it to {stale_tcp} (owner 'superuser')" in msg
    assert "portmap.unregister(loop, 536871203, 1)" in msg
    assert "over tcp every caller is 'unknown'" in msg and "as root" in msg
    out = run_step(interop, proc, "unset_tcp")
    assert out["value"] is False
    [msg] = out["warnings"]
    assert "refused to unregister program 536871203 version 1" in msg
    assert "owner 'superuser'" in msg and SOCK in msg
    assert rpcbind.entries() == stale_entries

    # by default evpl uses rpcbind's local socket, where it is "superuser" too:
    # SET is still refused (rpcbind keeps the first registration) but says to
    # unregister first, which then works
    out = run_step(interop, proc, "set_local")
    assert out["value"] is False
    [msg] = out["warnings"]
    assert msg.startswith(f"rpcbind (local socket {SOCK}) refused to register")
    assert "unregister first" in msg and "'unknown'" not in msg
    out = run_step(interop, proc, "unset_local")
    assert out == {"step": "unset_local", "value": True, "warnings": []}
    assert rpcbind.entries() == []
    out = run_step(interop, proc, "set_both")
    assert out == {"step": "set_both", "value": [True, True], "warnings": []}
    assert run_step(interop, proc, "getport")["value"] == [tcp, udp]
    entries = rpcbind.entries()
    assert sorted(entries) == [(PROG, 1, "tcp", f"0.0.0.0.{tcp >> 8}.{tcp & 255}", "superuser"),
                               (PROG, 1, "udp", f"0.0.0.0.{udp >> 8}.{udp & 255}", "superuser")]
    # libtirpc's rpcinfo finds the evpl server through rpcbind and reaches it
    for flag in ("-t", "-u"):
        res = rpcbind.ns.run(["rpcinfo", flag, "127.0.0.1", str(PROG), "1"], timeout=10)
        assert "ready and waiting" in res.stdout, res

    assert run_step(interop, proc, "unset_local")["value"] is True
    assert rpcbind.entries() == []
    finish(proc)


def _nobody_can_import_evpl() -> str | None:
    res = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                          sys.executable, "-c", "import evpl.rpc2"], capture_output=True,
                         text=True, cwd="/", timeout=30)
    if res.returncode != 0:
        return ("uid 65534 cannot run this Python with evpl (the tree or the venv is not "
                f"world-readable): {res.stderr.strip().splitlines()[-1:]}")
    return None


def test_non_root_caller_is_told_to_run_as_root(rpcbind: Rpcbind, stale_entries: Any,
                                                interop: Any) -> None:
    reason = _nobody_can_import_evpl()
    if reason:
        pytest.skip(reason)
    proc = rpcbind.script(uid=65534)
    assert run_step(interop, proc, "ports")["value"][2] == 65534
    out = run_step(interop, proc, "unset_local")
    assert out["value"] is False
    [msg] = out["warnings"]
    assert msg.startswith(f"rpcbind (local socket {SOCK}) refused to unregister")
    assert "you are uid 65534: run this as root." in msg
    out = run_step(interop, proc, "set_local")
    assert out["value"] is False
    assert "you are uid 65534: run this as root." in out["warnings"][0]
    assert rpcbind.entries() == stale_entries
    finish(proc)


def test_stale_local_socket_falls_back_to_tcp(rpcbind: Rpcbind, interop: Any) -> None:
    # a socket file nobody listens on, where rpcbind's was (rpcbind keeps
    # serving on the unlinked one and on port 111)
    make_stale = (f"import os, socket; os.unlink({SOCK!r}); "
                  f"s = socket.socket(socket.AF_UNIX); s.bind({SOCK!r}); s.close()")
    res = rpcbind.ns.run([sys.executable, "-c", make_stale])
    assert res.returncode == 0, res.stderr
    proc = rpcbind.script()
    tcp, udp, _ = run_step(interop, proc, "ports")["value"]
    assert run_step(interop, proc, "set_both")["value"] == [True, True]
    assert run_step(interop, proc, "getport")["value"] == [tcp, udp]
    # registered over TCP: rpcbind could not tell who the caller was
    assert {e[4] for e in rpcbind.entries()} == {"unknown"}
    assert run_step(interop, proc, "unset_local")["value"] is True
    assert rpcbind.entries() == []
    finish(proc)



# docs/rpc2.md's shutdown recipe, with a dict-registered program
RECIPE = r"""
import signal
import socket
import evpl
from evpl.rpc2 import Server, portmap

PROG, VERS = 0x20000123, 1
loop = evpl.Loop()
server = Server(loop)
server.register(PROG, VERS, {})
tcp = server.listen("tcp", ("0.0.0.0", 0)).address[1]
udp = server.bind_udp(("0.0.0.0", 0)).local_address[1]
portmap.unregister(loop, PROG, VERS)   # left by an earlier run
ok = [portmap.register(loop, PROG, VERS, "tcp", tcp),
      portmap.register(loop, PROG, VERS, "udp", udp)]
if not all(ok):
    raise SystemExit("rpcbind refused the registration (see the log)")

def on_signal(signum, frame):
    loop.stop()

signal.signal(signal.SIGTERM, on_signal)
signal.signal(signal.SIGINT, on_signal)
wake_r, wake_w = socket.socketpair()
wake_r.setblocking(False)
wake_w.setblocking(False)
signal.set_wakeup_fd(wake_w.fileno())
loop.watch_fd(wake_r.fileno(), on_readable=lambda: wake_r.recv(512))
print("ready", tcp, udp, flush=True)
try:
    loop.run()
finally:
    print("unregistered", portmap.unregister(loop, PROG, VERS), flush=True)
    server.close()
    loop.close()
"""


def test_documented_shutdown_recipe(rpcbind: Rpcbind, stale_entries: Any,
                                    interop: Any) -> None:
    """Starts over the entries of a killed rpcgen server, registers, serves,
    and on SIGTERM (sent right after a reply, when the loop is about to
    sleep) stops the loop, unregisters and exits 0."""
    proc = rpcbind.ns.popen([sys.executable, "-c", RECIPE], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=python_env(), cwd="/")
    _, tcp, udp = interop.read_line(proc, 20).split()
    assert sorted(e[3] for e in rpcbind.entries()) == sorted(
        f"0.0.0.0.{int(p) >> 8}.{int(p) & 255}" for p in (tcp, udp))
    res = rpcbind.ns.run(["rpcinfo", "-u", "127.0.0.1", str(PROG), "1"], timeout=10)
    assert "ready and waiting" in res.stdout, res
    proc.send_signal(signal.SIGTERM)  # reaches python: nsenter execs it
    assert interop.read_line(proc, 20) == "unregistered True\n"
    assert proc.wait(15) == 0, proc.stderr.read() if proc.stderr else ""
    assert rpcbind.entries() == []
