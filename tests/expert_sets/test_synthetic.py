"""The random expert-set builder that benchmarks, load tests and tests share."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mora_runtime.expert_sets.store import load_expert_set, validate_against_model
from mora_runtime.expert_sets.synthetic import (
    SEED_STRIDE,
    random_expert_set,
    random_tensors,
    write_random_sets,
)
from mora_runtime.experts.defaults import ROUTING_DEFAULTS
from mora_runtime.experts.patching import find_target_modules


def test_random_tensors_shapes_scales_and_draw_order() -> None:
    shapes = {"a": (400, 3), "b": (100, 2)}
    out = random_tensors(
        shapes, rank=300, generator=torch.Generator().manual_seed(0), key_scale=2.0, value_scale=0.5
    )
    assert list(out) == ["a", "b"]
    for path, (d, o) in shapes.items():
        A, B = out[path]
        assert A.shape == (300, d) and B.shape == (300, o)
        # N(0, 1) / sqrt(D) * key_scale: every key's squared norm averages key_scale**2.
        assert A.pow(2).sum(dim=1).mean().item() == pytest.approx(4.0, rel=0.05)
        assert B.std().item() == pytest.approx(0.5, rel=0.1)
    # A then B, module by module, from the one generator.
    g = torch.Generator().manual_seed(0)
    assert torch.equal(out["a"][0], torch.randn(300, 400, generator=g) / 400**0.5 * 2.0)
    assert torch.equal(out["a"][1], torch.randn(300, 3, generator=g) * 0.5)
    assert torch.equal(out["b"][0], torch.randn(300, 100, generator=g) / 100**0.5 * 2.0)


@pytest.mark.parametrize("kind", sorted(ROUTING_DEFAULTS))
def test_random_set_fits_its_model_and_takes_the_kinds_routing_defaults(
    tiny_llama, kind: str
) -> None:
    expert_set = random_expert_set(tiny_llama, "r", rank=4, seed=3, model_kind=kind)
    defaults = ROUTING_DEFAULTS[kind]
    meta = expert_set.meta
    assert (meta.top_k, meta.tau, meta.threshold) == (
        defaults.top_k,
        defaults.tau,
        defaults.threshold,
    )
    assert meta.rank == 4 and meta.model_kind == kind
    validate_against_model(expert_set, find_target_modules(tiny_llama))
    again = random_expert_set(tiny_llama, "r", rank=4, seed=3, model_kind=kind, top_k=2)
    assert again.meta.top_k == 2
    assert all(torch.equal(expert_set.tensors[p][0], again.tensors[p][0]) for p in again.tensors)


def test_random_set_refuses_an_unknown_kind(tiny_llama) -> None:
    with pytest.raises(ValueError, match="model_kind"):
        random_expert_set(tiny_llama, "r", model_kind="speech")


def test_write_random_sets_seeds_each_set_apart(tiny_llama, tmp_path: Path) -> None:
    names = write_random_sets(tmp_path, 2, model=tiny_llama, rank=2, seed=1, prefix="w")
    assert names == ["w-0", "w-1"]
    for i, name in enumerate(names):
        written = load_expert_set(tmp_path / name)
        expected = random_expert_set(tiny_llama, name, rank=2, seed=SEED_STRIDE + i)
        assert written.meta.base_model == expected.meta.base_model
        for path, (A, B) in expected.tensors.items():
            assert torch.equal(written.tensors[path][0], A)
            assert torch.equal(written.tensors[path][1], B)
    assert write_random_sets(tmp_path, 0, model=tiny_llama) == []
    with pytest.raises(ValueError, match="count"):
        write_random_sets(tmp_path, -1, model=tiny_llama)
