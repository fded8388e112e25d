"""MoRA Serve on one GPU: the engine against HF `generate`, and the Triton routing op against
the dense product, on Llama-family shapes with random weights (nothing is downloaded).

    .venv/bin/python benchmarks/gpu.py [--models 8b,1b] [--tokens 64] [--out PATH]
    .venv/bin/python benchmarks/gpu.py --smoke     # tiny shapes on the CPU, in seconds

Per model (Llama-3-8B and Llama-3.2-1B shapes, random bfloat16 weights built on the device):
output tokens/s of greedy `--tokens`-token completions of random 32-token prompts through the
engine at concurrency 1, 16 and 64, with an empty pool and with 10 and 100 random sets x 16
ranks on q/k/v/o, against HF `generate` on a static batch of 64 of the same prompts. Then one
adapted layer (D = O = the 8B hidden size, 64 tokens): the Triton backend, the torch backend
and the dense product (x A^T) B, what a rank-N LoRA costs, at N = 160 / 1600 / 16000 slots.
Sized to finish well within 8 minutes on one H200.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from bench_common import load_engine_benchmark, write_report
from transformers import LlamaConfig, LlamaForCausalLM

from mora_runtime.engine.core import Engine
from mora_runtime.engine.types import EngineConfig
from mora_runtime.expert_sets.synthetic import random_tensors
from mora_runtime.experts.backends.triton_backend import TritonBackend
from mora_runtime.experts.defaults import LM_ROUTING
from mora_runtime.experts.patching import patch_model
from mora_runtime.experts.routing import mora_delta

RESULTS = Path(__file__).resolve().parent / "results" / "gpu.md"
PROMPT_LEN = 32
RANK = 16

# Llama-3-8B, Llama-3.2-1B and a tiny model for --smoke (LlamaConfig fields).
SHAPES: dict[str, dict[str, Any]] = {
    "8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
    ),
    "1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
        tie_word_embeddings=True,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
    ),
}


@dataclass(frozen=True)
class Plan:
    """What one invocation measures."""

    models: tuple[str, ...]
    device: torch.device
    dtype: torch.dtype
    tokens: int
    concurrency: tuple[int, ...]
    sets: tuple[int, ...]  # pool sizes, in sets x RANK ranks, growing
    static_batch: int
    slots: tuple[int, ...]  # N of the routing op
    op_size: int  # D = O of the routing op
    op_tokens: int


def plan_for(args: argparse.Namespace) -> Plan:
    if args.smoke:
        return Plan(
            models=("tiny",),
            device=torch.device("cpu"),
            dtype=torch.float32,
            tokens=4,
            concurrency=(1, 4),
            sets=(0, 2),
            static_batch=4,
            slots=(16, 64),
            op_size=64,
            op_tokens=8,
        )
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py needs a CUDA device (or --smoke)")
    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    unknown = sorted(set(models) - set(SHAPES))
    if unknown:
        raise SystemExit(f"unknown model shapes {unknown}: one of {', '.join(SHAPES)}")
    return Plan(
        models=models,
        device=torch.device("cuda"),
        dtype=torch.bfloat16,
        tokens=args.tokens,
        concurrency=(1, 16, 64),
        sets=(0, 10, 100),
        static_batch=64,
        slots=(160, 1600, 16000),
        op_size=SHAPES["8b"]["hidden_size"],
        op_tokens=64,
    )


def build_model(name: str, device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    """A Llama of `name`'s shapes with random weights, built directly on `device` in `dtype`."""
    config = LlamaConfig(**SHAPES[name], max_position_embeddings=4096)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    # Random weights have no end token worth stopping at: every completion runs to length.
    model.generation_config.eos_token_id = None
    model.config.eos_token_id = None
    return model.eval().requires_grad_(False)


def random_prompts(count: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (count, PROMPT_LEN), generator=g).tolist()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def generate_tps(model: LlamaForCausalLM, prompts: list[list[int]], tokens: int) -> float:
    """HF `generate`, greedy, all `prompts` as one static batch (they share one length)."""
    device = next(model.parameters()).device
    ids = torch.tensor(prompts, device=device)
    kwargs = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)
    model.generate(ids[:, :4], attention_mask=torch.ones_like(ids[:, :4]), **kwargs)  # warm-up
    synchronize(device)
    started = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    synchronize(device)
    return (out.shape[1] - ids.shape[1]) * len(prompts) / (time.perf_counter() - started)


def engine_runs(
    model: LlamaForCausalLM, plan: Plan, prompts: list[list[int]], engine_tps: Callable
) -> dict[tuple[int, int], float]:
    """(sets, concurrency) -> engine tokens/s: one wave of `concurrency` closed-loop clients
    (two requests at concurrency 1) per pool size, the pool growing between sizes."""
    pool = patch_model(model, capacity=max(max(plan.sets) * RANK, 1))
    results: dict[tuple[int, int], float] = {}
    loaded = 0
    for sets in plan.sets:
        if sets > loaded:
            _add_sets(pool, loaded, sets - loaded)
            loaded = sets
        engine = Engine(
            model,
            eos_token_ids=(),
            max_context=PROMPT_LEN + plan.tokens + 8,
            pool=pool,
            config=EngineConfig(max_running=max(plan.concurrency)),
        )
        engine.start()
        try:
            engine_tps(engine, prompts[:2], plan.tokens, 1)  # warm-up: kernels, allocator
            for c in plan.concurrency:
                requests = prompts[: max(c, 2)]
                results[sets, c] = engine_tps(engine, requests, plan.tokens, c)
                print(f"engine, {sets} sets, concurrency {c}: {results[sets, c]:.1f} tokens/s")
        finally:
            engine.shutdown()
    return results


def _add_sets(pool: Any, first: int, count: int) -> None:
    """Random sets `first` .. `first + count - 1` at benchmarks/decode.py's key and value scales."""
    shapes = {path: (layer.in_features, layer.out_features) for path, layer in pool.layers.items()}
    g = torch.Generator().manual_seed(first)
    for s in range(first, first + count):
        tensors = random_tensors(shapes, rank=RANK, generator=g, key_scale=1.0, value_scale=0.01)
        pool.add_set(f"set{s}", tensors)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int = 20) -> float:
    """Seconds per call, after a warm-up."""
    for _ in range(3):
        fn()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - started) / repeats


@torch.inference_mode()
def routing_op(plan: Plan) -> dict[tuple[str, int], float]:
    """(path, N) -> microseconds per layer call for `op_tokens` tokens, D = O = `op_size`."""
    device, dtype, size = plan.device, plan.dtype, plan.op_size
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(plan.op_tokens, size, generator=g, device=device, dtype=dtype)
    routing = dict(top_k=LM_ROUTING.top_k, tau=LM_ROUTING.tau, threshold=LM_ROUTING.threshold)
    paths = ["dense", "torch"]
    if TritonBackend.available() and device.type == "cuda":
        paths.append("triton")
    results: dict[tuple[str, int], float] = {}
    for n in plan.slots:
        A = torch.randn(n, size, generator=g, device=device, dtype=dtype) / size**0.5
        B = torch.randn(n, size, generator=g, device=device, dtype=dtype) * 0.01
        calls: dict[str, Callable[[], Any]] = {
            "dense": lambda A=A, B=B: (x @ A.t()) @ B,
            "torch": lambda A=A, B=B: mora_delta(x, A, B, backend="torch", **routing),
            "triton": lambda A=A, B=B: mora_delta(x, A, B, backend="triton", **routing),
        }
        for path in paths:
            results[path, n] = timed(calls[path], device) * 1e6
            print(f"routing op, N={n}, {path}: {results[path, n]:.1f} us")
    return results


def report(plan: Plan, engine: dict[str, dict], generate: dict[str, float], op: dict) -> str:
    top = max(plan.concurrency)
    lines = [
        f"Greedy {plan.tokens}-token completions of random {PROMPT_LEN}-token prompts, "
        f"random {str(plan.dtype).removeprefix('torch.')} weights, device "
        f"{torch.cuda.get_device_name() if plan.device.type == 'cuda' else 'cpu'}, "
        f"torch {torch.__version__}. Pools: sets x {RANK} ranks on q/k/v/o.",
        "",
    ]
    for model, runs in engine.items():
        static = generate[model]
        lines += [
            f"**{model}**: HF `generate`, static batch {plan.static_batch}: {static:.1f} tokens/s",
            "",
            "| pool | concurrency | tokens/s | vs HF static batch | vs empty pool |",
            "|---|---:|---:|---:|---:|",
        ]
        for (sets, c), tps in runs.items():
            empty = runs[plan.sets[0], c]
            lines.append(
                f"| {sets} sets | {c} | {tps:.1f} | {tps / static:.2f}x | {tps / empty:.2f}x |"
            )
        largest = runs[plan.sets[-1], top] / runs[plan.sets[0], top]
        lines += [
            "",
            f"Targets at concurrency {top}: the {plan.sets[-1]}-set pool keeps "
            f"{100 * largest:.0f}% of empty-pool throughput (at least 85%); the engine is "
            f"{runs[plan.sets[0], top] / static:.2f}x HF's static batch (at least 3x).",
            "",
        ]
    paths = sorted({path for path, _ in op})
    lines += [
        f"Routing op, one layer, {plan.op_tokens} tokens, D = O = {plan.op_size}, "
        f"k = {LM_ROUTING.top_k} (microseconds per call):",
        "",
        "| N | " + " | ".join(paths) + " |",
        "|---:|" + "---:|" * len(paths),
    ]
    for n in plan.slots:
        lines.append(f"| {n} | " + " | ".join(f"{op[p, n]:.1f}" for p in paths) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="8b,1b", help="comma-separated: 8b, 1b")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument("--out", type=Path, help=f"results file (default {RESULTS}; smoke: none)")
    args = parser.parse_args(argv)
    plan = plan_for(args)
    engine_tps = load_engine_benchmark().engine_tps
    started = time.perf_counter()
    engine: dict[str, dict] = {}
    generate: dict[str, float] = {}
    for name in plan.models:
        model = build_model(name, plan.device, plan.dtype)
        prompts = random_prompts(
            max(plan.static_batch, max(plan.concurrency)), SHAPES[name]["vocab_size"]
        )
        generate[name] = generate_tps(model, prompts[: plan.static_batch], plan.tokens)
        print(
            f"{name}: HF generate, static batch {plan.static_batch}: {generate[name]:.1f} tokens/s"
        )
        engine[name] = engine_runs(model, plan, prompts, engine_tps)
        del model
        if plan.device.type == "cuda":
            torch.cuda.empty_cache()
    op = routing_op(plan)
    text = report(plan, engine, generate, op)
    text += f"\nWall time {time.perf_counter() - started:.0f} s.\n"
    out = args.out or (None if args.smoke else RESULTS)
    if out is None:
        print("\n" + text)
    else:
        write_report(out, "GPU benchmark", text)


if __name__ == "__main__":
    main()
