"""A CLIP whose model directory does not exist yet when the app deploys (as `mora serve`
deploys while the default CLIP is still being prepared): the app comes up with the LM alone,
completions and LM hot-loads work, /classify is a 503 saying the CLIP warms up and /health
says it is not ready; once the directory is renamed into place the replica loads it, and
/classify answers and /health says ready."""

from __future__ import annotations

import shutil

import httpx
import pytest

from tests.integration.builders import png_base64, save_random_set
from tests.integration.conftest import CLIP_NAME, LM_NAME, wait_for

pytestmark = pytest.mark.integration

LABELS = ["red block", "blue ring"]


@pytest.fixture(scope="module")
def image():
    from mora_runtime.learn.domains import load_domain

    return load_domain("shapes", "test", per_class=1)[0][0]


def classify(cluster, image) -> httpx.Response:
    return cluster.http.post("/classify", json={"images": [png_base64(image)], "labels": LABELS})


def readiness(cluster) -> dict[str, bool]:
    response = cluster.http.get("/health")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ok" and body["models"] == [LM_NAME, CLIP_NAME]
    return body["ready"]


def test_completions_serve_while_the_clip_warms_up_then_it_classifies(
    cluster, tiny_lm_dir, tiny_clip_dir, tiny_lm, tiny_clip, image, tmp_path_factory
) -> None:
    target = tmp_path_factory.mktemp("warming") / "clip"
    cfg = cluster.config(
        lm={"model_dir": str(tiny_lm_dir), "served_name": LM_NAME, "torch_threads": 1},
        clip={"model_dir": str(target), "served_name": CLIP_NAME},
    )
    cluster.deploy(cfg)  # returns once /health answers: the CLIP did not hold the app back
    cluster.retire_all()

    assert cluster.complete("hello there", 4)["usage"]["completion_tokens"] == 4
    warming = classify(cluster, image)
    assert warming.status_code == 503, warming.text
    assert int(warming.headers["Retry-After"]) >= 1
    error = warming.json()["error"]
    assert error["code"] == "model_warming" and "warming up" in error["message"]
    assert readiness(cluster) == {LM_NAME: True, CLIP_NAME: False}

    # Hot-loading an LM set does not wait for, or fail on, the warming CLIP replica.
    save_random_set(tiny_lm.model, cluster.store_root / "warm-lm", "warm-lm", seed=11)
    loaded = cluster.load("warm-lm")
    assert loaded.status_code == 200, loaded.text
    assert [r["status"] for r in loaded.json()["replicas"]] == ["committed"]
    # A CLIP set cannot be checked against a model that is not loaded: retry later.
    save_random_set(
        tiny_clip.model,
        cluster.store_root / "warm-clip",
        "warm-clip",
        model_kind="clip",
        seed=12,
        class_names=("red block", "blue ring"),
    )
    refused = cluster.load("warm-clip")
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "model_warming" and "Retry-After" in refused.headers

    # The directory appears whole, as materialize makes it: a full copy, then one rename.
    staging = target.parent / f".{target.name}.tmp"
    shutil.copytree(tiny_clip_dir, staging)
    staging.rename(target)
    wait_for(
        lambda: classify(cluster, image).status_code == 200,
        "/classify to answer once the CLIP directory is in place",
        120,
    )
    assert classify(cluster, image).json()["model"] == CLIP_NAME
    assert readiness(cluster) == {LM_NAME: True, CLIP_NAME: True}

    # The CLIP replica caught up with the registry (the LM set's version) and takes sets now.
    state = cluster.wait_converged()
    assert [s["name"] for s in state["sets"]] == ["warm-lm"]
    assert state["replicas"]["clip"][0]["pool_version"] == state["version"]
    loaded = cluster.load("warm-clip")
    assert loaded.status_code == 200, loaded.text
    cluster.retire_all()
