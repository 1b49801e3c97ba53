"""Run CPython's own asyncio test suite (``test.test_asyncio``) against an
event loop chosen through the event-loop policy, one test module per
subprocess, and report passed / failed / skipped per module.

    python tests/aio/run_cpython_suite.py                       # evpl, asyncio, uvloop
    python tests/aio/run_cpython_suite.py --loops evpl asyncio --modules test_streams
    python tests/aio/run_cpython_suite.py --json results.json --markdown table.md

Loops: ``evpl`` (evpl.aio.EventLoopPolicy), ``evpl-uring`` (the same with
backend="io_uring"), ``asyncio`` (the default policy) and ``uvloop``. The
policy's loop also becomes the default policy's loop factory, so a module
that resets the policy to ``None`` between tests keeps running on the loop
under test, and ``asyncio.SelectorEventLoop`` (which most of the suite's
network tests build for themselves, once per selector kind) makes the loop
under test too, as uvloop's own test suite does (set AIO_SUITE_POLICY_ONLY=1
to leave it alone). Tests that build ``BaseSelectorEventLoop`` with a mock
selector still test asyncio's own classes.

Exclusions (tests that check selector/proactor internals, or private
attributes only asyncio's classes have) live in cpython_exclusions.txt next
to this file, one test id per line with its reason; ``--check`` compares
the evpl run with the asyncio run and fails if a test that passes on the
default loop fails on evpl and is not listed there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import unittest
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
EXCLUSIONS = HERE / "cpython_exclusions.txt"
LOOPS = ("evpl", "asyncio", "uvloop")
ALL_LOOPS = ("evpl", "evpl-uring", "asyncio", "uvloop")
# Windows-only modules (they skip everything here) are left out.
SKIP_MODULES = {"test_windows_events", "test_windows_utils", "test_proactor_events"}


def suite_modules() -> list[str]:
    """The test modules of ``test.test_asyncio`` in this Python."""
    import test.test_asyncio as pkg

    names = sorted(p.stem for p in Path(pkg.__path__[0]).glob("test_*.py"))
    return [n for n in names if n not in SKIP_MODULES]


def load_exclusions(path: Path = EXCLUSIONS) -> dict[str, str]:
    """``test id -> reason`` from the exclusions file (``id  # reason``)."""
    out: dict[str, str] = {}
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        test_id, _, reason = line.partition("#")
        test_id = test_id.strip()
        if not reason.strip():
            raise SystemExit(f"{path}: {test_id} has no reason")
        out[test_id] = reason.strip()
    return out


def install_policy(loop: str) -> None:
    """Make ``loop`` the loop asyncio's policies create."""
    import asyncio
    import asyncio.unix_events as ue

    if loop == "asyncio":
        return
    if loop in ("evpl", "evpl-uring"):
        import functools

        import evpl.aio

        options = {"backend": "io_uring"} if loop == "evpl-uring" else {}
        policy: Any = evpl.aio.EventLoopPolicy(**options)
        factory: Any = functools.partial(evpl.aio.EvplEventLoop, **options)
    elif loop == "uvloop":
        import uvloop

        policy = uvloop.EventLoopPolicy()
        factory = uvloop.Loop
    else:
        raise SystemExit(f"unknown loop {loop!r}")
    ue._UnixDefaultEventLoopPolicy._loop_factory = staticmethod(factory)  # type: ignore[attr-defined]
    asyncio.set_event_loop_policy(policy)
    if os.environ.get("AIO_SUITE_POLICY_ONLY"):
        return

    def selector_loop(selector: Any = None) -> Any:
        # a test that builds asyncio.SelectorEventLoop(...) itself gets the
        # loop under test (the selector it made is not needed)
        if selector is not None:
            selector.close()
        return factory()

    asyncio.SelectorEventLoop = selector_loop  # type: ignore[assignment,misc]
    ue.SelectorEventLoop = selector_loop  # type: ignore[assignment,misc]


class _Result(unittest.TextTestResult):
    """Collects the ids of passed, failed and skipped tests."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.passed: list[str] = []
        self.failed: list[str] = []
        self.skipped_ids: list[str] = []

    def addSuccess(self, test: Any) -> None:
        super().addSuccess(test)
        self.passed.append(test.id())

    def addFailure(self, test: Any, err: Any) -> None:
        super().addFailure(test, err)
        self.failed.append(test.id())

    def addError(self, test: Any, err: Any) -> None:
        super().addError(test, err)
        self.failed.append(test.id())

    def addSkip(self, test: Any, reason: str) -> None:
        super().addSkip(test, reason)
        self.skipped_ids.append(test.id())

    def addExpectedFailure(self, test: Any, err: Any) -> None:
        super().addExpectedFailure(test, err)
        self.passed.append(test.id())

    def addUnexpectedSuccess(self, test: Any) -> None:
        super().addUnexpectedSuccess(test)
        self.failed.append(test.id())

    def addSubTest(self, test: Any, subtest: Any, err: Any) -> None:
        super().addSubTest(test, subtest, err)
        if err is not None and test.id() not in self.failed:
            self.failed.append(test.id())


def run_module_here(loop: str, module: str, out: str, verbose: bool) -> None:
    """In the child process: run one module with ``loop`` installed."""
    import signal

    # started in the background by a shell, SIGINT may come in ignored; the
    # suite's interrupt tests need Python's default handler
    signal.signal(signal.SIGINT, signal.default_int_handler)
    install_policy(loop)
    # a module name, or test ids separated by commas
    names = [n if n.startswith("test.") else f"test.test_asyncio.{n}" for n in module.split(",")]
    suite = unittest.defaultTestLoader.loadTestsFromNames(names)
    stream = sys.stderr if verbose else open(os.devnull, "w")
    runner = unittest.TextTestRunner(stream=stream, resultclass=_Result,
                                     verbosity=2 if verbose else 0)
    result: Any = runner.run(suite)
    # a test that failed in one subtest and passed in none is failed, once
    passed = [t for t in result.passed if t not in set(result.failed)]
    Path(out).write_text(json.dumps({
        "passed": passed, "failed": sorted(set(result.failed)),
        "skipped": result.skipped_ids}))


def run_module(loop: str, module: str, timeout: float, verbose: bool = False) -> dict[str, Any]:
    """Run one module in a subprocess; a crash or a hang is recorded as such."""
    import tempfile

    fd, out = tempfile.mkstemp(prefix=f"aio-{loop}-{module}-", suffix=".json")
    os.close(fd)
    t0 = time.monotonic()
    try:
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--child", loop, module, out]
            + (["--verbose"] if verbose else []),
            timeout=timeout, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            cwd=tempfile.gettempdir())  # the suite leaves @test_* files in its cwd
        status = "ok" if proc.returncode in (0,) else f"exit {proc.returncode}"
        tail = proc.stdout[-3000:]
    except subprocess.TimeoutExpired as exc:
        status, tail = "timeout", (exc.stdout or b"")[-3000:]
        if isinstance(tail, bytes):
            tail = tail.decode(errors="replace")
    try:
        data = json.loads(Path(out).read_text() or "{}")
    except (OSError, ValueError):
        data = {}
    finally:
        os.unlink(out)
    if not data:
        data = {"passed": [], "failed": [f"test.test_asyncio.{module} ({status})"],
                "skipped": []}
        if status == "ok":
            status = "no result"
    data.update(status=status, seconds=round(time.monotonic() - t0, 1), loop=loop,
                module=module)
    if status != "ok" or verbose:
        data["output"] = tail
    return data


def run_all(loops: list[str], modules: list[str], jobs: int, timeout: float,
            verbose: bool = False) -> dict[str, dict[str, Any]]:
    """``{loop: {module: result}}``, modules run ``jobs`` at a time."""
    results: dict[str, dict[str, Any]] = {loop: {} for loop in loops}
    work = [(loop, m) for m in modules for loop in loops]
    with ThreadPoolExecutor(jobs) as ex:
        for r in ex.map(lambda lm: run_module(lm[0], lm[1], timeout, verbose), work):
            results[r["loop"]][r["module"]] = r
            print(f"{r['loop']:>10} {r['module']:<24} passed {len(r['passed']):4d} "
                  f"failed {len(r['failed']):4d} skipped {len(r['skipped']):4d} "
                  f"{r['seconds']:6.1f}s {r['status']}", flush=True)
    return results


def is_excluded(test_id: str, excluded: dict[str, str]) -> bool:
    """Listed itself, or under a listed class or module."""
    parts = test_id.split(".")
    return any(".".join(parts[:i]) in excluded for i in range(1, len(parts) + 1))


def regressions(results: dict[str, dict[str, Any]], loop: str = "evpl",
                baseline: str = "asyncio") -> list[str]:
    """Tests that pass on ``baseline`` and fail on ``loop``, not excluded."""
    excluded = load_exclusions()
    out = []
    for module, base in results[baseline].items():
        mine = results[loop].get(module)
        if mine is None:
            continue
        failed = set(mine["failed"])
        for test_id in base["passed"]:
            if test_id in failed and not is_excluded(test_id, excluded):
                out.append(test_id)
    return sorted(out)


def markdown(results: dict[str, dict[str, Any]]) -> str:
    """The per-module table: passed / failed / skipped for each loop."""
    loops = list(results)
    modules = sorted({m for r in results.values() for m in r})
    head = "| module | " + " | ".join(f"{lp} (pass/fail/skip)" for lp in loops) + " |"
    lines = [head, "|---" * (len(loops) + 1) + "|"]
    totals = {lp: [0, 0, 0] for lp in loops}
    for m in modules:
        cells = []
        for lp in loops:
            r = results[lp].get(m)
            if r is None:
                cells.append("-")
                continue
            counts = (len(r["passed"]), len(r["failed"]), len(r["skipped"]))
            for i in range(3):
                totals[lp][i] += counts[i]
            extra = "" if r["status"] == "ok" else f" ({r['status']})"
            cells.append(f"{counts[0]} / {counts[1]} / {counts[2]}{extra}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines.append("| **total** | " + " | ".join(
        f"**{t[0]} / {t[1]} / {t[2]}**" for t in totals.values()) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--loops", nargs="+", default=list(LOOPS), choices=ALL_LOOPS,
                    help="loops to run the suite on (default: evpl asyncio uvloop)")
    ap.add_argument("--modules", nargs="+", help="test modules (default: all of them)")
    ap.add_argument("--jobs", type=int, default=2, help="modules run at once (default 2)")
    ap.add_argument("--timeout", type=float, default=600,
                    help="seconds one module may take (default 600)")
    ap.add_argument("--json", help="write the full results (test ids) here")
    ap.add_argument("--markdown", help="write the per-module table here")
    ap.add_argument("--check", action="store_true",
                    help="exit 1 if a test passing on asyncio fails on evpl "
                         "(and is not in cpython_exclusions.txt)")
    ap.add_argument("--verbose", action="store_true", help="show each test's outcome")
    ap.add_argument("--child", nargs=3, metavar=("LOOP", "MODULE", "OUT"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        run_module_here(*args.child, verbose=args.verbose)
        return 0
    modules = args.modules or suite_modules()
    results = run_all(args.loops, modules, args.jobs, args.timeout, args.verbose)
    table = markdown(results)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(table)
    if args.check and "evpl" in results and "asyncio" in results:
        bad = regressions(results)
        for test_id in bad:
            print(f"REGRESSION (passes on asyncio, fails on evpl): {test_id}")
        for module, r in results["evpl"].items():
            if r["status"] != "ok":
                print(f"evpl {module}: {r['status']}\n{r.get('output', '')}")
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
