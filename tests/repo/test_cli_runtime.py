"""The runtime CLI as a new user meets it: one cache location, `models path`, `import-peft`."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch

from mora_runtime import paths
from mora_runtime.cli import build_parser, run

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
    [((), ["kernels", "lm", "clip"]), (("--only", "lm"), ["kernels", "lm"]),
     (("--only", "clip"), ["clip"])],
    ids=["all", "lm", "clip"],
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
        pretrain_clip, "prepare_default_clip", lambda force: calls.append("clip") or tmp_path
    )
    assert mora("models", "prepare", *only) == 0
    assert calls == built


def test_models_prepare_only_refuses_another_model(capsys) -> None:
    assert mora("models", "prepare", "--only", "gpt") == 2
    assert "invalid choice" in capsys.readouterr().err
