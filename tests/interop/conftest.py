"""Shared fixtures for interop tests against real peers (rpcgen/libtirpc programs,
rpcinfo, rpcbind) and for running them in a private network namespace."""

from __future__ import annotations

import itertools
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

DATA = Path(__file__).parent.parent / "rpc2" / "data"
CALC_X = DATA / "calc.x"
TIRPC_INCLUDE = "/usr/include/tirpc"

# -- rpcgen programs -----------------------------------------------------------

CALC_IMPL_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "calc.h"

int *calc_add_1_svc(pair *p, struct svc_req *rq) {
    static int res;
    res = p->a + p->b;
    return &res;
}

echo_res *calc_echo_1_svc(echo_args *a, struct svc_req *rq) {
    static echo_res res;
    static char name[CALC_MAX_NAME + 1];
    static int values[CALC_MAX_VALUES];
    u_int i;
    quad_t sum = a->big;
    snprintf(name, sizeof name, "%s", a->name);
    for (i = 0; i < a->values.values_len; i++) {
        values[i] = a->values.values_val[i];
        sum += values[i];
    }
    res.name = name;
    res.values.values_len = a->values.values_len;
    res.values.values_val = values;
    res.sum = sum;
    return &res;
}

calc_res *calc_calc_1_svc(calc_args *a, struct svc_req *rq) {
    static calc_res res;
    static char divzero[] = "division by zero";
    res.status = 0;
    switch (a->op) {
    case OP_ADD: res.calc_res_u.value = a->a + a->b; break;
    case OP_MUL: res.calc_res_u.value = a->a * a->b; break;
    case OP_DIV:
        if (a->b == 0) { res.status = 1; res.calc_res_u.error = divzero; }
        else res.calc_res_u.value = a->a / a->b;
        break;
    default: res.status = 2;
    }
    return &res;
}

int *calc_delay_1_svc(int *n, struct svc_req *rq) {
    static int res;
    res = *n;
    return &res;
}

calc_blob *calc_blob_1_svc(u_int *n, struct svc_req *rq) {
    static char buf[1048576];
    static calc_blob res;
    u_int i, len = *n > sizeof buf ? sizeof buf : *n;
    for (i = 0; i < len; i++) buf[i] = (char)(i & 0xff);
    res.calc_blob_len = len;
    res.calc_blob_val = buf;
    return &res;
}

quad_t *calc_num_1_svc(calc_num *n, struct svc_req *rq) {
    static quad_t res;
    res = n->kind == 1 ? n->calc_num_u.small : n->calc_num_u.large;
    return &res;
}
"""

CALC_SERVER_MAIN_C = r"""
/* Serves CALC_PROG on 127.0.0.1, TCP and UDP, on ports the kernel picks,
   without rpcbind (svc_register with protocol 0); prints "TCPPORT UDPPORT". */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include "calc.h"

extern void calc_prog_1(struct svc_req *, SVCXPRT *);

static int bound_socket(int type) {
    struct sockaddr_in a;
    int s = socket(AF_INET, type, 0);
    int one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(s, (struct sockaddr *)&a, sizeof a) != 0) { perror("bind"); exit(1); }
    return s;
}

static int port_of(int s) {
    struct sockaddr_in a;
    socklen_t len = sizeof a;
    getsockname(s, (struct sockaddr *)&a, &len);
    return ntohs(a.sin_port);
}

int main(void) {
    int ts = bound_socket(SOCK_STREAM), us = bound_socket(SOCK_DGRAM);
    listen(ts, 64);
    SVCXPRT *t = svctcp_create(ts, 0, 0);
    SVCXPRT *u = svcudp_create(us);
    if (t == NULL || u == NULL) { fprintf(stderr, "svc create failed\n"); return 1; }
    if (!svc_register(t, CALC_PROG, CALC_VERS, calc_prog_1, 0) ||
        !svc_register(u, CALC_PROG, CALC_VERS, calc_prog_1, 0)) {
        fprintf(stderr, "svc_register failed\n");
        return 1;
    }
    printf("%d %d\n", port_of(ts), port_of(us));
    fflush(stdout);
    svc_run();
    return 1;
}
"""

CALC_CLIENT_C = r"""
/* calc_client tcp|udp PORT BLOBSIZE: calls every CALC procedure on
   127.0.0.1:PORT without rpcbind and prints one line per result. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include "calc.h"

int main(int argc, char **argv) {
    struct sockaddr_in a;
    struct timeval tv = {5, 0};
    int sock = RPC_ANYSOCK, i;
    CLIENT *c;
    enum clnt_stat st;
    if (argc != 4) { fprintf(stderr, "usage: calc_client tcp|udp PORT BLOBSIZE\n"); return 2; }
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons(atoi(argv[2]));
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (strcmp(argv[1], "tcp") == 0)
        c = clnttcp_create(&a, CALC_PROG, CALC_VERS, &sock, 0, 0);
    else
        c = clntudp_create(&a, CALC_PROG, CALC_VERS, (struct timeval){0, 200000}, &sock);
    if (c == NULL) { clnt_pcreateerror("calc_client"); return 3; }
    clnt_control(c, CLSET_TIMEOUT, (char *)&tv);

    st = clnt_call(c, NULLPROC, (xdrproc_t)xdr_void, NULL, (xdrproc_t)xdr_void, NULL, tv);
    printf("null %d\n", st);

    pair p = {2, 3};
    int *sum = calc_add_1(&p, c);
    if (!sum) { clnt_perror(c, "add"); return 4; }
    printf("add %d\n", *sum);

    int vals[5] = {1, 2, 3, 4, 5};
    echo_args ea;
    ea.name = "hello";
    ea.values.values_len = 5;
    ea.values.values_val = vals;
    ea.big = 1LL << 40;
    echo_res *er = calc_echo_1(&ea, c);
    if (!er) { clnt_perror(c, "echo"); return 4; }
    printf("echo %s %u", er->name, er->values.values_len);
    for (i = 0; i < (int)er->values.values_len; i++) printf(" %d", er->values.values_val[i]);
    printf(" %lld\n", (long long)er->sum);

    calc_args ca = {OP_MUL, 6, -7};
    calc_res *cr = calc_calc_1(&ca, c);
    if (!cr) { clnt_perror(c, "calc"); return 4; }
    printf("mul %d %lld\n", cr->status, (long long)cr->calc_res_u.value);
    ca.op = OP_DIV; ca.b = 0;
    cr = calc_calc_1(&ca, c);
    if (!cr) { clnt_perror(c, "calc"); return 4; }
    printf("div0 %d %s\n", cr->status, cr->status == 1 ? cr->calc_res_u.error : "-");

    calc_num n;
    n.kind = 2;
    n.calc_num_u.large = -(1LL << 50);
    quad_t *nv = calc_num_1(&n, c);
    if (!nv) { clnt_perror(c, "num"); return 4; }
    printf("num %lld\n", (long long)*nv);

    u_int bs = (u_int)atoi(argv[3]);
    calc_blob *b = calc_blob_1(&bs, c);
    if (!b) { clnt_perror(c, "blob"); return 4; }
    unsigned long check = 0;
    for (i = 0; i < (int)b->calc_blob_len; i++)
        check += (unsigned char)b->calc_blob_val[i] * (i % 7 + 1);
    printf("blob %u %lu\n", b->calc_blob_len, check);

    st = clnt_call(c, 99, (xdrproc_t)xdr_void, NULL, (xdrproc_t)xdr_void, NULL, tv);
    printf("proc99 %d\n", st);
    clnt_destroy(c);
    return 0;
}
"""


def blob_check(n: int) -> int:
    """The checksum calc_client prints for a CALC_BLOB reply of ``n`` bytes."""
    return sum((i & 0xFF) * (i % 7 + 1) for i in range(n))


def _need(*tools: str) -> None:
    for t in tools:
        if shutil.which(t) is None:
            pytest.skip(f"{t} is not installed (Debian: rpcsvc-proto, libtirpc-dev, gcc)")
    if not os.path.isdir(TIRPC_INCLUDE):
        pytest.skip("libtirpc headers are not installed (Debian: libtirpc-dev)")


def _run(cmd: Sequence[str], cwd: Path) -> None:
    res = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout}"
                             f"\n{res.stderr}")


class RpcgenCalc:
    """Paths of the C programs built from calc.x: ``server`` (our main, no
    rpcbind), ``client``, and ``registering_server``, rpcgen's own generated
    main, which unsets then registers CALC with rpcbind (through libtirpc:
    over rpcbind's local socket, so as "superuser" when run as root) and
    serves TCP and UDP on ports the kernel picks until it is killed."""

    def __init__(self, server: Path, client: Path, registering_server: Path) -> None:
        self.server = server
        self.client = client
        self.registering_server = registering_server


@pytest.fixture(scope="session")
def rpcgen_calc(tmp_path_factory) -> RpcgenCalc:
    """Build calc.x's C server and client with rpcgen + gcc + libtirpc."""
    _need("rpcgen", "gcc")
    d = tmp_path_factory.mktemp("rpcgen_calc")
    shutil.copy(CALC_X, d / "calc.x")
    _run(["rpcgen", "-h", "calc.x", "-o", "calc.h"], d)
    _run(["rpcgen", "-c", "calc.x", "-o", "calc_xdr.c"], d)
    _run(["rpcgen", "-m", "calc.x", "-o", "calc_svc.c"], d)
    _run(["rpcgen", "-l", "calc.x", "-o", "calc_clnt.c"], d)
    (d / "calc_impl.c").write_text(CALC_IMPL_C)
    (d / "calc_server_main.c").write_text(CALC_SERVER_MAIN_C)
    (d / "calc_client.c").write_text(CALC_CLIENT_C)
    cc = ["gcc", "-O1", "-w", f"-I{TIRPC_INCLUDE}", "-I."]
    _run([*cc, "-o", "calc_server", "calc_server_main.c", "calc_svc.c", "calc_impl.c",
          "calc_xdr.c", "-ltirpc"], d)
    _run([*cc, "-o", "calc_client", "calc_client.c", "calc_clnt.c", "calc_xdr.c",
          "-ltirpc"], d)
    _run(["rpcgen", "-s", "tcp", "-s", "udp", "calc.x", "-o", "calc_regsvc.c"], d)
    _run([*cc, "-o", "calc_regserver", "calc_regsvc.c", "calc_impl.c", "calc_xdr.c",
          "-ltirpc"], d)
    return RpcgenCalc(d / "calc_server", d / "calc_client", d / "calc_regserver")


def read_line(proc: subprocess.Popen[str], timeout: float = 10.0) -> str:
    """The next line ``proc`` prints on stdout (fails after ``timeout``)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"{proc.args!r} printed nothing within {timeout} s")
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if ready:
            line = proc.stdout.readline()
            if not line:
                raise AssertionError(f"{proc.args!r} exited ({proc.wait()}) without output")
            return line


def run_until_exit(loop: Any, proc: subprocess.Popen[Any], timeout: float = 10.0
                   ) -> tuple[str, str]:
    """Run ``loop`` until ``proc`` closes its stdout (it exited); returns (stdout, stderr).

    The loop watches the pipe, so it wakes up as soon as the process is done.
    """
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    chunks: list[bytes] = []
    eof: list[bool] = []

    def readable() -> None:
        data = os.read(fd, 65536)
        if data:
            chunks.append(data)
        else:
            eof.append(True)
            watch.cancel()

    watch = loop.watch_fd(fd, on_readable=readable)
    try:
        loop.run_until(lambda: bool(eof), timeout)
    finally:
        if not eof:
            watch.cancel()
    proc.wait(timeout)
    err = proc.stderr.read() if proc.stderr is not None else ""
    return b"".join(chunks).decode(), err if isinstance(err, str) else err.decode()


class InteropTools:
    """Helpers for tests, handed out by the ``interop`` fixture (test modules
    cannot import this conftest reliably)."""

    CALC_X = CALC_X
    blob_check = staticmethod(blob_check)
    read_line = staticmethod(read_line)
    run_until_exit = staticmethod(run_until_exit)


@pytest.fixture(scope="session")
def interop() -> type[InteropTools]:
    """``interop.read_line(proc)``, ``interop.run_until_exit(loop, proc)``, ..."""
    return InteropTools


def stop(proc: subprocess.Popen[Any]) -> None:
    """Terminate ``proc`` (then kill it) and reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for f in (proc.stdout, proc.stderr, proc.stdin):
        if f is not None:
            f.close()


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[Any]]]:
    """A list to put started processes in; they are stopped at the end of the test."""
    procs: list[subprocess.Popen[Any]] = []
    yield procs
    for p in procs:
        stop(p)


# -- network namespaces --------------------------------------------------------

_netns_ids = itertools.count()


class Netns:
    """A private network namespace with ``lo`` up; ``cmd(...)`` prefixes commands."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.procs: list[subprocess.Popen[Any]] = []

    def cmd(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, *argv: str, timeout: float = 20, check: bool = True
            ) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(self.cmd(*argv), capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} failed ({res.returncode}) in netns "
                                 f"{self.name}:\n{res.stdout}\n{res.stderr}")
        return res

    def popen(self, *argv: str, **kw: Any) -> subprocess.Popen[str]:
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        p = subprocess.Popen(self.cmd(*argv), text=True, **kw)
        self.procs.append(p)
        return p

    def python(self, script: str, *args: str, **kw: Any) -> subprocess.Popen[str]:
        """Run a Python script (source text) inside the namespace."""
        env = dict(os.environ)
        src = str(Path(__file__).resolve().parents[2] / "src")
        env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
        return self.popen(sys.executable, "-c", script, *args, env=env, **kw)

    def pids(self) -> list[int]:
        res = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True,
                             text=True)
        return [int(x) for x in res.stdout.split()]


@pytest.fixture
def netns() -> Iterator[Netns]:
    """A fresh network namespace (needs root and ``ip``); everything in it is killed
    and the namespace removed at the end."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (ip) is not installed")
    name = f"evpl-rpc-{os.getpid()}-{next(_netns_ids)}"
    res = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot create a network namespace: {res.stderr.strip()}")
    ns = Netns(name)
    try:
        ns.run("ip", "link", "set", "lo", "up")
        yield ns
    finally:
        for p in ns.procs:
            stop(p)
        for pid in ns.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run(["ip", "netns", "delete", name], capture_output=True)
