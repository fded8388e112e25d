"""Two checkouts of this repository measured against each other, alternating, on one machine.

    .venv/bin/python benchmarks/ab_checkouts.py OLD_DIR NEW_DIR [--rounds 3] [--out PATH]

A refactor must keep performance: this runs the same engine measurement (int4 SmolLM2,
64-token greedy completions, closed-loop clients at concurrency 1 and 16, 16 with
completion lengths of 16 to 112 tokens mixed (requests join and leave every few steps), and
16 with 10 random sets x 16 ranks on q/k/v/o) and each checkout's own routing benchmark
(`--quick`), in fresh subprocesses whose working directory and import path are the
checkout, alternating OLD/NEW (then NEW/OLD) each round because timings drift within
minutes. Both checkouts use this interpreter and its packages; each its own cache,
`<checkout>/.cache/mora` (prepare it there first; a copy of the models directory will
do). It prints the median of each figure per checkout and the NEW/OLD ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from bench_common import HERE, write_report

# Runs inside a checkout. Module paths moved between versions: try the packaged layout first.
ENGINE_SNIPPET = r"""
import json, threading, time, torch
try:
    from mora_runtime.cpu.openmp import in_fresh_thread
    from mora_runtime.engine.core import Engine
    from mora_runtime.engine.params import SamplingParams
    from mora_runtime.engine.types import EngineConfig
    from mora_runtime.experts.patching import patch_model
    from mora_runtime.models.lm import load_causal_lm
except ImportError:
    from mora_runtime.openmp import in_fresh_thread
    from mora_runtime.engine import Engine, EngineConfig
    from mora_runtime.sampling import SamplingParams
    from mora_runtime.patching import patch_model
    from mora_runtime.lm import load_causal_lm

TOKENS = 64
QUESTIONS = ["Explain why the sky is blue.", "List three uses of a paperclip.",
             "Describe the water cycle.", "What are prime numbers?"]
lm = in_fresh_thread(load_causal_lm, weights="int4")
tok = lm.tokenizer
prompts = []
for i in range(32):
    text = tok.apply_chat_template([{"role": "user", "content": QUESTIONS[i % 4]}],
                                   add_generation_prompt=True, tokenize=False)
    prompts.append(tok(text, add_special_tokens=False)["input_ids"])

def tps(pool, concurrency, mixed=False):
    engine = Engine(lm.model, eos_token_ids=lm.eos_token_ids, max_context=lm.max_context,
                    pad_token_id=tok.pad_token_id, pool=pool, config=EngineConfig(max_running=32))
    engine.start()
    # mixed: lengths 16-112, so rows join and leave the batch every few steps
    lengths = (16, 40, 64, 112) if mixed else (TOKENS,)
    count = concurrency * 4 if mixed else max(concurrency * 2, 4)
    queue = [(prompts[i % len(prompts)],
              SamplingParams(max_tokens=lengths[i % len(lengths)], temperature=0.0,
                             ignore_eos=True)) for i in range(count)]
    lock, produced = threading.Lock(), [0]
    def client():
        while True:
            with lock:
                if not queue:
                    return
                prompt, params = queue.pop()
            events = engine.generate(prompt, params)
            with lock:
                produced[0] += sum(e.token_id is not None for e in events)
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads: t.start()
    for t in threads: t.join()
    engine.shutdown()
    return produced[0] / (time.perf_counter() - start)

def add_sets(pool):
    g = torch.Generator().manual_seed(0)
    for s in range(10):
        pool.add_set(f"set{s}", {
            p: (torch.randn(16, l.in_features, generator=g) / l.in_features**0.5,
                torch.randn(16, l.out_features, generator=g) * 0.01)
            for p, l in pool.layers.items()})

out = {"engine c=1": tps(None, 1), "engine c=16": tps(None, 16),
       "engine c=16, mixed lengths": tps(None, 16, mixed=True)}
pool = in_fresh_thread(patch_model, lm.model)
in_fresh_thread(add_sets, pool)
out["engine c=16, 10 sets x 16 ranks"] = tps(pool, 16)
print("RESULT " + json.dumps(out))
"""


def run(checkout: Path, args: list[str]) -> str:
    env = dict(os.environ, PYTHONPATH=str(checkout), MORA_CACHE=str(checkout / ".cache" / "mora"))
    proc = subprocess.run(
        [sys.executable, *args], cwd=checkout, env=env, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{checkout}: {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def engine_figures(checkout: Path) -> dict[str, float]:
    line = next(
        ln for ln in run(checkout, ["-c", ENGINE_SNIPPET]).splitlines() if ln.startswith("RESULT ")
    )
    return json.loads(line.removeprefix("RESULT "))


def routing_table(checkout: Path) -> str:
    script = next(
        p
        for p in (checkout / "benchmarks/routing.py", checkout / "benchmarks/experts.py")
        if p.exists()
    )
    out = run(checkout, [str(script), "--quick"])
    # The script prints rows as it goes, then the whole table under its legend: keep the table.
    start = out.rfind("D = O")
    return out[start:] if start >= 0 else out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "ab_checkouts.md")
    args = parser.parse_args()
    sides = {"old": args.old.resolve(), "new": args.new.resolve()}
    figures: dict[str, dict[str, list[float]]] = {"old": {}, "new": {}}
    routing: dict[str, list[str]] = {"old": [], "new": []}
    for r in range(args.rounds):
        order = ("old", "new") if r % 2 == 0 else ("new", "old")
        for side in order:
            for label, value in engine_figures(sides[side]).items():
                figures[side].setdefault(label, []).append(value)
            routing[side].append(routing_table(sides[side]))
            print(
                f"round {r + 1} {side}: "
                + ", ".join(f"{k} {v[-1]:.1f}" for k, v in figures[side].items()),
                flush=True,
            )
    lines = [
        f"Engine tokens/s (int4 SmolLM2, 64-token greedy completions), median of {args.rounds} "
        "alternating rounds; old = "
        f"`{sides['old'].name}`, new = `{sides['new'].name}`.",
        "",
        "| run | old | new | new/old | old runs | new runs |",
        "|---|---:|---:|---:|---|---|",
    ]
    for label in figures["old"]:
        old, new = figures["old"][label], figures["new"][label]
        lines.append(
            f"| {label} | {statistics.median(old):.1f} | {statistics.median(new):.1f} | "
            f"{statistics.median(new) / statistics.median(old):.2f}x | "
            f"{', '.join(f'{v:.0f}' for v in old)} | {', '.join(f'{v:.0f}' for v in new)} |"
        )
    for side in ("old", "new"):
        lines += [
            "",
            f"Routing benchmark (`--quick`), {side}, last round:",
            "",
            "```",
            routing[side][-1].strip(),
            "```",
        ]
    text = "\n".join(lines) + "\n"
    print(text)
    write_report(args.out, "Two checkouts, alternating", text)


if __name__ == "__main__":
    main()
