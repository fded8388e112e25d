"""The whole server (HTTP -> Ray Serve -> engine) against plain HF `generate`, on SmolLM2.

    .venv/bin/python benchmarks/server.py [--tokens 64] [--sets 10] [--cycles 6] [--out PATH]

Measures aggregate output tokens/s of greedy `max_tokens` completions (completion tokens
counted from `usage`; a request may end early at EOS) from closed-loop HTTP clients at each
concurrency, after these in-process baselines on the same model and prompts (the functions
of benchmarks/decode.py): `generate` one request at a time, and `generate` on a static
padded batch of 16, on the float32 model (and once on the int4 weights). The server runs
twice: first with float32 weights (`lm.weights: float`, concurrency 1 and 16: what the
engine alone gains), then with its default weights (`auto`: int4 for the bundled 4-bit
model) at concurrency 1, 4, 32 and 16; then `--sets` random expert sets x 16 ranks on
q/k/v/o are hot-loaded through POST /v1/experts and concurrency 16 runs again. That pair
(empty pool, loaded pool, back to back) is measured `--cycles` times, alternate pairs in the
other order (loaded, then the sets retired through DELETE /v1/experts, then empty; retired
slots are reused, so every loaded run scores the same 160 slots per layer), and the pool's
ratio is the median of the pairs' ratios: a shared machine's speed drifts within minutes by
more than the pool costs, and pairs measured close together cancel most of that
drift. Last, a server with the prefix
cache off does the same (the prompts cycle through 8 chat questions, so with the cache later
requests reuse their whole question's blocks, and every request the chat template's first
block).

Every run first sends each of its distinct prompts once (1 token) and measures after that:
the steady state of a server whose prefix cache has seen its prompts. Without it, the run
just after a hot-load would pay cold prefills the empty-pool run before it did not (a loaded
pool is a new pool version, and cached blocks belong to one version).

The server is started with `serving.cluster.launcher.start` on free ports with CLIP off; torch in
the LM replica uses as many threads as the in-process baselines (`lm.torch_threads`).
Ratios compare runs of this one process: timings drift too much between runs to compare them.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
from bench_common import HERE, load_engine_benchmark, write_report

from mora_runtime.expert_sets.synthetic import write_random_sets
from mora_runtime.models.lm import load_causal_lm

RANK = 16
RESULTS = HERE / "results" / "serving.md"
REQUESTS_PER_CLIENT = 4  # per closed-loop client and run


def unshadow_serving() -> None:
    """Run as a script, benchmarks/ is sys.path[0] and this file would be `serving`."""
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]


@dataclass
class Run:
    label: str
    tokens_per_s: float
    tokens_per_request: float | None = None
    active_ranks: float | None = None
    # (empty pool, loaded pool) runs measured back to back, for the pool's row
    pairs: list[tuple[Run, Run]] | None = None
    vs_empty: float | None = None  # this run over the empty-pool run of its own pair


def median_pair_run(pairs: list[tuple[Run, Run]]) -> Run:
    """The loaded-pool run of the pair with the median pool/empty ratio (pairs kept)."""
    ratios = [loaded.tokens_per_s / empty.tokens_per_s for empty, loaded in pairs]
    middle = sorted(range(len(pairs)), key=ratios.__getitem__)[(len(pairs) - 1) // 2]
    run = pairs[middle][1]
    run.pairs, run.vs_empty = pairs, ratios[middle]
    return run


def save_random_sets(lm, store: Path, count: int) -> list[str]:
    """Random sets as `mora learn` would save them, fingerprinted on the unpatched model."""
    return write_random_sets(
        store, count, model=lm.model, rank=RANK, value_scale=0.05, prefix="bench"
    )


def http_tps(
    base_url: str, model: str, prompts: list[list[int]], tokens: int, concurrency: int
) -> Run:
    """Closed loop: `concurrency` clients, each sending its next request when one ends."""
    queue = list(prompts)
    lock = threading.Lock()
    produced, requests, ranks = 0, 0, 0.0
    errors: list[str] = []

    def client() -> None:
        nonlocal produced, requests, ranks
        with httpx.Client(base_url=base_url, timeout=600) as http:
            while True:
                with lock:
                    if not queue or errors:
                        return
                    prompt = queue.pop()
                body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0}
                response = http.post("/v1/completions", json=body)
                with lock:
                    if response.status_code != 200:
                        errors.append(f"{response.status_code}: {response.text[:200]}")
                        return
                    out = response.json()
                    produced += out["usage"]["completion_tokens"]
                    requests += 1
                    ranks += out["mora"]["active_ranks_per_token"]

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, first: {errors[0]}")
    return Run("", produced / elapsed, produced / requests, ranks / requests)


def table(runs: dict[str, Run], args, threads: int) -> str:
    # The faster of the runs before and after the server: the conservative reference.
    one = max(runs["one"].tokens_per_s, runs["one-after"].tokens_per_s)
    static = max(runs["static"].tokens_per_s, runs["static-after"].tokens_per_s)
    targets = {"c1": ("one-at-a-time", 1.5, one), "c16": ("static 16", 1.5, static)}
    lines = [
        f"{args.tokens}-token greedy completions on SmolLM2-135M-Instruct (CPU, "
        f"{os.cpu_count()} cores, torch threads {threads}); server = HTTP -> Ray Serve "
        "ingress -> 1 LM replica, default weights (int4 for this 4-bit model) unless the "
        "row says float32; closed-loop clients, "
        f"{REQUESTS_PER_CLIENT} requests per client and run; every server run starts with "
        "each of its prompts sent once (a warm prefix cache), while `generate` prefills every "
        "prompt. Ratios are against `generate` on the float32 model and use the faster of its "
        "two runs. A pool row is the median of "
        f"{args.cycles} (empty pool, loaded pool) pairs measured back to back, alternate pairs "
        "in the other order (sets hot-loaded or retired between a pair's runs); its ratio is "
        "against the empty-pool run of its own pair.",
        "",
        "| run | tokens/s | tokens/request | active ranks/token | vs generate 1-at-a-time "
        "| vs static batch 16 | loaded / empty pool (pair) | target |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    notes = []
    for key, run in runs.items():
        tpr = f"{run.tokens_per_request:.1f}" if run.tokens_per_request else "-"
        ranks = f"{run.active_ranks:.2f}" if run.active_ranks is not None else "-"
        vs_empty = target = "-"
        if key in targets:
            name, want, base = targets[key]
            ratio = run.tokens_per_s / base
            target = f">= {want}x {name}: {'met' if ratio >= want else 'NOT met'} ({ratio:.2f}x)"
        if run.pairs is not None and run.vs_empty is not None:  # set together
            ratio = run.vs_empty
            vs_empty = f"{ratio:.2f}x"
            target = f">= 0.8x empty: {'met' if ratio >= 0.8 else 'NOT met'} ({ratio:.2f}x)"
            listed = ", ".join(
                f"{e.tokens_per_s:.1f} / {p.tokens_per_s:.1f} "
                f"({p.tokens_per_s / e.tokens_per_s:.2f}x)"
                for e, p in run.pairs
            )
            notes.append(f"- {run.label}: empty / loaded tokens/s per pair: {listed}")
        lines.append(
            f"| {run.label} | {run.tokens_per_s:.1f} | {tpr} | {ranks} | "
            f"{run.tokens_per_s / one:.2f}x | {run.tokens_per_s / static:.2f}x | {vs_empty} | "
            f"{target} |"
        )
    return "\n".join([*lines, "", *notes]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--sets", type=int, default=10)
    parser.add_argument(
        "--cycles",
        type=int,
        default=6,  # single pairs spread widely on a shared machine; several steady the median
        help="empty / loaded pool pairs at concurrency 16 (alternating order)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    unshadow_serving()
    from serving.cluster import launcher
    from serving.cluster.launcher import free_ports
    from serving.config import ServerConfig

    bench = load_engine_benchmark()
    generate_tps, prompt_ids = bench.generate_tps, bench.prompt_ids
    lm = load_causal_lm(weights="float")
    prompts = [prompt_ids(lm.tokenizer, i) for i in range(64)]
    runs: dict[str, Run] = {}

    def baselines(suffix: str, when: str, model=lm, weights: str = "float32") -> None:
        print(f"in-process baselines ({weights}, {when}) ...", flush=True)
        one = generate_tps(model, prompts[:4], args.tokens, 1)
        runs[f"one{suffix}"] = Run(f"generate {weights}, one at a time ({when})", one)
        static = generate_tps(model, prompts[:16], args.tokens, 16)
        runs[f"static{suffix}"] = Run(f"generate {weights}, static batch 16 ({when})", static)

    baselines("", "before the server")
    baselines("-int4", "before the server", load_causal_lm(weights="int4"), "int4")
    threads = torch.get_num_threads()

    root = Path(tempfile.mkdtemp(prefix="mora-bench-"))
    names = save_random_sets(lm, root / "store", args.sets)

    token = secrets.token_hex(8)
    measured: dict[str, Run] = {}

    def serve(
        weights: str,
        plan: list[tuple[str, str, int]],
        *,
        load_sets: bool,
        prefix_cache: bool = True,
        store: str = "store",
        pool_key: str = "pool",
    ) -> None:
        http_port, metrics_port = free_ports(2)
        cfg = ServerConfig.model_validate(
            {
                "port": http_port,
                "metrics_port": metrics_port,
                "expert_store": str(root / store),  # its registry.json persists loaded sets
                "admin_token": token,
                # as many torch threads as the in-process baselines
                "lm": {
                    "torch_threads": threads,
                    "weights": weights,
                    **({} if prefix_cache else {"prefix_cache_blocks": 0}),
                },
                "clip": {"enabled": False},
            }
        ).resolved()
        base_url = f"http://127.0.0.1:{http_port}"
        model = cfg.lm.served_name
        print(f"starting the server (weights: {weights}) ...", flush=True)
        launcher.start(cfg)
        try:

            def measure(label: str, concurrency: int) -> Run:
                n = max(REQUESTS_PER_CLIENT * concurrency, 8)
                print(f"{label} ...", flush=True)
                distinct = list({tuple(p): p for p in prompts[:n]}.values())
                http_tps(base_url, model, distinct, 1, concurrency)  # warm-up, see above
                run = http_tps(base_url, model, prompts[:n], args.tokens, concurrency)
                run.label = label
                print(f"  {run.tokens_per_s:.1f} tokens/s", flush=True)
                return run

            for key, label, concurrency in plan:
                measured[key] = measure(label, concurrency)
            if not load_sets:
                return
            admin = {"Authorization": f"Bearer {token}"}
            suffix = "" if prefix_cache else ", prefix cache off"
            empty_key = plan[-1][0]  # the plan ends with the empty pool at concurrency 16
            label = f"server, concurrency 16, {args.sets} sets x {RANK} ranks{suffix}"
            empty_label = f"server, concurrency 16{suffix} (again)"

            def set_pool(loaded: bool) -> None:
                for name in names:
                    if loaded:
                        response = httpx.post(
                            f"{base_url}/v1/experts",
                            json={"path": name},
                            headers=admin,
                            timeout=120,
                        )
                    else:
                        response = httpx.delete(
                            f"{base_url}/v1/experts/{name}", headers=admin, timeout=120
                        )
                    response.raise_for_status()

            # Pairs alternate their order, (empty, loaded) then (loaded, empty): a drift in one
            # direction biases alternate pairs oppositely instead of every pair alike, and the
            # pool is loaded or retired once per pair.
            pairs: list[tuple[Run, Run]] = []
            for cycle in range(args.cycles):
                if cycle % 2 == 0:
                    empty = measure(empty_label, 16) if cycle else measured[empty_key]
                    set_pool(loaded=True)
                    pairs.append((empty, measure(label, 16)))
                else:
                    loaded_run = measure(label, 16)
                    set_pool(loaded=False)
                    pairs.append((measure(empty_label, 16), loaded_run))
            measured[pool_key] = median_pair_run(pairs)
        finally:
            launcher.stop()

    serve(
        "float",
        [(f"f{c}", f"server float32, concurrency {c}", c) for c in (1, 16)],
        load_sets=False,
    )
    # 16 last: the empty-pool reference for the pool run
    plan = [(f"c{c}", f"server, concurrency {c}", c) for c in (1, 4, 32, 16)]
    serve("auto", plan, load_sets=True)
    # What reusing prompt blocks adds (the 8 questions repeat, and all share the template),
    # and the pool against the empty pool without it. A store of its own: the first one's
    # registry.json would restore the sets at start.
    save_random_sets(lm, root / "store-nocache", args.sets)
    plan = [("c16-nocache", "server, concurrency 16, prefix cache off", 16)]
    serve(
        "auto",
        plan,
        load_sets=True,
        prefix_cache=False,
        store="store-nocache",
        pool_key="pool-nocache",
    )
    baselines("-after", "after the server")
    runs.update(measured)
    order = (
        "one",
        "one-after",
        "static",
        "static-after",
        "one-int4",
        "static-int4",
        "f1",
        "f16",
        "c1",
        "c4",
        "c16",
        "c32",
        "pool",
        "c16-nocache",
        "pool-nocache",
    )
    text = table({key: runs[key] for key in order}, args, threads)
    write_report(args.out, "Serving benchmark", text)


if __name__ == "__main__":
    main()
