"""The `mora` console script: the runtime commands plus `serve` and `experts`.

Dependency direction: this module imports `mora_runtime.cli` and extends its parser; the
runtime never imports `serving`.

`serve` prepares what the LM needs (the CPU kernels and the bundled default LM, when the
config serves them), starts preparing the default CLIP in the background when the config
serves it and it is not ready yet (serving/background_prepare.py; the CLIP replica warms up
meanwhile), then runs the server (`serving.cluster.launcher.run`) until Ctrl-C. With
everything prepared it prepares nothing.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mora_runtime.cli import CLIError, build_parser, prepare_models, run
from serving import experts_cli
from serving.background_prepare import BackgroundPrepare, clip_prepare_command

CLIP_LOG = Path("logs") / "clip-prepare.log"  # under the cache


def register(subparsers: Any) -> None:
    """Add the `serve` subcommand."""
    serve = subparsers.add_parser("serve", help="run the HTTP server (Ray Serve)")
    serve.add_argument(
        "--config", type=Path, metavar="FILE", help="server config YAML (default: built-in)"
    )
    serve.set_defaults(handler=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    if args.config is not None and not args.config.is_file():
        raise CLIError(f"config file {args.config} does not exist")
    from serving.cluster.launcher import run as serve
    from serving.config import load_config

    cfg = load_config(args.config)
    # The LM first, on the whole machine: completions wait for it, and training the CLIP
    # beside it would slow the kernels' build and the LM's conversion. Only the bundled
    # defaults the config actually serves need preparing.
    prepare_models(lm=cfg.lm.enabled and cfg.lm.model_dir is None, clip=False)
    background = None
    if cfg.clip.enabled and cfg.clip.model_dir is None:
        background = _start_clip_prepare()
    # Until the server installs its own handlers, SIGTERM must still end the child (the
    # `finally` below): the default action would leave it running.
    previous = signal.signal(signal.SIGTERM, _exit) if background is not None else None
    try:
        return serve(args.config)
    finally:
        if background is not None:
            if background.running():
                print("CLIP: stopping its background preparation (the next start resumes it)")
            background.stop()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _exit(signum: int, _frame: object) -> None:
    sys.exit(128 + signum)


def _start_clip_prepare() -> BackgroundPrepare | None:
    """Start preparing the default CLIP in a child process, unless it is prepared."""
    from mora_runtime.learn.pretrain_clip import default_clip_is_prepared
    from mora_runtime.paths import cache_dir, default_clip_dir

    if default_clip_is_prepared():
        return None
    background = BackgroundPrepare("CLIP", clip_prepare_command(), cache_dir() / CLIP_LOG)
    print(
        f"CLIP: preparing the default CLIP in {default_clip_dir()} in the background "
        f"(pid {background.pid}, log {background.log_path}); completions serve meanwhile, "
        "/classify answers 503 until it is ready (GET /health says when)",
        flush=True,
    )
    return background


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `mora` console script."""
    return run(build_parser(extra=(register, experts_cli.register)), argv)


if __name__ == "__main__":
    sys.exit(main())
