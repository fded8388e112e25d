"""The torch C++ extension of CPU kernels for serving: int4/int8 products (quantize.py),
decode-step attention (decode_attention.py), expert scores and a whole adapted layer's
MoRA update (`ExpertLayerPlan`, the cpu_fused layer backend), built once per source,
machine and torch.

A torch extension rather than a plain C library: its loops split their work with torch's
own thread pool, where threads of their own would fight torch's for the cores. The full
build needs x86-64 with AVX2 and FMA (`kernels()`); elsewhere `kernels()` is None and the
model keeps float weights and torch's attention, while `layer_kernels()` builds the layer
call alone without AVX2 (its scores are then at::mm), so the MoRA update stays one call
per layer on any CPU with a C++ compiler and OpenMP.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import platform
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from mora_runtime.paths import native_build_dir

logger = logging.getLogger(__name__)

_CSRC = Path(__file__).parent / "csrc"
SOURCES = tuple(
    _CSRC / name
    for name in (
        "bindings.cpp",
        "quant_gemm.cpp",
        "decode_attention.cpp",
        "expert_scores.cpp",
        "expert_layer.cpp",
        "llama_ops.cpp",
        "decoder_layer.cpp",
    )
)
HEADERS = tuple(
    _CSRC / name for name in ("avx2.h", "avx512.h", "mora_route.h", "kernels.h", "expert_layer.h")
)
PORTABLE_SOURCES = (_CSRC / "bindings.cpp", _CSRC / "expert_layer.cpp")
PORTABLE_HEADERS = (_CSRC / "mora_route.h", _CSRC / "expert_layer.h")
# -fopenmp: at::parallel_for is an inline template whose OpenMP pragma is compiled into this
# extension; without the flag it silently runs on one thread. The extension then needs
# libgomp.so.1, which the loader resolves to the copy torch has already loaded (same soname),
# so there is one OpenMP thread pool, torch's.
_FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp")
_PORTABLE_FLAGS = ("-O3", "-fopenmp")


def _cpu_has_avx2() -> bool:
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        return False
    is_x86 = platform.machine().lower() in ("x86_64", "amd64")
    return is_x86 and capability in ("AVX2", "AVX512")


def _load(name: str, sources: tuple[Path, ...], headers: tuple[Path, ...], flags: tuple) -> Any:
    """Compile (once per sources, flags and torch) and import an extension; None on failure."""
    import ninja
    from torch.utils.cpp_extension import load

    # torch runs `ninja` from PATH; the pinned one lives next to this interpreter's packages.
    if ninja.BIN_DIR not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    directory = native_build_dir(name, (*sources, *headers), torch.__version__, *flags)
    directory.mkdir(parents=True, exist_ok=True)
    # Replicas starting together build once: each waits for this lock, and whoever holds it
    # builds or loads what the first one built.
    with build_lock(directory):
        drop_dead_lock(directory)
        try:
            return load(
                name=f"mora_{directory.name.replace('-', '_')}",
                sources=[str(source) for source in sources],
                extra_cflags=list(flags),
                extra_ldflags=["-fopenmp"],
                build_directory=str(directory),
                verbose=False,
            )
        except (ImportError, OSError, RuntimeError, subprocess.SubprocessError) as error:
            logger.warning("CPU extension %s unavailable (%s)", name, error)
            return None


@contextlib.contextmanager
def build_lock(directory: Path) -> Iterator[None]:
    """Held while this process builds or loads the extension in `directory`. An flock: the
    kernel releases it when its process ends, however it ends, so a killed build never
    holds it."""
    with open(directory / "build.flock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def drop_dead_lock(directory: Path) -> None:
    """Under `build_lock`: remove torch's own `lock` file if one is there. torch's loader waits
    for as long as that file exists, and a build that was killed leaves it behind, so every
    later load would hang. Every live builder holds `build_lock` while the file exists, so
    one found by the holder was left by a builder that died."""
    lock = directory / "lock"
    if lock.exists():
        logger.warning("removing %s, left by a build that did not finish", lock)
        lock.unlink(missing_ok=True)


@functools.lru_cache(maxsize=1)
def kernels() -> Any | None:
    """The compiled module (`q4_1_linear`, `q8_0_linear`, `decode_attention`,
    `expert_scores`, `ExpertLayerPlan`), or None when this machine cannot have it (then:
    float weights, torch attention). Compiles on first use, once per source, machine and torch
    (set-up does it ahead of serving: docs/performance.md, Set-up cost)."""
    if not _cpu_has_avx2():
        return None
    return _load("cpu", SOURCES, HEADERS, _FLAGS)


@functools.lru_cache(maxsize=1)
def portable_kernels() -> Any | None:
    """The layer call alone (`ExpertLayerPlan`), built without AVX2; None when it cannot be
    built here (no C++ compiler or OpenMP)."""
    return _load("cpu-portable", PORTABLE_SOURCES, PORTABLE_HEADERS, _PORTABLE_FLAGS)


def layer_kernels() -> Any | None:
    """The module whose `ExpertLayerPlan` the cpu_fused backend calls: the full build where
    the CPU has AVX2, else the portable one, else None."""
    return kernels() or portable_kernels()
