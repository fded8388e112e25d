"""Task losses (docs/spec.md): what one training step of a task computes.

- Causal LM: next-token cross-entropy on the completion tokens only (plus one end-of-sequence
  token, so the model learns where an answer stops); the prompt is tokenised exactly as the
  server tokenises a completions prompt, the completion without special tokens.
- CLIP: image->text cross-entropy over the current task's class-name prompts plus
  text->image cross-entropy over the batch's images, averaged. Earlier tasks' classes take
  no part: their logits are masked out by never being computed. The logits are cosines times
  the base model's logit scale (the default CLIP's is capped at 5 in pre-training);
  `training_logit_scale` trains with another one without changing what the model serves.

Each objective is a callable `step -> loss` drawing its own seeded batches (shuffled epochs),
so the trainer and the LoRA baselines run the same data in the same order.

Shape legend: b = batch, L = tokens per row, H = hidden size, M = completion tokens, C = classes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mora_runtime.learn.data import ImageDataset, LMExample

IGNORE = -100


class EpochSampler:
    """Seeded shuffled epochs of `n` items, `batch_size` at a time (batches never straddle)."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        if n < 1:
            raise ValueError("no training examples")
        self.n = n
        self.batch_size = min(batch_size, n)
        self.generator = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(n, generator=self.generator)
        self.cursor = 0

    def next(self) -> Tensor:
        if self.cursor + self.batch_size > self.n:
            self.order, self.cursor = torch.randperm(self.n, generator=self.generator), 0
        batch = self.order[self.cursor : self.cursor + self.batch_size]
        self.cursor += self.batch_size
        return batch


# --- causal LM ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenizedExample:
    ids: tuple[int, ...]
    start: int  # index of the first completion token: the loss covers ids[start:]


def tokenize_examples(
    tokenizer: Any, examples: Sequence[LMExample], eos_token_id: int | None, max_length: int
) -> list[TokenizedExample]:
    out = []
    for example in examples:
        prompt = list(tokenizer(example.prompt)["input_ids"]) if example.prompt else []
        completion = list(tokenizer(example.completion, add_special_tokens=False)["input_ids"])
        if eos_token_id is not None:
            completion.append(eos_token_id)
        ids = (prompt + completion)[-max_length:]  # too long: drop the start of the prompt
        out.append(TokenizedExample(tuple(ids), max(0, len(ids) - len(completion))))
    return out


def collate(batch: Sequence[TokenizedExample], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded (input_ids, attention_mask, labels), each [b, L]; labels IGNORE off-target."""
    width = max(len(e.ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    for row, example in enumerate(batch):
        n = len(example.ids)
        ids[row, :n] = torch.tensor(example.ids)
        mask[row, :n] = 1
        labels[row, example.start : n] = ids[row, example.start : n]
    return ids, mask, labels


def completion_loss(model: nn.Module, ids: Tensor, mask: Tensor, labels: Tensor) -> Tensor:
    """Mean next-token cross-entropy over the labelled tokens.

    The output layer runs only on the positions that predict a labelled token (the vocabulary
    projection is the largest matmul of a small LM)."""
    targets = labels[:, 1:]  # [b, L-1]: position t predicts token t+1
    keep = targets != IGNORE
    head = model.get_output_embeddings()
    if head is None:
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1][keep]  # [M, V]
    else:
        hidden = model.base_model(input_ids=ids, attention_mask=mask)[0]  # [b, L, H]
        logits = head(hidden[:, :-1][keep])  # [M, V]
    return F.cross_entropy(logits.float(), targets[keep])


class LMObjective:
    """`step -> loss` over seeded batches of prompt/completion examples."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        examples: Sequence[LMExample],
        *,
        eos_token_id: int | None,
        batch_size: int,
        seed: int,
        max_length: int = 256,
    ) -> None:
        self.model = model
        self.examples = tokenize_examples(tokenizer, examples, eos_token_id, max_length)
        if not any(len(e.ids) - e.start for e in self.examples):
            raise ValueError("no example has a completion token to learn")
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (eos_token_id or 0)
        self.device = next(model.parameters()).device
        self.sampler = EpochSampler(len(self.examples), batch_size, seed)

    def __call__(self, step: int) -> Tensor:
        batch = [self.examples[i] for i in self.sampler.next().tolist()]
        ids, mask, labels = (t.to(self.device) for t in collate(batch, self.pad_id))
        return completion_loss(self.model, ids, mask, labels)


# --- CLIP ----------------------------------------------------------------------------------


def clip_task_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """(image->text CE + text->image CE) / 2 for logits [b, C] over the task's classes.

    Text->image: each class present in the batch against the batch's images; every image of
    that class is a positive (uniform soft target), so repeated classes are not negatives."""
    image_to_text = F.cross_entropy(logits, labels)
    positives = F.one_hot(labels, logits.shape[1]).t().float()  # [C, b]
    present = positives.sum(dim=1) > 0
    targets = positives[present] / positives[present].sum(dim=1, keepdim=True)
    text_to_image = -(targets * logits.t()[present].log_softmax(dim=1)).sum(dim=1).mean()
    return (image_to_text + text_to_image) / 2


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True)


@contextlib.contextmanager
def training_logit_scale(model: nn.Module, scale: float | None) -> Iterator[None]:
    """Within the block, the CLIP `model`'s logit scale is `scale` (None: left as it is).

    The task loss reads the model's scale, so this is how a run trains at another one; it is
    restored afterwards, and serving is unaffected either way (a positive scale never changes
    which label ranks first)."""
    if scale is None:
        yield
        return
    if not scale > 0:
        raise ValueError(f"the logit scale must be positive, got {scale}")
    param = model.logit_scale
    saved = param.detach().clone()
    with torch.no_grad():
        param.fill_(math.log(scale))
    try:
        yield
    finally:
        with torch.no_grad():
            param.copy_(saved)


class ClipObjective:
    """`step -> loss` over seeded image batches of one task, against its class prompts."""

    def __init__(
        self,
        clip: Any,  # mora_runtime.models.clip_loading.LoadedClip
        data: ImageDataset,
        *,
        batch_size: int,
        seed: int,
        prompts: Sequence[str],
    ) -> None:
        from mora_runtime.models.clip_loading import pixel_values

        if len(prompts) != len(data.class_names):
            raise ValueError("one prompt per class name is needed")
        self.model = clip.model
        device, dtype = clip.device, clip.dtype
        self.pixels = pixel_values(clip.image_processor, data.images).to(device, dtype)
        self.labels = torch.tensor(data.labels, device=device)  # [N]
        self.text = clip.tokenizer(
            list(prompts), padding=True, truncation=True, return_tensors="pt"
        ).to(device)
        self.sampler = EpochSampler(len(data), batch_size, seed)

    def __call__(self, step: int) -> Tensor:
        batch = self.sampler.next().to(self.labels.device)
        text = _unit(self.model.get_text_features(**self.text).pooler_output)  # [C, E]
        images = self.model.get_image_features(pixel_values=self.pixels[batch]).pooler_output
        logits = _unit(images) @ text.t() * self.model.logit_scale.exp()  # [b, C]
        return clip_task_loss(logits.float(), self.labels[batch])
