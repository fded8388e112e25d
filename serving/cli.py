"""The `mora` console script: the runtime commands plus `serve`.

Dependency direction: this module imports `mora_runtime.cli` and extends its parser; the
runtime never imports `serving`.

`serve` prepares the default models, then hands over to the server entry point
`serving.deployments.run(config_path: Path | None) -> int`. Until that entry point exists it
says what is missing and exits with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mora_runtime.cli import CLIError, build_parser, prepare_models, run

SERVE_MODULE = "serving.deployments"
SERVE_ENTRY = "run"
EXIT_NOT_AVAILABLE = 2


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
    prepare_models()
    entry = _serve_entry()
    if entry is None:
        print(
            f"serve: the server is not available in this version yet "
            f"(missing {SERVE_MODULE}.{SERVE_ENTRY}); the models above are prepared.",
            file=sys.stderr,
        )
        return EXIT_NOT_AVAILABLE
    return int(entry(args.config))


def _serve_entry() -> Any:
    if importlib.util.find_spec(SERVE_MODULE) is None:
        return None
    return getattr(importlib.import_module(SERVE_MODULE), SERVE_ENTRY, None)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `mora` console script."""
    return run(build_parser(extra=(register,)), argv)


if __name__ == "__main__":
    sys.exit(main())
