"""Bundled image domains: deterministic, disjoint class names, right counts, learnable."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from mora_runtime.learn.domains import (
    BACKGROUND_DOMAINS,
    BASE_DOMAIN,
    CONTINUAL_DOMAINS,
    TEST_PER_CLASS,
    TRAIN_PER_CLASS,
    domain_names,
    get_domain,
    label_templates,
    load_domain,
    pretraining_domains,
)

ALL = domain_names()


def pixels(samples) -> np.ndarray:
    return np.stack([np.asarray(image) for image, _ in samples])


def test_base_and_continual_sequence() -> None:
    assert BASE_DOMAIN not in CONTINUAL_DOMAINS
    assert len(CONTINUAL_DOMAINS) >= 5
    assert len(set(CONTINUAL_DOMAINS)) == len(CONTINUAL_DOMAINS)
    assert domain_names() == (BASE_DOMAIN, *CONTINUAL_DOMAINS)


def test_class_names_are_distinct_across_domains() -> None:
    # X-TAIL evaluates over the union of every domain's names: one name, one meaning.
    names = [name for domain in ALL for name in get_domain(domain).class_names]
    duplicates = [name for name, n in Counter(n.lower() for n in names).items() if n > 1]
    assert not duplicates
    assert len(label_templates()) == len(names)


@pytest.mark.parametrize("name", ALL)
def test_prompt_template_has_one_slot(name) -> None:
    domain = get_domain(name)
    assert domain.prompt_template.count("{}") == 1
    assert len(domain.class_names) >= 5
    assert domain.prompts()[0] == domain.prompt_template.replace("{}", domain.class_names[0])


def test_background_domains_stay_apart_from_every_label() -> None:
    # Pre-trained on but never ranked: no class name and no word shared with a base label or
    # a continual class, so the background cannot pull a ranked label's embedding along.
    assert pretraining_domains() == (BASE_DOMAIN, *BACKGROUND_DOMAINS)
    ranked = {w for d in ALL for name in get_domain(d).class_names for w in name.lower().split()}
    for name in BACKGROUND_DOMAINS:
        assert name not in ALL
        domain = get_domain(name)
        words = {w for label in domain.class_names for w in label.split()}
        assert not words & ranked
        first, again = (
            load_domain(name, "train", per_class=2),
            load_domain(name, "train", per_class=2),
        )
        assert np.array_equal(pixels(first), pixels(again))
        assert Counter(label for _, label in first) == dict.fromkeys(
            range(len(domain.class_names)), 2
        )


def test_unknown_domain_and_bad_arguments() -> None:
    with pytest.raises(KeyError, match="unknown domain"):
        get_domain("imagenet")
    with pytest.raises(ValueError, match="split"):
        load_domain("shapes", "validation")
    with pytest.raises(ValueError, match="per_class"):
        load_domain("shapes", "train", per_class=0)


@pytest.mark.parametrize("name", ALL)
def test_counts_sizes_and_determinism(name) -> None:
    domain = get_domain(name)
    train = load_domain(name, "train")
    test = load_domain(name, "test")
    n = len(domain.class_names)
    assert Counter(label for _, label in train) == dict.fromkeys(range(n), TRAIN_PER_CLASS)
    assert Counter(label for _, label in test) == dict.fromkeys(range(n), TEST_PER_CLASS)
    assert {(image.mode, image.size) for image, _ in train + test} == {("RGB", (32, 32))}

    again = load_domain(name, "train")
    assert [label for _, label in again] == [label for _, label in train]
    assert np.array_equal(pixels(again), pixels(train))
    other_seed = load_domain(name, "train", seed=1)
    assert not np.array_equal(pixels(other_seed), pixels(train))
    # Train and test never share an image.
    train_hashes = {np.asarray(image).tobytes() for image, _ in train}
    assert not any(np.asarray(image).tobytes() in train_hashes for image, _ in test)


@pytest.mark.parametrize("name", ["objects", "mnist", "glyphs", "digits"])
def test_size_and_per_class_arguments(name) -> None:
    samples = load_domain(name, "test", size=24, per_class=3, seed=5)
    assert len(samples) == 3 * len(get_domain(name).class_names)
    assert {image.size for image, _ in samples} == {(24, 24)}


def ink_features(image, side: int = 12) -> np.ndarray:
    """Colour-, position- and scale-free view of a drawing: its ink mask, cropped and resized.

    Shapes and glyphs use random colours and placement, which raw pixels cannot see past.
    """
    from PIL import Image

    rgb = np.asarray(image, dtype=np.float32)
    background = np.median(np.stack([rgb[0, 0], rgb[0, -1], rgb[-1, 0], rgb[-1, -1]]), axis=0)
    ink = np.abs(rgb - background).sum(-1) > 90  # [H, W] bool
    ys, xs = np.nonzero(ink)
    if not len(ys):
        return np.zeros(side * side, np.float32)
    ink = ink[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    crop = Image.fromarray(ink.astype(np.uint8) * 255).resize((side, side), Image.BILINEAR)
    return np.asarray(crop, np.float32).ravel() / 255.0


def raw_features(image) -> np.ndarray:
    return np.asarray(image.resize((16, 16)), np.float32).ravel() / 255.0


@pytest.mark.parametrize("name", ALL)
def test_labels_are_learnable_from_pixels(name) -> None:
    """A plain classifier on simple pixel features beats chance: images and labels agree."""
    from sklearn.ensemble import ExtraTreesClassifier

    featurize = ink_features if name in ("shapes", "glyphs") else raw_features
    train, test = load_domain(name, "train"), load_domain(name, "test")
    features = [np.stack([featurize(image) for image, _ in s]) for s in (train, test)]
    labels = [np.array([label for _, label in s]) for s in (train, test)]
    model = ExtraTreesClassifier(n_estimators=100, random_state=0, n_jobs=1)
    model.fit(features[0], labels[0])
    accuracy = model.score(features[1], labels[1])
    chance = 1 / len(get_domain(name).class_names)
    assert accuracy > 3 * chance, f"{name}: accuracy {accuracy:.2f}, chance {chance:.2f}"
