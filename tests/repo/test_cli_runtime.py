"""The runtime CLI as a new user meets it: one cache location, `models path`, `import-peft`."""

from __future__ import annotations

import copy
import importlib.machinery
import json
import re
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from mora_runtime import paths
from mora_runtime.cli import build_parser, run
from mora_runtime.expert_sets import peft_import
from mora_runtime.models import lm as lm_module
from serving.cli import main as mora_main

REPO = Path(__file__).resolve().parents[2]


def mora(*argv: str) -> int:
    return run(build_parser(), list(argv))


# --- one cache location --------------------------------------------------------------------------


def test_default_cache_is_the_one_make_prepares_and_cleans(monkeypatch) -> None:
    monkeypatch.delenv(paths.CACHE_ENV, raising=False)
    assert paths.checkout_root() == REPO
    assert paths.cache_dir() == REPO / ".cache" / "mora"
    makefile = (REPO / "Makefile").read_text()
    # make must not point the cache anywhere else, and `make clean` must remove it.
    assert not re.search(r"^\s*(export\s+)?MORA_CACHE\s*[:?]?=", makefile, re.MULTILINE)
    clean = makefile.split("\nclean:", 1)[1].split("\n\n", 1)[0]
    assert re.search(r"rm -rf[^\n]*\s\.cache(\s|$)", clean), clean


def test_installed_package_caches_under_home(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv(paths.CACHE_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(paths, "checkout_root", lambda: None)
    assert paths.cache_dir() == tmp_path / ".cache" / "mora-serve"


@pytest.mark.parametrize("which", ["lm", "clip"])
def test_models_path_refuses_a_model_that_is_not_prepared(
    which: str, monkeypatch, tmp_path, capsys
) -> None:
    monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path / "empty-cache"))
    assert mora("models", "path", which) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert "not prepared" in err and "mora models prepare" in err
    assert str(tmp_path / "empty-cache") in err and "Traceback" not in err


def test_models_path_prints_a_prepared_model(monkeypatch, tmp_path, capsys) -> None:
    monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path))
    import mora_runtime.models.lm as lm

    monkeypatch.setattr(lm, "default_lm_is_prepared", lambda: True)
    assert mora("models", "path", "lm") == 0
    assert capsys.readouterr().out.strip() == str(paths.default_lm_dir())


# --- import-peft ---------------------------------------------------------------------------------


@pytest.fixture
def adapter_dir(tiny_llama_dir: Path, tmp_path: Path) -> Path:
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, torch_dtype=torch.float32)
    config = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    adapter = tmp_path / "adapter"
    peft.get_peft_model(copy.deepcopy(base), config).save_pretrained(adapter)
    return adapter


def test_import_peft_names_the_set_after_its_directory(
    adapter_dir: Path, tiny_llama_dir: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "store" / "my-adapter"
    assert (
        mora("import-peft", str(adapter_dir), "--out", str(out), "--base", str(tiny_llama_dir)) == 0
    )
    meta = json.loads((out / "expert_set.json").read_text())
    assert meta["name"] == "my-adapter"
    assert "'my-adapter'" in capsys.readouterr().out


def test_import_peft_explains_a_directory_name_that_is_not_a_set_name(
    adapter_dir: Path, tiny_llama_dir: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "bad name!"
    code = mora("import-peft", str(adapter_dir), "--out", str(out), "--base", str(tiny_llama_dir))
    assert code == 1
    err = capsys.readouterr().err
    assert "--name" in err and "bad name!" in err
    assert not out.exists()


# --- models prepare --only -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "only, built",
    [((), ["kernels", "lm", "clip(None)"]), (("--only", "lm"), ["kernels", "lm"]),
     (("--only", "clip"), ["clip(None)"]), (("--only", "clip", "--threads", "3"), ["clip(3)"])],
    ids=["all", "lm", "clip", "clip-threads"],
)  # fmt: skip
def test_models_prepare_only_prepares_what_that_model_needs(
    only: tuple[str, ...], built: list[str], monkeypatch, tmp_path
) -> None:
    # `mora serve` runs `--only clip` in the background: it must not build the kernels or
    # touch the LM, which the server prepares meanwhile.
    monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path))
    import mora_runtime.cpu.build as cpu_build
    import mora_runtime.learn.pretrain_clip as pretrain_clip
    import mora_runtime.models.lm as lm

    calls: list[str] = []
    monkeypatch.setattr(cpu_build, "kernels", lambda: calls.append("kernels") or object())
    monkeypatch.setattr(lm, "default_lm_is_prepared", lambda: True)
    monkeypatch.setattr(lm, "prepare_default_lm", lambda force: calls.append("lm") or tmp_path)
    monkeypatch.setattr(
        pretrain_clip,
        "prepare_default_clip",
        lambda force, threads: calls.append(f"clip({threads})") or tmp_path,
    )
    assert mora("models", "prepare", *only) == 0
    assert calls == built


def test_models_prepare_only_refuses_another_model(capsys) -> None:
    assert mora("models", "prepare", "--only", "gpt") == 2
    assert "invalid choice" in capsys.readouterr().err


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
    fake.prepare_default_clip = lambda force=False, threads=None: (
        clip_calls.append(force) or tmp_path / "clip"
    )
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


class FakePeftImport:
    """Stands in for the converter: records its arguments (patched onto the real module, so
    the CLI's import finds it whether or not the module was imported before)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        monkeypatch.setattr(peft_import, "convert_peft_adapter", self.convert_peft_adapter)

    def convert_peft_adapter(self, *args: Any, **kwargs: Any) -> Path:
        self.calls.append((args, kwargs))
        return args[1]


def test_import_peft_passes_arguments_through(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    tiny_llama_dir: Path,
) -> None:
    fake = FakePeftImport(monkeypatch)
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
    FakePeftImport(monkeypatch)
    argv = ["import-peft", str(tmp_path), "--out", str(tmp_path / "o"), "--name", "x"]
    assert mora_main([*argv, "--kind", "clip"]) == 1
    assert "mora models prepare" in capsys.readouterr().err


def test_import_peft_reports_converter_errors(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    tiny_llama_dir: Path,
) -> None:
    def reject(*args: Any, **kwargs: Any) -> Path:
        raise ValueError("adapter_config.json: not a LoRA adapter")

    monkeypatch.setattr(peft_import, "convert_peft_adapter", reject)
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


def test_make_models_trains_the_clip_on_every_core() -> None:
    # Set-up runs alone: the load-based default would count the kernels' build just before.
    makefile = (REPO / "Makefile").read_text()
    recipe = makefile.split("\nmodels:", 1)[1].split("\n\n", 1)[0].splitlines()[1].split()
    assert recipe[0].endswith("/mora") and "$$(nproc)" in recipe
    args = build_parser().parse_args([a.replace("$$(nproc)", "2") for a in recipe[1:]])
    assert (args.models_command, args.only, args.threads) == ("prepare", None, 2)
