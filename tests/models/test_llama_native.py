"""Whole-layer C++ calls of the compact forward (models/llama/native.py) change nothing: the
same logits, cache, tokens and routing statistics, bit for bit, as the layers run op by op,
with and without MoRA deltas; adapted layers run whole only through the cpu_fused backend;
never for prefill or float weights."""

from __future__ import annotations

import pytest
import torch

from mora_runtime.cpu.build import kernels
from mora_runtime.engine.core import Engine
from mora_runtime.engine.forward import select_runner
from mora_runtime.engine.params import SamplingParams
from mora_runtime.engine.types import EngineConfig
from mora_runtime.experts.patching import patch_model
from mora_runtime.experts.slots import RoutingConfig
from mora_runtime.models.llama.model import CompactLlama
from mora_runtime.models.quantize import int4_supported, quantize_model
from tests.engine.test_engine import VOCAB, prompts, tokens
from tests.models.test_llama_compact import FAMILIES, _expert_set, compact_run

pytestmark = pytest.mark.skipif(
    not int4_supported(), reason="whole-layer calls need the AVX2 kernels (int4 weights)"
)


@pytest.fixture
def layer_calls(monkeypatch) -> list[int]:
    """Counts whole-layer calls (each call appends 1)."""
    calls: list[int] = []
    layer_type = kernels().DecoderLayer
    original = layer_type.forward_

    def counted(self, *args):
        calls.append(1)
        return original(self, *args)

    monkeypatch.setattr(layer_type, "forward_", counted)
    return calls


def _int4(family: str):
    model = FAMILIES[family]()
    quantize_model(model)
    return model


@pytest.mark.parametrize("family", list(FAMILIES))  # qwen2: q/k/v with bias
def test_whole_layers_equal_the_layers_op_by_op_bit_for_bit(family, layer_calls):
    model = _int4(family)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, :4] = 0  # left padding, as the engine batches prompts
    mask[2, :7] = 0
    ops, ops_cache = compact_run(CompactLlama(model, whole_layers=False), model, ids, mask, split=9)
    assert layer_calls == []
    whole, whole_cache = compact_run(CompactLlama(model), model, ids, mask, split=9)
    layers = model.config.num_hidden_layers
    assert len(layer_calls) == 3 * layers  # every layer of the three decode steps, no prefill
    assert torch.equal(whole, ops)
    for got, want in zip(whole_cache.layers, ops_cache.layers, strict=True):
        assert got.length == want.length == 12
        assert torch.equal(got.keys[:, :, :12], want.keys[:, :, :12])
        assert torch.equal(got.values[:, :, :12], want.values[:, :, :12])


def test_float_weights_keep_the_layers_op_by_op(layer_calls):
    model = FAMILIES["llama"]()  # not quantised: torch's products
    runner = CompactLlama(model)
    assert all(block.native is None for block in runner.blocks)
    ids = torch.randint(1, VOCAB, (1, 6), generator=torch.Generator().manual_seed(2))
    compact_run(runner, model, ids, torch.ones_like(ids), split=4)
    assert layer_calls == []


def _engine_run(forward: str, targets: tuple[str, ...] | None, add_sets: bool):
    """Four greedy requests on an int4 Llama with a patched model: their events."""
    model = _int4("llama")
    pool = patch_model(model, targets, routing=RoutingConfig(top_k=4, tau=0.1, threshold=0.05))
    if add_sets:
        pool.add_set("a", _expert_set(pool, 0))
    engine = Engine(
        model, eos_token_ids=(), max_context=256, pool=pool, config=EngineConfig(forward=forward)
    )
    params = SamplingParams(max_tokens=6, temperature=0.0)
    events: dict[int, list] = {i: [] for i in range(4)}
    for i, prompt in enumerate(prompts(4, seed=5)):
        engine.submit(prompt, params, events[i].append)
    while engine.num_running or engine.num_waiting:
        engine.step()
    return [events[i] for i in range(4)]


EVERY_PRODUCT = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ONE_LAYER = ("layers.1.self_attn.q_proj", "layers.1.mlp.down_proj")  # layer 0 not adapted


@pytest.mark.parametrize(
    ("targets", "add_sets", "backend", "whole_per_step"),
    [
        (None, False, "auto", 2),  # patched, empty pool: nothing added anywhere
        (None, True, "auto", 2),  # q/k/v/o of both layers add deltas, from C++
        (EVERY_PRODUCT, True, "auto", 2),  # every product, the MLP's included
        (ONE_LAYER, True, "auto", 2),
        # Another backend's deltas are added op by op: only the unadapted layer runs whole.
        (ONE_LAYER, True, "torch", 1),
        (None, True, "torch", 0),
    ],
    ids=["empty-pool", "qkvo", "every-product", "one-layer", "torch-one-layer", "torch-qkvo"],
)
def test_whole_layers_give_the_engine_the_same_tokens_and_routing(
    targets, add_sets, backend, whole_per_step, layer_calls, monkeypatch
):
    monkeypatch.setenv("MORA_BACKEND", backend)
    want = _engine_run("ops", targets, add_sets)
    assert layer_calls == []
    got = _engine_run("auto", targets, add_sets)
    decode_steps = 5  # six tokens each: the first comes from the prefill
    assert len(layer_calls) == whole_per_step * decode_steps
    assert [tokens(e) for e in got] == [tokens(e) for e in want]
    for g, w in zip(got, want, strict=True):
        assert g[-1].routing == w[-1].routing


def test_the_forward_setting_chooses_whole_layers_or_ops():
    model = _int4("llama")
    assert all(block.native is not None for block in select_runner(model, "auto").blocks)
    assert all(block.native is None for block in select_runner(model, "ops").blocks)
