"""``evpl.rpc2.current_call()`` with one Loop per thread: each thread sees the call
its own handler is serving, even while the other thread's handler is running."""

from __future__ import annotations

import struct
import threading
from typing import Any

import pytest

import evpl
from evpl.rpc2 import Client, Server, current_call

PROG, VERS, PROC = 0x20000125, 1, 1
TIMEOUT = 10.0


def serve_one_call(transport: str, barrier: threading.Barrier, out: dict[str, Any]) -> None:
    """A Loop, a Server and a Client in this thread; one call whose handler reads
    current_call() while the other thread's handler is running too (both wait on
    ``barrier`` before and after reading it)."""
    loop = evpl.Loop()
    try:
        def handler(ctx: Any, args: memoryview) -> bytes:
            barrier.wait(TIMEOUT)  # both handlers have started
            seen = current_call()
            barrier.wait(TIMEOUT)  # both have read it before either returns
            out["same"] = seen is ctx
            out["xid"] = seen.xid
            return struct.pack(">I", seen.xid & 0xFFFFFFFF)

        server = Server(loop)
        server.register(PROG, VERS, {PROC: handler})
        if transport == "udp":
            addr = server.bind_udp(("127.0.0.1", 0)).local_address
        else:
            addr = server.listen("tcp", ("127.0.0.1", 0)).address
        client = Client(loop, transport, addr, timeout=TIMEOUT)
        rpc = client.call(PROG, VERS, PROC, b"", lambda b: struct.unpack(">I", b)[0])
        out["reply"] = client.wait(rpc, TIMEOUT)
        out["call_xid"] = rpc.xid
        with pytest.raises(evpl.EvplError, match="only valid inside an RPC handler"):
            current_call()  # after the handler returned
        client.close()
        server.close()
    except BaseException as exc:  # reported by the main thread
        out["error"] = exc
        barrier.abort()
    finally:
        loop.close()


@pytest.mark.parametrize("transport", ["tcp", "udp"])
def test_current_call_is_per_thread(transport: str) -> None:
    barrier = threading.Barrier(2)
    results: list[dict[str, Any]] = [{}, {}]
    threads = [threading.Thread(target=serve_one_call, args=(transport, barrier, r))
               for r in results]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT * 2)
    assert not any(t.is_alive() for t in threads)
    for r in results:
        assert "error" not in r, r.get("error")
        assert r["same"], "current_call() returned the other thread's call"
        assert r["xid"] == r["call_xid"] == r["reply"]
    assert results[0]["xid"] != results[1]["xid"]


def test_current_call_outside_a_handler() -> None:
    with pytest.raises(evpl.EvplError, match="only valid inside an RPC handler"):
        current_call()


def test_current_call_is_reset_after_a_handler_raises(loop) -> None:
    seen: list[Any] = []

    def failing(ctx: Any, args: memoryview) -> bytes:
        seen.append(current_call())
        raise RuntimeError("on purpose")

    server = Server(loop)
    server.register(PROG, VERS, {PROC: failing})
    addr = server.listen("tcp", ("127.0.0.1", 0)).address
    client = Client(loop, "tcp", addr, timeout=TIMEOUT)
    with pytest.raises(evpl.rpc2.SystemErr):
        client.wait(client.call(PROG, VERS, PROC), TIMEOUT)
    assert len(seen) == 1 and seen[0].proc == PROC
    with pytest.raises(evpl.EvplError):
        current_call()
    client.close()
    server.close()
