"""The records that cross Ray between the ingress and the replicas (serving/cluster/protocol.py):
frozen, picklable, checked on construction, and turned into the admin routes' JSON unchanged."""

from __future__ import annotations

import dataclasses
import pickle
from typing import Any

import pytest

from serving.cluster.protocol import (
    HotLoadOp,
    HotLoadResult,
    LoadedSet,
    QuarantinedSet,
    Refusal,
    ReplicaDescription,
    ReplicaReport,
    Unreached,
)

REPORT = ReplicaReport("r1", "committed", 7, 16, 0.25)
DESCRIPTION = ReplicaDescription(
    "r1",
    7,
    (LoadedSet("a", 8, 0, 8),),
    (QuarantinedSet("b", 5, "bad scale"),),
    node_id="n1",
    activations={"a": 3},
)
RECORDS: list[Any] = [
    HotLoadOp.load("a", "causal_lm", "/store/a", 8),
    HotLoadOp.retire("a", "clip"),
    REPORT,
    Unreached("ConnectionError: gone"),
    HotLoadResult("load", "a", 7, (REPORT, Unreached("x"))),
    DESCRIPTION,
    Refusal("overloaded", "at capacity"),
]


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: type(r).__name__)
def test_records_are_frozen_and_survive_pickling(record: Any) -> None:
    assert pickle.loads(pickle.dumps(record)) == record
    first = dataclasses.fields(record)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(record, first, None)


def test_an_op_names_its_set_and_only_a_load_names_a_path_and_rank() -> None:
    load, again = HotLoadOp.load("a", "causal_lm", "/store/a", 8), HotLoadOp.load("a", "x", "/p", 1)
    assert load.key == again.key == "load:a" and load.op_id != again.op_id
    assert HotLoadOp.retire("a", "causal_lm").key == "retire:a"
    with pytest.raises(ValueError):
        HotLoadOp("id", "load", "a", "causal_lm")  # no path, no rank
    with pytest.raises(ValueError):
        HotLoadOp("id", "retire", "a", "causal_lm", path="/store/a", rank=8)
    with pytest.raises(ValueError):
        HotLoadOp("id", "reload", "a", "causal_lm")  # type: ignore[arg-type]


def test_the_json_of_the_admin_routes_is_what_it_always_was() -> None:
    result = HotLoadResult("load", "a", 7, (REPORT, Unreached("ConnectionError: gone")))
    assert result.as_json() == {
        "action": "load",
        "name": "a",
        "version": 7,
        "replicas": [
            {"replica": "r1", "status": "committed", "pool_version": 7, "experts": 16,
             "seconds": 0.25},
            {"status": "will reconcile", "error": "ConnectionError: gone"},
        ],
    }  # fmt: skip
    assert DESCRIPTION.as_json() == {
        "replica": "r1",
        "pool_version": 7,
        "sets": [{"name": "a", "rank": 8, "slots": [0, 8]}],
        "quarantined": [{"name": "b", "version_added": 5, "reason": "bad scale"}],
        "node_id": "n1",
        "activations": {"a": 3},
    }
