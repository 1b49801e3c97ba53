"""evpl.aio.attach: an asyncio loop that runs inside an evpl Loop's own
iterations, sharing its thread with evpl handlers."""

from __future__ import annotations

import asyncio
import threading

import evpl
import evpl.aio

TIMEOUT = 10.0


class Echo(evpl.Handler):
    def on_data(self, bind, data):
        bind.send(bytes(data))


def test_coroutines_timers_and_threadsafe_calls_run_when_the_evpl_loop_runs():
    loop = evpl.Loop()
    aloop = evpl.aio.attach(loop)
    seen: list[object] = []
    other = threading.Event()

    async def main():
        seen.append(asyncio.get_running_loop())
        await asyncio.sleep(0.001)              # an engine timer
        fut = aloop.create_future()
        t = threading.Thread(target=lambda: (other.wait(TIMEOUT),
                                             aloop.call_soon_threadsafe(fut.set_result, 7)))
        t.start()
        other.set()
        got = await fut                          # woken by the doorbell
        t.join()
        return got

    task = aloop.create_task(main())
    assert aloop.is_running() is False
    loop.run_until(task.done, timeout=TIMEOUT)
    assert task.result() == 7
    assert seen == [aloop]
    assert asyncio._get_running_loop() is None   # restored after each batch
    aloop.close()
    # the evpl Loop is still usable after the asyncio loop closed
    fired = []
    loop.call_later(0, fired.append, 1)
    loop.run_until(lambda: fired, timeout=TIMEOUT)
    loop.close()


def test_asyncio_streams_and_an_evpl_server_share_one_thread():
    """An asyncio client (streams, on the attached loop) talks to an evpl
    Bind server, both on one evpl Loop run by ``run_until``."""
    loop = evpl.Loop()
    aloop = evpl.aio.attach(loop)
    listener = loop.listen("tcp", ("127.0.0.1", 0), Echo)
    port = listener.address[1]

    async def client():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        out = []
        for i in range(50):
            msg = b"%03d" % i * 100
            writer.write(msg)
            out.append(await reader.readexactly(len(msg)) == msg)
        writer.close()
        await writer.wait_closed()
        return out

    task = aloop.create_task(client())
    loop.run_until(task.done, timeout=TIMEOUT)
    assert task.result() == [True] * 50
    listener.close()
    aloop.close()
    loop.close()


def test_evpl_handlers_resolve_futures_that_coroutines_await():
    loop = evpl.Loop()
    aloop = evpl.aio.attach(loop)
    waiting: list[asyncio.Future[bytes]] = []

    class Server(evpl.Handler):
        def on_data(self, bind, data):
            waiting.pop(0).set_result(bytes(data))   # a plain call, same thread

    listener = loop.listen("tcp", ("127.0.0.1", 0), Server)

    async def main():
        _reader, writer = await asyncio.open_connection("127.0.0.1", listener.address[1])
        fut = aloop.create_future()
        waiting.append(fut)
        writer.write(b"ping")
        got = await fut
        writer.close()
        return got

    task = aloop.create_task(main())
    loop.run_until(task.done, timeout=TIMEOUT)
    assert task.result() == b"ping"
    listener.close()
    aloop.close()
    loop.close()


def test_run_until_complete_drives_an_idle_evpl_loop_but_not_a_running_one():
    loop = evpl.Loop()
    aloop = evpl.aio.attach(loop)

    async def answer():
        await asyncio.sleep(0)
        return 42

    assert aloop.run_until_complete(answer()) == 42     # the evpl Loop is idle: drive it
    errors: list[BaseException] = []

    def inside():
        coro = answer()
        try:
            aloop.run_until_complete(coro)
        except RuntimeError as exc:
            errors.append(exc)
        finally:
            coro.close()
        loop.stop()

    loop.call_later(0, inside)
    loop.run()
    assert len(errors) == 1 and "already running" in str(errors[0])

    def close_inside():
        try:
            aloop.close()
        except RuntimeError as exc:
            errors.append(exc)
        loop.stop()

    loop.call_later(0, close_inside)
    loop.run()
    assert len(errors) == 2 and "running" in str(errors[1])
    aloop.close()
    assert aloop.is_closed()
    loop.close()
