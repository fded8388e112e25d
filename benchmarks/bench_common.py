"""What the benchmark scripts share: loading a sibling script, writing a results file.

benchmarks/ is not a package; each script runs with this directory first on sys.path, so
they import this module by name (serving.py before it takes the directory off the path).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent


def load_engine_benchmark() -> ModuleType:
    """benchmarks/decode.py as a module, loaded by path: serving.py takes benchmarks/ off
    sys.path (its own name shadows the `serving` package) before it needs it."""
    spec = importlib.util.spec_from_file_location("engine_benchmark", HERE / "decode.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_report(out: Path, title: str, text: str) -> None:
    """Print a results table and save it as `# title` Markdown at `out`."""
    print("\n" + text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"# {title}\n\n" + text)
