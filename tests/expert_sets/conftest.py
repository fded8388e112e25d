"""Fixtures of the expert-set tests: one tiny model per module and a saved valid set."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mora_runtime.expert_sets import store
from mora_runtime.expert_sets.format import (
    ExpertSet,
)
from tests.expert_sets.helpers import make_set, tiny_llama


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_llama()


@pytest.fixture
def good(model: torch.nn.Module, tmp_path: Path) -> tuple[ExpertSet, Path]:
    expert_set = make_set(model)
    return expert_set, store.save_expert_set(expert_set, tmp_path / "store" / "task-1")
