"""evpl.numa against a fake sysfs tree (this machine has one node) and the
real one."""

from __future__ import annotations

import os

import pytest

from evpl import numa


def _fake_sysfs(root, nodes: dict[int, tuple[str, int]]) -> str:
    base = root / "devices" / "system" / "node"
    for node, (cpulist, kib) in nodes.items():
        d = base / f"node{node}"
        d.mkdir(parents=True)
        (d / "cpulist").write_text(cpulist + "\n")
        (d / "meminfo").write_text(f"Node {node} MemTotal:       {kib} kB\n"
                                   f"Node {node} MemFree:        1 kB\n")
    (base / "possible").write_text("0-1\n")        # a file that is not a node
    return str(root)


def test_parse_cpulist():
    assert numa.parse_cpulist("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    assert numa.parse_cpulist("") == []


def test_fake_two_nodes(tmp_path):
    root = _fake_sysfs(tmp_path, {1: ("4-7,12-15", 2048), 0: ("0-3,8-11", 1024)})
    nodes = numa.topology(root)
    assert [n.id for n in nodes] == [0, 1]
    assert nodes[0].cpus == (0, 1, 2, 3, 8, 9, 10, 11)
    assert nodes[1].memory == 2048 * 1024
    assert numa.node_of(13, nodes) == 1
    # node by node: shards 0-3 share node 0, then node 1
    assert numa.placement(6, cpus=[0, 1, 4, 5, 8, 12], nodes=nodes) == [0, 1, 8, 4, 5, 12]
    assert numa.placement(3, cpus=[4, 0], nodes=nodes) == [0, 4, 0]      # round robin


def test_no_sysfs_is_one_node(tmp_path):
    nodes = numa.topology(str(tmp_path))
    assert len(nodes) == 1 and nodes[0].id == 0
    assert len(nodes[0].cpus) == os.cpu_count()


def test_real_machine():
    nodes = numa.topology()
    allowed = os.sched_getaffinity(0)
    assert allowed <= {c for n in nodes for c in n.cpus}
    assert set(numa.placement(len(allowed))) == allowed
    why = numa.bind_memory(numa.node_of(min(allowed)))
    assert why is None or "set_mempolicy" in why


def test_placement_needs_a_cpu():
    with pytest.raises(ValueError):
        numa.placement(1, cpus=[])
