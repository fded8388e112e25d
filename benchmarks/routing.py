"""Routing fast path vs the authors' dense computation vs the base nn.Linear alone.

The fast path is `mora_delta` with the backend a served forward gets (mora_runtime/backends:
on an AVX2 CPU the fused extension, csrc/expert_layer.cpp); the tensor path
(`backend="torch"`, what CUDA and training use) is timed beside it.

    .venv/bin/python benchmarks/routing.py [--quick] [--out benchmarks/results/experts.md]

Every ratio compares timings taken in this one process (the machine is shared and noisy).
Tokens are drawn around the centres of 10 synthetic "tasks"; each expert set's keys point at
its task's centre, so a token activates a few experts of its own task, as MoRA intends.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch
from torch.utils import benchmark

from mora_runtime.experts.defaults import LM_ROUTING
from mora_runtime.experts.routing import mora_delta, route

D = O = 576  # SmolLM2-135M hidden size
TAU, THRESHOLD = LM_ROUTING.tau, LM_ROUTING.threshold


def dense_delta(x, A, B, *, top_k, tau, threshold):
    """The authors' approach: both matmuls dense, routing as a [T, N] weight matrix."""
    z = x @ A.t()  # [T, N]
    s = z / z.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    vals, idx = s.topk(min(max(top_k, 2), A.shape[0]), dim=-1)
    w = torch.softmax(vals / tau, dim=-1) * (vals >= threshold)
    weights = torch.zeros_like(z).scatter(-1, idx, w)  # [T, N]
    return (weights * z) @ B  # [T, N] x [N, O]


def workload(num_tokens: int, num_experts: int, seed: int = 0):
    """Keys are random unit directions in sets of 16 (one set per learned task); a token of
    task j mixes a few of set j's keys, so it activates some of its own experts and stays
    quiet on the others."""
    g = torch.Generator().manual_seed(seed)
    A = torch.nn.functional.normalize(torch.randn(num_experts, D, generator=g), dim=-1)
    B = torch.randn(num_experts, O, generator=g) * 0.02
    sets = max(1, num_experts // 16)
    task = torch.randint(0, sets, (num_tokens,), generator=g)
    picks = task.unsqueeze(1) * 16 + torch.randint(
        0, min(16, num_experts), (num_tokens, 3), generator=g
    )
    x = (
        A[picks.clamp_max(num_experts - 1)].sum(1) * 6
        + torch.randn(num_tokens, D, generator=g) * 0.3
    )
    return x, A, B


def time_it(fn, min_run_time: float) -> float:
    return (
        benchmark.Timer("fn()", globals={"fn": fn})
        .blocked_autorange(min_run_time=min_run_time)
        .median
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter timing windows")
    parser.add_argument("--out", type=Path, help="also write the Markdown table here")
    args = parser.parse_args()
    min_time = 0.05 if args.quick else 0.3

    base = torch.nn.Linear(D, O)
    rows = [
        "| N | top_k | T | active ranks/token | fast vs dense (speed-up) "
        "| tensor path vs dense | fast delta / base linear | base+fast / base |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    torch.set_grad_enabled(False)
    for num_experts, top_k, num_tokens in itertools.product(
        [16, 160, 640, 2560], [8, 16], [1, 16, 256]
    ):
        x, A, B = workload(num_tokens, num_experts)
        kw = dict(top_k=top_k, tau=TAU, threshold=THRESHOLD)
        got, want = mora_delta(x, A, B, **kw), dense_delta(x, A, B, **kw)
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
        active = route(x @ A.t(), **kw).active_per_token.float().mean().item()
        t_base = time_it(lambda: base(x), min_time)  # noqa: B023
        t_dense = time_it(lambda: dense_delta(x, A, B, **kw), min_time)  # noqa: B023
        t_fast = time_it(lambda: mora_delta(x, A, B, **kw), min_time)  # noqa: B023
        t_tensor = time_it(
            lambda: mora_delta(x, A, B, backend="torch", **kw),  # noqa: B023
            min_time,
        )
        rows.append(
            f"| {num_experts} | {top_k} | {num_tokens} | {active:.2f} | "
            f"{t_dense / t_fast:.2f}x | {t_dense / t_tensor:.2f}x | {t_fast / t_base:.2f} | "
            f"{(t_base + t_fast) / t_base:.2f} |"
        )
        print(rows[-1], flush=True)
    table = "\n".join(rows)
    print(
        f"\nD = O = {D}, tau = {TAU}, threshold = {THRESHOLD}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads\n\n{table}"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
