"""Task data formats for `mora learn`: read, validate, hash and write.

Causal LM: JSONL, one object per line, either `{"prompt": ..., "completion": ...}` (the loss
covers the completion only) or `{"text": ...}` (the loss covers every token). Other keys are
ignored, so records may carry metadata.

CLIP: an image folder (one sub-folder per class, named after the class), or a manifest
listing `image` (a path, relative to the manifest's folder) and `label` per record: JSONL, or
CSV with a header row naming those two columns.

Every problem raises `DataError` naming the file, the line and what is wrong. Data hashes
cover the content (texts, labels and pixels), not the bytes of the files, so a suite task and
its exported copy hash the same.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
MANIFEST_SUFFIXES = frozenset({".jsonl", ".csv"})
# Class names become prompts and folder names; keep them on one line and path-safe.
_BAD_LABEL = re.compile(r"[\x00-\x1f/\\]")


class DataError(ValueError):
    """Task data that cannot be used; the message names the file, the line and the fault."""


@dataclass(frozen=True)
class LMExample:
    """One causal-LM training or test record: the loss covers `completion` only."""

    prompt: str
    completion: str


@dataclass(frozen=True)
class ImageDataset:
    """Labelled RGB images; `labels[i]` indexes `class_names`."""

    class_names: tuple[str, ...]
    images: tuple[Image.Image, ...]
    labels: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.images) != len(self.labels):
            raise DataError("an image dataset needs exactly one label per image")
        if not self.images:
            raise DataError("an image dataset needs at least one image")

    def __len__(self) -> int:
        return len(self.images)


# --- causal LM ---------------------------------------------------------------------------


def read_lm_jsonl(path: str | os.PathLike[str]) -> list[LMExample]:
    """Read and validate an LM JSONL file (blank lines are skipped)."""
    path = Path(path)
    lines = _read_text(path).splitlines()
    examples = [
        _lm_record(path, number, line) for number, line in enumerate(lines, start=1) if line.strip()
    ]
    if not examples:
        raise DataError(f"{path}: no records (expected one JSON object per line)")
    return examples


def _lm_record(path: Path, number: int, line: str) -> LMExample:
    where = f"{path} line {number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "prompt" in record or "completion" in record:
        if "text" in record:
            raise DataError(f'{where}: give either "prompt"/"completion" or "text", not both')
        prompt = _string_field(record, "prompt", where, allow_empty=True)
        completion = _string_field(record, "completion", where, allow_empty=False)
        return LMExample(prompt, completion)
    if "text" in record:
        return LMExample("", _string_field(record, "text", where, allow_empty=False))
    keys = ", ".join(sorted(record)) or "none"
    raise DataError(f'{where}: needs "prompt" and "completion", or "text" (found keys: {keys})')


def _string_field(record: dict, key: str, where: str, *, allow_empty: bool) -> str:
    if key not in record:
        raise DataError(f"{where}: missing field {key!r}")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: field {key!r} is empty")
    return value


def write_lm_jsonl(path: str | os.PathLike[str], examples: Iterable[LMExample]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"prompt": e.prompt, "completion": e.completion}) for e in examples]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def hash_lm_examples(examples: Sequence[LMExample]) -> str:
    digest = hashlib.sha256()
    for example in examples:
        digest.update(json.dumps([example.prompt, example.completion]).encode() + b"\n")
    return "sha256:" + digest.hexdigest()


# --- CLIP images -------------------------------------------------------------------------


def read_image_data(path: str | os.PathLike[str]) -> ImageDataset:
    """An image folder (one sub-folder per class) or a JSONL/CSV manifest."""
    path = Path(path)
    if path.is_dir():
        return _read_image_folder(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.suffix.lower() == ".jsonl":
        return _from_records(path, _jsonl_manifest(path))
    if path.suffix.lower() == ".csv":
        return _from_records(path, _csv_manifest(path))
    raise DataError(
        f"{path}: expected an image folder (one sub-folder per class) or a .jsonl/.csv manifest"
    )


def _read_image_folder(root: Path) -> ImageDataset:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"{root}: no class sub-folders (expected {root}/<class name>/<images>)")
    records: list[tuple[str, Path, str]] = []
    for folder in folders:
        _check_label(folder.name, str(folder))
        files = sorted(
            p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not files:
            suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
            raise DataError(f"{folder}: class folder holds no images ({suffixes})")
        records += [(str(file), file, folder.name) for file in files]
    return _dataset(records)


def _jsonl_manifest(path: Path) -> list[tuple[str, Path, str]]:
    records = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: not valid JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object with 'image' and 'label'")
        image = _string_field(record, "image", where, allow_empty=False)
        label = _string_field(record, "label", where, allow_empty=False)
        records.append((where, _manifest_path(path, image), label))
    return records


def _csv_manifest(path: Path) -> list[tuple[str, Path, str]]:
    rows = list(csv.reader(_read_text(path).splitlines()))
    if not rows:
        raise DataError(f"{path}: empty manifest (expected a header row: image,label)")
    header = [cell.strip().lower() for cell in rows[0]]
    if "image" not in header or "label" not in header:
        raise DataError(
            f"{path} line 1: header must name columns 'image' and 'label', got {rows[0]}"
        )
    image_col, label_col = header.index("image"), header.index("label")
    records = []
    for number, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        where = f"{path} line {number}"
        if len(row) != len(header):
            raise DataError(f"{where}: expected {len(header)} columns, got {len(row)}")
        image, label = row[image_col].strip(), row[label_col].strip()
        if not image or not label:
            raise DataError(f"{where}: empty {'image' if not image else 'label'}")
        records.append((where, _manifest_path(path, image), label))
    return records


def _manifest_path(manifest: Path, image: str) -> Path:
    candidate = Path(image).expanduser()
    return candidate if candidate.is_absolute() else manifest.parent / candidate


def _from_records(path: Path, records: list[tuple[str, Path, str]]) -> ImageDataset:
    if not records:
        raise DataError(f"{path}: no records")
    for where, _, label in records:
        _check_label(label, where)
    return _dataset(records)


def _dataset(records: list[tuple[str, Path, str]]) -> ImageDataset:
    class_names = tuple(sorted({label for _, _, label in records}))
    index = {name: i for i, name in enumerate(class_names)}
    images = tuple(_open_image(where, file) for where, file, _ in records)
    return ImageDataset(class_names, images, tuple(index[label] for _, _, label in records))


def _open_image(where: str, file: Path) -> Image.Image:
    if not file.is_file():
        raise DataError(f"{where}: image file {file} does not exist")
    try:
        with Image.open(file) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise DataError(f"{where}: cannot read image {file}: {error}") from None


def _check_label(label: str, where: str) -> None:
    if not label.strip() or _BAD_LABEL.search(label) or label != label.strip():
        raise DataError(
            f"{where}: class name {label!r} must be non-empty, without surrounding spaces, "
            "slashes or control characters"
        )


def write_image_folder(directory: str | os.PathLike[str], data: ImageDataset) -> Path:
    """One sub-folder per class, lossless PNGs: reading it back gives the same pixels."""
    directory = Path(directory)
    counts = dict.fromkeys(data.class_names, 0)
    for image, label in zip(data.images, data.labels, strict=True):
        name = data.class_names[label]
        folder = directory / name
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{counts[name]:05d}.png")
        counts[name] += 1
    return directory


def hash_images(data: ImageDataset) -> str:
    """Order-independent: the same labelled pixels hash the same however they are listed."""
    digests = sorted(
        hashlib.sha256(
            f"{data.class_names[label]}\0{image.mode}\0{image.size}\0".encode() + image.tobytes()
        ).digest()
        for image, label in zip(data.images, data.labels, strict=True)
    )
    return "sha256:" + hashlib.sha256(b"".join(digests)).hexdigest()


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text (byte {error.start})") from None
