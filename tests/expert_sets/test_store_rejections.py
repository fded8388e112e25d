"""Expert-set files: one rejection per kind of bad set, each with its own error."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

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
from tests.expert_sets.helpers import (
    Q0,
    assert_same_set,
    edit_json,
    edit_tensors,
    linear_shapes,
    poison,
    tiny_llama,
)

# --- one rejection per kind of bad set ----------------------------------------------------


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
    "nan": (lambda d, t: edit_tensors(d, poison(f"{Q0}.B", float("nan"))), {}, NonFiniteError, Q0),
    "inf": (
        lambda d, t: edit_tensors(d, poison(f"{Q0}.A", float("-inf"))),
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
