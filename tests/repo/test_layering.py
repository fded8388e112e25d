"""The dependency direction of docs/architecture.md, checked on the source (AST) and, where
an import could hide behind another package, by importing the modules in a fresh Python:

- serving -> mora_runtime, never the reverse;
- only the learning code and the command lines import mora_runtime.learn;
- serving/http (the HTTP surface) needs neither Ray nor torch;
- loadtest is a plain HTTP client: no torch, no mora_runtime, no serving.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RUNTIME = REPO / "mora_runtime"
HTTP = REPO / "serving" / "http"
LOADTEST = REPO / "loadtest"
PACKAGES = ("mora_runtime", "serving", "loadtest")  # what pyproject.toml ships
FORBIDDEN = ("serving", "ray", "fastapi", "pydantic", "prometheus_client", "starlette", "uvicorn")
LEARN = "mora_runtime.learn"
# Command lines may offer learning (`mora learn`, the demo); nothing that serves may need it.
LEARN_IMPORTERS = {"mora_runtime/cli.py", "serving/cli.py", "serving/demo.py"}
LOADTEST_FORBIDDEN = ("torch", "mora_runtime", "serving")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, source: str | None = None) -> set[str]:
    """Every module `path` imports, anywhere in it (lazy imports in functions too); relative
    imports resolved, and `from a import b` also counted as `a.b` (b may be a module)."""
    tree = ast.parse(source if source is not None else path.read_text(), filename=str(path))
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names if alias.name != "*")
    return names


def is_under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def sources(*roots: Path) -> list[Path]:
    return sorted(p for root in roots for p in root.rglob("*.py"))


def fresh_import(modules: list[str], banned: tuple[str, ...]) -> dict[str, list[str]]:
    """Import `modules` in a new interpreter; which were imported and which `banned` top-level
    packages ended up loaded."""
    code = (
        "import importlib, json, sys\n"
        f"names = {modules!r}\n"
        "done = [importlib.import_module(n).__name__ for n in names]\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {banned!r})\n"
        "print(json.dumps({'imported': done, 'banned': bad}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


# --- mora_runtime never imports the serving stack -------------------------------------------------


@pytest.mark.parametrize("path", sorted(RUNTIME.rglob("*.py")), ids=lambda p: p.name)
def test_runtime_never_imports_the_serving_stack(path: Path) -> None:
    bad = {m for m in imported_modules(path) if m.split(".")[0] in FORBIDDEN}
    assert not bad, f"{path.relative_to(RUNTIME.parent)} imports {sorted(bad)}"


def test_the_scan_sees_imports() -> None:
    # Guard against a scan that silently finds nothing.
    assert "torch" in imported_modules(RUNTIME / "experts" / "routing.py")


def test_the_scan_resolves_relative_and_from_imports() -> None:
    path = RUNTIME / "models" / "example.py"  # never read: the source is given
    source = "from . import clip\nfrom ..learn import domains\nfrom mora_runtime import learn\n"
    found = imported_modules(path, source)
    assert {"mora_runtime.models.clip", "mora_runtime.learn.domains"} <= found
    assert "mora_runtime.learn" in found


# --- mora_runtime.learn: only the learning code and the command lines -----------------------------


def test_only_command_lines_import_the_learning_code() -> None:
    importers = set()
    for path in sources(*(REPO / p for p in PACKAGES)):
        if is_under(module_name(path), LEARN):
            continue
        if any(is_under(m, LEARN) for m in imported_modules(path)):
            importers.add(str(path.relative_to(REPO)))
    unexpected = importers - LEARN_IMPORTERS
    assert not unexpected, f"{sorted(unexpected)} import {LEARN}; only CLIs may"
    # Guard: the scan does see the command line's import of the learning code.
    assert "mora_runtime/cli.py" in importers


# --- serving/http: no Ray, no torch ---------------------------------------------------------------


def test_http_surface_never_imports_ray() -> None:
    files = sources(HTTP)
    assert len(files) >= 5, files  # guard: the package is where this test looks
    bad = {
        str(path.relative_to(REPO)): sorted(m for m in imported_modules(path) if is_under(m, "ray"))
        for path in files
    }
    assert not {k: v for k, v in bad.items() if v}
    assert "fastapi" in imported_modules(HTTP / "api.py")  # guard: the scan sees imports


def test_importing_the_http_surface_loads_neither_ray_nor_torch() -> None:
    modules = [module_name(p) for p in sources(HTTP)]
    result = fresh_import(modules, ("ray", "torch"))
    assert result["imported"] == modules
    assert not result["banned"], f"importing serving.http loads {result['banned']}"


# --- loadtest: a plain client ---------------------------------------------------------------------


def test_loadtest_imports_neither_torch_nor_the_runtime_nor_serving() -> None:
    files = sources(LOADTEST)
    assert len(files) >= 10, files
    bad = {
        str(path.relative_to(REPO)): sorted(
            m for m in imported_modules(path) if m.split(".")[0] in LOADTEST_FORBIDDEN
        )
        for path in files
    }
    assert not {k: v for k, v in bad.items() if v}
    assert "httpx" in imported_modules(LOADTEST / "client.py")  # guard: the scan sees imports


def test_importing_loadtest_loads_neither_torch_nor_the_runtime_nor_serving() -> None:
    # __main__ runs the command line on import.
    modules = [module_name(p) for p in sources(LOADTEST) if p.name != "__main__.py"]
    result = fresh_import(modules, LOADTEST_FORBIDDEN)
    assert result["imported"] == modules
    assert not result["banned"], f"importing loadtest loads {result['banned']}"


def test_fresh_import_reports_a_banned_package() -> None:
    # Guard: the subprocess check can fail.
    result = fresh_import(["mora_runtime.experts.routing"], ("torch",))
    assert "torch" in result["banned"]
