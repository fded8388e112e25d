"""The expert-set file format: save, load and validate (docs/spec.md, "Expert set on disk").

An expert set is a directory holding two files:
    expert_set.safetensors  `<module path>.A` [r, D] and `<module path>.B` [r, O] per module
    expert_set.json         ExpertSetMeta: format, fingerprint, routing defaults, scale, ...

Loading is the trust boundary between files an operator (or an upload) provides and a serving
replica, so it validates everything before returning and never reads pickle: every problem
raises its own `ExpertSetError` subclass naming the file or tensor at fault. Saving is atomic:
the set is written into a temporary sibling directory, fsynced, and renamed into place.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as serialize_tensors
from torch import Tensor

# Re-exported: callers use the store as the one entry point to expert sets.
from mora_runtime.expert_sets.fingerprint import fingerprint_difference
from mora_runtime.expert_sets.format import (
    DEFAULT_SERVING_DTYPE,
    FLOAT_DTYPES,
    FORMAT,
    METADATA_FILE,
    PICKLE_SUFFIXES,
    TENSORS_FILE,
    DtypeError,
    ExpertSet,
    ExpertSetMeta,
    Fingerprint,
    FingerprintMismatchError,
    LimitError,
    MalformedMetadataError,
    MalformedTensorFileError,
    MissingFileError,
    ModelKindMismatchError,
    ModuleShapes,
    PathEscapeError,
    ShapeError,
    StoreLimits,
    TensorSetError,
    UnsafeFileError,
    _check_finite,
)

logger = logging.getLogger(__name__)
DEFAULT_LIMITS = StoreLimits()


def _check_tensor_header(
    meta: ExpertSetMeta, header: Mapping[str, tuple[tuple[int, ...], str]], where: str
) -> None:
    """Names, dtypes and shapes, from the safetensors header or from in-memory tensors."""
    expected = {f"{m}.{side}" for m in meta.target_modules for side in ("A", "B")}
    missing, extra = sorted(expected - header.keys()), sorted(header.keys() - expected)
    if missing or extra:
        raise TensorSetError(
            f"{where}: tensors do not match target_modules: missing {missing[:5]}, "
            f"unexpected {extra[:5]} ({len(missing)} missing, {len(extra)} unexpected)"
        )
    for module in meta.target_modules:
        d, o = meta.base_model["modules"][module]
        for side, want in (("A", [meta.rank, d]), ("B", [meta.rank, o])):
            name = f"{module}.{side}"
            shape, dtype = header[name]
            if dtype not in FLOAT_DTYPES:
                raise DtypeError(f"{where}: tensor {name!r} has dtype {dtype}, expected a float")
            if list(shape) != want:
                raise ShapeError(
                    f"{where}: tensor {name!r} has shape {list(shape)}, expected {want} "
                    f"(rank {meta.rank}, base [D, O] = [{d}, {o}])"
                )


_DTYPE_NAMES = {dtype: name for name, dtype in FLOAT_DTYPES.items()}


def validate_expert_set(
    expert_set: ExpertSet, *, serving_dtype: torch.dtype | None = DEFAULT_SERVING_DTYPE
) -> None:
    """Check an in-memory set the way load_expert_set checks a file (used before saving)."""
    header: dict[str, tuple[tuple[int, ...], str]] = {}
    for module, (a, b) in expert_set.tensors.items():
        for side, t in (("A", a), ("B", b)):
            header[f"{module}.{side}"] = (tuple(t.shape), _DTYPE_NAMES.get(t.dtype, str(t.dtype)))
    _check_tensor_header(expert_set.meta, header, f"expert set {expert_set.name!r}")
    for module, (a, b) in expert_set.tensors.items():
        where = f"expert set {expert_set.name!r}"
        _check_finite(f"{module}.A", a, where, serving_dtype)
        _check_finite(f"{module}.B", b, where, serving_dtype)


def validate_against_model(expert_set: ExpertSet, modules: ModuleShapes) -> None:
    """Check that every adapted module exists in a model (path -> (D, O)) with the same shape."""
    for module, (a, b) in sorted(expert_set.tensors.items()):
        if module not in modules:
            raise TensorSetError(f"expert set {expert_set.name!r}: model has no module {module!r}")
        d, o = modules[module]
        if a.shape[-1] != d or b.shape[-1] != o:
            raise ShapeError(
                f"expert set {expert_set.name!r}: module {module!r} is [D, O] = "
                f"[{a.shape[-1]}, {b.shape[-1]}] in the set, [{d}, {o}] in the model"
            )


# --- saving -------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_tensors(expert_set: ExpertSet, path: Path) -> None:
    flat: dict[str, Tensor] = {}
    for module, (a, b) in expert_set.tensors.items():
        # A fresh contiguous CPU copy: safetensors refuses views that share storage (e.g. rows
        # of one pool buffer).
        flat[f"{module}.A"] = a.detach().cpu().clone(memory_format=torch.contiguous_format)
        flat[f"{module}.B"] = b.detach().cpu().clone(memory_format=torch.contiguous_format)
    _write_file(path, serialize_tensors(flat, metadata={"format": FORMAT}))


def _write_metadata(meta: ExpertSetMeta, path: Path) -> None:
    text = json.dumps(meta.to_json_dict(), indent=2, allow_nan=False) + "\n"
    _write_file(path, text.encode())


def save_expert_set(
    expert_set: ExpertSet, directory: str | os.PathLike[str], *, overwrite: bool = False
) -> Path:
    """Validate and write a set atomically; returns the set directory.

    With `overwrite`, the old directory is moved aside before the new one is renamed in, so
    for an instant neither exists at `directory`, but a reader never sees a mix of the two.
    """
    validate_expert_set(expert_set)
    directory = Path(directory)
    if (directory.exists() or directory.is_symlink()) and not overwrite:
        raise FileExistsError(f"expert set directory {directory} already exists")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        _write_tensors(expert_set, tmp / TENSORS_FILE)
        _write_metadata(expert_set.meta, tmp / METADATA_FILE)
        _fsync_dir(tmp)
        _move_into_place(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(directory.parent)
    logger.info("saved expert set %r to %s", expert_set.name, directory)
    return directory


def _move_into_place(tmp: Path, directory: Path) -> None:
    if not (directory.exists() or directory.is_symlink()):
        os.rename(tmp, directory)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".old", dir=directory.parent))
    os.rename(directory, old / "set")
    try:
        os.rename(tmp, directory)
    except BaseException:
        os.rename(old / "set", directory)
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


# --- loading ------------------------------------------------------------------------------


def resolve_in_store(store_root: str | os.PathLike[str], relative: str) -> Path:
    """Resolve a user-given relative path inside the store; PathEscapeError if it leaves it.

    Absolute paths and any `..` component are refused outright (even ones that would land back
    inside), and symlinks are followed only as far as the result stays under the store root.
    """
    root = Path(store_root).resolve()
    if not isinstance(relative, str) or not relative.strip() or "\0" in relative:
        raise PathEscapeError(f"expert set path {relative!r} is empty or invalid")
    rel = PurePosixPath(relative)
    if rel.is_absolute() or Path(relative).is_absolute() or ".." in rel.parts:
        raise PathEscapeError(f"expert set path {relative!r} must be relative, without '..'")
    resolved = (root / rel).resolve()
    if resolved == root or not resolved.is_relative_to(root):
        raise PathEscapeError(f"expert set path {relative!r} resolves outside the store {root}")
    return resolved


def _check_directory(directory: Path, store_root: Path | None) -> None:
    if store_root is not None:
        root = Path(store_root).resolve()
        if not directory.resolve().is_relative_to(root):
            raise PathEscapeError(f"{directory} resolves outside the expert store {root}")
    if directory.is_symlink():
        raise PathEscapeError(f"{directory} is a symlink; expert set directories must not be")
    if not directory.is_dir():
        raise MissingFileError(f"expert set directory {directory} does not exist")
    # Walk without following links: a link anywhere could swap a file after validation or
    # point outside the store, and a pickle file is refused by name, never opened.
    for parent, dirnames, filenames in os.walk(directory, followlinks=False):
        for entry in (*dirnames, *filenames):
            path = Path(parent) / entry
            if path.is_symlink():
                raise PathEscapeError(f"{path} is a symlink; expert sets must not contain any")
            if path.suffix.lower() in PICKLE_SUFFIXES:
                raise UnsafeFileError(f"{path} is a pickle-based file; it is refused unopened")


def _regular_file_size(path: Path) -> int:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise MissingFileError(f"{path} is missing") from None
    if not stat.S_ISREG(info.st_mode):
        raise UnsafeFileError(f"{path} is not a regular file")
    return info.st_size


def _reject_constant(token: str) -> None:
    raise ValueError(f"{token} is not valid JSON")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate keys {sorted({k for k in keys if keys.count(k) > 1})}")
    return dict(pairs)


def _read_meta(directory: Path, limits: StoreLimits) -> ExpertSetMeta:
    path = directory / METADATA_FILE
    _regular_file_size(path)  # the clear message for a missing or special file
    # No-follow, non-blocking, then fstat the open file: swapping in a link or a FIFO after the
    # check above can neither redirect nor hang the read.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise MissingFileError(f"{path} is missing") from None
    except OSError as e:
        raise UnsafeFileError(f"{path} cannot be opened safely: {e}") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise UnsafeFileError(f"{path} is not a regular file")
        raw = f.read(limits.max_metadata_bytes + 1)
    if len(raw) > limits.max_metadata_bytes:
        raise LimitError(f"{path} is over the limit of {limits.max_metadata_bytes} bytes")
    try:
        data = json.loads(
            raw.decode("utf-8"),
            parse_constant=_reject_constant,
            object_pairs_hook=_no_duplicate_keys,
        )
    except (UnicodeDecodeError, ValueError) as e:
        raise MalformedMetadataError(f"{path}: not valid JSON: {e}") from None
    try:
        return ExpertSetMeta.from_json_dict(data)
    except TypeError as e:
        raise MalformedMetadataError(f"{path}: {e}") from None


def read_metadata(
    directory: str | os.PathLike[str],
    *,
    store_root: str | os.PathLike[str] | None = None,
    limits: StoreLimits = DEFAULT_LIMITS,
) -> ExpertSetMeta:
    """Validate the directory and read only the JSON (cheap: no tensor is touched)."""
    directory = Path(directory)
    _check_directory(directory, Path(store_root) if store_root is not None else None)
    meta = _read_meta(directory, limits)
    _check_limits(meta, directory, limits)
    return meta


def _check_limits(meta: ExpertSetMeta, directory: Path, limits: StoreLimits) -> None:
    if meta.rank > limits.max_rank:
        raise LimitError(f"{directory}: rank {meta.rank} exceeds the limit {limits.max_rank}")
    if 2 * len(meta.target_modules) > limits.max_tensors:
        raise LimitError(
            f"{directory}: {2 * len(meta.target_modules)} tensors exceed {limits.max_tensors}"
        )


def load_expert_set(
    directory: str | os.PathLike[str],
    *,
    expected_fingerprint: Fingerprint | Callable[[ExpertSetMeta], Fingerprint] | None = None,
    expected_kind: str | None = None,
    store_root: str | os.PathLike[str] | None = None,
    limits: StoreLimits = DEFAULT_LIMITS,
    serving_dtype: torch.dtype | None = DEFAULT_SERVING_DTYPE,
) -> ExpertSet:
    """Read and fully validate an expert set; raises an ExpertSetError subclass on any fault.

    Tensors must be finite both as stored and cast to `serving_dtype` (the dtype of the pool
    that will hold them).

    `expected_fingerprint` is the serving model's `base_fingerprint` over the set's modules
    (`meta.base_model["modules"]`); since those are known only after the JSON is read, it may
    also be a function of the validated metadata.
    """
    directory = Path(directory)
    _check_directory(directory, Path(store_root) if store_root is not None else None)
    meta = _read_meta(directory, limits)
    if expected_kind is not None and meta.model_kind != expected_kind:
        raise ModelKindMismatchError(
            f"{directory}: set {meta.name!r} is for a {meta.model_kind!r} model, "
            f"this model is {expected_kind!r}"
        )
    _check_limits(meta, directory, limits)
    if expected_fingerprint is not None:
        expected = (
            expected_fingerprint(meta) if callable(expected_fingerprint) else expected_fingerprint
        )
        difference = fingerprint_difference(expected, meta.base_model)
        if difference is not None:
            raise FingerprintMismatchError(
                f"{directory}: set {meta.name!r} was made for another base model: {difference}"
            )
    tensors = _read_tensors(directory / TENSORS_FILE, meta, limits, serving_dtype)
    logger.info("loaded expert set %r (%d modules) from %s", meta.name, len(tensors), directory)
    return ExpertSet(meta=meta, tensors=tensors)


def _read_tensors(
    path: Path, meta: ExpertSetMeta, limits: StoreLimits, serving_dtype: torch.dtype | None
) -> dict[str, tuple[Tensor, Tensor]]:
    size = _regular_file_size(path)
    if size > limits.max_file_bytes:
        raise LimitError(f"{path} is {size} bytes, limit {limits.max_file_bytes}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            names = list(f.keys())
            if len(names) > limits.max_tensors:
                raise LimitError(f"{path} holds {len(names)} tensors, limit {limits.max_tensors}")
            header = {}
            for name in names:
                info = f.get_slice(name)
                header[name] = (tuple(info.get_shape()), info.get_dtype())
            _check_tensor_header(meta, header, str(path))
            # Copied out of the mmap, so a later change to the file cannot alter (or SIGBUS)
            # tensors that were validated.
            flat = {name: f.get_tensor(name).clone() for name in names}
    except SafetensorError as e:
        raise MalformedTensorFileError(f"{path}: not a valid safetensors file: {e}") from None
    for name, tensor in flat.items():
        _check_finite(name, tensor, str(path), serving_dtype)
    return {m: (flat[f"{m}.A"], flat[f"{m}.B"]) for m in meta.target_modules}
