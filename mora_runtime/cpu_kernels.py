"""The torch C++ extension of CPU kernels for serving: int4/int8 products (quantize.py),
decode-step attention (decode_attention.py), expert scores and a whole adapted layer's
MoRA update (`ExpertLayerPlan`, patching.py), built once per source, machine and torch.

A torch extension rather than a plain C library like the routing kernel: its loops split
their work with torch's own thread pool, where threads of their own would fight torch's for
the cores. The kernels need x86-64 with AVX2 and FMA; elsewhere `kernels()` is None and the
model keeps float weights and torch's attention.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from .paths import native_build_dir

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
    )
)
HEADERS = (_CSRC / "avx2.h", _CSRC / "mora_route.h")
# -fopenmp: at::parallel_for is an inline template whose OpenMP pragma is compiled into this
# extension; without the flag it silently runs on one thread. The extension then needs
# libgomp.so.1, which the loader resolves to the copy torch has already loaded (same soname),
# so there is one OpenMP thread pool, torch's.
_FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp")


def _cpu_has_avx2() -> bool:
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        return False
    is_x86 = platform.machine().lower() in ("x86_64", "amd64")
    return is_x86 and capability in ("AVX2", "AVX512")


@functools.lru_cache(maxsize=1)
def kernels() -> Any | None:
    """The compiled module (`q4_1_linear`, `q8_0_linear`, `decode_attention`,
    `expert_scores`, `ExpertLayerPlan`), or None when this machine cannot have it.
    Compiles on first use (about a minute, once)."""
    if not _cpu_has_avx2():
        return None
    import ninja
    from torch.utils.cpp_extension import load

    # torch runs `ninja` from PATH; the pinned one lives next to this interpreter's packages.
    if ninja.BIN_DIR not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    directory = native_build_dir("cpu", (*SOURCES, *HEADERS), torch.__version__, *_FLAGS)
    directory.mkdir(parents=True, exist_ok=True)
    try:
        # torch's loader locks the directory, so replicas starting together build once.
        return load(
            name=f"mora_{directory.name.replace('-', '_')}",
            sources=[str(source) for source in SOURCES],
            extra_cflags=list(_FLAGS),
            extra_ldflags=["-fopenmp"],
            build_directory=str(directory),
            verbose=False,
        )
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        logger.warning("CPU kernels unavailable (%s): float weights, torch attention", error)
        return None
