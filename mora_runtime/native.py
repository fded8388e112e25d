"""The native routing kernel (csrc/mora_route.c): built once with the system C compiler.

At decode batch sizes a MoRA layer's routing is a dozen tiny tensor operations whose fixed
cost (dispatch, allocation) dwarfs their arithmetic; over every adapted layer of a model it
was most of what a loaded pool added to a step. The kernel does routing, the value update
and the statistics of one layer in one call. It is plain C with no torch headers, so it
builds in well under a second (a torch C++ extension takes about a minute here), and it is
called through `ctypes` with the tensors' data pointers.

It serves CPU float32 inference only; CUDA, other dtypes and training use the tensor path
(`experts.route` / `apply_values`), which the tests hold to the same reference. With no C
compiler, or `MORA_NATIVE=0`, everything uses the tensor path.

The library is cached under `$MORA_CACHE/native/<hash of source, flags, platform>/`.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .materialize import materialize, read_marker
from .paths import native_build_dir

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "mora_route.c"
HEADER = SOURCE.with_suffix(".h")  # the per-token routing, shared with the torch extension
LIBRARY_NAME = "libmora_route.so"
DISABLE_ENV = "MORA_NATIVE"
_FLAGS = ("-O3", "-std=c11", "-shared", "-fPIC")

_p = ctypes.c_void_p
_i64 = ctypes.c_int64
_f32 = ctypes.c_float
_ARGTYPES = (
    _p, _i64, _i64, _p, _i64, _p, _i64,  # z, T, N, B, O, y, y_stride
    _p, _i64, _p, _p,  # mask, mask_rows, seq, present
    _p, _i64, _p, _f32, _f32,  # top_k, default_k, threshold, default_threshold, tau
    _p, _p, _p, _p,  # slot_scale, valid, active, hits
)  # fmt: skip


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


def build(force: bool = False) -> Path | None:
    """Compile the kernel into the cache (once); returns the library path, or None when it
    is not built and no C compiler is found."""
    # Plain C with a C ABI: the source, flags and machine decide the library, not the
    # compiler's version, so a cache built elsewhere (an image's build stage) is reused.
    target = native_build_dir("mora_route", (SOURCE, HEADER), *_FLAGS)
    compiler = _compiler()
    if compiler is None:
        library = target / LIBRARY_NAME
        return library if not force and _is_built(target) else None

    def compile_into(staging: Path) -> dict[str, Any]:
        command = [compiler, *_FLAGS, "-o", str(staging / LIBRARY_NAME), str(SOURCE), "-lm"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr.strip()}")
        return {"compiler": compiler, "flags": list(_FLAGS)}

    materialize(target, _is_built, compile_into, force=force)
    return target / LIBRARY_NAME


def _is_built(target: Path) -> bool:
    return read_marker(target) is not None and (target / LIBRARY_NAME).is_file()


def enabled() -> bool:
    """Whether the environment allows the kernel (`MORA_NATIVE=0` turns it off)."""
    return os.environ.get(DISABLE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    if not enabled():
        return None
    try:
        path = build()
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        logger.warning("native routing kernel unavailable (%s); using the tensor path", error)
        return None
    if path is None:
        logger.warning("no C compiler found: the native routing kernel is off")
        return None
    library = ctypes.CDLL(str(path))
    library.mora_route_apply.argtypes = _ARGTYPES
    library.mora_route_apply.restype = ctypes.c_int
    library.mora_max_k.restype = ctypes.c_int
    return library


def available() -> bool:
    """Whether the kernel runs in this process (built on the first call, then cached)."""
    return _library() is not None


def refresh() -> None:
    """Forget the cached decision (after changing MORA_NATIVE, e.g. in tests)."""
    _library.cache_clear()


def max_top_k() -> int:
    library = _library()
    return int(library.mora_max_k()) if library is not None else 0


def _ptr(tensor: Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


@dataclass(frozen=True)
class ForwardArgs:
    """The kernel arguments that stay the same for every layer of one forward pass.

    Holds the tensors whose addresses it passes, so they outlive every call.
    mask [S|1, N] bool, seq [T] long, top_k [S] long, threshold [S] f32, valid [T] bool
    (each optional); slot_scale [N] f32; scratch [T] int32 for counts nobody records.
    """

    top_k: int
    threshold: float
    tau: float
    slot_scale: Tensor
    scratch: Tensor
    mask: Tensor | None = None
    seq: Tensor | None = None
    seq_top_k: Tensor | None = None
    seq_threshold: Tensor | None = None
    valid: Tensor | None = None

    @functools.cached_property
    def _call(self) -> tuple[Any, tuple, tuple] | None:
        library = _library()
        if library is None:
            return None
        head = (_ptr(self.mask), self.mask.shape[0] if self.mask is not None else 0)
        tail = (
            _ptr(self.seq_top_k),
            self.top_k,
            _ptr(self.seq_threshold),
            self.threshold,
            self.tau,
            self.slot_scale.data_ptr(),
            _ptr(self.valid),
        )
        return library.mora_route_apply, (*head, _ptr(self.seq)), tail

    def apply(
        self,
        z: Tensor,
        B: Tensor,
        y: Tensor,
        present: Tensor | None = None,
        active: Tensor | None = None,
        hits: Tensor | None = None,
    ) -> bool:
        """Semantics: y[t] += scale * sum_{i in kept(t)} w_i(t) * z[t, i] * B[i] (inference).

        z [T, N] f32, B [N, O] f32, y [T, O] f32 (rows may be strided), updated in place;
        present [N] bool: the slots this layer has (None: all). Writes active [T] int32
        (experts per token; None: into `scratch`) and adds activations into hits [S, N]
        long. Every tensor must be contiguous on the CPU (`supports`). Returns False,
        changing nothing, when some token's budget exceeds the kernel's limit or the kernel
        is off (the caller then takes the tensor path).
        """
        call = self._call
        if call is None:
            return False
        function, head, tail = call
        status = function(
            z.data_ptr(),
            z.shape[0],
            z.shape[1],
            B.data_ptr(),
            B.shape[1],
            y.data_ptr(),
            y.stride(0),
            *head,
            _ptr(present),
            *tail,
            (self.scratch if active is None else active).data_ptr(),
            _ptr(hits),
        )
        return status == 0


def supports(z: Tensor, B: Tensor, y: Tensor) -> bool:
    """Whether these tensors can take the kernel (CPU float32, unit stride along O)."""
    return (
        z.device.type == "cpu"
        and z.dtype == B.dtype == y.dtype == torch.float32
        and y.stride(-1) == 1
        and z.is_contiguous()
        and B.is_contiguous()
    )
