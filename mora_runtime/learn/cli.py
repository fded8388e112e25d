"""`mora learn`, `mora tasks list|export` and `mora eval`: the continual-learning commands.

`register(subparsers)` adds them to the `mora` parser. Parsing imports nothing heavy: torch,
transformers and the suites load inside the handlers.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
from pathlib import Path
from typing import Any

from mora_runtime.experts.defaults import ROUTING_DEFAULTS

logger = logging.getLogger(__name__)

STORE_ENV = "MORA_EXPERT_STORE"
DEFAULT_STORE = "experts"


def register(subparsers: Any) -> None:
    """Add `learn`, `tasks` and `eval` to the top-level subparsers."""
    _register_learn(subparsers)
    _register_tasks(subparsers)
    _register_eval(subparsers)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _add_hyperparameters(parser: argparse.ArgumentParser, *, defaults_note: str) -> None:
    group = parser.add_argument_group(f"hyper-parameters ({defaults_note})")
    group.add_argument("--rank", type=_positive_int, help="new rank-1 experts per module (r)")
    group.add_argument("--top-k", type=_positive_int, help="experts kept per token (k)")
    group.add_argument("--tau", type=_positive_float, help="routing softmax temperature")
    group.add_argument("--threshold", type=float, help="rank-pruning threshold at inference")
    group.add_argument("--scale", type=float, help="output scale of the new experts")
    group.add_argument("--steps", type=_positive_int, help="optimiser steps per task")
    group.add_argument("--lr", type=_positive_float, help="AdamW learning rate")
    group.add_argument("--batch-size", type=_positive_int, help="examples per step")
    group.add_argument(
        "--seed",
        type=int,
        help="seed of initialisation and batch order (give the same one to repeat a run)",
    )
    group.add_argument(
        "--threads",
        type=_positive_int,
        help="intra-op CPU threads (default: the cores other processes leave free)",
    )


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    names = ("rank", "top_k", "tau", "threshold", "scale", "steps", "lr", "batch_size", "seed")
    return {name: getattr(args, name) for name in names}


# --- learn ---------------------------------------------------------------------------------------


def _register_learn(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "learn",
        help="learn one task as a new expert set beside a frozen pool",
        description="Load the base model and the earlier expert sets (frozen), add r new "
        "rank-1 experts per adapted module, train only them on the task, and write the new "
        "expert set (runtime format, with its training summary). Data: LM JSONL "
        '({"prompt", "completion"} or {"text"}); CLIP image folder (one sub-folder per '
        "class) or a JSONL/CSV manifest (image, label).",
    )
    parser.add_argument("--kind", required=True, choices=("lm", "clip"), help="base model kind")
    parser.add_argument("--data", required=True, type=Path, metavar="PATH", help="task data")
    parser.add_argument("--name", required=True, help="name of the new expert set")
    parser.add_argument(
        "--base",
        type=Path,
        metavar="MODEL_DIR",
        help="local base model directory (default: the bundled default of --kind)",
    )
    parser.add_argument(
        "--pool",
        nargs="+",
        default=[],
        type=Path,
        metavar="EXPERT_SET",
        help="earlier expert-set directories, in the order they were learned (kept frozen)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help=f"where to write the set (default: ${STORE_ENV}/NAME, else ./{DEFAULT_STORE}/NAME)",
    )
    parser.add_argument(
        "--prompt-template",
        metavar="TEMPLATE",
        help='CLIP only: how a class name becomes a prompt, with one "{}" (e.g. "a photo of a '
        "{}.\"); stored in the set. Default: the bundled domain's own when every class is one "
        "domain's, else the classifier's default",
    )
    parser.add_argument(
        "--device",
        metavar="DEVICE",
        help="where to learn: cpu, cuda or cuda:N (default: cuda when torch sees a GPU, else "
        "cpu); the set written is the same format either way",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing set")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    lm, clip = ROUTING_DEFAULTS["causal_lm"], ROUTING_DEFAULTS["clip"]
    _add_hyperparameters(
        parser,
        defaults_note=f"LM: r=8, k={lm.top_k}, tau={lm.tau}, threshold {lm.threshold}; "
        f"CLIP: r=16, k={clip.top_k}, tau={clip.tau}, threshold {clip.threshold}, batch 64; "
        "both: scale 1, 200 steps, lr 5e-4, a fresh random seed per run, "
        "recorded in the set's training summary",
    )
    parser.set_defaults(handler=_cmd_learn)


def _cmd_learn(args: argparse.Namespace) -> int:
    from mora_runtime.expert_sets.format import NAME_PATTERN
    from mora_runtime.learn.learn_task import defaults_for, learn_from_files

    if not NAME_PATTERN.fullmatch(args.name):
        raise ValueError(f"--name {args.name!r} must match {NAME_PATTERN.pattern}")
    if not args.data.exists():
        raise FileNotFoundError(f"--data {args.data} does not exist")
    seed = draw_seed() if args.seed is None else args.seed
    cfg = defaults_for(args.kind).with_overrides(**{**_overrides(args), "seed": seed})
    out = args.out or Path(os.environ.get(STORE_ENV) or DEFAULT_STORE) / args.name
    result = learn_from_files(
        args.kind,
        args.data,
        args.name,
        out,
        base=args.base,
        pool_dirs=args.pool,
        cfg=cfg,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        threads=args.threads,
        prompt_template=args.prompt_template,
        device=args.device,
    )
    training = result.expert_set.meta.training
    print(
        f"expert set '{args.name}' written to {result.path}: {len(result.expert_set.tensors)} "
        f"modules x rank {cfg.rank}, {training['steps']} steps in {training['seconds']:.1f} s, "
        f"loss {training['first_loss']:.4f} -> {training['final_loss']:.4f}, seed {cfg.seed}, "
        f"on {training['device']}"
        + ("" if args.seed is not None else " (drawn; pass --seed to repeat the run)")
    )
    args.written = result.path  # for hooks that act on the new set (`serving.cli`: --load)
    return 0


def draw_seed() -> int:
    """A fresh seed for a task learned without --seed.

    Each task's new keys are drawn from its seed, and the keys are what route a token to
    its task's experts: tasks learned with one shared seed start from identical keys."""
    return secrets.randbelow(2**31)


# --- tasks ---------------------------------------------------------------------------------------


def _register_tasks(subparsers: Any) -> None:
    tasks = subparsers.add_parser("tasks", help="list or export the built-in suite tasks")
    actions = tasks.add_subparsers(dest="tasks_command", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="list every built-in task")
    listing.set_defaults(handler=_cmd_tasks_list)
    export = actions.add_parser(
        "export",
        help="write a task's train and test splits in the `mora learn` data formats",
        description="LM tasks: DIR/train.jsonl and DIR/test.jsonl. CLIP tasks: DIR/train/ and "
        "DIR/test/ image folders (one sub-folder per class).",
    )
    export.add_argument("name", metavar="NAME", help="task name, e.g. dates or lm/dates, shapes")
    export.add_argument("dir", type=Path, metavar="DIR", help="output directory")
    export.add_argument("--train-size", type=_positive_int, help="LM examples / images per class")
    export.add_argument("--test-size", type=_positive_int, help="LM examples / images per class")
    export.add_argument("--seed", type=int, default=0, help="data seed (default 0)")
    export.set_defaults(handler=_cmd_tasks_export)


def _cmd_tasks_list(args: argparse.Namespace) -> int:
    from mora_runtime.learn import suites_clip, suites_lm

    for name, task in suites_lm.TASKS.items():
        marker = "*" if name in suites_lm.DEFAULT_TASKS else " "
        print(f"lm/{name:<12}{marker} {task.description}")
    for name in suites_clip.task_names():
        role = "pre-training domain" if name == suites_clip.BASE_TASK else "image domain"
        marker = "*" if name in suites_clip.DEFAULT_TASKS else " "
        classes = ", ".join(suites_clip.class_names(name))
        print(f"clip/{name:<10}{marker} {role}: {classes}")
    print("(* = in the default sequence of `mora eval`)")
    return 0


def _cmd_tasks_export(args: argparse.Namespace) -> int:
    from mora_runtime.learn.export import export_task

    written = export_task(
        args.name, args.dir, train_size=args.train_size, test_size=args.test_size, seed=args.seed
    )
    for split, path in written.items():
        print(f"{split}: {path}")
    return 0


# --- eval ----------------------------------------------------------------------------------------


def _register_eval(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="learn a built-in suite task by task and compare MoRA with LoRA baselines",
        description="Learns tasks 1..T in order and after each scores every task without a "
        "task id: MoRA, the frozen base (zero-shot), one LoRA trained sequentially, and one "
        "LoRA per task picked with the oracle task id (same rank). Writes accuracy matrices, "
        "Transfer/Average/Last/BWT, routing purity and active ranks as JSON, Markdown and a "
        "PNG heatmap.",
    )
    parser.add_argument("--suite", required=True, choices=("lm", "clip"), help="which suite")
    parser.add_argument(
        "--tasks", help="comma-separated task sequence (default: the suite's default sequence)"
    )
    parser.add_argument(
        "--methods",
        default="zero-shot,seq-lora,lora-oracle,mora",
        help="comma-separated subset of zero-shot,seq-lora,lora-oracle,mora",
    )
    parser.add_argument("--base", type=Path, metavar="MODEL_DIR", help="local base model dir")
    parser.add_argument("--train-size", type=_positive_int, help="LM examples / images per class")
    parser.add_argument("--test-size", type=_positive_int, help="LM examples / images per class")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("benchmarks/results"),
        metavar="DIR",
        help="report directory (default: benchmarks/results)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--clip-logit-scale",
        type=_positive_float,
        metavar="SCALE",
        help="CLIP suite: logit scale of the task loss for every method (default: the base "
        "model's own, 5 for the default CLIP; CLIP's authors used 100)",
    )
    _add_hyperparameters(
        parser,
        defaults_note="LM: 40 steps, batch 8; CLIP: 150 steps, batch 32, 120 train images per "
        "class; both lr 2e-3; seed 0 (offset per task); else as learn",
    )
    parser.set_defaults(handler=_cmd_eval)


def _cmd_eval(args: argparse.Namespace) -> int:
    from mora_runtime.learn.evaluate import SUITE_DEFAULTS, EvalOptions, run_suite

    if args.clip_logit_scale is not None and args.suite != "clip":
        raise ValueError("--clip-logit-scale applies to --suite clip only")
    cfg = SUITE_DEFAULTS[args.suite].with_overrides(**_overrides(args))
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip()) if args.tasks else None
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    report = run_suite(
        EvalOptions(
            suite=args.suite,
            cfg=cfg,
            tasks=tasks,
            methods=methods,
            model_dir=None if args.base is None else str(args.base),
            train_size=args.train_size,
            test_size=args.test_size,
            out_dir=args.out,
            progress=not args.no_progress,
            threads=args.threads,
            clip_logit_scale=args.clip_logit_scale,
        )
    )
    from mora_runtime.learn.report import markdown

    print(markdown(report))
    print("written: " + ", ".join(report["files"].values()))
    return 0
