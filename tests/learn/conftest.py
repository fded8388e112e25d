"""Fixtures of the learning tests: a tiny, untrained CLIP directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from mora_runtime.learn.clip_build import (
    ClipRecipe,
    build_clip,
    build_image_processor,
    build_tokenizer,
    save_clip_dir,
)

TINY_CLIP = ClipRecipe(
    patch_size=8, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, projection_dim=32
)


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer = build_tokenizer(TINY_CLIP.max_text_length)
    model = build_clip(TINY_CLIP, tokenizer)
    directory = tmp_path_factory.mktemp("tiny-clip")
    return save_clip_dir(directory, model, tokenizer, build_image_processor())
