"""Expert-set data types: metadata, tensors, the base-model fingerprint, and their errors.

`mora_runtime.expert_sets.store` reads and writes these as files; everything here is in-memory.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any, NoReturn

import torch
from torch import Tensor

FORMAT = "mora-expert-set"
FORMAT_VERSION = 2  # what this build writes
# Version 2 adds `prompt_template` (CLIP); version 1 files, which lack it, still load.
READABLE_VERSIONS = (1, 2)
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
# Bounds of the numeric metadata fields. Every float must also be finite in float32 (the
# widest dtype a replica computes in); the scale bound keeps it finite in float16 too.
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
MAX_INT_FIELD = 1 << 16  # rank and top_k; StoreLimits.max_rank may bound rank further
MAX_MODULE_DIM = 1 << 24  # D and O of one adapted layer
MAX_ABS_SCALE = 1e4  # a LoRA's alpha / r is orders of magnitude below this
TAU_RANGE = (1e-6, 1e3)  # a softmax temperature over unit-norm scores
MAX_TEMPLATE_CHARS = 256  # a CLIP prompt template; CLIP tokenizers truncate far below this
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")

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


def _check_int(name: str, value: Any, minimum: int, maximum: int = MAX_INT_FIELD) -> int:
    # bool is an int subclass; `"rank": true` is a mistake, not a rank of 1.
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(f"field {name!r} must be an integer, got {type(value).__name__}")
    if not minimum <= value <= maximum:
        _fail(f"field {name!r} must be in [{minimum}, {maximum}], got {value}")
    return value


def _check_float(
    name: str, value: Any, low: float, high: float, *, open_low: bool = False
) -> float:
    """A number in [low, high] (or (low, high]) that float32 holds as a finite value.

    JSON numbers are doubles, but replicas compute in float32 or narrower: a value such as
    1e300 is finite here and infinite (or an overflow error) once a replica stores it.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        _fail(f"field {name!r} must be a number, got {type(value).__name__}")
    try:
        value = float(value)
    except OverflowError:  # an integer too large for a double
        _fail(f"field {name!r} is out of range")
    bad = not math.isfinite(value) or value > high or value < low or (open_low and value == low)
    if bad or abs(value) > FLOAT32_MAX:
        bracket = "(" if open_low else "["
        _fail(f"field {name!r} = {value} is out of range {bracket}{low}, {high}]")
    return value


def check_prompt_template(template: Any) -> str | None:
    """None, or a one-line template of at most MAX_TEMPLATE_CHARS with exactly one "{}" (where
    the class name goes); raises ValueError saying what is wrong."""
    if template is None:
        return None
    if not isinstance(template, str):
        raise ValueError(f"prompt_template must be a string, got {type(template).__name__}")
    if not 0 < len(template) <= MAX_TEMPLATE_CHARS:
        raise ValueError(f"prompt_template must have 1 to {MAX_TEMPLATE_CHARS} characters")
    if template.count("{}") != 1:
        raise ValueError(f"prompt_template {template!r} needs exactly one '{{}}' for the label")
    if _CONTROL_CHARS.search(template):
        raise ValueError(f"prompt_template {template!r} has control characters")
    return template


def _readable(version: Any) -> bool:
    # `true` and `1.0` compare equal to 1 but are not a version number.
    return type(version) is int and version in READABLE_VERSIONS


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
        if not ok or any(
            isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_MODULE_DIM
            for v in shape
        ):
            _fail(
                f"base_model.modules[{path!r}] must be [D, O] integers in [1, {MAX_MODULE_DIM}], "
                f"got {shape!r}"
            )
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
    # CLIP: the template the set's class names were learned with (None: the classifier's default).
    prompt_template: str | None = None
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
        if not _readable(self.format_version):
            _fail(f"format_version must be one of {READABLE_VERSIONS}, got {self.format_version!r}")
        put(self, "tau", _check_float("tau", self.tau, *TAU_RANGE))
        # s is a unit-norm score in [-1, 1]; -1 disables pruning.
        put(self, "threshold", _check_float("threshold", self.threshold, -1.0, 1.0))
        put(self, "scale", _check_float("scale", self.scale, -MAX_ABS_SCALE, MAX_ABS_SCALE))
        names = self.class_names
        if isinstance(names, str) or not isinstance(names, list | tuple):
            _fail("class_names must be a list of strings")
        if not all(isinstance(c, str) and c for c in names):
            _fail("class_names entries must be non-empty strings")
        put(self, "class_names", tuple(names))
        self._check_template()
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

    def _check_template(self) -> None:
        try:
            check_prompt_template(self.prompt_template)
        except ValueError as e:
            _fail(str(e))
        if self.prompt_template is None:
            return
        if self.format_version < 2:
            _fail("prompt_template needs format_version 2")
        if self.model_kind != "clip" or not self.class_names:
            _fail("prompt_template belongs to a CLIP set with class_names")

    def pool_meta(self) -> dict[str, Any]:
        """What an ExpertPool entry keeps of this metadata (`ExpertPool.stage_set(meta=...)`)."""
        return {
            "class_names": list(self.class_names),
            "prompt_template": self.prompt_template,
            "rank": self.rank,
        }

    def to_json_dict(self) -> dict[str, Any]:
        data = {
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
            "prompt_template": self.prompt_template,
            "created_at": self.created_at,
            "training": dict(self.training),
        }
        if self.format_version == 1:
            del data["prompt_template"]  # written as the version says: it has no such field
        return data

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
        if not _readable(version):
            raise UnsupportedFormatError(
                f"{METADATA_FILE}: format_version {version!r} is not supported "
                f"(this build reads versions {list(READABLE_VERSIONS)})"
            )
        keys = _JSON_FIELDS if version >= 2 else _V1_FIELDS
        missing = sorted(set(keys) - data.keys())
        extra = sorted(data.keys() - set(keys))
        if missing:
            _fail(f"missing field(s) {missing}")
        if extra:
            _fail(f"unknown field(s) {extra} in format_version {version}")
        return cls(**{k: data[k] for k in keys if k != "format"})


# JSON keys in file order: "format" plus every ExpertSetMeta field (version 1: no template).
_JSON_FIELDS = ("format", *(f.name for f in fields(ExpertSetMeta)))
_V1_FIELDS = tuple(k for k in _JSON_FIELDS if k != "prompt_template")


@dataclass(frozen=True)
class ExpertSet:
    """One expert set: metadata plus module path -> (A [r, D], B [r, O])."""

    meta: ExpertSetMeta
    tensors: Mapping[str, tuple[Tensor, Tensor]]

    @property
    def name(self) -> str:
        return self.meta.name


def _check_finite(name: str, tensor: Tensor, where: str, dtype: torch.dtype | None) -> None:
    """NaN or Inf refused, in the tensor as stored and as cast to `dtype` (what a replica
    computes with): a float64 1e300 is finite on disk and infinite in float32."""
    if not bool(torch.isfinite(tensor).all()):
        nans, infs = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
        raise NonFiniteError(f"{where}: tensor {name!r} has {nans} NaN and {infs} Inf values")
    if dtype is not None and dtype != tensor.dtype:
        cast = tensor.to(dtype)
        if not bool(torch.isfinite(cast).all()):
            overflow = int((~torch.isfinite(cast)).sum())
            raise NonFiniteError(
                f"{where}: tensor {name!r} has {overflow} value(s) that overflow {dtype}"
            )


# Every replica computes in float32 or narrower, so a set must at least fit float32.
DEFAULT_SERVING_DTYPE = torch.float32
