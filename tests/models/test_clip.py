"""CLIP zero-shot classification with the expert pool, on a tiny untrained CLIP.

The tiny CLIP is built from a config (the default's tokenizer and image processor, towers of
width 32, 2 layers, patch 8), saved as a local HF directory and loaded back with `load_clip`,
so loading is exercised too. Nothing here trains or downloads anything.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mora_runtime.expert_sets.fingerprint import base_fingerprint
from mora_runtime.expert_sets.format import ExpertSet, ExpertSetMeta
from mora_runtime.expert_sets.store import load_expert_set, save_expert_set
from mora_runtime.experts.pool import ExpertPool
from mora_runtime.experts.slots import ExpertSetEntry, RoutingConfig
from mora_runtime.learn.clip_build import (
    EOS,
    UNK,
    ClipRecipe,
    build_clip,
    build_image_processor,
    build_tokenizer,
    save_clip_dir,
)
from mora_runtime.learn.domains import domain_names, get_domain, load_domain
from mora_runtime.models.clip import DEFAULT_TEMPLATE, ClipClassifier, prompt_for, set_templates
from mora_runtime.models.clip_loading import (
    LABELS_FILENAME,
    ClipNotAvailableError,
    load_clip,
    pixel_values,
)

TINY = ClipRecipe(
    patch_size=8, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, projection_dim=32
)
ROUTING = RoutingConfig(top_k=4, tau=0.1, threshold=0.2)
LABELS = ("circle", "triangle", "star", "red block", "handwritten seven", "a cat")


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory) -> Path:
    tokenizer = build_tokenizer(TINY.max_text_length)
    model = build_clip(TINY, tokenizer)
    directory = tmp_path_factory.mktemp("tiny-clip")
    return save_clip_dir(
        directory, model, tokenizer, build_image_processor(), get_domain("objects")
    )


@pytest.fixture
def clf(tiny_clip_dir) -> ClipClassifier:
    return ClipClassifier(load_clip(tiny_clip_dir, device="cpu"))


@pytest.fixture(scope="module")
def images():
    return [image for image, _ in load_domain("shapes", "test", per_class=1)]


def random_set(pool: ExpertPool, rank: int, seed: int, gain: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    return {
        path: (
            torch.randn(rank, layer.in_features, generator=g) / layer.in_features**0.5,
            gain * torch.randn(rank, layer.out_features, generator=g) * 0.5,
        )
        for path, layer in pool.layers.items()
    }


def reference_logits(clf: ClipClassifier, model, images, labels) -> torch.Tensor:
    """logits_per_image of a plain CLIPModel.forward on the same prompts and pixels."""
    clip = clf.clip
    text = clip.tokenizer(
        [prompt_for(label, clip.label_templates) for label in labels],
        padding=True,
        truncation=True,
        return_tensors="pt",
    )
    pixels = pixel_values(clip.image_processor, images)
    with torch.inference_mode():
        return model(pixel_values=pixels, **text).logits_per_image


# --- prompts, tokenizer, loading --------------------------------------------------------------


def test_prompt_for_uses_the_given_template_then_the_default() -> None:
    # Serving knows no training data: a bundled domain's class name gets no template of its own.
    assert prompt_for("star") == DEFAULT_TEMPLATE.replace("{}", "star") == "a photo of star"
    assert prompt_for("a cat") == "a photo of a cat"
    assert prompt_for("star", {"star": "a sky with one {}"}) == "a sky with one star"
    assert prompt_for("star", {"circle": "a {}"}, "a drawing of a {}.") == "a drawing of a star."


def test_the_classifier_imports_no_training_code() -> None:
    code = (
        "import sys, mora_runtime.models.clip\n"
        "print(sorted(m for m in sys.modules if m.startswith('mora_runtime.learn')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_register_templates(clf) -> None:
    clf.register_templates({"zebra crossing": "a street with a {}."})
    assert clf.prompt("zebra crossing") == "a street with a zebra crossing."
    with pytest.raises(ValueError, match="exactly one"):
        clf.register_templates({"x": "no slot"})


def test_tokenizer_knows_every_domain_word() -> None:
    tokenizer = build_tokenizer()
    assert tokenizer.eos_token_id != 2  # CLIP treats eos id 2 as a legacy config
    for name in domain_names():
        for prompt in get_domain(name).prompts():
            tokens = tokenizer.convert_ids_to_tokens(tokenizer(prompt)["input_ids"])
            assert UNK not in tokens, prompt
            assert tokens[-1] == EOS
    # Distinct class names never tokenize identically.
    names = [n for d in domain_names() for n in get_domain(d).class_names]
    assert len({tuple(tokenizer(n)["input_ids"]) for n in names}) == len(names)


def test_load_clip_reads_labels_and_freezes(tiny_clip_dir) -> None:
    clip = load_clip(tiny_clip_dir, device="cpu")
    objects = get_domain("objects")
    assert clip.base_labels == objects.class_names
    assert clip.label_templates["red block"] == objects.prompt_template
    assert clip.model_dir == tiny_clip_dir
    assert clip.device == torch.device("cpu")
    assert not any(p.requires_grad for p in clip.model.parameters())
    assert json.loads((tiny_clip_dir / LABELS_FILENAME).read_text())["domain"] == "objects"


def test_load_clip_missing_directory(tmp_path) -> None:
    with pytest.raises(ClipNotAvailableError):
        load_clip(tmp_path / "nope", device="cpu")


# --- classify --------------------------------------------------------------------------------


def test_probabilities_sum_to_one_and_are_sorted(clf, images) -> None:
    clf.patch(routing=ROUTING).add_set("a", random_set(clf.pool, 4, seed=1))
    out = clf.classify(images, LABELS)
    assert len(out.results) == len(images)
    assert out.logits.shape == (len(images), len(LABELS))
    for result in out.results:
        probs = torch.tensor(result.probabilities)
        assert sorted(result.labels) == sorted(LABELS)
        assert torch.all(probs[:-1] >= probs[1:])
        assert probs.sum().item() == pytest.approx(1.0, abs=1e-5)
        assert result.top == result.labels[0]
    top2 = clf.classify(images, LABELS, max_labels=2)
    assert all(
        r.labels == full.labels[:2] for r, full in zip(top2.results, out.results, strict=True)
    )


@pytest.mark.parametrize("patched", [False, True], ids=["unpatched", "empty-pool"])
def test_empty_pool_equals_clip_forward_bit_for_bit(tiny_clip_dir, clf, images, patched) -> None:
    reference = load_clip(tiny_clip_dir, device="cpu").model
    want = reference_logits(clf, reference, images, LABELS)
    if patched:
        clf.patch(routing=ROUTING)
    out = clf.classify(images, LABELS)
    assert torch.equal(out.logits, want)
    probs = want.softmax(dim=-1)
    for i, result in enumerate(out.results):
        order = [LABELS.index(label) for label in result.labels]
        assert torch.equal(torch.tensor(result.probabilities), probs[i, order])
    assert out.pool_version == 0
    assert out.routing.active_ranks == 0


def test_batched_equals_one_by_one(clf, images) -> None:
    clf.patch(routing=ROUTING).add_set("a", random_set(clf.pool, 4, seed=1))
    batched = clf.classify(images, LABELS)
    singles = [clf.classify([image], LABELS) for image in images]
    for i, single in enumerate(singles):
        torch.testing.assert_close(single.logits[0], batched.logits[i], rtol=1e-5, atol=1e-5)
        assert single.results[0].top == batched.results[i].top
        assert single.results[0].routing == batched.results[i].routing


def test_expert_set_changes_predictions_and_snapshot_pins_old_version(clf, images) -> None:
    pool = clf.patch(routing=ROUTING)
    empty = pool.acquire()
    base = clf.classify(images, LABELS)
    pool.add_set("a", random_set(pool, 4, seed=1))
    v1 = pool.acquire()
    before = clf.classify(images, LABELS)
    assert before.pool_version == v1.version == 1
    assert (before.logits - base.logits).abs().max() > 1e-2

    pool.add_set("b", random_set(pool, 4, seed=2, gain=3.0))
    after = clf.classify(images, LABELS)
    assert after.pool_version == 2
    assert (after.logits - before.logits).abs().max() > 1e-2
    assert [r.labels for r in after.results] != [r.labels for r in before.results]

    clf.clear_cache()  # recompute the text side too, under the old version
    pinned = clf.classify(images, LABELS, snapshot=v1)
    assert pinned.pool_version == 1
    # Same experts, same math; only float rounding may differ (the pool now scores more slots).
    torch.testing.assert_close(pinned.logits, before.logits, rtol=1e-5, atol=1e-5)
    assert [r.labels for r in pinned.results] == [r.labels for r in before.results]
    assert "b" not in pinned.routing.set_activations
    assert torch.equal(clf.classify(images, LABELS, snapshot=empty).logits, base.logits)
    pool.release(v1)
    pool.release(empty)
    assert pool.live_versions() == {}  # calls without a snapshot released their pins


def test_routing_statistics_and_text_cache(clf, images) -> None:
    pool = clf.patch(routing=ROUTING)
    pool.add_set("a", random_set(pool, 4, seed=1))
    first = clf.classify(images, LABELS)
    second = clf.classify(images, LABELS)
    assert not first.text_cached and second.text_cached
    assert torch.equal(first.logits, second.logits)

    vision = clf.clip.model.config.vision_config
    tokens = (vision.image_size // vision.patch_size) ** 2 + 1
    vision_layers = sum(path.startswith("vision_model") for path in pool.layers)
    for result in second.results:
        assert result.routing.observations == tokens * vision_layers
        assert 0 < result.routing.mean_active_ranks <= ROUTING.top_k
        assert set(result.routing.set_activations) == {"a"}
    assert second.routing == second.image_routing.total()
    assert len(second.image_routing.per_token["q_proj"]) == len(images) * tokens

    # The label prompts count once, without their padding.
    prompts = [clf.prompt(label) for label in LABELS]
    mask = clf.clip.tokenizer(prompts, padding=True, return_tensors="pt")["attention_mask"]
    assert 0 in mask  # the prompts differ in length, so there is padding to leave out
    text_layers = sum(path.startswith("text_model") for path in pool.layers)
    assert first.text_routing.total().observations == int(mask.sum()) * text_layers
    assert first.routing.observations == second.routing.observations + int(mask.sum()) * text_layers

    pool.add_set("b", random_set(pool, 4, seed=2))
    assert not clf.classify(images, LABELS).text_cached  # new version, new text embeddings


def test_routing_overrides(tiny_clip_dir, clf, images) -> None:
    pool = clf.patch(routing=ROUTING)
    pool.add_set("a", random_set(pool, 8, seed=1))
    default = clf.classify(images, LABELS)
    narrow = clf.classify(images, LABELS, top_k=2)
    assert narrow.routing.mean_active_ranks <= 2 < default.routing.mean_active_ranks
    # No expert passes a threshold above 1: every layer falls back to the base model.
    reference = load_clip(tiny_clip_dir, device="cpu").model
    pruned = clf.classify(images, LABELS, threshold=1.01)
    assert torch.equal(pruned.logits, reference_logits(clf, reference, images, LABELS))
    assert pruned.routing.active_ranks == 0


def test_invalid_requests(clf, images) -> None:
    with pytest.raises(ValueError, match="image"):
        clf.classify([], LABELS)
    with pytest.raises(ValueError, match="distinct"):
        clf.classify(images, ["star", "star"])
    with pytest.raises(ValueError, match="label"):
        clf.classify(images, [])
    with pytest.raises(TypeError):
        clf.classify(images, "star")
    with pytest.raises(ValueError, match="no expert pool"):
        clf.classify(images, LABELS, snapshot=ExpertPool({"x": (2, 2)}).latest())
    clf.patch()
    with pytest.raises(ValueError, match="already patched"):
        clf.patch()


# --- prompt templates carried by expert sets (format version 2) ------------------------------


class PromptRecorder:
    """Wraps the tokenizer: records every list of texts sent to the text tower."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.calls: list[list[str]] = []

    def __call__(self, texts, **kwargs):
        self.calls.append(list(texts))
        return self.tokenizer(texts, **kwargs)


def load_set(clf, directory: Path, name: str, classes, template, version: int = 2) -> None:
    """Save a set for the tiny CLIP, read it back and load it as a replica does."""
    pool = clf.pool
    modules = {p: (layer.in_features, layer.out_features) for p, layer in pool.layers.items()}
    meta = ExpertSetMeta(
        name=name,
        model_kind="clip",
        base_model=base_fingerprint(clf.clip.model, modules),
        target_modules=tuple(modules),
        rank=2,
        top_k=ROUTING.top_k,
        tau=ROUTING.tau,
        threshold=ROUTING.threshold,
        scale=1.0,
        class_names=tuple(classes),
        prompt_template=template,
        format_version=version,
    )
    saved = save_expert_set(ExpertSet(meta, random_set(pool, 2, seed=3)), directory / name)
    loaded = load_expert_set(saved, expected_kind="clip")
    assert loaded.meta.format_version == version
    pool.add_set(name, loaded.tensors, scale=loaded.meta.scale, meta=loaded.meta.pool_meta())


def test_a_version_2_set_prompts_its_class_names_with_its_template(
    clf, images, tmp_path, monkeypatch
) -> None:
    pool = clf.patch(routing=ROUTING)
    empty = pool.acquire()
    recorder = PromptRecorder(clf.clip.tokenizer)
    monkeypatch.setattr(clf, "clip", dataclasses.replace(clf.clip, tokenizer=recorder))
    # "red block" is a base label: the base model's labels.json template stays its template.
    load_set(clf, tmp_path, "shapes", ("circle", "star", "red block"), "a drawing of a {}.")
    labels = ("circle", "star", "red block", "a cat")
    expected = [
        "a drawing of a circle.",
        "a drawing of a star.",
        "a photo of a red block.",
        "a photo of a cat",
    ]
    assert list(clf.prompts(labels)) == expected
    clf.classify(images, labels)
    assert recorder.calls == [expected]
    # A snapshot from before the set was loaded prompts without it.
    clf.classify(images, labels, snapshot=empty)
    assert recorder.calls[-1] == ["a photo of circle", "a photo of star", *expected[2:]]
    pool.release(empty)
    # A template registered on the classifier comes first.
    clf.register_templates({"star": "a sky with one {}"})
    assert clf.prompt("star") == "a sky with one star" and clf.prompt("circle") == expected[0]
    pool.retire_set("shapes")
    assert clf.prompt("circle") == "a photo of circle"


def test_a_version_1_set_loads_and_prompts_with_the_default(
    clf, images, tmp_path, monkeypatch
) -> None:
    clf.patch(routing=ROUTING)
    recorder = PromptRecorder(clf.clip.tokenizer)
    monkeypatch.setattr(clf, "clip", dataclasses.replace(clf.clip, tokenizer=recorder))
    load_set(clf, tmp_path, "old", ("circle", "star"), None, version=1)
    out = clf.classify(images, ("circle", "star"))
    assert recorder.calls == [["a photo of circle", "a photo of star"]]
    assert out.pool_version == 1 and set(out.routing.set_activations) <= {"old"}


def test_sets_declaring_one_label_resolve_by_name_whatever_the_load_order() -> None:
    def entry(name: str, slot: int, version: int, template: str | None) -> ExpertSetEntry:
        meta = {"class_names": ["star", name], "prompt_template": template}
        return ExpertSetEntry(name, slot, 1, 1.0, version, meta)

    zeta, alpha, old = (
        entry("zeta", 0, 1, "zeta {}"),
        entry("alpha", 1, 2, "alpha {}"),
        entry("aaa", 2, 3, None),
    )
    want = {"star": "alpha {}", "zeta": "zeta {}", "alpha": "alpha {}"}
    assert set_templates([zeta, alpha, old]) == set_templates([old, alpha, zeta]) == want
