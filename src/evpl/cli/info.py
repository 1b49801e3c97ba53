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
    Console().print(_topology_table())
    return 0


def _topology_table() -> object:
    """NUMA nodes, their CPUs and memory, and the CPUs this process may use
    (where evpl.shards and ThreadPool place their loops, node by node)."""
    from rich.table import Table

    from evpl import numa
    allowed = os.sched_getaffinity(0)
    table = Table(title=f"NUMA nodes (this process may use CPUs "
                        f"{','.join(map(str, sorted(allowed)))})")
    for col in ("node", "cpus", "usable here", "memory"):
        table.add_column(col)
    for node in numa.topology():
        table.add_row(str(node.id), ",".join(map(str, node.cpus)),
                      ",".join(str(c) for c in node.cpus if c in allowed) or "-",
                      f"{node.memory / 2**30:.1f} GiB" if node.memory else "?")
    return table
