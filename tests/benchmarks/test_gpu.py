"""benchmarks/gpu.py: its --smoke run (tiny shapes on the CPU) measures every run of the report
and writes it; without a GPU the full run refuses to start; the full plan is the issue's."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
import torch

from tests.benchmarks.test_peers import _load

gpu = _load("gpu")


def test_smoke_run_measures_every_row(tmp_path: Path) -> None:
    out = tmp_path / "gpu.md"
    gpu.main(["--smoke", "--out", str(out)])
    text = out.read_text()
    rows = re.findall(r"^\| (\d+) sets \| (\d+) \| ([\d.]+) \|", text, flags=re.M)
    assert {(int(s), int(c)) for s, c, _ in rows} == {(s, c) for s in (0, 2) for c in (1, 4)}
    assert all(float(tps) > 0 for _, _, tps in rows)
    assert re.search(r"HF `generate`, static batch 4: [\d.]+ tokens/s", text)
    ops = re.findall(r"^\| (\d+) \| ([\d.]+) \| ([\d.]+) \|", text, flags=re.M)
    assert [int(n) for n, *_ in ops] == [16, 64]
    assert all(float(v) > 0 for _, *times in ops for v in times)


def test_the_full_plan_is_the_issue_s_and_needs_a_gpu() -> None:
    args = argparse.Namespace(smoke=False, models="8b,1b", tokens=64)
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a CUDA device"):
            gpu.plan_for(args)
        return
    plan = gpu.plan_for(args)
    assert plan.models == ("8b", "1b") and plan.dtype == torch.bfloat16
    assert plan.concurrency == (1, 16, 64) and plan.sets == (0, 10, 100)
    assert plan.slots == (160, 1600, 16000) and plan.static_batch == 64
