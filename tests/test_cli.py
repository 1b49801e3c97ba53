"""The ``evpl`` command line, run as a user would run it."""

from __future__ import annotations

import json
import subprocess
import sys

import evpl


def evpl_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "evpl.cli", *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


def check_results(results: list[dict]) -> None:
    """Every perf result is sane, and every load did work.

    A result counts what completed in a window of --duration seconds, and
    50 ms can pass with nothing completed on a loaded machine (in poll mode,
    where the client spins, ping-pong made 1 to 5 round trips in it here with
    two busy loops on the two cores): a load must have done work in one of
    its two modes, not in each."""
    for r in results:
        assert r["error"] is None, r
        assert r["ops"] >= 0 and r["value"] >= 0, r
        assert (r["ops"] > 0) == (r["value"] > 0), r
        if r.get("p50_us") is not None:
            assert 0 < r["p50_us"] <= r["p99_us"], r
    loads = {(r["backend"], r["load"]) for r in results}
    assert {(r["backend"], r["load"]) for r in results if r["ops"] > 0} == loads, results


def test_help_lists_commands():
    out = evpl_cli("--help")
    assert out.returncode == 0
    for command in ("perf", "info", "xdrgen"):
        assert command in out.stdout


def test_info_json_matches_registry():
    out = evpl_cli("info", "--json")
    assert out.returncode == 0, out.stderr
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    for b in evpl.backends():
        assert rows[b.name]["available"] == b.available
        assert rows[b.name]["kind"] == b.kind
        if not b.available:
            assert rows[b.name]["reason"]


def test_info_table():
    out = evpl_cli("info")
    assert out.returncode == 0
    assert "tcp" in out.stdout and "udp" in out.stdout


def test_perf_json_runs_every_load():
    out = evpl_cli("perf", "--backend", "tcp,udp", "--duration", "0.05", "--json",
                   "--cpu", "none", timeout=120)
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout)
    seen = {(r["backend"], r["mode"], r["load"]) for r in results}
    for mode in ("event", "poll"):
        for load in ("pingpong", "rate", "bulk"):
            assert ("tcp", mode, load) in seen
        assert ("udp", mode, "pingpong") in seen
        assert ("udp", mode, "bulk") not in seen     # bulk is for streams
    check_results(results)


def test_perf_rejects_unknown_backend_and_load():
    out = evpl_cli("perf", "--backend", "nope", "--json")
    assert out.returncode == 2
    assert out.stderr.startswith("evpl: error: unknown backend")
    out = evpl_cli("perf", "--backend", "tcp", "--mode", "sideways", "--json")
    assert out.returncode == 2
    assert "unknown load" in out.stderr and "Traceback" not in out.stderr


def test_perf_server_and_client_roles():
    """The two ends run apart (as on two machines): server prints where it
    listens, the client measures against it."""
    server = subprocess.Popen(
        [sys.executable, "-m", "evpl.cli", "perf", "server", "--port", "0", "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        info = json.loads(server.stdout.readline())
        host, port = info["echo"]["tcp"]
        sink_port = info["sink"]["tcp"][1]
        out = evpl_cli("perf", "client", host, "--port", str(port), "--backend", "tcp",
                       "--mode", "pingpong,rate", "--duration", "0.05", "--json", timeout=60)
        assert out.returncode == 0, out.stderr
        results = json.loads(out.stdout)
        assert {(r["mode"], r["load"]) for r in results} == {
            (m, ld) for m in ("event", "poll") for ld in ("pingpong", "rate")}
        check_results(results)
        assert sink_port != port
    finally:
        server.terminate()
        assert server.wait(10) is not None
