"""Shared fixtures: tiny causal LMs (Llama and GPT-2 families) and a tiny tokenizer.

Every tiny model is built from a config with a fixed seed, so two builds are identical:
hidden 64, 2 layers, 4 heads (2 KV heads for Llama), vocab 128, context 128, eval mode.
`tiny_llama_dir` and `tiny_gpt2_dir` save model + tokenizer as a local HF directory, the way
a user supplies one.
Nothing here reaches a model hub.
"""

from __future__ import annotations

import os
import string
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
import torch

# Before transformers / huggingface_hub are imported anywhere: they read these at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_VOCAB = 128
TINY_HIDDEN = 64
TINY_LAYERS = 2
TINY_HEADS = 4
TINY_KV_HEADS = 2
TINY_CONTEXT = 128
TINY_SEED = 0
# 10x the HF default: with std 0.02 the logits are nearly flat, so greedy output degenerates
# into one repeated token and argmax ties are fragile; 0.2 gives varied, well-separated output.
TINY_INIT_STD = 0.2
UNK, BOS, EOS = "<unk>", "<s>", "</s>"  # ids 0, 1, 2

_TOKENIZER_CORPUS = (
    "the quick brown fox jumps over the lazy dog",
    "what is the capital of france? the capital of france is paris.",
    "a frozen base model learns new tasks one after another without forgetting old ones",
    "every expert scores itself and only the best experts add their output",
    "hello world, this is a tiny tokenizer for tests.",
)


@lru_cache(maxsize=1)
def _tiny_tokenizer_json() -> str:
    """A character-level BPE with merges learned from a few sentences, as JSON (built once)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    # Metaspace keeps spaces in the tokens, so decode(encode(text)) gives the text back.
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    alphabet = [*string.ascii_letters, *string.digits, *".,?!'-:", "\u2581"]
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=[UNK, BOS, EOS],
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_TOKENIZER_CORPUS, trainer=trainer)
    return tokenizer.to_str()


def build_tiny_tokenizer() -> Any:
    """A fresh `PreTrainedTokenizerFast` (vocab 128, no pad token on purpose)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json()),
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        model_max_length=TINY_CONTEXT,
    )


def build_tiny_llama() -> Any:
    """LlamaForCausalLM: hidden 64, 2 layers, 4 heads, 2 KV heads, vocab 128, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=TINY_HIDDEN,
        intermediate_size=2 * TINY_HIDDEN,
        num_hidden_layers=TINY_LAYERS,
        num_attention_heads=TINY_HEADS,
        num_key_value_heads=TINY_KV_HEADS,
        max_position_embeddings=TINY_CONTEXT,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        initializer_range=TINY_INIT_STD,
    )
    torch.manual_seed(TINY_SEED)
    return LlamaForCausalLM(config).eval()


def build_tiny_gpt2() -> Any:
    """GPT2LMHeadModel (Conv1D projections): hidden 64, 2 layers, 4 heads, vocab 128."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=TINY_VOCAB,
        n_embd=TINY_HIDDEN,
        n_layer=TINY_LAYERS,
        n_head=TINY_HEADS,
        n_positions=TINY_CONTEXT,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=TINY_INIT_STD,
    )
    torch.manual_seed(TINY_SEED)
    return GPT2LMHeadModel(config).eval()


def _save_model_dir(model: Any, directory: Path) -> Path:
    model.save_pretrained(directory)
    build_tiny_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture
def tiny_tokenizer() -> Any:
    return build_tiny_tokenizer()


@pytest.fixture
def tiny_llama() -> Any:
    return build_tiny_llama()


@pytest.fixture
def tiny_gpt2() -> Any:
    return build_tiny_gpt2()


@pytest.fixture
def tiny_llama_dir(tmp_path: Path) -> Path:
    return _save_model_dir(build_tiny_llama(), tmp_path / "tiny-llama")


@pytest.fixture
def tiny_gpt2_dir(tmp_path: Path) -> Path:
    return _save_model_dir(build_tiny_gpt2(), tmp_path / "tiny-gpt2")


@pytest.fixture(params=["avx2", "avx512"])
def kernel_isa(request: pytest.FixtureRequest) -> Any:
    """Runs a test once with the CPU kernels' AVX2 paths and once with their AVX-512 paths
    (mora_runtime/cpu/csrc/avx512.h); the second only where the CPU has AVX-512."""
    from mora_runtime.cpu.build import kernels

    module = kernels()
    if module is None:
        pytest.skip("no CPU kernels on this machine")
    if request.param == "avx512" and not module.avx512_available():
        pytest.skip("this CPU has no AVX-512 kernels")
    previous = module.set_avx512(request.param == "avx512")
    yield request.param
    module.set_avx512(previous)
