"""The CLIP task loss's logit scale: `training_logit_scale` sets it for a block and restores it,
and `ClipObjective` trains with it; `mora eval --clip-logit-scale` is parsed and checked."""

from __future__ import annotations

import argparse
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mora_runtime.learn import cli as learn_cli
from mora_runtime.learn.data import ImageDataset
from mora_runtime.learn.objectives import ClipObjective, clip_task_loss, training_logit_scale

TEXT = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # [C, E]
IMAGES = torch.tensor([[0.9, 0.3, 0.1], [0.2, 0.8, 0.4], [0.5, 0.5, 0.0]])  # [N, E]


class FakeClipModel(nn.Module):
    """Features are fixed: the loss depends only on the logit scale."""

    def __init__(self) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(5.0)), requires_grad=False)

    def get_text_features(self, **text):
        return SimpleNamespace(pooler_output=TEXT)

    def get_image_features(self, pixel_values):
        return SimpleNamespace(pooler_output=pixel_values)


class FakeText(dict):
    def to(self, device):
        return self


def fake_clip(model: nn.Module) -> SimpleNamespace:
    return SimpleNamespace(
        model=model,
        device="cpu",
        dtype=torch.float32,
        tokenizer=lambda prompts, **kw: FakeText(n=len(prompts)),
        # the "pixels" are the image features themselves (see FakeClipModel)
        image_processor=lambda images, return_tensors: {"pixel_values": IMAGES[list(images)]},
    )


def test_block_sets_the_scale_and_restores_it() -> None:
    model = FakeClipModel()
    saved = model.logit_scale.detach().clone()
    with training_logit_scale(model, 100.0):
        assert model.logit_scale.exp().item() == pytest.approx(100.0)
    assert torch.equal(model.logit_scale, saved)
    with pytest.raises(RuntimeError), training_logit_scale(model, 100.0):
        raise RuntimeError("training failed")
    assert torch.equal(model.logit_scale, saved)  # restored on errors too
    with training_logit_scale(model, None):
        assert torch.equal(model.logit_scale, saved)
    with pytest.raises(ValueError, match="positive"), training_logit_scale(model, 0.0):
        pass


def test_objective_trains_with_the_overridden_scale() -> None:
    model = FakeClipModel()
    data = ImageDataset(("x", "y"), (0, 1, 2), (0, 1, 0))
    objective = ClipObjective(fake_clip(model), data, batch_size=3, seed=0, prompts=["x", "y"])
    cosines = F.normalize(IMAGES, dim=-1) @ F.normalize(TEXT, dim=-1).t()  # [N, C]
    labels = torch.tensor([0, 1, 0])

    def expected(scale: float) -> torch.Tensor:
        return clip_task_loss(cosines * scale, labels)  # one batch holds all three images

    assert objective(0).item() == pytest.approx(expected(5.0).item(), rel=1e-5)
    with training_logit_scale(model, 100.0):
        loss = objective(1).item()
    assert loss == pytest.approx(expected(100.0).item(), rel=1e-5)
    assert abs(loss - expected(5.0).item()) > 0.1


def test_cli_flag() -> None:
    parser = argparse.ArgumentParser()
    learn_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "--suite", "clip", "--clip-logit-scale", "100"])
    assert args.clip_logit_scale == 100.0
    assert parser.parse_args(["eval", "--suite", "clip"]).clip_logit_scale is None
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "--suite", "clip", "--clip-logit-scale", "0"])
    lm = parser.parse_args(["eval", "--suite", "lm", "--clip-logit-scale", "100"])
    with pytest.raises(ValueError, match="clip only"):
        lm.handler(lm)
