"""Random expert sets: the one builder that benchmarks, load tests and tests share.

A random set is what `mora learn` would save, with random instead of learned tensors: keys
A [r, D] drawn from N(0, 1) / sqrt(D) times `key_scale`, values B [r, O] from N(0, 1) times
`value_scale`, fingerprinted on the unpatched base model. The default key scale spreads the
keys so that a fair share of tokens clear the routing threshold; the default value scale is
small so a causal LM's output stays readable text.

`mora experts random` (serving/experts_cli.py) writes such sets from the shell, so that
clients (the load generator) need neither torch nor this package.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from mora_runtime.expert_sets.fingerprint import base_fingerprint
from mora_runtime.expert_sets.format import ExpertSet, ExpertSetMeta, ModuleShapes
from mora_runtime.expert_sets.store import save_expert_set
from mora_runtime.experts.defaults import ROUTING_DEFAULTS
from mora_runtime.experts.patching import find_target_modules

logger = logging.getLogger(__name__)

KEY_SCALE = 3.0
VALUE_SCALE = 0.02
# write_random_sets seeds set i with seed * SEED_STRIDE + i: distinct sets per seed.
SEED_STRIDE = 1000


def random_tensors(
    modules: ModuleShapes,
    *,
    rank: int,
    generator: torch.Generator,
    key_scale: float = KEY_SCALE,
    value_scale: float = VALUE_SCALE,
) -> dict[str, tuple[Tensor, Tensor]]:
    """Module path -> (A [rank, D], B [rank, O]), drawn from `generator` module by module,
    A before B, in the order of `modules`."""
    return {
        path: (
            torch.randn(rank, d_in, generator=generator) / d_in**0.5 * key_scale,
            torch.randn(rank, d_out, generator=generator) * value_scale,
        )
        for path, (d_in, d_out) in modules.items()
    }


def random_expert_set(
    model: torch.nn.Module,
    name: str,
    *,
    rank: int = 8,
    seed: int = 0,
    key_scale: float = KEY_SCALE,
    value_scale: float = VALUE_SCALE,
    model_kind: str = "causal_lm",
    top_k: int | None = None,
    tau: float | None = None,
    threshold: float | None = None,
    modules: ModuleShapes | None = None,
    class_names: Sequence[str] = (),
) -> ExpertSet:
    """A random set for `model` (unpatched) over `modules` (default: its target modules).

    Routing fields left None are the model kind's defaults, as `mora learn` would write them.
    """
    defaults = ROUTING_DEFAULTS.get(model_kind)
    if defaults is None:
        raise ValueError(
            f"model_kind must be one of {sorted(ROUTING_DEFAULTS)}, got {model_kind!r}"
        )
    modules = dict(find_target_modules(model) if modules is None else modules)
    tensors = random_tensors(
        modules,
        rank=rank,
        generator=torch.Generator().manual_seed(seed),
        key_scale=key_scale,
        value_scale=value_scale,
    )
    meta = ExpertSetMeta(
        name=name,
        model_kind=model_kind,
        base_model=base_fingerprint(model, modules),
        target_modules=sorted(modules),
        rank=rank,
        top_k=defaults.top_k if top_k is None else top_k,
        tau=defaults.tau if tau is None else tau,
        threshold=defaults.threshold if threshold is None else threshold,
        scale=1.0,
        class_names=tuple(class_names),
    )
    return ExpertSet(meta=meta, tensors=tensors)


def write_random_sets(
    store: str | Path,
    count: int,
    *,
    model: torch.nn.Module | None = None,
    model_dir: str | Path | None = None,
    rank: int = 8,
    seed: int = 0,
    prefix: str | None = None,
    key_scale: float = KEY_SCALE,
    value_scale: float = VALUE_SCALE,
) -> list[str]:
    """Write `count` random causal-LM sets named `{prefix}-{i}` into `store` (replacing sets of
    the same name); returns the names, which are also their paths relative to the store.

    The sets are for `model` if given, else for the causal LM at `model_dir` (None: the
    default model).
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if model is None:
        from mora_runtime.models.lm import load_causal_lm

        model = load_causal_lm(model_dir).model
    modules = find_target_modules(model)
    prefix = prefix or f"random-{time.strftime('%Y%m%d-%H%M%S')}"
    store = Path(store)
    names = []
    for i in range(count):
        name = f"{prefix}-{i}"
        expert_set = random_expert_set(
            model,
            name,
            rank=rank,
            seed=seed * SEED_STRIDE + i,
            key_scale=key_scale,
            value_scale=value_scale,
            modules=modules,
        )
        save_expert_set(expert_set, store / name, overwrite=True)
        names.append(name)
    logger.info("wrote %d random expert sets to %s", count, store)
    return names
