"""ExpertPool's write side: staging checks everything, applying is atomic and takes the
version it is given (a registry's), versions only grow."""

from __future__ import annotations

import pytest
import torch

from mora_runtime.experts.pool import ExpertPool
from mora_runtime.experts.slots import PoolError

LAYERS = {"a": (4, 3), "b": (5, 2)}


def tensors(rank: int, seed: int = 0, value: float | None = None) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {
        p: (torch.randn(rank, d, generator=g), torch.randn(rank, o, generator=g))
        for p, (d, o) in LAYERS.items()
    }
    if value is not None:
        out["a"][1][0, 0] = value
    return out


def state(pool: ExpertPool) -> tuple:
    return (
        pool.version,
        pool.num_slots,
        pool.capacity,
        [e.name for e in pool.sets()],
        [layer.absent_slots for layer in pool.layers.values()],
        pool.slot_scale.tolist(),
    )


@pytest.mark.parametrize(
    ("dtype", "kwargs"),
    [
        (torch.float32, {"scale": 1e300}),  # the set: finite in JSON, not in float32
        (torch.float32, {"scale": float("nan")}),
        (torch.float16, {"scale": 1e5}),
        (torch.float16, {"value": 1e5}),  # fits the set's float32, not the pool's float16
    ],
)
def test_a_set_the_pool_cannot_hold_is_refused_and_changes_nothing(dtype, kwargs) -> None:
    pool = ExpertPool(LAYERS, capacity=2, dtype=dtype)
    pool.add_set("ok", tensors(2))
    before = state(pool)
    value = kwargs.pop("value", None)
    with pytest.raises(PoolError, match=r"dtype|finite"):
        pool.add_set("bad", tensors(3, seed=1, value=value), **kwargs)
    assert state(pool) == before
    pool.add_set("next", tensors(1, seed=2))  # the pool still works, in the slots after "ok"
    assert [e.slot_start for e in pool.sets()] == [0, 2]


def test_staging_leaves_the_pool_alone_and_apply_only_installs() -> None:
    pool = ExpertPool(LAYERS, capacity=2)
    before = state(pool)
    staged = pool.stage_set("s", tensors(3), scale=2.0, meta={"rank": 3})
    assert state(pool) == before
    assert all(a.dtype == pool.dtype and b.dtype == pool.dtype for a, b in staged.tensors.values())
    snap = pool.apply(add=[staged], version=40)
    assert (snap.version, pool.version, pool.num_experts) == (40, 40, 3)
    assert pool.sets()[0].version_added == 40
    assert torch.equal(pool.layers["a"].A[:3], staged.tensors["a"][0])
    assert pool.slot_scale.tolist() == [2.0, 2.0, 2.0]


def test_explicit_versions_only_grow() -> None:
    pool = ExpertPool(LAYERS)
    pool.apply(add=[pool.stage_set("x", tensors(2))], version=75)
    before = state(pool)
    for version in (75, 74, 0):
        with pytest.raises(PoolError, match="not newer"):
            pool.apply(add=[pool.stage_set("y", tensors(2, seed=1))], version=version)
        with pytest.raises(PoolError):
            pool.set_version(version - 1)
    assert state(pool) == before
    assert pool.add_set("y", tensors(1, seed=1)).version == 76  # without a version: the next


def test_retire_and_add_in_one_step_publish_one_version() -> None:
    pool = ExpertPool(LAYERS, capacity=4)
    pool.add_set("old", tensors(2))
    pinned = pool.acquire()
    snap = pool.apply(
        add=[pool.stage_set("new", tensors(2, seed=1)), pool.stage_set("old", tensors(1, seed=2))],
        retire=["old"],
        version=9,
    )
    assert snap.version == 9 and sorted(e.name for e in snap.sets) == ["new", "old"]
    # The pinned snapshot's slots are not reused while it lives, then they are freed.
    assert set(pinned.slots).isdisjoint(snap.slots)
    assert pool.num_slots == 5
    pool.release(pinned)
    assert pool.live_versions() == {}
    assert not bool(pool.layers["a"].present[:2].any())
    assert pool.apply(add=[pool.stage_set("reuse", tensors(2, seed=3))]).sets[0].slot_start == 0


def test_a_failed_apply_changes_nothing() -> None:
    pool = ExpertPool(LAYERS, capacity=2)
    pool.add_set("x", tensors(2))
    before = state(pool)
    good = pool.stage_set("y", tensors(1))
    for kwargs in (
        {"retire": ["ghost"], "add": [good]},
        {"retire": ["x", "x"]},
        {"add": [good, good]},
        {"add": [pool.stage_set("x", tensors(1))]},  # already loaded (and not retired)
        {
            "add": [ExpertPool({"c": (4, 3)}).stage_set("z", {"c": tensors(1)["a"]})],
            "retire": ["x"],
        },
    ):
        with pytest.raises(PoolError):
            pool.apply(**kwargs)
        assert state(pool) == before
    other_dtype = ExpertPool(LAYERS, dtype=torch.float64).stage_set("w", tensors(1))
    with pytest.raises(PoolError, match="dtype"):
        pool.apply(add=[other_dtype])
    assert state(pool) == before
