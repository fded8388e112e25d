"""The dependency direction of docs/architecture.md: serving -> mora_runtime, never the reverse."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

RUNTIME = Path(__file__).resolve().parents[2] / "mora_runtime"
FORBIDDEN = ("serving", "ray", "fastapi", "pydantic", "prometheus_client", "starlette", "uvicorn")


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", sorted(RUNTIME.rglob("*.py")), ids=lambda p: p.name)
def test_runtime_never_imports_the_serving_stack(path: Path) -> None:
    bad = {m for m in imported_modules(path) if m.split(".")[0] in FORBIDDEN}
    assert not bad, f"{path.relative_to(RUNTIME.parent)} imports {sorted(bad)}"


def test_the_scan_sees_imports() -> None:
    # Guard against a scan that silently finds nothing.
    assert "torch" in imported_modules(RUNTIME / "experts" / "routing.py")
