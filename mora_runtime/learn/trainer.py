"""Learn one task as a new expert set beside a frozen pool (docs/spec.md "Continual learning").

Per task: `r` new rank-1 experts per adapted module (keys kaiming-uniform with a = sqrt(5),
values zero), installed beside the pool with `backends.trainable_experts` so they share the
normalisation, top-k and softmax with every frozen expert exactly as they will once served;
only they receive gradients. AdamW (betas 0.9 / 0.9999, no weight decay), cosine schedule
without warm-up. The result becomes an `ExpertSet` (the runtime file format) whose metadata
carries the routing defaults, the scale and a training summary.

`optimize` is the loop itself, shared with the LoRA baselines of the evaluation.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mora_runtime.expert_sets.fingerprint import base_fingerprint
from mora_runtime.expert_sets.format import ExpertSet, ExpertSetError, ExpertSetMeta
from mora_runtime.expert_sets.store import load_expert_set
from mora_runtime.experts.backends.trainable import trainable_experts
from mora_runtime.experts.context import ForwardContext, forward_context
from mora_runtime.experts.defaults import CLIP_ROUTING, LM_ROUTING
from mora_runtime.experts.pool import ExpertPool
from mora_runtime.experts.slots import RoutingConfig

logger = logging.getLogger(__name__)

ADAM_BETAS = (0.9, 0.9999)
LOSS_CURVE_POINTS = 200  # the stored curve is averaged down to at most this many points

Experts = dict[str, tuple[Tensor, Tensor]]  # module path -> (A [r, D], B [r, O])


@dataclass(frozen=True)
class LearnConfig:
    """Hyper-parameters of one task (defaults: docs/spec.md's LLM settings; routing from
    mora_runtime/experts/defaults.py)."""

    rank: int = 8
    top_k: int = LM_ROUTING.top_k
    tau: float = LM_ROUTING.tau
    threshold: float = LM_ROUTING.threshold
    scale: float = 1.0
    steps: int = 200
    lr: float = 5e-4
    batch_size: int = 8
    seed: int = 0
    max_length: int = 256  # LM tokens per example (longer ones lose the start of the prompt)

    def __post_init__(self) -> None:
        for name in ("rank", "top_k", "steps", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.tau > 0 or not self.lr > 0:
            raise ValueError("tau and lr must be positive")
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [-1, 1], got {self.threshold}")

    @property
    def routing(self) -> RoutingConfig:
        return RoutingConfig(self.top_k, self.tau, self.threshold)

    def with_overrides(self, **overrides: Any) -> LearnConfig:
        """A copy with every override that is not None."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


LM_DEFAULTS = LearnConfig()
# CLIP (ViT) settings of docs/spec.md; scale 1 like the default CLIP's serving config.
CLIP_DEFAULTS = LearnConfig(
    rank=16,
    top_k=CLIP_ROUTING.top_k,
    tau=CLIP_ROUTING.tau,
    threshold=CLIP_ROUTING.threshold,
    batch_size=64,
)


@dataclass(frozen=True)
class TrainLog:
    """What a training run did: the stored part of an expert set's training summary."""

    steps: int
    seconds: float
    losses: tuple[float, ...] = field(repr=False)

    @property
    def final_loss(self) -> float:
        tail = self.losses[-max(1, len(self.losses) // 20) :]
        return sum(tail) / len(tail)

    def summary(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "seconds": round(self.seconds, 2),
            "seconds_per_step": round(self.seconds / max(1, self.steps), 4),
            "first_loss": round(self.losses[0], 5) if self.losses else None,
            "final_loss": round(self.final_loss, 5) if self.losses else None,
            "loss_curve": downsample(self.losses, LOSS_CURVE_POINTS),
        }


def downsample(values: Sequence[float], points: int) -> list[float]:
    """Mean of equal consecutive chunks, so that at most `points` values remain."""
    if len(values) <= points:
        return [round(v, 5) for v in values]
    chunk = math.ceil(len(values) / points)
    return [
        round(sum(values[i : i + chunk]) / len(values[i : i + chunk]), 5)
        for i in range(0, len(values), chunk)
    ]


def auto_threads() -> int:
    """Intra-op threads to use: the cores that other processes leave free (at least one).

    OpenMP threads that share a core with another busy process spin at every barrier, so a
    thread on a busy core slows every step down far more than it adds (docs/performance.md,
    Threads). The load average is read before this process starts working, so it counts only
    the others."""
    cores = torch.get_num_threads()
    try:
        busy = os.getloadavg()[0]
    except OSError:  # not available on this platform
        return cores
    return max(1, min(cores, cores - round(busy)))


@contextlib.contextmanager
def thread_budget(threads: int | None = None) -> Iterator[int]:
    """Run the block with `threads` intra-op threads (None: `auto_threads()`)."""
    previous = torch.get_num_threads()
    chosen = auto_threads() if threads is None else max(1, threads)
    torch.set_num_threads(chosen)
    logger.info("using %d intra-op thread(s) of %d", chosen, previous)
    try:
        yield chosen
    finally:
        torch.set_num_threads(previous)


def cosine_factor(step: int, steps: int) -> float:
    """Learning-rate factor of step `step` (0-based): cosine from 1 towards 0, no warm-up."""
    return 0.5 * (1.0 + math.cos(math.pi * step / steps))


def optimize(
    params: Sequence[nn.Parameter],
    step_loss: Callable[[int], Tensor],
    cfg: LearnConfig,
    *,
    desc: str = "learning",
    progress: bool = True,
) -> TrainLog:
    """Run `cfg.steps` AdamW steps of `step_loss(step)` over `params`; Ctrl-C propagates."""
    from tqdm.auto import tqdm

    optimizer = torch.optim.AdamW(
        list(params), lr=cfg.lr, betas=ADAM_BETAS, weight_decay=0.0, foreach=False
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_factor(step, cfg.steps)
    )
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for step in bar:
        loss = step_loss(step)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: the loss became {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
    bar.close()
    return TrainLog(cfg.steps, time.perf_counter() - start, tuple(losses))


def init_experts(
    shapes: Mapping[str, tuple[int, int]], rank: int, generator: torch.Generator
) -> dict[str, tuple[nn.Parameter, nn.Parameter]]:
    """Keys kaiming-uniform (a = sqrt(5), as nn.Linear initialises [r, D]); values zero.

    Modules are initialised in sorted order, so the same seed gives the same experts."""
    experts = {}
    for path in sorted(shapes):
        d, o = shapes[path]
        A = torch.empty(rank, d)  # [r, D]
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
        experts[path] = (nn.Parameter(A), nn.Parameter(torch.zeros(rank, o)))  # B [r, O]
    return experts


def pool_shapes(pool: ExpertPool) -> dict[str, tuple[int, int]]:
    return {path: (layer.in_features, layer.out_features) for path, layer in pool.layers.items()}


def learn_experts(
    pool: ExpertPool,
    loss_fn: Callable[[int], Tensor],
    cfg: LearnConfig,
    *,
    desc: str = "learning",
    progress: bool = True,
) -> tuple[Experts, TrainLog]:
    """Train `cfg.rank` new experts per pool layer beside the frozen pool.

    `loss_fn(step)` runs the patched model on one batch and returns the task loss; it runs in
    a training context (no threshold pruning). The pool itself is never modified: the new
    experts are returned (detached, on the CPU) for the caller to save or load.
    """
    generator = torch.Generator().manual_seed(cfg.seed)
    experts = init_experts(pool_shapes(pool), cfg.rank, generator)
    device, dtype = pool.device, pool.dtype
    for A, B in experts.values():
        A.data, B.data = A.data.to(device, dtype), B.data.to(device, dtype)

    def step_loss(step: int) -> Tensor:
        ctx = ForwardContext([pool.latest()], training=True, record=False)
        with forward_context(pool, ctx):
            return loss_fn(step)

    with trainable_experts(pool, experts, scale=cfg.scale):
        params = [p for pair in experts.values() for p in pair]
        log = optimize(params, step_loss, cfg, desc=desc, progress=progress)
    out = {p: (A.detach().cpu().clone(), B.detach().cpu().clone()) for p, (A, B) in experts.items()}
    return out, log


# --- expert sets -------------------------------------------------------------------------


def build_expert_set(
    model: nn.Module,
    name: str,
    model_kind: str,
    experts: Experts,
    cfg: LearnConfig,
    *,
    class_names: Sequence[str] = (),
    prompt_template: str | None = None,
    training: Mapping[str, Any] | None = None,
) -> ExpertSet:
    """The runtime file format of freshly learned experts (fingerprint over their modules)."""
    modules = {path: (A.shape[1], B.shape[1]) for path, (A, B) in experts.items()}
    meta = ExpertSetMeta(
        name=name,
        model_kind=model_kind,
        base_model=base_fingerprint(model, modules),
        target_modules=tuple(sorted(experts)),
        rank=cfg.rank,
        top_k=cfg.top_k,
        tau=cfg.tau,
        threshold=cfg.threshold,
        scale=cfg.scale,
        class_names=tuple(class_names),
        prompt_template=prompt_template,
        training=dict(training or {}),
    )
    return ExpertSet(meta, dict(experts))


def training_summary(
    cfg: LearnConfig, log: TrainLog, data_hash: str, **extra: Any
) -> dict[str, Any]:
    hyper = {k: v for k, v in asdict(cfg).items() if k not in ("top_k", "tau", "threshold")}
    return {
        "method": "mora",
        **hyper,
        "optimizer": {"name": "AdamW", "betas": list(ADAM_BETAS), "weight_decay": 0.0},
        "schedule": "cosine, no warm-up",
        **log.summary(),
        "data_hash": data_hash,
        "torch_version": torch.__version__,
        **extra,
    }


def add_to_pool(pool: ExpertPool, expert_set: ExpertSet) -> None:
    meta = expert_set.meta
    pool.add_set(meta.name, expert_set.tensors, scale=meta.scale, meta=meta.pool_meta())


def load_pool_sets(
    model: nn.Module, pool: ExpertPool, directories: Sequence[str | Path], model_kind: str
) -> list[ExpertSet]:
    """Load earlier expert sets (fully validated against `model`) into the frozen pool."""
    shapes = pool_shapes(pool)

    def expected(meta: ExpertSetMeta) -> dict[str, Any]:
        unknown = sorted(set(meta.target_modules) - set(shapes))
        if unknown:
            raise ExpertSetError(f"set {meta.name!r} adapts modules the model lacks: {unknown[:5]}")
        return base_fingerprint(model, {p: shapes[p] for p in meta.target_modules})

    sets = []
    for directory in directories:
        expert_set = load_expert_set(
            directory, expected_fingerprint=expected, expected_kind=model_kind
        )
        routing = (expert_set.meta.top_k, expert_set.meta.tau, expert_set.meta.threshold)
        if routing != (pool.routing.top_k, pool.routing.tau, pool.routing.threshold):
            logger.warning(
                "set %r was learned with routing (k, tau, delta) = %s; learning uses %s",
                expert_set.name,
                routing,
                (pool.routing.top_k, pool.routing.tau, pool.routing.threshold),
            )
        add_to_pool(pool, expert_set)
        sets.append(expert_set)
    return sets
