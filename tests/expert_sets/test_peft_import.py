"""PEFT LoRA -> expert set: every LoRA rank becomes one rank-1 expert, with the same delta."""

from __future__ import annotations

import copy
import json
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from mora_runtime.expert_sets import fingerprint as fingerprints
from mora_runtime.expert_sets import store
from mora_runtime.expert_sets.format import MissingFileError, ShapeError, UnsafeFileError
from mora_runtime.expert_sets.peft_import import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    UnsupportedAdapterError,
    convert_peft_adapter,
)

peft = pytest.importorskip("peft")


def tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=128, bos_token_id=1, eos_token_id=2
    )
    return GPT2LMHeadModel(config).eval()


def make_adapter(
    build: Callable[[], torch.nn.Module], tmp_path: Path, **lora: Any
) -> tuple[torch.nn.Module, Any, Path]:
    """(unwrapped base copy, PEFT model, saved adapter dir) for a LoRA with non-zero B."""
    base = build()
    base_copy = copy.deepcopy(base)  # get_peft_model wraps `base` in place
    config = peft.LoraConfig(init_lora_weights=False, lora_dropout=0.0, **lora)
    peft_model = peft.get_peft_model(base, config).eval()
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir)
    return base_copy, peft_model, adapter_dir


def in_out(module: torch.nn.Module) -> tuple[int, int]:
    """(D, O): nn.Linear stores weight [O, D], GPT-2's Conv1D stores [D, O]."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    d, o = module.weight.shape
    return d, o


def lora_layers(peft_model: Any) -> dict[str, Any]:
    """Module path in the unwrapped model -> PEFT LoRA layer."""
    prefix = "base_model.model."
    return {
        name.removeprefix(prefix): module
        for name, module in peft_model.named_modules()
        if isinstance(module, peft.tuners.lora.LoraLayer)
    }


CASES = {
    "llama": (tiny_llama, {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}),
    "llama_rslora": (
        tiny_llama,
        {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "use_rslora": True},
    ),
    "llama_alpha_pattern": (
        tiny_llama,
        {
            "r": 4,
            "lora_alpha": 8,
            "target_modules": ["q_proj", "v_proj"],
            "alpha_pattern": {"v_proj": 32},
        },
    ),
    "gpt2_conv1d": (
        tiny_gpt2,
        {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn"], "fan_in_fan_out": True},
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_converted_experts_reproduce_the_lora_delta(case: str, tmp_path: Path) -> None:
    build, lora = CASES[case]
    base, peft_model, adapter_dir = make_adapter(build, tmp_path, **lora)
    out = convert_peft_adapter(adapter_dir, tmp_path / "set", name=case, base_model=base)

    layers = lora_layers(peft_model)
    shapes = {path: in_out(layer.get_base_layer()) for path, layer in layers.items()}
    expected = fingerprints.base_fingerprint(base, shapes)
    loaded = store.load_expert_set(out, expected_fingerprint=expected, expected_kind="causal_lm")
    meta = loaded.meta
    assert meta.rank == lora["r"] and meta.target_modules == tuple(sorted(layers))
    assert meta.training["source"] == "peft" and meta.training["lora_alpha"] == lora["lora_alpha"]
    x = torch.randn(5, next(iter(shapes.values()))[0], generator=torch.Generator().manual_seed(0))
    scalings = set()
    for path, layer in layers.items():
        a, b = loaded.tensors[path]  # [r, D], [r, O]
        scaling = layer.scaling["default"]
        scalings.add(scaling)
        peft_delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * scaling
        torch.testing.assert_close(meta.scale * b.t() @ a, peft_delta, rtol=1e-5, atol=1e-6)
        # The layer's own forward (Conv1D included) adds exactly the experts' dense sum.
        with torch.no_grad():
            lora_out = layer(x) - layer.get_base_layer()(x)
        torch.testing.assert_close(meta.scale * (x @ a.t()) @ b, lora_out, rtol=1e-4, atol=1e-5)
    if lora.get("use_rslora"):
        assert meta.scale == pytest.approx(lora["lora_alpha"] / lora["r"] ** 0.5)
    if len(scalings) > 1:  # alpha_pattern: one scale per set, the ratio lives in B
        assert meta.scale == lora["lora_alpha"] / lora["r"]
    else:
        assert meta.scale == pytest.approx(scalings.pop())


def test_adapter_name_segment_in_tensor_names(tmp_path: Path) -> None:
    base, _, adapter_dir = make_adapter(
        tiny_llama, tmp_path, r=4, lora_alpha=8, target_modules=["q_proj"]
    )
    plain = convert_peft_adapter(adapter_dir, tmp_path / "plain", name="plain", base_model=base)
    weights = adapter_dir / ADAPTER_WEIGHTS_NAME
    tensors = load_file(weights)
    renamed = {k.replace(".weight", ".default.weight"): v for k, v in tensors.items()}
    save_file(renamed, weights)
    named = convert_peft_adapter(adapter_dir, tmp_path / "named", name="named", base_model=base)
    a, b = store.load_expert_set(plain), store.load_expert_set(named)
    for path in a.tensors:
        assert all(torch.equal(x, y) for x, y in zip(a.tensors[path], b.tensors[path], strict=True))


def test_fingerprint_may_be_given_instead_of_the_model(tmp_path: Path) -> None:
    base, _, adapter_dir = make_adapter(
        tiny_llama, tmp_path, r=4, lora_alpha=8, target_modules=["q_proj"]
    )
    shapes = {
        n: (m.in_features, m.out_features) for n, m in base.named_modules() if n.endswith("q_proj")
    }
    fingerprint = fingerprints.base_fingerprint(base, shapes)
    out = convert_peft_adapter(adapter_dir, tmp_path / "s", name="s", base_fingerprint=fingerprint)
    assert (
        store.load_expert_set(out, expected_fingerprint=fingerprint).meta.base_model == fingerprint
    )
    with pytest.raises(ValueError, match="exactly one"):
        convert_peft_adapter(adapter_dir, tmp_path / "t", name="t")
    wrong = fingerprints.base_fingerprint(base, {p: (64, 32) for p in shapes})
    with pytest.raises(ShapeError, match="q_proj"):
        convert_peft_adapter(adapter_dir, tmp_path / "u", name="u", base_fingerprint=wrong)


def test_pickle_adapter_is_refused_unopened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = tiny_llama()
    peft_model = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])
    )
    peft_model.save_pretrained(tmp_path / "adapter", safe_serialization=False)
    assert (tmp_path / "adapter" / "adapter_model.bin").exists()

    def forbidden(*args: Any, **kwargs: Any) -> None:
        pytest.fail("a pickle loader was called")

    for module, name in [(pickle, "load"), (pickle, "loads"), (torch, "load")]:
        monkeypatch.setattr(module, name, forbidden)
    with pytest.raises(UnsafeFileError, match=r"adapter_model\.bin"):
        convert_peft_adapter(tmp_path / "adapter", tmp_path / "s", name="s", base_model=base)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    ("config_change", "error", "text"),
    [
        ({"peft_type": "ADALORA"}, UnsupportedAdapterError, "peft_type"),
        ({"use_dora": True}, UnsupportedAdapterError, "use_dora"),
        ({"bias": "all"}, UnsupportedAdapterError, "bias"),
        ({"modules_to_save": ["lm_head"]}, UnsupportedAdapterError, "modules_to_save"),
        ({"rank_pattern": {"v_proj": 2}}, ShapeError, "v_proj"),
        (None, MissingFileError, ADAPTER_CONFIG_NAME),
    ],
)
def test_unrepresentable_adapters_are_rejected(
    tmp_path: Path, config_change: dict[str, Any] | None, error: type, text: str
) -> None:
    base, _, adapter_dir = make_adapter(
        tiny_llama, tmp_path, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]
    )
    path = adapter_dir / ADAPTER_CONFIG_NAME
    if config_change is None:
        path.unlink()
    else:
        path.write_text(json.dumps({**json.loads(path.read_text()), **config_change}))
    with pytest.raises(error, match=text):
        convert_peft_adapter(adapter_dir, tmp_path / "s", name="s", base_model=base)


def test_differing_ranks_are_rejected(tmp_path: Path) -> None:
    base, _, adapter_dir = make_adapter(
        tiny_llama,
        tmp_path,
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"v_proj": 2},
    )
    with pytest.raises(UnsupportedAdapterError, match="ranks differ"):
        convert_peft_adapter(adapter_dir, tmp_path / "s", name="s", base_model=base)


def test_template_passes_through_only_when_given(tmp_path: Path) -> None:
    base, _, adapter_dir = make_adapter(
        tiny_llama, tmp_path, r=2, lora_alpha=4, target_modules=["q_proj"]
    )
    # The format fields only: the converter takes any base model's fingerprint as given.
    clip = dict(base_model=base, model_kind="clip", class_names=("circle", "star"))
    plain = store.load_expert_set(
        convert_peft_adapter(adapter_dir, tmp_path / "a", name="a", **clip)
    )
    assert plain.meta.prompt_template is None and plain.meta.format_version == 2
    out = convert_peft_adapter(
        adapter_dir, tmp_path / "b", name="b", prompt_template="a drawing of a {}.", **clip
    )
    assert store.load_expert_set(out).meta.prompt_template == "a drawing of a {}."
    with pytest.raises(ValueError, match="exactly one"):
        convert_peft_adapter(
            adapter_dir, tmp_path / "c", name="c", prompt_template="a drawing", **clip
        )
    assert not (tmp_path / "c").exists()
