"""Command line: `python -m loadtest run | compare | observe`.

Loopback only by default: a URL whose host is not 127.0.0.0/8, ::1 or localhost is refused
unless --allow-remote is given. Every run is bounded: --duration (at most 1 h), --max-requests,
--max-inflight, and a drain timeout after the duration.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import math
import os
import sys
import time
import urllib.parse
from collections.abc import Sequence
from pathlib import Path

from loadtest.workload import Dist, WorkloadError, parse_mix

MAX_DURATION_S = 3600.0


class UsageError(ValueError):
    pass


def is_loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _positive(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be > 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="load a server and write a report")
    run.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    mode = run.add_mutually_exclusive_group()
    mode.add_argument("--concurrency", type=int, help="closed loop: N users, back to back")
    mode.add_argument("--rate", type=_positive, help="open loop: requests per second")
    run.add_argument("--arrival", choices=("poisson", "constant"), default="poisson")
    run.add_argument(
        "--duration", "--duration-s", dest="duration", type=_positive, default=60.0,
        help="seconds of sending",
    )  # fmt: skip
    run.add_argument("--warmup", type=float, default=5.0, help="seconds excluded at the start")
    run.add_argument("--mix", default="completions=0.6,stream=0.3,classify=0.1")
    run.add_argument("--prompt-len", default="uniform:16,64", help="words per prompt (DIST)")
    run.add_argument("--max-tokens", default="uniform:16,48", help="max_tokens (DIST)")
    run.add_argument("--temperature", type=float, default=1.0)
    run.add_argument("--model", help="model name (default: the first of /v1/models)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--max-requests", type=int, default=10_000)
    run.add_argument("--max-inflight", type=int, default=256)
    run.add_argument("--request-timeout", type=_positive, default=120.0)
    run.add_argument("--drain-timeout", type=_positive, default=120.0)
    run.add_argument("--api-key", default=os.environ.get("MORA_API_TOKEN"))
    run.add_argument(
        "--metrics-url",
        default="http://127.0.0.1:8080/metrics",
        help="Prometheus endpoint scraped before and after ('none' to skip)",
    )
    run.add_argument("--out", type=Path, help="output directory (default runs/loadtest-TIME)")
    run.add_argument("--no-plots", action="store_true")
    run.add_argument("--allow-remote", action="store_true", help="allow non-loopback URLs")
    run.add_argument("--scenario", choices=("steady", "hotload", "soak"), default="steady")
    run.add_argument("--admin-token", default=os.environ.get("MORA_ADMIN_TOKEN"))
    run.add_argument("--hotload-every", type=_positive, default=15.0, help="seconds")
    run.add_argument(
        "--hotload-sets", help="comma-separated set directories, relative to the expert store"
    )
    run.add_argument(
        "--hotload-store", type=Path, help="generate random sets into this (the server's) store"
    )
    run.add_argument("--hotload-model-dir", help="LM the sets are generated for (default model)")
    run.add_argument("--hotload-rank", type=int, default=8)
    run.add_argument(
        "--mora", help="`mora` command that generates sets (default: beside python, else PATH)"
    )
    run.add_argument("--keep-sets", action="store_true", help="do not retire the loaded sets")
    soak = run.add_argument_group("soak scenario (--scenario soak)")
    soak.add_argument("--soak-sets", type=int, default=4, help="sets generated for the churn")
    soak.add_argument("--soak-churn-every", type=_positive, default=10.0, help="seconds")
    soak.add_argument("--soak-max-loaded", type=int, default=2, help="of the churn's sets")
    soak.add_argument("--soak-storm-every", type=_positive, default=60.0, help="seconds")
    soak.add_argument("--soak-storm-size", type=int, default=32, help="streams per storm")
    soak.add_argument("--soak-storm-tokens", type=int, default=64, help="max_tokens of each")
    soak.add_argument("--soak-sample-every", type=_positive, default=5.0, help="seconds")
    soak.add_argument(
        "--soak-max-slope", type=float, help="fail if a replica's RSS grows faster (MB/min)"
    )
    soak.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("-v", "--verbose", action="store_true")

    cmp = sub.add_parser("compare", help="exit 1 if NEW regressed against BASE")
    cmp.add_argument("base", type=Path)
    cmp.add_argument("new", type=Path)
    cmp.add_argument("--tolerance", type=float, default=0.10, help="relative (0.10 = 10%%)")
    cmp.add_argument("--abs-floor-ms", type=float, default=2.0)
    cmp.add_argument("--max-error-increase", type=float, default=0.01)

    obs = sub.add_parser("observe", help="server + Prometheus for a person to look at")
    obs.add_argument("--config", type=Path, help="server config (default deploy/serve.yaml)")
    obs.add_argument("--prometheus-port", type=int, default=9090)
    obs.add_argument("--no-install", action="store_true", help="never apt-get prometheus")
    obs.add_argument(
        "--mora", help="`mora` command that runs the server (default: beside python, else PATH)"
    )
    return parser


def _run_config(args: argparse.Namespace):
    from loadtest.runner import RunConfig

    _check_urls(args)
    if not 0 <= args.warmup < args.duration:
        raise UsageError("--warmup must be >= 0 and shorter than --duration")
    if args.concurrency is None and args.rate is None:
        args.concurrency = 4
    if args.concurrency is not None and args.concurrency < 1:
        raise UsageError("--concurrency must be >= 1")
    paths: tuple[str, ...] = ()
    if args.scenario == "hotload":
        if not args.admin_token:
            raise UsageError("--scenario hotload needs --admin-token (or $MORA_ADMIN_TOKEN)")
        # Loads happen at every, 2 * every, ... strictly before the end of the run.
        count = max(1, math.ceil(args.duration / args.hotload_every) - 1)
        paths = _hotload_paths(args, count)
    return RunConfig(
        url=args.url,
        duration_s=args.duration,
        mix=parse_mix(args.mix),
        prompt_len=Dist.parse(args.prompt_len),
        max_tokens=Dist.parse(args.max_tokens),
        concurrency=args.concurrency,
        rate=args.rate,
        arrival=args.arrival,
        warmup_s=args.warmup,
        seed=args.seed,
        model=args.model,
        max_requests=args.max_requests,
        max_inflight=args.max_inflight,
        request_timeout_s=args.request_timeout,
        drain_timeout_s=args.drain_timeout,
        temperature=args.temperature,
        api_key=args.api_key,
        metrics_url=None if args.metrics_url == "none" else args.metrics_url,
        admin_token=args.admin_token,
        hotload_paths=paths,
        hotload_every_s=args.hotload_every,
        hotload_retire=not args.keep_sets,
    )


def _hotload_paths(args: argparse.Namespace, count: int) -> tuple[str, ...]:
    if args.hotload_sets:
        return tuple(p.strip() for p in args.hotload_sets.split(",") if p.strip())
    if args.hotload_store:
        from loadtest.hotload import generate_sets

        return tuple(
            generate_sets(
                args.hotload_store,
                count,
                model_dir=args.hotload_model_dir,
                rank=args.hotload_rank,
                seed=args.seed,
                mora=args.mora,
            )
        )
    raise UsageError(f"--scenario {args.scenario} needs --hotload-sets or --hotload-store")


def _check_urls(args: argparse.Namespace) -> None:
    urls = [args.url] + ([args.metrics_url] if args.metrics_url != "none" else [])
    for url in urls:
        if not args.allow_remote and not is_loopback(url):
            raise UsageError(f"{url} is not a loopback address; pass --allow-remote to use it")
    if args.duration > MAX_DURATION_S:
        raise UsageError(f"--duration is capped at {MAX_DURATION_S:g} s")


def _soak_config(args: argparse.Namespace):
    from loadtest.soak import SoakConfig, SoakPlanError, plan_churn

    _check_urls(args)
    if args.metrics_url == "none":
        raise UsageError("--scenario soak samples memory from --metrics-url; it cannot be none")
    if not args.admin_token:
        raise UsageError("--scenario soak needs --admin-token (or $MORA_ADMIN_TOKEN)")
    if args.rate is not None:
        raise UsageError("--scenario soak runs closed-loop users: use --concurrency, not --rate")
    for name in ("concurrency", "soak_sets", "soak_storm_size", "soak_storm_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
    if args.soak_sets <= args.soak_max_loaded:
        raise UsageError("--soak-sets must be larger than --soak-max-loaded")
    try:  # refuse a plan that cannot work before generating sets for it
        plan_churn(
            [str(i) for i in range(args.soak_sets)],
            args.soak_churn_every,
            args.duration,
            args.soak_max_loaded,
        )
    except SoakPlanError as exc:
        raise UsageError(str(exc)) from None
    paths = _hotload_paths(args, args.soak_sets)
    return SoakConfig(
        url=args.url,
        metrics_url=args.metrics_url,
        duration_s=args.duration,
        set_paths=paths,
        mix=parse_mix(args.mix),
        prompt_len=Dist.parse(args.prompt_len),
        max_tokens=Dist.parse(args.max_tokens),
        admin_token=args.admin_token,
        api_key=args.api_key,
        model=args.model,
        concurrency=args.concurrency or 2,
        temperature=args.temperature,
        seed=args.seed,
        churn_every_s=args.soak_churn_every,
        max_loaded=args.soak_max_loaded,
        storm_every_s=args.soak_storm_every,
        storm_size=args.soak_storm_size,
        storm_max_tokens=args.soak_storm_tokens,
        sample_every_s=args.soak_sample_every,
        request_timeout_s=args.request_timeout,
        drain_timeout_s=args.drain_timeout,
        max_requests=args.max_requests,
        max_connections=max(args.max_inflight, args.soak_storm_size + (args.concurrency or 2)),
        progress=not args.no_progress,
    )


def cmd_soak(args: argparse.Namespace) -> int:
    from loadtest.soak_report import render_text, write_soak_outputs

    cfg = _soak_config(args)
    out = args.out or Path("runs") / f"soak-{time.strftime('%Y%m%d-%H%M%S')}"
    result = asyncio.run(_soak_with_progress(cfg))
    summary = write_soak_outputs(
        result, out, plots=not args.no_plots, max_slope_mb_per_min=args.soak_max_slope
    )
    print(render_text(summary))
    print(f"\nwrote {', '.join(summary['files'])} to {out}")
    return 0 if summary["passed"] else 1


async def _soak_with_progress(cfg):
    from tqdm import tqdm

    from loadtest.soak import run_soak

    with tqdm(total=round(cfg.duration_s), unit="s", desc="soak", disable=not cfg.progress) as bar:

        def tick(result, t: float) -> None:
            bar.n = min(round(t), bar.total)
            replicas = [s for s in result.samples if s.series.startswith("replica:")]
            ok = sum(r.ok for r in result.records)
            bar.set_postfix(
                ok=ok,
                failed=len(result.records) - ok,
                storms=len(result.storms),
                ops=len(result.churn),
                rss_mb=f"{replicas[-1].rss_bytes / 1e6:.0f}" if replicas else "-",
                refresh=False,
            )
            bar.refresh()

        return await run_soak(cfg, on_tick=tick)


def cmd_run(args: argparse.Namespace) -> int:
    from loadtest.report import render_text, write_outputs
    from loadtest.runner import run

    if args.scenario == "soak":
        return cmd_soak(args)
    cfg = _run_config(args)
    out = args.out or Path("runs") / f"loadtest-{time.strftime('%Y%m%d-%H%M%S')}"
    result = asyncio.run(run(cfg))
    summary = write_outputs(result, out, plots=not args.no_plots)
    print(render_text(summary))
    print(f"\nwrote {', '.join(summary['files'])} to {out}")
    hot = summary.get("hotload")
    return 1 if hot is not None and not hot["passed"] else 0


def cmd_compare(args: argparse.Namespace) -> int:
    from loadtest.compare import compare, load_summary, render

    checks = compare(
        load_summary(args.base),
        load_summary(args.new),
        tolerance=args.tolerance,
        abs_floor_s=args.abs_floor_ms / 1000,
        max_error_increase=args.max_error_increase,
    )
    print(render(checks))
    return 1 if any(c.regression for c in checks) else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from loadtest.compare import CompareError
    from loadtest.server_process import MoraCommandError

    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "compare":
            return cmd_compare(args)
        from loadtest.observe import observe

        return observe(
            args.config, args.prometheus_port, install=not args.no_install, mora=args.mora
        )
    except (UsageError, WorkloadError, CompareError, MoraCommandError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
