"""The layers of DESIGN.md §2 as a test: the core imports and runs without Ray.

Every module of the package is either in `CORE` (the maths, the run store, the search-space
schema, the local recipe) or in `RAY_LAYER` (Ray Train, Tune, jobs, metrics backends, the CLI on
top), so a new module has to be placed in one of them. The core is imported in a fresh process
where ``import ray`` fails (``sys.modules["ray"] = None``): a top-level Ray import anywhere in
it, or in what it imports, fails this test. A second process imports the core with Ray
installed and checks that nothing pulled it in (an optional ``try: import ray`` included).
"""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import metapeft_ray
from metapeft_ray import algorithms, methods

ROOT = Path(__file__).resolve().parents[1]

CORE = [
    "config",
    "data",
    "splits",
    "episodes",
    "placements",
    "model",
    "methods",
    "algorithms",
    "meta",
    "train",
    "evaluate",
    "baselines",
    "export",
    "adapt",
    "recipes",
    "storage",
    "runstore",
    "space",
]
RAY_LAYER = ["distributed", "tune", "jobs", "metrics", "serve", "cli"]


def core_modules() -> list[str]:
    """The core's module names, each method and algorithm module included."""
    names = [f"metapeft_ray.{m}" for m in CORE]
    for package in (methods, algorithms):
        names += [f"{package.__name__}.{m.name}" for m in pkgutil.iter_modules(package.__path__)]
    return names


def test_every_module_is_placed_in_a_layer() -> None:
    found = {m.name for m in pkgutil.iter_modules(metapeft_ray.__path__)}
    unplaced = found - set(CORE) - set(RAY_LAYER)
    assert not unplaced, f"put {sorted(unplaced)} into CORE or RAY_LAYER of tests/test_layers.py"
    assert not set(CORE) & set(RAY_LAYER)


def _run(code: str) -> None:
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_core_imports_with_ray_unimportable() -> None:
    modules = core_modules()
    _run(
        "import importlib, sys\n"
        "sys.modules['ray'] = None  # any `import ray` raises ImportError\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "loaded = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))\n"
        "assert loaded == ['ray'] and sys.modules['ray'] is None, loaded\n"
    )


def test_importing_the_core_does_not_load_ray() -> None:
    _run(
        "import importlib, sys\n"
        f"for name in {core_modules()!r}:\n"
        "    importlib.import_module(name)\n"
        "loaded = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))\n"
        "assert not loaded, f'the core loaded {loaded[:5]}'\n"
    )
