"""Loading a local Hugging Face CLIP directory for zero-shot classification.

The default CLIP is such a directory, prepared once by `mora models prepare` (its training
recipe lives in learn/pretrain_clip.py); any other local HF CLIP directory loads through the
same code path. Nothing here reaches a model hub (`local_files_only=True` everywhere).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mora_runtime.paths import default_clip_dir

if TYPE_CHECKING:
    from PIL import Image
    from transformers import CLIPModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

LABELS_FILENAME = "labels.json"


class ClipNotAvailableError(RuntimeError):
    """A CLIP directory cannot be found or read: the user fixes the path, it is not a bug."""


@dataclass(frozen=True)
class LoadedClip:
    """A CLIP model ready for zero-shot classification: eval mode, frozen, on `device`."""

    model: CLIPModel
    tokenizer: PreTrainedTokenizerBase
    image_processor: Any
    base_labels: tuple[str, ...]
    model_dir: Path
    device: torch.device
    dtype: torch.dtype = torch.float32
    # label -> prompt template with "{}" (from labels.json); classify falls back beyond it.
    label_templates: Mapping[str, str] = field(default_factory=dict)


def pixel_values(image_processor: Any, images: Sequence[Image.Image]) -> torch.Tensor:
    """[B, 3, H, W] float32 model inputs for PIL images."""
    return image_processor(images=list(images), return_tensors="pt")["pixel_values"]


def text_inputs(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]) -> dict:
    return tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_clip(
    model_dir: Path | str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> LoadedClip:
    """Load a local HF CLIP directory (None: the prepared default).

    The base parameters are frozen (`requires_grad=False`): only experts ever learn.
    """
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    directory = default_clip_dir() if model_dir is None else Path(model_dir).expanduser()
    if not (directory / "config.json").is_file():
        hint = " (prepare it with `mora models prepare`)" if model_dir is None else ""
        raise ClipNotAvailableError(f"{directory} is not a Hugging Face model directory{hint}")
    target_device = default_device() if device is None else torch.device(device)
    target_dtype = torch.float32 if dtype is None else dtype
    start = time.perf_counter()
    try:
        model = CLIPModel.from_pretrained(directory, local_files_only=True, dtype=target_dtype)
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        image_processor = AutoImageProcessor.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ClipNotAvailableError(
            f"Cannot load a CLIP model from {directory}: {error}"
        ) from error
    model.to(target_device).eval().requires_grad_(False)
    base_labels, templates = _read_labels(directory)
    logger.info(
        "Loaded CLIP %s on %s in %.2f s (%d base labels)",
        directory,
        target_device,
        time.perf_counter() - start,
        len(base_labels),
    )
    return LoadedClip(
        model=model,
        tokenizer=tokenizer,
        image_processor=image_processor,
        base_labels=base_labels,
        model_dir=directory,
        device=target_device,
        dtype=target_dtype,
        label_templates=templates,
    )


def _read_labels(directory: Path) -> tuple[tuple[str, ...], dict[str, str]]:
    """(base labels, label -> template) from labels.json; a CLIP without one has none."""
    path = directory / LABELS_FILENAME
    if not path.is_file():
        return (), {}
    try:
        data = json.loads(path.read_text())
        labels = tuple(str(label) for label in data["labels"])
        template = data.get("prompt_template")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ClipNotAvailableError(f"{path} is not a valid labels file: {error}") from error
    if isinstance(template, str) and "{}" in template:
        return labels, dict.fromkeys(labels, template)
    return labels, {}
