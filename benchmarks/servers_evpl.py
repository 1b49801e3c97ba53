"""evpl servers for the benchmarks: the same servers as servers_py.py.

Written against the public API in docs/api.md and nothing else, in the
fastest idiomatic form:

* ``raw``    - ``on_data``: send the received Buffer straight back.
* ``framed`` - ``framing=evpl.framing.length_prefix(4, "big")``;
  ``on_messages`` gets every message of a read and echoes them with one
  ``send_messages`` (the framer adds each header back). ``--per-message``
  uses ``on_message`` and ``send`` per message instead.
* ``fixed``  - as ``framed`` with ``framing=evpl.framing.fixed(--size)``.
* ``sink``   - ``on_data`` drops the Buffer.
* ``udp``    - ``on_datagram``: ``bind.sendto(buf, addr)``.
* ``udpsink`` - ``on_datagram`` drops the Buffer (one-way receive rate).

Usage::

    python servers_evpl.py --mode raw|framed|fixed|sink|udp --port P
        [--backend tcp|unix|io_uring_tcp|udp|io_uring_udp|...]
        [--poll] [--spin-ns N] [--path /tmp/x.sock] [--interface IF (xdp_udp)]

Prints ``ready PORT`` (``ready unix:PATH`` for a unix backend) on stdout once
it listens, and ``stats {...}`` (``Loop.stats()`` as JSON) on stderr when it
exits on SIGINT/SIGTERM. Exit status 3 means evpl (or the backend) is not
available.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import Any

try:
    import evpl
except ImportError as exc:  # reported by run.py as "skipped"
    print(f"evpl is not importable: {exc}", file=sys.stderr)
    sys.exit(3)


class RawEcho(evpl.Handler):
    """Echo every chunk of bytes back."""

    def on_data(self, bind: evpl.Bind, buf: evpl.Buffer) -> None:
        """Send the received Buffer back (referenced, not copied)."""
        bind.send(buf)


class FramedEcho(evpl.Handler):
    """Per-message handler on a length-prefix framed connection."""

    def on_message(self, bind: evpl.Bind, msg: evpl.Buffer) -> None:
        """Echo one whole message; the framer adds the header."""
        bind.send(msg)


class BatchEcho(evpl.Handler):
    """Every message of a read in one call, the replies in one call: the
    fastest idiomatic form of a message handler on evpl."""

    def on_messages(self, bind: evpl.Bind, msgs: list[evpl.Buffer]) -> None:
        """Echo the batch; the framer adds each message's header."""
        bind.send_messages(msgs)


class Sink(evpl.Handler):
    """Discard everything."""

    received = 0

    def on_data(self, bind: evpl.Bind, buf: evpl.Buffer) -> None:
        """Count and drop the Buffer (it returns to the pool)."""
        self.received += len(buf)


class UdpEcho(evpl.Handler):
    """Send every datagram back to its sender."""

    def on_datagram(self, bind: evpl.Bind, buf: evpl.Buffer, addr: Any) -> None:
        """Echo the datagram."""
        bind.sendto(buf, addr)


STREAM_HANDLERS: dict[str, type[evpl.Handler]] = {
    "raw": RawEcho,
    "framed": BatchEcho,
    "fixed": BatchEcho,
    "sink": Sink,
}


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, start the server and run the loop until signalled."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["raw", "framed", "fixed", "sink", "udp", "udpsink"],
                        default="raw")
    parser.add_argument("--size", type=int, default=64, help="--mode fixed: record size")
    parser.add_argument("--per-message", action="store_true",
                        help="framed/fixed: on_message and send per message, not batches")
    parser.add_argument("--backend", default=None,
                        help="evpl backend name (default: tcp, or udp for --mode udp)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--path", default=None,
                        help="socket path for a unix backend (default /tmp/evpl-bench-PID.sock)")
    parser.add_argument("--poll", action="store_true", help='poll_mode="always" (burns a core)')
    parser.add_argument("--spin-ns", type=int, default=None,
                        help="hybrid mode: keep polling this long after activity")
    parser.add_argument("--no-gso", action="store_true", help="--mode udp: bind(..., gso=False)")
    parser.add_argument("--interface", default=None,
                        help="xdp_udp: the interface to bind on (bind(..., interface=))")
    parser.add_argument("--sqpoll-cpu", type=int, default=None,
                        help="io_uring backends: SQPOLL thread pinned to this CPU")
    args = parser.parse_args(argv)

    backend = args.backend or ("udp" if args.mode in ("udp", "udpsink") else "tcp")
    loop_kwargs: dict[str, Any] = {}
    if args.poll:
        loop_kwargs["poll_mode"] = "always"
    if args.spin_ns is not None:
        loop_kwargs["spin_ns"] = args.spin_ns
    if args.sqpoll_cpu is not None:
        loop_kwargs.update(sqpoll=True, sqpoll_cpu=args.sqpoll_cpu)

    try:
        loop = evpl.Loop(**loop_kwargs)
    except evpl.EvplError as exc:
        print(f"evpl.Loop({loop_kwargs}) failed: {exc}", file=sys.stderr)
        return 3

    unix_path: str | None = None
    try:
        if args.mode in ("udp", "udpsink"):
            opts: dict[str, Any] = {"interface": args.interface} if args.interface else {
                "gso": not args.no_gso}
            handler = UdpEcho() if args.mode == "udp" else evpl.Handler()
            bind = loop.bind(backend, (args.host, args.port), handler, **opts)
            ready = str(bind.local_address[1])
        else:
            address: Any
            if "unix" in backend:
                unix_path = args.path or f"/tmp/evpl-bench-{os.getpid()}.sock"
                if os.path.exists(unix_path):
                    os.unlink(unix_path)
                address = unix_path
            else:
                address = (args.host, args.port)
            framing = None
            if args.mode == "framed":
                framing = evpl.framing.length_prefix(4, "big")
            elif args.mode == "fixed":
                framing = evpl.framing.fixed(args.size)
            handler = STREAM_HANDLERS[args.mode]
            if args.per_message and framing is not None:
                handler = FramedEcho
            listener = loop.listen(backend, address, handler, framing=framing)
            ready = f"unix:{unix_path}" if unix_path else str(listener.address[1])
    except evpl.BackendUnavailable as exc:
        print(f"backend {backend!r} unavailable: {exc}", file=sys.stderr)
        return 3

    def on_signal(signum: int, frame: object) -> None:
        loop.stop()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    print(f"ready {ready}", flush=True)
    try:
        loop.run()
    finally:
        try:
            stats = loop.stats()
        except Exception as exc:
            stats = {"error": repr(exc)}
        print("stats " + json.dumps(stats, default=str), file=sys.stderr, flush=True)
        loop.close()
        if unix_path and os.path.exists(unix_path):
            os.unlink(unix_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
