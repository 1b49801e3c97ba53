"""``evpl http serve module:app``: run an HTTP server for an app (uvicorn-like)."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
from typing import Any

from evpl.errors import ConfigError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("http", help="HTTP server tools (evpl http serve module:app)",
                       description="HTTP/1.1 and HTTP/2 on evpl.")
    hsub = p.add_subparsers(dest="http_command", metavar="SUBCOMMAND")
    s = hsub.add_parser(
        "serve", help="serve an app: evpl http serve module:app",
        description="Serve an application over HTTP/1.1 and HTTP/2 (h2c). The app is "
                    "'module:attribute' (module imported from the current directory or "
                    "--app-dir), as with uvicorn.",
        epilog="Interfaces: 'evpl' is app(request) -> evpl.http.Response, called in the "
               "loop (fastest); 'asgi' is an ASGI 3.0 app (Starlette, FastAPI...); 'wsgi' is "
               "a PEP 3333 app (Flask...) run in --workers threads. Stop with Ctrl-C or "
               "SIGTERM: in-flight requests finish (up to --graceful-timeout).")
    s.add_argument("app", help="the application, as module:attribute (e.g. main:app)")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: %(default)s)")
    s.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    s.add_argument("--interface", choices=("auto", "evpl", "asgi", "wsgi"), default="auto",
                   help="how to call the app (default: auto: asgi for a coroutine function "
                        "taking 3 arguments, wsgi for 2, evpl for 1)")
    s.add_argument("--backend", default="tcp",
                   help="evpl stream backend: tcp or io_uring_tcp (see 'evpl info'; "
                        "default: %(default)s)")
    s.add_argument("--shards", type=int, default=1,
                   help="processes, one per core, each with its own loop and its own "
                        "SO_REUSEPORT socket of the port (evpl.shards); default 1")
    s.add_argument("--workers", type=int, default=16,
                   help="WSGI worker threads (default: %(default)s)")
    s.add_argument("--access-log", action="store_true", help="log one line per request")
    s.add_argument("--no-http2", action="store_true", help="refuse HTTP/2 (prior knowledge, h2c)")
    s.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds to receive a whole request head (default: %(default)s)")
    s.add_argument("--keepalive-timeout", type=float, default=5.0,
                   help="seconds an idle keep-alive connection stays open (default: %(default)s)")
    s.add_argument("--max-body", type=int, default=16 << 20,
                   help="largest request body in bytes, 413 beyond (default: %(default)s)")
    s.add_argument("--max-connections", type=int, default=10000,
                   help="open connections, 503 beyond (default: %(default)s)")
    s.add_argument("--graceful-timeout", type=float, default=10.0,
                   help="seconds in-flight requests get on shutdown (default: %(default)s)")
    s.add_argument("--root-path", default="", help="ASGI root_path / WSGI SCRIPT_NAME")
    s.add_argument("--app-dir", default=".", help="directory to import the app from "
                                                  "(default: current directory)")
    s.add_argument("--log-level", default="info",
                   choices=("debug", "info", "warning", "error"), help="default: %(default)s")
    s.set_defaults(func=serve)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def load_app(spec: str, app_dir: str = ".") -> Any:
    """Import ``module:attribute`` (attribute may be dotted)."""
    module_name, colon, attr = spec.partition(":")
    if not colon or not module_name or not attr:
        raise ConfigError(f"app must be 'module:attribute', got {spec!r}")
    sys.path.insert(0, os.path.abspath(app_dir))
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import {module_name!r}: {exc}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"{module_name!r} has no attribute {attr!r}") from None
    return obj


def guess_interface(app: Any) -> str:
    """asgi for ``async def app(scope, receive, send)`` (or an object whose
    ``__call__`` is one), wsgi for ``app(environ, start_response)``, evpl for
    ``app(request)``."""
    import inspect

    fn = app if inspect.isfunction(app) or inspect.ismethod(app) else \
        getattr(app, "__call__", app)  # noqa: B004
    try:
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return "asgi"
    if inspect.iscoroutinefunction(fn) or len(params) == 3:
        return "asgi"
    return "wsgi" if len(params) == 2 else "evpl"


def serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(message)s")
    if args.shards < 1:
        raise ConfigError(f"--shards must be >= 1, got {args.shards}")
    app = load_app(args.app, args.app_dir)
    interface = guess_interface(app) if args.interface == "auto" else args.interface
    if args.access_log:
        logging.getLogger("evpl.http.access").setLevel(logging.INFO)
    if args.shards > 1:
        return _serve_shards(args, app, interface)
    import evpl

    loop = evpl.Loop()
    server = _server(args, loop, app, interface)
    try:
        listener = server.listen((args.host, args.port), backend=args.backend)
    except Exception:
        server.close()
        raise
    _announce(args, interface, listener.address)
    stop = lambda *_: loop.stop()  # noqa: E731
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        loop.run()
    finally:
        server.shutdown(args.graceful_timeout)
        loop.close()
    return 0


def _server(args: argparse.Namespace, loop: Any, app: Any, interface: str) -> Any:
    from evpl.http import Server

    return Server(loop, app, interface=interface, access_log=args.access_log,
                  http2=not args.no_http2, header_timeout=args.header_timeout,
                  keepalive_timeout=args.keepalive_timeout, max_body=args.max_body,
                  max_connections=args.max_connections, workers=args.workers,
                  root_path=args.root_path)


def _announce(args: argparse.Namespace, interface: str, address: Any, what: str = "") -> None:
    host, port = address[:2]
    logging.getLogger("evpl.http").info(
        "serving %s (%s interface) on http://%s:%d (backend %s%s); Ctrl-C to stop",
        args.app, interface, f"[{host}]" if ":" in host else host, port, args.backend, what)


def _serve_shards(args: argparse.Namespace, app: Any, interface: str) -> int:
    """One process per core (evpl.shards), each with its own loop, Server and
    SO_REUSEPORT socket; SIGINT/SIGTERM stop them all. Returns 0 if every
    shard exited cleanly."""
    from evpl import shards

    def main(shard: Any) -> None:
        server = _server(args, shard.loop, app, interface)
        listener = server.listen_shard(shard, "http")
        # SIGTERM: each shard stops accepting and finishes its requests in flight
        shard.at_stop(lambda: server.shutdown(args.graceful_timeout))
        if shard.id == 0:
            _announce(args, interface, listener.address, f", {shard.count} shards")

    statuses = shards.run(main, args.shards, grace=args.graceful_timeout + 5,
                          listen={"http": (args.backend, (args.host, args.port))})
    return 0 if all(st == 0 for st in statuses) else 1
