"""The hot-load scenario: expert sets to load, and the task that loads one every N seconds.

Sets come either from `--hotload-sets` (directories already inside the server's expert
store, given relative to it) or are generated before the run: random rank-r sets for the
server's causal LM, written into `--hotload-store` (the same directory the server uses as its
expert store) by the `mora experts random` command. Generating needs the `mora` command and
the model locally; the load generator itself needs only HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from loadtest.client import LoadClient
from loadtest.metrics import HotLoadEvent
from loadtest.server_process import MoraCommandError, find_mora, run_mora

logger = logging.getLogger(__name__)


def generate_sets(
    store: Path,
    count: int,
    *,
    model_dir: str | None = None,
    rank: int = 8,
    seed: int = 0,
    prefix: str | None = None,
    mora: str | None = None,
) -> list[str]:
    """Write `count` random expert sets for the causal LM at `model_dir` (None: the default
    model) into `store` with `mora experts random`; returns their paths relative to the store."""
    prefix = prefix or f"loadtest-{time.strftime('%Y%m%d-%H%M%S')}"
    argv = ["experts", "random", str(store), "--count", str(count), "--rank", str(rank)]
    argv += ["--seed", str(seed), "--prefix", prefix]
    if model_dir is not None:
        argv += ["--model", str(model_dir)]
    printed = run_mora(find_mora(mora), *argv)
    expected = [f"{prefix}-{i}" for i in range(count)]
    # The names are the command's last lines (anything a library printed comes before them).
    if count and printed[-count:] != expected:
        raise MoraCommandError(
            f"`mora experts random` printed {printed[-count:]}, expected {expected}"
        )
    logger.info("generated %d expert sets in %s", count, store)
    return expected


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
