"""Under ``METAPEFT_CI=1`` (set by ``.ci/run``) a skipped test is a failed test.

A skip hides whatever the test would have found: a missing ``weed`` binary once skipped every S3
and Ray test while CI stayed green. With ``METAPEFT_CI=1`` every skip (from the test body, a
fixture, a ``skipif`` mark or ``importorskip``) is reported as a failure that names the test and
the skip reason. The exceptions are the tests carrying a marker of ``ALLOWED_SKIP_MARKERS``:
skips that depend on the machine CI runs on, not on the code or its installation.

Loaded by ``tests/conftest.py``; a pytest plugin module of its own so that
``tests/test_ci_skips.py`` can load it (``-p tests.ci_skips``) into a pytest run of sample tests.
"""

from __future__ import annotations

import os

import pytest

CI_ENV = "METAPEFT_CI"
ALLOWED_SKIP_MARKERS = {
    "gpu": "needs a CUDA device, which the CI machine need not have",
}


def _fail(report: pytest.TestReport | pytest.CollectReport, nodeid: str) -> None:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    report.outcome = "failed"
    report.longrepr = (
        f"{nodeid} was skipped ({reason}), and {CI_ENV}=1 makes every skip a failure: CI must "
        f"run this test. Install what it needs, or, if the skip depends on the machine, mark the "
        f"test with one of {sorted(ALLOWED_SKIP_MARKERS)} (tests/ci_skips.py)."
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> pytest.TestReport:
    """A skip in a test's setup (a fixture, a ``skipif`` mark) or body."""
    report: pytest.TestReport = yield
    if os.environ.get(CI_ENV) != "1" or not report.skipped or hasattr(report, "wasxfail"):
        return report
    if not any(item.get_closest_marker(name) for name in ALLOWED_SKIP_MARKERS):
        _fail(report, item.nodeid)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> pytest.CollectReport:
    """A whole module skipped while it is collected (``pytest.skip(..., allow_module_level=True)``,
    a module-level ``importorskip``): a collection error under ``METAPEFT_CI=1``."""
    report: pytest.CollectReport = yield
    if os.environ.get(CI_ENV) == "1" and report.skipped:
        _fail(report, collector.nodeid)
    return report
