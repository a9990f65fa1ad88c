"""The code is what `ruff` says it should be: lint rules and formatting (pyproject's
``[tool.ruff]``), so no formatting is left to a reviewer and no formatter escape is needed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CODE = ["metapeft_ray", "tests", "benchmarks"]
ESCAPES = ("fmt" + ": skip", "fmt" + ": off")  # spelled apart, so this file does not match


def _ruff(*args: str) -> subprocess.CompletedProcess[str]:
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    return subprocess.run([ruff, *args, *CODE], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args", [("check",), ("format", "--check")], ids=["lint", "format"])
def test_ruff_passes(args: tuple[str, ...]) -> None:
    result = _ruff(*args)
    assert result.returncode == 0, f"ruff {' '.join(args)} {' '.join(CODE)}:\n{result.stdout}{result.stderr}"


def test_no_formatter_escapes() -> None:
    marked = [
        f"{p.relative_to(ROOT)}:{i}"
        for d in CODE
        for p in (ROOT / d).rglob("*.py")
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if any(e in line for e in ESCAPES)
    ]
    assert not marked, f"formatter escapes left: {marked[:5]}"
