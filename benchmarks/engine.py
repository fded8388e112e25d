"""The engine against plain HF `generate`, on the default SmolLM2, in one process.

    .venv/bin/python benchmarks/engine.py [--tokens 64] [--sets 10]

Prints output tokens/s for: `generate` one request at a time, `generate` on a static padded
batch of 16, the engine at concurrency 1 / 16 / 32, and the engine at concurrency 16 with a
pool of `--sets` expert sets x 16 ranks on q/k/v/o. Ratios are against runs in this process.
"""

from __future__ import annotations

import argparse
import threading
import time

import torch

from mora_runtime.engine import Engine, EngineConfig, TokenEvent
from mora_runtime.lm import load_causal_lm
from mora_runtime.patching import patch_model, unpatch_model
from mora_runtime.sampling import SamplingParams

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


def engine_tps(engine: Engine, prompts: list[list[int]], tokens: int, concurrency: int) -> float:
    """Closed loop: `concurrency` clients, each sending its next request when one ends."""
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    queue = list(prompts)
    lock = threading.Lock()
    produced = 0

    def client() -> None:
        nonlocal produced
        while True:
            with lock:
                if not queue:
                    return
                prompt = queue.pop()
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
    g = torch.Generator().manual_seed(0)
    for s in range(sets):
        tensors = {
            path: (
                torch.randn(rank, layer.in_features, generator=g) / layer.in_features**0.5,
                torch.randn(rank, layer.out_features, generator=g) * 0.01,
            )
            for path, layer in pool.layers.items()
        }
        pool.add_set(f"set{s}", tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--sets", type=int, default=10)
    parser.add_argument("--requests", type=int, default=32)
    args = parser.parse_args()
    lm = load_causal_lm()
    prompts = [prompt_ids(lm.tokenizer, i) for i in range(args.requests)]
    results: dict[str, float] = {}
    results["generate, one at a time"] = generate_tps(lm, prompts[:4], args.tokens, 1)
    results["generate, static batch 16"] = generate_tps(lm, prompts[:16], args.tokens, 16)

    def run_engine(label: str, concurrency: int, pool=None) -> None:
        engine = Engine(
            lm.model,
            eos_token_ids=lm.eos_token_ids,
            max_context=lm.max_context,
            pad_token_id=lm.tokenizer.pad_token_id,
            pool=pool,
            config=EngineConfig(max_running=32),
        )
        engine.start()
        try:
            n = max(concurrency * 2, 4) if concurrency > 1 else 4
            results[label] = engine_tps(engine, prompts[:n], args.tokens, concurrency)
        finally:
            engine.shutdown()

    for c in (1, 16, 32):
        run_engine(f"engine, concurrency {c}", c)
    pool = patch_model(lm.model)
    run_engine("engine, concurrency 16, empty pool", 16, pool)
    random_sets(pool, args.sets)
    run_engine(f"engine, concurrency 16, {args.sets} sets x 16 ranks", 16, pool)
    unpatch_model(lm.model)

    one, static = results["generate, one at a time"], results["generate, static batch 16"]
    print(f"\n{args.tokens}-token greedy completions, torch threads {torch.get_num_threads()}\n")
    print("| run | tokens/s | vs generate 1-at-a-time | vs static batch 16 |")
    print("|---|---:|---:|---:|")
    for label, tps in results.items():
        print(f"| {label} | {tps:.1f} | {tps / one:.2f}x | {tps / static:.2f}x |")


if __name__ == "__main__":
    main()
