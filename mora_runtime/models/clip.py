"""CLIP zero-shot classification with the MoRA expert pool applied to both towers.

One call classifies a batch of images against one label set, all under one pool snapshot:
label prompts go through the text tower once (cached per pool version and label set), the
images through the vision tower in one batched forward, and the logits are computed exactly
as `CLIPModel.forward` computes them, so an empty pool reproduces the base model bit for bit.

A label's prompt comes from its template: one registered on the classifier or given by the
base model's labels.json, else the one carried by a loaded expert set that declares the label
(expert-set format version 2), else DEFAULT_TEMPLATE. Nothing here knows any training data.

Shape legend: B = images, L = labels, E = projection dim.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor

from mora_runtime.experts.context import ForwardContext, forward_context
from mora_runtime.experts.patching import patch_model
from mora_runtime.experts.pool import ExpertPool
from mora_runtime.experts.slots import ExpertSetEntry, PoolSnapshot, RoutingConfig
from mora_runtime.experts.stats import SequenceRouting, StepRouting
from mora_runtime.models.clip_loading import LoadedClip, pixel_values

DEFAULT_TEMPLATE = "a photo of {}"


def prompt_for(
    label: str, templates: Mapping[str, str] | None = None, default: str = DEFAULT_TEMPLATE
) -> str:
    """The text prompt of a label: its template in `templates`, else `default`."""
    return ((templates or {}).get(label) or default).replace("{}", label)


def set_templates(sets: Iterable[ExpertSetEntry]) -> dict[str, str]:
    """Class name -> the prompt template of a loaded set that declares it. When several sets
    declare one name, the set whose name sorts first gives it: an order that every replica
    agrees on, however and whenever each loaded the sets (load order and slots differ)."""
    out: dict[str, str] = {}
    for entry in sorted(sets, key=lambda e: e.name):
        template = entry.meta.get("prompt_template")
        if template:
            for label in entry.meta.get("class_names", ()):
                out.setdefault(str(label), str(template))
    return out


@dataclass(frozen=True)
class ImageClassification:
    """One image's labels, most probable first, and what its tokens activated."""

    labels: tuple[str, ...]
    probabilities: tuple[float, ...]
    routing: SequenceRouting  # this image's tokens in the vision tower

    @property
    def top(self) -> str:
        return self.labels[0]


@dataclass(frozen=True, eq=False)
class ClassifyOutput:
    """Result of one `classify` call.

    `logits` [B, L] float32 on CPU, in the order of the given labels. `image_routing` has one
    sequence per image (vision tower); `text_routing` covers the label prompts (one sequence,
    padding not counted) and is None when their embeddings came from the cache.
    """

    results: tuple[ImageClassification, ...]
    logits: Tensor
    pool_version: int
    image_routing: StepRouting
    text_routing: StepRouting | None

    @property
    def text_cached(self) -> bool:
        return self.text_routing is None

    @property
    def routing(self) -> SequenceRouting:
        """Everything this call's forwards activated: all images, plus uncached prompts."""
        total = self.image_routing.total()
        return total if self.text_routing is None else total.merge(self.text_routing.total())


class ClipClassifier:
    """Zero-shot image classification over any label set, with an optional expert pool."""

    def __init__(self, clip: LoadedClip, *, text_cache_size: int = 32) -> None:
        self.clip = clip
        self._pool: ExpertPool | None = None
        self._templates: dict[str, str] = dict(clip.label_templates)
        self._cache: OrderedDict[tuple, Tensor] = OrderedDict()  # key -> [L, E] embeddings
        self._cache_size = text_cache_size
        self._lock = threading.Lock()

    @property
    def pool(self) -> ExpertPool | None:
        return self._pool

    @property
    def device(self) -> torch.device:
        return self.clip.device

    def patch(self, routing: RoutingConfig | None = None, capacity: int = 64) -> ExpertPool:
        """Wrap q/k/v/out_proj/fc1/fc2 of both towers; returns the (empty) pool they read."""
        if self._pool is not None:
            raise ValueError("this classifier's model is already patched")
        self._pool = patch_model(self.clip.model, capacity=capacity, routing=routing)
        self.clear_cache()
        return self._pool

    def register_templates(self, templates: Mapping[str, str]) -> None:
        """Prompt templates ("... {} ...") for labels; they come before the base model's and
        the loaded sets' templates."""
        for label, template in templates.items():
            if template.count("{}") != 1:
                raise ValueError(f"template for {label!r} needs exactly one '{{}}': {template!r}")
        with self._lock:
            self._templates.update(templates)
            self._cache.clear()

    def prompts(
        self,
        labels: Sequence[str],
        snapshot: PoolSnapshot | None = None,
        default: str | None = None,
    ) -> tuple[str, ...]:
        """The text prompts of `labels` under `snapshot`'s sets (default: the pool's latest).
        `default` replaces DEFAULT_TEMPLATE for labels nothing else has a template for (how
        learning builds the prompts of a set that is not loaded yet)."""
        if snapshot is None and self._pool is not None:
            snapshot = self._pool.latest()
        carried = set_templates(snapshot.sets) if snapshot is not None else {}
        fallback = default or DEFAULT_TEMPLATE
        own = self._templates  # registered and base-model templates come first
        return tuple(prompt_for(label, own, carried.get(label, fallback)) for label in labels)

    def prompt(self, label: str, default: str | None = None) -> str:
        return self.prompts((label,), default=default)[0]

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()

    # ------------------------------------------------------------------------ classify
    @torch.inference_mode()
    def classify(
        self,
        images: Sequence[Image.Image],
        labels: Sequence[str],
        *,
        snapshot: PoolSnapshot | None = None,
        top_k: int | None = None,
        threshold: float | None = None,
        max_labels: int | None = None,
    ) -> ClassifyOutput:
        """Rank `labels` for every image; the whole call sees one pool version.

        `snapshot` pins a version (default: the latest, pinned for the call). `top_k` and
        `threshold` override the pool's routing for this call (experts per token, pruning
        delta). `max_labels` keeps only the most probable labels per image.
        """
        labels = _check_labels(labels)
        if not images:
            raise ValueError("classify needs at least one image")
        pool = self._pool
        if pool is None and snapshot is not None:
            raise ValueError("a snapshot was given but the model has no expert pool")
        pinned = snapshot is None and pool is not None
        snap = pool.acquire() if pinned else snapshot
        try:
            text, text_step = self._text_embeds(labels, snap, top_k, threshold)
            image_embeds, image_step = self._image_embeds(images, snap, top_k, threshold)
        finally:
            if pinned:
                pool.release(snap)
        # Exactly CLIPModel.forward's arithmetic (order of operations included).
        logits_per_text = torch.matmul(text, image_embeds.t())  # [L, B]
        logits_per_text = logits_per_text * self.clip.model.logit_scale.exp()
        logits = logits_per_text.t().float().cpu()  # [B, L]
        probs = logits.softmax(dim=-1)
        order = torch.sort(probs, dim=-1, descending=True, stable=True).indices  # [B, L]
        if max_labels is not None:
            order = order[:, : max(1, max_labels)]
        results = tuple(
            ImageClassification(
                labels=tuple(labels[j] for j in order[i].tolist()),
                probabilities=tuple(probs[i, order[i]].tolist()),
                routing=image_step.sequences[i],
            )
            for i in range(len(images))
        )
        return ClassifyOutput(
            results=results,
            logits=logits,
            pool_version=snap.version if snap is not None else 0,
            image_routing=image_step,
            text_routing=text_step,
        )

    # ----------------------------------------------------------------------- towers
    def _context(
        self,
        snap: PoolSnapshot | None,
        n: int,
        top_k: int | None,
        threshold: float | None,
        valid_tokens: Tensor | None = None,
    ) -> ForwardContext | None:
        if self._pool is None or snap is None:
            return None
        return ForwardContext(
            [snap] * n,
            top_k=None if top_k is None else [top_k] * n,
            threshold=None if threshold is None else [threshold] * n,
            valid_tokens=valid_tokens,
        )

    def _text_embeds(
        self,
        labels: tuple[str, ...],
        snap: PoolSnapshot | None,
        top_k: int | None,
        threshold: float | None,
    ) -> tuple[Tensor, StepRouting | None]:
        """[L, E] normalised label embeddings, and the routing when they were computed."""
        prompts = self.prompts(labels, snap)
        key = (snap.version if snap is not None else -1, prompts, top_k, threshold)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return cached, None
        tokens = self.clip.tokenizer(
            list(prompts), padding=True, truncation=True, return_tensors="pt"
        ).to(self.device)
        # One sequence for the whole label set: every prompt sees the same snapshot.
        valid = tokens["attention_mask"].reshape(-1).bool()  # [L * tokens]: not padding
        ctx = self._context(snap, 1, top_k, threshold, valid)
        with _maybe_context(self._pool, ctx):
            embeds = self.clip.model.get_text_features(**tokens).pooler_output
        embeds = embeds / _vector_norm(embeds)  # [L, E]
        with self._lock:
            self._cache[key] = embeds
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return embeds, _collect(ctx, 1)

    def _image_embeds(
        self,
        images: Sequence[Image.Image],
        snap: PoolSnapshot | None,
        top_k: int | None,
        threshold: float | None,
    ) -> tuple[Tensor, StepRouting]:
        """[B, E] normalised image embeddings, and per-image routing."""
        batch = [image.convert("RGB") for image in images]
        pixels = pixel_values(self.clip.image_processor, batch)
        pixels = pixels.to(device=self.device, dtype=self.clip.dtype)  # [B, 3, H, W]
        # One sequence per image, so routing statistics come back per image.
        ctx = self._context(snap, len(batch), top_k, threshold)
        with _maybe_context(self._pool, ctx):
            embeds = self.clip.model.get_image_features(pixel_values=pixels).pooler_output
        embeds = embeds / _vector_norm(embeds)  # [B, E]
        return embeds, _collect(ctx, len(batch))


# --- helpers ------------------------------------------------------------------------------------


def _check_labels(labels: Sequence[str]) -> tuple[str, ...]:
    if isinstance(labels, str):
        raise TypeError("labels must be a sequence of strings, not one string")
    labels = tuple(labels)
    if not labels:
        raise ValueError("classify needs at least one label")
    if any(not isinstance(label, str) or not label.strip() for label in labels):
        raise ValueError("every label must be a non-empty string")
    if len(set(labels)) != len(labels):
        raise ValueError("labels must be distinct")
    return labels


def _vector_norm(x: Tensor) -> Tensor:
    # transformers' CLIP `_get_vector_norm`, kept identical so logits match bit for bit.
    return torch.pow(torch.sum(torch.pow(x, 2), dim=-1, keepdim=True), 0.5)


def _maybe_context(
    pool: ExpertPool | None, ctx: ForwardContext | None
) -> contextlib.AbstractContextManager:
    if pool is None or ctx is None:
        return contextlib.nullcontext()
    return forward_context(pool, ctx)


def _collect(ctx: ForwardContext | None, n: int) -> StepRouting:
    if ctx is None:
        return StepRouting(tuple(SequenceRouting() for _ in range(n)), {})
    return ctx.collect()
