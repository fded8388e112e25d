"""A killed extension build must not hang every later load (cpu_kernels._drop_stale_lock)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from mora_runtime.cpu import build as cpu_kernels


def test_a_dead_builders_lock_is_removed_and_a_live_one_kept(tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    lock.touch()
    cpu_kernels._drop_stale_lock(tmp_path)
    assert lock.exists()  # fresh: another replica may be building right now
    old = time.time() - cpu_kernels.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    cpu_kernels._drop_stale_lock(tmp_path)
    assert not lock.exists()
    cpu_kernels._drop_stale_lock(tmp_path)  # no lock: nothing to do
