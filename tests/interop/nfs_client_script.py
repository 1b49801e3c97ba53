"""NFSv3 client session run by test_nfs_ganesha.py inside the server's namespace.

    python3 nfs_client_script.py --x nfs3.x --backend tcp --export /export \
        --file data.bin --out /tmp/.../read.bin [--host 127.0.0.1] [--mnt-port N]

Talks to the server only through evpl's rpc2 client and stubs compiled at
import time from the ``.x`` file: MOUNT v3 NULL + MNT, then NFS v3 NULL,
GETATTR, READDIR (all pages), LOOKUP, GETATTR and READ (pipelined chunks)
of ``--file``, whose bytes go to ``--out``.  Prints one JSON object on
stdout; any failure is reported in it as ``"error"`` (with a traceback) and
the exit status is 1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import traceback
from typing import Any

import evpl
from evpl.rpc2.client import Client
from evpl.rpc2.wire import AuthSys
from evpl.rpc2.xdrgen import load_x

CALL_TIMEOUT = 5.0


def run(args: argparse.Namespace, out: dict[str, Any]) -> None:
    x = load_x(args.x, name="nfs3_interop")
    loop = evpl.Loop()
    auth = AuthSys(stamp=1, machinename=b"evpl-interop", uid=0, gid=0, gids=(0,))
    calls: list[str] = []
    out["calls"] = calls

    def wait(client: Client, rpc: Any, what: str) -> Any:
        calls.append(what)
        return client.wait(rpc, timeout=CALL_TIMEOUT + 1)

    # ---- MOUNT v3 ----
    mnt_client = Client(loop, args.backend, (args.host, args.mnt_port),
                        timeout=CALL_TIMEOUT, auth=auth)
    mnt = x.MOUNT_V3Client(mnt_client)
    out["mnt_null"] = wait(mnt_client, mnt.MOUNTPROC3_NULL(), "MOUNTPROC3_NULL")
    res = wait(mnt_client, mnt.MOUNTPROC3_MNT(args.export.encode()), "MOUNTPROC3_MNT")
    out["mnt_status"] = int(res.fhs_status)
    if res.fhs_status != x.MNT3_OK:
        raise RuntimeError(f"MNT {args.export!r} failed: {res.fhs_status!r}")
    root_fh = x.nfs_fh3(bytes(res.mountinfo.fhandle))
    out["root_fh_len"] = len(root_fh.data)
    out["auth_flavors"] = [int(f) for f in res.mountinfo.auth_flavors]

    # ---- NFS v3 ----
    nfs_client = Client(loop, args.backend, (args.host, args.nfs_port),
                        timeout=CALL_TIMEOUT, auth=auth)
    nfs = x.NFS_V3Client(nfs_client)
    out["nfs_null"] = wait(nfs_client, nfs.NFSPROC3_NULL(), "NFSPROC3_NULL")

    res = wait(nfs_client, nfs.NFSPROC3_GETATTR(x.GETATTR3args(root_fh)), "NFSPROC3_GETATTR")
    out["root_getattr_status"] = int(res.status)
    if res.status == x.NFS3_OK:
        out["root_type"] = int(res.resok.obj_attributes.type)

    # READDIR, page by page (small count: several pages, cookies and cookieverf).
    names: list[str] = []
    cookie, verf, pages = 0, b"\0" * x.NFS3_COOKIEVERFSIZE, 0
    while True:
        res = wait(nfs_client, nfs.NFSPROC3_READDIR(
            x.READDIR3args(root_fh, cookie, verf, args.readdir_count)), "NFSPROC3_READDIR")
        if res.status != x.NFS3_OK:
            out["readdir_status"] = int(res.status)
            raise RuntimeError(f"READDIR failed: {res.status!r}")
        pages += 1
        ok = res.resok
        verf = bytes(ok.cookieverf)
        for entry in ok.reply.entries:
            names.append(bytes(entry.name).decode("utf-8", "surrogateescape"))
            cookie = entry.cookie
        if ok.reply.eof:
            break
        if not ok.reply.entries:
            raise RuntimeError("READDIR returned no entries and no eof")
        if pages > 1000:
            raise RuntimeError("READDIR did not reach eof after 1000 pages")
    out["readdir_status"] = 0
    out["readdir_pages"] = pages
    out["names"] = names

    res = wait(nfs_client, nfs.NFSPROC3_LOOKUP(
        x.LOOKUP3args(x.diropargs3(root_fh, args.file.encode()))), "NFSPROC3_LOOKUP")
    out["lookup_status"] = int(res.status)
    if res.status != x.NFS3_OK:
        raise RuntimeError(f"LOOKUP {args.file!r} failed: {res.status!r}")
    fh = res.resok.object
    if res.resok.obj_attributes.attributes_follow:
        out["lookup_size"] = res.resok.obj_attributes.attributes.size

    res = wait(nfs_client, nfs.NFSPROC3_GETATTR(x.GETATTR3args(fh)), "NFSPROC3_GETATTR")
    out["getattr_status"] = int(res.status)
    if res.status != x.NFS3_OK:
        raise RuntimeError(f"GETATTR failed: {res.status!r}")
    attrs = res.resok.obj_attributes
    size = attrs.size
    out.update(type=int(attrs.type), size=size, mode=attrs.mode & 0o7777, uid=attrs.uid,
               gid=attrs.gid, nlink=attrs.nlink, fileid=attrs.fileid,
               mtime=[attrs.mtime.seconds, attrs.mtime.nseconds])

    # READ: every chunk in flight at once on the one connection / socket.
    chunk = args.read_size
    rpcs = [(off, nfs.NFSPROC3_READ(x.READ3args(fh, off, chunk)))
            for off in range(0, max(size, 1), chunk)]
    calls.extend("NFSPROC3_READ" for _ in rpcs)
    data = bytearray()
    eofs = []
    for off, rpc in rpcs:
        res = nfs_client.wait(rpc, timeout=CALL_TIMEOUT + 1)
        if res.status != x.NFS3_OK:
            out["read_status"] = int(res.status)
            raise RuntimeError(f"READ at {off} failed: {res.status!r}")
        ok = res.resok
        if ok.count != len(ok.data):
            raise RuntimeError(f"READ at {off}: count {ok.count} != {len(ok.data)} bytes")
        if off != len(data):
            raise RuntimeError(f"short READ before offset {off} (have {len(data)} bytes)")
        data += ok.data
        eofs.append(bool(ok.eof))
    out["read_status"] = 0
    out["reads"] = len(rpcs)
    out["read_eofs"] = eofs
    out["bytes_read"] = len(data)
    out["sha256"] = hashlib.sha256(data).hexdigest()
    with open(args.out, "wb") as f:
        f.write(data)

    # A read past the end: zero bytes and eof.
    res = wait(nfs_client, nfs.NFSPROC3_READ(x.READ3args(fh, size + 10, 100)), "NFSPROC3_READ")
    out["read_past_end"] = [int(res.status), res.resok.count if res.status == 0 else None,
                            bool(res.resok.eof) if res.status == 0 else None]

    # Unknown handle: the server must answer an NFS error, not an RPC error.
    bogus = x.nfs_fh3(bytes(reversed(fh.data)))
    res = wait(nfs_client, nfs.NFSPROC3_GETATTR(x.GETATTR3args(bogus)), "NFSPROC3_GETATTR")
    out["bogus_getattr_status"] = int(res.status)

    # The same READ with AUTH_NONE credentials (the export allows only AUTH_SYS):
    # either an RPC-level AUTH_ERROR (a typed exception) or an NFS error status.
    anon_client = Client(loop, args.backend, (args.host, args.nfs_port), timeout=CALL_TIMEOUT)
    anon = x.NFS_V3Client(anon_client)
    calls.append("NFSPROC3_READ (AUTH_NONE)")
    try:
        res = anon_client.wait(anon.NFSPROC3_READ(x.READ3args(fh, 0, 100)),
                               timeout=CALL_TIMEOUT + 1)
        out["auth_none_read"] = ["status", int(res.status)]
    except Exception as e:
        out["auth_none_read"] = ["exception", type(e).__name__,
                                 int(getattr(e, "stat", -1) or -1), str(e)]
    anon_client.close()

    wait(mnt_client, mnt.MOUNTPROC3_UMNT(args.export.encode()), "MOUNTPROC3_UMNT")
    out["pending_after"] = nfs_client.pending + mnt_client.pending
    nfs_client.close()
    mnt_client.close()
    loop.close()
    del rpcs, res, ok
    import gc
    gc.collect()
    out["pool_buffers_in_use"] = evpl.default_pool().stats()["buffers_in_use"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--x", required=True, help="the NFSv3 + MOUNT v3 .x file")
    p.add_argument("--backend", default="tcp")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--nfs-port", type=int, default=2049)
    p.add_argument("--mnt-port", type=int, default=20048)
    p.add_argument("--export", default="/export")
    p.add_argument("--file", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--read-size", type=int, default=32768)
    p.add_argument("--readdir-count", type=int, default=1024)
    args = p.parse_args()
    out: dict[str, Any] = {"backend": args.backend, "pid": os.getpid()}
    status = 0
    try:
        run(args, out)
    except BaseException as e:  # report everything to the test
        out["error"] = f"{type(e).__name__}: {e}"
        out["traceback"] = traceback.format_exc()
        status = 1
    json.dump(out, sys.stdout, default=repr)
    sys.stdout.write("\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
