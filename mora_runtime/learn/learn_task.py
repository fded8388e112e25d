"""Learn one task end to end: what `mora learn` does, and what the evaluation calls per task.

`learn_lm` / `learn_clip` take a loaded, patched model whose pool holds the earlier (frozen)
sets and return the new `ExpertSet`; they never change the pool. `learn_from_files` is the
whole command: load the base model and the pool, read and validate the data, learn, and save
the set atomically (an interrupted run leaves nothing behind).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mora_runtime.expert_sets.format import ExpertSet, check_prompt_template
from mora_runtime.expert_sets.store import save_expert_set
from mora_runtime.experts.pool import ExpertPool
from mora_runtime.learn.data import (
    DataError,
    ImageDataset,
    LMExample,
    hash_images,
    hash_lm_examples,
    read_image_data,
    read_lm_jsonl,
)
from mora_runtime.learn.domains import label_templates
from mora_runtime.learn.objectives import ClipObjective, LMObjective
from mora_runtime.learn.trainer import (
    CLIP_DEFAULTS,
    LM_DEFAULTS,
    LearnConfig,
    build_expert_set,
    learn_experts,
    load_pool_sets,
    thread_budget,
    training_summary,
)
from mora_runtime.models.clip import DEFAULT_TEMPLATE

logger = logging.getLogger(__name__)

KIND_ALIASES = {"lm": "causal_lm", "causal_lm": "causal_lm", "clip": "clip"}


def defaults_for(kind: str) -> LearnConfig:
    return CLIP_DEFAULTS if KIND_ALIASES[kind] == "clip" else LM_DEFAULTS


def learn_lm(
    lm: Any,  # mora_runtime.models.lm.LoadedLM, patched
    pool: ExpertPool,
    examples: Sequence[LMExample],
    cfg: LearnConfig,
    *,
    name: str,
    data_hash: str | None = None,
    progress: bool = True,
    extra: dict[str, Any] | None = None,
) -> ExpertSet:
    objective = LMObjective(
        lm.model,
        lm.tokenizer,
        examples,
        eos_token_id=lm.eos_token_ids[0] if lm.eos_token_ids else None,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        max_length=cfg.max_length,
    )
    experts, log = learn_experts(pool, objective, cfg, desc=f"learning {name}", progress=progress)
    summary = training_summary(
        cfg,
        log,
        data_hash or hash_lm_examples(examples),
        examples=len(examples),
        pool=[entry.name for entry in pool.sets()],
        **(extra or {}),
    )
    return build_expert_set(lm.model, name, "causal_lm", experts, cfg, training=summary)


def task_template(class_names: Sequence[str], template: str | None = None) -> str:
    """The prompt template a CLIP task is learned with and its expert set carries: `template`
    when given, else that of the bundled domain every class name belongs to (an exported
    suite task), else the classifier's default."""
    if template is not None:
        check_prompt_template(template)
        return template
    bundled = label_templates()
    found = {bundled.get(label) for label in class_names}
    if len(found) == 1 and None not in found:
        return found.pop()
    return DEFAULT_TEMPLATE


def learn_clip(
    classifier: Any,  # mora_runtime.models.clip.ClipClassifier, patched
    data: ImageDataset,
    cfg: LearnConfig,
    *,
    name: str,
    data_hash: str | None = None,
    progress: bool = True,
    extra: dict[str, Any] | None = None,
    prompt_template: str | None = None,
) -> ExpertSet:
    """`prompt_template`: see `task_template`. Each class name trains with the prompt the
    classifier will give it once the set is loaded (a base label keeps the base model's)."""
    pool = classifier.pool
    if pool is None:
        raise ValueError("the classifier must be patched (ClipClassifier.patch) before learning")
    earlier = {c for entry in pool.sets() for c in entry.meta.get("class_names", ())}
    clash = sorted(earlier & set(data.class_names))
    if clash:
        logger.warning("class names already learned by an earlier set: %s", clash[:10])
    template = task_template(data.class_names, prompt_template)
    prompts = list(classifier.prompts(data.class_names, default=template))
    objective = ClipObjective(
        classifier.clip, data, batch_size=cfg.batch_size, seed=cfg.seed, prompts=prompts
    )
    experts, log = learn_experts(pool, objective, cfg, desc=f"learning {name}", progress=progress)
    summary = training_summary(
        cfg,
        log,
        data_hash or hash_images(data),
        images=len(data),
        prompts=prompts,
        pool=[entry.name for entry in pool.sets()],
        **(extra or {}),
    )
    return build_expert_set(
        classifier.clip.model,
        name,
        "clip",
        experts,
        cfg,
        class_names=data.class_names,
        prompt_template=template,
        training=summary,
    )


@dataclass(frozen=True)
class LearnResult:
    path: Path
    expert_set: ExpertSet


def learn_device(requested: str | torch.device | None = None) -> torch.device:
    """The device a task learns on: `requested`, else CUDA when torch sees a GPU, else the CPU.

    A device that is malformed or that this machine lacks is a `ValueError` naming it, raised
    before any model loads (not a CUDA error from deep inside the first forward)."""
    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as error:
        raise ValueError(f"--device {requested!r} is not a torch device: {error}") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {requested}: torch sees no CUDA device on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"--device {requested}: torch sees {torch.cuda.device_count()} CUDA device(s)"
            )
    elif device.type != "cpu":
        raise ValueError(f"--device {requested}: learning runs on cpu or cuda")
    return device


def learn_from_files(
    kind: str,
    data_path: str | os.PathLike[str],
    name: str,
    out: str | os.PathLike[str],
    *,
    base: str | os.PathLike[str] | None = None,
    pool_dirs: Sequence[str | os.PathLike[str]] = (),
    cfg: LearnConfig | None = None,
    overwrite: bool = False,
    progress: bool = True,
    threads: int | None = None,
    prompt_template: str | None = None,
    device: str | torch.device | None = None,
) -> LearnResult:
    """`mora learn`: base model + frozen pool + data -> a new expert set saved at `out`.

    `threads`: intra-op threads (None: the cores other processes leave free).
    `prompt_template`: a CLIP task's template (see `task_template`).
    `device`: where the model, the pool and the new experts live (see `learn_device`); the
    saved set is the same format either way (its tensors are moved to the CPU)."""
    if Path(out).exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass --overwrite to replace it)")
    if prompt_template is not None and KIND_ALIASES.get(kind) != "clip":
        raise ValueError("a prompt template is for CLIP tasks only")
    check_prompt_template(prompt_template)  # before any model loads
    target = learn_device(device)
    with thread_budget(threads):
        return _learn_from_files(
            kind,
            data_path,
            name,
            out,
            base,
            pool_dirs,
            cfg,
            overwrite,
            progress,
            prompt_template,
            target,
        )


def _learn_from_files(
    kind: str,
    data_path: str | os.PathLike[str],
    name: str,
    out: str | os.PathLike[str],
    base: str | os.PathLike[str] | None,
    pool_dirs: Sequence[str | os.PathLike[str]],
    cfg: LearnConfig | None,
    overwrite: bool,
    progress: bool,
    prompt_template: str | None,
    device: torch.device,
) -> LearnResult:
    model_kind = KIND_ALIASES.get(kind)
    if model_kind is None:
        raise ValueError(f"--kind must be lm or clip, got {kind!r}")
    cfg = cfg or defaults_for(kind)
    out = Path(out)
    torch.manual_seed(cfg.seed)
    extra = {
        "data": str(data_path),
        "base_model_dir": None if base is None else str(base),
        "device": device.type,
    }
    if model_kind == "causal_lm":
        examples = read_lm_jsonl(data_path)  # validate the data before loading any model
        from mora_runtime.experts.patching import patch_model
        from mora_runtime.models.lm import load_causal_lm

        # float32 on every device, as on the CPU: where a set was learned changes its
        # values by rounding only, not by the precision of its gradients.
        lm = load_causal_lm(base, device=device, dtype=torch.float32)
        lm.model.requires_grad_(False)
        pool = patch_model(lm.model, routing=cfg.routing)
        load_pool_sets(lm.model, pool, pool_dirs, model_kind)
        expert_set = learn_lm(lm, pool, examples, cfg, name=name, progress=progress, extra=extra)
    else:
        data = read_image_data(data_path)
        if len(data.class_names) < 2:
            raise DataError(f"{data_path}: a CLIP task needs at least two classes")
        from mora_runtime.models.clip import ClipClassifier
        from mora_runtime.models.clip_loading import load_clip

        classifier = ClipClassifier(load_clip(base, device=device, dtype=torch.float32))
        pool = classifier.patch(cfg.routing)
        load_pool_sets(classifier.clip.model, pool, pool_dirs, model_kind)
        expert_set = learn_clip(
            classifier,
            data,
            cfg,
            name=name,
            progress=progress,
            extra=extra,
            prompt_template=prompt_template,
        )
    path = save_expert_set(expert_set, out, overwrite=overwrite)
    return LearnResult(path, expert_set)
