"""The CLIP side of `mora eval --suite clip`: learn domains and classify without a domain id.

Two copies of the base CLIP: one patched with the MoRA pool (one set per learned domain), one
unpatched that carries the LoRA baselines as hooks (hooks off: the frozen zero-shot base).
Every evaluation ranks the union of the base labels and the class names learned so far (plus
the evaluated domain's own when it is not learned yet, see `suites_clip.label_space`), exactly
as the server ranks its default label set. `task_logit_scale` sets the logit scale every
method's task loss trains with (None: the base model's own; see `objectives.training_logit_scale`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Hashable, Sequence
from pathlib import Path

import torch

from mora_runtime.experts.patching import find_target_modules
from mora_runtime.learn import suites_clip
from mora_runtime.learn.data import ImageDataset
from mora_runtime.learn.domains import label_templates
from mora_runtime.learn.learn_task import learn_clip
from mora_runtime.learn.lora_baseline import LoRA
from mora_runtime.learn.objectives import ClipObjective, training_logit_scale
from mora_runtime.learn.results import TaskResult, routing_result
from mora_runtime.learn.trainer import LearnConfig, TrainLog, add_to_pool, optimize

logger = logging.getLogger(__name__)

EVAL_CHUNK = 128  # images per classify call


class ClipHarness:
    """Tasks, models and methods of the CLIP suite (see evaluate.run_continual)."""

    kind = "clip"

    def __init__(
        self,
        task_names: Sequence[str],
        cfg: LearnConfig,
        *,
        model_dir: str | Path | None = None,
        train_per_class: int | None = None,
        test_per_class: int | None = None,
        progress: bool = True,
        task_logit_scale: float | None = None,
    ) -> None:
        from mora_runtime.models.clip import ClipClassifier
        from mora_runtime.models.clip_loading import load_clip

        if task_logit_scale is not None and not task_logit_scale > 0:
            raise ValueError(f"the task logit scale must be positive, got {task_logit_scale}")
        self.task_logit_scale_override = task_logit_scale
        self.cfg = cfg
        self.progress = progress
        self.task_names = list(task_names)
        self.probe_name = suites_clip.BASE_TASK
        self.label_spaces = {
            "matrix": "base labels + class names learned so far (+ the evaluated task's own "
            "before it is learned): what the server ranks by default",
            "alt_matrix": "class names learned so far (+ the evaluated task's own), without "
            "the base labels: X-TAIL's label space",
        }
        self.mora = ClipClassifier(load_clip(model_dir, device="cpu"))
        self.pool = self.mora.patch(cfg.routing)
        self.base = ClipClassifier(load_clip(model_dir, device="cpu"))
        modules = find_target_modules(self.base.clip.model)
        self.lora = LoRA(self.base.clip.model, modules, cfg.rank, scale=cfg.scale, seed=cfg.seed)
        # Every method prompts a class name with its domain's template, a task's own before it
        # is learned too (the MoRA sets carry it only once loaded); base labels keep the model's.
        own = {
            k: v for k, v in label_templates().items() if k not in self.base.clip.label_templates
        }
        self.mora.register_templates(own)
        self.base.register_templates(own)
        self.base_labels = tuple(self.mora.clip.base_labels)
        size = self.mora.clip.model.config.vision_config.image_size
        self.train: dict[str, ImageDataset] = {
            name: suites_clip.task_data(name, "train", per_class=train_per_class, size=size)
            for name in self.task_names
        }
        self.test: dict[str, ImageDataset] = {
            name: suites_clip.task_data(name, "test", per_class=test_per_class, size=size)
            for name in [*self.task_names, self.probe_name]
        }
        self.model_name = str(self.mora.clip.model_dir)

    @property
    def task_logit_scale(self) -> float:
        """The logit scale the task losses train with."""
        if self.task_logit_scale_override is not None:
            return self.task_logit_scale_override
        return round(self.mora.clip.model.logit_scale.exp().item(), 4)

    # ----------------------------------------------------------------------- learning
    def task_cfg(self, index: int) -> LearnConfig:
        return self.cfg.with_overrides(seed=self.cfg.seed + index)

    def learn_mora(self, index: int) -> dict:
        name = self.task_names[index]
        with training_logit_scale(self.mora.clip.model, self.task_logit_scale_override):
            expert_set = learn_clip(
                self.mora,
                self.train[name],
                self.task_cfg(index),
                name=name,
                progress=self.progress,
                extra={"task_logit_scale": self.task_logit_scale},
            )
        add_to_pool(self.pool, expert_set)
        self.mora.clear_cache()
        return dict(expert_set.meta.training)

    def train_lora(self, index: int) -> TrainLog:
        name, cfg = self.task_names[index], self.task_cfg(index)
        data = self.train[name]
        prompts = [self.base.prompt(label) for label in data.class_names]
        objective = ClipObjective(
            self.base.clip, data, batch_size=cfg.batch_size, seed=cfg.seed, prompts=prompts
        )
        with training_logit_scale(self.base.clip.model, self.task_logit_scale_override):
            log = optimize(
                self.lora.parameters(), objective, cfg, desc=f"LoRA {name}", progress=self.progress
            )
        self.base.clear_cache()
        return log

    def lora_changed(self) -> None:
        """The LoRA weights were swapped: cached label embeddings are stale."""
        self.base.clear_cache()

    # ----------------------------------------------------------------------- scoring
    def labels(self, stage: int, evaluated: str | None) -> tuple[str, ...]:
        learned = self.task_names[: stage + 1]
        return suites_clip.label_space(self.base_labels, learned, evaluated)

    def context_key(self, stage: int, index: int) -> Hashable:
        return self.labels(stage, self.task_names[index])

    def evaluate(self, method: str, stage: int, index: int) -> TaskResult:
        return self._evaluate(method, stage, self.task_names[index])

    def evaluate_probe(self, method: str, stage: int) -> TaskResult:
        """The pre-training domain, over the same label space as the tasks at `stage`."""
        return self._evaluate(method, stage, self.probe_name)

    def _evaluate(self, method: str, stage: int, name: str) -> TaskResult:
        """Top-1 over base labels + learned class names; `alt_accuracy`: the same logits
        restricted to the learned class names (X-TAIL's label space; none for the probe)."""
        data = self.test[name]
        evaluated = None if name == self.probe_name else name
        labels = self.labels(stage, evaluated)
        index = {label: i for i, label in enumerate(labels)}
        truth = torch.tensor([index[data.class_names[label]] for label in data.labels])
        # [L] bool: the learned (and evaluated) class names, i.e. not a base label
        learned = torch.tensor([label not in self.base_labels for label in labels])
        classifier = self.mora if method == "mora" else self.base
        logits, routings = [], []
        with self.lora.disabled() if method == "base" else contextlib.nullcontext():
            if method == "base":
                self.base.clear_cache()
            for start in range(0, len(data), EVAL_CHUNK):
                out = classifier.classify(list(data.images[start : start + EVAL_CHUNK]), labels)
                logits.append(out.logits)  # [B, L]
                routings += [r.routing for r in out.results]
        if method == "base":
            self.base.clear_cache()  # the label embeddings were computed without the LoRA
        scores = torch.cat(logits)  # [N, L]
        accuracy = 100.0 * (scores.argmax(-1) == truth).float().mean().item()
        alt = None
        if evaluated is not None:
            restricted = scores.masked_fill(~learned, float("-inf"))
            alt = 100.0 * (restricted.argmax(-1) == truth).float().mean().item()
        if method != "mora":
            return TaskResult(accuracy, alt_accuracy=alt)
        own = name if name in {e.name for e in self.pool.sets()} else None
        return routing_result(accuracy, routings, own, alt)

    def examples_for_report(self) -> dict[str, dict]:
        return {
            name: {
                "classes": list(self.train[name].class_names),
                "train": len(self.train[name]),
                "test": len(self.test[name]),
                "prompt": self.mora.prompt(self.train[name].class_names[0]),
            }
            for name in self.task_names
        }
