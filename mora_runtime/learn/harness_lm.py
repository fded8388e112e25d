"""The causal-LM side of `mora eval --suite lm`: learn tasks and score them by generation.

Two copies of the base model: one patched with the MoRA pool (sets are appended task by
task), one unpatched that carries the LoRA baselines as hooks (and, with the hooks off, is
the frozen zero-shot base). Scoring is greedy generation through the runtime's batching
engine, exact match of the first generated line; MoRA's per-sequence routing statistics give
routing purity and mean active ranks.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Sequence
from pathlib import Path

import torch

from mora_runtime.experts.patching import find_target_modules, patch_model
from mora_runtime.learn.data import LMExample
from mora_runtime.learn.generation import generate_greedy
from mora_runtime.learn.learn_task import learn_lm
from mora_runtime.learn.lora_baseline import LoRA
from mora_runtime.learn.objectives import LMObjective
from mora_runtime.learn.results import TaskResult, routing_result
from mora_runtime.learn.suites_lm import TEST_SIZE, get_task, score
from mora_runtime.learn.trainer import LearnConfig, TrainLog, add_to_pool, optimize

logger = logging.getLogger(__name__)


class LMHarness:
    """Tasks, models and methods of the LM suite (see evaluate.run_continual)."""

    kind = "lm"

    def __init__(
        self,
        task_names: Sequence[str],
        cfg: LearnConfig,
        *,
        model_dir: str | Path | None = None,
        train_size: int | None = None,
        test_size: int = TEST_SIZE,
        progress: bool = True,
    ) -> None:
        from mora_runtime.models.lm import load_causal_lm

        self.cfg = cfg
        self.progress = progress
        self.tasks = [get_task(name) for name in task_names]
        self.task_names = [t.name for t in self.tasks]
        self.train: dict[str, list[LMExample]] = {
            t.name: t.examples("train", train_size, cfg.seed) for t in self.tasks
        }
        self.test: dict[str, list[LMExample]] = {
            t.name: t.examples("test", test_size, cfg.seed) for t in self.tasks
        }
        self.mora_lm = load_causal_lm(model_dir, device="cpu", dtype=torch.float32)
        self.mora_lm.model.requires_grad_(False)
        self.pool = patch_model(self.mora_lm.model, routing=cfg.routing)
        self.base_lm = load_causal_lm(model_dir, device="cpu", dtype=torch.float32)
        self.base_lm.model.requires_grad_(False)
        modules = find_target_modules(self.base_lm.model)
        self.lora = LoRA(self.base_lm.model, modules, cfg.rank, scale=cfg.scale, seed=cfg.seed)
        self.model_name = str(self.mora_lm.model_dir)

    # ----------------------------------------------------------------------- learning
    def task_cfg(self, index: int) -> LearnConfig:
        """Task i learns with seed + i (expert init and batch order), for every method."""
        return self.cfg.with_overrides(seed=self.cfg.seed + index)

    def learn_mora(self, index: int) -> dict:
        name = self.task_names[index]
        expert_set = learn_lm(
            self.mora_lm,
            self.pool,
            self.train[name],
            self.task_cfg(index),
            name=name,
            progress=self.progress,
        )
        add_to_pool(self.pool, expert_set)
        return dict(expert_set.meta.training)

    def train_lora(self, index: int) -> TrainLog:
        """Continue training the current LoRA on task `index` (fresh optimiser state)."""
        name, cfg = self.task_names[index], self.task_cfg(index)
        objective = LMObjective(
            self.base_lm.model,
            self.base_lm.tokenizer,
            self.train[name],
            eos_token_id=self.base_lm.eos_token_ids[0] if self.base_lm.eos_token_ids else None,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            max_length=cfg.max_length,
        )
        return optimize(
            self.lora.parameters(), objective, cfg, desc=f"LoRA {name}", progress=self.progress
        )

    # ----------------------------------------------------------------------- scoring
    def context_key(self, stage: int, index: int) -> Hashable:
        """Generation does not depend on what else was learned: one key for every stage."""
        return None

    def evaluate(self, method: str, stage: int, index: int) -> TaskResult:
        """Accuracy of `method` ("mora", "lora" or "base") on task `index` after `stage`."""
        task = self.tasks[index]
        examples = self.test[task.name]
        prompts = [e.prompt for e in examples]
        if method == "mora":
            lm, pool = self.mora_lm, self.pool
        else:
            lm, pool = self.base_lm, None
        # Room for the longest reference answer plus a few tokens (the answer is its first line).
        budget = 4 + max(
            len(lm.tokenizer(e.completion, add_special_tokens=False)["input_ids"]) for e in examples
        )
        if method == "base":
            with self.lora.disabled():
                generations = self._generate(lm, prompts, budget, pool)
        else:
            generations = self._generate(lm, prompts, budget, pool)
        correct = [score(g.text, e.completion) for g, e in zip(generations, examples, strict=True)]
        accuracy = 100.0 * sum(correct) / len(correct)
        if pool is None:
            return TaskResult(accuracy)
        own = task.name if task.name in {e.name for e in pool.sets()} else None
        return routing_result(accuracy, [g.routing for g in generations], own)

    @staticmethod
    def _generate(lm, prompts: list[str], max_new_tokens: int, pool):
        return generate_greedy(
            lm.model,
            lm.tokenizer,
            prompts,
            max_new_tokens=max_new_tokens,
            eos_token_ids=lm.eos_token_ids,
            max_context=lm.max_context,
            pool=pool,
        )

    def examples_for_report(self) -> dict[str, dict]:
        return {
            t.name: {
                "description": t.description,
                "train": len(self.train[t.name]),
                "test": len(self.test[t.name]),
                "example": {
                    "prompt": self.test[t.name][0].prompt,
                    "completion": self.test[t.name][0].completion,
                },
            }
            for t in self.tasks
        }
