"""`/classify` through a real Ray Serve on a tiny untrained CLIP, and hot-loading a CLIP set."""

from __future__ import annotations

import json

import pytest
import torch

from tests.integration.builders import png_base64, save_random_set
from tests.integration.conftest import CLIP_NAME

pytestmark = pytest.mark.integration

LABELS = ["red block", "blue ring", "circle", "handwritten seven"]


@pytest.fixture(scope="module")
def images():
    from mora_runtime.learn.domains import load_domain

    return [image for image, _ in load_domain("shapes", "test", per_class=1)[:3]]


@pytest.fixture(scope="module", autouse=True)
def clip_pool_empty(server):
    server.retire_all()
    server.wait_converged()
    yield
    server.retire_all()


def classify(server, images, labels=None, **fields) -> dict:
    body = {"images": [png_base64(image) for image in images], **fields}
    if labels is not None:
        body["labels"] = labels
    response = server.http.post("/classify", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def probabilities(result: dict, labels: list[str]) -> torch.Tensor:
    """[images, labels] in `labels` order, from the ranked rows of a response."""
    rows = []
    for row in result["data"]:
        by_label = {entry["label"]: entry["probability"] for entry in row["labels"]}
        rows.append([by_label[label] for label in labels])
    return torch.tensor(rows)


def test_classify_base64_matches_the_classifier_in_process(server, images, tiny_clip) -> None:
    from mora_runtime.models.clip import ClipClassifier

    result = classify(server, images, LABELS)
    assert result["model"] == CLIP_NAME
    assert [row["index"] for row in result["data"]] == list(range(len(images)))
    for row in result["data"]:
        scores = [entry["probability"] for entry in row["labels"]]
        assert scores == sorted(scores, reverse=True)
        assert sum(scores) == pytest.approx(1.0, abs=1e-5)
    assert result["mora"]["pool_version"] == server.experts()["version"]

    local = ClipClassifier(tiny_clip).classify(images, LABELS)
    expected = local.logits.softmax(dim=-1)  # [images, labels]
    torch.testing.assert_close(probabilities(result, LABELS), expected, atol=1e-5, rtol=0)

    files = [("images", (f"{i}.png", _png(image), "image/png")) for i, image in enumerate(images)]
    response = server.http.post("/classify", files=files, data={"labels": json.dumps(LABELS)})
    assert response.status_code == 200, response.text
    torch.testing.assert_close(probabilities(response.json(), LABELS), expected, atol=1e-5, rtol=0)


def test_a_clip_set_adds_its_class_names_to_the_default_labels(server, images, tiny_clip) -> None:
    from mora_runtime.learn.domains import get_domain

    base = classify(server, images[:1])
    base_labels = {entry["label"] for entry in base["data"][0]["labels"]}
    assert base_labels == set(get_domain("objects").class_names)
    before = classify(server, images, LABELS)

    new_names = get_domain("shapes").class_names
    save_random_set(
        tiny_clip.model,
        server.store_root / "clip-shapes",
        "clip-shapes",
        model_kind="clip",
        seed=8,
        class_names=tuple(new_names),
    )
    response = server.load("clip-shapes")
    assert response.status_code == 200, response.text
    version = response.json()["version"]

    loaded = classify(server, images[:1])
    assert {entry["label"] for entry in loaded["data"][0]["labels"]} == base_labels | set(new_names)
    assert loaded["mora"]["pool_version"] == version
    after = classify(server, images, LABELS)
    assert after["mora"]["active_ranks_per_token"] > 0
    assert not torch.allclose(probabilities(after, LABELS), probabilities(before, LABELS))

    assert server.admin("DELETE", "/v1/experts/clip-shapes").status_code == 200
    again = classify(server, images[:1])
    assert {entry["label"] for entry in again["data"][0]["labels"]} == base_labels


def _png(image) -> bytes:
    import base64

    return base64.b64decode(png_base64(image))
