"""What a loaded expert pool adds to the engine's steps, in one process, on SmolLM2 (int4).

    .venv/bin/python benchmarks/pool_step.py [--sets 10] [--rounds 2] [--threads 2] [--out PATH]

Runs 16 prompts to 64 greedy tokens each, stepping the engine by hand, and reports the time
of the prefill wave and the mean decode step for: the empty pool; `--sets` random sets x 16
ranks on q/k/v/o through the fused layer call (csrc/expert_layer.cpp, the served path);
the same sets through the torch layer backend (tensor ops, what serves where no extension
builds); the fused path again and the empty pool again (drift check: timings move within
minutes on a shared machine, so compare rows of one run).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
from bench_common import HERE, load_engine_benchmark, write_report

from mora_runtime.engine.core import Engine
from mora_runtime.engine.params import SamplingParams
from mora_runtime.engine.types import EngineConfig
from mora_runtime.experts.backends.select import BACKEND_ENV
from mora_runtime.experts.patching import patch_model, unpatch_model
from mora_runtime.models.lm import load_causal_lm

RESULTS = HERE / "results" / "pool_step.md"


def measure(lm, pool, prompts: list[list[int]], rounds: int) -> tuple[float, float]:
    """(prefill seconds, decode ms per step), each the median over `rounds` fresh engines."""
    prefills, decodes = [], []
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    for _ in range(rounds):
        engine = Engine(
            lm.model,
            eos_token_ids=lm.eos_token_ids,
            max_context=lm.max_context,
            pad_token_id=lm.tokenizer.pad_token_id,
            pool=pool,
            config=EngineConfig(max_running=len(prompts)),
        )
        for prompt in prompts:
            engine.submit(prompt, params, lambda event: None)
        prefill = decode = 0.0
        steps = 0
        while engine.num_running or engine.num_waiting:
            admitting = engine.num_waiting > 0
            started = time.perf_counter()
            engine.step()
            elapsed = time.perf_counter() - started
            if admitting:
                prefill += elapsed
            else:
                decode += elapsed
                steps += 1
        prefills.append(prefill)
        decodes.append(1e3 * decode / max(steps, 1))
    return statistics.median(prefills), statistics.median(decodes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sets", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bench = load_engine_benchmark()
    lm = load_causal_lm(weights="int4")
    pool = patch_model(lm.model)
    prompts = [bench.prompt_ids(lm.tokenizer, i) for i in range(16)]
    rows: list[tuple[str, float, float]] = []

    def run(label: str) -> None:
        prefill, decode = measure(lm, pool, prompts, args.rounds)  # reads the current pool
        rows.append((label, prefill, decode))
        print(f"{label}: prefill {prefill:.2f} s, decode step {decode:.1f} ms", flush=True)

    with torch.inference_mode():
        run("empty pool")
        bench.random_sets(pool, args.sets)
        sets = f"{args.sets} sets x 16 ranks"
        run(f"{sets}, fused layer call")
        os.environ[BACKEND_ENV] = "torch"  # every forward takes the tensor path
        try:
            run(f"{sets}, torch backend (tensor ops)")
        finally:
            del os.environ[BACKEND_ENV]
        run(f"{sets}, fused layer call (again)")
        unpatch_model(lm.model)  # a fresh empty pool (retiring sets keeps their slots)
        pool = patch_model(lm.model)
        run("empty pool (again)")

    empty = min(rows[0][2], rows[-1][2])
    lines = [
        f"16 sequences x 64 tokens on SmolLM2-135M int4, {args.threads} torch threads; "
        "ratio: the faster empty-pool decode step over this row's.",
        "",
        "| run | prefill s | decode step ms | decode vs empty pool |",
        "|---|---:|---:|---:|",
    ]
    for label, prefill, decode in rows:
        lines.append(f"| {label} | {prefill:.2f} | {decode:.1f} | {empty / decode:.2f}x |")
    write_report(args.out, "Pool step benchmark", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
