"""The `mora` command line, runtime half: `models prepare|path` and `import-peft`.

`serving.cli` builds on this parser (adding `serve`), so this module must never import
`serving`. Every subcommand stores its handler as `handler(args) -> int`; `run` parses,
sets up logging, dispatches, and turns user errors into one line on stderr.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from mora_runtime.learn import cli as learn_cli
from mora_runtime.paths import CACHE_ENV, default_clip_dir, default_lm_dir

logger = logging.getLogger(__name__)

# Adds one or more subcommands to the top-level subparsers (the `register(subparsers)` hook).
Registrar = Callable[[Any], None]

MODEL_KINDS = ("causal_lm", "clip")


class CLIError(Exception):
    """A user mistake or an unmet precondition: reported as one line, no traceback."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions `run` reports without a traceback (anything else is a bug and keeps one)."""
    from mora_runtime.models.lm import ModelNotAvailableError

    return (
        CLIError,
        ModelNotAvailableError,
        FileNotFoundError,
        FileExistsError,
        NotADirectoryError,
        PermissionError,
        ValueError,
    )


def build_parser(extra: Iterable[Registrar] = (), *, prog: str = "mora") -> argparse.ArgumentParser:
    """The full parser: the runtime subcommands plus whatever each `extra` hook registers."""
    parser = argparse.ArgumentParser(
        prog=prog, description="MoRA Serve: a frozen base model plus a growing pool of experts."
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="logging verbosity (default: INFO)",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register(subparsers)
    learn_cli.register(subparsers)
    for hook in extra:
        hook(subparsers)
    return parser


def register(subparsers: Any) -> None:
    """Add the runtime subcommands (`models`, `import-peft`) to `subparsers`."""
    _register_models(subparsers)
    _register_import_peft(subparsers)


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse `argv`, configure logging, run the chosen handler; returns the exit code."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse has already printed usage or help
        if exit_.code is None:
            return 0
        return exit_.code if isinstance(exit_.code, int) else 2
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.handler(args))
    except user_errors() as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m mora_runtime.cli`: the runtime commands without `serve`."""
    return run(build_parser(), argv)


# --- models --------------------------------------------------------------------------------------


def _register_models(subparsers: Any) -> None:
    models = subparsers.add_parser("models", help="prepare or locate the default models")
    actions = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")

    prepare = actions.add_parser(
        "prepare", help="materialise the default models into the cache (idempotent)"
    )
    prepare.add_argument("--force", action="store_true", help="rebuild even if already prepared")
    prepare.add_argument(
        "--only",
        choices=("lm", "clip"),
        help="prepare only what this model needs: lm = the CPU kernels and the default LM, "
        "clip = the default CLIP alone (what `mora serve` runs in the background)",
    )
    prepare.add_argument(
        "--threads",
        type=_positive_int,
        metavar="N",
        help="threads for training the default CLIP (default: the cores other processes "
        "leave free)",
    )
    prepare.set_defaults(handler=_cmd_models_prepare)

    path = actions.add_parser("path", help="print the cache directory of a default model")
    path.add_argument("which", choices=("lm", "clip"), help="which default model")
    path.set_defaults(handler=_cmd_models_path)


def prepare_models(
    force: bool = False,
    *,
    lm: bool = True,
    clip: bool = True,
    kernels: bool = True,
    threads: int | None = None,
) -> dict[str, Path | None]:
    """Prepare the CPU kernels (unless `kernels=False`) and the default models asked for;
    returns `{name: dir}`. `threads`: for training the default CLIP (None: the free cores)."""
    from mora_runtime.learn.pretrain_clip import prepare_default_clip
    from mora_runtime.models.lm import default_lm_is_prepared, prepare_default_lm

    prepared: dict[str, Path | None] = {}
    if kernels:
        _prepare_kernels()
    if lm:
        if force or not default_lm_is_prepared():
            print(
                f"causal LM: converting the bundled SmolLM2-135M-Instruct GGUF into "
                f"{default_lm_dir()} (once, ~20-30 s) ...",
                flush=True,
            )
        start = time.perf_counter()
        prepared["lm"] = prepare_default_lm(force=force)
        print(f"causal LM: ready at {prepared['lm']} ({time.perf_counter() - start:.1f} s)")
    if clip:
        print(f"CLIP: default CLIP in {default_clip_dir()} (trained once at set-up) ...")
        start = time.perf_counter()
        prepared["clip"] = Path(prepare_default_clip(force=force, threads=threads))
        print(f"CLIP: ready at {prepared['clip']} ({time.perf_counter() - start:.1f} s)")
    return prepared


def _prepare_kernels() -> None:
    from mora_runtime.cpu import build as cpu_kernels

    print("CPU kernels (MoRA layer, int4, attention): loading (built once, about a minute) ...")
    start = time.perf_counter()
    if cpu_kernels.kernels() is not None:
        state = "ready"
    elif cpu_kernels.layer_kernels() is not None:
        state = "MoRA layer call only on this CPU: float weights, torch attention"
    else:
        state = "none for this machine: torch ops serve"
    print(f"CPU kernels: {state} ({time.perf_counter() - start:.1f} s)", flush=True)


def _cmd_models_prepare(args: argparse.Namespace) -> int:
    # The CLIP alone needs no kernels: its preparation trains a plain CLIP.
    prepare_models(
        force=args.force,
        lm=args.only in (None, "lm"),
        clip=args.only in (None, "clip"),
        kernels=args.only in (None, "lm"),
        threads=args.threads,
    )
    return 0


def _cmd_models_path(args: argparse.Namespace) -> int:
    if args.which == "lm":
        from mora_runtime.models.lm import default_lm_is_prepared as is_prepared

        directory = default_lm_dir()
    else:
        from mora_runtime.learn.pretrain_clip import default_clip_is_prepared as is_prepared

        directory = default_clip_dir()
    if not is_prepared():
        # A path that does not exist would only fail later, somewhere less clear.
        source = f" (cache from ${CACHE_ENV})" if os.environ.get(CACHE_ENV, "").strip() else ""
        label = "LM" if args.which == "lm" else "CLIP"
        raise CLIError(
            f"the default {label} is not prepared at {directory}{source}; "
            "run `mora models prepare` (or `make models`) first"
        )
    print(directory)
    return 0


# --- import-peft ---------------------------------------------------------------------------------


def _register_import_peft(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "import-peft",
        help="convert a PEFT LoRA adapter into a MoRA expert set",
        description="Convert a PEFT LoRA adapter (adapter_config.json + "
        "adapter_model.safetensors) into an expert set: each LoRA rank becomes one rank-1 "
        "expert.",
    )
    parser.add_argument(
        "adapter_dir", type=Path, metavar="ADAPTER_DIR", help="PEFT LoRA adapter directory"
    )
    parser.add_argument(
        "--out", required=True, type=Path, metavar="DIR", help="expert-set directory to write"
    )
    parser.add_argument(
        "--name", help="name of the new expert set (default: the name of the --out directory)"
    )
    parser.add_argument(
        "--base",
        type=Path,
        metavar="MODEL_DIR",
        help="local base model directory to fingerprint and check shapes against "
        "(default: the default model of --kind, prepared if needed)",
    )
    parser.add_argument(
        "--kind",
        choices=MODEL_KINDS,
        default="causal_lm",
        help="base model kind (default: causal_lm)",
    )
    parser.add_argument("--top-k", type=_positive_int, help="routing default: experts per token")
    parser.add_argument("--tau", type=_positive_float, help="routing default: softmax temperature")
    parser.add_argument("--threshold", type=float, help="routing default: pruning threshold")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing expert set at --out"
    )
    parser.set_defaults(handler=_cmd_import_peft)


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


def _cmd_import_peft(args: argparse.Namespace) -> int:
    from mora_runtime.expert_sets.format import NAME_PATTERN

    name = args.name or args.out.resolve().name
    if not NAME_PATTERN.fullmatch(name):
        source = "--name" if args.name else "the --out directory's name (pass --name)"
        raise CLIError(f"{source} {name!r} must match {NAME_PATTERN.pattern}")
    if not args.adapter_dir.is_dir():
        raise CLIError(f"adapter directory {args.adapter_dir} does not exist")
    if args.base is not None and not args.base.is_dir():
        raise CLIError(f"base model directory {args.base} does not exist")
    from mora_runtime.expert_sets import peft_import

    # Only what the user gave: the converter's own defaults apply to the rest.
    options: dict[str, Any] = {
        key: value
        for key, value in (("top_k", args.top_k), ("tau", args.tau), ("threshold", args.threshold))
        if value is not None
    }
    if args.overwrite:
        options["overwrite"] = True
    out = peft_import.convert_peft_adapter(
        args.adapter_dir,
        args.out,
        name=name,
        model_kind=args.kind,
        base_model=_load_base(args.base, args.kind),
        **options,
    )
    print(f"expert set '{name}' written to {out}")
    return 0


def _load_base(base: Path | None, kind: str) -> Any:
    """The base model on CPU in float32 (None: the default model of that kind)."""
    if kind == "causal_lm":
        import torch

        from mora_runtime.models.lm import load_causal_lm

        return load_causal_lm(base, device="cpu", dtype=torch.float32).model
    directory = default_clip_dir() if base is None else base
    if not (directory / "config.json").is_file():
        hint = " (run `mora models prepare`, or pass --base)" if base is None else ""
        raise CLIError(f"no CLIP model at {directory}{hint}")
    from transformers import CLIPModel

    try:
        return CLIPModel.from_pretrained(directory, local_files_only=True).eval()
    except OSError as error:
        raise CLIError(f"cannot load a CLIP model from {directory}: {error}") from error


if __name__ == "__main__":
    sys.exit(main())
