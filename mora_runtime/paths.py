"""Where MoRA Serve keeps what it materialises once: converted default models, built kernels.

The cache root is `$MORA_CACHE` when set (the Makefile exports `<repo>/.cache/mora`), else
`~/.cache/mora-serve`. Nothing here creates directories: callers that write do that.
"""

from __future__ import annotations

import hashlib
import os
import platform
from collections.abc import Sequence
from pathlib import Path

CACHE_ENV = "MORA_CACHE"
_DEFAULT_CACHE = Path("~/.cache/mora-serve")

DEFAULT_LM_NAME = "SmolLM2-135M-Instruct"
DEFAULT_CLIP_NAME = "clip-default"


def cache_dir() -> Path:
    """The cache root, absolute; read from the environment on every call (tests change it)."""
    configured = os.environ.get(CACHE_ENV, "").strip()
    root = Path(configured) if configured else _DEFAULT_CACHE
    return root.expanduser().absolute()


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
