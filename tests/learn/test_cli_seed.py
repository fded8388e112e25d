"""`mora learn` seeds: fresh keys per task without --seed (recorded), identical sets with one."""

from __future__ import annotations

from pathlib import Path

import torch

from mora_runtime.cli import build_parser, run
from mora_runtime.expert_sets.store import load_expert_set
from mora_runtime.learn.data import LMExample, write_lm_jsonl

EXAMPLES = [LMExample("the quick brown", " fox"), LMExample("hello", " world")]


def learn(base: Path, data: Path, out: Path, *extra: str) -> dict:
    argv = ["learn", "--kind", "lm", "--data", str(data), "--name", out.name, "--out", str(out)]
    argv += ["--base", str(base), "--steps", "1", "--batch-size", "2", "--rank", "2"]
    argv += ["--top-k", "2", "--no-progress", "--threads", "1", *extra]
    assert run(build_parser(), argv) == 0
    expert_set = load_expert_set(out)
    return {"seed": expert_set.meta.training["seed"], "tensors": expert_set.tensors}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[p][0], b[p][0]) and torch.equal(a[p][1], b[p][1]) for p in a
    )


def test_tasks_without_seed_get_fresh_recorded_keys_and_a_seed_repeats(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    data = write_lm_jsonl(tmp_path / "task.jsonl", EXAMPLES)
    first = learn(tiny_llama_dir, data, tmp_path / "first")
    second = learn(tiny_llama_dir, data, tmp_path / "second")
    assert first["seed"] != second["seed"]
    assert not same(first["tensors"], second["tensors"])
    # The recorded seed repeats the run exactly.
    again = learn(tiny_llama_dir, data, tmp_path / "again", "--seed", str(first["seed"]))
    assert again["seed"] == first["seed"]
    assert same(again["tensors"], first["tensors"])
