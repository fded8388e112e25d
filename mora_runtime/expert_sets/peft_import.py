"""Convert a PEFT LoRA adapter into a MoRA expert set: each LoRA rank becomes one expert.

Semantics: for a module with LoRA `delta_W = scaling * lora_B @ lora_A` (lora_A [r, D],
lora_B [O, r]), the expert set stores A = lora_A and B = lora_B.T, so that
    scale * sum_i outer(B_i, A_i) == scaling * lora_B @ lora_A.
The dense sum is exact; served through MoRA routing, only the top-k experts per token add
their (softmax-weighted) values, which is the point of the conversion, not a bug.

PEFT writes lora_A as [r, D] for nn.Linear and for GPT-2's Conv1D (fan_in_fan_out) alike, so
both convert the same way. An expert set has one `scale`: when `alpha_pattern` gives modules
different scalings, the set keeps the config's default scaling and each module's ratio to it
is folded into that module's B. Ranks must agree across modules (one `rank` per set).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from mora_runtime.expert_sets import fingerprint as fingerprints
from mora_runtime.expert_sets import store
from mora_runtime.expert_sets.format import (
    FLOAT_DTYPES,
    DtypeError,
    ExpertSet,
    ExpertSetError,
    ExpertSetMeta,
    MalformedMetadataError,
    MalformedTensorFileError,
    MissingFileError,
    ShapeError,
    TensorSetError,
    UnsafeFileError,
)
from mora_runtime.experts.defaults import LM_ROUTING, ROUTING_DEFAULTS

logger = logging.getLogger(__name__)

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_PICKLE_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
# `<path>.lora_A.weight`, or `<path>.lora_A.<adapter name>.weight` as some tools write it.
_LORA_KEY = re.compile(r"(?P<path>.+?)\.lora_(?P<side>[AB])(?:\.(?P<adapter>[^.]+))?\.weight")
# Config switches that change the LoRA math into something rank-1 experts cannot express.
_UNSUPPORTED_OPTIONS = (
    "use_dora",
    "lora_bias",
    "modules_to_save",
    "target_parameters",
    "trainable_token_indices",
    "layer_replication",
    "use_qalora",
    "alora_invocation_tokens",
)


class UnsupportedAdapterError(ExpertSetError):
    """The adapter uses a PEFT feature that has no expert-set equivalent."""


def _pattern_value(patterns: Mapping[str, Any], module_path: str, default: Any) -> Any:
    # Same rule as peft.utils.other.get_pattern_key: first key matching the path's tail wins.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_path):
            return value
    return default


def _lora_scaling(alpha: float, r: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    """adapter_config.json, checked for a plain LoRA this converter can represent exactly."""
    path = adapter_dir / ADAPTER_CONFIG_NAME
    if not path.is_file():
        raise MissingFileError(f"{path} is missing")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise MalformedMetadataError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise MalformedMetadataError(f"{path}: top level must be an object")
    if config.get("peft_type") != "LORA":
        raise UnsupportedAdapterError(f"{path}: peft_type {config.get('peft_type')!r} != 'LORA'")
    for option in _UNSUPPORTED_OPTIONS:
        if config.get(option):
            raise UnsupportedAdapterError(f"{path}: {option}={config[option]!r} is not supported")
    if config.get("bias", "none") != "none":
        raise UnsupportedAdapterError(f"{path}: bias={config['bias']!r} is not supported")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise MalformedMetadataError(f"{path}: r must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise MalformedMetadataError(f"{path}: lora_alpha must be a number, got {alpha!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise MalformedMetadataError(f"{path}: {key} must be an object")
    return config


def _read_lora_tensors(adapter_dir: Path) -> dict[str, dict[str, Tensor]]:
    """module path -> {"A": lora_A [r, D], "B": lora_B [O, r]}, read without pickle."""
    # Symlinks are followed here, unlike in the expert store: this runs offline on an
    # operator's adapter (a hub-style cache is all symlinks), and its output is validated.
    path = adapter_dir / ADAPTER_WEIGHTS_NAME
    if not path.is_file():
        if (adapter_dir / ADAPTER_PICKLE_NAME).exists():
            raise UnsafeFileError(
                f"{adapter_dir / ADAPTER_PICKLE_NAME} is a pickle file and is refused unopened; "
                "re-save the adapter with save_pretrained(safe_serialization=True)"
            )
        raise MissingFileError(f"{path} is missing")
    if (adapter_dir / ADAPTER_PICKLE_NAME).exists():
        logger.warning("ignoring %s (pickle); using %s", ADAPTER_PICKLE_NAME, path)
    modules: dict[str, dict[str, Tensor]] = {}
    adapters: set[str | None] = set()
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
                match = _LORA_KEY.fullmatch(key)
                if match is None:
                    raise UnsupportedAdapterError(f"{path}: tensor {key!r} is not a LoRA A/B")
                dtype = f.get_slice(key).get_dtype()
                if dtype not in FLOAT_DTYPES:
                    raise DtypeError(f"{path}: tensor {key!r} has dtype {dtype}")
                module = match["path"].removeprefix(PEFT_PREFIX)
                adapters.add(match["adapter"])
                # Own float32 copies, not views of the file's mmap.
                tensor = f.get_tensor(key).to(torch.float32, copy=True)
                modules.setdefault(module, {})[match["side"]] = tensor
    except SafetensorError as e:
        raise MalformedTensorFileError(f"{path}: not a valid safetensors file: {e}") from None
    if len(adapters) > 1:
        raise UnsupportedAdapterError(f"{path}: several adapters in one file: {adapters}")
    if not modules:
        raise TensorSetError(f"{path}: no LoRA tensors")
    for module, pair in modules.items():
        if pair.keys() != {"A", "B"}:
            raise TensorSetError(f"{path}: module {module!r} lacks lora_A or lora_B")
    return modules


def _module_shape(model: torch.nn.Module, path: str) -> tuple[int, int]:
    """(D, O) of a base model's nn.Linear or GPT-2 Conv1D (weight [D, O])."""
    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise TensorSetError(f"adapter targets {path!r}, which the base model lacks") from None
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
        d, o = module.weight.shape
        return int(d), int(o)
    raise TensorSetError(f"{path!r} is a {type(module).__name__}, not a Linear or Conv1D")


def peft_to_expert_set(
    adapter_dir: str | os.PathLike[str],
    *,
    name: str,
    model_kind: str = "causal_lm",
    base_fingerprint: Mapping[str, Any] | None = None,
    base_model: torch.nn.Module | None = None,
    top_k: int | None = None,
    tau: float | None = None,
    threshold: float | None = None,
    class_names: tuple[str, ...] = (),
    prompt_template: str | None = None,
) -> ExpertSet:
    """Build (and validate) the expert set of a PEFT LoRA adapter in memory.

    Give exactly one of `base_fingerprint` (from `fingerprint.base_fingerprint` over the adapter's
    modules) or `base_model` (the unwrapped HF model the adapter was trained on). Routing
    settings left as None take `ROUTING_DEFAULTS[model_kind]` (mora_runtime/experts/defaults.py).
    A CLIP adapter may name its `class_names` and their `prompt_template` (None: the
    classifier's default template).
    """
    if (base_fingerprint is None) == (base_model is None):
        raise ValueError("pass exactly one of base_fingerprint or base_model")
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    lora = _read_lora_tensors(adapter_dir)
    use_rslora = bool(config.get("use_rslora", False))
    rank_pattern, alpha_pattern = (
        config.get("rank_pattern") or {},
        config.get("alpha_pattern") or {},
    )

    ranks, scalings = {}, {}
    for module, pair in sorted(lora.items()):
        a, b = pair["A"], pair["B"]
        want = _pattern_value(rank_pattern, module, config["r"])
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != want or b.shape[1] != want:
            raise ShapeError(
                f"{adapter_dir}: module {module!r}: lora_A {list(a.shape)} and lora_B "
                f"{list(b.shape)} do not form a rank-{want} pair"
            )
        ranks[module] = want
        alpha = _pattern_value(alpha_pattern, module, config["lora_alpha"])
        scalings[module] = _lora_scaling(alpha, want, use_rslora)
    if len(set(ranks.values())) > 1:
        raise UnsupportedAdapterError(
            f"{adapter_dir}: LoRA ranks differ per module {sorted(set(ranks.values()))}; "
            "an expert set has one rank"
        )
    rank = next(iter(ranks.values()))
    distinct = set(scalings.values())
    scale = (
        distinct.pop()
        if len(distinct) == 1
        else _lora_scaling(config["lora_alpha"], config["r"], use_rslora)
    )

    tensors = {}
    for module, pair in lora.items():
        b_t = pair["B"].t().contiguous()  # [r, O]
        if scalings[module] != scale:
            b_t = b_t * (scalings[module] / scale)  # one scale per set: fold the ratio into B
        tensors[module] = (pair["A"].contiguous(), b_t)

    if base_model is not None:
        shapes = {module: _module_shape(base_model, module) for module in sorted(lora)}
        fingerprint: Mapping[str, Any] = fingerprints.base_fingerprint(base_model, shapes)
    else:
        fingerprint = base_fingerprint or {}
    missing = sorted(set(lora) - set(fingerprint.get("modules", {})))
    if missing:
        raise TensorSetError(f"{adapter_dir}: modules {missing[:5]} are not in the fingerprint")

    training = {
        "source": "peft",
        "peft_type": config["peft_type"],
        "r": config["r"],
        "lora_alpha": config["lora_alpha"],
        "use_rslora": use_rslora,
        "alpha_pattern_folded_into_B": len(distinct) > 1,
        "base_model_name_or_path": config.get("base_model_name_or_path"),
    }
    defaults = ROUTING_DEFAULTS.get(model_kind, LM_ROUTING)  # an unknown kind fails below
    meta = ExpertSetMeta(
        name=name,
        model_kind=model_kind,
        base_model=fingerprint,
        target_modules=tuple(sorted(lora)),
        rank=rank,
        top_k=defaults.top_k if top_k is None else top_k,
        tau=defaults.tau if tau is None else tau,
        threshold=defaults.threshold if threshold is None else threshold,
        scale=scale,
        class_names=class_names,
        prompt_template=prompt_template,
        training=training,
    )
    expert_set = ExpertSet(meta=meta, tensors=tensors)
    store.validate_expert_set(expert_set)
    return expert_set


def convert_peft_adapter(
    adapter_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    name: str,
    model_kind: str = "causal_lm",
    base_fingerprint: Mapping[str, Any] | None = None,
    base_model: torch.nn.Module | None = None,
    top_k: int | None = None,
    tau: float | None = None,
    threshold: float | None = None,
    class_names: tuple[str, ...] = (),
    prompt_template: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert a PEFT LoRA adapter directory into an expert set directory; returns out_dir."""
    expert_set = peft_to_expert_set(
        adapter_dir,
        name=name,
        model_kind=model_kind,
        base_fingerprint=base_fingerprint,
        base_model=base_model,
        top_k=top_k,
        tau=tau,
        threshold=threshold,
        class_names=class_names,
        prompt_template=prompt_template,
    )
    out = store.save_expert_set(expert_set, out_dir, overwrite=overwrite)
    logger.info(
        "converted PEFT adapter %s into expert set %r (%d modules, rank %d, scale %g)",
        adapter_dir,
        name,
        len(expert_set.tensors),
        expert_set.meta.rank,
        expert_set.meta.scale,
    )
    return out
