"""What the LM and CLIP replicas share: the pool's replica side, background sync with the
registry, the hot-load protocol, and the device the replica picked (serving/cluster/devices.py).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

import ray

from serving.cluster.devices import ray_gpu_ids, replica_device
from serving.cluster.metrics import server_metrics
from serving.cluster.protocol import HotLoadOp, Refusal, ReplicaDescription, ReplicaReport
from serving.cluster.registry import RegistryState, registry_actor
from serving.cluster.replica_pool import ReplicaPool

logger = logging.getLogger(__name__)

RECONCILE_INTERVAL_S = 2.0  # also refreshes gauges (Ray drops a gauge not set for ~20 s)


def set_torch_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    logger.info("torch uses %d threads in this replica", threads)


class ReplicaBase:
    """What the LM and CLIP servers share: the pool's replica side and background sync."""

    model_name: str
    replica: ReplicaPool
    # Set while the replica's model is not loaded yet (ClipServer): every call is answered
    # with it, hot-load steps included, and the replica catches up with the registry in
    # `_start_sync` once it has loaded.
    warming: Refusal | None = None
    device = "cpu"  # the torch device the model is (or will be) on

    def _pick_device(self, what: str, num_gpus: float | None) -> None:
        self.device = replica_device(num_gpus)
        logger.info("%s replica on %s (Ray GPU ids %s)", what, self.device, ray_gpu_ids())

    async def _start_sync(self, store: str) -> None:
        self.registry = registry_actor(store)
        await self.replica.reconcile(await self.registry.state.remote())
        self._sync_task = asyncio.get_running_loop().create_task(self._sync_forever())

    async def _sync_forever(self) -> None:
        while True:
            try:
                await self.replica.reconcile(await self.registry.state.remote())
            except Exception:  # the next round retries; serving goes on with the old pool
                logger.exception("reconciling with the registry failed")
            self._refresh_gauges()
            await asyncio.sleep(RECONCILE_INTERVAL_S)

    def _refresh_gauges(self) -> None:
        pool = self.replica.pool
        server_metrics().set_pool(self.model_name, pool.num_experts, pool.version)
        server_metrics().set_rss(self.model_name)

    async def is_ready(self) -> bool:
        """Whether the model is loaded and serving (the ingress's /health asks)."""
        return self.warming is None

    async def device_name(self) -> str:
        """The torch device this replica serves on (the ingress's /health asks)."""
        return self.device

    # hot-load protocol, called by the ingress through handle.broadcast
    async def prepare(self, op: HotLoadOp) -> ReplicaReport | Refusal:
        if self.warming is not None:
            return self.warming
        return await self.replica.prepare(op)

    async def commit(self, op: HotLoadOp, state: RegistryState) -> ReplicaReport | Refusal:
        if self.warming is not None:
            return self.warming
        result = await self.replica.commit(op, state)
        self._refresh_gauges()
        return result

    async def abort(self, op_id: str) -> ReplicaReport | Refusal:
        if self.warming is not None:
            return self.warming
        return await self.replica.abort(op_id)

    async def sync(self, state: RegistryState) -> ReplicaReport | Refusal:
        if self.warming is not None:
            return self.warming
        result = await self.replica.sync(state)
        self._refresh_gauges()
        return result

    async def describe_pool(self) -> ReplicaDescription | Refusal:
        if self.warming is not None:
            return self.warming
        # The node lets an operator (and tests/integration/test_cluster.py) see where each
        # replica runs and which ones a lost node took with it.
        return replace(self.replica.describe(), node_id=ray.get_runtime_context().get_node_id())
