"""A killed extension build must not hang any later load (cpu/build.py's build_lock)."""

from __future__ import annotations

import fcntl
import subprocess
import sys
from pathlib import Path

import pytest

from mora_runtime.cpu import build as cpu_kernels

HOLD = """
import sys, time
from pathlib import Path
from mora_runtime.cpu.build import build_lock
with build_lock(Path(sys.argv[1])):
    (Path(sys.argv[1]) / "lock").touch()  # torch's own lock, as a build in progress has it
    print("held", flush=True)
    time.sleep(120)
"""


def _try_lock(directory: Path) -> bool:
    with open(directory / "build.flock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(handle, fcntl.LOCK_UN)
        return True


def test_a_killed_builder_releases_the_lock_and_its_leftover_is_removed(tmp_path: Path) -> None:
    builder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert builder.stdout.readline().strip() == "held"
        assert not _try_lock(tmp_path)  # a live builder holds it: others wait
        builder.kill()  # killed mid-build: torch's lock file stays behind
        builder.wait(timeout=30)
    finally:
        if builder.poll() is None:
            builder.kill()
            builder.wait(timeout=30)
    assert (tmp_path / "lock").exists()
    assert _try_lock(tmp_path)  # the kernel released the dead builder's lock at once
    with cpu_kernels.build_lock(tmp_path):
        cpu_kernels.drop_dead_lock(tmp_path)
    assert not (tmp_path / "lock").exists()


def test_the_build_lock_excludes_other_holders(tmp_path: Path) -> None:
    with cpu_kernels.build_lock(tmp_path):
        assert not _try_lock(tmp_path)
        cpu_kernels.drop_dead_lock(tmp_path)  # no leftover: nothing to do
    assert _try_lock(tmp_path)


@pytest.mark.parametrize("leftover", [True, False])
def test_loading_removes_a_leftover_lock_instead_of_waiting(tmp_path, monkeypatch, leftover):
    monkeypatch.setattr(cpu_kernels, "native_build_dir", lambda *args: tmp_path / "build")
    calls = []

    def fake_load(**kwargs):  # torch's loader would wait while its lock file exists
        calls.append(kwargs["build_directory"])
        assert not (tmp_path / "build" / "lock").exists()
        return "module"

    monkeypatch.setattr("torch.utils.cpp_extension.load", fake_load)
    if leftover:
        (tmp_path / "build").mkdir()
        (tmp_path / "build" / "lock").touch()
    assert cpu_kernels._load("cpu", (), (), ()) == "module"
    assert calls == [str(tmp_path / "build")]
