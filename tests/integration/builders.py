"""What the integration tests save to disk as a user would: the tiny LM and CLIP model
directories, random expert sets, and PNG payloads."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import torch

from tests.conftest import build_tiny_llama, build_tiny_tokenizer

LONG_CONTEXT = 32768
EOS_ID = 2  # tests/conftest.py: <unk>, <s>, </s>
SET_RANK = 16


def save_tiny_lm(directory: Path) -> Path:
    model = build_tiny_llama()
    model.config.max_position_embeddings = LONG_CONTEXT
    with torch.no_grad():
        model.lm_head.weight[EOS_ID] = 0.0  # logit 0 never wins against 127 others
    model.save_pretrained(directory)
    tokenizer = build_tiny_tokenizer()
    tokenizer.model_max_length = LONG_CONTEXT
    tokenizer.save_pretrained(directory)
    return directory


def save_tiny_clip(directory: Path) -> Path:
    from mora_runtime.learn.clip_build import (
        ClipRecipe,
        build_clip,
        build_image_processor,
        build_tokenizer,
        save_clip_dir,
    )
    from mora_runtime.learn.domains import get_domain

    recipe = ClipRecipe(
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        projection_dim=32,
    )
    tokenizer = build_tokenizer(recipe.max_text_length)
    model = build_clip(recipe, tokenizer)
    return save_clip_dir(
        directory, model, tokenizer, build_image_processor(), get_domain("objects")
    )


def save_random_set(
    model: torch.nn.Module,
    directory: Path,
    name: str,
    *,
    model_kind: str = "causal_lm",
    seed: int = 0,
    gain: float = 0.5,
    rank: int = SET_RANK,
    class_names: tuple[str, ...] = (),
) -> Path:
    """A random expert set for `model` (unpatched), as `mora learn` would save one.

    Keys are spread (x3 over unit scale) so a fair share of tokens pass the routing
    threshold; `gain` sets how hard an active expert pushes the output.
    """
    from mora_runtime.expert_sets.store import save_expert_set
    from mora_runtime.expert_sets.synthetic import random_expert_set

    expert_set = random_expert_set(
        model,
        name,
        rank=rank,
        seed=seed,
        key_scale=3.0,
        value_scale=gain,
        model_kind=model_kind,
        class_names=class_names,
    )
    return save_expert_set(expert_set, directory, overwrite=True)


def png_base64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()
