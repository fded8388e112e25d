"""Pre-training the default CLIP: a small `CLIPModel` trained once, offline, on the bundled
base domain.

No package ships pretrained CLIP weights, so setup builds one from a config (32x32 images,
patch 4, two 4-layer towers of width 128), a word-level tokenizer over the vocabulary of every
bundled domain, and a `CLIPImageProcessor` for 32x32 inputs, then trains it contrastively on
the base domain (learn/domains.py, "objects") plus an unranked background domain ("sketches":
stroke primitives, so that images unlike any object do not sit next to a base label), with a
text-only word-identity objective over the whole vocabulary (distinct class prompts for unseen
words) and the logit scale capped at 5. It caches the result as an ordinary HF CLIP directory.
The continual domains' images stay unseen, so they are what the expert pool learns.
See docs/research/clip-suite.md.

Serving loads the result with models/clip_loading.py like any other CLIP directory.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from mora_runtime.learn import domains
from mora_runtime.learn.clip_build import (
    ClipRecipe,
    build_clip,
    build_image_processor,
    build_tokenizer,
    save_clip_dir,
    vocabulary,
)
from mora_runtime.learn.trainer import auto_threads
from mora_runtime.models.clip_loading import pixel_values, text_inputs
from mora_runtime.models.materialize import materialize, read_marker
from mora_runtime.paths import default_clip_dir

if TYPE_CHECKING:
    from transformers import CLIPModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# Templates of the word-identity objective (two are drawn per word and step).
_WORD_TEMPLATES = (
    "a photo of a {}.",
    "a drawing of the {}.",
    "an image of {}.",
    "a close up of a {}.",
    "a picture of the {}.",
    "a {}.",
    "a rendering of a {}.",
    "a scan of a {}.",
)


def _word_templates() -> tuple[str, ...]:
    """The generic templates plus every bundled domain's own (long ones included)."""
    names = (*domains.domain_names(), *domains.BACKGROUND_DOMAINS)
    own = (domains.get_domain(name).prompt_template for name in names)
    return tuple(dict.fromkeys((*_WORD_TEMPLATES, *own)))


DEFAULT_RECIPE = ClipRecipe()
# Names everything that shapes the cached weights: a cached model whose marker names another
# recipe is rebuilt. Bump the number when the data or the training code changes.
RECIPE_VERSION = "clip-default/2 " + " ".join(f"{k}={v}" for k, v in asdict(DEFAULT_RECIPE).items())


@dataclass(frozen=True)
class TrainSummary:
    steps: int
    seconds: float
    final_loss: float
    test_accuracy: float
    chance: float


def _param_groups(model: CLIPModel, weight_decay: float) -> list[dict]:
    # No decay on embeddings: words of the continual domains never receive a gradient here,
    # and decay would shrink them towards one shared vector that experts could not separate.
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.ndim < 2 or "embedding" in name:
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _contrastive_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Image->text CE over every class prompt + text->image CE over the batch's images.

    logits [B, C]; a class present in the batch has every image of that class as a positive
    (uniform soft target), so duplicate classes in a batch are not false negatives.
    """
    image_to_text = F.cross_entropy(logits, labels)
    positives = F.one_hot(labels, logits.shape[1]).t().float()  # [C, B]
    present = positives.sum(dim=1) > 0
    targets = positives[present] / positives[present].sum(dim=1, keepdim=True)
    text_to_image = -(targets * logits.t()[present].log_softmax(dim=1)).sum(dim=1).mean()
    return (image_to_text + text_to_image) / 2


def _lr_factor(step: int, recipe: ClipRecipe) -> float:
    warmup = max(1, int(recipe.steps * recipe.warmup_fraction))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, recipe.steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress))


def train_base(
    model: CLIPModel,
    tokenizer: PreTrainedTokenizerBase,
    image_processor: Any,
    recipe: ClipRecipe,
    *,
    progress: bool = True,
    threads: int | None = None,
) -> TrainSummary:
    """Contrastive training of the whole model on the base domain; returns a summary.

    `threads`: intra-op threads (None: the cores other processes leave free)."""
    domain = domains.get_domain(domains.BASE_DOMAIN)
    samples, prompts = [], []
    for name in (domain.name, *recipe.background):
        offset = len(prompts)
        prompts += domains.get_domain(name).prompts()
        samples += [
            (image, offset + label)
            for draw in range(recipe.train_draws)
            for image, label in domains.load_domain(
                name, "train", size=recipe.image_size, seed=draw
            )
        ]
    images = pixel_values(image_processor, [image for image, _ in samples])  # [M, 3, H, W]
    labels = torch.tensor([label for _, label in samples])  # [M]
    text = text_inputs(tokenizer, prompts)
    words = [w for w in vocabulary() if w.isalpha()]

    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, threads) if threads else auto_threads())
    logger.info(
        "Training the default CLIP: %d images of %s, %d steps of %d, %d thread(s)",
        len(labels),
        "+".join((domain.name, *recipe.background)),
        recipe.steps,
        recipe.batch_size,
        torch.get_num_threads(),
    )
    start = time.perf_counter()
    try:
        loss = _train_steps(
            model, images, labels, text, recipe, progress=progress, tokenizer=tokenizer, words=words
        )
    finally:
        torch.set_num_threads(previous)
        model.eval()
    seconds = time.perf_counter() - start
    accuracy = zero_shot_accuracy(model, tokenizer, image_processor, domain.name, "test")
    return TrainSummary(recipe.steps, seconds, loss, accuracy, 1 / len(domain.class_names))


def _train_steps(
    model: CLIPModel,
    images: torch.Tensor,
    labels: torch.Tensor,
    text: Mapping[str, torch.Tensor],
    recipe: ClipRecipe,
    *,
    progress: bool,
    tokenizer: PreTrainedTokenizerBase | None = None,
    words: Sequence[str] = (),
) -> float:
    """AdamW, linear warm-up then cosine decay, shuffled epochs; returns the last loss."""
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(recipe.seed)
    optimizer = torch.optim.AdamW(
        _param_groups(model, recipe.weight_decay), lr=recipe.lr, betas=(0.9, 0.98), eps=1e-6
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, recipe))
    model.train()
    order, cursor, loss_value = torch.randperm(len(labels), generator=generator), 0, math.nan
    bar = tqdm(range(recipe.steps), desc="training default CLIP", disable=not progress)
    for _ in bar:
        if cursor + recipe.batch_size > len(order):
            order, cursor = torch.randperm(len(labels), generator=generator), 0
        batch = order[cursor : cursor + recipe.batch_size]  # [b]
        cursor += recipe.batch_size
        logits = model(pixel_values=images[batch], **text).logits_per_image  # [b, C]
        loss = _contrastive_loss(logits, labels[batch])
        if recipe.word_weight > 0 and tokenizer is not None and len(words) >= 2:
            loss = loss + recipe.word_weight * _word_identity_loss(
                model, tokenizer, words, recipe, generator
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():  # CLIP's cap on the learned temperature
            model.logit_scale.clamp_(0, math.log(recipe.max_logit_scale))
        loss_value = loss.item()
        bar.set_postfix(loss=f"{loss_value:.3f}")
    return loss_value


def _word_identity_loss(
    model: CLIPModel,
    tokenizer: PreTrainedTokenizerBase,
    words: Sequence[str],
    recipe: ClipRecipe,
    generator: torch.Generator,
) -> torch.Tensor:
    """Symmetric InfoNCE between two templated prompts of the same random words.

    Text tower only: it keeps each word's identity in the pooled text embedding (without it
    the class prompts of an unseen domain are near-duplicates:
    docs/research/clip-pretraining.md)."""
    n = min(recipe.word_batch, len(words))
    templates = _word_templates()
    # Phrases of 1-3 random words (class names have up to three), each in two random templates
    picked = torch.randperm(len(words), generator=generator)[:n].tolist()
    lengths = torch.randint(1, 4, (n,), generator=generator).tolist()
    extra = torch.randint(0, len(words), (n, 2), generator=generator).tolist()
    phrases = [
        " ".join([*[words[k] for k in extra[j]][: length - 1], words[i]])
        for j, (i, length) in enumerate(zip(picked, lengths, strict=True))
    ]
    slots = torch.randint(0, len(templates), (2, n), generator=generator).tolist()
    prompts = [templates[t].replace("{}", phrases[j]) for row in slots for j, t in enumerate(row)]
    embeds = model.get_text_features(**text_inputs(tokenizer, prompts)).pooler_output
    embeds = F.normalize(embeds, dim=-1)  # [2n, E]
    logits = embeds[:n] @ embeds[n:].t() / recipe.word_temperature  # [n, n]
    target = torch.arange(n)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


@torch.inference_mode()
def zero_shot_accuracy(
    model: CLIPModel,
    tokenizer: PreTrainedTokenizerBase,
    image_processor: Any,
    domain_name: str,
    split: domains.Split = "test",
) -> float:
    """Top-1 accuracy of the unpatched model over one domain's own class names."""
    domain = domains.get_domain(domain_name)
    size = model.config.vision_config.image_size
    samples = domains.load_domain(domain_name, split, size=size)
    device = model.logit_scale.device
    text = {k: v.to(device) for k, v in text_inputs(tokenizer, domain.prompts()).items()}
    images = pixel_values(image_processor, [image for image, _ in samples]).to(device)
    logits = model(pixel_values=images, **text).logits_per_image
    labels = torch.tensor([label for _, label in samples], device=device)
    return (logits.argmax(dim=1) == labels).float().mean().item()


# --- preparing the cached default ------------------------------------------------------------


def default_clip_is_prepared() -> bool:
    return _is_prepared(default_clip_dir())


def prepare_default_clip(
    force: bool = False, *, progress: bool = True, threads: int | None = None
) -> Path:
    """Train and cache the default CLIP once; returns its directory.

    Idempotent (a marker names the recipe; a matching marker skips the work) and atomic (built
    in a temporary sibling directory, renamed into place); a file lock makes concurrent callers
    train only once. It takes minutes on a CPU (docs/performance.md, Set-up cost).
    """
    target = default_clip_dir()
    summary: TrainSummary | None = None

    def build(staging: Path) -> dict[str, Any]:
        nonlocal summary
        summary = _build_default(staging, progress=progress, threads=threads)
        return {
            "recipe": RECIPE_VERSION,
            "train_steps": summary.steps,
            "train_seconds": round(summary.seconds, 1),
            "final_loss": round(summary.final_loss, 4),
            "base_domain": domains.BASE_DOMAIN,
            "base_test_accuracy": round(summary.test_accuracy, 4),
            "chance": round(summary.chance, 4),
            "torch_version": torch.__version__,
        }

    if not materialize(target, _is_prepared, build, force=force) or summary is None:
        return target
    logger.info(
        "Default CLIP ready at %s: trained %d steps in %.1f s, base test accuracy %.3f "
        "(chance %.3f)",
        target,
        summary.steps,
        summary.seconds,
        summary.test_accuracy,
        summary.chance,
    )
    return target


def _build_default(directory: Path, *, progress: bool, threads: int | None) -> TrainSummary:
    recipe = DEFAULT_RECIPE
    tokenizer = build_tokenizer(recipe.max_text_length)
    image_processor = build_image_processor(recipe.image_size)
    model = build_clip(recipe, tokenizer)
    summary = train_base(
        model, tokenizer, image_processor, recipe, progress=progress, threads=threads
    )
    save_clip_dir(
        directory, model, tokenizer, image_processor, domains.get_domain(domains.BASE_DOMAIN)
    )
    return summary


def _is_prepared(target: Path) -> bool:
    marker = read_marker(target)
    return (
        marker is not None
        and marker.get("recipe") == RECIPE_VERSION
        and (target / "config.json").is_file()
    )
