"""The engine with the previous KV cache (whole-cache copies on join and leave) against this
one, alternating in one process.

    .venv/bin/python benchmarks/ab_kv_cache.py OLD_CHECKOUT [--rounds 4] [--out PATH]

OLD_CHECKOUT is a checkout whose `mora_runtime/engine/kv_cache.py` still has
`BatchKVCache.merge` and `select_rows` (e.g. `git worktree add ../mora-before d86fce0`).
Separate processes differ by more than this change (where the weights land in memory, what
else ran): one engine, one model, and the two caches swapped in turn (the old module loaded
from its file, with the row surgery it came with) keep everything else equal. Closed-loop
clients at concurrency 16 and 32 send int4 SmolLM2 greedy completions of 16, 40, 64 and 112
tokens mixed, so requests join and leave the batch every few steps; it prints tokens/s per
run and the medians' ratio, and, per side, the mean time of a join (merging the prefilled
rows into the batch), of a leave (retiring finished rows) and of a decode step.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from bench_common import HERE, load_engine_benchmark, write_report

from mora_runtime.cpu.openmp import in_fresh_thread
from mora_runtime.engine import batch, core, forward, isolation
from mora_runtime.engine.params import SamplingParams
from mora_runtime.models.lm import load_causal_lm

LENGTHS = (16, 40, 64, 112)


def old_cache_class(checkout: Path) -> type:
    spec = importlib.util.spec_from_file_location(
        "old_kv_cache", checkout / "mora_runtime" / "engine" / "kv_cache.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.BatchKVCache


def old_surgery(cache_class: type):
    """The previous `_merge` and `retire_rows` (batch.py), on the previous cache."""

    def merge(engine, seqs, cache, mask) -> None:
        if engine._cache is None or not engine._running:
            engine._cache, engine._mask, engine._running = cache, mask, list(seqs)
            return
        merged, pad_old, pad_new = cache_class.merge(engine._cache, cache)
        old_mask = torch.nn.functional.pad(engine._mask, (pad_old, 0))
        new_mask = torch.nn.functional.pad(mask, (pad_new, 0))
        engine._cache, engine._mask = merged, torch.cat([old_mask, new_mask])
        engine._running = engine._running + list(seqs)

    def retire(engine, rows) -> None:
        gone = set(rows)
        for row in rows:
            seq = engine._running[row]
            if seq.snapshot is not None and engine.pool is not None:
                engine.pool.release(seq.snapshot)
        keep = [i for i in range(len(engine._running)) if i not in gone]
        engine._running = [engine._running[i] for i in keep]
        if not keep:
            engine._cache, engine._mask = None, None
            return
        index = torch.tensor(keep, device=engine.device)
        engine._cache.select_rows(index)
        engine._mask = engine._mask.index_select(0, index)
        used = engine._mask.any(dim=0).nonzero()
        dead = int(used[0]) if used.numel() else 0
        if dead:
            engine._cache.trim_left(dead)
            engine._mask = engine._mask[:, dead:]

    return merge, retire


class Timings:
    """Seconds spent per operation of the side in use ("join", "leave", "decode")."""

    def __init__(self) -> None:
        self.side = ""
        self.seconds: dict[tuple[str, str], list[float]] = {}

    def add(self, operation: str, seconds: float) -> None:
        self.seconds.setdefault((self.side, operation), []).append(seconds)

    def timed(self, operation: str, fn: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(operation, time.perf_counter() - started)

        return wrapper

    def on_step(self, timing, _per_token) -> None:  # engine thread
        if timing.decode_tokens:
            self.add("decode", timing.seconds)

    def mean_ms(self, side: str, operation: str) -> float:
        return statistics.mean(self.seconds.get((side, operation), [float("nan")])) * 1e3


def use(timings: Timings, side: str, cache_class: type, merge, retire) -> None:
    timings.side = side
    forward.BatchKVCache = cache_class
    batch._merge = timings.timed("join", merge)
    retire = timings.timed("leave", retire)
    batch.retire_rows = core.retire_rows = isolation.retire_rows = retire


def mixed_requests(prompts: list[list[int]], concurrency: int) -> list:
    return [
        (
            prompts[i % len(prompts)],
            SamplingParams(max_tokens=LENGTHS[i % 4], temperature=0.0, ignore_eos=True),
        )
        for i in range(concurrency * 4)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "ab_kv_cache.md")
    args = parser.parse_args()
    old_class = old_cache_class(args.old.resolve())
    sides = {
        "old": (old_class, *old_surgery(old_class)),
        "new": (forward.BatchKVCache, batch._merge, batch.retire_rows),
    }
    bench = load_engine_benchmark()
    lm = in_fresh_thread(load_causal_lm, weights="int4")
    prompts = [bench.prompt_ids(lm.tokenizer, i) for i in range(len(bench.QUESTIONS))]
    timings = Timings()
    engine = bench.lm_engine(lm, max_running=32, on_step=timings.on_step)
    engine.start()
    figures: dict[tuple[str, int], list[float]] = {}
    try:
        for r in range(args.rounds):
            for side in ("old", "new") if r % 2 == 0 else ("new", "old"):
                use(timings, side, *sides[side])
                for concurrency in (16, 32):
                    requests = mixed_requests(prompts, concurrency)
                    value = bench.closed_loop_tps(engine, requests, concurrency)
                    figures.setdefault((side, concurrency), []).append(value)
                    print(f"round {r + 1} {side} c={concurrency}: {value:.1f} tok/s", flush=True)
    finally:
        engine.shutdown()
    lines = [
        f"Engine tokens/s, int4 SmolLM2, greedy completions of {'/'.join(map(str, LENGTHS))} "
        f"tokens mixed, one process, old and new cache alternating, {args.rounds} rounds "
        f"(old = `{args.old.resolve().name}`).",
        "",
        "| concurrency | old | new | new/old | old runs | new runs |",
        "|---:|---:|---:|---:|---|---|",
    ]
    for concurrency in (16, 32):
        old, new = figures[("old", concurrency)], figures[("new", concurrency)]
        lines.append(
            f"| {concurrency} | {statistics.median(old):.1f} | {statistics.median(new):.1f} | "
            f"{statistics.median(new) / statistics.median(old):.2f}x | "
            f"{', '.join(f'{v:.0f}' for v in old)} | {', '.join(f'{v:.0f}' for v in new)} |"
        )
    lines += [
        "",
        "Mean ms per operation, all runs of a side:",
        "",
        "| operation | old | new | new/old |",
        "|---|---:|---:|---:|",
    ]
    for operation in ("join", "leave", "decode"):
        old_ms, new_ms = (timings.mean_ms(side, operation) for side in ("old", "new"))
        lines.append(f"| {operation} | {old_ms:.2f} | {new_ms:.2f} | {new_ms / old_ms:.2f}x |")
    write_report(args.out, "KV cache: whole-cache copies against row surgery", "\n".join(lines))


if __name__ == "__main__":
    main()
