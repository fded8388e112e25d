"""The default CLIP: trained once offline on the bundled base domain, cached, reloadable.

Uses the cache named by MORA_CACHE (`make test` prepares it first); a cold cache trains here,
which takes minutes. Accuracies and timings are logged; only "clearly above chance" is
asserted.
"""

from __future__ import annotations

import json
import logging
import time

import pytest
import torch

from mora_runtime.learn.domains import BASE_DOMAIN, CONTINUAL_DOMAINS, get_domain, load_domain
from mora_runtime.learn.pretrain_clip import RECIPE_VERSION, prepare_default_clip
from mora_runtime.models.clip import ClipClassifier
from mora_runtime.models.clip_loading import LABELS_FILENAME, load_clip
from mora_runtime.models.materialize import MARKER_FILENAME
from mora_runtime.paths import default_clip_dir

pytestmark = pytest.mark.slow
logger = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def default_clip():
    start = time.perf_counter()
    prepare_default_clip()
    logger.info("prepare_default_clip (cold or cached): %.1f s", time.perf_counter() - start)
    return load_clip(device="cpu")


def accuracy(clf: ClipClassifier, domain_name: str, labels) -> float:
    domain = get_domain(domain_name)
    samples = load_domain(domain_name, "test")
    out = clf.classify([image for image, _ in samples], labels)
    hits = [
        result.top == domain.class_names[label]
        for result, (_, label) in zip(out.results, samples, strict=True)
    ]
    return sum(hits) / len(hits)


def test_prepared_directory_is_a_complete_local_clip(default_clip) -> None:
    target = default_clip_dir()
    assert default_clip.model_dir == target
    names = {p.name for p in target.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", LABELS_FILENAME} <= names
    assert {"preprocessor_config.json", MARKER_FILENAME} <= names
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in names)
    marker = json.loads((target / MARKER_FILENAME).read_text())
    assert marker["recipe"] == RECIPE_VERSION
    logger.info(
        "default CLIP: trained %s steps in %s s, base test accuracy %s (chance %s)",
        marker["train_steps"],
        marker["train_seconds"],
        marker["base_test_accuracy"],
        marker["chance"],
    )
    # Idempotent: a second prepare finds the marker and leaves the weights alone.
    weights = target / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    start = time.perf_counter()
    assert prepare_default_clip() == target
    assert time.perf_counter() - start < 5
    assert weights.stat().st_mtime_ns == mtime
    assert default_clip.base_labels == get_domain(BASE_DOMAIN).class_names
    assert type(default_clip.model).__name__ == "CLIPModel"
    assert default_clip.model.config.vision_config.image_size == 32


def test_base_domain_accuracy_is_clearly_above_chance(default_clip) -> None:
    clf = ClipClassifier(default_clip)
    labels = default_clip.base_labels
    chance = 1 / len(labels)
    base = accuracy(clf, BASE_DOMAIN, labels)
    logger.info("base-domain test accuracy %.3f (chance %.3f)", base, chance)
    assert base > 2 * chance
    # The continual domains are unseen: logged only, they are what the experts learn.
    for name in CONTINUAL_DOMAINS:
        own = get_domain(name).class_names
        logger.info(
            "zero-shot %s: %.3f (chance %.3f)", name, accuracy(clf, name, own), 1 / len(own)
        )


def test_empty_pool_keeps_default_predictions(default_clip) -> None:
    clf = ClipClassifier(default_clip)
    images = [image for image, _ in load_domain(BASE_DOMAIN, "test", per_class=2)]
    before = clf.classify(images, default_clip.base_labels)
    clf.patch()
    after = clf.classify(images, default_clip.base_labels)
    assert torch.equal(before.logits, after.logits)
