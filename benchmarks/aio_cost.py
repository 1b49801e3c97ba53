"""Instructions per request of the aiohttp "hello" server of aio_bench.py,
counted by callgrind inside the server only, and split by whose code ran.

    python benchmarks/aio_cost.py --loops evpl uvloop --n 4000

The server (aio_bench.py's aiohttp app on one loop) runs under
``valgrind --tool=callgrind --instr-atstart=no``; a client in this process
keeps 32 keep-alive connections busy with wrk's request (one in flight per
connection, as ``wrk -c32``). After ``--warmup`` requests, collection is
switched on (``callgrind_control -i on``) for exactly ``--n`` requests,
then off; the count divided by n is the cost of one request, user space
only (callgrind does not see the kernel). The server is always busy under
valgrind, so every loop iteration finds many connections ready, as in a
wrk run where the server's core is the limit.

The split: with ``--separate-callers`` every cost is known together with
its chain of callers, and each instruction is charged to the innermost
frame of the chain that has an owner:

* ``app``    aiohttp's, multidict's, yarl's and propcache's compiled code,
             and Python code (the interpreter's frame evaluation: aiohttp's
             handlers, parser callbacks, response building; also the few
             Python methods of asyncio and evpl.aio a request calls, see
             ``--pyprofile``);
* ``loop``   the event loop: evpl.aio's and the engine's compiled code, or
             uvloop's and libuv's, plus asyncio's C Task/Future machinery
             (``_asyncio``) the loop drives;
* ``sys``    the system-call wrappers of libc (the user-space side of the
             kernel path);
* ``other``  a chain with no owner within the caller depth.

The interpreter's and libc's helpers (allocation, reference counting,
calls, dicts) are charged to whoever called them.

Instructions are not the whole cost: when the loop sends changes how
often the load generator is woken (a cross-core interrupt and a VM exit
each on this machine), which callgrind cannot see; aio_bench.py prints
those wake-ups and the server's system and softirq time per request.

``--pyprofile`` runs the server in-process under cProfile (no valgrind)
for the same load and lists the Python functions called per request:
the ``app`` bucket's Python is theirs (on both loops today, aiohttp's
and asyncio's WeakSet of tasks; no evpl.aio Python runs per request).
"""

from __future__ import annotations

import argparse
import os
import re
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run as _run  # noqa: E402  (the server process: started, pinned, stopped)

APP_OBJECTS = ("aiohttp", "multidict", "yarl", "propcache", "frozenlist")
LOOP_OBJECTS = ("evpl", "uvloop", "_asyncio")
SYSCALLS = {"epoll_wait", "epoll_pwait", "epoll_pwait2", "epoll_ctl", "recv", "recvfrom",
            "recvmsg", "send", "sendto", "sendmsg", "sendmmsg", "read", "write", "writev",
            "readv", "accept4", "syscall", "__libc_recv", "__libc_send", "__libc_read",
            "__libc_write", "__libc_sendmsg", "__libc_recvmsg", "__GI___libc_write",
            "__GI___libc_read", "__GI___writev", "__GI___readv", "__GI___send",
            "__GI___recv", "__GI___sendmsg", "__GI___recvmsg", "__GI_epoll_wait",
            "__GI___sendto", "__GI___recvfrom", "__GI_epoll_pwait", "__GI_epoll_pwait2",
            "__GI_epoll_ctl", "__GI___syscall"}


def _client(port: int, n: int, conns: int = 32) -> None:
    """Serve ``n`` requests over ``conns`` keep-alive connections, one in
    flight on each (the last ones stop early so exactly n are made)."""
    req = f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    sel = selectors.DefaultSelector()
    sent = 0
    done = 0
    bufs: dict[socket.socket, bytearray] = {}
    for _ in range(min(conns, n)):
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        bufs[s] = bytearray()
        sel.register(s, selectors.EVENT_READ)
        s.send(req)
        sent += 1
    while done < n:
        for key, _ in sel.select():
            s = key.fileobj
            data = s.recv(65536)
            if not data:
                raise SystemExit("server closed a connection")
            buf = bufs[s]
            buf += data
            while True:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    break
                m = re.search(rb"Content-Length: (\d+)", buf[:end], re.I)
                total = end + 4 + (int(m.group(1)) if m else 0)
                if len(buf) < total:
                    break
                del buf[:total]
                done += 1
                if sent < n:
                    s.send(req)
                    sent += 1
    for s in bufs:
        sel.unregister(s)
        s.close()


def measure(loop: str, n: int, warmup: int, depth: int, out: Path) -> None:
    """Run the server under callgrind and collect exactly ``n`` requests."""
    cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
           f"--separate-callers={depth}", f"--callgrind-out-file={out}",
           sys.executable, str(HERE / "aio_bench.py"), "--serve", loop, "aiohttp"]
    # (valgrind starts Python slowly, and writes its output as the server exits)
    with _run.running(cmd, timeout=300, grace=120) as server:
        port = int(server.ready_line.split()[1])
        _client(port, warmup)
        subprocess.run(["callgrind_control", "-i", "on", str(server.pid)], check=True,
                       capture_output=True)
        _client(port, n)
        subprocess.run(["callgrind_control", "-i", "off", str(server.pid)], check=True,
                       capture_output=True)


def parse(path: Path) -> tuple[dict[tuple[str, str], int], dict[str, str]]:
    """Self cost per (object, function context) and each base function's
    object, from a callgrind output file (Ir only)."""
    names: dict[str, str] = {}
    objs: dict[str, str] = {}
    cost: dict[tuple[str, str], int] = defaultdict(int)
    base_obj: dict[str, str] = {}
    ob = fn = ""
    in_call = False
    ref = re.compile(r"\((\d+)\)(?: (.*))?")

    def lookup(table: dict[str, str], val: str) -> str:
        m = ref.fullmatch(val)
        if not m:
            return val
        if m.group(2) is not None:
            table[m.group(1)] = m.group(2)
        return table[m.group(1)]

    with open(path) as f:
        for line in f:
            if not line or line[0] == "#":
                continue
            c = line[0]
            if c.isdigit() or c in "+-*":
                if in_call:
                    in_call = False     # the inclusive cost line of a call
                    continue
                parts = line.split()
                if len(parts) >= 2:
                    cost[(ob, fn)] += int(parts[1])
                continue
            key, _, val = line.rstrip("\n").partition("=")
            if key == "ob":
                ob = lookup(objs, val)
            elif key == "fn":
                fn = lookup(names, val)
                base_obj.setdefault(fn.split("'")[0], ob)
            elif key in ("cob",):
                lookup(objs, val)
            elif key == "cfn" or key == "cfi" or key == "cfl":
                if key == "cfn":
                    lookup(names, val)
            elif key == "calls":
                in_call = True
    return cost, base_obj


def owner(obj: str, func: str) -> str | None:
    """The bucket a frame owns, or None for a helper charged to its caller."""
    base = os.path.basename(obj)
    if func == "_PyEval_EvalFrameDefault":
        return "app"
    if any(base.startswith(p) for p in APP_OBJECTS) or "/aiohttp/" in obj or \
            "/multidict/" in obj or "/yarl/" in obj or "/propcache/" in obj:
        return "app"
    if "/evpl/" in obj or "/uvloop/" in obj or base.startswith("_asyncio"):
        return "loop"
    if func in SYSCALLS:
        return "sys"
    return None


def split(cost: dict[tuple[str, str], int], base_obj: dict[str, str],
          ) -> tuple[dict[str, int], dict[str, int]]:
    """Instructions per bucket, and self instructions per object."""
    buckets: dict[str, int] = defaultdict(int)
    per_obj: dict[str, int] = defaultdict(int)
    for (ob, ctx), ir in cost.items():
        per_obj[os.path.basename(ob)] += ir
        chain = ctx.split("'")
        got = None
        for i, func in enumerate(chain):
            got = owner(ob if i == 0 else base_obj.get(func, ""), func)
            if got:
                break
        buckets[got or "other"] += ir
    return buckets, per_obj


def pyprofile(loop: str, n: int, warmup: int) -> None:
    """cProfile the server (in this process, no valgrind) for n requests
    after the warm-up: the Python functions called per request."""
    import asyncio
    import concurrent.futures
    import cProfile
    import pstats

    import aio_bench

    aloop = aio_bench.new_loop(loop)
    asyncio.set_event_loop(aloop)
    prof = cProfile.Profile()

    async def main() -> None:
        runner, port = await aio_bench.start_hello()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            await aloop.run_in_executor(pool, _client, port, warmup)
            prof.enable()
            await aloop.run_in_executor(pool, _client, port, n)
            prof.disable()
        await runner.cleanup()

    aloop.run_until_complete(main())
    aloop.close()
    st = pstats.Stats(prof)
    rows = sorted(((calls / n, f"{os.path.basename(file)}:{line}({func})")
                   for (file, line, func), (_, calls, *_rest) in st.stats.items()  # type: ignore[attr-defined]
                   if calls >= n / 2), reverse=True)
    print(f"{loop}: Python functions (and builtins) called per request, cProfile")
    for per, name in rows:
        print(f"  {per:6.2f}  {name}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--loops", nargs="+", default=["evpl", "uvloop"])
    ap.add_argument("--n", type=int, default=4000, help="requests counted (4000)")
    ap.add_argument("--warmup", type=int, default=1000, help="requests before (1000)")
    ap.add_argument("--depth", type=int, default=12, help="callgrind --separate-callers")
    ap.add_argument("--keep", action="store_true", help="keep the callgrind files (./)")
    ap.add_argument("--objects", action="store_true", help="also self cost per object")
    ap.add_argument("--pyprofile", action="store_true", help=pyprofile.__doc__)
    opts = ap.parse_args(argv)
    if opts.pyprofile:
        for loop in opts.loops:
            pyprofile(loop, opts.n, opts.warmup)
        return 0
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is needed (Debian package valgrind)")
    print(f"{'loop':12} {'total':>9} {'app':>9} {'loop':>9} {'sys':>7} {'other':>7}"
          "   (instructions per request)")
    for loop in opts.loops:
        out = Path(tempfile.mktemp(prefix=f"callgrind.aio-{loop}.", dir="." if opts.keep
                                   else None))
        measure(loop, opts.n, opts.warmup, opts.depth, out)
        cost, base_obj = parse(out)
        buckets, per_obj = split(cost, base_obj)
        total = sum(buckets.values())
        print(f"{loop:12} {total / opts.n:9,.0f} {buckets['app'] / opts.n:9,.0f} "
              f"{buckets['loop'] / opts.n:9,.0f} {buckets['sys'] / opts.n:7,.0f} "
              f"{buckets['other'] / opts.n:7,.0f}", flush=True)
        if opts.objects:
            for ob, ir in sorted(per_obj.items(), key=lambda kv: -kv[1])[:15]:
                print(f"    {ir / opts.n:9,.0f}  {ob}")
        if opts.keep:
            print(f"    kept {out}")
        else:
            out.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
