"""Where MoRA Serve keeps what it materialises once: converted default models, built kernels.

The cache root is `$MORA_CACHE` when set; else `<checkout>/.cache/mora` when the package runs
from a source checkout (an editable install: what `make` sets up, and the folder `make clean`
removes), so the CLI, make and the server agree without any variable; else (an installed
package) `~/.cache/mora-serve`. Nothing here creates directories: callers that write do that.
"""

from __future__ import annotations

import hashlib
import os
import platform
from collections.abc import Sequence
from pathlib import Path

CACHE_ENV = "MORA_CACHE"
_INSTALLED_CACHE = Path("~/.cache/mora-serve")
CHECKOUT_CACHE = Path(".cache") / "mora"  # relative to the checkout's root

DEFAULT_LM_NAME = "SmolLM2-135M-Instruct"
DEFAULT_CLIP_NAME = "clip-default"


def cache_dir() -> Path:
    """The cache root, absolute; read from the environment on every call (tests change it)."""
    configured = os.environ.get(CACHE_ENV, "").strip()
    if configured:
        return Path(configured).expanduser().absolute()
    checkout = checkout_root()
    if checkout is not None:
        return checkout / CHECKOUT_CACHE
    return _INSTALLED_CACHE.expanduser().absolute()


def checkout_root() -> Path | None:
    """The source checkout this package runs from (the folder holding pyproject.toml and
    the Makefile beside `mora_runtime/`), or None for an installed package."""
    root = Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").is_file() and (root / "Makefile").is_file():
        return root
    return None


def default_lm_dir() -> Path:
    """Directory of the default causal LM converted to a safetensors HF model."""
    return cache_dir() / "models" / DEFAULT_LM_NAME


def default_clip_dir() -> Path:
    """Directory of the default CLIP model trained once at setup."""
    return cache_dir() / "models" / DEFAULT_CLIP_NAME


def native_build_dir(name: str, sources: Path | Sequence[Path], *inputs: str) -> Path:
    """`<cache>/native/<name>-<key>` for a kernel built from `sources`: the key hashes the
    sources, the machine and `inputs` (flags, versions), so any change builds afresh."""
    digest = hashlib.sha256()
    for source in [sources] if isinstance(sources, Path) else sources:
        digest.update(source.read_bytes())
    for part in (platform.machine(), *inputs):
        digest.update(part.encode())
    return cache_dir() / "native" / f"{name}-{digest.hexdigest()[:16]}"
