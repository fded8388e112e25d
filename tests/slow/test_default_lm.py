"""The real default model: SmolLM2-135M-Instruct from the bundled GGUF, fully offline.

Uses the cache named by MORA_CACHE (`make test` prepares it first); the first run here
converts the GGUF. tests/conftest.py sets HF_HUB_OFFLINE=1 and every load is
local_files_only. Timings are logged, never asserted (shared machines drift).
"""

from __future__ import annotations

import json
import logging
import time

import pytest
import torch

from mora_runtime.models.lm import (
    default_gguf_path,
    greedy_generate,
    load_causal_lm,
    prepare_default_lm,
)
from mora_runtime.models.materialize import MARKER_FILENAME
from mora_runtime.paths import default_lm_dir

pytestmark = pytest.mark.slow
logger = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def default_lm():
    start = time.perf_counter()
    prepare_default_lm()
    logger.info("prepare_default_lm (cold or cached): %.2f s", time.perf_counter() - start)
    start = time.perf_counter()
    lm = load_causal_lm(device="cpu")
    logger.info("load_causal_lm(default) on a prepared cache: %.2f s", time.perf_counter() - start)
    return lm


def test_prepared_directory_is_a_complete_safetensors_model(default_lm) -> None:
    target = default_lm_dir()
    assert default_lm.model_dir == target
    names = {p.name for p in target.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", MARKER_FILENAME} <= names
    assert "tokenizer.json" in names
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in names)
    config = json.loads((target / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]

    start = time.perf_counter()
    assert prepare_default_lm() == target
    logger.info("prepare_default_lm when already prepared: %.3f s", time.perf_counter() - start)


def test_default_lm_properties(default_lm) -> None:
    assert type(default_lm.model).__name__ == "LlamaForCausalLM"
    assert default_lm.dtype == torch.float32
    assert default_lm.max_context == 8192
    im_end = default_lm.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in default_lm.eos_token_ids
    assert default_lm.tokenizer.pad_token is not None
    assert default_lm.tokenizer.chat_template


def test_default_lm_answers_a_chat_question(default_lm) -> None:
    prompt = default_lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    start = time.perf_counter()
    answer = greedy_generate(default_lm, prompt, 20)
    logger.info("greedy 20 tokens: %.2f s -> %r", time.perf_counter() - start, answer)
    assert "Paris" in answer


def test_conversion_preserves_the_gguf_weights(default_lm) -> None:
    """The saved safetensors hold exactly what transformers dequantises from the GGUF."""
    from transformers import AutoModelForCausalLM, GgufConfig

    gguf = default_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=str(gguf),
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
        local_files_only=True,
    )
    expected = reference.state_dict()
    actual = default_lm.model.state_dict()
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name
