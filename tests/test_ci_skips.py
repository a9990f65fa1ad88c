"""``METAPEFT_CI=1`` (set by ``.ci/run``) turns every skip into a failure that names the test and
the reason, except under an allow-listed marker (`tests/ci_skips.py`). Pinned on a pytest run of
sample tests in a subprocess, with and without the variable."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

try:
    from tests.ci_skips import CI_ENV
except ImportError:  # plain `pytest` puts tests/ (not the repo root) on sys.path
    from ci_skips import CI_ENV  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[1]

SAMPLE = """
import pytest


@pytest.fixture
def server():
    pytest.skip("no server binary")


def test_passes():
    pass


def test_skips_in_its_body():
    pytest.skip("no thing here")


def test_skips_in_a_fixture(server):
    pass


@pytest.mark.gpu
def test_needs_a_gpu():
    pytest.skip("no CUDA device")
"""


SKIPPED_MODULE = """
import pytest

pytest.skip("no such library", allow_module_level=True)


def test_never_collected():
    pass
"""


def run_sample(tmp_path: Path, ci: bool, sample: str = SAMPLE) -> tuple[int, str, dict[str, int]]:
    """Exit code, output and the summary counts (``{"passed": 1, ...}``) of a pytest run of
    ``sample`` with the plugin loaded."""
    (tmp_path / "test_sample.py").write_text(sample)
    env = {k: v for k, v in os.environ.items() if k != CI_ENV}
    if ci:
        env[CI_ENV] = "1"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "tests.ci_skips",
            "-p",
            "no:cacheprovider",
            "-q",
            "-rA",
            "-W",
            "ignore::pytest.PytestUnknownMarkWarning",
            "--rootdir",
            str(tmp_path),
            str(tmp_path),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    summary = out.stdout.strip().splitlines()[-1]
    counts = {kind.rstrip("s"): int(n) for n, kind in re.findall(r"(\d+) (\w+)", summary)}
    return out.returncode, out.stdout + out.stderr, counts


def test_without_ci_a_skip_is_a_skip(tmp_path: Path) -> None:
    code, output, counts = run_sample(tmp_path, ci=False)
    assert code == 0, output
    assert (counts.get("passed"), counts.get("skipped"), counts.get("failed")) == (1, 3, None), output


@pytest.mark.parametrize(
    ("test", "reason"),
    [("test_skips_in_its_body", "no thing here"), ("test_skips_in_a_fixture", "no server binary")],
)
def test_under_ci_a_skip_fails_naming_the_test_and_the_reason(tmp_path: Path, test: str, reason: str) -> None:
    code, output, counts = run_sample(tmp_path, ci=True)
    assert code == 1, output
    # the skip in the body fails the test; the one in a fixture errors its setup; the allow-listed
    # GPU test still skips
    assert (counts.get("passed"), counts.get("failed"), counts.get("error"), counts.get("skipped")) == (
        1,
        1,
        1,
        1,
    ), output
    assert f"test_sample.py::{test} was skipped (Skipped: {reason}), and {CI_ENV}=1" in output
    assert "test_sample.py::test_needs_a_gpu was skipped" not in output


def test_under_ci_a_module_skipped_at_collection_is_an_error(tmp_path: Path) -> None:
    code, output, counts = run_sample(tmp_path, ci=False, sample=SKIPPED_MODULE)
    assert (code, counts.get("skipped"), counts.get("error")) == (pytest.ExitCode.NO_TESTS_COLLECTED, 1, None)
    code, output, counts = run_sample(tmp_path, ci=True, sample=SKIPPED_MODULE)
    assert (code, counts.get("error")) == (pytest.ExitCode.INTERRUPTED, 1), output
    assert f"test_sample.py was skipped (Skipped: no such library), and {CI_ENV}=1" in output
