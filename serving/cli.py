"""The `mora` console script: the runtime commands plus `serve` and `experts`.

Dependency direction: this module imports `mora_runtime.cli` and extends its parser; the
runtime never imports `serving`.

`serve` prepares the bundled default models the config uses, then runs the server
(`serving.cluster.launcher.run`) until Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mora_runtime.cli import CLIError, build_parser, prepare_models, run
from serving import experts_cli


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
    # Only the bundled defaults the config actually serves need preparing.
    prepare_models(
        lm=cfg.lm.enabled and cfg.lm.model_dir is None,
        clip=cfg.clip.enabled and cfg.clip.model_dir is None,
    )
    return serve(args.config)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `mora` console script."""
    return run(build_parser(extra=(register, experts_cli.register)), argv)


if __name__ == "__main__":
    sys.exit(main())
