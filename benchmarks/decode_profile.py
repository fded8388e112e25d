"""Where a decode step's time goes, HF's forward vs the compact forward (op by op, and with
whole-layer C++ calls), on SmolLM2 (int4).

    .venv/bin/python benchmarks/decode_profile.py [--sets 10] [--rounds 3] [--threads 2]

Steps the engine by hand (`max_tokens` greedy tokens for 1 and for 16 sequences), with
timers around what a decode step is made of: the base products (every int4/int8 layer,
fused or not, the output layer included), attention (the CPU decode kernel), MoRA's layers
(the layer backend's `apply`), and the rest (norms, rotary, residuals, Python, the
engine's own bookkeeping and sampling): the step's time minus the others. A layer run in one
C++ call (csrc/decoder_layer.cpp) counts whole under "whole layers": its products,
attention, norms and rotary together. The forwards
alternate round by round on one model (the compact forward shares its weights), with the
empty pool and with `--sets` random sets x 16 ranks on q/k/v/o; each cell is the median
over rounds of the mean per decode step. The timers add a little to every call, the same
for both forwards.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
from bench_common import HERE, load_engine_benchmark, write_report

from mora_runtime.cpu.build import kernels
from mora_runtime.engine.core import Engine
from mora_runtime.engine.params import SamplingParams
from mora_runtime.engine.types import EngineConfig
from mora_runtime.experts.backends.select import BACKENDS
from mora_runtime.experts.patching import patch_model
from mora_runtime.models.lm import load_causal_lm
from mora_runtime.models.quantize import QuantizedLinear

RESULTS = HERE / "results" / "decode_profile.md"
PARTS = ("base products", "attention", "MoRA layers", "whole layers")
FORWARDS = {"hf": "hf", "ops": "compact, op by op", "auto": "compact, whole layers"}
_spent: dict[str, float] = defaultdict(float)


def _timed(part: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _spent[part] += time.perf_counter() - started

    return wrapper


def install_timers() -> None:
    QuantizedLinear.forward = _timed("base products", QuantizedLinear.forward)
    module = kernels()
    module.decode_attention = _timed("attention", module.decode_attention)
    module.DecoderLayer.forward_ = _timed("whole layers", module.DecoderLayer.forward_)
    for backend in BACKENDS.values():
        backend.apply = _timed("MoRA layers", backend.apply)


def profile(lm, pool, forward: str, prompts: list[list[int]], tokens: int) -> dict[str, float]:
    """ms per decode step: total and each part, for one engine run of `prompts`."""
    engine = Engine(
        lm.model,
        eos_token_ids=lm.eos_token_ids,
        max_context=lm.max_context,
        pad_token_id=lm.tokenizer.pad_token_id,
        pool=pool,
        config=EngineConfig(max_running=len(prompts), forward=forward),
    )
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    for prompt in prompts:
        engine.submit(prompt, params, lambda event: None)
    while engine.num_waiting:
        engine.step()  # the prefill
    total, steps = 0.0, 0
    _spent.clear()
    while engine.num_running:
        started = time.perf_counter()
        engine.step()
        total += time.perf_counter() - started
        steps += 1
    out = {part: 1e3 * _spent[part] / steps for part in PARTS}
    out["total"] = 1e3 * total / steps
    out["other"] = out["total"] - sum(out[p] for p in PARTS)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sets", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bench = load_engine_benchmark()
    lm = load_causal_lm(weights="int4")
    pool = patch_model(lm.model)
    install_timers()
    results: dict[tuple, list[dict[str, float]]] = defaultdict(list)
    with torch.inference_mode():
        for pool_label in ("empty pool", f"{args.sets} sets x 16 ranks"):
            if pool_label != "empty pool":
                bench.random_sets(pool, args.sets)
            for batch in (1, 16):
                prompts = [bench.prompt_ids(lm.tokenizer, i) for i in range(batch)]
                for _ in range(args.rounds):
                    for forward in FORWARDS:
                        cell = profile(lm, pool, forward, prompts, args.tokens)
                        results[(pool_label, batch, forward)].append(cell)
                        print(pool_label, batch, forward, f"{cell['total']:.2f} ms", flush=True)
    columns = ("total", *PARTS, "other")
    lines = [
        f"ms per decode step, SmolLM2-135M int4, {args.threads} torch threads, medians of "
        f"{args.rounds} alternating rounds of {args.tokens} tokens; hf = Hugging Face's "
        "forward, compact = mora_runtime/models/llama (op by op: every layer as its kernel "
        "calls from Python; whole layers: a layer of a decode step without a MoRA delta in "
        "one C++ call).",
        "",
        "| pool | sequences | forward | " + " | ".join(columns) + " | speed-up |",
        "|---|---:|---|" + "---:|" * (len(columns) + 1),
    ]
    for (pool_label, batch, forward), cells in results.items():
        row = {c: statistics.median(cell[c] for cell in cells) for c in columns}
        hf_total = statistics.median(c["total"] for c in results[(pool_label, batch, "hf")])
        name = FORWARDS[forward]
        values = " | ".join(f"{row[c]:.2f}" for c in columns)
        lines.append(
            f"| {pool_label} | {batch} | {name} | {values} | {hf_total / row['total']:.2f}x |"
        )
    write_report(args.out, "Decode step profile", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
