"""The import graph: ``tlsweep.tracking`` records what it is handed and loads neither the
training code (``train``, ``model``, ``report``) nor Keras or TensorFlow; it is the only package
that imports MLflow."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import tlsweep

PACKAGE = Path(tlsweep.__file__).parent
TRACKING = PACKAGE / "tracking"
FORBIDDEN = ("tlsweep.train", "tlsweep.model", "tlsweep.report", "keras", "tensorflow")


def _package_of(path: Path) -> str:
    """The package a module of tlsweep belongs to (itself for an ``__init__.py``)."""
    return ".".join(path.relative_to(PACKAGE.parent).parent.parts)


def _imports(source: str, package: str) -> Iterator[str]:
    """Every module ``source`` imports, anywhere in it (functions, ``TYPE_CHECKING`` blocks):
    ``from a import b`` yields ``a`` and ``a.b`` (b may be a module); relative imports are
    resolved against ``package``."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def _imports_of(path: Path) -> Iterator[str]:
    return _imports(path.read_text(), _package_of(path))


def _is_under(module: str, names: tuple[str, ...]) -> bool:
    return any(module == name or module.startswith(f"{name}.") for name in names)


def test_importing_tracking_loads_no_training_code_nor_keras() -> None:
    code = "import json, sys\nimport tlsweep.tracking\nprint(json.dumps(sorted(sys.modules)))\n"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    loaded = json.loads(done.stdout.splitlines()[-1])
    assert "mlflow" in loaded and "tlsweep.tracking._models" in loaded
    assert [m for m in loaded if _is_under(m, FORBIDDEN)] == []


def test_no_tracking_module_imports_training_code_or_keras() -> None:
    modules = sorted(TRACKING.glob("*.py"))
    assert {p.name for p in modules} >= {"__init__.py", "_store.py", "_models.py", "_read.py"}
    found = {p.name: sorted(m for m in _imports_of(p) if _is_under(m, FORBIDDEN)) for p in modules}
    assert found == {p.name: [] for p in modules}


def test_only_tracking_imports_mlflow() -> None:
    outside = [p for p in PACKAGE.rglob("*.py") if TRACKING not in p.parents]
    found = {
        str(p.relative_to(PACKAGE)): m
        for p in outside
        for m in _imports_of(p)
        if _is_under(m, ("mlflow",))
    }
    assert found == {}


def test_the_scan_sees_every_kind_of_import() -> None:
    """The scan itself: plain, from, relative and function-level imports are all seen."""
    source = (
        "import keras.layers\n"
        "from tlsweep import train\n"
        "from .. import report\n"
        "from ._store import connect\n"
        "def f():\n"
        "    from tlsweep.model import head_of\n"
    )
    seen = set(_imports(source, "tlsweep.tracking"))
    assert {"keras.layers", "tlsweep.train", "tlsweep.report", "tlsweep.model"} <= seen
    assert "tlsweep.tracking._store" in seen
