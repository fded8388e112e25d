"""A base model's fingerprint: what an expert set records of the model it was learned on, so
a set is never applied to another model (same architecture but other weights included)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import Tensor

from mora_runtime.expert_sets.format import Fingerprint, ModuleShapes

# Elements of each weight that enter the fingerprint hash: enough to tell two checkpoints of
# one architecture apart, cheap enough to fingerprint a model at every load.
_FINGERPRINT_SAMPLE = 64


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
        # A patched layer keeps the frozen original as `base_layer` (mora_runtime.experts.patching).
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


def fingerprint_difference(expected: Fingerprint, actual: Fingerprint) -> str | None:
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
