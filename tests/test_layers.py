"""Imports run one way (docs/architecture.md §1):

    shared_models, privacy, evaluation  <-  contract  <-  client, server  <-  apps, simulations

The two Flower apps (``client/app.py``, ``server/app.py``) are composition roots: they may
wire harness pieces in; nothing else in ``client/`` or ``server/`` may, and ``client/``
and ``server/`` never import each other. Read from the source with :mod:`ast`, so a
lazy import inside a function counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("shared_models", "privacy", "evaluation", "contract", "client", "server", "simulations")
MODELS = {"shared_models", "privacy", "evaluation"}
MAY_IMPORT = {
    "shared_models": {"shared_models"},
    "privacy": {"privacy", "shared_models"},
    "evaluation": {"evaluation", "shared_models", "privacy"},
    "contract": {"contract"} | MODELS,
    "client": {"client", "contract"} | MODELS,
    "server": {"server", "contract"} | MODELS,
    "simulations": set(PACKAGES),
}
APPS = {Path("client/app.py"): "client", Path("server/app.py"): "server"}  # composition roots


def _modules() -> list[Path]:
    return sorted(p.relative_to(REPO) for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))


def imported_packages(path: Path) -> set[str]:
    """The fedgen packages the module at ``path`` (relative to the repository) imports."""
    tree = ast.parse((REPO / path).read_text(), filename=str(path))
    here = path.parent.parts
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's own package
                base = here[:len(here) - node.level + 1]
                names = [".".join((*base, node.module or ""))]
            else:
                names = [node.module or ""]
        for name in names:
            parts = name.split(".")
            if parts[0] == "fedgen" and len(parts) > 1:
                parts = parts[1:]
            if parts[0] in PACKAGES:
                found.add(parts[0])
    return found


def layer_violations() -> list[str]:
    out = []
    for path in _modules():
        package = path.parts[0]
        allowed = MAY_IMPORT[package] | ({"simulations"} if path in APPS else set())
        for target in sorted(imported_packages(path) - allowed):
            out.append(f"{path} imports {target}")
    return out


def test_imports_run_one_way():
    assert layer_violations() == []


def test_every_package_is_covered():
    assert {p.parts[0] for p in _modules()} == set(PACKAGES)


@pytest.mark.parametrize("source, package, expected", [
    ("from fedgen.server.run import FederatedRun\n", "client", {"server"}),
    ("from ..server import run\n", "client", {"server"}),  # fedgen.client -> fedgen.server
    ("from ..data import x\n", "client/sub", {"client"}),
    ("def f():\n    import fedgen.simulations.prepare\n", "server", {"simulations"}),
    ("from .data import SiteData\n", "client", {"client"}),
])
def test_the_import_reader_sees_every_form(tmp_path, monkeypatch, source, package, expected):
    """The check can fail: each import form is read (absolute, relative, lazy)."""
    import tests.test_layers as layers

    monkeypatch.setattr(layers, "REPO", tmp_path)
    module = Path(package) / "m.py"
    (tmp_path / module).parent.mkdir(parents=True)
    (tmp_path / module).write_text(source)
    assert imported_packages(module) == expected


def test_installing_fedgen_adds_one_top_level_name(tmp_path):
    """``pip install .`` puts only ``fedgen`` into site-packages: the repository's generic
    folder names (server, client, privacy, ...) are its subpackages, never top-level modules."""
    import subprocess
    import sys
    import zipfile

    import shutil

    source = tmp_path / "src"  # a copy: building in the checkout would leave build/ behind
    for name in (*PACKAGES, "tests", "benchmarks", "scenarios"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                          "-q", "-w", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    (wheel,) = tmp_path.glob("fedgen-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"fedgen"}
    for package in PACKAGES:
        assert f"fedgen/{package}/__init__.py" in names, package
    assert not any(n.startswith(("fedgen/tests/", "fedgen/benchmarks/", "fedgen/scenarios/")) for n in names)
