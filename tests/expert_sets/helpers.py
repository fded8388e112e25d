"""Builders shared by the expert-set tests: a tiny Llama, its target shapes, a valid set."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mora_runtime.expert_sets import fingerprint as fingerprints
from mora_runtime.expert_sets import format as set_format
from mora_runtime.expert_sets.format import (
    ExpertSet,
    ExpertSetMeta,
)

RANK = 3
TARGETS = ("q_proj", "v_proj")


def tiny_llama(seed: int = 0, hidden: int = 64) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    return LlamaForCausalLM(config).eval()


def linear_shapes(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    return {
        name: (m.in_features, m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.endswith(TARGETS)
    }


def make_set(
    model: torch.nn.Module, dtype: torch.dtype = torch.float32, name: str = "task-1"
) -> ExpertSet:
    shapes = linear_shapes(model)
    meta = ExpertSetMeta(
        name=name,
        model_kind="causal_lm",
        base_model=fingerprints.base_fingerprint(model, shapes),
        target_modules=tuple(shapes),
        rank=RANK,
        top_k=8,
        tau=0.03,
        threshold=0.2,
        scale=2.0,
        training={"steps": 10, "loss": 1.25},
    )
    gen = torch.Generator().manual_seed(1)
    tensors = {
        path: (torch.randn(RANK, d, generator=gen).to(dtype), torch.randn(RANK, o, generator=gen))
        for path, (d, o) in shapes.items()
    }
    return ExpertSet(meta=meta, tensors=tensors)


def assert_same_set(a: ExpertSet, b: ExpertSet) -> None:
    assert a.meta == b.meta
    assert a.tensors.keys() == b.tensors.keys()
    for path, (a_a, a_b) in a.tensors.items():
        b_a, b_b = b.tensors[path]
        assert a_a.dtype == b_a.dtype and a_b.dtype == b_b.dtype
        assert torch.equal(a_a, b_a) and torch.equal(a_b, b_b)


def edit_json(directory: Path, change: Callable[[dict[str, Any]], None]) -> None:
    path = directory / set_format.METADATA_FILE
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def edit_tensors(directory: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    path = directory / set_format.TENSORS_FILE
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


Q0 = "model.layers.0.self_attn.q_proj"


def poison(name: str, value: float) -> Callable[[dict[str, torch.Tensor]], None]:
    def change(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name][1, 2] = value

    return change
