"""Build a cache directory once: atomically, idempotently, and once across processes.

The default models are made at set-up (a GGUF conversion, a CLIP training run). A build
runs in a temporary sibling directory that is renamed into place, under a file lock, so an
interrupted build never leaves a half directory and replicas starting together build once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MARKER_FILENAME = ".mora_prepared.json"


def read_marker(target: Path) -> dict[str, Any] | None:
    """The marker a finished build left in `target`, or None."""
    try:
        marker = json.loads((target / MARKER_FILENAME).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def materialize(
    target: Path,
    is_ready: Callable[[Path], bool],
    build: Callable[[Path], dict[str, Any]],
    *,
    force: bool = False,
) -> bool:
    """Make `target` with `build(staging) -> marker` unless `is_ready(target)`.

    Returns True when this call built it. The marker (plus `created_at`) is written into
    the directory last, so `is_ready` can trust it.
    """
    if not force and is_ready(target):
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.parent / f".{target.name}.lock"):
        if not force and is_ready(target):
            logger.info("%s was prepared by another process", target)
            return False
        _remove_leftovers(target)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            created = datetime.now(UTC).isoformat(timespec="seconds")
            marker = {**build(staging), "created_at": created}
            (staging / MARKER_FILENAME).write_text(json.dumps(marker, indent=2) + "\n")
            _make_readable(staging)
            _replace_dir(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return True


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock, the rename is still atomic
        yield
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _remove_leftovers(target: Path) -> None:
    """Delete staging/old directories an interrupted run left (the caller holds the lock)."""
    for pattern in (f".{target.name}.tmp-*", f".{target.name}.old-*"):
        for leftover in target.parent.glob(pattern):
            logger.info("Removing leftover %s from an interrupted build", leftover)
            shutil.rmtree(leftover, ignore_errors=True)


def _make_readable(directory: Path) -> None:
    """mkdtemp (and the safetensors writer) create owner-only modes; the cache is shared."""
    directory.chmod(0o755)
    for path in directory.iterdir():
        path.chmod(0o755 if path.is_dir() else 0o644)


def _replace_dir(staging: Path, target: Path) -> None:
    if not target.exists():
        staging.rename(target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    old.rmdir()
    target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)
