"""The expert-set file format: save, load and validate (DESIGN.md "Expert set on disk").

An expert set is a directory holding two files:
    expert_set.safetensors  `<module path>.A` [r, D] and `<module path>.B` [r, O] per module
    expert_set.json         ExpertSetMeta: format, fingerprint, routing defaults, scale, ...

Loading is the trust boundary between files an operator (or an upload) provides and a serving
replica, so it validates everything before returning and never reads pickle: every problem
raises its own `ExpertSetError` subclass naming the file or tensor at fault. Saving is atomic:
the set is written into a temporary sibling directory, fsynced, and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, NoReturn

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as serialize_tensors
from torch import Tensor

logger = logging.getLogger(__name__)

FORMAT = "mora-expert-set"
FORMAT_VERSION = 1
TENSORS_FILE = "expert_set.safetensors"
METADATA_FILE = "expert_set.json"
MODEL_KINDS = ("causal_lm", "clip")
# Suffixes of pickle-based checkpoints: refused unopened wherever they appear in a set.
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"})
FLOAT_DTYPES: Mapping[str, torch.dtype] = {
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}
# Names end up in metric labels, log lines and paths: keep them boring.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MODULE_PATH_PATTERN = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
# Elements of each weight that enter the fingerprint hash: enough to tell two checkpoints of
# one architecture apart, cheap enough to hash a 135M model in well under 50 ms.
_FINGERPRINT_SAMPLE = 64

ModuleShapes = Mapping[str, tuple[int, int]]
Fingerprint = Mapping[str, Any]


class ExpertSetError(ValueError):
    """Base class: an expert set on disk (or in memory) is not acceptable."""


class MissingFileError(ExpertSetError):
    """The set directory or one of its files does not exist."""


class MalformedMetadataError(ExpertSetError):
    """expert_set.json is not valid JSON, or a field is missing or of the wrong type/value."""


class UnsupportedFormatError(ExpertSetError):
    """Wrong `format` string or a `format_version` this code does not know."""


class ModelKindMismatchError(ExpertSetError):
    """The set was made for another kind of model (causal_lm vs clip)."""


class FingerprintMismatchError(ExpertSetError):
    """The set was made for a different base model."""


class MalformedTensorFileError(ExpertSetError):
    """expert_set.safetensors is not a readable safetensors file."""


class TensorSetError(ExpertSetError):
    """Tensor names are missing, extra, or do not match `target_modules`."""


class ShapeError(ExpertSetError):
    """A tensor's shape disagrees with `rank` or with the base model's [D, O]."""


class DtypeError(ExpertSetError):
    """A tensor is not a supported floating-point dtype."""


class NonFiniteError(ExpertSetError):
    """A tensor holds NaN or Inf."""


class LimitError(ExpertSetError):
    """The set exceeds a StoreLimits bound (file size, tensor count, rank)."""


class UnsafeFileError(ExpertSetError):
    """A pickle-based file, or a special file where a regular file belongs."""


class PathEscapeError(ExpertSetError):
    """A symlink in the set, or a path that leaves the store root."""


@dataclass(frozen=True)
class StoreLimits:
    """Bounds that keep a hostile or mistaken set from exhausting a replica."""

    max_file_bytes: int = 2 * 1024**3
    max_tensors: int = 4096
    max_rank: int = 1024
    max_metadata_bytes: int = 16 * 1024**2


def utc_now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _fail(message: str) -> NoReturn:
    raise MalformedMetadataError(f"{METADATA_FILE}: {message}")


def _check_int(name: str, value: Any, minimum: int) -> int:
    # bool is an int subclass; `"rank": true` is a mistake, not a rank of 1.
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(f"field {name!r} must be an integer, got {type(value).__name__}")
    if value < minimum:
        _fail(f"field {name!r} must be >= {minimum}, got {value}")
    return value


def _check_float(
    name: str, value: Any, low: float, high: float, *, open_low: bool = False
) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        _fail(f"field {name!r} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value > high or value < low or (open_low and value == low):
        _fail(f"field {name!r} = {value} is out of range")
    return value


def _check_fingerprint(fp: Any) -> dict[str, Any]:
    if not isinstance(fp, Mapping):
        _fail("field 'base_model' must be an object")
    for key, types in (("architecture", str), ("model_type", str | None), ("hash", str)):
        if key not in fp or not isinstance(fp[key], types):
            _fail(f"base_model.{key} is missing or of the wrong type")
    modules = fp.get("modules")
    if not isinstance(modules, Mapping) or not modules:
        _fail("base_model.modules must be a non-empty object of module path -> [D, O]")
    clean: dict[str, list[int]] = {}
    for path, shape in modules.items():
        ok = isinstance(shape, list | tuple) and len(shape) == 2
        if not ok or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in shape):
            _fail(f"base_model.modules[{path!r}] must be [D, O] positive integers, got {shape!r}")
        clean[path] = [int(shape[0]), int(shape[1])]
    return {**fp, "modules": clean}


@dataclass(frozen=True)
class ExpertSetMeta:
    """The contents of expert_set.json; construction validates every field."""

    name: str
    model_kind: str
    base_model: Mapping[str, Any]
    target_modules: tuple[str, ...]
    rank: int
    top_k: int
    tau: float
    threshold: float
    scale: float
    class_names: tuple[str, ...] = ()
    created_at: str = field(default_factory=utc_now_iso)
    training: Mapping[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        put = object.__setattr__  # frozen: normalise once, here
        if not isinstance(self.name, str) or not NAME_PATTERN.fullmatch(self.name):
            _fail(f"name {self.name!r} must match {NAME_PATTERN.pattern}")
        if self.model_kind not in MODEL_KINDS:
            _fail(f"model_kind {self.model_kind!r} must be one of {MODEL_KINDS}")
        put(self, "base_model", _check_fingerprint(self.base_model))
        targets = self.target_modules
        if isinstance(targets, str) or not isinstance(targets, list | tuple) or not targets:
            _fail("target_modules must be a non-empty list of module paths")
        for path in targets:
            if not isinstance(path, str) or not MODULE_PATH_PATTERN.fullmatch(path):
                _fail(f"target_modules entry {path!r} is not a dotted module path")
            if path not in self.base_model["modules"]:
                _fail(f"target module {path!r} has no [D, O] entry in base_model.modules")
        if len(set(targets)) != len(targets):
            _fail("target_modules has duplicates")
        put(self, "target_modules", tuple(sorted(targets)))
        _check_int("rank", self.rank, 1)
        _check_int("top_k", self.top_k, 1)
        _check_int("format_version", self.format_version, 1)
        put(self, "tau", _check_float("tau", self.tau, 0.0, math.inf, open_low=True))
        # s is a unit-norm score in [-1, 1]; -1 disables pruning.
        put(self, "threshold", _check_float("threshold", self.threshold, -1.0, 1.0))
        put(self, "scale", _check_float("scale", self.scale, -math.inf, math.inf))
        names = self.class_names
        if isinstance(names, str) or not isinstance(names, list | tuple):
            _fail("class_names must be a list of strings")
        if not all(isinstance(c, str) and c for c in names):
            _fail("class_names entries must be non-empty strings")
        put(self, "class_names", tuple(names))
        try:
            when = datetime.fromisoformat(self.created_at)
        except (TypeError, ValueError):
            _fail(f"created_at {self.created_at!r} is not an ISO 8601 timestamp")
        if when.utcoffset() is None or when.utcoffset().total_seconds() != 0:
            _fail(f"created_at {self.created_at!r} must be in UTC")
        if not isinstance(self.training, Mapping):
            _fail("training must be an object")
        try:  # a deep, JSON-shaped copy: saving cannot fail on it later, and loads compare equal
            put(self, "training", json.loads(json.dumps(self.training, allow_nan=False)))
        except (TypeError, ValueError) as e:
            _fail(f"training is not JSON-serialisable: {e}")

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": self.format_version,
            "name": self.name,
            "model_kind": self.model_kind,
            "base_model": dict(self.base_model),
            "target_modules": list(self.target_modules),
            "rank": self.rank,
            "top_k": self.top_k,
            "tau": self.tau,
            "threshold": self.threshold,
            "scale": self.scale,
            "class_names": list(self.class_names),
            "created_at": self.created_at,
            "training": dict(self.training),
        }

    @classmethod
    def from_json_dict(cls, data: Any) -> ExpertSetMeta:
        """Validate parsed JSON: UnsupportedFormatError or MalformedMetadataError if bad."""
        if not isinstance(data, dict):
            _fail("top level must be an object")
        if data.get("format") != FORMAT:
            raise UnsupportedFormatError(
                f"{METADATA_FILE}: format is {data.get('format')!r}, expected {FORMAT!r}"
            )
        version = data.get("format_version")
        if version != FORMAT_VERSION or isinstance(version, bool):
            raise UnsupportedFormatError(
                f"{METADATA_FILE}: format_version {version!r} is not supported "
                f"(this build reads version {FORMAT_VERSION})"
            )
        missing = sorted(set(_JSON_FIELDS) - data.keys())
        extra = sorted(data.keys() - set(_JSON_FIELDS))
        if missing:
            _fail(f"missing field(s) {missing}")
        if extra:
            _fail(f"unknown field(s) {extra}")
        return cls(**{k: data[k] for k in _JSON_FIELDS if k != "format"})


# JSON keys in file order: "format" plus every ExpertSetMeta field.
_JSON_FIELDS = ("format", *(f.name for f in fields(ExpertSetMeta)))


@dataclass(frozen=True)
class ExpertSet:
    """One expert set: metadata plus module path -> (A [r, D], B [r, O])."""

    meta: ExpertSetMeta
    tensors: Mapping[str, tuple[Tensor, Tensor]]

    @property
    def name(self) -> str:
        return self.meta.name


def _weight_sample(weight: Tensor) -> bytes:
    if weight.is_meta:
        return b"meta"
    flat = weight.detach().reshape(-1)[:_FINGERPRINT_SAMPLE]
    # Rounded through bfloat16 so a model served in bf16 matches the fp32 one it was learned on
    # (both round to the same bf16 values); still tells different checkpoints apart.
    flat = flat.to(device="cpu", dtype=torch.bfloat16).to(torch.float32)
    return flat.numpy().astype("<f4").tobytes()


def base_fingerprint(model: torch.nn.Module, modules: ModuleShapes) -> dict[str, Any]:
    """Fingerprint of a base model over the given target modules (path -> (D, O)).

    The hash covers the architecture, model_type, every module's path and shape, and a content
    sample of each target weight and of the model's first parameter. It depends on which
    modules are listed: compare fingerprints computed over the same module set.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    shapes = {path: [int(d), int(o)] for path, (d, o) in sorted(modules.items())}
    digest = hashlib.sha256()
    canonical = {"architecture": type(model).__name__, "model_type": model_type, "modules": shapes}
    digest.update(json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode())
    first = next(iter(model.parameters()), None)
    if first is not None:
        digest.update(_weight_sample(first))
    for path in shapes:
        module = model.get_submodule(path)
        # A patched layer keeps the frozen original as `base_layer` (mora_runtime.patching).
        module = getattr(module, "base_layer", module)
        weight = getattr(module, "weight", None)
        if not isinstance(weight, Tensor):
            raise ValueError(f"module {path!r} has no weight tensor to fingerprint")
        digest.update(path.encode() + b"\0" + _weight_sample(weight))
    return {
        "architecture": type(model).__name__,
        "model_type": model_type,
        "modules": shapes,
        "hash": digest.hexdigest(),
    }


def _fingerprint_difference(expected: Fingerprint, actual: Fingerprint) -> str | None:
    """None when the fingerprints match, else a sentence saying what differs."""
    if expected.get("hash") == actual.get("hash"):
        return None
    for key in ("architecture", "model_type"):
        if expected.get(key) != actual.get(key):
            return f"{key} is {actual.get(key)!r}, the base model's is {expected.get(key)!r}"
    want, have = dict(expected.get("modules", {})), dict(actual.get("modules", {}))
    absent = sorted(have.keys() - want.keys())
    if absent:
        return f"module(s) {absent[:5]} are not in the base model's fingerprint"
    for path in sorted(have):
        if list(want[path]) != list(have[path]):
            return f"module {path!r} is [D, O] = {have[path]}, base model has {want[path]}"
    if want.keys() != have.keys():
        return "fingerprints cover different module sets; compute it over base_model.modules"
    return "same shapes but different weights (content hash differs)"


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


def _check_finite(name: str, tensor: Tensor, where: str) -> None:
    if not bool(torch.isfinite(tensor).all()):
        nans, infs = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
        raise NonFiniteError(f"{where}: tensor {name!r} has {nans} NaN and {infs} Inf values")


_DTYPE_NAMES = {dtype: name for name, dtype in FLOAT_DTYPES.items()}


def validate_expert_set(expert_set: ExpertSet) -> None:
    """Check an in-memory set the way load_expert_set checks a file (used before saving)."""
    header: dict[str, tuple[tuple[int, ...], str]] = {}
    for module, (a, b) in expert_set.tensors.items():
        for side, t in (("A", a), ("B", b)):
            header[f"{module}.{side}"] = (tuple(t.shape), _DTYPE_NAMES.get(t.dtype, str(t.dtype)))
    _check_tensor_header(expert_set.meta, header, f"expert set {expert_set.name!r}")
    for module, (a, b) in expert_set.tensors.items():
        _check_finite(f"{module}.A", a, f"expert set {expert_set.name!r}")
        _check_finite(f"{module}.B", b, f"expert set {expert_set.name!r}")


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
    limits: StoreLimits = StoreLimits(),
) -> ExpertSetMeta:
    """Validate the directory and read only the JSON (cheap: no tensor is touched)."""
    directory = Path(directory)
    _check_directory(directory, Path(store_root) if store_root is not None else None)
    return _read_meta(directory, limits)


def load_expert_set(
    directory: str | os.PathLike[str],
    *,
    expected_fingerprint: Fingerprint | Callable[[ExpertSetMeta], Fingerprint] | None = None,
    expected_kind: str | None = None,
    store_root: str | os.PathLike[str] | None = None,
    limits: StoreLimits = StoreLimits(),  # frozen, so a shared default is safe
) -> ExpertSet:
    """Read and fully validate an expert set; raises an ExpertSetError subclass on any fault.

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
    if meta.rank > limits.max_rank:
        raise LimitError(f"{directory}: rank {meta.rank} exceeds the limit {limits.max_rank}")
    if 2 * len(meta.target_modules) > limits.max_tensors:
        raise LimitError(
            f"{directory}: {2 * len(meta.target_modules)} tensors exceed {limits.max_tensors}"
        )
    if expected_fingerprint is not None:
        expected = (
            expected_fingerprint(meta) if callable(expected_fingerprint) else expected_fingerprint
        )
        difference = _fingerprint_difference(expected, meta.base_model)
        if difference is not None:
            raise FingerprintMismatchError(
                f"{directory}: set {meta.name!r} was made for another base model: {difference}"
            )
    tensors = _read_tensors(directory / TENSORS_FILE, meta, limits)
    logger.info("loaded expert set %r (%d modules) from %s", meta.name, len(tensors), directory)
    return ExpertSet(meta=meta, tensors=tensors)


def _read_tensors(
    path: Path, meta: ExpertSetMeta, limits: StoreLimits
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
        _check_finite(name, tensor, str(path))
    return {m: (flat[f"{m}.A"], flat[f"{m}.B"]) for m in meta.target_modules}
