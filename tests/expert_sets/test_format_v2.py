"""Expert-set format version 2: CLIP sets carry their prompt template; version 1 still loads."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from mora_runtime.expert_sets import format as set_format
from mora_runtime.expert_sets import store
from mora_runtime.expert_sets.format import (
    MAX_TEMPLATE_CHARS,
    ExpertSet,
    ExpertSetMeta,
    MalformedMetadataError,
    UnsupportedFormatError,
    check_prompt_template,
)

MODULE = "text.layers.0.q_proj"
FINGERPRINT = {
    "architecture": "CLIPModel",
    "model_type": "clip",
    "modules": {MODULE: [4, 6]},
    "hash": "0" * 64,
}
CLASSES = ("circle", "star")
TEMPLATE = "a drawing of a {}."

# A version-1 expert_set.json exactly as the version-1 writer laid it out (no prompt_template).
V1_JSON = """{
  "format": "mora-expert-set",
  "format_version": 1,
  "name": "shapes-v1",
  "model_kind": "clip",
  "base_model": {
    "architecture": "CLIPModel",
    "model_type": "clip",
    "modules": {"text.layers.0.q_proj": [4, 6]},
    "hash": "0000000000000000000000000000000000000000000000000000000000000000"
  },
  "target_modules": ["text.layers.0.q_proj"],
  "rank": 2,
  "top_k": 8,
  "tau": 0.05,
  "threshold": 0.2,
  "scale": 1.0,
  "class_names": ["circle", "star"],
  "created_at": "2025-01-01T00:00:00+00:00",
  "training": {"steps": 3}
}
"""


def clip_meta(**changes: Any) -> ExpertSetMeta:
    fields = {
        "name": "shapes",
        "model_kind": "clip",
        "base_model": FINGERPRINT,
        "target_modules": (MODULE,),
        "rank": 2,
        "top_k": 8,
        "tau": 0.05,
        "threshold": 0.2,
        "scale": 1.0,
        "class_names": CLASSES,
        "prompt_template": TEMPLATE,
        **changes,
    }
    return ExpertSetMeta(**fields)


def tensors() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return {MODULE: (torch.randn(2, 4, generator=gen), torch.randn(2, 6, generator=gen))}


def write_v1_set(directory: Path) -> Path:
    directory.mkdir(parents=True)
    (directory / set_format.METADATA_FILE).write_text(V1_JSON)
    flat = {f"{MODULE}.{side}": t for side, t in zip("AB", tensors()[MODULE], strict=True)}
    save_file(flat, directory / set_format.TENSORS_FILE)
    return directory


def test_new_sets_are_version_2_and_round_trip_the_template(tmp_path: Path) -> None:
    meta = clip_meta()
    assert meta.format_version == set_format.FORMAT_VERSION == 2
    directory = store.save_expert_set(ExpertSet(meta, tensors()), tmp_path / "shapes")
    written = json.loads((directory / set_format.METADATA_FILE).read_text())
    assert written["format_version"] == 2
    assert written["prompt_template"] == TEMPLATE
    assert written["class_names"] == list(CLASSES)
    loaded = store.load_expert_set(directory, expected_kind="clip")
    assert loaded.meta == meta and loaded.meta.prompt_template == TEMPLATE
    assert ExpertSetMeta.from_json_dict(json.loads(json.dumps(meta.to_json_dict()))) == meta


def test_a_version_2_set_without_a_template_round_trips_as_null(tmp_path: Path) -> None:
    meta = clip_meta(prompt_template=None)
    directory = store.save_expert_set(ExpertSet(meta, tensors()), tmp_path / "s")
    written = json.loads((directory / set_format.METADATA_FILE).read_text())
    assert "prompt_template" in written and written["prompt_template"] is None
    assert store.load_expert_set(directory).meta == meta


def test_a_version_1_file_still_loads_and_saves_as_version_1(tmp_path: Path) -> None:
    directory = write_v1_set(tmp_path / "shapes-v1")
    loaded = store.load_expert_set(directory, expected_kind="clip")
    assert loaded.meta.format_version == 1
    assert loaded.meta.prompt_template is None
    assert loaded.meta.class_names == CLASSES
    assert loaded.meta.pool_meta() == {
        "class_names": list(CLASSES),
        "prompt_template": None,
        "rank": 2,
    }
    again = store.save_expert_set(loaded, tmp_path / "copy")
    rewritten = json.loads((again / set_format.METADATA_FILE).read_text())
    assert rewritten == json.loads(V1_JSON)  # no field the version-1 format lacks
    assert store.load_expert_set(again).meta == loaded.meta


def test_pool_meta_carries_the_template() -> None:
    assert clip_meta().pool_meta() == {
        "class_names": list(CLASSES),
        "prompt_template": TEMPLATE,
        "rank": 2,
    }


@pytest.mark.parametrize(
    ("change", "error", "text"),
    [
        (lambda j: j.update(format_version=1), MalformedMetadataError, "prompt_template"),
        (lambda j: j.pop("prompt_template"), MalformedMetadataError, "prompt_template"),
        (lambda j: j.update(format_version=3), UnsupportedFormatError, "format_version"),
        (lambda j: j.update(format_version=2.0), UnsupportedFormatError, "format_version"),
        (lambda j: j.update(format_version=True), UnsupportedFormatError, "format_version"),
    ],
    ids=["v1_with_template", "v2_without_the_field", "v3", "float_version", "bool_version"],
)
def test_fields_must_match_the_version(change, error, text) -> None:
    data = clip_meta().to_json_dict()
    change(data)
    with pytest.raises(error, match=text):
        ExpertSetMeta.from_json_dict(data)


@pytest.mark.parametrize(
    ("template", "text"),
    [
        ("a drawing", "exactly one"),
        ("{} next to {}", "exactly one"),
        ("", "1 to"),
        ("x" * MAX_TEMPLATE_CHARS + "{}", "1 to"),
        ("a drawing\nof a {}", "control"),
        (3, "string"),
        (["a {}"], "string"),
    ],
)
def test_invalid_template_is_refused(template: Any, text: str) -> None:
    data = clip_meta().to_json_dict()
    data["prompt_template"] = template
    with pytest.raises(MalformedMetadataError, match=text):
        ExpertSetMeta.from_json_dict(data)
    with pytest.raises(ValueError, match=text):
        check_prompt_template(template)


def test_longest_template_is_accepted() -> None:
    template = "x" * (MAX_TEMPLATE_CHARS - 2) + "{}"
    assert clip_meta(prompt_template=template).prompt_template == template


@pytest.mark.parametrize(
    ("changes", "text"),
    [
        ({"model_kind": "causal_lm"}, "CLIP"),
        ({"class_names": ()}, "class_names"),
        ({"format_version": 1}, "format_version 2"),
        ({"format_version": 0}, "format_version"),
    ],
)
def test_template_only_on_a_version_2_clip_set_with_class_names(
    changes: dict[str, Any], text: str
) -> None:
    with pytest.raises(MalformedMetadataError, match=text):
        clip_meta(**changes)


def test_replace_revalidates_the_template() -> None:
    meta = clip_meta()
    with pytest.raises(MalformedMetadataError, match="exactly one"):
        dataclasses.replace(meta, prompt_template="no slot")
