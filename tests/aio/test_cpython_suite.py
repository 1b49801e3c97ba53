"""CPython's own asyncio test suite on the evpl loop (through an event-loop
policy; see run_cpython_suite.py). One test per module of
``test.test_asyncio``, each run in a subprocess: every test that fails on
evpl must be listed in cpython_exclusions.txt (with its reason) or fail on
the default asyncio loop as well (checked by running just those tests on
it). The whole comparison table (evpl, asyncio, uvloop) is made by
``python tests/aio/run_cpython_suite.py``.
"""

from __future__ import annotations

import pytest

from aio import run_cpython_suite as suite

try:
    MODULES = suite.suite_modules()
    _why = ""
except ImportError as exc:        # Debian's python without libpython3.X-testsuite
    MODULES, _why = [], f"test.test_asyncio is not installed ({exc})"

EXCLUDED = suite.load_exclusions()


@pytest.mark.skipif(not MODULES, reason=_why or "no modules")
@pytest.mark.timeout(600)
@pytest.mark.parametrize("module", MODULES)
def test_module_on_evpl(module: str) -> None:
    result = suite.run_module("evpl", module, timeout=300)
    assert result["status"] == "ok", f"{module} on evpl: {result['status']}\n{result.get('output')}"
    failed = [t for t in result["failed"] if not suite.is_excluded(t, EXCLUDED)]
    if failed:
        # the same tests on the default loop: only what passes there counts
        base = suite.run_module("asyncio", ",".join(failed), timeout=300)
        regressions = sorted(set(failed) & set(base["passed"]))
        assert not regressions, (
            f"pass on the default asyncio loop, fail on evpl (and are not in "
            f"cpython_exclusions.txt): {regressions}")
    assert result["passed"], f"{module}: nothing passed on evpl"
