"""``evpl info``: the backend registry as a table."""

from __future__ import annotations

import argparse
import json
import os
import platform

import evpl


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="list backends: kind, capabilities, availability and why",
                       description="List every evpl backend, whether it works on this "
                                   "machine and, if not, why.")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    rows = evpl.backends()
    if args.json:
        print(json.dumps([{"name": b.name, "kind": b.kind, "available": b.available,
                           "reason": b.reason, "capabilities": sorted(b.capabilities),
                           "description": b.description} for b in rows], indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"evpl {evpl.__version__} backends on {platform.node()} "
                        f"(Linux {platform.release()}, {os.cpu_count()} CPUs)")
    for col in ("backend", "kind", "available", "capabilities", "notes"):
        table.add_column(col)
    for b in rows:
        table.add_row(b.name, b.kind, "[green]yes[/]" if b.available else "[red]no[/]",
                      ", ".join(sorted(b.capabilities)),
                      b.reason if not b.available else b.description)
    Console().print(table)
    return 0
