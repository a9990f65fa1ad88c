"""The layers of DESIGN.md §2 as a test: the core imports and runs without Ray.

The package holds two layers and the CLI on top: `metapeft_ray.core` (the maths, the run store,
the search-space schema, the local recipe, the metric definitions) and `metapeft_ray.on_ray`
(Ray Train, Tune, jobs, Serve, the Ray metrics backend), so a new module is placed by the folder
it goes into. Every module under the core is imported in a fresh process where ``import ray``
fails (``sys.modules["ray"] = None``): a top-level Ray import anywhere in it, or in what it
imports, fails this test. A second process imports the core with Ray installed and checks that
nothing pulled in Ray (an optional ``try: import ray`` included) or a module above the core.
"""

from __future__ import annotations

import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import metapeft_ray
from metapeft_ray import core

ROOT = Path(__file__).resolve().parents[1]


def core_modules() -> list[str]:
    """Every module under `metapeft_ray.core`, the method and algorithm modules included."""
    return [core.__name__] + [m.name for m in pkgutil.walk_packages(core.__path__, f"{core.__name__}.")]


def test_every_module_is_in_a_layer() -> None:
    found = {m.name for m in pkgutil.iter_modules(metapeft_ray.__path__)}
    assert found == {"core", "on_ray", "cli"}, (
        "a new module goes into metapeft_ray/core/ or metapeft_ray/on_ray/"
    )


def test_no_core_module_imports_ray_even_lazily() -> None:
    """What the import tests below cannot see: an ``import ray`` inside a function."""
    found = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in sorted(Path(core.__path__[0]).rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if re.match(r"\s*(import|from) ray\b", line)
    ]
    assert not found, f"Ray code belongs in metapeft_ray/on_ray/: {found}"


def _run(code: str) -> None:
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_core_imports_with_ray_unimportable() -> None:
    _run(
        "import importlib, sys\n"
        "sys.modules['ray'] = None  # any `import ray` raises ImportError\n"
        f"for name in {core_modules()!r}:\n"
        "    importlib.import_module(name)\n"
        "loaded = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))\n"
        "assert loaded == ['ray'] and sys.modules['ray'] is None, loaded\n"
    )


def test_importing_the_core_loads_neither_ray_nor_the_layers_above() -> None:
    _run(
        "import importlib, sys\n"
        f"for name in {core_modules()!r}:\n"
        "    importlib.import_module(name)\n"
        "loaded = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))\n"
        "assert not loaded, f'the core loaded {loaded[:5]}'\n"
        "above = [m for m in sys.modules if m.startswith(('metapeft_ray.on_ray', 'metapeft_ray.cli'))]\n"
        "assert not above, f'the core imported {above}'\n"
    )


def test_the_wheel_ships_every_data_file_of_the_package() -> None:
    """Each file in the package that is not Python (configs, search spaces, py.typed) matches a
    ``package-data`` glob of pyproject.toml, or an installed (non-editable) wheel lacks it."""
    import tomllib

    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    pkg = Path(metapeft_ray.__file__).parent
    shipped = {p for g in globs["metapeft_ray"] for p in pkg.glob(g)}
    data = {
        p
        for p in pkg.rglob("*")
        if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts
    }
    assert not data - shipped, f"not in [tool.setuptools.package-data]: {sorted(data - shipped)}"
