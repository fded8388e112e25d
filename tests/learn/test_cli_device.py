"""`mora learn --device`: the model learns where it is told (default: CUDA when present), the
set records it, and a device this machine lacks is a one-line error before any model loads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import mora_runtime.models.lm as lm_module
from mora_runtime.cli import build_parser, run
from mora_runtime.expert_sets.store import load_expert_set
from mora_runtime.learn.data import LMExample, write_lm_jsonl

EXAMPLES = [LMExample("the quick brown", " fox"), LMExample("hello", " world")]
TINY = ["--steps", "2", "--batch-size", "2", "--rank", "2", "--top-k", "2", "--seed", "7"]
HAS_CUDA = torch.cuda.is_available()


def learn_argv(base: Path, data: Path, out: Path, *extra: str) -> list[str]:
    argv = ["learn", "--kind", "lm", "--data", str(data), "--name", out.name, "--out", str(out)]
    return [*argv, "--base", str(base), *TINY, "--no-progress", "--threads", "1", *extra]


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[torch.device]:
    """The device of every base model `mora learn` loads (the real loader still runs)."""
    seen: list[torch.device] = []
    real = lm_module.load_causal_lm

    def spy(*args: Any, **kwargs: Any) -> Any:
        loaded = real(*args, **kwargs)
        seen.append(next(loaded.model.parameters()).device)
        return loaded

    monkeypatch.setattr(lm_module, "load_causal_lm", spy)
    return seen


@pytest.mark.parametrize(
    ("flag", "expected"), [((), "cuda" if HAS_CUDA else "cpu"), (("--device", "cpu"), "cpu")]
)
def test_learns_on_the_chosen_device_and_records_it(
    tiny_llama_dir: Path,
    tmp_path: Path,
    loads: list[torch.device],
    flag: tuple[str, ...],
    expected: str,
) -> None:
    data = write_lm_jsonl(tmp_path / "task.jsonl", EXAMPLES)
    out = tmp_path / "set"
    assert run(build_parser(), learn_argv(tiny_llama_dir, data, out, *flag)) == 0
    assert [device.type for device in loads] == [expected]
    expert_set = load_expert_set(out)
    assert expert_set.meta.training["device"] == expected
    # The saved set is device-independent: its tensors come back on the CPU.
    assert {A.device.type for A, _ in expert_set.tensors.values()} == {"cpu"}


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("cuda:64", "CUDA device"),  # no machine this runs on has 65 GPUs
        ("meta", "learning runs on cpu or cuda"),
        ("not-a-device", "is not a torch device"),
        *([] if HAS_CUDA else [("cuda", "torch sees no CUDA device")]),
    ],
)
def test_a_device_this_machine_lacks_is_a_one_line_error(
    tiny_llama_dir: Path,
    tmp_path: Path,
    loads: list[torch.device],
    capsys: pytest.CaptureFixture[str],
    device: str,
    message: str,
) -> None:
    data = write_lm_jsonl(tmp_path / "task.jsonl", EXAMPLES)
    out = tmp_path / "set"
    assert run(build_parser(), learn_argv(tiny_llama_dir, data, out, "--device", device)) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert err.count("\n") == 1
    assert loads == [] and not out.exists()  # refused before any model loads


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_cuda_learns_the_same_set_as_the_cpu(tiny_llama_dir: Path, tmp_path: Path) -> None:
    data = write_lm_jsonl(tmp_path / "task.jsonl", EXAMPLES)
    sets = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        assert run(build_parser(), learn_argv(tiny_llama_dir, data, out, "--device", device)) == 0
        sets[device] = load_expert_set(out).tensors
    assert sets["cpu"].keys() == sets["cuda"].keys()
    for path, (A, B) in sets["cpu"].items():
        A_gpu, B_gpu = sets["cuda"][path]
        # Same seed, same start; two AdamW steps move each value by about lr (5e-4) in the
        # direction of its gradient's sign, so a wrong gradient shows far above float32
        # rounding.
        torch.testing.assert_close(A_gpu, A, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(B_gpu, B, rtol=1e-4, atol=1e-5)
