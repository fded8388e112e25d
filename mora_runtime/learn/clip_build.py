"""The default CLIP's building blocks: its architecture (`ClipRecipe`), a word-level tokenizer
over every bundled domain's vocabulary, CLIP preprocessing, and writing an HF CLIP directory.

No package ships pretrained CLIP weights, so setup builds one from a config (32x32 images,
patch 4, two 4-layer towers of width 128) and trains it (learn/pretrain_clip.py).
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mora_runtime.learn import domains
from mora_runtime.models.clip_loading import LABELS_FILENAME

if TYPE_CHECKING:
    from transformers import CLIPModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD, UNK, BOS, EOS = "[PAD]", "[UNK]", "<|startoftext|>", "<|endoftext|>"
# CLIP's text model treats eos_token_id == 2 as a legacy config (argmax pooling), so EOS is 3.
_SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)
_EXTRA_WORDS = (
    *string.ascii_lowercase,
    *string.digits,
    *".,:;!?'\"-()/&",
    *("a", "an", "the", "of", "in", "on", "with", "and", "or", "photo", "picture", "image"),
    *("drawing", "rendering", "scan", "close", "up"),
)


@dataclass(frozen=True)
class ClipRecipe:
    """Architecture and training of the default CLIP (the unit tests use a tiny one)."""

    image_size: int = 32
    patch_size: int = 4
    hidden_size: int = 128
    intermediate_size: int = 512
    num_layers: int = 4
    num_heads: int = 4
    projection_dim: int = 128
    max_text_length: int = 32
    steps: int = 600
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    train_draws: int = 8  # seeds of the base train split used as training data
    # Background domains (domains.BACKGROUND_DOMAINS) trained on beside the base one, never
    # ranked by default: images unlike the base objects then stay away from the base labels.
    background: tuple[str, ...] = ("sketches",)
    # Cap on the learned logit scale (CLIP's is 100). The task loss uses this scale: at 100 (or
    # at the scale this recipe learns uncapped) the task's cross-entropy saturates while
    # images are still nearer a base label than their own class prompt; at 5 it keeps pulling
    # them in (docs/research/clip-suite.md, section 2).
    max_logit_scale: float = 5.0
    # Text-only word-identity objective (InfoNCE between two prompt templates around the same
    # vocabulary word): every word's embedding is trained, so the unseen class words of the
    # continual domains get distinct text embeddings. No image is paired with them.
    word_weight: float = 0.5
    word_batch: int = 64
    word_temperature: float = 0.1
    seed: int = 0


def vocabulary() -> list[str]:
    """Every word of every domain's class names and prompt template, plus a few extras."""
    from tokenizers import normalizers, pre_tokenizers

    normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    splitter = pre_tokenizers.Whitespace()
    words = set(_EXTRA_WORDS)
    for name in (*domains.domain_names(), *domains.BACKGROUND_DOMAINS):
        domain = domains.get_domain(name)
        for text in domain.prompts():
            words.update(w for w, _ in splitter.pre_tokenize_str(normalizer.normalize_str(text)))
    return sorted(words)


def build_tokenizer(max_length: int = 32) -> PreTrainedTokenizerFast:
    """A word-level tokenizer (lowercased) over `vocabulary()`, wrapped for transformers."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(_SPECIAL_TOKENS)}
    for word in vocabulary():
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        model_max_length=max_length,
    )


def build_image_processor(image_size: int = 32) -> Any:
    """CLIP preprocessing (resize, centre crop, OpenAI mean/std) for `image_size` inputs."""
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )


def build_clip(recipe: ClipRecipe, tokenizer: PreTrainedTokenizerBase) -> CLIPModel:
    """A randomly initialised `CLIPModel` for `recipe` (seeded: two builds are identical)."""
    from transformers import CLIPConfig, CLIPModel

    tower = dict(
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
    )
    text = dict(
        tower,
        vocab_size=len(tokenizer),
        max_position_embeddings=recipe.max_text_length,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    vision = dict(tower, image_size=recipe.image_size, patch_size=recipe.patch_size)
    config = CLIPConfig(
        text_config=text, vision_config=vision, projection_dim=recipe.projection_dim
    )
    torch.manual_seed(recipe.seed)
    return CLIPModel(config).eval()


def save_clip_dir(
    directory: Path,
    model: CLIPModel,
    tokenizer: PreTrainedTokenizerBase,
    image_processor: Any,
    base_domain: domains.Domain | None = None,
) -> Path:
    """Write a complete local HF CLIP directory (+ labels.json when a base domain is given)."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    image_processor.save_pretrained(directory)
    if base_domain is not None:
        labels = {
            "domain": base_domain.name,
            "labels": list(base_domain.class_names),
            "prompt_template": base_domain.prompt_template,
        }
        (directory / LABELS_FILENAME).write_text(json.dumps(labels, indent=2) + "\n")
    return directory
