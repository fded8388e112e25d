"""The hot-load scenario: expert sets to load, and the task that loads one every N seconds.

Sets come either from `--hotload-sets` (directories already inside the server's expert
store, given relative to it) or are generated before the run: random rank-r sets for the
server's causal LM, written into `--hotload-store` (the same directory the server uses as its
expert store). Generating needs the model locally (mora_runtime, torch); loading needs only
HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from loadtest.client import LoadClient
from loadtest.metrics import HotLoadEvent

logger = logging.getLogger(__name__)


def generate_sets(
    store: Path,
    count: int,
    *,
    model_dir: str | None = None,
    rank: int = 8,
    seed: int = 0,
    prefix: str | None = None,
) -> list[str]:
    """Write `count` random expert sets for the causal LM at `model_dir` (None: the default
    model) into `store`; returns their paths relative to the store."""
    import torch

    from mora_runtime.expert_sets.format import ExpertSet, ExpertSetMeta, base_fingerprint
    from mora_runtime.expert_sets.store import save_expert_set
    from mora_runtime.experts.patching import find_target_modules
    from mora_runtime.models.lm import load_causal_lm

    lm = load_causal_lm(model_dir)
    modules = find_target_modules(lm.model)
    fingerprint = base_fingerprint(lm.model, modules)
    prefix = prefix or f"loadtest-{time.strftime('%Y%m%d-%H%M%S')}"
    paths = []
    for i in range(count):
        g = torch.Generator().manual_seed(seed * 1000 + i)
        # Keys scaled so routing scores clear the threshold for a share of tokens; values small
        # so the output stays readable text.
        tensors = {
            path: (
                torch.randn(rank, d_in, generator=g) * (3.0 / d_in**0.5),  # A [r, D]
                torch.randn(rank, d_out, generator=g) * 0.02,  # B [r, O]
            )
            for path, (d_in, d_out) in modules.items()
        }
        name = f"{prefix}-{i}"
        meta = ExpertSetMeta(
            name=name,
            model_kind="causal_lm",
            base_model=fingerprint,
            target_modules=sorted(modules),
            rank=rank,
            top_k=8,
            tau=0.03,
            threshold=0.2,
            scale=1.0,
        )
        save_expert_set(ExpertSet(meta=meta, tensors=tensors), store / name, overwrite=True)
        paths.append(name)
    logger.info("generated %d expert sets in %s", count, store)
    return paths


async def run_hotloads(
    client: LoadClient,
    paths: list[str],
    every_s: float,
    duration_s: float,
    events: list[HotLoadEvent],
) -> None:
    """Load `paths[i]` at (i + 1) * every_s while that is before `duration_s`."""
    for i, path in enumerate(paths):
        due = (i + 1) * every_s
        if due >= duration_s:
            return
        await asyncio.sleep(max(0.0, due - client.clock()))
        events.append(await timed_admin(client, "load", path))


async def timed_admin(client: LoadClient, action: str, target: str) -> HotLoadEvent:
    start = client.clock()
    try:
        if action == "load":
            status, body = await client.load_set(target)
        else:
            status, body = await client.retire_set(target)
    except Exception as exc:  # the scenario reports it; the run goes on
        return HotLoadEvent(start, client.clock(), action, target, False, error=str(exc)[:300])
    end = client.clock()
    ok = status == 200
    error = None if ok else str(body.get("error", body))[:300]
    return HotLoadEvent(
        start=start,
        end=end,
        action=action,
        name=str(body.get("name", target)) if ok else target,
        ok=ok,
        version=body.get("version") if ok else None,
        status=status,
        error=error,
    )
