"""Expert-set files: round trips, atomic saves, fingerprints, metadata validation, model
checks and store paths (bad files, one rejection each: test_store_rejections.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from mora_runtime.expert_sets import fingerprint as fingerprints
from mora_runtime.expert_sets import format as set_format
from mora_runtime.expert_sets import store
from mora_runtime.expert_sets.format import (
    ExpertSet,
    ExpertSetMeta,
    LimitError,
    MalformedMetadataError,
    NonFiniteError,
    PathEscapeError,
    ShapeError,
    StoreLimits,
    TensorSetError,
)
from tests.expert_sets.helpers import (
    Q0,
    RANK,
    assert_same_set,
    edit_tensors,
    linear_shapes,
    make_set,
    poison,
    tiny_llama,
)

# --- round trips and atomic saves ---------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_save_load_round_trips_bit_for_bit(model: torch.nn.Module, tmp_path: Path, dtype) -> None:
    expert_set = make_set(model, dtype)
    directory = store.save_expert_set(expert_set, tmp_path / "task-1")
    assert sorted(os.listdir(directory)) == sorted(
        [set_format.METADATA_FILE, set_format.TENSORS_FILE]
    )
    fingerprint = fingerprints.base_fingerprint(model, linear_shapes(model))
    loaded = store.load_expert_set(
        directory, expected_fingerprint=fingerprint, expected_kind="causal_lm", store_root=tmp_path
    )
    assert_same_set(expert_set, loaded)
    assert (
        json.loads((directory / set_format.METADATA_FILE).read_text())["format"]
        == set_format.FORMAT
    )


def test_save_accepts_views_of_one_buffer(model: torch.nn.Module, tmp_path: Path) -> None:
    # A pool keeps every expert in one slot buffer; a set is a view of some rows of it.
    expert_set = make_set(model)
    views = {}
    for path, (a, b) in expert_set.tensors.items():
        buffer = torch.cat([a.t(), torch.zeros(a.shape[1], 2)], dim=1)  # [D, r + 2]
        views[path] = (buffer[:, :RANK].t(), b)  # non-contiguous, shares storage
    viewed = ExpertSet(meta=expert_set.meta, tensors=views)
    loaded = store.load_expert_set(store.save_expert_set(viewed, tmp_path / "s"))
    assert_same_set(expert_set, loaded)


def test_meta_round_trips_through_json(good: tuple[ExpertSet, Path]) -> None:
    meta = good[0].meta
    assert ExpertSetMeta.from_json_dict(json.loads(json.dumps(meta.to_json_dict()))) == meta


def test_save_refuses_existing_directory_unless_overwrite(
    model: torch.nn.Module, good: tuple[ExpertSet, Path]
) -> None:
    _, directory = good
    replacement = make_set(model, name="task-2")
    with pytest.raises(FileExistsError):
        store.save_expert_set(replacement, directory)
    store.save_expert_set(replacement, directory, overwrite=True)
    assert store.load_expert_set(directory).meta.name == "task-2"
    assert os.listdir(directory.parent) == [directory.name]  # no temp or old dirs left


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("fail_in", ["_write_metadata", "_fsync_dir", "_move_into_place"])
def test_interrupted_save_leaves_no_partial_set(
    model: torch.nn.Module,
    good: tuple[ExpertSet, Path],
    monkeypatch: pytest.MonkeyPatch,
    fail_in: str,
    overwrite: bool,
) -> None:
    old_set, directory = good
    target = directory if overwrite else directory.parent / "task-2"

    def boom(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt("injected")

    monkeypatch.setattr(store, fail_in, boom)
    with pytest.raises(KeyboardInterrupt):
        store.save_expert_set(make_set(model, name="task-2"), target, overwrite=overwrite)
    monkeypatch.undo()
    assert sorted(os.listdir(directory.parent)) == [directory.name]
    assert_same_set(old_set, store.load_expert_set(directory))


def test_failed_swap_restores_the_old_set(
    model: torch.nn.Module, good: tuple[ExpertSet, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The old set has been moved aside when renaming the new one in fails: it must come back.
    old_set, directory = good
    real_rename = os.rename

    def rename(src: Any, dst: Any) -> None:
        if str(src).endswith(".tmp"):
            raise OSError("injected")
        real_rename(src, dst)

    monkeypatch.setattr(store.os, "rename", rename)
    with pytest.raises(OSError, match="injected"):
        store.save_expert_set(make_set(model, name="task-2"), directory, overwrite=True)
    monkeypatch.undo()
    assert sorted(os.listdir(directory.parent)) == [directory.name]
    assert_same_set(old_set, store.load_expert_set(directory))


def test_save_validates_before_writing(model: torch.nn.Module, tmp_path: Path) -> None:
    expert_set = make_set(model)
    path = next(iter(expert_set.tensors))
    expert_set.tensors[path][0][0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=path):
        store.save_expert_set(expert_set, tmp_path / "bad")
    assert os.listdir(tmp_path) == []


# --- fingerprints -------------------------------------------------------------------------


def test_fingerprint_identifies_the_checkpoint(model: torch.nn.Module) -> None:
    shapes = linear_shapes(model)
    fp = fingerprints.base_fingerprint(model, shapes)
    assert fp["architecture"] == "LlamaForCausalLM" and fp["model_type"] == "llama"
    assert fp["modules"] == {p: list(s) for p, s in sorted(shapes.items())}
    assert (
        fingerprints.base_fingerprint(tiny_llama(seed=0), shapes) == fp
    )  # same weights, same hash
    assert fingerprints.base_fingerprint(tiny_llama(seed=1), shapes)["hash"] != fp["hash"]
    subset = dict(list(shapes.items())[:1])
    assert fingerprints.base_fingerprint(model, subset)["hash"] != fp["hash"]
    # A bf16 copy of the same checkpoint matches: serving in bf16 must accept fp32-made sets.
    assert (
        fingerprints.base_fingerprint(tiny_llama(seed=0).bfloat16(), shapes)["hash"] == fp["hash"]
    )


# --- metadata validation ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "text"),
    [
        ("name", "", "name"),
        ("name", "../evil", "name"),
        ("model_kind", "seq2seq", "model_kind"),
        ("rank", 0, "rank"),
        ("top_k", 1.5, "top_k"),
        ("tau", 0.0, "tau"),
        ("tau", float("inf"), "tau"),
        ("threshold", 1.5, "threshold"),
        ("scale", "2", "scale"),
        ("class_names", "cat", "class_names"),
        ("class_names", ["cat", 3], "class_names"),
        ("created_at", "yesterday", "created_at"),
        ("created_at", "2025-01-01T00:00:00+02:00", "UTC"),
        ("created_at", "2025-01-01T00:00:00", "UTC"),
        ("target_modules", [], "target_modules"),
        ("target_modules", [Q0, Q0], "duplicates"),
        ("target_modules", ["model..x"], "dotted"),
        ("training", [1], "training"),
        ("base_model", {"architecture": "X"}, "base_model"),
        # Finite as a JSON double, not as what a replica stores: refused before any replica.
        ("scale", 1e300, "scale"),
        ("scale", -1e39, "scale"),
        ("scale", 1e5, "scale"),
        ("scale", "NaN", "scale"),
        pytest.param("scale", 10**400, "scale", id="scale-int-beyond-double"),
        ("tau", -0.5, "tau"),
        ("tau", 1e-300, "tau"),
        ("tau", 1e300, "tau"),
        ("tau", "nan", "tau"),
        ("top_k", 0, "top_k"),
        ("top_k", 10**9, "top_k"),
        ("rank", 10**9, "rank"),
        ("threshold", float("nan"), "threshold"),
    ],
)
def test_bad_metadata_field_is_rejected(
    good: tuple[ExpertSet, Path], field: str, value: Any, text: str
) -> None:
    data = good[0].meta.to_json_dict()
    data[field] = value
    with pytest.raises(MalformedMetadataError, match=text):
        ExpertSetMeta.from_json_dict(data)


def test_target_modules_are_stored_sorted(good: tuple[ExpertSet, Path]) -> None:
    data = good[0].meta.to_json_dict()
    data["target_modules"] = list(reversed(data["target_modules"]))
    meta = ExpertSetMeta.from_json_dict(data)
    assert list(meta.target_modules) == sorted(data["target_modules"]) and meta == good[0].meta


# --- model checks and store paths ---------------------------------------------------------


def test_validate_against_model(good: tuple[ExpertSet, Path], model: torch.nn.Module) -> None:
    shapes = linear_shapes(model)
    store.validate_against_model(good[0], shapes)
    with pytest.raises(TensorSetError, match=Q0):
        store.validate_against_model(good[0], {k: v for k, v in shapes.items() if k != Q0})
    with pytest.raises(ShapeError, match=Q0):
        store.validate_against_model(good[0], {**shapes, Q0: (64, 32)})


@pytest.mark.parametrize(
    ("relative", "ok"),
    [
        ("task-1", True),
        ("team/task-1", True),
        ("inside-link", True),
        ("", False),
        (".", False),
        ("/etc/passwd", False),
        ("../x", False),
        ("team/../task-1", False),
        ("escape-link", False),
        ("escape-link/sub", False),
        ("a\0b", False),
    ],
)
def test_resolve_in_store(tmp_path: Path, relative: str, ok: bool) -> None:
    root = tmp_path / "store"
    (root / "team" / "task-1").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    os.symlink(root / "team", root / "inside-link")
    os.symlink(tmp_path / "outside", root / "escape-link")
    if ok:
        resolved = store.resolve_in_store(root, relative)
        assert resolved.is_relative_to(root.resolve())
    else:
        with pytest.raises(PathEscapeError):
            store.resolve_in_store(root, relative)


def test_huge_module_dims_are_rejected(good: tuple[ExpertSet, Path]) -> None:
    data = good[0].meta.to_json_dict()
    data["base_model"]["modules"][Q0] = [10**12, 64]
    with pytest.raises(MalformedMetadataError, match=r"\[D, O\]"):
        ExpertSetMeta.from_json_dict(data)


def test_extreme_but_servable_fields_are_accepted(good: tuple[ExpertSet, Path]) -> None:
    data = good[0].meta.to_json_dict()
    data.update(scale=-1e4, tau=1e-6, top_k=1, threshold=-1.0, rank=RANK)
    meta = ExpertSetMeta.from_json_dict(data)
    assert (meta.scale, meta.tau, meta.threshold) == (-1e4, 1e-6, -1.0)


def test_tensor_that_overflows_the_serving_dtype_is_rejected(
    good: tuple[ExpertSet, Path],
) -> None:
    directory = good[1]
    # Finite in float64 as stored, infinite once a float32 replica casts it.
    edit_tensors(directory, lambda ts: ts.update({f"{Q0}.A": ts[f"{Q0}.A"].double() * 1e300}))
    with pytest.raises(NonFiniteError, match=r"overflow torch\.float32"):
        store.load_expert_set(directory)
    assert store.load_expert_set(directory, serving_dtype=None).meta == good[0].meta


def test_serving_dtype_narrower_than_float32_is_checked(good: tuple[ExpertSet, Path]) -> None:
    directory = good[1]
    edit_tensors(directory, poison(f"{Q0}.B", 1e5))  # fits float32, not float16
    store.load_expert_set(directory)
    with pytest.raises(NonFiniteError, match=r"overflow torch\.float16"):
        store.load_expert_set(directory, serving_dtype=torch.float16)


def test_save_refuses_tensors_that_overflow_float32(model: torch.nn.Module, tmp_path: Path) -> None:
    expert_set = make_set(model)
    a, b = expert_set.tensors[Q0]
    tensors = {**expert_set.tensors, Q0: (a.double() * 1e300, b)}
    with pytest.raises(NonFiniteError, match="overflow"):
        store.save_expert_set(ExpertSet(expert_set.meta, tensors), tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_read_metadata_applies_the_limits(good: tuple[ExpertSet, Path]) -> None:
    with pytest.raises(LimitError, match="rank"):
        store.read_metadata(good[1], limits=StoreLimits(max_rank=2))
