"""Built-in CLIP tasks: the bundled image domains (`domains.py`) as task data.

The continual sequence is `domains.CONTINUAL_DOMAINS`; `domains.BASE_DOMAIN` ("objects") is
what the default CLIP was pre-trained on and is evaluated alongside, as a check that learning
keeps the model's zero-shot knowledge. Class names are distinct across domains, so every
evaluation can run over a union of class names without a domain id.
"""

from __future__ import annotations

from collections.abc import Sequence

from mora_runtime.learn import domains
from mora_runtime.learn.data import ImageDataset

DEFAULT_TASKS: tuple[str, ...] = domains.CONTINUAL_DOMAINS
BASE_TASK = domains.BASE_DOMAIN


def task_names() -> tuple[str, ...]:
    return domains.domain_names()


def task_data(
    name: str, split: domains.Split, *, per_class: int | None = None, size: int = 32, seed: int = 0
) -> ImageDataset:
    """A domain split as an `ImageDataset` (class names in the domain's order)."""
    domain = domains.get_domain(name)
    samples = domains.load_domain(name, split, size=size, seed=seed, per_class=per_class)
    return ImageDataset(
        domain.class_names,
        tuple(image for image, _ in samples),
        tuple(label for _, label in samples),
    )


def class_names(name: str) -> tuple[str, ...]:
    return domains.get_domain(name).class_names


def label_space(
    base_labels: Sequence[str], learned: Sequence[str], evaluated: str | None = None
) -> tuple[str, ...]:
    """The labels an evaluation ranks: base labels + every learned task's class names, plus
    the evaluated task's own when it is not learned yet (else its accuracy is 0 by
    construction and Transfer would measure nothing). Order-stable, no duplicates."""
    names = list(base_labels)
    for task in learned:
        names += class_names(task)
    if evaluated is not None:
        names += class_names(evaluated)
    return tuple(dict.fromkeys(names))
