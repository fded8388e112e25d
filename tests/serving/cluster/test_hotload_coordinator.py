"""The hot-load coordinator's de-duplication of identical operations (no Ray)."""

from __future__ import annotations

import asyncio
from typing import Any

from serving.cluster.hotload import HotLoadCoordinator


class CountingCoordinator(HotLoadCoordinator):
    def __init__(self) -> None:
        super().__init__("/nonexistent-store", registry=None, handles={})
        self.runs = 0
        self.release = asyncio.Event()

    async def _run(self, op: dict[str, Any]) -> dict[str, Any]:
        self.runs += 1
        await self.release.wait()
        return {"version": self.runs}


def test_identical_operations_share_one_run_and_a_cancelled_caller_leaks_nothing() -> None:
    async def scenario() -> None:
        coordinator = CountingCoordinator()
        op = {"action": "load", "name": "a"}
        first = asyncio.ensure_future(coordinator._once("load:a", op))
        second = asyncio.ensure_future(coordinator._once("load:a", op))
        await asyncio.sleep(0.01)
        first.cancel()  # the client of the first request went away
        await asyncio.sleep(0.01)
        coordinator.release.set()
        assert await second == {"version": 1}  # the run went on for the other caller
        assert coordinator.runs == 1
        await asyncio.sleep(0)
        assert coordinator._inflight == {}
        # A later load of the same name really runs again.
        assert await coordinator._once("load:a", op) == {"version": 2}

    asyncio.run(scenario())


def test_a_run_whose_only_caller_left_still_frees_its_key() -> None:
    async def scenario() -> None:
        coordinator = CountingCoordinator()
        op = {"action": "load", "name": "a"}
        caller = asyncio.ensure_future(coordinator._once("load:a", op))
        await asyncio.sleep(0.01)
        caller.cancel()
        coordinator.release.set()
        for _ in range(5):
            await asyncio.sleep(0)
        assert coordinator._inflight == {}
        assert await coordinator._once("load:a", op) == {"version": 2}

    asyncio.run(scenario())
