"""The engine against plain HF `generate`, on the default SmolLM2, in one process.

    .venv/bin/python benchmarks/decode.py [--tokens 64] [--sets 10] [--out PATH]

Prints output tokens/s of greedy `--tokens` completions for: `generate` one request at a
time and on a static padded batch of 16 (the float32 model a user would otherwise run,
and the same on the int4 weights the server serves by default), the engine at concurrency
1 / 16 / 32 on float32 and on int4 weights, and the engine at concurrency 16 with a pool of
`--sets` expert sets x 16 ranks on q/k/v/o. Ratios are against runs in this process.

It also measures what int4 weights cost in accuracy against the float32 model on a fixed
text, every position through the int4 kernels (mean KL of next-token distributions, top-1
agreement, perplexity), and how many greedy tokens the served int4 model (float prefill,
int4 decode) agrees on with the float32 one before they first differ.
"""

from __future__ import annotations

import argparse
import math
import threading
import time
from pathlib import Path

import torch
from bench_common import write_report

from mora_runtime.cpu.openmp import in_fresh_thread
from mora_runtime.engine.core import Engine
from mora_runtime.engine.params import SamplingParams
from mora_runtime.engine.types import EngineConfig, TokenEvent
from mora_runtime.expert_sets.synthetic import random_tensors
from mora_runtime.experts.patching import patch_model, unpatch_model
from mora_runtime.models.lm import LoadedLM, load_causal_lm
from mora_runtime.models.quantize import set_prefill_float

RESULTS = Path(__file__).resolve().parent / "results" / "engine.md"
QUESTIONS = [
    "Write a short story about a robot learning to paint.",
    "Explain why the sky is blue.",
    "List three uses of a paperclip.",
    "What is the capital of France and why is it famous?",
    "Describe the water cycle.",
    "Give me a recipe for pancakes.",
    "What are prime numbers?",
    "Summarise the plot of Hamlet.",
]
QUALITY_TEXT = (
    "The water cycle describes how water evaporates from the surface of the earth, rises into "
    "the atmosphere, cools and condenses into clouds, and falls again as rain or snow. Rivers "
    "carry the water back to the oceans, where the cycle begins again. In 1492, Columbus "
    "sailed across the Atlantic Ocean. Photosynthesis is the process by which green plants "
    "use sunlight to make food from carbon dioxide and water. def fibonacci(n):\n    if n < 2:"
    "\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"
)


def prompt_ids(tokenizer, i: int) -> list[int]:
    messages = [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def generate_tps(lm, prompts: list[list[int]], tokens: int, batch: int) -> float:
    model, pad = lm.model, lm.tokenizer.pad_token_id
    produced, started = 0, time.perf_counter()
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        width = max(map(len, chunk))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                pad_token_id=pad,
            )
        produced += (out.shape[1] - width) * len(chunk)
    return produced / (time.perf_counter() - started)


def lm_engine(lm: LoadedLM, *, pool=None, on_step=None, **config) -> Engine:
    """An engine over `lm` (its own EOS ids, context and pad id), not started; `config` are
    `EngineConfig` fields."""
    return Engine(
        lm.model,
        eos_token_ids=lm.eos_token_ids,
        max_context=lm.max_context,
        pad_token_id=lm.tokenizer.pad_token_id or 0,
        pool=pool,
        config=EngineConfig(**config),
        on_step=on_step,
    )


def engine_tps(engine: Engine, prompts: list[list[int]], tokens: int, concurrency: int) -> float:
    """Closed loop: `concurrency` clients, each sending its next request when one ends."""
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    return closed_loop_tps(engine, [(prompt, params) for prompt in prompts], concurrency)


def closed_loop_tps(
    engine: Engine, requests: list[tuple[list[int], SamplingParams]], concurrency: int
) -> float:
    """Generated tokens/s of `requests` from `concurrency` clients, each sending its next
    request when one ends."""
    queue = list(requests)
    lock = threading.Lock()
    produced = 0

    def client() -> None:
        nonlocal produced
        while True:
            with lock:
                if not queue:
                    return
                prompt, params = queue.pop()
            events: list[TokenEvent] = engine.generate(prompt, params)
            with lock:
                produced += sum(e.token_id is not None for e in events)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return produced / (time.perf_counter() - started)


def random_sets(pool, sets: int, rank: int = 16) -> None:
    shapes = {path: (layer.in_features, layer.out_features) for path, layer in pool.layers.items()}
    g = torch.Generator().manual_seed(0)
    for s in range(sets):
        tensors = random_tensors(shapes, rank=rank, generator=g, key_scale=1.0, value_scale=0.01)
        pool.add_set(f"set{s}", tensors)


def greedy_ids(lm: LoadedLM, prompt: torch.Tensor, tokens: int) -> list[int]:
    out = lm.model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=tokens,
        min_new_tokens=tokens,
        do_sample=False,
        repetition_penalty=1.0,
        pad_token_id=lm.tokenizer.pad_token_id,
    )
    return out[0, prompt.shape[1] :].tolist()


@torch.inference_mode()
def quality(reference: LoadedLM, other: LoadedLM, tokens: int) -> dict[str, float]:
    """How far `other`'s next-token distributions are from `reference`'s on QUALITY_TEXT, and
    how many greedy tokens of the chat prompts they agree on before the first difference."""
    ids = reference.tokenizer(QUALITY_TEXT, return_tensors="pt")["input_ids"]
    ref = reference.model(ids).logits[0, :-1].float().log_softmax(-1)  # [n, V]
    set_prefill_float(other.model, False)  # every position through the int4 kernels
    got = other.model(ids).logits[0, :-1].float().log_softmax(-1)
    set_prefill_float(other.model, True)
    targets = ids[0, 1:]
    prefixes = []
    for i in range(len(QUESTIONS)):
        prompt = torch.tensor([prompt_ids(reference.tokenizer, i)])
        a, b = (greedy_ids(lm, prompt, tokens) for lm in (reference, other))
        differ = (j for j, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
        prefixes.append(next(differ, tokens))
    return {
        "kl": float((ref.exp() * (ref - got)).sum(-1).mean()),
        "top1": float((ref.argmax(-1) == got.argmax(-1)).float().mean()),
        "ppl_reference": math.exp(float(-ref.gather(-1, targets[:, None]).mean())),
        "ppl": math.exp(float(-got.gather(-1, targets[:, None]).mean())),
        "greedy_identical": sum(p == tokens for p in prefixes) / len(prefixes),
        "greedy_prefix": sum(prefixes) / len(prefixes),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--sets", type=int, default=10)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    # Every torch call of this (main) thread runs on a thread that ends with it: only the
    # engine thread may keep a torch thread pool alive (mora_runtime/cpu/openmp.py).
    models = {
        name: in_fresh_thread(load_causal_lm, weights=weights)
        for name, weights in (("float32", "float"), ("int4", "int4"))
    }
    prompts = [prompt_ids(models["float32"].tokenizer, i) for i in range(args.requests)]
    results: dict[str, float] = {}

    def run_engine(label: str, lm: LoadedLM, concurrency: int, pool=None) -> None:
        engine = lm_engine(lm, pool=pool, max_running=32)
        engine.start()
        try:
            n = max(concurrency * 2, 4) if concurrency > 1 else 4
            results[label] = engine_tps(engine, prompts[:n], args.tokens, concurrency)
        finally:
            engine.shutdown()
        print(f"{label}: {results[label]:.1f} tokens/s", flush=True)

    for name, lm in models.items():
        for batch in (1, 16):
            label = f"generate {name}, " + ("one at a time" if batch == 1 else "static batch 16")
            count = 4 if batch == 1 else 16
            results[label] = in_fresh_thread(generate_tps, lm, prompts[:count], args.tokens, batch)
            print(f"{label}: {results[label]:.1f} tokens/s", flush=True)
        for c in (1, 16, 32):
            run_engine(f"engine {name}, concurrency {c}", lm, c)
    lm = models["int4"]
    pool = in_fresh_thread(patch_model, lm.model)
    run_engine("engine int4, concurrency 16, empty pool", lm, 16, pool)
    in_fresh_thread(random_sets, pool, args.sets)
    run_engine(f"engine int4, concurrency 16, {args.sets} sets x 16 ranks", lm, 16, pool)
    in_fresh_thread(unpatch_model, lm.model)
    q = in_fresh_thread(quality, models["float32"], models["int4"], args.tokens)

    one = results["generate float32, one at a time"]
    static = results["generate float32, static batch 16"]
    empty = results["engine int4, concurrency 16, empty pool"]
    lines = [
        f"{args.tokens}-token greedy completions on SmolLM2-135M-Instruct, CPU, torch threads "
        f"{torch.get_num_threads()}; baselines: HF `generate` on the float32 model.",
        "",
        "| run | tokens/s | vs generate 1-at-a-time | vs static batch 16 | vs empty pool |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, tps in results.items():
        pooled = label.startswith("engine int4, concurrency 16,")
        vs_empty = f"{tps / empty:.2f}x" if pooled else "-"
        row = f"| {label} | {tps:.1f} | {tps / one:.2f}x | {tps / static:.2f}x | {vs_empty} |"
        lines.append(row)
    lines += [
        "",
        f"int4 against float32: mean KL {q['kl']:.4f} nats/token, top-1 agreement "
        f"{100 * q['top1']:.1f}%, perplexity {q['ppl']:.2f} vs {q['ppl_reference']:.2f} on a "
        f"{len(QUALITY_TEXT)}-character text; greedy completions of the {len(QUESTIONS)} "
        f"questions identical for {100 * q['greedy_identical']:.0f}% of them, first "
        f"difference after {q['greedy_prefix']:.1f} tokens on average.",
    ]
    write_report(args.out, "Engine benchmark", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
