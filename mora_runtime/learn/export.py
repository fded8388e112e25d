"""`mora tasks export`: a built-in task's splits, written in the `mora learn` data formats."""

from __future__ import annotations

import os
from pathlib import Path

from mora_runtime.learn import suites_clip, suites_lm
from mora_runtime.learn.data import write_image_folder, write_lm_jsonl


def resolve_task(name: str) -> tuple[str, str]:
    """("lm" | "clip", task) from "dates", "lm/dates", "shapes" or "clip/shapes"."""
    suite, _, task = name.rpartition("/")
    if suite not in ("", "lm", "clip"):
        raise ValueError(f"unknown suite {suite!r} in {name!r}; use lm/NAME or clip/NAME")
    if suite in ("", "lm") and task in suites_lm.TASKS:
        return "lm", task
    if suite in ("", "clip") and task in suites_clip.task_names():
        return "clip", task
    known = [f"lm/{t}" for t in suites_lm.TASKS] + [f"clip/{t}" for t in suites_clip.task_names()]
    raise ValueError(f"unknown task {name!r}; known: {', '.join(known)}")


def export_task(
    name: str,
    directory: str | os.PathLike[str],
    *,
    train_size: int | None = None,
    test_size: int | None = None,
    seed: int = 0,
) -> dict[str, Path]:
    """Write the train and test splits of task `name` under `directory`; returns the paths."""
    suite, task = resolve_task(name)
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()):
        raise FileExistsError(f"{directory} exists and is not empty")
    if suite == "lm":
        lm_task = suites_lm.get_task(task)
        return {
            "train": write_lm_jsonl(
                directory / "train.jsonl", lm_task.examples("train", train_size, seed)
            ),
            "test": write_lm_jsonl(
                directory / "test.jsonl", lm_task.examples("test", test_size, seed)
            ),
        }
    return {
        split: write_image_folder(
            directory / split, suites_clip.task_data(task, split, per_class=size, seed=seed)
        )
        for split, size in (("train", train_size), ("test", test_size))
    }
