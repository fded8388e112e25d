"""`mora learn --prompt-template`: a CLIP set carries the template it was trained with; an LM
task with one is refused before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest

from mora_runtime.cli import build_parser, run
from mora_runtime.expert_sets.store import load_expert_set
from mora_runtime.learn.data import ImageDataset, LMExample, write_image_folder, write_lm_jsonl
from mora_runtime.learn.suites_clip import task_data

TINY = ["--steps", "1", "--rank", "2", "--top-k", "2", "--no-progress", "--threads", "1"]


def test_clip_set_records_the_template_it_was_trained_with(
    tiny_clip_dir: Path, tmp_path: Path
) -> None:
    shapes = task_data("shapes", "train", per_class=2)
    data = ImageDataset(("left blob", "right blob"), shapes.images[:4], (0, 1, 0, 1))
    folder = write_image_folder(tmp_path / "blobs", data)
    out = tmp_path / "blobs-set"
    argv = ["learn", "--kind", "clip", "--data", str(folder), "--name", "blobs"]
    argv += ["--out", str(out), "--base", str(tiny_clip_dir), "--batch-size", "4", *TINY]
    assert run(build_parser(), [*argv, "--prompt-template", "a {} on paper"]) == 0
    meta = load_expert_set(out).meta
    assert meta.prompt_template == "a {} on paper"
    assert meta.training["prompts"] == ["a left blob on paper", "a right blob on paper"]


@pytest.mark.parametrize(
    ("kind", "template", "message"),
    [("lm", "a {}", "CLIP tasks only"), ("clip", "no slot", "exactly one")],
)
def test_bad_template_is_a_one_line_error_and_writes_nothing(
    tiny_llama_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    kind: str,
    template: str,
    message: str,
) -> None:
    data = write_lm_jsonl(tmp_path / "task.jsonl", [LMExample("hello", " world")])
    out = tmp_path / "set"
    argv = ["learn", "--kind", kind, "--data", str(data), "--name", "s", "--out", str(out)]
    argv += ["--base", str(tiny_llama_dir), "--batch-size", "1", *TINY]
    assert run(build_parser(), [*argv, "--prompt-template", template]) != 0
    assert message in capsys.readouterr().err
    assert not out.exists()
