"""The project's own promises: README's test command is what CI runs, the code is ruff clean,
its layers import only downwards (import-linter) and its types check (mypy)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci.startswith("python3 -m venv .venv")
    assert ci in (ROOT / "README.md").read_text()


def test_ruff_clean() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "ruff", "check", str(ROOT)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_layers_import_only_downwards() -> None:
    """The contracts in pyproject.toml's [tool.importlinter]: faces -> service -> engine ->
    observability | catalogue -> shared values -> config, and faces never reach the pool,
    the worker or the database but through the service."""
    r = subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_types_check() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "mypy", "gateway", "mcp_tools", "config"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_runtime_imports_are_declared_dependencies() -> None:
    """What gateway/, config/ and mcp_tools/ import must be installed by `pip install -e .`
    alone: a module only the test extra brings would break README's serve command. An
    optional extra's package (mlx-embeddings) may be imported only where an ImportError is
    caught (and answered with what to install)."""
    import ast
    import re
    import tomllib
    from importlib.metadata import packages_distributions

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {
        re.split(r"[<>=;\[ ]", d, maxsplit=1)[0].lower().replace("_", "-")
        for d in project["dependencies"]
    }
    optional = {
        re.split(r"[<>=;\[ ]", d, maxsplit=1)[0].lower().replace("_", "-")
        for extra, deps in project["optional-dependencies"].items()
        if extra != "test"
        for d in deps
    }
    own = {"gateway", "config", "mcp_tools"}
    dists = packages_distributions()
    missing = {}
    for package in own:
        for path in (ROOT / package).rglob("*.py"):
            tree = ast.parse(path.read_text())
            guarded = {
                id(inner)
                for node in ast.walk(tree)
                if isinstance(node, ast.Try)
                and any(
                    isinstance(h.type, ast.Name)
                    and h.type.id in ("ImportError", "ModuleNotFoundError")
                    for h in node.handlers
                )
                for stmt in node.body
                for inner in ast.walk(stmt)
            }
            for node in ast.walk(tree):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                for name in names:
                    top = name.split(".")[0]
                    if top in own or top in sys.stdlib_module_names or top == "__future__":
                        continue
                    owners = {d.lower().replace("_", "-") for d in dists.get(top, [top])}
                    if owners & optional and id(node) in guarded:
                        continue
                    if not owners & declared:
                        missing[top] = f"{path.relative_to(ROOT)} (from {sorted(owners)})"
    assert not missing, f"imported but not declared in [project.dependencies]: {missing}"
