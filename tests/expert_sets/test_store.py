"""Expert-set file format: round trips, atomic saves, and one rejection per kind of bad set."""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from mora_runtime.expert_sets import fingerprint as fingerprints
from mora_runtime.expert_sets import format as set_format
from mora_runtime.expert_sets import store
from mora_runtime.expert_sets.format import (
    DtypeError,
    ExpertSet,
    ExpertSetError,
    ExpertSetMeta,
    FingerprintMismatchError,
    LimitError,
    MalformedMetadataError,
    MalformedTensorFileError,
    MissingFileError,
    ModelKindMismatchError,
    NonFiniteError,
    PathEscapeError,
    ShapeError,
    StoreLimits,
    TensorSetError,
    UnsafeFileError,
    UnsupportedFormatError,
)

RANK = 3
TARGETS = ("q_proj", "v_proj")


def tiny_llama(seed: int = 0, hidden: int = 64) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    return LlamaForCausalLM(config).eval()


def linear_shapes(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    return {
        name: (m.in_features, m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.endswith(TARGETS)
    }


def make_set(
    model: torch.nn.Module, dtype: torch.dtype = torch.float32, name: str = "task-1"
) -> ExpertSet:
    shapes = linear_shapes(model)
    meta = ExpertSetMeta(
        name=name,
        model_kind="causal_lm",
        base_model=fingerprints.base_fingerprint(model, shapes),
        target_modules=tuple(shapes),
        rank=RANK,
        top_k=8,
        tau=0.03,
        threshold=0.2,
        scale=2.0,
        training={"steps": 10, "loss": 1.25},
    )
    gen = torch.Generator().manual_seed(1)
    tensors = {
        path: (torch.randn(RANK, d, generator=gen).to(dtype), torch.randn(RANK, o, generator=gen))
        for path, (d, o) in shapes.items()
    }
    return ExpertSet(meta=meta, tensors=tensors)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_llama()


@pytest.fixture
def good(model: torch.nn.Module, tmp_path: Path) -> tuple[ExpertSet, Path]:
    expert_set = make_set(model)
    return expert_set, store.save_expert_set(expert_set, tmp_path / "store" / "task-1")


def assert_same_set(a: ExpertSet, b: ExpertSet) -> None:
    assert a.meta == b.meta
    assert a.tensors.keys() == b.tensors.keys()
    for path, (a_a, a_b) in a.tensors.items():
        b_a, b_b = b.tensors[path]
        assert a_a.dtype == b_a.dtype and a_b.dtype == b_b.dtype
        assert torch.equal(a_a, b_a) and torch.equal(a_b, b_b)


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


# --- one rejection per kind of bad set ----------------------------------------------------


def edit_json(directory: Path, change: Callable[[dict[str, Any]], None]) -> None:
    path = directory / set_format.METADATA_FILE
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def edit_tensors(directory: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    path = directory / set_format.TENSORS_FILE
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


Q0 = "model.layers.0.self_attn.q_proj"


def _poison(name: str, value: float) -> Callable[[dict[str, torch.Tensor]], None]:
    def change(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name][1, 2] = value

    return change


def _symlink_file(directory: Path, tmp: Path, name: str) -> None:
    target = tmp / f"elsewhere-{name}"
    os.replace(directory / name, target)
    os.symlink(target, directory / name)


def _outside_symlink(directory: Path, tmp: Path) -> Path:
    outside = tmp / "outside" / "task-1"
    outside.parent.mkdir()
    os.replace(directory, outside)
    os.symlink(outside, directory)
    return directory


# Each case: (corrupt(directory, tmp_path) -> directory to load or None, load kwargs,
#             expected error class, text the message must contain).
BAD_SETS: dict[str, tuple[Callable[[Path, Path], Path | None], dict[str, Any], type, str]] = {
    "missing_directory": (lambda d, t: t / "nope", {}, MissingFileError, "nope"),
    "missing_tensor_file": (
        lambda d, t: (d / set_format.TENSORS_FILE).unlink(),
        {},
        MissingFileError,
        set_format.TENSORS_FILE,
    ),
    "missing_json": (
        lambda d, t: (d / set_format.METADATA_FILE).unlink(),
        {},
        MissingFileError,
        set_format.METADATA_FILE,
    ),
    "missing_tensor": (
        lambda d, t: edit_tensors(d, lambda ts: ts.pop(f"{Q0}.B")),
        {},
        TensorSetError,
        f"{Q0}.B",
    ),
    "extra_tensor": (
        lambda d, t: edit_tensors(d, lambda ts: ts.update(extra=torch.zeros(3, 64))),
        {},
        TensorSetError,
        "extra",
    ),
    "renamed_tensor": (
        lambda d, t: edit_tensors(d, lambda ts: ts.update({f"{Q0}.C": ts.pop(f"{Q0}.A")})),
        {},
        TensorSetError,
        f"{Q0}.C",
    ),
    "wrong_rank_shape": (
        lambda d, t: edit_tensors(d, lambda ts: ts.update({f"{Q0}.A": torch.zeros(2, 64)})),
        {},
        ShapeError,
        f"{Q0}.A",
    ),
    "wrong_out_shape": (
        lambda d, t: edit_tensors(d, lambda ts: ts.update({f"{Q0}.B": torch.zeros(3, 65)})),
        {},
        ShapeError,
        f"{Q0}.B",
    ),
    "int_dtype": (
        lambda d, t: edit_tensors(d, lambda ts: ts.update({f"{Q0}.A": ts[f"{Q0}.A"].int()})),
        {},
        DtypeError,
        f"{Q0}.A",
    ),
    "nan": (lambda d, t: edit_tensors(d, _poison(f"{Q0}.B", float("nan"))), {}, NonFiniteError, Q0),
    "inf": (
        lambda d, t: edit_tensors(d, _poison(f"{Q0}.A", float("-inf"))),
        {},
        NonFiniteError,
        Q0,
    ),
    "garbage_tensor_file": (
        lambda d, t: (d / set_format.TENSORS_FILE).write_bytes(b"\x10\x00" * 64),
        {},
        MalformedTensorFileError,
        set_format.TENSORS_FILE,
    ),
    "wrong_model_kind": (lambda d, t: None, {"expected_kind": "clip"}, ModelKindMismatchError, ""),
    "oversize_file": (
        lambda d, t: None,
        {"limits": StoreLimits(max_file_bytes=1000)},
        LimitError,
        set_format.TENSORS_FILE,
    ),
    "oversize_metadata": (
        lambda d, t: None,
        {"limits": StoreLimits(max_metadata_bytes=100)},
        LimitError,
        set_format.METADATA_FILE,
    ),
    "too_many_tensors": (lambda d, t: None, {"limits": StoreLimits(max_tensors=7)}, LimitError, ""),
    "too_many_tensors_in_file": (
        lambda d, t: edit_tensors(d, lambda ts: ts.update(x=torch.zeros(1), y=torch.zeros(1))),
        {"limits": StoreLimits(max_tensors=9)},
        LimitError,
        "10 tensors",
    ),
    "rank_too_large": (lambda d, t: None, {"limits": StoreLimits(max_rank=2)}, LimitError, "rank"),
    "malformed_json": (
        lambda d, t: (d / set_format.METADATA_FILE).write_text('{"format": "mora-expert-set",'),
        {},
        MalformedMetadataError,
        "JSON",
    ),
    "json_not_object": (
        lambda d, t: (d / set_format.METADATA_FILE).write_text("[1, 2]"),
        {},
        MalformedMetadataError,
        "object",
    ),
    "nan_in_json": (
        lambda d, t: (d / set_format.METADATA_FILE).write_text(
            (d / set_format.METADATA_FILE).read_text().replace('"tau": 0.03', '"tau": NaN')
        ),
        {},
        MalformedMetadataError,
        "NaN",
    ),
    "duplicate_json_key": (
        lambda d, t: (d / set_format.METADATA_FILE).write_text(
            (d / set_format.METADATA_FILE).read_text().replace('"rank": 3', '"rank": 3, "rank": 4')
        ),
        {},
        MalformedMetadataError,
        "duplicate",
    ),
    "missing_field": (
        lambda d, t: edit_json(d, lambda j: j.pop("rank")),
        {},
        MalformedMetadataError,
        "rank",
    ),
    "unknown_field": (
        lambda d, t: edit_json(d, lambda j: j.update(ranks=3)),
        {},
        MalformedMetadataError,
        "ranks",
    ),
    "wrong_field_type": (
        lambda d, t: edit_json(d, lambda j: j.update(rank="3")),
        {},
        MalformedMetadataError,
        "rank",
    ),
    "bool_as_int": (
        lambda d, t: edit_json(d, lambda j: j.update(top_k=True)),
        {},
        MalformedMetadataError,
        "top_k",
    ),
    "target_not_in_fingerprint": (
        lambda d, t: edit_json(d, lambda j: j["base_model"]["modules"].pop(Q0)),
        {},
        MalformedMetadataError,
        Q0,
    ),
    "unknown_format_version": (
        lambda d, t: edit_json(d, lambda j: j.update(format_version=3)),
        {},
        UnsupportedFormatError,
        "format_version",
    ),
    "wrong_format_string": (
        lambda d, t: edit_json(d, lambda j: j.update(format="peft-lora")),
        {},
        UnsupportedFormatError,
        "peft-lora",
    ),
    "tensor_file_is_fifo": (
        lambda d, t: (
            (d / set_format.TENSORS_FILE).unlink(),
            os.mkfifo(d / set_format.TENSORS_FILE),
        ),
        {},
        UnsafeFileError,
        set_format.TENSORS_FILE,
    ),
    "symlinked_tensor_file": (
        lambda d, t: _symlink_file(d, t, set_format.TENSORS_FILE),
        {},
        PathEscapeError,
        set_format.TENSORS_FILE,
    ),
    "symlinked_json": (
        lambda d, t: _symlink_file(d, t, set_format.METADATA_FILE),
        {},
        PathEscapeError,
        set_format.METADATA_FILE,
    ),
    "dotdot_escape": (
        lambda d, t: d.parent / ".." / "elsewhere" / "task-1",
        {"store_root": "STORE"},
        PathEscapeError,
        "outside",
    ),
    "symlinked_dir_escape": (_outside_symlink, {"store_root": "STORE"}, PathEscapeError, "outside"),
    "symlinked_dir_no_root": (_outside_symlink, {}, PathEscapeError, "symlink"),
}


@pytest.mark.parametrize("case", sorted(BAD_SETS))
def test_bad_set_is_rejected_with_its_own_error(
    case: str, good: tuple[ExpertSet, Path], tmp_path: Path, model: torch.nn.Module
) -> None:
    corrupt, kwargs, error, text = BAD_SETS[case]
    _, directory = good
    if error is PathEscapeError and case == "dotdot_escape":
        # A real set outside the store, reachable only through `..`.
        store.save_expert_set(good[0], tmp_path / "elsewhere" / "task-1")
    kwargs = {k: (directory.parent if v == "STORE" else v) for k, v in kwargs.items()}
    target = corrupt(directory, tmp_path)
    target = target if isinstance(target, Path) else directory
    with pytest.raises(ExpertSetError) as info:
        store.load_expert_set(target, **kwargs)
    assert type(info.value) is error, f"{case}: got {type(info.value).__name__}: {info.value}"
    assert text in str(info.value)
    assert isinstance(info.value, ValueError)


def test_the_good_set_itself_loads(good: tuple[ExpertSet, Path]) -> None:
    # The table above corrupts this set; it must be acceptable before it is corrupted.
    assert_same_set(good[0], store.load_expert_set(good[1], store_root=good[1].parent))


@pytest.mark.parametrize(
    "other",
    [
        pytest.param(lambda: tiny_llama(seed=1), id="same_shapes_other_weights"),
        pytest.param(lambda: tiny_llama(seed=0, hidden=128), id="other_shapes"),
    ],
)
def test_fingerprint_of_another_model_is_rejected(good: tuple[ExpertSet, Path], other) -> None:
    other_model = other()
    expected = fingerprints.base_fingerprint(other_model, linear_shapes(other_model))
    with pytest.raises(FingerprintMismatchError) as info:
        store.load_expert_set(good[1], expected_fingerprint=expected)
    if expected["modules"] != good[0].meta.base_model["modules"]:
        assert "model.layers.0.self_attn.q_proj" in str(info.value)  # names the module
    else:
        assert "weights" in str(info.value)


def test_expected_fingerprint_may_depend_on_the_set(
    good: tuple[ExpertSet, Path], model: torch.nn.Module
) -> None:
    # A server patches more modules than a set may target: it fingerprints the set's modules.
    all_shapes = {
        name: (m.in_features, m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and "layers" in name
    }

    def expected(meta: ExpertSetMeta) -> dict[str, Any]:
        return fingerprints.base_fingerprint(
            model, {p: all_shapes[p] for p in meta.base_model["modules"]}
        )

    store.load_expert_set(good[1], expected_fingerprint=expected)
    with pytest.raises(FingerprintMismatchError, match="different module sets"):
        store.load_expert_set(
            good[1], expected_fingerprint=fingerprints.base_fingerprint(model, all_shapes)
        )


def test_pickle_file_is_refused_and_never_opened(
    good: tuple[ExpertSet, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, (f"touch {marker}",))

    pickle_path = good[1] / "extra_weights.bin"
    pickle_path.write_bytes(pickle.dumps(Exploit()))

    def forbidden(*args: Any, **kwargs: Any) -> None:
        pytest.fail("a pickle loader was called")

    real_open, real_os_open = open, os.open

    def guarded_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        if str(file).endswith(".bin"):
            pytest.fail(f"{file} was opened")
        return real_open(file, *args, **kwargs)

    def guarded_os_open(path: Any, *args: Any, **kwargs: Any) -> int:
        if str(path).endswith(".bin"):
            pytest.fail(f"{path} was opened")
        return real_os_open(path, *args, **kwargs)

    for module, name in [(pickle, "load"), (pickle, "loads"), (torch, "load")]:
        monkeypatch.setattr(module, name, forbidden)
    monkeypatch.setattr("builtins.open", guarded_open)
    monkeypatch.setattr(os, "open", guarded_os_open)
    with pytest.raises(UnsafeFileError, match=r"extra_weights\.bin"):
        store.load_expert_set(good[1])
    assert not marker.exists()


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
    edit_tensors(directory, _poison(f"{Q0}.B", 1e5))  # fits float32, not float16
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
