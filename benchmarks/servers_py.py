"""asyncio and uvloop reference servers for the evpl benchmarks.

Each server is the fastest idiomatic form for its stack: the Protocol API
(BufferedProtocol where the data is thrown away), no streams, no per-message
tasks.

Modes:

* ``raw``    - echo the bytes of every ``data_received`` back with one write.
* ``framed`` - split the stream into 4-byte big-endian length-prefixed
  messages and call a per-message Python function for each whole message,
  which echoes it (header + payload). The writes of one ``data_received``
  go out together (``writelines``), as evpl flushes once per iteration.
* ``fixed``  - split the stream into fixed-size records (``--size``, 64) and
  call a per-message Python function for each, which echoes it; the replies
  of one ``data_received`` leave with one ``writelines``.
* ``sink``   - read and discard (BufferedProtocol into one reused buffer).
* ``udp``    - DatagramProtocol that sends every datagram back to its sender.

Usage: ``python servers_py.py --stack asyncio|uvloop --mode MODE --port P``.
Prints ``ready PORT`` on stdout once listening; exits on SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import struct
import sys
from collections.abc import Callable
from typing import cast

_HEADER = struct.Struct(">I")
_MAX_MESSAGE = 64 << 20
_SINK_BUFFER = 1 << 20


class RawEcho(asyncio.Protocol):
    """Echo every chunk back as it arrived."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Remember the transport and disable Nagle's algorithm."""
        self.transport = cast(asyncio.Transport, transport)
        _nodelay(self.transport)

    def data_received(self, data: bytes) -> None:
        """Write the chunk straight back."""
        self.transport.write(data)


class FramedEcho(asyncio.Protocol):
    """Length-prefix framing with a per-message handler that echoes."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Set up the reassembly buffer and the output batch."""
        self.transport = cast(asyncio.Transport, transport)
        self.pending = b""
        self.out: list[bytes] = []
        _nodelay(self.transport)

    def on_message(self, msg: bytes) -> None:
        """Handle one whole message (payload without header): echo it."""
        self.send(msg)

    def send(self, msg: bytes) -> None:
        """Queue one message; the header is added here, like a framed send."""
        out = self.out
        out.append(_HEADER.pack(len(msg)))
        out.append(msg)

    def data_received(self, data: bytes) -> None:
        """Split the stream into messages and dispatch each one."""
        buf = self.pending + data if self.pending else data
        size = len(buf)
        off = 0
        on_message = self.on_message
        unpack = _HEADER.unpack_from
        while size - off >= 4:
            (length,) = unpack(buf, off)
            if length > _MAX_MESSAGE:
                self.transport.close()
                return
            end = off + 4 + length
            if end > size:
                break
            on_message(buf[off + 4 : end])
            off = end
        self.pending = buf[off:] if off < size else b""
        if self.out:
            self.transport.writelines(self.out)
            self.out.clear()


class FixedEcho(FramedEcho):
    """Fixed-size records (no header) with a per-message handler that echoes."""

    size = 64

    def on_message(self, msg: bytes) -> None:
        """Handle one whole record: echo it."""
        self.out.append(msg)

    def data_received(self, data: bytes) -> None:
        """Cut the stream into records and dispatch each one."""
        buf = self.pending + data if self.pending else data
        size = self.size
        end = len(buf) - len(buf) % size
        on_message = self.on_message
        for off in range(0, end, size):
            on_message(buf[off:off + size])
        self.pending = buf[end:]
        if self.out:
            self.transport.writelines(self.out)
            self.out.clear()


class Sink(asyncio.BufferedProtocol):
    """Read into one reused buffer and throw the bytes away."""

    def __init__(self) -> None:
        """Allocate the receive buffer once."""
        self.buffer = memoryview(bytearray(_SINK_BUFFER))
        self.received = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Nothing to set up besides TCP_NODELAY."""
        _nodelay(cast(asyncio.Transport, transport))

    def get_buffer(self, sizehint: int) -> memoryview:
        """Hand out the same buffer every time."""
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        """Count and discard."""
        self.received += nbytes


class UdpEcho(asyncio.DatagramProtocol):
    """Send every datagram back to where it came from."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Remember the transport."""
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        """Echo the datagram."""
        self.transport.sendto(data, addr)


def _nodelay(transport: asyncio.Transport) -> None:
    """Set TCP_NODELAY (asyncio already does on 3.11; uvloop too, be explicit)."""
    import socket

    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


STREAM_PROTOCOLS: dict[str, Callable[[], asyncio.BaseProtocol]] = {
    "raw": RawEcho,
    "framed": FramedEcho,
    "fixed": FixedEcho,
    "sink": Sink,
}


async def serve(mode: str, host: str, port: int) -> None:
    """Start the server for ``mode`` and run until SIGINT/SIGTERM."""
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    if mode == "udp":
        transport, _ = await loop.create_datagram_endpoint(UdpEcho, local_addr=(host, port))
        bound = transport.get_extra_info("sockname")[1]
        closer: Callable[[], object] = transport.close
    else:
        server = await loop.create_server(STREAM_PROTOCOLS[mode], host, port, backlog=1024)
        bound = server.sockets[0].getsockname()[1]
        closer = server.close
    print(f"ready {bound}", flush=True)
    try:
        await stop
    finally:
        closer()


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, pick the event loop and serve."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stack", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--mode", choices=["raw", "framed", "fixed", "sink", "udp"],
                        default="raw")
    parser.add_argument("--size", type=int, default=64, help="--mode fixed: record size")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    args = parser.parse_args(argv)
    FixedEcho.size = args.size
    if args.stack == "uvloop":
        try:
            import uvloop
        except ImportError:
            print("uvloop is not installed (pip install uvloop)", file=sys.stderr)
            return 3
        runner: Callable[..., None] = uvloop.run
    else:
        runner = asyncio.run
    runner(serve(args.mode, args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
