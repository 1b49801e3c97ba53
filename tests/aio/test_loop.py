"""The evpl asyncio loop with real sockets, pipes, threads and signals: the
AbstractEventLoop surface, Bind transports (data, flow control, half-close,
abort, extra info) and ownership of pool buffers."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
import sys
import threading
from typing import Any

import pytest

import evpl
import evpl.aio
from aio.helpers import run

# ---- scheduling ------------------------------------------------------------------


def test_call_soon_order_and_later(aio_loop: Any) -> None:
    seen: list[Any] = []
    aio_loop.call_later(0.02, seen.append, "later")
    h = aio_loop.call_later(0.01, seen.append, "cancelled")
    aio_loop.call_at(aio_loop.time() + 0.005, seen.append, "at")
    for i in range(5):
        aio_loop.call_soon(seen.append, i)
    h.cancel()
    aio_loop.call_later(0.03, aio_loop.stop)
    aio_loop.run_forever()
    assert seen == [0, 1, 2, 3, 4, "at", "later"]
    assert h.cancelled()


def test_timers_never_early(aio_loop: Any) -> None:
    async def main() -> list[float]:
        late = []
        for delay in (0.001, 0.01, 0.05):
            t0 = aio_loop.time()
            await asyncio.sleep(delay)
            late.append(aio_loop.time() - t0 - delay)
        return late

    assert all(x >= -aio_loop._clock_resolution for x in run(aio_loop, main()))


def test_call_soon_threadsafe_wakes_a_sleeping_loop(aio_loop: Any) -> None:
    async def main() -> str:
        fut = aio_loop.create_future()
        t = threading.Thread(target=aio_loop.call_soon_threadsafe,
                             args=(fut.set_result, "from thread"))
        t.start()
        try:
            return await fut            # no timer is armed: only the doorbell wakes us
        finally:
            t.join()

    assert run(aio_loop, main()) == "from thread"


def test_run_in_executor_and_getaddrinfo(aio_loop: Any) -> None:
    async def main() -> Any:
        tid = await aio_loop.run_in_executor(None, threading.get_ident)
        infos = await aio_loop.getaddrinfo("127.0.0.1", 80, type=socket.SOCK_STREAM)
        return tid, infos

    tid, infos = run(aio_loop, main())
    assert tid != threading.get_ident()
    assert infos[0][4] == ("127.0.0.1", 80)


def test_exception_handler_and_task_factory(aio_loop: Any) -> None:
    made = []

    def factory(loop: Any, coro: Any) -> asyncio.Task[Any]:
        made.append(coro)
        return asyncio.Task(coro, loop=loop)

    aio_loop.set_task_factory(factory)
    assert aio_loop.get_task_factory() is factory

    def boom() -> None:
        raise ValueError("boom")

    async def main() -> None:
        aio_loop.call_soon(boom)
        await asyncio.sleep(0)

    run(aio_loop, main())
    assert made, "the task factory was not used"
    assert [type(c["exception"]) for c in aio_loop.errors] == [ValueError]
    aio_loop.errors.clear()


def test_debug_mode_reports_slow_callbacks(aio_loop: Any, caplog: Any) -> None:
    import time

    aio_loop.set_debug(True)
    aio_loop.slow_callback_duration = 0.001
    aio_loop.call_soon(time.sleep, 0.01)
    aio_loop.call_soon(aio_loop.stop)
    with caplog.at_level("WARNING", logger="asyncio"):
        aio_loop.run_forever()
    assert any("Executing" in r.message for r in caplog.records)


def test_entry_points() -> None:
    async def main() -> Any:
        return type(asyncio.get_running_loop())

    assert evpl.aio.run(main()) is evpl.aio.EvplEventLoop
    with asyncio.Runner(loop_factory=evpl.aio.new_event_loop) as runner:
        assert runner.run(main()) is evpl.aio.EvplEventLoop
    old = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(evpl.aio.EventLoopPolicy(poll_mode="event"))
    try:
        loop = asyncio.new_event_loop()
        try:
            assert isinstance(loop, evpl.aio.EvplEventLoop)
            assert loop.core.poll_mode == "event"
        finally:
            loop.close()
    finally:
        asyncio.set_event_loop_policy(old)


def test_bad_options_are_refused() -> None:
    with pytest.raises(evpl.ConfigError):
        evpl.aio.new_event_loop(backend="kqueue")
    with pytest.raises(evpl.ConfigError):
        evpl.aio.new_event_loop(poll_mode="sometimes")


# ---- fd watches and sock_* -----------------------------------------------------------


def test_add_reader_add_writer(aio_loop: Any) -> None:
    a, b = socket.socketpair()
    a.setblocking(False)

    async def main() -> bytes:
        got = aio_loop.create_future()
        writable = aio_loop.create_future()
        aio_loop.add_writer(a, lambda: writable.done() or writable.set_result(True))
        await writable
        assert aio_loop.remove_writer(a)

        def readable() -> None:
            got.set_result(a.recv(100))
            aio_loop.remove_reader(a)

        aio_loop.add_reader(a.fileno(), readable)
        b.send(b"ping")
        return await got

    try:
        assert run(aio_loop, main()) == b"ping"
        assert not aio_loop.remove_reader(a)
    finally:
        a.close()
        b.close()


def test_sock_methods(aio_loop: Any) -> None:
    async def main() -> Any:
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        srv.setblocking(False)
        cli = socket.socket()
        cli.setblocking(False)
        with srv, cli:
            accept = asyncio.ensure_future(aio_loop.sock_accept(srv))
            await aio_loop.sock_connect(cli, srv.getsockname())
            conn, _ = await accept
            with conn:
                big = os.urandom(4 << 20)      # more than the socket buffers hold
                send = asyncio.ensure_future(aio_loop.sock_sendall(cli, big))
                got = bytearray()
                buf = bytearray(65536)
                while len(got) < len(big):
                    n = await aio_loop.sock_recv_into(conn, buf)
                    got += buf[:n]
                await send
                await aio_loop.sock_sendall(conn, b"back")
                back = await aio_loop.sock_recv(cli, 10)
                return bytes(got) == big, back

    assert run(aio_loop, main()) == (True, b"back")


def test_sock_datagram_methods(aio_loop: Any) -> None:
    async def main() -> Any:
        a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with a, b:
            for s in (a, b):
                s.bind(("127.0.0.1", 0))
                s.setblocking(False)
            recv = asyncio.ensure_future(aio_loop.sock_recvfrom(b, 100))
            await asyncio.sleep(0)
            await aio_loop.sock_sendto(a, b"dgram", b.getsockname())
            return await recv, a.getsockname()

    (data, addr), a_addr = run(aio_loop, main())
    assert data == b"dgram" and addr == a_addr


# ---- stream transports ------------------------------------------------------------------


class Collect(asyncio.Protocol):
    """Records what a connection delivers."""

    def __init__(self) -> None:
        self.transport: Any = None
        self.data = bytearray()
        self.types: set[type] = set()
        self.eof = asyncio.get_event_loop().create_future()
        self.lost = asyncio.get_event_loop().create_future()
        self.paused = 0
        self.resumed = 0
        self._want = 0
        self._enough: asyncio.Future[None] | None = None

    def received(self, n: int) -> asyncio.Future[None]:
        """A future done once ``n`` bytes have arrived."""
        fut = asyncio.get_event_loop().create_future()
        if len(self.data) >= n:
            fut.set_result(None)
        else:
            self._want, self._enough = n, fut
        return fut

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.types.add(type(data))
        self.data += data
        if self._enough is not None and len(self.data) >= self._want:
            self._enough.set_result(None)
            self._enough = None

    def eof_received(self) -> bool:
        self.eof.set_result(True)
        return True

    def pause_writing(self) -> None:
        self.paused += 1
        self.size_at_pause = self.transport.get_write_buffer_size()

    def resume_writing(self) -> None:
        self.resumed += 1

    def connection_lost(self, exc: Any) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


class Echo(asyncio.Protocol):
    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


async def _server(loop: Any, family: str, factory: Any, tmp: Any) -> tuple[Any, Any]:
    if family == "unix":
        path = os.path.join(str(tmp), "s.sock")
        srv = await loop.create_unix_server(factory, path)
        return srv, path
    srv = await loop.create_server(factory, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()


async def _connect(loop: Any, family: str, factory: Any, addr: Any) -> tuple[Any, Any]:
    if family == "unix":
        return await loop.create_unix_connection(factory, addr)
    return await loop.create_connection(factory, *addr)


@pytest.mark.parametrize("family", ["tcp", "unix"])
def test_echo_bytes_and_extra_info(aio_loop: Any, family: str, tmp_path: Any) -> None:
    async def main() -> None:
        srv, addr = await _server(aio_loop, family, Echo, tmp_path)
        tr, proto = await _connect(aio_loop, family, Collect, addr)
        assert isinstance(tr, evpl.aio.StreamTransport)
        assert tr.get_extra_info("peername") == addr
        sock = tr.get_extra_info("socket")
        assert sock.fileno() >= 0 and sock.family == (
            socket.AF_UNIX if family == "unix" else socket.AF_INET)
        payload = os.urandom(300_000)
        tr.writelines([payload[:1000], memoryview(payload)[1000:2000], bytearray(payload[2000:])])
        await proto.received(len(payload))
        assert bytes(proto.data) == payload
        assert proto.types == {bytes}
        tr.close()
        assert await proto.lost is None
        assert tr.get_extra_info("socket") is sock or sock.fileno() == -1
        srv.close()
        await srv.wait_closed()

    run(aio_loop, main())


def test_buffered_protocol(aio_loop: Any) -> None:
    class Buffered(asyncio.BufferedProtocol):
        def __init__(self) -> None:
            self.buf = bytearray(1000)       # smaller than what arrives at once
            self.got = bytearray()
            self.done = asyncio.get_event_loop().create_future()

        def get_buffer(self, sizehint: int) -> bytearray:
            return self.buf

        def buffer_updated(self, nbytes: int) -> None:
            self.got += self.buf[:nbytes]

        def eof_received(self) -> None:
            self.done.set_result(bytes(self.got))

    payload = os.urandom(200_000)

    async def main() -> bytes:
        srv = socket.create_server(("127.0.0.1", 0))
        with srv:
            tr, proto = await aio_loop.create_connection(Buffered, *srv.getsockname())
            conn, _ = await aio_loop.sock_accept(srv)
            with conn:
                await aio_loop.sock_sendall(conn, payload)
                conn.shutdown(socket.SHUT_WR)
                got = await proto.done
            tr.close()
            return got

    assert run(aio_loop, main()) == payload


def test_write_flow_control_and_half_close(aio_loop: Any) -> None:
    """A peer that does not read pauses the protocol; once it reads, the
    protocol resumes; write_eof reaches it as EOF while we keep receiving."""
    async def main() -> None:
        srv = socket.create_server(("127.0.0.1", 0))
        with srv:
            tr, proto = await aio_loop.create_connection(Collect, *srv.getsockname())
            conn, _ = await aio_loop.sock_accept(srv)
            with conn:
                tr.set_write_buffer_limits(high=4096)
                assert tr.get_write_buffer_limits() == (1024, 4096)
                chunk = b"x" * 65536
                while not proto.paused:
                    tr.write(chunk)
                    await asyncio.sleep(0)
                assert proto.size_at_pause > 4096
                tr.write_eof()          # after what is queued
                assert tr.can_write_eof()
                total = 0
                while data := await aio_loop.sock_recv(conn, 1 << 20):
                    total += len(data)
                assert total % 65536 == 0 and total >= 65536
                assert proto.resumed == 1
                with pytest.raises(RuntimeError):
                    tr.write(b"after eof")
                await aio_loop.sock_sendall(conn, b"still open")
                conn.shutdown(socket.SHUT_WR)
                await proto.eof
                assert bytes(proto.data) == b"still open"
            tr.close()
            await proto.lost

    run(aio_loop, main())


def test_pause_resume_reading(aio_loop: Any) -> None:
    async def main() -> None:
        srv = socket.create_server(("127.0.0.1", 0))
        with srv:
            tr, proto = await aio_loop.create_connection(Collect, *srv.getsockname())
            conn, _ = await aio_loop.sock_accept(srv)
            with conn:
                tr.pause_reading()
                assert not tr.is_reading()
                await aio_loop.sock_sendall(conn, b"held")
                for _ in range(20):
                    await asyncio.sleep(0)
                assert proto.data == b""
                tr.resume_reading()
                await proto.received(1)
                assert proto.data == b"held" and tr.is_reading()
            tr.close()
            await proto.lost

    run(aio_loop, main())


def test_abort_and_peer_reset(aio_loop: Any) -> None:
    async def main() -> Any:
        srv = socket.create_server(("127.0.0.1", 0))
        with srv:
            tr, proto = await aio_loop.create_connection(Collect, *srv.getsockname())
            conn, _ = await aio_loop.sock_accept(srv)
            tr.write(b"dropped maybe")
            tr.abort()
            assert await proto.lost is None
            conn.close()
            _tr2, proto2 = await aio_loop.create_connection(Collect, *srv.getsockname())
            conn2, _ = await aio_loop.sock_accept(srv)
            # the peer resets: SO_LINGER 0
            conn2.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn2.close()
            return await proto2.lost

    exc = run(aio_loop, main())
    assert exc is None or isinstance(exc, ConnectionResetError)


def test_protocol_error_is_reported_and_closes(aio_loop: Any) -> None:
    class Bad(Collect):
        def data_received(self, data: bytes) -> None:
            raise ZeroDivisionError

    async def main() -> Any:
        srv = socket.create_server(("127.0.0.1", 0))
        with srv:
            _tr, proto = await aio_loop.create_connection(Bad, *srv.getsockname())
            conn, _ = await aio_loop.sock_accept(srv)
            with conn:
                await aio_loop.sock_sendall(conn, b"x")
                return await proto.lost

    assert isinstance(run(aio_loop, main()), ZeroDivisionError)
    assert [c["message"] for c in aio_loop.errors] == [
        "Fatal error: protocol.data_received() call failed."]
    aio_loop.errors.clear()


def test_server_close_and_many_connections(aio_loop: Any) -> None:
    async def main() -> None:
        srv = await asyncio.start_server(_stream_echo, "127.0.0.1", 0)
        addr = srv.sockets[0].getsockname()

        async def one(i: int) -> bytes:
            r, w = await asyncio.open_connection(*addr)
            w.write(b"%d\n" % i)
            line = await r.readline()
            w.close()
            await w.wait_closed()
            return line

        lines = await asyncio.gather(*(one(i) for i in range(50)))
        assert lines == [b"%d\n" % i for i in range(50)]
        srv.close()
        await srv.wait_closed()
        with pytest.raises(OSError):
            await asyncio.open_connection(*addr)

    run(aio_loop, main())


async def _stream_echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    while line := await r.readline():
        w.write(line)
        await w.drain()
    w.close()


def test_connect_accepted_socket(aio_loop: Any) -> None:
    async def main() -> bytes:
        a, b = socket.socketpair()
        with b:
            tr, proto = await aio_loop.connect_accepted_socket(Collect, a)
            b.sendall(b"over a socketpair")
            b.shutdown(socket.SHUT_WR)
            await proto.eof
            tr.close()
            await proto.lost
            assert a.fileno() == -1           # the transport owned it
            return bytes(proto.data)

    assert run(aio_loop, main()) == b"over a socketpair"


def test_datagram_endpoint(aio_loop: Any) -> None:
    class Dgram(asyncio.DatagramProtocol):
        def __init__(self) -> None:
            self.got = asyncio.get_event_loop().create_future()

        def datagram_received(self, data: bytes, addr: Any) -> None:
            if not self.got.done():
                self.got.set_result((data, addr))

    async def main() -> Any:
        srv_tr, srv = await aio_loop.create_datagram_endpoint(
            Dgram, local_addr=("127.0.0.1", 0))
        addr = srv_tr.get_extra_info("sockname")
        cli_tr, cli = await aio_loop.create_datagram_endpoint(Dgram, remote_addr=addr)
        cli_tr.sendto(b"hello")
        data, peer = await srv.got
        srv_tr.sendto(b"reply", peer)
        reply = await cli.got
        cli_tr.close()
        srv_tr.close()
        return data, reply[0]

    assert run(aio_loop, main()) == (b"hello", b"reply")


# ---- processes and signals ------------------------------------------------------------


def test_subprocess_pipeline(aio_loop: Any) -> None:
    """producer | our loop | consumer: bytes pass through two child
    processes' pipes, exit codes arrive through pidfd watches."""
    async def main() -> Any:
        producer = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "import sys; sys.stdout.write('b\\na\\nc\\n' * 1000)",
            stdout=asyncio.subprocess.PIPE)
        consumer = await asyncio.create_subprocess_exec(
            "sort", "-u", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        assert producer.stdout is not None and consumer.stdin is not None
        while chunk := await producer.stdout.read(4096):
            consumer.stdin.write(chunk)
            await consumer.stdin.drain()
        consumer.stdin.close()
        out, _ = await consumer.communicate()
        shell = await asyncio.create_subprocess_shell("exit 7")
        return out, await producer.wait(), await consumer.wait(), await shell.wait()

    assert run(aio_loop, main()) == (b"a\nb\nc\n", 0, 0, 7)


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                    reason="signal handlers need the main thread")
def test_signal_handler(aio_loop: Any) -> None:
    async def main() -> int:
        fut = aio_loop.create_future()
        aio_loop.add_signal_handler(signal.SIGUSR1, fut.set_result, signal.SIGUSR1)
        try:
            threading.Timer(0.01, os.kill, (os.getpid(), signal.SIGUSR1)).start()
            return await fut
        finally:
            assert aio_loop.remove_signal_handler(signal.SIGUSR1)

    assert run(aio_loop, main()) == signal.SIGUSR1
    async def coroutine_function() -> None:
        pass

    with pytest.raises(TypeError):
        aio_loop.add_signal_handler(signal.SIGUSR1, coroutine_function)


def test_shutdown_asyncgens_and_executor(aio_loop: Any) -> None:
    closed = []

    async def agen() -> Any:
        try:
            yield 1
            yield 2
        finally:
            closed.append(True)

    async def main() -> None:
        g = agen()
        await g.__anext__()
        await aio_loop.run_in_executor(None, int)

    run(aio_loop, main())
    aio_loop.run_until_complete(aio_loop.shutdown_asyncgens())
    aio_loop.run_until_complete(aio_loop.shutdown_default_executor())
    assert closed == [True]


def test_loops_in_threads() -> None:
    """One evpl loop per thread, each serving and connecting at once."""
    results: list[bytes] = []

    async def main(i: int) -> None:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(await r.readline())
            w.close()

        srv = await asyncio.start_server(handle, "127.0.0.1", 0)
        r, w = await asyncio.open_connection(*srv.sockets[0].getsockname())
        w.write(b"thread %d\n" % i)
        results.append(await r.readline())
        w.close()
        srv.close()
        await srv.wait_closed()

    threads = [threading.Thread(target=evpl.aio.run, args=(main(i),)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == [b"thread 0\n", b"thread 1\n", b"thread 2\n"]
