"""``evpl``: measure this machine's I/O paths and inspect evpl's backends.

    evpl perf                 side-by-side of every available backend on loopback
    evpl perf server          run the perf server (for two machines/namespaces)
    evpl perf client HOST     run the perf loads against a remote perf server
    evpl info                 which backends work here, and why not
    evpl xdrgen FILE.x        compile an XDR/RPC .x file to a Python module
    evpl http serve MOD:APP   serve an HTTP app (native, ASGI or WSGI)
"""

from __future__ import annotations

import argparse
import sys

from evpl.cli import http, info, perf
from evpl.errors import EvplError


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``evpl`` console script."""
    parser = argparse.ArgumentParser(
        prog="evpl",
        description="evpl: high-performance networking for Python.",
        epilog="Run 'evpl COMMAND --help' for the options of a command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    perf.add_parser(sub)
    info.add_parser(sub)
    http.add_parser(sub)
    sub.add_parser("xdrgen", add_help=False, help="compile a .x file to Python (rpc2)")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["xdrgen"]:
        from evpl.rpc2 import xdrgen  # it has its own argument parser

        return xdrgen.main(argv[1:])
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except EvplError as exc:          # bad options or an unavailable backend: no traceback
        print(f"evpl: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
