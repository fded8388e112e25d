"""Task data formats: valid files load, malformed ones fail naming the line and the fault."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from mora_runtime.learn.data import (
    DataError,
    ImageDataset,
    LMExample,
    hash_images,
    hash_lm_examples,
    read_image_data,
    read_lm_jsonl,
    write_image_folder,
    write_lm_jsonl,
)
from mora_runtime.learn.export import export_task, resolve_task
from mora_runtime.learn.suites_clip import task_data
from mora_runtime.learn.suites_lm import TASKS


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def image(colour: tuple[int, int, int] = (255, 0, 0)) -> Image.Image:
    return Image.new("RGB", (8, 8), colour)


# --- LM JSONL ------------------------------------------------------------------------------


def test_lm_jsonl_both_record_forms(tmp_path) -> None:
    path = write(
        tmp_path / "d.jsonl",
        '{"prompt": "2+2=", "completion": " 4", "id": 7}\n\n{"text": "hello world"}\n',
    )
    assert read_lm_jsonl(path) == [LMExample("2+2=", " 4"), LMExample("", "hello world")]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('{"prompt": "a", "completion": "b"}\n{"prompt": "a",', "line 2: not valid JSON"),
        ('["prompt", "completion"]', "line 1: expected a JSON object, got list"),
        ('{"prompt": "a"}', "line 1: missing field 'completion'"),
        ('{"prompt": "a", "completion": 3}', "line 1: field 'completion' must be a string"),
        ('{"prompt": "a", "completion": "  "}', "line 1: field 'completion' is empty"),
        ('{"text": "a", "prompt": "b", "completion": "c"}', "line 1: give either"),
        ('\n\n{"question": "a", "answer": "b"}', 'line 3: needs "prompt" and "completion"'),
        ("\n \n", "no records"),
    ],
)
def test_lm_jsonl_errors_name_line_and_fault(tmp_path, text, match) -> None:
    path = write(tmp_path / "bad.jsonl", text)
    with pytest.raises(DataError, match=match) as info:
        read_lm_jsonl(path)
    assert str(path) in str(info.value)


def test_lm_missing_and_binary_files(tmp_path) -> None:
    with pytest.raises(DataError, match="no such file"):
        read_lm_jsonl(tmp_path / "absent.jsonl")
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(DataError, match="not UTF-8"):
        read_lm_jsonl(tmp_path / "bin.jsonl")


def test_lm_round_trip_keeps_content_and_hash(tmp_path) -> None:
    examples = TASKS["dates"].examples("train", 12)
    path = write_lm_jsonl(tmp_path / "train.jsonl", examples)
    again = read_lm_jsonl(path)
    assert again == examples
    assert hash_lm_examples(again) == hash_lm_examples(examples)
    assert hash_lm_examples(again[:-1]) != hash_lm_examples(examples)


# --- CLIP images -----------------------------------------------------------------------------


def test_image_folder_and_manifests_agree(tmp_path) -> None:
    folder = tmp_path / "folder"
    for label, colour in (("red dot", (255, 0, 0)), ("blue dot", (0, 0, 255))):
        (folder / label).mkdir(parents=True)
        image(colour).save(folder / label / "a.png")
    from_folder = read_image_data(folder)
    assert from_folder.class_names == ("blue dot", "red dot")
    assert from_folder.labels == (0, 1)

    rows = [("folder/red dot/a.png", "red dot"), ("folder/blue dot/a.png", "blue dot")]
    jsonl = write(
        tmp_path / "m.jsonl", "\n".join(json.dumps({"image": i, "label": c}) for i, c in rows)
    )
    csv = write(tmp_path / "m.csv", "label,image\n" + "\n".join(f"{c},{i}" for i, c in rows))
    for manifest in (jsonl, csv):
        data = read_image_data(manifest)
        assert data.class_names == from_folder.class_names
        assert hash_images(data) == hash_images(from_folder)  # order does not matter


@pytest.mark.parametrize(
    ("name", "text", "match"),
    [
        ("m.jsonl", '{"image": "x.png"}', "line 1: missing field 'label'"),
        ("m.jsonl", '{"image": "x.png", "label": "a"}\nnope', "line 2: not valid JSON"),
        ("m.jsonl", '{"image": "absent.png", "label": "a"}', "line 1: image file .* not exist"),
        ("m.jsonl", '{"image": "junk.png", "label": "a"}', "line 1: cannot read image"),
        ("m.jsonl", '{"image": "ok.png", "label": "a/b"}', "line 1: class name 'a/b'"),
        ("m.csv", "path,label\nok.png,a", "line 1: header must name columns"),
        ("m.csv", "image,label\nok.png,a\nok.png", "line 3: expected 2 columns, got 1"),
        ("m.csv", "image,label\nok.png,", "line 2: empty label"),
        ("m.csv", "", "empty manifest"),
    ],
)
def test_manifest_errors_name_line_and_fault(tmp_path, name, text, match) -> None:
    image().save(tmp_path / "ok.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=match):
        read_image_data(write(tmp_path / name, text))


def test_image_folder_errors(tmp_path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        read_image_data(empty)
    (empty / "cats").mkdir()
    (empty / "cats" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="cats: class folder holds no images"):
        read_image_data(empty)
    with pytest.raises(DataError, match="no such file or directory"):
        read_image_data(tmp_path / "absent")
    with pytest.raises(DataError, match="expected an image folder"):
        read_image_data(write(tmp_path / "data.txt", "x"))
    with pytest.raises(DataError, match="one label per image"):
        ImageDataset(("a",), (image(),), ())


def test_image_folder_round_trip_keeps_pixels(tmp_path) -> None:
    data = task_data("shapes", "test", per_class=2)
    again = read_image_data(write_image_folder(tmp_path / "shapes", data))
    assert sorted(again.class_names) == sorted(data.class_names)
    assert hash_images(again) == hash_images(data)


# --- export --------------------------------------------------------------------------------


def test_export_writes_learnable_formats(tmp_path) -> None:
    written = export_task("lm/units", tmp_path / "units", train_size=5, test_size=3)
    assert len(read_lm_jsonl(written["train"])) == 5
    assert read_lm_jsonl(written["test"]) == TASKS["units"].examples("test", 3)
    written = export_task("glyphs", tmp_path / "glyphs", train_size=2, test_size=1)
    train = read_image_data(written["train"])
    assert len(train) == 2 * len(train.class_names)
    assert hash_images(train) == hash_images(task_data("glyphs", "train", per_class=2))
    with pytest.raises(FileExistsError):
        export_task("glyphs", tmp_path / "glyphs")


def test_task_names_resolve() -> None:
    assert resolve_task("dates") == ("lm", "dates")
    assert resolve_task("clip/mnist") == ("clip", "mnist")
    with pytest.raises(ValueError, match="unknown task"):
        resolve_task("lm/mnist")
    with pytest.raises(ValueError, match="unknown suite"):
        resolve_task("audio/x")
