"""NUMA placement: the machine's nodes, their CPUs and memory (from sysfs),
the order in which shards and loop threads are placed on CPUs (node by node),
and binding a process's future memory to its node.

Everything reads ``/sys/devices/system/node`` under a ``root`` that tests
replace with a fake tree. A machine without that directory is one node
holding every CPU.
"""

from __future__ import annotations

import ctypes
import os
import platform
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["Node", "bind_memory", "node_of", "parse_cpulist", "placement", "topology"]

_NODE_DIR = "devices/system/node"


@dataclass(frozen=True)
class Node:
    """One NUMA node: its id, its CPUs and its memory in bytes (0 if unknown)."""
    id: int
    cpus: tuple[int, ...]
    memory: int


def parse_cpulist(text: str) -> list[int]:
    """``"0-3,8,10-11"`` -> ``[0, 1, 2, 3, 8, 10, 11]`` (the sysfs cpulist format)."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-", 1)
            cpus.extend(range(int(lo), int(hi) + 1))
        else:
            cpus.append(int(part))
    return cpus


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def topology(root: str = "/sys") -> list[Node]:
    """The NUMA nodes with their CPUs and memory, by node id. Without node
    information under ``root``: one node 0 with every CPU of the machine."""
    base = os.path.join(root, _NODE_DIR)
    nodes: list[Node] = []
    try:
        names = os.listdir(base)
    except OSError:
        names = []
    for name in names:
        m = re.fullmatch(r"node(\d+)", name)
        if not m:
            continue
        cpus = parse_cpulist(_read(os.path.join(base, name, "cpulist")) or "")
        memory = 0
        meminfo = _read(os.path.join(base, name, "meminfo")) or ""
        mm = re.search(r"MemTotal:\s+(\d+)\s*kB", meminfo)
        if mm:
            memory = int(mm.group(1)) * 1024
        nodes.append(Node(int(m.group(1)), tuple(sorted(cpus)), memory))
    if not nodes:
        ncpu = os.cpu_count() or 1
        nodes.append(Node(0, tuple(range(ncpu)), 0))
    return sorted(nodes, key=lambda n: n.id)


def node_of(cpu: int, nodes: Sequence[Node] | None = None) -> int:
    """The node that holds ``cpu`` (0 if no node lists it)."""
    for node in nodes if nodes is not None else topology():
        if cpu in node.cpus:
            return node.id
    return 0


def placement(n: int, cpus: Iterable[int] | None = None,
              nodes: Sequence[Node] | None = None) -> list[int]:
    """The CPUs for ``n`` shards or loop threads: ``cpus`` (default: the
    CPUs this process may use) ordered node by node, so consecutive shards
    share a node and its memory; reused round robin when ``n`` exceeds them."""
    allowed = sorted(set(cpus) if cpus is not None else os.sched_getaffinity(0))
    if not allowed:
        raise ValueError("no CPU to place on")
    nodes = nodes if nodes is not None else topology()
    order = [c for node in nodes for c in node.cpus if c in allowed]
    order += [c for c in allowed if c not in order]      # CPUs no node lists
    return [order[i % len(order)] for i in range(n)]


_SYS_SET_MEMPOLICY = {"x86_64": 238, "aarch64": 237}
_MPOL_PREFERRED = 1


def bind_memory(node: int) -> str | None:
    """Prefer ``node`` for this process's future memory (``set_mempolicy``
    with MPOL_PREFERRED: the local node first, others when it is full).
    Returns None on success, else why it could not (the policy stays as it
    was). Called by a shard after it is pinned, before its buffer pool
    allocates."""
    nr = _SYS_SET_MEMPOLICY.get(platform.machine())
    if nr is None:
        return f"set_mempolicy: unknown system call number on {platform.machine()}"
    if not 0 <= node < 1024:
        return f"node {node} out of range"
    mask = (ctypes.c_ulong * 16)()
    mask[node // 64] = 1 << (node % 64)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(ctypes.c_long(nr), ctypes.c_int(_MPOL_PREFERRED), mask,
                    ctypes.c_ulong(1024 + 1)) != 0:
        return f"set_mempolicy: {os.strerror(ctypes.get_errno())}"
    return None
