"""evpl's ONC RPC client against a real NFSv3 server: nfs-ganesha (VFS FSAL).

The NFSv3 and MOUNT v3 types and client stubs are compiled at import time
from ``tests/rpc2/data/nfs3.x`` (written from RFC 1813) with
:func:`evpl.rpc2.xdrgen.load_x`.  ganesha and the rpcbind it registers with
claim well-known ports (111, 2049), so both run in a network namespace the
test creates (:mod:`tests.interop.netns`), with a private ``/run``; the evpl
client runs there too, as ``nfs_client_script.py``, and reports JSON.

Needs root and Debian's ``nfs-ganesha``, ``nfs-ganesha-vfs`` and ``rpcbind``
(``libnfs-utils`` for the cross-check, optional).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from netns import NetNS, netns_unavailable_reason  # noqa: E402

NFS3_X = HERE.parent / "rpc2" / "data" / "nfs3.x"
CLIENT_SCRIPT = HERE / "nfs_client_script.py"

NFS_PORT = 2049
MNT_PORT = 20048
PSEUDO = "/export"
FILE_NAME = "data.bin"
FILE_SIZE = 200_000 + 123          # > 64 KiB: seven 32 KiB READs, the last one short
READ_SIZE = 32768                  # fits a UDP datagram with the headers
EXTRA_FILES = [f"entry-{i:03d}-with-a-rather-long-name.txt" for i in range(40)]

NF3REG, NF3DIR = 1, 2
NFS3ERR_STALE, NFS3ERR_BADHANDLE = 70, 10001
AUTH_TOOWEAK = 5

CLIENT_TIMEOUT = 20                # the script; each of its calls times out in 5 s
pytestmark = pytest.mark.timeout(60)


def _skip_reason() -> str | None:
    reason = netns_unavailable_reason()
    if reason:
        return reason
    missing = [tool for tool in ("ganesha.nfsd", "rpcbind")
               if shutil.which(tool) is None]
    if missing:
        return (f"{', '.join(missing)} not installed "
                "(apt-get install nfs-ganesha nfs-ganesha-vfs rpcbind)")
    fsal_dirs = ["/usr/lib/x86_64-linux-gnu/ganesha", "/usr/lib/ganesha",
                 "/usr/lib64/ganesha", "/usr/lib/aarch64-linux-gnu/ganesha"]
    if not any(os.path.exists(os.path.join(d, "libfsalvfs.so")) for d in fsal_dirs):
        return "ganesha's VFS FSAL (libfsalvfs.so) is not installed (nfs-ganesha-vfs)"
    return None


_REASON = _skip_reason()
if _REASON:
    pytestmark = [pytestmark, pytest.mark.skip(reason=_REASON)]


def ganesha_config(export_dir: Path, state_dir: Path) -> str:
    return f"""
NFS_CORE_PARAM {{
    Protocols = 3;
    NFS_Port = {NFS_PORT};
    MNT_Port = {MNT_PORT};
    Enable_NLM = false;
    Enable_RQUOTA = false;
    # MNT takes the Pseudo path (default: the Path on the server's disk)
    Mount_Path_Pseudo = true;
}}
NFSV4 {{
    # keep ganesha's state out of /var/lib/nfs/ganesha, shared by all instances
    RecoveryBackend = fs;
    RecoveryRoot = "{state_dir}";
    Grace_Period = 0;
}}
NFS_KRB5 {{
    Active_krb5 = false;
}}
EXPORT {{
    Export_Id = 1;
    Path = "{export_dir}";
    Pseudo = "{PSEUDO}";
    Access_Type = RW;
    Squash = No_Root_Squash;
    SecType = sys;
    Protocols = 3;
    Transports = TCP, UDP;
    FSAL {{
        Name = VFS;
    }}
}}
LOG {{
    Default_Log_Level = EVENT;
}}
"""


class Ganesha:
    """rpcbind + ganesha.nfsd in a fresh namespace, exporting ``export_dir``."""

    def __init__(self, ns: NetNS, base: Path) -> None:
        self.ns = ns
        self.base = base
        self.export_dir = base / "export"
        self.log = base / "ganesha.log"

    def start(self, deadline: float) -> None:
        state = self.base / "state"
        state.mkdir()
        conf = self.base / "ganesha.conf"
        conf.write_text(ganesha_config(self.export_dir, state))
        rpcbind = self.ns.popen(["rpcbind", "-f"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        self.ns.wait_port(111, timeout=max(1.0, deadline - time.monotonic()), proc=rpcbind)
        with open(self.base / "ganesha.out", "wb") as out:
            self.proc = self.ns.popen(
                ["ganesha.nfsd", "-F", "-f", str(conf), "-L", str(self.log),
                 "-p", str(self.base / "ganesha.pid")],
                stdout=out, stderr=subprocess.STDOUT)
        for port in (NFS_PORT, MNT_PORT):
            self.ns.wait_port(port, timeout=max(1.0, deadline - time.monotonic()),
                              proc=self.proc)
        # ganesha starts even when it could not parse parts of its config
        # (skipping those blocks): insist on a clean parse.
        if "Configuration syntax errors" in self.log.read_text(errors="replace"):
            raise RuntimeError("ganesha reported errors in its configuration")

    def log_tail(self, n: int = 30) -> str:
        parts = []
        for path in (self.log, self.base / "ganesha.out"):
            if path.exists():
                lines = path.read_text(errors="replace").splitlines()
                parts.append(f"--- {path.name} ---\n" + "\n".join(lines[-n:]))
        return "\n".join(parts)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A running ganesha exporting a directory with ``data.bin`` (random bytes,
    mode 0600) and 40 more files; yields (Ganesha, data bytes)."""
    deadline = time.monotonic() + 15             # ganesha is up in < 1 s here
    base = tmp_path_factory.mktemp("ganesha")
    base.chmod(0o755)
    export_dir = base / "export"
    export_dir.mkdir()
    data = os.urandom(FILE_SIZE)
    (export_dir / FILE_NAME).write_bytes(data)
    (export_dir / FILE_NAME).chmod(0o600)
    for name in EXTRA_FILES:
        (export_dir / name).write_text(name)
    with NetNS("evpl-nfs") as ns:
        g = Ganesha(ns, base)
        try:
            g.start(deadline)
        except Exception as e:
            pytest.fail(f"ganesha did not start: {e}\n{g.log_tail()}")
        yield g, data
    # NetNS.__exit__ killed ganesha and rpcbind and deleted the namespace.


def run_client(g: Ganesha, backend: str) -> tuple[dict, bytes]:
    out_file = g.base / f"read-{backend}.bin"
    cmd = [sys.executable, str(CLIENT_SCRIPT), "--x", str(NFS3_X), "--backend", backend,
           "--host", "127.0.0.1", "--nfs-port", str(NFS_PORT), "--mnt-port", str(MNT_PORT),
           "--export", PSEUDO, "--file", FILE_NAME, "--out", str(out_file),
           "--read-size", str(READ_SIZE), "--readdir-count", "1024"]
    env = dict(os.environ)
    # the script imports evpl from wherever this test does
    import evpl
    src = str(Path(evpl.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    try:
        r = g.ns.run(cmd, timeout=CLIENT_TIMEOUT, env=env, cwd=str(g.base))
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"client script ({backend}) ran over {CLIENT_TIMEOUT} s:\n"
                    f"{e.stdout}\n{e.stderr}\n{g.log_tail()}")
    try:
        result = json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        pytest.fail(f"client script printed no JSON (status {r.returncode}):\n"
                    f"{r.stdout}\n{r.stderr}\n{g.log_tail()}")
    assert "error" not in result, (
        f"evpl NFS client failed: {result['error']}\n{result.get('traceback')}\n"
        f"calls so far: {result.get('calls')}\n{r.stderr}\n{g.log_tail()}")
    assert r.returncode == 0, r.stderr
    return result, out_file.read_bytes() if out_file.exists() else b""


@pytest.mark.parametrize("backend", ["tcp", "udp"])
def test_evpl_client_reads_file_from_ganesha(server, backend):
    g, data = server
    res, got = run_client(g, backend)

    # MOUNT v3: NULL, MNT of the pseudo path -> a root handle
    assert res["mnt_null"] is None
    assert res["mnt_status"] == 0
    assert 0 < res["root_fh_len"] <= 64
    assert 1 in res["auth_flavors"], res["auth_flavors"]          # AUTH_SYS offered
    # NFS v3 NULL and GETATTR of the root
    assert res["nfs_null"] is None
    assert res["root_getattr_status"] == 0
    assert res["root_type"] == NF3DIR
    # READDIR: every entry, over several pages
    assert res["readdir_pages"] > 1, "the READDIR count should force several pages"
    names = res["names"]
    assert sorted(n for n in names if n not in (".", "..")) == sorted(
        [FILE_NAME, *EXTRA_FILES])
    assert len(names) == len(set(names)), "READDIR returned an entry twice"
    # LOOKUP + GETATTR
    assert res["lookup_status"] == 0
    assert res["getattr_status"] == 0
    st = os.stat(g.export_dir / FILE_NAME)
    assert res["type"] == NF3REG
    assert res["size"] == FILE_SIZE == st.st_size
    assert res.get("lookup_size", FILE_SIZE) == FILE_SIZE
    assert res["mode"] == stat.S_IMODE(st.st_mode) == 0o600
    assert (res["uid"], res["gid"]) == (st.st_uid, st.st_gid)
    assert res["fileid"] == st.st_ino
    assert res["nlink"] == 1
    # READ: several pipelined chunks, the bytes match, eof only on the last
    assert res["reads"] == -(-FILE_SIZE // READ_SIZE) > 2
    assert res["bytes_read"] == FILE_SIZE
    assert got == data
    assert res["sha256"] == hashlib.sha256(data).hexdigest()
    assert res["read_eofs"][-1] is True
    assert not any(res["read_eofs"][:-1])
    assert res["read_past_end"] == [0, 0, True]
    # a handle the server never issued: an NFS error status, not an RPC failure
    assert res["bogus_getattr_status"] in (NFS3ERR_STALE, NFS3ERR_BADHANDLE), res
    # AUTH_NONE on a SecType=sys export: MSG_DENIED AUTH_ERROR, raised as a typed error
    assert res["auth_none_read"][:3] == ["exception", "AuthError", AUTH_TOOWEAK], res
    # nothing left in flight, no pool buffer leaked in the client process
    assert res["pending_after"] == 0
    assert res["pool_buffers_in_use"] == 0


@pytest.mark.skipif(shutil.which("nfs-cat") is None,
                    reason="libnfs-utils (nfs-ls, nfs-cat) not installed")
def test_libnfs_cross_check(server):
    """The same export read by libnfs: the server setup itself is sound."""
    g, data = server
    url = f"nfs://127.0.0.1{PSEUDO}"
    r = g.ns.run(["nfs-ls", f"{url}?version=3"], timeout=10)
    assert r.returncode == 0, f"{r.stderr}\n{g.log_tail()}"
    listed = {line.split()[-1] for line in r.stdout.splitlines() if line.strip()}
    assert {FILE_NAME, *EXTRA_FILES} <= listed
    r = g.ns.run(["nfs-cat", f"{url}/{FILE_NAME}?version=3"], timeout=10, text=False)
    assert r.returncode == 0, f"{r.stderr!r}\n{g.log_tail()}"
    assert r.stdout == data
